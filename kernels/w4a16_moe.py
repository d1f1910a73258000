"""Fused mixture-of-experts with INT4 weights and 16-bit activations (W4A16, AWQ groups), in Triton.

    out[t] = sum over slots s of topk_weights[t, s] * W2_e (silu(W1_e x_t) * (W3_e x_t)),  e = topk_ids[t, s]

Usage:
    from quantkit.kernels.w4a16_gemm import awq_to_kmajor
    from quantkit.kernels.w4a16_moe import fused_moe_w4a16, w4a16_kmajor_linear

    w13 = awq_to_kmajor(w13_qweight, w13_qzeros, w13_scales)  # once, at load: AutoAWQ [E, H, 2I/8] -> K-major
    w2 = awq_to_kmajor(w2_qweight, w2_qzeros, w2_scales)
    out = fused_moe_w4a16(x, *w13, *w2, topk_weights, topk_ids)
    y = w4a16_kmajor_linear(x, *awq_to_kmajor(qweight, qzeros, scales))  # a plain linear on the same kernels
    # x [M, H] bf16/fp16/fp32; experts stacked in the K-major layout (kernels/w4a16_gemm.py, `pack_kmajor`):
    #   w13_qweight int32 [E, 2I, H/8], w13_zeros uint8 [E, 2I, H/G], w13_scales [E, 2I, H/G]
    #     (rows [0, I) gate = w1, [I, 2I) up = w3)
    #   w2_qweight  int32 [E, H, I/8],  w2_zeros  uint8 [E, H, I/G],  w2_scales  [E, H, I/G]
    #   in each group of G codes of a row (G/8 words), nibble j of word c holds code j * G/8 + c;
    #   W[n, k] = (q[n, k] - z[n, k/G]) * s[n, k/G]
    # topk_weights fp32 [M, topk], topk_ids int [M, topk]; ids outside [0, E) route the slot nowhere

Why this layout. AutoAWQ packs eight output columns per word, so a row of its qweight is N/2 bytes along N and the K
loop of a tile BLOCK_N wide reads BLOCK_N/2 contiguous bytes per K row (32 bytes at BLOCK_N = 64): small, scattered
transactions and many short iterations, which held the AutoAWQ-layout kernel to 14-23% of HBM bandwidth on an H200
at decode sizes. Here each output row's codes are contiguous along K: one group of 128 codes is 64 contiguous bytes
(four 16-byte vector loads per row), its zero and scale sit beside it in [E, N, K/G] arrays, and a program streams
whole rows. Inside a group the codes are transposed: nibble j of the group's words holds G/8 consecutive codes, so
the activations one nibble place multiplies are one contiguous vector (one load per thread and nibble, shared by
all the rows the thread holds) and, for the tensor cores, one [BLOCK_M, G/8] slice of x. Both AutoAWQ and
compressed-tensors checkpoints are repacked to it once at load (quantkit/runtime/awq.py); the repack is torch ops
on the GPU, a few milliseconds per MoE layer (scripts/bench_w4a16.py measures it).

Steps, as in kernels/fp8_moe.py (whose routing and slot-sum kernels this module imports): sort the (token, slot)
pairs by expert, each expert's run padded to a multiple of BLOCK_M, with no host sync; GEMM 1 over that list, one
launch for all experts, each program computing gate rows and the matching up rows and writing silu(gate) * up
[M*topk, I] in x.dtype; GEMM 2 [M*topk, I] x W2^T with the router weight multiplied in the epilogue [M*topk, H]; the
sum over the topk slots in fp32. Decode (up to PAIRS_MAX pairs, a GEMV config of one pair a program) skips the
sort and the slot sum: GEMM 1 runs on the pairs as they come, each program reading its expert from topk_ids, and
GEMM 2 puts a token's slots on the grid's second axis and adds their weighted outputs in fp32, in slot order, in the
last program of each tile (fp8_gemm.split_k_sum): two launches instead of four, and the slot sum without the
rounding of each slot to x.dtype. With "ONE_LAUNCH" (the GEMV path at one pair a program) those two are one launch,
GEMM 2's programs after GEMM 1's in the grid, each waiting on its pair's ready counter
(_moe_gemv_one_launch_kernel): on an H100 7% less time at four tokens, 2% at eight, a loss at one and two
(BENCHMARKS.md); ONE_LAUNCH 3 has GEMM 2's programs load their share of the weight before they wait
(pair_gemv's PRELOAD; the H100's two-token entry, 2% ahead of two launches), 4 does that and backs off between
polls as 2 does. The whole layer can be captured in a CUDA graph. One layout; the block configuration (data,
configs/w4a16_moe.json) picks one per M bucket with its "PATH" key (three kernels):

  "gemv" (decode: a token or a few per expert). A program owns 2 x BLOCK_N weight rows (BLOCK_N gate and BLOCK_N
      up rows in GEMM 1, 2 x BLOCK_N output rows in GEMM 2) of one expert for the BLOCK_M pairs of one block and
      walks K one group at a time, with the words of the next PREFETCH groups in flight (registers). CUDA cores, no
      tensor cores, fp32 throughout. Per weight: a shift (none for nibble 4), one LOP3 and one FFMA. Nibble j is
      moved to bits 16-19, the mantissa bits of a float with exponent 2^7 whose ulp is 1, so masking it and OR-ing
      the exponent in gives 128 + q exactly, with the same two constants for every nibble place (the mask comes in
      as a launch argument: an immediate would be rematerialized into a register before every LOP3). The 128 + z
      offset enters once per row and group as (128 + z) * sum(x), the scale multiplies each group's sum: not per
      weight. The fp32 sums of (128 + q) x carry the 128 until it comes off, some 5-7 bits of the accumulator:
      nothing beside a 16-bit output's rounding, but fp32 activations (EXACT) keep the earlier form, nibbles in
      place at bits 4e, 2^(23-4e) + q with that offset subtracted per weight, q exact before the product.
      Integer-to-float conversions (a quarter of the FMA rate on Hopper) are avoided entirely; the dequantized words
      of a group are shared by the BLOCK_M tokens of the block. The compiled loop (sm_90, triton 3.9, counted by
      scripts/sass_loop.py with the launch's specializations) issues about 5.9 instructions per weight with 64
      weights a thread (BLOCK_N = 16 on 2 warps in GEMM 1) and 4.7 with 128, against 7.0 and 5.8 for the earlier
      form (nibbles in place, a per-place exponent subtracted per weight). An SM issues at most 4 warp instructions
      per cycle, 128 thread instructions: at 5 per weight that is 25 weights (13 bytes) per cycle, about 3 TB/s over
      132 SMs at 1.75 GHz, so instruction issue, not DRAM, bounds this path; the tuner picks the tile that does
      best. With PREFETCH 0 and STAGES > 1 the loop is a tl.range(num_stages=STAGES) whose group words Triton
      issues as asynchronous copies into shared memory STAGES - 1 groups ahead, holding no registers in flight (the
      same products in the same order): on an H100 32 rows on 2 warps over 3 stages took 4-13% less time than the
      register prefetch at one to eight tokens (BENCHMARKS.md). With GSTEP > 1 (one token a program, PREFETCH 0)
      each step takes GSTEP groups, each row's GSTEP * 64 contiguous bytes in one load (gemv_groups): two groups a
      step (128 bytes of a row, a whole cache line, per load) lifted the H100 from 61% to 76% of HBM at eight
      tokens where the tensor-core path, at half the instructions a weight, had stayed at 59%: the bytes a row
      per load, not the instructions, bounded the one-group loop.
  "dot" (prefill): tensor cores, one group per iteration: for each nibble place j the [BLOCK_N, G/8] words give
      a [G/8, BLOCK_N] operand (q - z exactly as above, with the zero point folded into the subtracted bias; cast to
      x.dtype, exact since |q - z| <= 15) against the [BLOCK_M, G/8] slice of x it multiplies, eight tl.dot with
      K = G/8 (16 at G = 128, the tensor cores' K step; the path needs G >= 128 on a GPU) summed into the group's
      partial product, which the group scale multiplies. With "WIDE" the eight places' operands are joined in the
      group's K order and the group is one tl.dot of K = G against its activations, loaded once for gate and up:
      compiled for sm_90 (triton 3.9) GEMM 1's loop on 64 x 128 tiles over 8 warps issues 1025 instructions a
      group where the eight dots issue 1326 (on 32 x 64 tiles over 4 warps 1132 against 983). "WIDE" 2 makes
      places j and j + 4 with the mma path's LOP3 (2^m + q, the offset off the product as (2^m + z) * sum(x)):
      702 instructions a group on 32 x 64 tiles over 4 warps, 1424 on 64 x 128 over 8 (spilling).

  "mma" (a few tokens to a few hundred per expert): tensor cores with the roles swapped, out^T = W x^T, the
      dequantized weights as the A operand held in registers (no shared-memory round trip). Masking a word with
      0x000F000F after shifting it 4j places leaves nibbles j and j + 4 in its two 16-bit halves; OR-ing in the
      pattern of 2^m (0x4300 for bf16, m = 7; 0x6400 for fp16, m = 10) makes each half the float 2^m + q exactly,
      so one LOP3 dequantizes two weights into the packed pair the MMA reads. The operand's K positions follow the
      words (position 2c + h is nibble j + 4h of word c), and the activations are loaded in that order. The
      2^m + z offset comes off once per row and group as (2^m + z) * sum(x), and the scale multiplies the group's
      product. Summing 2^m + q and subtracting 2^m sum(x) afterwards costs a few bits of the fp32 accumulator
      (relative error 4-8e-4 against the reference on MiniMax-M2 shapes, where the other paths reach 1-3e-4; a
      bf16 output's rounding is 4e-3). With "PAIRS" (decode, up to PAIRS_MAX pairs) it takes the pairs unsorted as
      the GEMV path does, one a program in the first column of the B operand (the other 15 masked off: the tensor
      cores do the multiply-adds the CUDA cores would, while the dequantization stays a LOP3 per two weights), its
      expert read from topk_ids, and ends in the GEMV path's epilogue (slot sum, K split in either GEMM). GSTEP
      groups an iteration, each with its own dots as before (the same bits), load them in one pipeline stage.

  "rows" (decode, unsorted pairs only; a tuning candidate): a thread owns a weight row and walks it a group at a
      time, the group's words in 16-byte loads (G/32 of them) with the next group's in flight, each nibble moved to
      bits 16-19 as in "gemv" and met by a [rows, 4] tile of four consecutive activations, the same for every row
      (one vector load a thread). The activations come in fp32 with their group sums (fp8_gemm.gemv_prep, one small
      launch), so the loop neither converts nor adds them: (128 + z) * sum(x) comes off once per row and group.
      GEMM 1 writes the intermediate in fp32 and, when BLOCK_N covers whole groups, its group sums for GEMM 2
      (else one more gemv_prep launch). Counted for sm_90 without a GPU (scripts/sass_loop.py, triton 3.9): 3.5
      instructions a weight at 128 weights a thread (BLOCK_N 128 on 8 warps in GEMM 1, 45 registers), against 5.7
      for "gemv" at its tuned M = 1 tile. Each warp load touches 32 rows (32 cache lines): L1, not issue, may be
      its bound. fp32 outputs carry about 1e-5 of relative error (the 128 carried per product). The linear has it
      too (DENSE, SPLIT_K; 3.6 instructions a weight for q/k/v at BLOCK_N 32 on one warp), behind one gemv_prep
      launch.

The same kernels run a plain linear (`w4a16_kmajor_linear`, the attention projections of quantkit/runtime/awq.py):
DENSE takes the rows of x in order against one weight, and SPLIT_K > 1 splits the groups of K over programs, the
last of a tile's programs to finish adding the fp32 partials in split order (fp8_gemm.split_k_sum), since the
projections' 3072-8192 outputs make too few tiles at decode sizes to fill the GPU. Its fourth path, "dequant",
writes W in x.dtype with one kernel and hands the product to torch (cuBLAS): from about a hundred rows on that beats
every in-loop path. Configurations: `configs/w4a16_linear.json` under "N=..,K=..,G=..", with SPLIT_K among the keys.

`fused_moe_w4a16_ref` loops over experts in PyTorch on the dequantized weights with the same roundings (the
intermediate and each slot's output in x.dtype), so kernels and reference agree to fp32 summation order. Running on
CPU (Triton's interpreter) follows kernels/fp8_gemm.py: loads are converted to fp32 at once, outputs rounded to the
bf16 grid before the store (`OUT_MANT`). Block configurations: `configs/w4a16_moe.json` under shape keys
"E=..,I=..,H=..,G=..", one config for both GEMMs (they walk the same padded list, so they share BLOCK_M), written by
`scripts/bench_w4a16.py --tune-seconds S`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_gemm import (
    ACT_DTYPES,
    INTERPRETED,
    _cuda_device_info,
    _cuda_index,
    arrival_counters,
    device_key,
    gemv_prep,
    grouped_pid,
    load_config_table,
    out_mantissa_bits,
    pdl_enter,
    pdl_kwargs,
    prefetch_rows,
    round_to_out_grid,
    split_divisor,
    split_k_sum,
    split_k_workspace,
)
from .fp8_gemm import triton_kernel as _jit
from .fp8_moe import (
    READY_STRIDE,
    _route,
    block_rows,
    expert_ahead,
    gemv_store,
    moe_sum,
    pair_rows,
    pick4,
    wait_count,
)
from .w4a16_gemm import check_device, check_kmajor_weight, kmajor_dequantize_ref

# K: one group per step. PREFETCH (gemv): groups of words loaded ahead, 1 or 2; num_stages: the dot path's pipeline
# SPLIT_K: programs a tile, each over a share of K's groups; the MoE's GEMM 1 (gemv and rows paths only), with
# SPLIT_K2 for its GEMM 2 (default 1), each falling to the largest divisor of its groups not above it; PAIRS (mma
# path): up to PAIRS_MAX pairs unsorted, one a program (as the GEMV path's decode), and then SPLIT_K / SPLIT_K2 too;
# GSTEP (mma; gemv at one token a program and PREFETCH 0): groups a K step, falling to the largest power of two
# dividing the program's groups (fp32 activations on the gemv path: 1); WIDE (dot path): one tl.dot of K = G a group
MOE_CONFIG_KEYS = ("PATH", "BLOCK_M", "BLOCK_N", "GROUP_M", "PREFETCH", "num_warps", "num_stages", "SPLIT_K",
                   "SPLIT_K2", "STAGES", "PAIRS", "GSTEP", "ONE_LAUNCH", "WIDE")
PATHS = ("gemv", "dot", "mma")
# the MoE also has "rows" (decode, unsorted pairs only): a thread a weight row, activations in fp32 with their group
# sums made once (see _moe_rows_kernel); a tuning candidate
MOE_PATHS = PATHS + ("rows",)
# at most this many (token, slot) pairs, a GEMV config of one pair a program runs the pairs unsorted (PAIRS): the
# sort and the slot sum are two launches of a few microseconds each, while pairs of one expert (rare among so few)
# are what the sort would have placed side by side for L2
PAIRS_MAX = 64


def _nibble_in_place(words, hi, j: tl.constexpr):
    """Nibble j of int32 words, left at bits 4e (hi = words >> 12 holds nibbles 5-7 at bits 8-16, so e <= 4) under
    the exponent of 2^(23-4e), whose ulp there is 1: (the float 2^(23-4e) + q, exact, and the offset 2^(23-4e))."""
    if j < 5:
        src = words
        e: tl.constexpr = j
    else:
        src = hi
        e: tl.constexpr = j - 3
    f = ((src & (0xF << (4 * e))) | ((150 - 4 * e) << 23)).to(tl.float32, bitcast=True)
    return f, 1 << (23 - 4 * e)


nibble_in_place = _jit(_nibble_in_place)


def _place_operand(words, hi, z, j: tl.constexpr, dtype: tl.constexpr):
    """q - z of nibble place j of the [BLOCK_N, GW] words (z [BLOCK_N] their rows' zero points) in dtype: exact."""
    f, off = nibble_in_place(words, hi, j)
    return (f - (z + off)[:, None]).to(dtype)


place_operand = _jit(_place_operand)


def _magic_places(words, j: tl.constexpr, MAGIC: tl.constexpr, UPCAST: tl.constexpr, dtype: tl.constexpr):
    """Nibble places j and j + 4 (j < 4) of the [BLOCK_N, GW] words as the 16-bit floats 2^m + q of dtype (MAGIC
    the pattern of 2^m): one shift and one LOP3 a word for both; UPCAST (interpreted): the same values in fp32."""
    v = ((words >> (4 * j)) & 0x000F000F) | (MAGIC * 65537)
    if UPCAST:
        return (v << 16).to(tl.float32, bitcast=True), (v & -65536).to(tl.float32, bitcast=True)
    return v.to(tl.int16).to(dtype, bitcast=True), (v >> 16).to(tl.int16).to(dtype, bitcast=True)


magic_places = _jit(_magic_places)


def _group_operand(p0, p1, p2, p3, p4, p5, p6, p7, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
    """The eight nibble places' [BLOCK_N, GW] operands as one [BLOCK_N, GROUP] in the group's K order (word c's place
    j at column j * GW + c): joined as [BLOCK_N, GW, 2, 2, 2] (place b2 + 2 b3 + 4 b4 on the last three axes), then
    laid out as [BLOCK_N, b4, b3, b2, GW]."""
    w = tl.join(tl.join(tl.join(p0, p1), tl.join(p2, p3)), tl.join(tl.join(p4, p5), tl.join(p6, p7)))
    return tl.reshape(tl.permute(w, (0, 4, 3, 2, 1)), (BLOCK_N, GROUP))


group_operand = _jit(_group_operand)


def _gemv_groups(acc, words_base, z_ptrs, s_ptrs, x_base, x_ok, row_mask, nibble_mask, KB_PER: tl.constexpr,
                 GW: tl.constexpr, GSTEP: tl.constexpr, STAGES: tl.constexpr):
    """The GEMV loop of one token over GSTEP groups a step: acc [ROWS] += sum over the program's KB_PER groups of
    (sum (q - z) x) s, each row's GSTEP * GW words (GSTEP * 64 contiguous bytes at G = 128) in one load, the
    nibbles moved to 128 + q as in the one-group loop (nibble_128). words_base [ROWS] pointers to the rows' first
    word of the program's share; z_ptrs, s_ptrs [ROWS] to their first group's zero and scale; x_base the token's
    first activation of the share (x_ok false: padding, read as zeros)."""
    offs_g = tl.arange(0, GSTEP)
    offs_c = tl.arange(0, GW)
    w_ptrs = words_base[:, None, None] + offs_g[None, :, None] * GW + offs_c[None, None, :]  # [ROWS, GSTEP, GW]
    x_ptrs = x_base + offs_g[:, None] * (8 * GW) + offs_c[None, :]  # [GSTEP, GW]: nibble place 0 of each group
    x_mask = (offs_g[:, None] * 0 + offs_c[None, :] * 0 + x_ok.to(tl.int32)) != 0  # [GSTEP, GW]
    for ks in tl.range(0, KB_PER // GSTEP, num_stages=STAGES):
        kb = ks * GSTEP
        words = tl.load(w_ptrs + kb * GW, mask=row_mask[:, None, None], other=0)  # [ROWS, GSTEP, GW]
        gmask = (row_mask[:, None].to(tl.int32) + offs_g[None, :] * 0) != 0  # [ROWS, GSTEP]
        z = tl.load(z_ptrs[:, None] + kb + offs_g[None, :], mask=gmask, other=0).to(tl.float32)  # [ROWS, GSTEP]
        s = tl.load(s_ptrs[:, None] + kb + offs_g[None, :], mask=gmask, other=0.0).to(tl.float32)
        acc += group_sums(words, z, s, x_ptrs + kb * 8 * GW, x_mask, nibble_mask, GW)
    return acc


def _group_sums(words, z, s, x_ptrs, x_mask, nibble_mask, GW: tl.constexpr):
    """[ROWS] sum over the groups of words [ROWS, GS, GW] (their zeros z and scales s [ROWS, GS], fp32) of
    (sum (q - z) x) s: x_ptrs [GS, GW] to nibble place 0 of each group's activations (x_mask false: zeros)."""
    part = tl.zeros(words.shape, dtype=tl.float32)
    xs = tl.zeros(x_ptrs.shape, dtype=tl.float32)
    for j in tl.static_range(8):
        xj = tl.load(x_ptrs + j * GW, mask=x_mask, other=0.0).to(tl.float32)  # [GS, GW]
        xs += xj
        part += nibble_128(words, j, nibble_mask) * xj[None, :, :]
    rs = (tl.sum(part, axis=2) - (z + 128.0) * tl.sum(xs, axis=1)[None, :]) * s  # [ROWS, GS]
    return tl.sum(rs, axis=1)


def _nibble_128(words, j: tl.constexpr, nibble_mask):
    """Nibble j of int32 words moved to bits 16-19 (the mantissa bits of 2^7 whose ulp is 1) under 2^7's exponent:
    the float 128 + q, exactly; nibble_mask = 0x000F0000 (a launch argument: see _moe_gemv_kernel)."""
    if j < 4:
        v = words << (16 - 4 * j)
    elif j == 4:
        v = words
    else:
        v = words >> (4 * j - 16)
    return ((v & nibble_mask) | 0x43000000).to(tl.float32, bitcast=True)


nibble_128 = _jit(_nibble_128)
group_sums = _jit(_group_sums)
gemv_groups = _jit(_gemv_groups)


def _moe_gemv_kernel(
    a_ptr,  # A [rows, K] activations, contiguous along K
    b_ptr, z_ptr, s_ptr,  # qweight int32 [E, Nb, K/8], zeros uint8 [E, Nb, K/G], scales [E, Nb, K/G]
    c_ptr,  # C [M*topk, N]
    topk_weights_ptr,  # fp32 [M*topk]
    sorted_token_ids_ptr, expert_ids_ptr,  # int32 [P_max], [P_max / BLOCK_M]
    num_tokens_post_padded_ptr,  # int32 [1]: P, the padded list's length
    part_ptr, count_ptr,  # SPLIT_K > 1: fp32 partial sums and int32 arrival counters (fp8_gemm.split_k_sum)
    N, num_valid_tokens, num_pid_m,
    nibble_mask,  # 0x000F0000, as a launch argument: a constant the compiler cannot rematerialize before each use
    stride_am, stride_be, stride_bn, stride_ze, stride_zn, stride_se, stride_sn, stride_cm,
    K: tl.constexpr,  # a loop bound: see kernels/fp8_gemm.py
    GROUP: tl.constexpr,  # quantization group along K: one loop iteration
    A_ROW_DIV: tl.constexpr,  # GEMM 1: topk (row of x = pair index // topk); GEMM 2: 1
    GATED: tl.constexpr,  # GEMM 1: gate rows [0, N) and up rows [N, 2N) of B, epilogue silu(gate) * up
    MUL_ROUTED_WEIGHT: tl.constexpr,  # GEMM 2: multiply each row by its router weight
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr, OUT_MANT: tl.constexpr,
    EXACT: tl.constexpr = False,  # fp32 activations: the nibbles in place, q exact before the product
    DENSE: tl.constexpr = False,  # a plain linear (w4a16_kmajor_linear): rows of A in order, expert 0
    SPLIT_K: tl.constexpr = 1,  # programs per output tile, each over K/G/SPLIT_K groups (fp8_moe.gemv_store)
    PAIRS: tl.constexpr = False,  # decode (BLOCK_M = 1): no sorted list, row p of C is pair p (GEMM 1) or token p
    # (GEMM 2, SLOT_SUM), its expert read from topk_ids (at expert_ids_ptr); experts outside [0, NUM_EXPERTS): zeros
    SLOT_SUM: tl.constexpr = 0,  # PAIRS GEMM 2: axis 1 is the slot (this many), rows of C are tokens, and the slots'
    # weighted outputs are added in fp32 in slot order by split_k_sum: the slot sum is this launch's epilogue
    NUM_EXPERTS: tl.constexpr = 0,
    PDL: tl.constexpr = False,  # programmatic dependent launch (fp8_gemm.pdl_enter); DENSE and the decode GEMM 2
    # (PAIRS, SLOT_SUM): the program's weight words toward L2 first
    STAGES: tl.constexpr = 1,  # > 1: the K loop software-pipelined by Triton, loads in flight through shared memory
    GSTEP: tl.constexpr = 1,  # > 1 (BLOCK_M 1, PREFETCH 0, not EXACT): groups a K step, GSTEP * 64 contiguous bytes
    # of each row in one load (gemv_groups)
):
    pid = tl.program_id(0)
    # row blocks fastest: the blocks of one expert (adjacent in the sorted list) read the same weight rows at about
    # the same time, so the second read hits L2
    pid_m = pid % num_pid_m
    pid_n = pid // num_pid_m
    if PDL and (PDL & 4) == 0 and (DENSE or (PAIRS and SLOT_SUM and not GATED)):
        # the rows of this program's column tile over its share of K, a line (32 words) at a time
        if DENSE:
            p_expert = (pid * 0).to(tl.int64)
        else:
            p_expert = expert_ahead(expert_ids_ptr, pid_m, tl.program_id(1), SLOT_SUM, SPLIT_K, NUM_EXPERTS)
        HROWS: tl.constexpr = (2 if GATED else 1) * BLOCK_N
        hr = tl.arange(0, HROWS)
        prow = tl.minimum(pid_n * BLOCK_N + hr % BLOCK_N, N - 1) + (hr // BLOCK_N) * N  # [HROWS]
        WORDS: tl.constexpr = K // 8 // SPLIT_K  # the program's share of a row
        prefetch_rows(b_ptr + p_expert * stride_be + prow.to(tl.int64) * stride_bn
                      + (tl.program_id(1) % SPLIT_K) * WORDS, 0, WORDS, 1, WORDS, 32)
    pdl_enter(PDL)  # the activations (and the routing) are the previous kernels' output
    # the grid covers the worst case; row blocks past the padded list's end have nothing to do
    if not (DENSE or PAIRS):
        if pid_m * BLOCK_M >= tl.load(num_tokens_post_padded_ptr):
            return
    pid_s = tl.program_id(1)  # this program's share of K (SLOT_SUM: slot * SPLIT_K + share)
    KB_PER: tl.constexpr = K // GROUP // SPLIT_K  # groups per program (the launcher makes SPLIT_K divide them)
    k0 = (pid_s % SPLIT_K) * KB_PER  # its first group

    HALVES: tl.constexpr = 2 if GATED else 1
    ROWS: tl.constexpr = HALVES * BLOCK_N
    GW: tl.constexpr = GROUP // 8  # words per row and group
    r = tl.arange(0, ROWS)
    offs_n = pid_n * BLOCK_N + r % BLOCK_N  # [ROWS] output column of each weight row
    row_mask = offs_n < N
    pair = pid_m
    if PAIRS:  # the row of A is pair // A_ROW_DIV (GEMM 1: the token; GEMM 2: the pair's intermediate row)
        tl.static_assert(BLOCK_M == 1, "PAIRS: one pair per program")
        pair, offs_tok64, tok_mask, _, expert, routed = pair_rows(expert_ids_ptr, pid_m, pid_s, num_valid_tokens, r,
                                                                  A_ROW_DIV, SLOT_SUM, NUM_EXPERTS, 1, SPLIT_K)
        row_mask = row_mask & routed
    else:
        _, tok_mask, offs_tok64, expert = block_rows(sorted_token_ids_ptr, expert_ids_ptr, pid_m,
                                                            num_valid_tokens, BLOCK_M, DENSE)
    rows = ((r // BLOCK_N) * N + offs_n).to(tl.int64)  # [ROWS] gate rows, then (GATED) the up rows N further
    offs_c = tl.arange(0, GW)  # [GW]
    w_ptrs = b_ptr + expert * stride_be + rows[:, None] * stride_bn + offs_c[None, :]  # [ROWS, GW]
    z_ptrs = z_ptr + expert * stride_ze + rows * stride_zn + k0  # [ROWS]
    s_ptrs = s_ptr + expert * stride_se + rows * stride_sn + k0  # [ROWS]
    w_ptrs += k0 * GW
    tcol = tl.arange(0, BLOCK_M)  # [BLOCK_M]

    # BLOCK_M == 1 accumulates [ROWS] in the layout the row sums come out in (no layout change in the loop); more
    # tokens go into the columns of a [ROWS, BLOCK_M] tile of that same layout
    acc = tl.zeros((ROWS,) if BLOCK_M == 1 else (ROWS, BLOCK_M), dtype=tl.float32)
    if GSTEP > 1:
        tl.static_assert((BLOCK_M == 1) & (PREFETCH == 0) & (not EXACT), "GSTEP > 1: one token, PREFETCH 0")
        if PAIRS:
            tok = pair
            x_ok = tok >= 0
        elif DENSE:
            tok = pid_m
            x_ok = tok >= 0
        else:
            tok = tl.load(sorted_token_ids_ptr + pid_m)  # the padding's sentinel reads zeros
            x_ok = tok < num_valid_tokens
        acc = gemv_groups(acc, b_ptr + expert * stride_be + rows * stride_bn + k0 * GW, z_ptrs, s_ptrs,
                          a_ptr + (tok // A_ROW_DIV).to(tl.int64) * stride_am + k0 * GROUP, x_ok, row_mask,
                          nibble_mask, KB_PER, GW, GSTEP, STAGES)
    else:
        if PREFETCH > 0:
            words = tl.load(w_ptrs, mask=row_mask[:, None], other=0)  # [ROWS, GW] group 0
        if PREFETCH == 2:  # group 1
            nxt = tl.load(w_ptrs + GW, mask=row_mask[:, None] & (GW + offs_c < KB_PER * GW)[None, :], other=0)
        for kb in tl.range(0, KB_PER, num_stages=STAGES):
            if PREFETCH == 0:  # this group's words, loaded here: STAGES > 1 lets Triton's pipeliner issue them early
                words = tl.load(w_ptrs + kb * GW, mask=row_mask[:, None], other=0)
            else:
                # the next PREFETCH groups' words in flight while this one is computed (loads past the program's share
                # of K are masked off): registers, not shared memory
                ahead_mask = row_mask[:, None] & ((kb + PREFETCH) * GW + offs_c < KB_PER * GW)[None, :]
                ahead = tl.load(w_ptrs + (kb + PREFETCH) * GW, mask=ahead_mask, other=0)
            z = tl.load(z_ptrs + kb, mask=row_mask, other=0).to(tl.float32)  # [ROWS]
            s = tl.load(s_ptrs + kb, mask=row_mask, other=0.0).to(tl.float32)  # [ROWS]
            if EXACT:
                hi = words >> 12  # nibbles 5, 6, 7 at bits 8, 12, 16
            for t in tl.static_range(BLOCK_M):
                # token t of the block: the dequantized words are the same expressions for every t (computed once)
                if PAIRS:
                    tok = pair
                elif DENSE:
                    tok = pid_m * BLOCK_M + t  # scalar row of A
                else:
                    tok = tl.load(sorted_token_ids_ptr + pid_m * BLOCK_M + t)  # scalar pair index
                x_ptrs = a_ptr + (tok // A_ROW_DIV).to(tl.int64) * stride_am + (k0 + kb) * GROUP + offs_c[None, :]
                if PAIRS:
                    x_mask = offs_c[None, :] >= 0  # [1, GW] (the grid holds real pairs only)
                else:
                    x_mask = offs_c[None, :] * 0 + tok < num_valid_tokens  # [1, GW] (padding: the sentinel)
                part = tl.zeros((ROWS, GW), dtype=tl.float32)
                xs = tl.zeros((1, GW), dtype=tl.float32)
                for j in tl.static_range(8):
                    if EXACT:  # nibble j in place: 2^(23-4e) + q, the offset subtracted per weight
                        f, off = nibble_in_place(words, hi, j)
                        f = f - off  # [ROWS, GW] q
                    else:  # nibble j moved to bits 16-19 (the mantissa bits of 2^7 whose ulp is 1): 128 + q
                        f = nibble_128(words, j, nibble_mask)  # [ROWS, GW]
                    # nibble j of the group's words: codes j * GW .. j * GW + GW - 1, one contiguous vector load
                    xj = tl.load(x_ptrs + j * GW, mask=x_mask, other=0.0).to(tl.float32)  # [1, GW]
                    xs += xj
                    part += f * xj  # [ROWS, GW]
                # the zero point (and 128 + z's 128) once per row and group: sum (q - z) x = sum f x - (off + z) sum x
                off = 0.0 if EXACT else 128.0
                rs = (tl.sum(part, axis=1) - (z + off) * tl.sum(tl.sum(xs, axis=1), axis=0)) * s  # [ROWS]
                if BLOCK_M == 1:
                    acc += rs
                else:
                    acc += tl.where(tcol[None, :] == t, rs[:, None], 0.0)  # [ROWS, BLOCK_M]
            if PREFETCH == 2:
                words = nxt
                nxt = ahead
            elif PREFETCH == 1:
                words = ahead

    if BLOCK_M == 1:
        acc = tl.reshape(acc, (1, ROWS))
    else:
        acc = tl.trans(acc)  # [BLOCK_M, ROWS]
    gemv_store(acc, c_ptr, part_ptr, topk_weights_ptr, part_ptr, count_ptr, pid, pid_s, pid_n,
               pair, offs_tok64, tok_mask, N, num_valid_tokens, stride_cm, GATED, BLOCK_M, BLOCK_N,
               MUL_ROUTED_WEIGHT, SLOT_SUM, SPLIT_K, OUT_MANT, 0)


def _pair_gemv(a_ptr, b_ptr, z_ptr, s_ptr, c_ptr, topk_weights_ptr, ids_ptr, part_ptr, count_ptr, tile, pid_m,
               pid_n, pid_s, N, num_valid_tokens, nibble_mask, stride_am, stride_be, stride_bn, stride_ze, stride_zn,
               stride_se, stride_sn, stride_cm, flag, need, K: tl.constexpr, GROUP: tl.constexpr,
               A_ROW_DIV: tl.constexpr, GATED: tl.constexpr, BLOCK_N: tl.constexpr, OUT_MANT: tl.constexpr,
               SPLIT_K: tl.constexpr, SLOT_SUM: tl.constexpr, NUM_EXPERTS: tl.constexpr, GSTEP: tl.constexpr,
               STAGES: tl.constexpr, WAIT: tl.constexpr, PRELOAD: tl.constexpr, SLEEP: tl.constexpr,
               ASM: tl.constexpr):
    """One program of a decode GEMM on unsorted pairs, as _moe_gemv_kernel runs it at BLOCK_M 1 and PREFETCH 0
    (gemv_groups' loop, then gemv_store): row block pid_m (GEMM 1: pair pid_m; GEMM 2: token pid_m, its slot
    pid_s // SPLIT_K), column tile pid_n, share pid_s % SPLIT_K of K; `tile` indexes the arrival counters. WAIT:
    first wait for the counter at flag to reach need (wait_count). PRELOAD (with WAIT): the program's whole share
    of the weight (words, zeros, scales: KB_PER groups, the load widened to a power of two and masked) is loaded
    before the wait and the activations after, so the weight's read overlaps what the program waits for; the same
    products, the groups summed in one reduction rather than GSTEP at a time (another fp32 order)."""
    KB_PER: tl.constexpr = K // GROUP // SPLIT_K
    k0 = (pid_s % SPLIT_K) * KB_PER
    ROWS: tl.constexpr = (2 if GATED else 1) * BLOCK_N
    GW: tl.constexpr = GROUP // 8
    r = tl.arange(0, ROWS)
    offs_n = pid_n * BLOCK_N + r % BLOCK_N
    pair, offs_tok64, tok_mask, _, expert, routed = pair_rows(ids_ptr, pid_m, pid_s, num_valid_tokens, r,
                                                              A_ROW_DIV, SLOT_SUM, NUM_EXPERTS, 1, SPLIT_K)
    row_mask = (offs_n < N) & routed
    rows = ((r // BLOCK_N) * N + offs_n).to(tl.int64)
    if PRELOAD:
        KBP: tl.constexpr = triton.next_power_of_2(KB_PER)
        offs_g = tl.arange(0, KBP)
        offs_c = tl.arange(0, GW)
        gmask = (row_mask[:, None].to(tl.int32) * (offs_g < KB_PER)[None, :].to(tl.int32)) != 0  # [ROWS, KBP]
        w_ptrs = (b_ptr + expert * stride_be + rows[:, None, None] * stride_bn + k0 * GW
                  + offs_g[None, :, None] * GW + offs_c[None, None, :])  # [ROWS, KBP, GW]
        words = tl.load(w_ptrs, mask=gmask[:, :, None], other=0)
        z = tl.load(z_ptr + expert * stride_ze + rows[:, None] * stride_zn + k0 + offs_g[None, :], mask=gmask,
                    other=0).to(tl.float32)
        s = tl.load(s_ptr + expert * stride_se + rows[:, None] * stride_sn + k0 + offs_g[None, :], mask=gmask,
                    other=0.0).to(tl.float32)
        wait_count(flag, need, SLEEP, ASM)
        x_ptrs = a_ptr + (pair // A_ROW_DIV).to(tl.int64) * stride_am + k0 * GROUP + offs_g[:, None] * (8 * GW) \
            + offs_c[None, :]  # [KBP, GW]
        x_mask = ((offs_g[:, None] < KB_PER).to(tl.int32) * (pair >= 0).to(tl.int32) + offs_c[None, :] * 0) != 0
        acc = group_sums(words, z, s, x_ptrs, x_mask, nibble_mask, GW)
    else:
        if WAIT:
            wait_count(flag, need, SLEEP, ASM)
        acc = tl.zeros((ROWS,), dtype=tl.float32)
        acc = gemv_groups(acc, b_ptr + expert * stride_be + rows * stride_bn + k0 * GW,
                          z_ptr + expert * stride_ze + rows * stride_zn + k0,
                          s_ptr + expert * stride_se + rows * stride_sn + k0,
                          a_ptr + (pair // A_ROW_DIV).to(tl.int64) * stride_am + k0 * GROUP, pair >= 0, row_mask,
                          nibble_mask, KB_PER, GW, GSTEP, STAGES)
    gemv_store(tl.reshape(acc, (1, ROWS)), c_ptr, part_ptr, topk_weights_ptr, part_ptr, count_ptr, tile, pid_s,
               pid_n, pair, offs_tok64, tok_mask, N, num_valid_tokens, stride_cm, GATED, 1, BLOCK_N, False, SLOT_SUM,
               SPLIT_K, OUT_MANT, 0)


pair_gemv = _jit(_pair_gemv)


def _moe_gemv_one_launch_kernel(
    x_ptr, b1_ptr, z1_ptr, s1_ptr, b2_ptr, z2_ptr, s2_ptr,  # x [M, H]; w13 and w2 K-major (_moe_gemv_kernel)
    inter_ptr, out_ptr,  # [M*topk, I] silu(gate) * up; [M, H] the layer's output
    topk_weights_ptr, ids_ptr,  # fp32 [M*topk]; topk_ids [M*topk]
    part1_ptr, count1_ptr, part2_ptr, count2_ptr,  # each GEMM's split-K partials and arrival counters
    ready_ptr,  # int32, a counter a pair READY_STRIDE apart: GEMM 1's programs of the pair that have stored
    M, nibble_mask,
    stride_xm, stride_b1e, stride_b1n, stride_z1e, stride_z1n, stride_s1e, stride_s1n,
    stride_im, stride_b2e, stride_b2n, stride_z2e, stride_z2n, stride_s2e, stride_s2n, stride_om,
    H: tl.constexpr, I: tl.constexpr, GROUP: tl.constexpr, TOPK: tl.constexpr, NUM_EXPERTS: tl.constexpr,
    BLOCK_N1: tl.constexpr, BLOCK_N2: tl.constexpr, SPLIT1: tl.constexpr, SPLIT2: tl.constexpr,
    GSTEP1: tl.constexpr, GSTEP2: tl.constexpr, STAGES: tl.constexpr, OUT_MANT: tl.constexpr,
    READY_STRIDE: tl.constexpr, SLEEP: tl.constexpr, ASM: tl.constexpr,  # inline PTX (compiled only)
    PRELOAD: tl.constexpr = False,  # GEMM 2's programs load their weight share before they wait (pair_gemv)
):
    """The decode MoE's two GEMMs in one launch (ONE_LAUNCH): programs [0, P1) are GEMM 1's, pair by pair (all of
    a pair's column tiles and K shares, then the next pair's), the rest GEMM 2's in the same pair order. A GEMM 2
    program waits until every GEMM 1 program of its pair has stored and counted itself in ready[pair], then reads
    the pair's intermediate row; so no program waits on one dispatched after it. The GPU starts a launch's programs
    in index order (the forward progress that split-K fix-ups and decoupled look-back scans also assume), so GEMM 2
    programs only take slots once every GEMM 1 program has one, while GEMM 1's last wave drains: the second GEMM's
    ramp overlaps the first one's tail, and no launch boundary separates them. The pair's last GEMM 2 program resets
    its counter for the next launch."""
    pid = tl.program_id(0)
    pairs = M * TOPK
    N1T: tl.constexpr = (I + BLOCK_N1 - 1) // BLOCK_N1  # GEMM 1's column tiles
    N2T: tl.constexpr = (H + BLOCK_N2 - 1) // BLOCK_N2
    PER1: tl.constexpr = N1T * SPLIT1  # GEMM 1's programs a pair
    PER2: tl.constexpr = N2T * SPLIT2  # GEMM 2's programs a pair
    if pid < pairs * PER1:
        pair = pid // PER1
        share = (pid % PER1) // N1T
        pid_n = pid % N1T
        pair_gemv(x_ptr, b1_ptr, z1_ptr, s1_ptr, inter_ptr, topk_weights_ptr, ids_ptr, part1_ptr, count1_ptr,
                  pid_n * pairs + pair, pair, pid_n, share, I, pairs, nibble_mask, stride_xm, stride_b1e, stride_b1n,
                  stride_z1e, stride_z1n, stride_s1e, stride_s1n, stride_im, ready_ptr, 0, H, GROUP, TOPK, True,
                  BLOCK_N1, OUT_MANT, SPLIT1, 0, NUM_EXPERTS, GSTEP1, STAGES, False, False, False, False)
        tl.debug_barrier()  # every thread's stores are made before the arrival is counted (release, gpu scope)
        tl.atomic_add(ready_ptr + pair * READY_STRIDE, 1, sem="release")
    else:
        q = pid - pairs * PER1
        pair = q // PER2
        share = (q % PER2) // N2T
        pid_n = q % N2T
        tok = pair // TOPK
        flag = ready_ptr + pair * READY_STRIDE
        # waits for GEMM 1's programs of the pair (PRELOAD: once its weight share is loaded)
        pair_gemv(inter_ptr, b2_ptr, z2_ptr, s2_ptr, out_ptr, topk_weights_ptr, ids_ptr, part2_ptr, count2_ptr,
                  pid_n * M + tok, tok, pid_n, (pair % TOPK) * SPLIT2 + share, H, M, nibble_mask, stride_im,
                  stride_b2e, stride_b2n, stride_z2e, stride_z2n, stride_s2e, stride_s2n, stride_om, flag, PER1, I,
                  GROUP, 1, False, BLOCK_N2, OUT_MANT, SPLIT2, TOPK, NUM_EXPERTS, GSTEP2, STAGES, True, PRELOAD, SLEEP,
                  ASM)
        # the pair's last reader leaves its counter at zero
        if tl.atomic_add(flag, 1, sem="relaxed") == PER1 + PER2 - 1:
            tl.atomic_xchg(flag, 0)


def _moe_dot_kernel(
    a_ptr,  # A [rows, K] activations, contiguous along K
    b_ptr, z_ptr, s_ptr,  # qweight int32 [E, Nb, K/8], zeros uint8 [E, Nb, K/G], scales [E, Nb, K/G]
    c_ptr,  # C [M*topk, N]
    topk_weights_ptr,  # fp32 [M*topk]
    sorted_token_ids_ptr, expert_ids_ptr,  # int32 [P_max], [P_max / BLOCK_M]
    num_tokens_post_padded_ptr,  # int32 [1]: P, the padded list's length
    part_ptr, count_ptr,  # SPLIT_K > 1: fp32 partial sums and int32 arrival counters (fp8_gemm.split_k_sum)
    N, num_valid_tokens, num_pid_m,
    stride_am, stride_be, stride_bn, stride_ze, stride_zn, stride_se, stride_sn, stride_cm,
    K: tl.constexpr,  # a loop bound: see kernels/fp8_gemm.py
    GROUP: tl.constexpr,  # quantization group along K: one loop iteration, eight tl.dot of GROUP/8 along K
    A_ROW_DIV: tl.constexpr,  # GEMM 1: topk (row of x = pair index // topk); GEMM 2: 1
    GATED: tl.constexpr,  # GEMM 1: gate rows [0, N) and up rows [N, 2N) of B, epilogue silu(gate) * up
    MUL_ROUTED_WEIGHT: tl.constexpr,  # GEMM 2: multiply each row by its router weight
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, OUT_MANT: tl.constexpr, F32_DOT: tl.constexpr,
    DENSE: tl.constexpr = False,  # a plain linear (w4a16_kmajor_linear): rows of A in order, expert 0
    SPLIT_K: tl.constexpr = 1,  # programs per output tile, each over K/G/SPLIT_K groups (not GATED)
    WIDE: tl.constexpr = 0,  # 1: one tl.dot of K = GROUP a group: the eight nibble places of the group's words
    # unpacked side by side ([BLOCK_N, 8, G/8], place j holding codes j * G/8 ...), which is the group's K order;
    # 2: the same with places j and j + 4 made by one LOP3 as the 16-bit floats 2^m + q (the mma path's MAGIC), the
    # 2^m + z offset taken off the group's product as (2^m + z) * sum(x) (16-bit activations; fp32 ones as 1)
    MAGIC: tl.constexpr = 0x4300,
):
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M)
    if not DENSE:
        if pid_m * BLOCK_M >= tl.load(num_tokens_post_padded_ptr):
            return
    pid_s = tl.program_id(1)  # this program's share of K
    KB_PER: tl.constexpr = K // GROUP // SPLIT_K  # groups per program (the launcher makes SPLIT_K divide them)
    k0 = pid_s * KB_PER  # its first group

    offs_tok, tok_mask, offs_tok64, expert = block_rows(sorted_token_ids_ptr, expert_ids_ptr, pid_m, num_valid_tokens,
                                                        BLOCK_M, DENSE)
    a_rows = offs_tok64 // A_ROW_DIV  # [BLOCK_M]

    GW: tl.constexpr = GROUP // 8  # words per row and group
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    n_mask = offs_n < N
    offs_n64 = offs_n.to(tl.int64)
    offs_c = tl.arange(0, GW)  # [GW]
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + k0 * GROUP + offs_c[None, :]  # [BLOCK_M, GW] nibble 0, group k0
    b_ptrs = b_ptr + expert * stride_be + offs_n64[:, None] * stride_bn + k0 * GW + offs_c[None, :]  # [BLOCK_N, GW]
    z_ptrs = z_ptr + expert * stride_ze + offs_n64 * stride_zn + k0  # [BLOCK_N]
    s_ptrs = s_ptr + expert * stride_se + offs_n64 * stride_sn + k0  # [BLOCK_N]
    HALVES: tl.constexpr = 2 if GATED else 1  # GATED: the up projection's rows, N further along

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if WIDE:
        a_group = a_ptr + a_rows[:, None] * stride_am + k0 * GROUP + tl.arange(0, GROUP)[None, :]  # [BLOCK_M, G]
    PAIRED: tl.constexpr = (WIDE == 2) and (not F32_DOT) and (a_ptr.dtype.element_ty != tl.float32)
    BIAS: tl.constexpr = 128.0 if MAGIC == 0x4300 else 1024.0  # 2^m
    for kb in range(0, KB_PER):
        if WIDE:  # the group's activations once, for both halves
            a_all = tl.load(a_group + kb * GROUP, mask=tok_mask[:, None], other=0.0)  # [BLOCK_M, G]
            if UPCAST:
                a_all = a_all.to(tl.float32)
            if PAIRED:
                xsum = tl.sum(a_all.to(tl.float32), axis=1)  # [BLOCK_M]
        for hf in tl.static_range(HALVES):
            words = tl.load(b_ptrs + hf * N * stride_bn, mask=n_mask[:, None], other=0)  # [BLOCK_N, GW]
            z = tl.load(z_ptrs + hf * N * stride_zn + kb, mask=n_mask, other=0).to(tl.float32)  # [BLOCK_N]
            hi = words >> 12  # nibbles 5, 6, 7 at bits 8, 12, 16
            if PAIRED:  # places j and j + 4 as 2^m + q from one LOP3 a word (2^m + z comes off after the dot)
                dt = a_all.dtype
                p0, p4 = magic_places(words, 0, MAGIC, UPCAST, dt)
                p1, p5 = magic_places(words, 1, MAGIC, UPCAST, dt)
                p2, p6 = magic_places(words, 2, MAGIC, UPCAST, dt)
                p3, p7 = magic_places(words, 3, MAGIC, UPCAST, dt)
                w = group_operand(p0, p1, p2, p3, p4, p5, p6, p7, BLOCK_N, GROUP)
                part = tl.dot(a_all, tl.trans(w)) - xsum[:, None] * (z + BIAS)[None, :]
            elif WIDE:  # each place's [BLOCK_N, GW] operand as below, the eight in the group's K order
                dt = a_all.dtype
                w = group_operand(place_operand(words, hi, z, 0, dt), place_operand(words, hi, z, 1, dt),
                                  place_operand(words, hi, z, 2, dt), place_operand(words, hi, z, 3, dt),
                                  place_operand(words, hi, z, 4, dt), place_operand(words, hi, z, 5, dt),
                                  place_operand(words, hi, z, 6, dt), place_operand(words, hi, z, 7, dt),
                                  BLOCK_N, GROUP)
                if F32_DOT:
                    part = tl.dot(a_all, tl.trans(w), input_precision="ieee")
                else:
                    part = tl.dot(a_all, tl.trans(w))
            else:
                part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for j in tl.static_range(8):
                    # nibble j of the group's words holds codes j * GW .. j * GW + GW - 1: one [BLOCK_M, GW] x
                    # [GW, BLOCK_N] product; q - z exactly as in the GEMV kernel, in [-15, 15]: exact in bf16/fp16
                    a = tl.load(a_ptrs + j * GW, mask=tok_mask[:, None], other=0.0)
                    if UPCAST:
                        a = a.to(tl.float32)
                    f, off = nibble_in_place(words, hi, j)
                    w = (f - (z + off)[:, None]).to(a.dtype)  # [BLOCK_N, GW]
                    if F32_DOT:
                        part = tl.dot(a, tl.trans(w), part, input_precision="ieee")
                    else:
                        part = tl.dot(a, tl.trans(w), part)
            s = tl.load(s_ptrs + hf * N * stride_sn + kb, mask=n_mask, other=0.0).to(tl.float32)  # [BLOCK_N]
            if hf == 0:
                acc += part * s[None, :]
            else:
                acc_up += part * s[None, :]
        a_ptrs += GROUP
        b_ptrs += GW

    if GATED:
        acc = acc * tl.sigmoid(acc) * acc_up  # silu(gate) * up, in fp32
    c_mask = tok_mask[:, None] & n_mask[None, :]
    last = True
    if SPLIT_K > 1:  # partials [SPLIT_K, rows, N]
        acc, last = split_k_sum(acc, part_ptr, count_ptr + pid, pid_s, offs_tok64, offs_n64, c_mask, num_valid_tokens,
                                N, SPLIT_K)
    if last:
        if MUL_ROUTED_WEIGHT:
            rw = tl.load(topk_weights_ptr + offs_tok64, mask=tok_mask, other=0.0)  # [BLOCK_M]
            acc = acc * rw[:, None]
        if OUT_MANT:  # the interpreter's fp32 -> bf16 cast truncates: round to nearest even first
            acc = round_to_out_grid(acc, OUT_MANT)
        c_ptrs = c_ptr + offs_tok64[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def _moe_mma_kernel(
    a_ptr,  # A [rows, K] activations, contiguous along K
    b_ptr, z_ptr, s_ptr,  # qweight int32 [E, Nb, K/8], zeros uint8 [E, Nb, K/G], scales [E, Nb, K/G]
    c_ptr,  # C [M*topk, N]
    topk_weights_ptr,  # fp32 [M*topk]
    sorted_token_ids_ptr, expert_ids_ptr,  # int32 [P_max], [P_max / BLOCK_M]
    num_tokens_post_padded_ptr,  # int32 [1]: P, the padded list's length
    part_ptr, count_ptr,  # SPLIT_K > 1: fp32 partial sums and int32 arrival counters (fp8_gemm.split_k_sum)
    N, num_valid_tokens, num_pid_m,
    stride_am, stride_be, stride_bn, stride_ze, stride_zn, stride_se, stride_sn, stride_cm,
    K: tl.constexpr,  # a loop bound: see kernels/fp8_gemm.py
    GROUP: tl.constexpr,  # quantization group along K: one loop iteration, four tl.dot of GROUP/4 along K
    A_ROW_DIV: tl.constexpr,  # GEMM 1: topk (row of x = pair index // topk); GEMM 2: 1
    GATED: tl.constexpr,  # GEMM 1: gate rows [0, N) and up rows [N, 2N) of B, epilogue silu(gate) * up
    MUL_ROUTED_WEIGHT: tl.constexpr,  # GEMM 2: multiply each row by its router weight
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MAGIC: tl.constexpr,  # 16-bit pattern of the operand type's 2^m (m its mantissa bits): 0x4300 bf16 (also
    # the interpreter's, widened to fp32), 0x6400 fp16
    UPCAST: tl.constexpr, OUT_MANT: tl.constexpr,
    PREFETCH: tl.constexpr = 1,  # 2 (not GATED): the next group's words loaded while this one is computed
    DENSE: tl.constexpr = False,  # a plain linear (w4a16_kmajor_linear): rows of A in order, expert 0
    SPLIT_K: tl.constexpr = 1,  # programs per output tile, each over K/G/SPLIT_K groups (not GATED, unless PAIRS)
    PAIRS: tl.constexpr = False,  # decode: no sorted list, one pair a program in column 0 of the B operand, its
    # expert from topk_ids; the epilogue is the GEMV path's (fp8_moe.gemv_store: SLOT_SUM, SPLIT_K gated or not)
    SLOT_SUM: tl.constexpr = 0,  # PAIRS GEMM 2: axis 1 is the slot (times SPLIT_K), rows of C are tokens
    NUM_EXPERTS: tl.constexpr = 0,
    GSTEP: tl.constexpr = 1,  # groups an iteration (the register prefetch, PREFETCH 2, only at 1)
):
    """Weights as the tensor cores' A operand (out^T [BLOCK_N, BLOCK_M] = W x^T), dequantized in the registers that
    operand lives in. The word's halves (nibble places j and j + 4) masked and OR-ed with MAGIC twice over are two
    16-bit floats 2^m + q in one instruction, already packed as the operand's pairs; the 2^m + z the group's codes
    are offset by comes off once per row and group as (2^m + z) * sum(x). Interpreted (UPCAST), the same bits are
    widened to fp32 (a bf16 bit pattern shifted up 16 places is the same number in fp32)."""
    pid = tl.program_id(0)
    pid_m = pid % num_pid_m
    pid_n = pid // num_pid_m
    if not (DENSE or PAIRS):
        if pid_m * BLOCK_M >= tl.load(num_tokens_post_padded_ptr):
            return
    pid_s = tl.program_id(1)  # this program's share of K (PAIRS with SLOT_SUM: slot * SPLIT_K + share)
    KB_PER: tl.constexpr = K // GROUP // SPLIT_K  # groups per program (the launcher makes SPLIT_K divide them)
    k0 = (pid_s % SPLIT_K) * KB_PER  # its first group

    GW: tl.constexpr = GROUP // 8  # words per row and group
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    n_mask = offs_n < N
    if PAIRS:  # column 0 holds the pair (GEMM 1) or the slot's pair of token pid_m (GEMM 2), the others nothing
        pair, offs_tok64, tok_mask, a_rows, expert, routed = pair_rows(
            expert_ids_ptr, pid_m, pid_s, num_valid_tokens, offs_n, A_ROW_DIV, SLOT_SUM, NUM_EXPERTS, BLOCK_M,
            SPLIT_K)
        n_mask = n_mask & routed
    else:
        offs_tok, tok_mask, offs_tok64, expert = block_rows(sorted_token_ids_ptr, expert_ids_ptr, pid_m,
                                                            num_valid_tokens, BLOCK_M, DENSE)
        a_rows = offs_tok64 // A_ROW_DIV  # [BLOCK_M]
    offs_n64 = offs_n.to(tl.int64)
    offs_c = tl.arange(0, GW)
    b_ptrs = b_ptr + expert * stride_be + offs_n64[:, None] * stride_bn + k0 * GW + offs_c[None, :]  # [BLOCK_N, GW]
    z_ptrs = z_ptr + expert * stride_ze + offs_n64 * stride_zn + k0  # [BLOCK_N]
    s_ptrs = s_ptr + expert * stride_se + offs_n64 * stride_sn + k0  # [BLOCK_N]
    # operand position p of nibble pair (j, j + 4): word p // 2, nibble j + 4 (p % 2), code (j + 4 (p % 2)) GW + p // 2
    offs_p = tl.arange(0, 2 * GW)
    x_off = (offs_p % 2) * (4 * GW) + offs_p // 2  # [2GW] (plus j GW for pair j)
    a_ptrs = a_ptr + a_rows[None, :] * stride_am + k0 * GROUP + x_off[:, None]  # [2GW, BLOCK_M]: x^T
    HALVES: tl.constexpr = 2 if GATED else 1
    PAIR_MASK: tl.constexpr = 0x000F000F
    PAIR_MAGIC: tl.constexpr = MAGIC * 65537
    BIAS: tl.constexpr = 128.0 if MAGIC == 0x4300 else 1024.0  # 2^m

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    xm = tok_mask[None, :]
    # words loaded a group ahead: ungated only (the launcher passes PREFETCH = 1 with GATED)
    AHEAD: tl.constexpr = (PREFETCH == 2) & (HALVES == 1) & (GSTEP == 1)
    if AHEAD:
        nxt = tl.load(b_ptrs, mask=n_mask[:, None], other=0)  # [BLOCK_N, GW] group 0
    # GSTEP groups an iteration, each a body of its own: a pipeline stage then holds GSTEP * 64 contiguous bytes of
    # each row, loaded together
    for ks in range(0, KB_PER // GSTEP):
        for gi in tl.static_range(GSTEP):
            kb = ks * GSTEP + gi
            x0 = tl.load(a_ptrs + gi * GROUP, mask=xm, other=0.0)  # [2GW, BLOCK_M] nibble places 0 and 4
            x1 = tl.load(a_ptrs + gi * GROUP + GW, mask=xm, other=0.0)  # places 1 and 5
            x2 = tl.load(a_ptrs + gi * GROUP + 2 * GW, mask=xm, other=0.0)
            x3 = tl.load(a_ptrs + gi * GROUP + 3 * GW, mask=xm, other=0.0)
            if UPCAST:
                x0, x1, x2, x3 = x0.to(tl.float32), x1.to(tl.float32), x2.to(tl.float32), x3.to(tl.float32)
            xsum = tl.sum(x0.to(tl.float32) + x1.to(tl.float32) + x2.to(tl.float32) + x3.to(tl.float32), axis=0)
            for hf in tl.static_range(HALVES):
                if AHEAD:  # registers: in flight during this group's dots, whatever the pipeliner does
                    words = nxt
                    nxt = tl.load(b_ptrs + GW, mask=n_mask[:, None] & (offs_c * 0 + kb + 1 < KB_PER)[None, :], other=0)
                else:
                    # [BLOCK_N, GW]
                    words = tl.load(b_ptrs + gi * GW + hf * N * stride_bn, mask=n_mask[:, None], other=0)
                z = tl.load(z_ptrs + hf * N * stride_zn + kb, mask=n_mask, other=0).to(tl.float32)  # [BLOCK_N]
                s = tl.load(s_ptrs + hf * N * stride_sn + kb, mask=n_mask, other=0.0).to(tl.float32)  # [BLOCK_N]
                part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                for j in tl.static_range(4):
                    xj = pick4(j, x0, x1, x2, x3)
                    v = ((words >> (4 * j)) & PAIR_MASK) | PAIR_MAGIC  # [BLOCK_N, GW] two floats 2^m + q a word
                    if UPCAST:
                        w = tl.reshape(tl.join((v << 16).to(tl.float32, bitcast=True),
                                               (v & -65536).to(tl.float32, bitcast=True)), (BLOCK_N, 2 * GW))
                        part = tl.dot(w, xj, part)
                    else:
                        w = tl.reshape(tl.join(v.to(tl.int16), (v >> 16).to(tl.int16)), (BLOCK_N, 2 * GW))
                        part = tl.dot(w.to(xj.dtype, bitcast=True), xj, part)
                corr = (part - (z + BIAS)[:, None] * xsum[None, :]) * s[:, None]  # [BLOCK_N, BLOCK_M]
                if hf == 0:
                    acc += corr
                else:
                    acc_up += corr
        a_ptrs += GSTEP * GROUP
        b_ptrs += GSTEP * GW

    if PAIRS:  # column 0 as the GEMV path's [1, ROWS] sums (gate rows, then up rows) through its epilogue
        col0 = (tl.arange(0, BLOCK_M) == 0)[None, :]
        sums = tl.sum(tl.where(col0, acc, 0.0), axis=1)  # [BLOCK_N]
        if GATED:
            sums_up = tl.sum(tl.where(col0, acc_up, 0.0), axis=1)
            row = tl.reshape(tl.trans(tl.join(sums, sums_up)), (1, 2 * BLOCK_N))
        else:
            row = tl.reshape(sums, (1, BLOCK_N))
        one = tl.arange(0, 1)
        gemv_store(row, c_ptr, part_ptr, topk_weights_ptr, part_ptr, count_ptr, pid, pid_s, pid_n, pair,
                   (pid_m + one).to(tl.int64), pid_m + one < num_valid_tokens, N, num_valid_tokens, stride_cm, GATED,
                   1, BLOCK_N, MUL_ROUTED_WEIGHT, SLOT_SUM, SPLIT_K, OUT_MANT, 0)
    else:
        if GATED:
            acc = acc * tl.sigmoid(acc) * acc_up  # silu(gate) * up, in fp32
        c_mask = tok_mask[None, :] & n_mask[:, None]
        last = True
        if SPLIT_K > 1:  # partials [SPLIT_K, N, rows]: the tile as it is held
            acc, last = split_k_sum(acc, part_ptr, count_ptr + pid, pid_s, offs_n64, offs_tok64, c_mask, N,
                                    num_valid_tokens, SPLIT_K)
        if last:
            if MUL_ROUTED_WEIGHT:
                rw = tl.load(topk_weights_ptr + offs_tok64, mask=tok_mask, other=0.0)  # [BLOCK_M]
                acc = acc * rw[None, :]
            if OUT_MANT:  # the interpreter's fp32 -> bf16 cast truncates: round to nearest even first
                acc = round_to_out_grid(acc, OUT_MANT)
            c_ptrs = c_ptr + offs_tok64[None, :] * stride_cm + offs_n[:, None]  # [BLOCK_N, BLOCK_M]
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def _group_pieces(w_ptrs, off, PIECES: tl.constexpr):
    """A group's words of ROWS rows at word offset `off`: PIECES [ROWS, 4] tiles (16-byte loads); the unused ones
    repeat the first."""
    p0 = tl.load(w_ptrs + off)
    p1 = p0
    p2 = p0
    p3 = p0
    if PIECES > 1:
        p1 = tl.load(w_ptrs + (off + 4))
    if PIECES > 2:
        p2 = tl.load(w_ptrs + (off + 8))
        p3 = tl.load(w_ptrs + (off + 12))
    return p0, p1, p2, p3


group_pieces = _jit(_group_pieces)


def _moe_rows_kernel(
    a_ptr,  # A [rows, K] activations in fp32, contiguous along K
    asum_ptr,  # fp32 [rows, K / GROUP]: the sum of each group of A's row (fp8_gemm.gemv_prep)
    b_ptr, z_ptr, s_ptr,  # qweight int32 [E, Nb, K/8], zeros uint8 [E, Nb, K/G], scales [E, Nb, K/G]
    c_ptr,  # C [M*topk, N] (GEMM 1: fp32, for GEMM 2's A)
    csum_ptr,  # SUMS_OUT: fp32 [M*topk, N / GROUP], the sums of each group of C's row as stored
    topk_weights_ptr, expert_ids_ptr,  # fp32 [M*topk]; topk_ids [M*topk]
    part_ptr, count_ptr,  # SLOT_SUM > 1: fp32 partial sums and int32 arrival counters (fp8_gemm.split_k_sum)
    N, num_valid_tokens, num_pid_m,
    nibble_mask,  # 0x000F0000, a launch argument as in _moe_gemv_kernel
    stride_am, stride_asm, stride_be, stride_bn, stride_ze, stride_zn, stride_se, stride_sn, stride_cm,
    K: tl.constexpr, GROUP: tl.constexpr, A_ROW_DIV: tl.constexpr, GATED: tl.constexpr, BLOCK_N: tl.constexpr,
    OUT_MANT: tl.constexpr, SLOT_SUM: tl.constexpr, NUM_EXPERTS: tl.constexpr,
    SUMS_OUT: tl.constexpr = False,  # write C's group sums (BLOCK_N a multiple of GROUP)
    DENSE: tl.constexpr = False,  # a plain linear: row pid_m of A, one weight (expert 0), no routing
    SPLIT_K: tl.constexpr = 1,  # programs a tile (SLOT_SUM: a slot) along axis 1, each over K/G/SPLIT_K groups
):
    pid = tl.program_id(0)
    pid_m = pid % num_pid_m
    pid_n = pid // num_pid_m
    pid_s = tl.program_id(1)
    HALVES: tl.constexpr = 2 if GATED else 1
    ROWS: tl.constexpr = HALVES * BLOCK_N
    GW: tl.constexpr = GROUP // 8  # words per row and group
    PIECES: tl.constexpr = GW // 4  # 16-byte loads per row and group (1, 2 or 4)
    r = tl.arange(0, ROWS)
    offs_n = pid_n * BLOCK_N + r % BLOCK_N
    if DENSE:
        pair = pid_m
        offs_tok64 = (pid_m + 0 * tl.arange(0, 1)).to(tl.int64)
        tok_mask = offs_tok64 < num_valid_tokens
        expert = 0
        row_mask = offs_n < N
    else:
        pair, offs_tok64, tok_mask, _, expert, routed = pair_rows(expert_ids_ptr, pid_m, pid_s, num_valid_tokens, r,
                                                                  A_ROW_DIV, SLOT_SUM, NUM_EXPERTS, 1, SPLIT_K)
        row_mask = (offs_n < N) & routed
    KB_PER: tl.constexpr = K // GROUP // SPLIT_K  # groups per program (SPLIT_K divides them)
    k0 = (pid_s % SPLIT_K) * KB_PER if SPLIT_K > 1 else 0  # (SLOT_SUM: pid_s = slot * SPLIT_K + share)
    # rows past N read row N - 1 (and slots routed nowhere an expert's rows): no load needs a mask
    rows = ((r // BLOCK_N) * N + tl.minimum(offs_n, N - 1)).to(tl.int64)  # [ROWS]
    offs_4 = tl.arange(0, 4)
    w_ptrs = tl.multiple_of(b_ptr + expert * stride_be + rows * stride_bn, 16)[:, None] + offs_4[None, :]
    z_ptrs = z_ptr + expert * stride_ze + rows * stride_zn  # [ROWS]
    s_ptrs = s_ptr + expert * stride_se + rows * stride_sn
    xrow = pair // A_ROW_DIV
    # four consecutive activations as a [ROWS, 4] tile, the same for every row (kernels/gguf_gemm.py says why)
    x_ptrs = a_ptr + xrow.to(tl.int64) * stride_am + (tl.zeros((ROWS, 4), dtype=tl.int32) + offs_4[None, :])
    acc = tl.zeros((ROWS,), dtype=tl.float32)
    nxt = group_pieces(w_ptrs, k0 * GW, PIECES)  # the group ahead, in flight while the current one is computed
    for kb in range(k0, k0 + KB_PER):
        p0, p1, p2, p3 = nxt
        nxt = group_pieces(w_ptrs, tl.minimum(kb + 1, k0 + KB_PER - 1) * GW, PIECES)
        z = tl.load(z_ptrs + kb).to(tl.float32)  # [ROWS]
        s = tl.load(s_ptrs + kb).to(tl.float32)
        part = tl.full((ROWS, 4), -0.0, dtype=tl.float32)
        for pc in tl.static_range(PIECES):
            words = pick4(pc, p0, p1, p2, p3)
            for j in tl.static_range(8):  # nibble j of word c: code j * GW + c
                f = nibble_128(words, j, nibble_mask)  # [ROWS, 4] 128 + q
                xj = tl.load(x_ptrs + (kb * GROUP + j * GW + 4 * pc))  # [ROWS, 4] codes j * GW + 4 pc ..
                part += f * xj
        xsum = tl.load(asum_ptr + xrow.to(tl.int64) * stride_asm + kb)
        # sum (q - z) s x = s (sum (128 + q) x - (128 + z) sum x)
        acc += s * (tl.sum(part, axis=1) - (128.0 + z) * xsum)

    acc = tl.reshape(tl.where(row_mask, acc, 0.0), (1, ROWS))
    gemv_store(acc, c_ptr, csum_ptr, topk_weights_ptr, part_ptr, count_ptr, pid, pid_s, pid_n, pair, offs_tok64,
               tok_mask, N, num_valid_tokens, stride_cm, GATED, 1, BLOCK_N, False, SLOT_SUM, SPLIT_K, OUT_MANT,
               GROUP if SUMS_OUT else 0)


_moe_gemv = _jit(_moe_gemv_kernel)
_moe_gemv_one_launch = _jit(_moe_gemv_one_launch_kernel)
_moe_rows = _jit(_moe_rows_kernel)
_moe_dot = _jit(_moe_dot_kernel)
_moe_mma = _jit(_moe_mma_kernel)


def _moe_default_config(m: int, topk: int, num_experts: int, g: int) -> dict:
    per_expert = m * topk / max(num_experts, 1)  # pairs per expert, on average
    if INTERPRETED:
        # the interpreter pays per program instance and per operation, not per element: few, large tiles
        if per_expert <= 4:
            return dict(PATH="gemv", BLOCK_M=4, BLOCK_N=64, GROUP_M=1, num_warps=4, num_stages=1)
        return dict(PATH="dot", BLOCK_M=64, BLOCK_N=128, GROUP_M=1, num_warps=4, num_stages=1)
    # H100/H200. Decode reads weights and nothing else: the GEMV path, one pair per program while most experts get
    # one token (a second pair of the same expert re-reads its rows from L2), then two and four. BLOCK_N = 16: 32
    # weight rows of 64 bytes per group on 2 warps, two 16-byte loads per thread and group, 72 registers, 768
    # programs for each GEMM at M = 1, all resident at once. Then every row of the
    # 8 experts is being read and the bytes in flight are rows x groups ahead x 64: 24576 x 2 x 64 = 3.1 MB at
    # PREFETCH = 2, about what 4.2 TB/s needs over a DRAM latency of ~700 ns (Little's law); PREFETCH = 1 halves it.
    # From a quarter of a pair per expert on average (MiniMax-M2 from M = 16) the touched experts get several pairs
    # each and a GEMV program per pair re-reads their rows: the tensor-core paths, as the H200's tuning chose them
    # from M = 16 on (mma, and dot at 32). Past 16 pairs an expert: the dot path with each group as one dot of
    # K = G (WIDE 1) on 64 x 64 tiles over 4 warps, the H100's fastest at 1024 and 4096 tokens (BENCHMARKS.md).
    if per_expert <= 0.25 or g < 128:  # (the tensor-core paths' tl.dot needs K = G/8 >= 16)
        return dict(PATH="gemv", BLOCK_M=1, BLOCK_N=16, GROUP_M=1, PREFETCH=2, num_warps=2, num_stages=1)
    if per_expert <= 8:
        return dict(PATH="mma", BLOCK_M=16, BLOCK_N=64, GROUP_M=1, num_warps=4, num_stages=2)
    if per_expert <= 16:
        return dict(PATH="dot", BLOCK_M=32, BLOCK_N=64, GROUP_M=4, num_warps=4, num_stages=4)
    return dict(PATH="dot", BLOCK_M=64, BLOCK_N=64, GROUP_M=8, num_warps=4, num_stages=3, WIDE=1)


def select_moe_config(table: dict, device: str, shape: str, m: int, default: dict,
                      keys: tuple[str, ...] = MOE_CONFIG_KEYS) -> dict:
    """The tuned config for (device, shape) at the M bucket nearest to m (the smaller on a tie), over `default`."""
    buckets = table.get(device, {}).get(shape)
    if not buckets:
        return dict(default)
    bucket = min(buckets, key=lambda b: (abs(int(b) - m), int(b)))
    return {**default, **{k: v for k, v in buckets[bucket].items() if k in keys}}


def _overridden(cfg: dict, override: dict | None, g: int, keys: tuple[str, ...], paths: tuple[str, ...]) -> dict:
    """cfg with `override`'s keys over it (an override naming another PATH starts from that path's defaults),
    reduced to `keys` and validated."""
    over = dict(override or {})
    if "PATH" in over and over["PATH"] != cfg.get("PATH"):
        cfg = _other_path_default(over["PATH"], g)  # a config of the other path starts from its own defaults
    cfg = {k: v for k, v in {**cfg, **over}.items() if k in keys}
    if cfg["PATH"] not in paths:
        raise ValueError(f"block config {cfg}: PATH must be one of {paths}")
    if cfg["BLOCK_N"] < 1 or cfg["BLOCK_N"] & (cfg["BLOCK_N"] - 1) or cfg["BLOCK_M"] < 1 \
            or cfg["BLOCK_M"] & (cfg["BLOCK_M"] - 1):
        raise ValueError(f"block config {cfg}: BLOCK_M and BLOCK_N must be powers of two")
    if cfg.setdefault("PREFETCH", 1) not in (0, 1, 2):
        raise ValueError(f"block config {cfg}: PREFETCH must be 0, 1 or 2")
    if "ONE_LAUNCH" in keys and (cfg.setdefault("ONE_LAUNCH", 0) not in (0, 1, 2, 3, 4) or cfg["ONE_LAUNCH"] and not (
            cfg["PATH"] == "gemv" and cfg["BLOCK_M"] == 1 and cfg["PREFETCH"] == 0)):
        raise ValueError(f"block config {cfg}: ONE_LAUNCH (1; 2 backs off while waiting, 3 preloads, 4 both) is a "
                         "key of the gemv path at BLOCK_M 1 and PREFETCH 0")
    if cfg.setdefault("STAGES", 1) < 1 or (cfg["STAGES"] > 1 and cfg["PATH"] != "gemv"):
        raise ValueError(f"block config {cfg}: STAGES (a software-pipelined K loop) is a gemv path key, >= 1")
    gstep = cfg.setdefault("GSTEP", 1)
    if gstep not in (1, 2, 4, 8) or gstep > 1 and not (cfg["PATH"] == "gemv" and cfg["BLOCK_M"] == 1
                                                       and cfg["PREFETCH"] == 0 or cfg["PATH"] == "mma"):
        raise ValueError(f"block config {cfg}: GSTEP (groups a K step: 1, 2, 4 or 8) is a key of the mma path and "
                         "of the gemv path at BLOCK_M 1 and PREFETCH 0")
    if cfg["PATH"] in ("dot", "mma") and not INTERPRETED and (g < 128 or cfg["BLOCK_M"] < 16 or cfg["BLOCK_N"] < 16):
        raise ValueError(f"block config {cfg}: the dot path needs group >= 128 (got {g}) and 16-row blocks at least")
    return cfg


def moe_config(device: torch.device, m: int, topk: int, num_experts: int, inter: int, hidden: int, g: int,
               override: dict | None = None) -> dict:
    """Block configuration for both GEMMs: configs/w4a16_moe.json, else the defaults, then `override`; validated."""
    default = _moe_default_config(m, topk, num_experts, g)
    cfg = select_moe_config(load_config_table("w4a16_moe.json"), device_key(device),
                            f"E={num_experts},I={inter},H={hidden},G={g}", m, default)
    cfg = _overridden(cfg, override, g, MOE_CONFIG_KEYS, MOE_PATHS)
    splits = (cfg.setdefault("SPLIT_K", 1), cfg.setdefault("SPLIT_K2", 1))
    if cfg.setdefault("PAIRS", False) and cfg["PATH"] != "mma":
        raise ValueError(f"block config {cfg}: PAIRS is an mma path key (the gemv path takes pairs at BLOCK_M 1)")
    if min(splits) < 1 or (max(splits) > 1 and cfg["PATH"] not in ("gemv", "rows") and not cfg["PAIRS"]):
        raise ValueError(f"block config {cfg}: the MoE splits K on the gemv and rows paths and unsorted mma only")
    return cfg


def _other_path_default(path: str, g: int) -> dict:
    if path == "rows":  # 256 rows (GEMM 1: 128 gate + 128 up) a program, a thread each
        return dict(PATH="rows", BLOCK_M=1, BLOCK_N=128, GROUP_M=1, PREFETCH=1, num_warps=8, num_stages=1,
                    SPLIT_K=1)
    if path == "gemv":
        return dict(PATH="gemv", BLOCK_M=1, BLOCK_N=16, GROUP_M=1, PREFETCH=2, num_warps=2, num_stages=1)
    return dict(PATH=path, BLOCK_M=16, BLOCK_N=64, GROUP_M=1, num_warps=4, num_stages=3)


def _check_moe_args(x: torch.Tensor, w13: tuple[torch.Tensor, ...], w2: tuple[torch.Tensor, ...],
                    topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    if x.dim() != 2 or x.dtype not in ACT_DTYPES:
        raise ValueError(f"x must be [M, H] in one of {ACT_DTYPES}, got {tuple(x.shape)} {x.dtype}")
    m, h = x.shape
    if w13[0].dim() != 3 or w2[0].dim() != 3:
        raise ValueError(f"expert weights must be stacked K-major [E, N, K/8], got {tuple(w13[0].shape)} and "
                         f"{tuple(w2[0].shape)}")
    two_i, k13, g = check_kmajor_weight(*w13, name="w13 ")
    n2, k2, g2 = check_kmajor_weight(*w2, name="w2 ")
    e = w13[0].shape[0]
    i = two_i // 2
    if k13 != h or two_i % 2 or w2[0].shape[0] != e or k2 != i or n2 != h or g2 != g:
        raise ValueError(f"w13 must be [E, 2I, H/8 = {h // 8}] and w2 [E, H, I/8] with one group size, got "
                         f"{tuple(w13[0].shape)} (group {g}) and {tuple(w2[0].shape)} (group {g2})")
    if x.stride(1) != 1:
        raise ValueError("x must be contiguous along H")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != m or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_weights and topk_ids must both be [M={m}, topk], got {tuple(topk_weights.shape)} "
                         f"and {tuple(topk_ids.shape)}")
    if topk_ids.dtype.is_floating_point or topk_weights.dtype != torch.float32:
        raise ValueError(f"topk_ids must be integer and topk_weights float32, got {topk_ids.dtype} and "
                         f"{topk_weights.dtype}")
    return m, h, e, i, topk_ids.shape[1], g


def _launch(a: torch.Tensor, w: tuple[torch.Tensor, ...], c: torch.Tensor, topk_weights: torch.Tensor,
            sorted_token_ids: torch.Tensor, expert_ids: torch.Tensor, total: torch.Tensor, n: int, k: int, g: int,
            a_row_div: int, gated: bool, mul_routed_weight: bool, cfg: dict, dense: bool = False,
            pairs: int = 0, slot_sum: int = 0) -> None:
    """One GEMM of the layer (or, dense, a plain linear: the routing arguments are then placeholders; pairs = E:
    the GEMV path on unsorted pairs, expert_ids being topk_ids, GEMM 2 adding its slot_sum slots itself)."""
    qweight, zeros, scales = w
    if pairs:  # one pair (GEMM 1) or token (GEMM 2) a program, whatever BLOCK_M
        num_pid_m = c.shape[0]
    else:
        num_pid_m = triton.cdiv(c.shape[0], cfg["BLOCK_M"]) if dense else sorted_token_ids.numel() // cfg["BLOCK_M"]
    # the GEMV tile holds the same number of weight rows in both GEMMs (GEMM 1 takes BLOCK_N gate and BLOCK_N up
    # rows): the per-thread layout, and so the compiled loop's cost per weight, is the same (half the rows would
    # leave one row per thread on 2 warps at BLOCK_N = 16, ~9 instructions per weight instead of ~7)
    block_n = cfg["BLOCK_N"] if gated or cfg["PATH"] != "gemv" else 2 * cfg["BLOCK_N"]
    tiles = num_pid_m * triton.cdiv(n, block_n)
    split = cfg.get("SPLIT_K", 1)  # (moe_config admits a split of the MoE's GEMMs on the CUDA-core paths only)
    # gated, the split programs leave the raw gate and up sums (fp8_moe.gemv_store): partials 2N wide; adding slots,
    # each slot's shares leave theirs
    parts = max(slot_sum, 1) * split
    part, counters = split_k_workspace(parts, c.shape[0], 2 * n if gated else n, tiles, c.device)
    head = (a, qweight, zeros, scales, c, topk_weights, sorted_token_ids, expert_ids, total, part, counters,
            n, c.shape[0], num_pid_m)
    strides = (a.stride(0), qweight.stride(0), qweight.stride(1), zeros.stride(0), zeros.stride(1),
               scales.stride(0), scales.stride(1), c.stride(0))
    args = head + strides
    common = dict(K=k, GROUP=g, A_ROW_DIV=a_row_div, GATED=gated, MUL_ROUTED_WEIGHT=mul_routed_weight,
                  BLOCK_M=cfg["BLOCK_M"], BLOCK_N=block_n, OUT_MANT=out_mantissa_bits(c.dtype), DENSE=dense,
                  SPLIT_K=split, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    grid = (tiles, parts)
    if pairs:
        if not (cfg["PATH"] == "gemv" and cfg["BLOCK_M"] == 1 or cfg["PATH"] == "mma"):
            raise ValueError(f"unsorted pairs take the GEMV path one pair a program or the mma path, not {cfg}")
        common.update(PAIRS=True, SLOT_SUM=slot_sum, NUM_EXPERTS=pairs)
    if cfg["PATH"] == "gemv":
        stages = cfg.get("STAGES", 1)
        exact = a.dtype == torch.float32
        # groups a step: fp32 activations (EXACT) take one; else the largest power of two up to GSTEP dividing the
        # program's groups
        gstep = 1 if exact else _gstep(cfg, k // g // split)
        _moe_gemv[grid](*head, 0x000F0000, *strides, PREFETCH=cfg["PREFETCH"], EXACT=exact, STAGES=stages,
                        GSTEP=gstep, **{**common, "num_stages": stages}, **pdl_kwargs(c.device))  # nibble_mask
    elif cfg["PATH"] == "mma":
        _moe_mma[grid](*args, MAGIC=0x6400 if a.dtype == torch.float16 and not INTERPRETED else 0x4300,
                       UPCAST=INTERPRETED, PREFETCH=1 if gated else cfg.get("PREFETCH", 1),
                       GSTEP=_gstep(cfg, k // g // split), **common)
    else:
        _moe_dot[grid](*args, GROUP_M=cfg["GROUP_M"], UPCAST=INTERPRETED,
                       F32_DOT=a.dtype == torch.float32 and not INTERPRETED, WIDE=int(cfg.get("WIDE", 0)),
                       MAGIC=0x6400 if a.dtype == torch.float16 and not INTERPRETED else 0x4300, **common)


def _gstep(cfg: dict, groups: int) -> int:
    """A config's GSTEP, halved until it divides a program's groups."""
    gstep = cfg.get("GSTEP", 1)
    while groups % gstep:
        gstep //= 2
    return gstep


def fused_moe_w4a16(x: torch.Tensor, w13_qweight: torch.Tensor, w13_zeros: torch.Tensor, w13_scales: torch.Tensor,
                    w2_qweight: torch.Tensor, w2_zeros: torch.Tensor, w2_scales: torch.Tensor,
                    topk_weights: torch.Tensor, topk_ids: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """MoE layer with W4A16 experts in the K-major layout: x [M, H] -> [M, H] in x.dtype (module docstring)."""
    w13, w2 = (w13_qweight, w13_zeros, w13_scales), (w2_qweight, w2_zeros, w2_scales)
    m, h, e, i, topk, g = _check_moe_args(x, w13, w2, topk_weights, topk_ids)
    device = check_device(x, *w13, *w2, topk_weights, topk_ids)
    if m == 0:
        return torch.empty_like(x)
    cfg = moe_config(device, m, topk, e, i, h, g, config)
    if cfg["PATH"] == "mma" and x.dtype == torch.float32 and not INTERPRETED:
        cfg = _other_path_default("dot", g)  # 16-bit operands only: fp32 activations take the dot path
    weights = topk_weights.contiguous().view(-1)  # [M*topk]
    alloc = torch.zeros if INTERPRETED else torch.empty
    if cfg["PATH"] == "rows" and not (cfg["BLOCK_M"] == 1 and m * topk <= PAIRS_MAX and _rows_readable(*w13, *w2)):
        cfg = _moe_default_config(m, topk, e, g)  # beyond decode sizes, or unaligned: the tuned paths' defaults
    pairs = m * topk <= PAIRS_MAX and (cfg["PATH"] == "gemv" and cfg["BLOCK_M"] == 1 or cfg.get("PAIRS", False))
    if cfg.get("PAIRS") and not pairs:
        cfg = {**cfg, "SPLIT_K": 1, "SPLIT_K2": 1}  # the sorted list's mma GEMMs do not split
    cfg1 = {**cfg, "SPLIT_K": split_divisor(cfg.get("SPLIT_K", 1), h // g)}  # GEMM 1's programs a tile
    cfg2 = {**cfg, "SPLIT_K": split_divisor(cfg.get("SPLIT_K2", 1), i // g)}  # GEMM 2's
    if cfg["PATH"] == "rows":
        return _moe_rows_layer(x, w13, w2, weights, topk_ids, cfg1, cfg2, g, alloc)
    if pairs:  # decode: two launches, no sort and no separate slot sum
        ids = topk_ids.contiguous().view(-1)  # [M*topk]
        if cfg.get("ONE_LAUNCH") and x.dtype != torch.float32:  # (fp32 activations: the EXACT loop, two launches)
            return _one_launch(x, w13, w2, weights, ids, topk, e, i, g, cfg1, cfg2, alloc)
        inter = alloc((m * topk, i), dtype=x.dtype, device=device)  # [M*topk, I] silu(gate) * up
        _launch(x, w13, inter, weights, ids, ids, ids, n=i, k=h, g=g, a_row_div=topk, gated=True,
                mul_routed_weight=False, cfg=cfg1, pairs=e)
        out = torch.empty_like(x)  # [M, H]
        _launch(inter, w2, out, weights, ids, ids, ids, n=h, k=i, g=g, a_row_div=1, gated=False,
                mul_routed_weight=True, cfg=cfg2, pairs=e, slot_sum=topk)
        return out
    sorted_token_ids, expert_ids, total = _route(topk_ids, cfg["BLOCK_M"], e)  # no host sync

    # rows of pairs routed to no expert are never written (nor read by GEMM 2, nor summed); zeroed in the interpreter
    # only, where garbage would make numpy warn
    inter = alloc((m * topk, i), dtype=x.dtype, device=device)  # [M*topk, I] silu(gate) * up
    _launch(x, w13, inter, weights, sorted_token_ids, expert_ids, total, n=i, k=h, g=g, a_row_div=topk,
            gated=True, mul_routed_weight=False, cfg=cfg1)
    y = alloc((m * topk, h), dtype=x.dtype, device=device)  # [M*topk, H] each slot's weighted expert output
    _launch(inter, w2, y, weights, sorted_token_ids, expert_ids, total, n=h, k=i, g=g, a_row_div=1,
            gated=False, mul_routed_weight=True, cfg=cfg2)

    return moe_sum(y, topk_ids, x, e)


def _one_launch(x: torch.Tensor, w13: tuple[torch.Tensor, ...], w2: tuple[torch.Tensor, ...], weights: torch.Tensor,
                ids: torch.Tensor, topk: int, e: int, i: int, g: int, cfg1: dict, cfg2: dict, alloc) -> torch.Tensor:
    """The decode layer's two GEMMs (unsorted pairs, the GEMV path at one pair a program) in one launch:
    _moe_gemv_one_launch_kernel."""
    m, h = x.shape
    pairs = m * topk
    bn1, bn2 = cfg1["BLOCK_N"], 2 * cfg1["BLOCK_N"]  # the tiles _launch gives each GEMM
    s1, s2 = cfg1["SPLIT_K"], cfg2["SPLIT_K"]
    n1t, n2t = triton.cdiv(i, bn1), triton.cdiv(h, bn2)
    inter = alloc((pairs, i), dtype=x.dtype, device=x.device)
    out = torch.empty_like(x)
    part1 = split_k_workspace(s1, pairs, 2 * i, 1, x.device)[0]
    part2 = split_k_workspace(topk * s2, m, h, 1, x.device)[0]
    t1 = pairs * n1t if s1 > 1 else 0  # arrival counters: the pairs' ready counters, then GEMM 1's, GEMM 2's
    ready_n = READY_STRIDE * pairs
    counters = arrival_counters(x.device, ready_n + t1 + m * n2t)
    qw1, z1, sc1 = w13
    qw2, z2, sc2 = w2
    grid = (pairs * (n1t * s1 + n2t * s2),)
    _moe_gemv_one_launch[grid](
        x, qw1, z1, sc1, qw2, z2, sc2, inter, out, weights, ids, part1, counters[ready_n:], part2,
        counters[ready_n + t1:], counters, m, 0x000F0000,  # nibble_mask: see _moe_gemv_kernel
        x.stride(0), qw1.stride(0), qw1.stride(1), z1.stride(0), z1.stride(1), sc1.stride(0), sc1.stride(1),
        inter.stride(0), qw2.stride(0), qw2.stride(1), z2.stride(0), z2.stride(1), sc2.stride(0), sc2.stride(1),
        out.stride(0), H=h, I=i, GROUP=g, TOPK=topk, NUM_EXPERTS=e, BLOCK_N1=bn1, BLOCK_N2=bn2, SPLIT1=s1,
        SPLIT2=s2, GSTEP1=_gstep(cfg1, h // g // s1), GSTEP2=_gstep(cfg2, i // g // s2), STAGES=cfg1["STAGES"],
        OUT_MANT=out_mantissa_bits(x.dtype), READY_STRIDE=READY_STRIDE,
        SLEEP=cfg1["ONE_LAUNCH"] in (2, 4) and not INTERPRETED, ASM=not INTERPRETED, PRELOAD=cfg1["ONE_LAUNCH"] >= 3,
        num_warps=cfg1["num_warps"],
        num_stages=cfg1["STAGES"])
    return out


def _rows_readable(*tensors: torch.Tensor) -> bool:
    """The rows path's 16-byte loads: qweight rows (K/8 words) start 16-byte aligned."""
    qw13, _, _, qw2, _, _ = tensors
    return all(t.data_ptr() % 16 == 0 and t.stride(1) % 4 == 0 and t.stride(0) % 4 == 0 and t.stride(2) == 1
               for t in (qw13, qw2))


def _moe_rows_layer(x: torch.Tensor, w13: tuple[torch.Tensor, ...], w2: tuple[torch.Tensor, ...],
                    weights: torch.Tensor, topk_ids: torch.Tensor, cfg: dict, cfg2: dict, g: int,
                    alloc) -> torch.Tensor:
    """The "rows" path on unsorted pairs: x to fp32 with its group sums (one launch), GEMM 1 writing silu(gate) * up
    in fp32 (and its group sums when BLOCK_N covers whole groups; else one more such launch), GEMM 2 adding each
    token's slots."""
    m, h = x.shape
    e, i = w13[0].shape[0], w13[0].shape[1] // 2
    topk = topk_ids.shape[1]
    ids = topk_ids.contiguous().view(-1)  # [M*topk]
    xf, xs = gemv_prep(x, g)
    inter = alloc((m * topk, i), dtype=torch.float32, device=x.device)
    sums_out = cfg["BLOCK_N"] % g == 0
    inter_sums = alloc((m * topk, i // g), dtype=torch.float32, device=x.device) if sums_out else None
    _launch_rows(xf, xs, w13, inter, inter_sums, weights, ids, n=i, k=h, g=g, a_row_div=topk, gated=True, cfg=cfg,
                 pairs=e, slot_sum=0)
    if not sums_out:
        inter, inter_sums = gemv_prep(inter, g)
    out = torch.empty_like(x)
    _launch_rows(inter, inter_sums, w2, out, None, weights, ids, n=h, k=i, g=g, a_row_div=1, gated=False,
                 cfg={**cfg2, "BLOCK_N": 2 * cfg["BLOCK_N"]}, pairs=e, slot_sum=topk)
    return out


def _launch_rows(a: torch.Tensor, a_sums: torch.Tensor, w: tuple[torch.Tensor, ...], c: torch.Tensor,
                 c_sums: torch.Tensor | None, weights: torch.Tensor, ids: torch.Tensor, n: int, k: int, g: int,
                 a_row_div: int, gated: bool, cfg: dict, pairs: int, slot_sum: int, dense: bool = False) -> None:
    """One launch of the rows kernel: the MoE's GEMMs on unsorted pairs, or (dense) a plain linear over the rows of
    a with SPLIT_K programs a tile (weights and ids placeholders)."""
    qweight, zeros, scales = w
    num_pid_m = c.shape[0]
    tiles = num_pid_m * triton.cdiv(n, cfg["BLOCK_N"])
    split = cfg.get("SPLIT_K", 1)
    parts = max(slot_sum, 1) * split  # adding slots, each slot's shares of K leave a partial
    part, counters = split_k_workspace(parts, c.shape[0], 2 * n if gated else n, tiles, c.device)
    cs = c_sums if c_sums is not None else part
    _moe_rows[(tiles, parts)](
        a, a_sums, qweight, zeros, scales, c, cs, weights, ids, part, counters, n, c.shape[0], num_pid_m, 0x000F0000,
        a.stride(0), a_sums.stride(0), qweight.stride(0), qweight.stride(1), zeros.stride(0), zeros.stride(1),
        scales.stride(0), scales.stride(1), c.stride(0),
        K=k, GROUP=g, A_ROW_DIV=a_row_div, GATED=gated, BLOCK_N=cfg["BLOCK_N"], OUT_MANT=out_mantissa_bits(c.dtype),
        SLOT_SUM=slot_sum, NUM_EXPERTS=pairs, SUMS_OUT=c_sums is not None, DENSE=dense,
        SPLIT_K=split, num_warps=cfg["num_warps"], num_stages=1)


def fused_moe_w4a16_ref(x: torch.Tensor, w13_qweight: torch.Tensor, w13_zeros: torch.Tensor,
                        w13_scales: torch.Tensor, w2_qweight: torch.Tensor, w2_zeros: torch.Tensor,
                        w2_scales: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Reference of fused_moe_w4a16: a loop over the touched experts on dequantized fp32 weights, with the kernel's
    roundings (the intermediate and each slot's weighted output in x.dtype, the slot sum in fp32)."""
    w13, w2 = (w13_qweight, w13_zeros, w13_scales), (w2_qweight, w2_zeros, w2_scales)
    m, h, e, i, topk, g = _check_moe_args(x, w13, w2, topk_weights, topk_ids)
    slots = torch.zeros((m, topk, h), dtype=torch.float32, device=x.device)  # [M, topk, H]
    for ex in topk_ids.unique().tolist():
        if not 0 <= ex < e:
            continue
        tok, slot = (topk_ids == ex).nonzero(as_tuple=True)
        gate_up = x[tok].float() @ kmajor_dequantize_ref(*(t[ex] for t in w13)).t()  # [n, 2I]
        gate, up = gate_up[:, :i], gate_up[:, i:]
        inter = (gate * torch.sigmoid(gate) * up).to(x.dtype)  # [n, I]
        y = (inter.float() @ kmajor_dequantize_ref(*(t[ex] for t in w2)).t()) * topk_weights[tok, slot][:, None]
        slots[tok, slot] = y.to(x.dtype).float()  # [n, H]
    return slots.sum(dim=1).to(x.dtype)


# --------------------------------------------------------------------------------------------------------------------
# a plain linear on the same kernels

LINEAR_CONFIG_KEYS = tuple(k for k in MOE_CONFIG_KEYS if k not in ("SPLIT_K2", "ONE_LAUNCH"))  # one GEMM
# "dequant" (prefill): the weight dequantized to x.dtype [N, K] by one kernel, then cuBLAS: at a few hundred rows
# and more the matmul is compute-bound and cuBLAS's bf16 GEMM beats any kernel that unpacks in its inner loop, while
# the dequantization costs one read of the 4-bit weight and one write (and read) of the 16-bit one
LINEAR_PATHS = PATHS + ("dequant", "rows")


def _kmajor_dequant_kernel(
    b_ptr, z_ptr, s_ptr, out_ptr,  # qweight int32 [N, K/8], zeros uint8 [N, K/G], scales [N, K/G] -> out [N, K]
    N, stride_bn, stride_zn, stride_sn, stride_on,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, OUT_MANT: tl.constexpr,
):
    """Program (row block, group): the group's codes of BLOCK_N rows, (q - z) * s in fp32, stored in out's dtype
    at their K positions (nibble j of word c: code j * G/8 + c)."""
    pid_n = tl.program_id(0)
    kb = tl.program_id(1)
    GW: tl.constexpr = GROUP // 8
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rmask = rows < N
    offs_c = tl.arange(0, GW)
    words = tl.load(b_ptr + rows[:, None] * stride_bn + kb * GW + offs_c[None, :], mask=rmask[:, None], other=0)
    z = tl.load(z_ptr + rows * stride_zn + kb, mask=rmask, other=0).to(tl.float32)
    sc = tl.load(s_ptr + rows * stride_sn + kb, mask=rmask, other=0.0).to(tl.float32)
    o_ptrs = out_ptr + rows[:, None] * stride_on + kb * GROUP + offs_c[None, :]
    for j in tl.static_range(8):
        q = ((words >> (4 * j)) & 0xF).to(tl.float32)
        w = (q - z[:, None]) * sc[:, None]
        if OUT_MANT:
            w = round_to_out_grid(w, OUT_MANT)
        tl.store(o_ptrs + j * GW, w.to(out_ptr.dtype.element_ty), mask=rmask[:, None])


_kmajor_dequant = _jit(_kmajor_dequant_kernel)


def kmajor_dequantize(qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                      dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """W [N, K] in dtype from the K-major tensors of one linear, one launch: (q - z) * s in fp32 rounded once to
    dtype (kmajor_dequantize_ref's values, rounded)."""
    n, k, g = check_kmajor_weight(qweight, zeros, scales)
    if qweight.dim() != 2:
        raise ValueError(f"qweight must be K-major [N, K/8], got {tuple(qweight.shape)}")
    device = check_device(qweight, zeros, scales)
    out = torch.empty((n, k), dtype=dtype, device=device)
    if n:
        block_n = 64 if INTERPRETED else 32
        _kmajor_dequant[(triton.cdiv(n, block_n), k // g)](
            qweight, zeros, scales, out, n, qweight.stride(0), zeros.stride(0), scales.stride(0), out.stride(0),
            GROUP=g, BLOCK_N=block_n, OUT_MANT=out_mantissa_bits(dtype), num_warps=4)
    return out


def _linear_default_config(device: torch.device, m: int, n: int, k: int, g: int) -> dict:
    if INTERPRETED:
        if m <= 4:
            return dict(PATH="gemv", BLOCK_M=triton.next_power_of_2(m), BLOCK_N=32, GROUP_M=1, PREFETCH=1,
                        num_warps=4, num_stages=1, SPLIT_K=1)
        return dict(PATH="dot", BLOCK_M=64, BLOCK_N=128, GROUP_M=1, num_warps=4, num_stages=1, SPLIT_K=1)
    # H100/H200 (BENCHMARKS.md): the GEMV path for one row (12 us for q/k/v on an H200), the weights-as-A tensor-core
    # path from two rows to about a hundred (12.6 us at 4 rows, where the GEMV path, repeating its multiply-adds per
    # row, took 32), dequantization and cuBLAS above (43 us for q/k/v at 256 rows, where the in-loop kernels take
    # 72-135); at decode sizes K is split until every multiprocessor has a couple of programs (the projections'
    # 3072-8192 outputs make only 48-256 tiles)
    if m == 1 or g < 128:
        cfg = dict(PATH="gemv", BLOCK_M=triton.next_power_of_2(min(m, 4)), BLOCK_N=16, GROUP_M=1, PREFETCH=2,
                   num_warps=2, num_stages=1)
        rows = 2 * cfg["BLOCK_N"]
    elif m <= 96:
        cfg = dict(PATH="mma", BLOCK_M=16 if m <= 16 else 32, BLOCK_N=64, GROUP_M=1, num_warps=4, num_stages=3)
        rows = cfg["BLOCK_N"]
    else:
        return dict(PATH="dequant", BLOCK_M=64, BLOCK_N=64, GROUP_M=1, num_warps=4, num_stages=1, SPLIT_K=1)
    num_sms = _cuda_device_info(_cuda_index(device))[2]
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, rows)
    split, groups = 1, k // g
    while tiles * split < 2 * num_sms and groups % (2 * split) == 0 and groups // (2 * split) >= 4:
        split *= 2
    return {**cfg, "SPLIT_K": split}


def linear_config(device: torch.device, m: int, n: int, k: int, g: int, override: dict | None = None) -> dict:
    """Block configuration of w4a16_kmajor_linear: configs/w4a16_linear.json ({device: {"N=..,K=..,G=..": {M bucket:
    config}}}), else the defaults, then `override`; validated."""
    cfg = select_moe_config(load_config_table("w4a16_linear.json"), device_key(device), f"N={n},K={k},G={g}", m,
                            _linear_default_config(device, m, n, k, g), LINEAR_CONFIG_KEYS)
    cfg = _overridden(cfg, override, g, LINEAR_CONFIG_KEYS, LINEAR_PATHS)
    if cfg.setdefault("SPLIT_K", 1) < 1 or (k // g) % cfg["SPLIT_K"]:
        raise ValueError(f"block config {cfg}: SPLIT_K must divide the {k // g} groups of K={k}")
    return cfg


def w4a16_kmajor_linear(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                        config: dict | None = None) -> torch.Tensor:
    """y = x W^T, W [N, K] in the K-major layout (qweight int32 [N, K/8], zeros uint8 [N, K/G], scales [N, K/G]):
    x [..., K] -> [..., N] in x.dtype, fp32 accumulation. The MoE GEMMs' kernels with one expert and the rows of x
    taken in order (no routing); SPLIT_K > 1 splits the groups of K over programs, the last of a tile's programs to
    finish adding the fp32 partials in split order (deterministic, one launch, capturable in a CUDA graph).
    PATH "dequant" (large M) writes W in x.dtype and multiplies with torch (cuBLAS on a GPU): the weight is then
    rounded to x.dtype before the products, as a bf16 model's would be."""
    if x.dim() < 1 or x.dtype not in ACT_DTYPES:
        raise ValueError(f"x must be [..., K] in one of {ACT_DTYPES}, got {tuple(x.shape)} {x.dtype}")
    if qweight.dim() != 2:
        raise ValueError(f"qweight must be K-major [N, K/8], got {tuple(qweight.shape)}")
    n, k, g = check_kmajor_weight(qweight, zeros, scales)
    if x.shape[-1] != k:
        raise ValueError(f"x {tuple(x.shape)} does not fit qweight {tuple(qweight.shape)} [N, K/8 = {k // 8}]")
    device = check_device(x, qweight, zeros, scales)
    lead = x.shape[:-1]
    a = x.reshape(-1, k)
    if k > 1 and a.stride(1) != 1:
        a = a.contiguous()
    m = a.shape[0]
    c = torch.empty((m, n), dtype=x.dtype, device=device)
    if m == 0 or n == 0:
        return c.view(*lead, n)
    cfg = linear_config(device, m, n, k, g, config)
    if cfg["PATH"] == "dequant":  # the matmul in x.dtype on the weight rounded to it (fp32: exact)
        return torch.matmul(a, kmajor_dequantize(qweight, zeros, scales, x.dtype).t(), out=c).view(*lead, n)
    if cfg["PATH"] == "mma" and x.dtype == torch.float32 and not INTERPRETED:
        cfg = {**_other_path_default("dot", g), "SPLIT_K": cfg["SPLIT_K"]}  # 16-bit operands only
    w = (qweight[None], zeros[None], scales[None])  # one expert
    if cfg["PATH"] == "rows":  # x to fp32 with its group sums, then a thread a weight row
        if not _rows_readable(*w, *w):
            raise ValueError("the rows path reads qweight rows 16-byte aligned")
        af, a_sums = gemv_prep(a, g)
        _launch_rows(af, a_sums, w, c, None, c, c, n=n, k=k, g=g, a_row_div=1, gated=False, cfg=cfg, pairs=0,
                     slot_sum=0, dense=True)
        return c.view(*lead, n)
    _launch(a, w, c, c, c, c, c, n=n, k=k, g=g, a_row_div=1, gated=False, mul_routed_weight=False, cfg=cfg,
            dense=True)
    return c.view(*lead, n)


def w4a16_kmajor_linear_ref(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor,
                            scales: torch.Tensor) -> torch.Tensor:
    """Reference of w4a16_kmajor_linear: x @ W^T on the dequantized fp32 weight, rounded to x.dtype."""
    w = kmajor_dequantize_ref(qweight, zeros, scales)  # [N, K]
    return (x.float() @ w.t()).to(x.dtype)
