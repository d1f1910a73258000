"""Fused mixture-of-experts for FP8 weights (block FP8 as released for MiniMax-M2, or per-channel FP8), in Triton.

    out[t] = sum over slots s of topk_weights[t, s] * W2_e (silu(W1_e x_t) * (W3_e x_t)),  e = topk_ids[t, s]

with x and the intermediate quantized to FP8 on the fly (W8A8), as vLLM and SGLang run such checkpoints.

Usage:
    from quantkit.kernels.fp8_moe import fused_moe_fp8

    out = fused_moe_fp8(x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, scheme="block")
    # x [M, H] bf16; w13 fp8 [E, 2I, H] (rows [0, I) gate = w1, rows [I, 2I) up = w3); w2 fp8 [E, H, I]
    # block:   w13_scale [E, 2I/128, H/128], w2_scale [E, H/128, I/128]  (weight_scale_inv, 128x128 tiles)
    # channel: w13_scale [E, 2I, 1],        w2_scale [E, H, 1]
    # topk_weights fp32 [M, topk], topk_ids int [M, topk]; ids outside [0, E) (e.g. -1) route the slot nowhere

Steps: quantize x (per token per 128 group, or per token); sort the (token, slot) pairs by expert and pad each
expert's group to a multiple of BLOCK_M (`moe_align_block_size`); GEMM 1 over that list, one launch for all experts,
each program computing a gate tile and the matching up tile and writing silu(gate) * up [M*topk, I]; quantize that
(with block scales and 128-column tiles GEMM 1's epilogue can write the FP8 codes and scales itself, QUANT_OUT);
GEMM 2 [M*topk, I] x w2^T with the router weight multiplied in the epilogue [M*topk, H]; sum over the topk slots
(a Triton reduction, no atomics). No host sync anywhere: the padded list lives in a worst-case-sized buffer and its
length stays on the device, so the layer can be captured in a CUDA graph. The sort is one Triton program up to
ALIGN_KERNEL_MAX_PAIRS pairs (`_align_small`) and three launches over chunks of pairs past it (`_align_chunked`),
each with `_align`'s result (~15 torch kernels) element for element. For single-token steps there is no sort at all:
each row block of the GEMMs holds one pair as it comes (its expert read from topk_ids), and GEMM 2 puts a token's
slots on the grid's second axis and adds their weighted outputs in fp32, in slot order, in the last program of each
tile (fp8_gemm.split_k_sum), so the slot sum is its epilogue; with block scales GEMM 2 also quantizes the
intermediate itself (each program its pair's row, one group per K step, bit for bit per_token_group_quant_fp8's
result): two launches instead of five.

With block scales, a table entry holding "WS" runs the sorted list's two GEMMs on TMA descriptors instead
(`_moe_fp8_ws`): x is quantized straight into the list's order first, GEMM 1 keeps the intermediate in that order
and GEMM 2 reads it block by block, so every A and B tile is one descriptor box and Triton can split the K loop
into a producer warp group (the TMA loads) and two consumer groups (the wgmma and the per-K-block scaled sums);
the same products and sums as the pointer GEMMs, K block by K block. GEMM 2 may walk GEMM 1's list in smaller
blocks (its BLOCK_M dividing GEMM 1's; blocks of padding only are skipped). Off unless an entry asks for it.
Triton (3.6, H100) splits only some of these loops correctly; `fp8_gemm.ws_split` says which are split (GEMM 2 on
64-row blocks), the others run as plain pipelined loops on the same descriptors. Measured on an H100 at M = 1024 and
4096, this layer is 1.3-1.4x slower than the pointer GEMMs' (BENCHMARKS.md), so no shipped entry asks for it.

A single-token entry holding "ONE_LAUNCH" (block scales) runs the unsorted pairs' two GEMMs in one launch
(`_moe_fp8_one_launch`): GEMM 1's programs first, then GEMM 2's, each of which waits on a counter until its pair's
intermediate row is stored, so the second GEMM starts while the first one drains; the same bits as the two launches.

`fused_moe_fp8_ref` loops over experts in PyTorch with the same activation quantization, so kernel and reference
agree to rounding. Running on CPU (Triton's interpreter) and block configurations: see kernels/fp8_gemm.py; the
configurations here are in `configs/fp8_moe.json` under shape keys "E=..,I=..,H=..,block|channel", one config for
both GEMMs, or GEMM 2's own under "GEMM2" (with another BLOCK_M, GEMM 2 walks a padded list of its own).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import fp8_gemm, fp8_gluon
from .fp8_gemm import (
    ACT_DTYPES,
    CONFIG_KEYS,
    FP8_DTYPE,
    INTERPRETED,
    SCALE_EPS,
    check_device,
    device_key,
    grouped_pid,
    load_config_table,
    out_mantissa_bits,
    pdl_enter,
    per_token_group_quant_fp8,
    per_token_group_quant_fp8_ref,
    per_token_group_quant_fp8_rows,
    per_token_quant_fp8,
    per_token_quant_fp8_ref,
    prefetch_rows,
    quant_groups,
    quant_row_operand,
    round_to_out_grid,
    select_config,
    split_k_sum,
    split_k_workspace,
    triton_kernel,
    w8a8_block_fp8_matmul_ref,
    w8a8_channel_fp8_matmul_ref,
)

SCHEMES = ("block", "channel")
# single-token steps (up to this many tokens) take the pairs unsorted, one a row block (PAIRS), and GEMM 2 adds each
# token's slots: the sort and the slot sum (two launches of a few microseconds) go. A token's slots name distinct
# experts, so no weight is read twice; from two tokens on, the sorted list reads an expert that several tokens share
# once, where pairs would read it once per pair (decode with a real router shares many: 16 experts for the 32 pairs
# of 4 tokens), and the sorted list wins (H200: 124 against 131 us at 4 tokens, 45 against 51 us at one)
PAIRS_MAX_TOKENS = 1
# there, with block scales, GEMM 2 quantizes the intermediate itself (each program its pair's row, a group per K
# step: the same bits per_token_group_quant_fp8 makes, one launch fewer)
QUANT_IN_GEMM = True
# sorted lists, block scales, a column tile of one scale block (BLOCK_N = 128): GEMM 1's epilogue writes the
# intermediate as GEMM 2's FP8 A and scales (QUANT_OUT; bf16 or fp32 activations: an fp16 intermediate's range would
# differ), the quantization launch and the 16-bit intermediate's write and read saved, the same bits
QUANT_OUT_GEMM = False  # measured slower: at M = 4096 on an H100 GEMM 1 took 250 us more than the 50 us it saves
SCALE_BLOCK = 128  # weight_scale_inv tiles and activation groups of the block scheme

# Up to this many (token, slot) pairs the alignment runs as one Triton program (`_align_small`); past it, as three
# launches over chunks of 256 pairs (`_align_chunked`: counts, offsets in one program, places), or with ALIGN_CHUNKED
# off as `_align`'s ~15 small torch kernels. One program sorts all its pairs in registers (a bitonic sort over the
# next power of two), so its time grows with the pairs; the chunked form's hardly does. H200, CUDA-graph replays,
# E = 256, top-8: one program 4.1 us at 64 pairs, 6.5-7.4 at 512, 13.3-14.1 at 768 and 1024, 37-38 at 2048; chunked
# 6.6, 8.7-9.1, 8.7-9.0 and 8.7-8.9; torch 48-83 us at any size. So one program up to 512 pairs (M = 64 at top-8).
# Chunked against torch on the whole layer (bit for bit the same): 2.5-9.5% faster at M = 1024-4096 on an H100 and
# an H200 (evals/results/fp8_moe_prefill-2026-12-06-NVIDIA_H100_H200/).
ALIGN_KERNEL_MAX_PAIRS = 512
ALIGN_CHUNKED = True


# --------------------------------------------------------------------------------------------------------------------
# routing: (token, slot) pairs grouped by expert


def _align(topk_ids: torch.Tensor, block_m: int,
           num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """moe_align_block_size without a host sync: the padded list in a buffer sized for the worst case.

    Returns (sorted_token_ids int32 [P_max], expert_ids int32 [P_max / block_m], P int32 [1] on the device). Entries
    at and past P hold the sentinel; blocks at and past P / block_m are to be skipped. P_max bounds P: each expert
    that has pairs pads fewer than block_m of them, and at most min(M*topk, E) experts have pairs. No sync, so the
    MoE can be captured in a CUDA graph, and at decode sizes a round trip to the host would cost more than the GEMMs.
    """
    numel = topk_ids.numel()
    device = topk_ids.device
    p_max = (numel // block_m + min(numel, num_experts)) * block_m
    flat = topk_ids.reshape(-1)  # [M*topk]
    key = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)  # unrouted pairs sort last
    sorted_keys, order = torch.sort(key, stable=True)  # [M*topk] each: experts ascending, pair order kept within
    bounds = torch.searchsorted(sorted_keys, torch.arange(num_experts + 1, device=device, dtype=key.dtype))  # [E+1]
    counts = bounds[1:] - bounds[:-1]  # [E]
    padded = torch.div(counts + (block_m - 1), block_m, rounding_mode="floor") * block_m  # [E]
    end_padded = torch.cumsum(padded, 0)  # [E]
    # a routed pair's place: its expert's padded start plus its rank among that expert's pairs; unrouted pairs go
    # to a spare slot at p_max, cut off below
    shift = torch.cat((end_padded - padded - bounds[:-1], end_padded.new_zeros(1)))  # [E+1]
    dest = torch.where(sorted_keys < num_experts, shift[sorted_keys] + torch.arange(numel, device=device), p_max)
    sorted_token_ids = torch.full((p_max + 1,), numel, dtype=torch.int32, device=device)  # [P_max + 1]
    sorted_token_ids.scatter_(0, dest, order.to(torch.int32))
    block_starts = torch.arange(0, p_max, block_m, device=device)  # [P_max / block_m]
    expert_ids = torch.searchsorted(end_padded, block_starts, right=True).to(torch.int32)  # E past the end
    return sorted_token_ids[:p_max], expert_ids, end_padded[-1:].to(torch.int32)


def _pair_keys(ids_ptr, pair, numel, topk, num_experts, stride_im, stride_ik):
    """The alignment kernels' sort keys of flattened pairs t * topk + s: the expert id, or num_experts for a pair
    routed nowhere (an id outside [0, E)) and for lanes past numel; int32 like `pair`."""
    valid = pair < numel
    ids = tl.load(ids_ptr + (pair // topk) * stride_im + (pair % topk) * stride_ik, mask=valid, other=0)
    return tl.where(valid & (ids >= 0) & (ids < num_experts), ids, num_experts).to(tl.int32)


pair_keys = triton_kernel(_pair_keys)


def _align_small_kernel(
    ids_ptr,  # [M, topk] int expert ids (any integer dtype, any strides)
    sorted_token_ids_ptr,  # int32 [P_max] out
    expert_ids_ptr,  # int32 [P_max / BLOCK_M] out
    total_ptr,  # int32 [1] out: P
    shift_ptr,  # int32 [E_PAD] scratch: per expert, padded start minus start among the sorted pairs
    numel, topk, num_experts, p_max,
    stride_im, stride_ik,
    BLOCK_M: tl.constexpr,  # the GEMMs' row block: each expert's run is padded to a multiple of it
    PAIRS: tl.constexpr,  # a power of two >= numel
    E_PAD: tl.constexpr,  # a power of two > num_experts: bins 0..E-1 for the experts, E for unrouted pairs
    NB_PAD: tl.constexpr,  # a power of two > P_max / BLOCK_M, for any numel <= PAIRS
    FILL_END: tl.constexpr, FILL: tl.constexpr,  # FILL_END >= P_max for any numel <= PAIRS; sentinel-fill chunk
):
    """`_align` in one program, no loop over experts; the same outputs, element for element."""
    sentinel = numel
    # every entry of the padded list starts as the sentinel; the routed pairs overwrite theirs after the barrier
    for q0 in range(0, FILL_END, FILL):
        q = q0 + tl.arange(0, FILL)
        tl.store(sorted_token_ids_ptr + q, tl.full([FILL], 0, tl.int32) + sentinel, mask=q < p_max)

    pair = tl.arange(0, PAIRS)  # [PAIRS] flattened index t * topk + s
    key = pair_keys(ids_ptr, pair, numel, topk, num_experts, stride_im, stride_ik)  # [PAIRS] unrouted: bin E

    expert = tl.arange(0, E_PAD)  # [E_PAD]
    counts = tl.where(expert < num_experts, tl.histogram(key, E_PAD), 0)  # [E_PAD] pairs per expert
    padded = (counts + (BLOCK_M - 1)) // BLOCK_M * BLOCK_M  # [E_PAD]
    end_padded = tl.cumsum(padded, 0)  # [E_PAD]
    # the destination of an expert's r-th pair is its padded start + r = shift[e] + (its place among sorted pairs)
    tl.store(shift_ptr + expert, end_padded - padded - (tl.cumsum(counts, 0) - counts))
    tl.store(total_ptr, tl.sum(padded, 0))

    # expert_ids[b] = searchsorted(end_padded, b * BLOCK_M, right=True) = #experts whose padded run ends at or before
    # block b: a histogram of the run ends (in blocks), summed up; lanes past E go to a bin past every block
    block = tl.arange(0, NB_PAD)  # [NB_PAD]
    ends = tl.where(expert < num_experts, end_padded // BLOCK_M, NB_PAD - 1)  # [E_PAD], all < NB_PAD
    expert_of_block = tl.cumsum(tl.histogram(ends, NB_PAD), 0)  # [NB_PAD]
    tl.store(expert_ids_ptr + block, expert_of_block, mask=block < p_max // BLOCK_M)

    # pairs by (expert, pair index): one sort of unique keys, so pairs of an expert keep their order
    order = tl.sort(key * PAIRS + pair)  # [PAIRS]
    key_sorted = order // PAIRS
    tl.debug_barrier()  # the sentinels and shift[] are in memory for every thread
    shift = tl.load(shift_ptr + key_sorted)  # [PAIRS] (key E reads the unused bin E)
    tl.store(sorted_token_ids_ptr + shift + pair, order % PAIRS, mask=key_sorted < num_experts)


_align_small_op = triton_kernel(_align_small_kernel)


def _align_small(topk_ids: torch.Tensor, block_m: int,
                 num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_align` as one Triton launch (any number of pairs; `_route` picks it up to ALIGN_KERNEL_MAX_PAIRS)."""
    numel = topk_ids.numel()
    device = topk_ids.device
    p_max = (numel // block_m + min(numel, num_experts)) * block_m
    # at least 128 lanes (4 warps of 32 threads) in every histogram, so that no lane is held by two threads
    pairs = max(triton.next_power_of_2(numel), 128)
    e_pad = max(triton.next_power_of_2(num_experts + 1), 128)
    p_bound = (pairs // block_m + min(pairs, num_experts)) * block_m  # >= p_max; a bound per compiled variant
    nb_pad = max(triton.next_power_of_2(p_bound // block_m + 1), 32)  # a bin per lane of a warp, at least
    fill = min(triton.next_power_of_2(p_bound), 1024)
    sorted_token_ids = torch.empty((p_max,), dtype=torch.int32, device=device)
    expert_ids = torch.empty((p_max // block_m,), dtype=torch.int32, device=device)
    total = torch.empty((1,), dtype=torch.int32, device=device)
    shift = torch.empty((e_pad,), dtype=torch.int32, device=device)
    _align_small_op[(1,)](
        topk_ids, sorted_token_ids, expert_ids, total, shift,
        numel, topk_ids.shape[1], num_experts, p_max, topk_ids.stride(0), topk_ids.stride(1),
        BLOCK_M=block_m, PAIRS=pairs, E_PAD=e_pad, NB_PAD=nb_pad, FILL_END=triton.cdiv(p_bound, fill) * fill,
        FILL=fill, num_warps=4,
    )
    return sorted_token_ids, expert_ids, total


def _align_count_kernel(
    ids_ptr,  # [M, topk] int expert ids (any integer dtype, any strides)
    counts_ptr,  # int32 [chunks, E_PAD] out: each chunk's pairs per expert (bin E: unrouted)
    sorted_token_ids_ptr,  # int32 [P_max] out: this program's span of it set to the sentinel
    numel, topk, num_experts, p_max, span,
    stride_im, stride_ik,
    CHUNK: tl.constexpr, E_PAD: tl.constexpr, FILL: tl.constexpr,
):
    """`_align_chunked`, step 1 of 3: one program a chunk of CHUNK pairs counts them per expert, and sets its
    span of the padded list to the sentinel (numel)."""
    c = tl.program_id(0)
    key = pair_keys(ids_ptr, c * CHUNK + tl.arange(0, CHUNK), numel, topk, num_experts, stride_im, stride_ik)
    tl.store(counts_ptr + c * E_PAD + tl.arange(0, E_PAD), tl.histogram(key, E_PAD))
    end = (c + 1) * span
    for q0 in range(c * span, end, FILL):
        q = q0 + tl.arange(0, FILL)
        tl.store(sorted_token_ids_ptr + q, tl.full([FILL], 0, tl.int32) + numel, mask=(q < p_max) & (q < end))


def _align_offsets_kernel(
    counts_ptr,  # int32 [chunks, E_PAD]: step 1's counts
    shift_ptr,  # int32 [chunks, E_PAD] out: a chunk's r-th pair in sorted (expert, index) order goes to shift + r
    expert_ids_ptr,  # int32 [P_max / BLOCK_M] out
    total_ptr,  # int32 [1] out: P
    chunks, num_experts, p_max,
    BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, CG: tl.constexpr, NB_PAD: tl.constexpr,
):
    """Step 2 of 3, one program: each expert's padded run (as `_align`: experts ascending, runs padded to
    BLOCK_M), the expert of each row block, P, and for each chunk and expert where its pairs start."""
    expert = tl.arange(0, E_PAD)
    live = expert < num_experts
    totals = tl.zeros([E_PAD], dtype=tl.int32)
    for c0 in range(0, chunks, CG):  # pass 1: pairs per expert
        rows = c0 + tl.arange(0, CG)
        tile = tl.load(counts_ptr + rows[:, None] * E_PAD + expert[None, :], mask=(rows < chunks)[:, None], other=0)
        totals += tl.sum(tile, 0)
    totals = tl.where(live, totals, 0)
    padded = (totals + (BLOCK_M - 1)) // BLOCK_M * BLOCK_M  # [E_PAD]
    end_padded = tl.cumsum(padded, 0)
    tl.store(total_ptr, tl.sum(padded, 0))
    block = tl.arange(0, NB_PAD)  # expert_ids: as in _align_small_kernel
    ends = tl.where(live, end_padded // BLOCK_M, NB_PAD - 1)
    tl.store(expert_ids_ptr + block, tl.cumsum(tl.histogram(ends, NB_PAD), 0), mask=block < p_max // BLOCK_M)
    # pass 2: a chunk's pairs of expert e start at e's padded start plus the earlier chunks' pairs of e; in the
    # chunk's sorted order they start at its pairs of experts below e, which the shift takes off
    running = end_padded - padded  # [E_PAD]
    for c0 in range(0, chunks, CG):
        rows = c0 + tl.arange(0, CG)
        m = (rows < chunks)[:, None] & (expert[None, :] < E_PAD)
        tile = tl.load(counts_ptr + rows[:, None] * E_PAD + expert[None, :], mask=m, other=0)  # [CG, E_PAD]
        routed = tl.where(live[None, :], tile, 0)
        start = running[None, :] + tl.cumsum(routed, 0) - routed  # [CG, E_PAD]
        below = tl.cumsum(tile, 1) - tile  # pairs of smaller keys in the chunk
        tl.store(shift_ptr + rows[:, None] * E_PAD + expert[None, :], start - below, mask=m)
        running += tl.sum(routed, 0)


def _align_place_kernel(
    ids_ptr, shift_ptr, sorted_token_ids_ptr,
    numel, topk, num_experts,
    stride_im, stride_ik,
    CHUNK: tl.constexpr, E_PAD: tl.constexpr,
):
    """Step 3 of 3: a chunk's pairs sorted by (expert, index) and written at their places."""
    c = tl.program_id(0)
    local = tl.arange(0, CHUNK)
    key = pair_keys(ids_ptr, c * CHUNK + local, numel, topk, num_experts, stride_im, stride_ik)
    order = tl.sort(key * CHUNK + local)  # [CHUNK] unique keys: an expert's pairs keep their order
    key_sorted = order // CHUNK
    shift = tl.load(shift_ptr + c * E_PAD + key_sorted)
    tl.store(sorted_token_ids_ptr + shift + local, c * CHUNK + order % CHUNK, mask=key_sorted < num_experts)


_align_count = triton_kernel(_align_count_kernel)
_align_offsets = triton_kernel(_align_offsets_kernel)
_align_place = triton_kernel(_align_place_kernel)
ALIGN_CHUNK = 256  # pairs a program in _align_chunked's steps 1 and 3


def _align_chunked(topk_ids: torch.Tensor, block_m: int,
                   num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_align` in three Triton launches over chunks of ALIGN_CHUNK pairs (count, offsets, place): the same outputs,
    element for element, for any number of pairs."""
    numel = topk_ids.numel()
    device = topk_ids.device
    p_max = (numel // block_m + min(numel, num_experts)) * block_m
    chunks = triton.cdiv(numel, ALIGN_CHUNK)
    e_pad = max(triton.next_power_of_2(num_experts + 1), 128)
    nb_pad = max(triton.next_power_of_2(p_max // block_m + 1), 32)
    fill = 256
    span = triton.cdiv(triton.cdiv(p_max, chunks), fill) * fill
    sorted_token_ids = torch.empty((p_max,), dtype=torch.int32, device=device)
    expert_ids = torch.empty((p_max // block_m,), dtype=torch.int32, device=device)
    total = torch.empty((1,), dtype=torch.int32, device=device)
    counts = torch.empty((chunks, e_pad), dtype=torch.int32, device=device)
    shift = torch.empty((chunks, e_pad), dtype=torch.int32, device=device)
    strides = (topk_ids.stride(0), topk_ids.stride(1))
    _align_count[(chunks,)](topk_ids, counts, sorted_token_ids, numel, topk_ids.shape[1], num_experts, p_max, span,
                            *strides, CHUNK=ALIGN_CHUNK, E_PAD=e_pad, FILL=fill, num_warps=4)
    _align_offsets[(1,)](counts, shift, expert_ids, total, chunks, num_experts, p_max, BLOCK_M=block_m, E_PAD=e_pad,
                         CG=16, NB_PAD=nb_pad, num_warps=4)  # 4 warps: no histogram lane held twice (_align_small)
    _align_place[(chunks,)](topk_ids, shift, sorted_token_ids, numel, topk_ids.shape[1], num_experts, *strides,
                            CHUNK=ALIGN_CHUNK, E_PAD=e_pad, num_warps=4)
    return sorted_token_ids, expert_ids, total


def _route(topk_ids: torch.Tensor, block_m: int,
           num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_align`'s result: one Triton program for up to ALIGN_KERNEL_MAX_PAIRS pairs, else three over chunks
    (ALIGN_CHUNKED) or the torch kernels."""
    if 0 < topk_ids.numel() <= ALIGN_KERNEL_MAX_PAIRS:
        return _align_small(topk_ids, block_m, num_experts)
    if ALIGN_CHUNKED and topk_ids.numel():
        return _align_chunked(topk_ids, block_m, num_experts)
    return _align(topk_ids, block_m, num_experts)


def moe_align_block_size(topk_ids: torch.Tensor, block_m: int,
                         num_experts: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Group the flattened (token, slot) pairs by expert, each group padded to a multiple of block_m.

    topk_ids [M, topk] int -> (sorted_token_ids int32 [P], expert_ids int32 [P / block_m], P), where
    sorted_token_ids holds flattened indices t * topk + s, expert by expert in increasing order (pairs of one expert
    in increasing index order), each expert's run followed by the sentinel M * topk up to a multiple of block_m;
    expert_ids[b] is the expert of block b. Experts with no pairs take no block; ids outside [0, E) are dropped.
    Torch operations only (no loop over experts); one host sync, for P (fused_moe_fp8 uses the sync-free form).
    """
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [M, topk], got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise ValueError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
    if block_m < 1:
        raise ValueError(f"block_m must be positive, got {block_m}")
    sorted_token_ids, expert_ids, total = _route(topk_ids, block_m, num_experts)
    total = int(total.item())
    return sorted_token_ids[:total], expert_ids[:total // block_m], total


# --------------------------------------------------------------------------------------------------------------------
# the grouped GEMM


def _pair_rows(expert_ids_ptr, pid_m, pid_s, num_valid_tokens, cols, A_ROW_DIV: tl.constexpr,
               SLOT_SUM: tl.constexpr, NUM_EXPERTS: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_K: tl.constexpr = 1):
    """The unsorted pairs' row block pid_m (PAIRS): one pair, in the block's first row. GEMM 1: pair pid_m, C row
    pid_m; GEMM 2 (SLOT_SUM slots, SPLIT_K programs a slot: pid_s // SPLIT_K the slot): pair pid_m * SLOT_SUM +
    slot, C row = token pid_m. Returns
    (pair, C rows int64 [BLOCK_M], their mask, A rows int64 [BLOCK_M], the expert from topk_ids at expert_ids_ptr
    clamped into [0, NUM_EXPERTS), and `routed` shaped like cols: whether the id was in range, so that a slot routed
    nowhere reads no weight and adds zeros)."""
    pair = pid_m * SLOT_SUM + pid_s // SPLIT_K if SLOT_SUM else pid_m
    r = tl.arange(0, BLOCK_M)
    rows = pid_m + 0 * r
    tok_mask = (r == 0) & (rows < num_valid_tokens)
    a_rows = (pair // A_ROW_DIV + 0 * r).to(tl.int64)
    expert = tl.load(expert_ids_ptr + pair).to(tl.int64)
    ex = expert + 0 * cols  # (the interpreter cannot mask with a scalar condition and'ed in)
    routed = (ex >= 0) & (ex < NUM_EXPERTS)
    expert = tl.minimum(tl.maximum(expert, 0), NUM_EXPERTS - 1)
    return pair, rows.to(tl.int64), tok_mask, a_rows, expert, routed


pair_rows = triton_kernel(_pair_rows)


def _expert_ahead(expert_ids_ptr, pid_m, pid_s, SLOT_SUM: tl.constexpr, SPLIT_K: tl.constexpr,
                  NUM_EXPERTS: tl.constexpr):
    """The expert of a decode GEMM 2 program's pair (as pair_rows finds it), read before the program's PDL wait to
    prefetch its rows: GEMM 2 launches once every program of GEMM 1 has passed its wait, so the router that wrote
    topk_ids has finished (read through L2: .cg); clamped into [0, NUM_EXPERTS), a stale id would only prefetch
    another expert's rows."""
    expert = tl.load(expert_ids_ptr + pid_m * SLOT_SUM + pid_s // SPLIT_K, cache_modifier=".cg")
    return tl.minimum(tl.maximum(expert.to(tl.int64), 0), NUM_EXPERTS - 1)


expert_ahead = triton_kernel(_expert_ahead)


def _block_rows(sorted_token_ids_ptr, expert_ids_ptr, pid_m, num_valid_tokens, BLOCK_M: tl.constexpr,
                DENSE: tl.constexpr):
    """Row block pid_m's rows (pair indices of the sorted list, whose padding holds the sentinel num_valid_tokens;
    DENSE: rows of A in order), their mask, the rows as int64, and the block's expert (DENSE: 0)."""
    if DENSE:
        offs_tok = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        expert = (pid_m * 0).to(tl.int64)
    else:
        offs_tok = tl.load(sorted_token_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    return offs_tok, offs_tok < num_valid_tokens, offs_tok.to(tl.int64), expert


block_rows = triton_kernel(_block_rows)


def _q8_blocks(v):
    """fp32 v [R, G, 32] -> (codes [R, G, 32] as fp32 integers, scales [R, G]): per block of 32, d = amax / 127 and
    codes round(v / d) half away from zero, 1 / d taken first (ggml's Q8_1; kernels/gguf_gemv_q8.py's activations)."""
    amax = tl.max(tl.abs(v), axis=2)
    d = tl.math.div_rn(amax, 127.0)
    inv = tl.where(d > 0, tl.math.div_rn(1.0, tl.where(d > 0, d, 1.0)), 0.0)
    t = v * inv[:, :, None]
    q = tl.floor(tl.abs(t) + 0.5)
    return tl.where(t < 0, -q, q), d


q8_blocks = triton_kernel(_q8_blocks)


def _gemv_store(acc, c_ptr, csum_ptr, topk_weights_ptr, part_ptr, count_ptr, pid, pid_s, pid_n, pair, offs_tok64,
                tok_mask, N, num_valid_tokens, stride_cm, GATED: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr, SLOT_SUM: tl.constexpr,
                SPLIT_K: tl.constexpr, OUT_MANT: tl.constexpr, SUMS_OUT: tl.constexpr, Q8_OUT: tl.constexpr = False):
    """The CUDA-core GEMV kernels' epilogue (kernels/gguf_gemm.py, kernels/w4a16_moe.py's GEMV and rows paths): acc
    [BLOCK_M, ROWS] fp32 sums of the program's weight rows (GATED: BLOCK_N gate rows, then BLOCK_N up rows) ->
    silu(gate) * up; SLOT_SUM: times the pair's router weight, the token's slots added in slot order (split_k_sum);
    SPLIT_K: the K shares added (with SLOT_SUM, each slot's shares in turn); MUL_ROUTED_WEIGHT (sorted list): times
    each row's router weight. Stores C's tile [BLOCK_M, BLOCK_N] and, SUMS_OUT > 0, the sums of each SUMS_OUT stored
    values of a row (the next GEMV's group sums). GATED with SPLIT_K > 1: the raw gate and up sums are added up first
    (partials [SPLIT_K, rows, 2N], the gate columns then the up ones), the gating is the last program's. Q8_OUT:
    the tile as kernels/gguf_gemv_q8.q8_prep would make it of the fp32 values (int8 codes into c, per 32 columns
    the scale and the scale times the codes' sum into csum_ptr [2, num_valid_tokens, N / 32]; BLOCK_N a multiple
    of 32): the next GEMV's 8-bit activations without a launch of their own."""
    last = True
    if GATED and SPLIT_K > 1 and not SLOT_SUM:
        offs_raw = tl.arange(0, 2 * BLOCK_N)
        col = pid_n * BLOCK_N + offs_raw % BLOCK_N  # [2 BLOCK_N] output column of each gate / up sum
        raw_mask = tok_mask[:, None] & (col < N)[None, :]
        acc, last = split_k_sum(acc, part_ptr, count_ptr + pid, pid_s, offs_tok64,
                                ((offs_raw // BLOCK_N) * N + col).to(tl.int64), raw_mask, num_valid_tokens, 2 * N,
                                SPLIT_K)
    if GATED:
        acc3 = tl.reshape(acc, (BLOCK_M, 2, BLOCK_N))
        half = tl.arange(0, 2)[None, :, None]
        gate = tl.sum(tl.where(half == 0, acc3, 0.0), axis=1)
        up = tl.sum(tl.where(half == 1, acc3, 0.0), axis=1)
        out = gate * tl.sigmoid(gate) * up  # [BLOCK_M, BLOCK_N], in fp32
    else:
        out = acc
    offs_out = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = tok_mask[:, None] & (offs_out < N)[None, :]
    if SLOT_SUM:  # with SPLIT_K, every share of every slot leaves a partial: pid_s = slot * SPLIT_K + share
        out = out * tl.load(topk_weights_ptr + pair)
        if SLOT_SUM * SPLIT_K > 1:
            out, last = split_k_sum(out, part_ptr, count_ptr + pid, pid_s, offs_tok64, offs_out.to(tl.int64),
                                    c_mask, num_valid_tokens, N, SLOT_SUM * SPLIT_K)
    elif SPLIT_K > 1 and not GATED:  # partials [SPLIT_K, rows, N], added in split order by the tile's last program
        out, last = split_k_sum(out, part_ptr, count_ptr + pid, pid_s, offs_tok64, offs_out.to(tl.int64), c_mask,
                                num_valid_tokens, N, SPLIT_K)
    if last:
        if MUL_ROUTED_WEIGHT and not SLOT_SUM:
            out = out * tl.load(topk_weights_ptr + offs_tok64, mask=tok_mask, other=0.0)[:, None]
        if Q8_OUT:  # q8_prep's quantizer (the same bits)
            q, d = q8_blocks(tl.reshape(out, (BLOCK_M, BLOCK_N // 32, 32)))  # [BLOCK_M, BLOCK_N / 32, 32], [.., ..]
            tl.store(c_ptr + offs_tok64[:, None] * stride_cm + offs_out[None, :],
                     tl.reshape(q, (BLOCK_M, BLOCK_N)).to(tl.int8), mask=c_mask)
            G32: tl.constexpr = BLOCK_N // 32
            offs_g32 = pid_n * G32 + tl.arange(0, G32)
            g_mask = tok_mask[:, None] & (offs_g32 < N // 32)[None, :]
            ds_ptrs = csum_ptr + offs_tok64[:, None] * (N // 32) + offs_g32[None, :]
            tl.store(ds_ptrs, d, mask=g_mask)
            tl.store(ds_ptrs + num_valid_tokens * (N // 32), d * tl.sum(q, axis=2), mask=g_mask)
        else:
            if OUT_MANT:  # the interpreter's fp32 -> bf16 cast truncates: round to nearest even first
                out = round_to_out_grid(out, OUT_MANT)
            stored = out.to(c_ptr.dtype.element_ty)
            tl.store(c_ptr + offs_tok64[:, None] * stride_cm + offs_out[None, :], stored, mask=c_mask)
            if SUMS_OUT:  # whole groups of the stored values (the launchers check the tiling)
                G: tl.constexpr = BLOCK_N // SUMS_OUT
                sums = tl.sum(tl.reshape(stored.to(tl.float32), (BLOCK_M, G, SUMS_OUT)), axis=2)  # [BLOCK_M, G]
                offs_g = pid_n * G + tl.arange(0, G)
                tl.store(csum_ptr + offs_tok64[:, None] * (N // SUMS_OUT) + offs_g[None, :], sums,
                         mask=tok_mask[:, None] & (offs_g < N // SUMS_OUT)[None, :])


gemv_store = triton_kernel(_gemv_store)


def _pick4(i: tl.constexpr, v0, v1, v2, v3):
    """v_i, i a compile-time constant (a static_range index picking one of four tensors)."""
    if i == 0:
        out = v0
    elif i == 1:
        out = v1
    elif i == 2:
        out = v2
    else:
        out = v3
    return out


pick4 = triton_kernel(_pick4)


def _moe_fp8_program(
    pid, pid_m, pid_n, pid_s, a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, cs_ptr, topk_weights_ptr, sorted_token_ids_ptr,
    expert_ids_ptr, num_tokens_post_padded_ptr, part_ptr, count_ptr, N, num_valid_tokens, num_pid_m, q_eps,
    stride_am, stride_ak, stride_asm, stride_ask, stride_be, stride_bn, stride_bk, stride_bse, stride_bsn,
    stride_bsk, stride_cm, stride_cn, stride_csm, K: tl.constexpr, A_ROW_DIV: tl.constexpr, GATED: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr, BLOCK_SCALED: tl.constexpr, GROUP_N: tl.constexpr, GROUP_K: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, OUT_MANT: tl.constexpr, PAIRS: tl.constexpr = False, SLOT_SUM: tl.constexpr = 0,
    NUM_EXPERTS: tl.constexpr = 0, QUANT_A: tl.constexpr = False, B_SCALE_TILE: tl.constexpr = False,
    QUANT_OUT: tl.constexpr = False, INTER_BF16: tl.constexpr = True, SPLIT_K: tl.constexpr = 1,
    PDL: tl.constexpr = False,
):
    """One program of one GEMM of the layer (tile pid, row block pid_m, column block pid_n; pid_s: its K share, or
    with SLOT_SUM its slot and share), the other arguments as _fused_moe_fp8_kernel documents them: that kernel's
    programs, and each half of _moe_fp8_one_launch_kernel's."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    n_mask = offs_n < N
    share = 0  # of K, SPLIT_K > 1
    if PDL and (PDL & 4) == 0 and PAIRS and SLOT_SUM and not GATED:  # GEMM 2: its pair's expert rows, a line of
        # 128 codes at a time
        p_expert = expert_ahead(expert_ids_ptr, pid_m, pid_s, SLOT_SUM, SPLIT_K, NUM_EXPERTS)
        P_KB: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K // SPLIT_K
        prefetch_rows(b_ptr + p_expert * stride_be + tl.minimum(offs_n, N - 1).to(tl.int64) * stride_bn,
                      (pid_s % SPLIT_K) * P_KB * BLOCK_K, K, stride_bk, P_KB * BLOCK_K, 128)
    pdl_enter(PDL)  # every operand but the weights is the previous kernels' output, and the experts are too
    if PAIRS:
        pair, offs_tok64, tok_mask, a_rows, expert, routed = pair_rows(
            expert_ids_ptr, pid_m, pid_s, num_valid_tokens, offs_n, A_ROW_DIV, SLOT_SUM, NUM_EXPERTS, BLOCK_M,
            SPLIT_K)
        if SPLIT_K > 1:
            share = pid_s % SPLIT_K
        n_mask = n_mask & routed
    else:
        # the grid covers the worst case; row blocks past the padded list's end have nothing to do
        if pid_m * BLOCK_M >= tl.load(num_tokens_post_padded_ptr):
            return
        offs_tok = tl.load(sorted_token_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M] pair indices
        tok_mask = offs_tok < num_valid_tokens  # padding holds the sentinel num_valid_tokens
        offs_tok64 = offs_tok.to(tl.int64)
        a_rows = offs_tok64 // A_ROW_DIV  # [BLOCK_M]
        # int64: E * 2I * H elements of w13 pass 2^31 at MiniMax-M2's size
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n64 = offs_n.to(tl.int64)
    KB_PER: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K // SPLIT_K  # the launcher makes SPLIT_K divide the blocks
    offs_kf = share * KB_PER * BLOCK_K + offs_k  # [BLOCK_K] the program's first K block
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_kf[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + expert * stride_be + offs_n64[None, :] * stride_bn + offs_kf[:, None] * stride_bk  # [BK, BN]
    as_ptrs = as_ptr + a_rows * stride_asm  # [BLOCK_M]
    if B_SCALE_TILE:
        tl.static_assert(BLOCK_SCALED and GROUP_N % BLOCK_N == 0)
        bs_ptrs = bs_ptr + expert * stride_bse + (pid_n * BLOCK_N // GROUP_N) * stride_bsn  # the tile's one scale
    elif BLOCK_SCALED:
        bs_ptrs = bs_ptr + expert * stride_bse + (offs_n // GROUP_N) * stride_bsn  # [BLOCK_N]
    else:
        bs_ptrs = bs_ptr + expert * stride_bse + offs_n64 * stride_bsn  # [BLOCK_N]
    if GATED:
        bu_ptrs = b_ptrs + N * stride_bn  # the up projection's rows, N further down
        if B_SCALE_TILE:
            bus_ptrs = bs_ptr + expert * stride_bse + ((pid_n * BLOCK_N + N) // GROUP_N) * stride_bsn
        elif BLOCK_SCALED:
            bus_ptrs = bs_ptr + expert * stride_bse + ((offs_n + N) // GROUP_N) * stride_bsn
        else:
            bus_ptrs = bs_ptrs + N * stride_bsn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATED:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if QUANT_A:  # the pair's row, a group ahead: its load in flight while the previous group is computed
        row_ptr = a_ptr + (pair // A_ROW_DIV).to(tl.int64) * stride_am + offs_kf * stride_ak  # [BLOCK_K]
        xr_next = tl.load(row_ptr)
    for i in range(0, KB_PER):
        kb = share * KB_PER + i
        if EVEN_K:
            a_mask = tok_mask[:, None]
            b_mask = n_mask[None, :]
        else:
            k_left = K - kb * BLOCK_K
            a_mask = tok_mask[:, None] & (offs_k[None, :] < k_left)
            b_mask = (offs_k[:, None] < k_left) & n_mask[None, :]
        b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        if QUANT_A:  # the pair's row, one group: quantized once, placed in the block's first row
            tl.static_assert(PAIRS and BLOCK_SCALED and BLOCK_K == GROUP_K and EVEN_K)
            xr = xr_next
            ahead = (i + 1) * BLOCK_K + offs_k < KB_PER * BLOCK_K  # this program's share of K only
            xr_next = tl.load(row_ptr + (i + 1) * BLOCK_K * stride_ak, mask=ahead, other=0.0)
            a, a_s_row = quant_row_operand(xr, q_eps, b_ptr.dtype.element_ty, BLOCK_M, UPCAST)
        else:
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        if UPCAST:  # the interpreter multiplies fp8 wrongly; on the GPU fp8 goes to the tensor cores as is
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if BLOCK_SCALED:
            k_group = (kb * BLOCK_K) // GROUP_K
            if QUANT_A:
                a_s = a_s_row
            else:
                a_s = tl.load(as_ptrs + k_group * stride_ask, mask=tok_mask, other=0.0)  # [BLOCK_M]
            if B_SCALE_TILE:
                acc += tl.dot(a, b) * (a_s * tl.load(bs_ptrs + k_group * stride_bsk))[:, None]
            else:
                b_s = tl.load(bs_ptrs + k_group * stride_bsk, mask=n_mask, other=0.0)  # [BLOCK_N]
                acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        else:
            acc += tl.dot(a, b)
        if GATED:
            bu = tl.load(bu_ptrs, mask=b_mask, other=0.0)
            if UPCAST:
                bu = bu.to(tl.float32)
            if B_SCALE_TILE:
                acc_up += tl.dot(a, bu) * (a_s * tl.load(bus_ptrs + k_group * stride_bsk))[:, None]
            elif BLOCK_SCALED:
                bu_s = tl.load(bus_ptrs + k_group * stride_bsk, mask=n_mask, other=0.0)
                acc_up += tl.dot(a, bu) * a_s[:, None] * bu_s[None, :]
            else:
                acc_up += tl.dot(a, bu)
            bu_ptrs += BLOCK_K * stride_bk
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if not BLOCK_SCALED:  # per-token x per-channel scales, once, after the fp32 sum
        a_s = tl.load(as_ptrs, mask=tok_mask, other=0.0)
        acc = acc * a_s[:, None] * tl.load(bs_ptrs, mask=n_mask, other=0.0)[None, :]
        if GATED:
            acc_up = acc_up * a_s[:, None] * tl.load(bus_ptrs, mask=n_mask, other=0.0)[None, :]
    if SPLIT_K > 1:  # PAIRS: the shares' fp32 sums added in split order by the tile's last program, which gates,
        # weighs, adds the slots and stores (gated: the raw gate and up sums, side by side)
        tl.static_assert(PAIRS and not QUANT_OUT)
        if GATED:
            both = tl.reshape(tl.permute(tl.join(acc, acc_up), (0, 2, 1)), (BLOCK_M, 2 * BLOCK_N))
        else:
            both = acc
        gemv_store(both, c_ptr, cs_ptr, topk_weights_ptr, part_ptr, count_ptr, pid, pid_s, pid_n, pair, offs_tok64,
                   tok_mask, N, num_valid_tokens, stride_cm, GATED, BLOCK_M, BLOCK_N, MUL_ROUTED_WEIGHT, SLOT_SUM,
                   SPLIT_K, OUT_MANT, 0)
    else:
        if GATED:
            acc = acc * tl.sigmoid(acc) * acc_up  # silu(gate) * up, in fp32
        if MUL_ROUTED_WEIGHT:
            if PAIRS:
                acc = acc * tl.load(topk_weights_ptr + pair)
            else:
                w = tl.load(topk_weights_ptr + offs_tok64, mask=tok_mask, other=0.0)  # [BLOCK_M]
                acc = acc * w[:, None]
        c_mask = tok_mask[:, None] & (offs_n < N)[None, :]
        last = True
        if SLOT_SUM > 1:  # partials [SLOT_SUM, M, N]
            acc, last = split_k_sum(acc, part_ptr, count_ptr + pid, pid_s, offs_tok64, offs_n64, c_mask,
                                    num_valid_tokens, N, SLOT_SUM)
        if QUANT_OUT:
            tl.static_assert(GATED and BLOCK_SCALED and BLOCK_N == GROUP_N and not PAIRS)
            if INTER_BF16:  # the value the 16-bit intermediate would hold
                if UPCAST:
                    acc = round_to_out_grid(acc, 7)
                else:
                    acc = acc.to(tl.bfloat16).to(tl.float32)
            acc, scale = quant_groups(acc, q_eps, UPCAST)  # [BLOCK_M, BLOCK_N], [BLOCK_M]
            tl.store(cs_ptr + offs_tok64 * stride_csm + pid_n, scale, mask=tok_mask)
        if last:
            if OUT_MANT:  # the interpreter's fp32 -> bf16 cast truncates: round to nearest even first
                acc = round_to_out_grid(acc, OUT_MANT)
            c_ptrs = c_ptr + offs_tok64[:, None] * stride_cm + offs_n64[None, :] * stride_cn
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


moe_fp8_program = triton_kernel(_moe_fp8_program)


def _fused_moe_fp8_kernel(
    a_ptr, as_ptr,  # A fp8 [rows, K] and its scales ([rows, K/GROUP_K] block, [rows, 1] channel)
    b_ptr, bs_ptr,  # B fp8 [E, N or 2N, K] and its scales ([E, ceil(.. /GROUP_N), K/GROUP_K] or [E, .., 1])
    c_ptr,  # C [M*topk, N]
    cs_ptr,  # QUANT_OUT: C's scales fp32 [M*topk, N / GROUP_N] (C being fp8)
    topk_weights_ptr,  # fp32 [M*topk]
    sorted_token_ids_ptr, expert_ids_ptr,  # int32 [P_max], [P_max / BLOCK_M]
    num_tokens_post_padded_ptr,  # int32 [1]: P, the padded list's length
    part_ptr, count_ptr,  # SLOT_SUM > 1: fp32 partial sums and int32 arrival counters (fp8_gemm.split_k_sum)
    N, num_valid_tokens, num_pid_m,
    q_eps,  # QUANT_A: the smallest amax a scale is made from (fp8_gemm.SCALE_EPS)
    stride_am, stride_ak, stride_asm, stride_ask,
    stride_be, stride_bn, stride_bk, stride_bse, stride_bsn, stride_bsk,
    stride_cm, stride_cn, stride_csm,
    K: tl.constexpr,  # a loop bound: triton 3.6's interpreter can't take a runtime int in range() under numpy >= 2.5
    A_ROW_DIV: tl.constexpr,  # GEMM 1: topk (row of x = pair index // topk); GEMM 2: 1
    GATED: tl.constexpr,  # GEMM 1: gate rows [0, N) and up rows [N, 2N) of B, epilogue silu(gate) * up
    MUL_ROUTED_WEIGHT: tl.constexpr,  # GEMM 2: multiply each row by its router weight
    BLOCK_SCALED: tl.constexpr, GROUP_N: tl.constexpr, GROUP_K: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, OUT_MANT: tl.constexpr,
    PAIRS: tl.constexpr = False,  # decode: no sorted list; program row block pid_m holds one pair (GEMM 1: pair
    # pid_m, C row pid_m) or one token's slot (GEMM 2, SLOT_SUM: pair pid_m * SLOT_SUM + slot, C row = token pid_m),
    # its expert read from topk_ids (at expert_ids_ptr); experts outside [0, NUM_EXPERTS) read nothing, add zeros
    SLOT_SUM: tl.constexpr = 0,  # PAIRS GEMM 2: axis 1 is the slot; the slots' weighted outputs are added in fp32 in
    # slot order by split_k_sum, so the slot sum is this launch's epilogue
    NUM_EXPERTS: tl.constexpr = 0,
    QUANT_A: tl.constexpr = False,  # PAIRS, block scales: A is the 16-bit intermediate, each K block of the pair's
    # row quantized here as per_token_group_quant_fp8 would (bit for bit), the separate launch saved
    B_SCALE_TILE: tl.constexpr = False,  # block scales, a column tile inside one scale block (BLOCK_N divides GROUP_N,
    # and N for GATED): one weight scale a K block for the whole tile, folded into the rows' scales, so the tile takes
    # one FMA an element a K block where a [BLOCK_N] vector of scales took a multiply more (and its loads)
    QUANT_OUT: tl.constexpr = False,  # sorted GEMM 1, block scales, BLOCK_N = GROUP_N: each row of the tile is one
    # 128-group of GEMM 2's A, written as FP8 codes and a scale, the bits per_token_group_quant_fp8 makes of the
    # 16-bit intermediate (rounded to INTER_BF16's grid first), its launch and the 16-bit round trip saved
    INTER_BF16: tl.constexpr = True,  # QUANT_OUT: the intermediate the separate path would store is bf16 (else fp32)
    SPLIT_K: tl.constexpr = 1,  # PAIRS: programs a tile (SLOT_SUM: a slot; pid_s = slot * SPLIT_K + share) along axis
    # 1, each over its share of the K blocks; their fp32 sums are added in the tile's last program (gemv_store)
    PDL: tl.constexpr = False,  # programmatic dependent launch (fp8_gemm.pdl_enter); PAIRS GEMM 2: the pair's
    # expert rows toward L2 first
):
    """One GEMM of the layer, a program a tile along axis 0 (row blocks grouped by GROUP_M) and a K share, or with
    SLOT_SUM a slot and share, along axis 1: moe_fp8_program."""
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_pid(pid, num_pid_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    moe_fp8_program(
        pid, pid_m, pid_n, tl.program_id(1),
        a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, cs_ptr, topk_weights_ptr, sorted_token_ids_ptr, expert_ids_ptr,
        num_tokens_post_padded_ptr, part_ptr, count_ptr, N, num_valid_tokens, num_pid_m, q_eps, stride_am, stride_ak,
        stride_asm, stride_ask, stride_be, stride_bn, stride_bk, stride_bse, stride_bsn, stride_bsk, stride_cm,
        stride_cn, stride_csm, K, A_ROW_DIV, GATED, MUL_ROUTED_WEIGHT, BLOCK_SCALED, GROUP_N, GROUP_K, EVEN_K,
        BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, UPCAST, OUT_MANT, PAIRS, SLOT_SUM, NUM_EXPERTS, QUANT_A, B_SCALE_TILE,
        QUANT_OUT, INTER_BF16, SPLIT_K, PDL)


_fused_moe_fp8 = triton_kernel(_fused_moe_fp8_kernel)


def _wait_count(flag, need, SLEEP: tl.constexpr, ASM: tl.constexpr):
    """Spin until the int32 counter at flag reaches need (the one-launch MoEs: a pair's GEMM 1 programs that have
    stored and counted themselves, each with a release), then acquire: their stores are seen from here on. SLEEP:
    back off between polls; ASM (compiled only): the acquire as a fence (an atomic's acquire is lost where its result
    goes unused: triton 3.6 makes it a reduction)."""
    seen = tl.load(flag, volatile=True)
    while seen < need:
        if SLEEP:  # a volatile load: L2, not an atomic
            seen = tl.inline_asm_elementwise("nanosleep.u32 200;\n\tld.volatile.global.b32 $0, [$1];", "=r,l",
                                             [flag], dtype=tl.int32, is_pure=False, pack=1)
        else:
            seen = tl.load(flag, volatile=True)
    if ASM:
        seen = tl.inline_asm_elementwise("fence.acq_rel.gpu;\n\tmov.u32 $0, $1;", "=r,r", [seen],
                                         dtype=tl.int32, is_pure=False, pack=1)


wait_count = triton_kernel(_wait_count)


def _moe_fp8_one_launch_kernel(
    x_ptr, xs_ptr,  # x fp8 [M, H] and its group scales [M, H/128] (the norm's quantization)
    b1_ptr, b1s_ptr,  # w13 fp8 [E, 2I, H] and its block scales [E, 2I/128, H/128]
    b2_ptr, b2s_ptr,  # w2 fp8 [E, H, I] and its block scales [E, H/128, I/128]
    inter_ptr, out_ptr,  # [M*topk, I] the 16-bit silu(gate) * up; [M, H] the layer's output
    topk_weights_ptr, ids_ptr,  # fp32 [M*topk]; topk_ids [M*topk]
    part1_ptr, count1_ptr, part2_ptr, count2_ptr,  # each GEMM's split-K (GEMM 2: slot) partials and arrival counters
    ready_ptr,  # int32, a counter a pair READY_STRIDE apart: GEMM 1's programs of the pair that have stored
    M, q_eps,
    stride_xm, stride_xsm, stride_b1e, stride_b1n, stride_b1se, stride_b1sn,
    stride_im, stride_b2e, stride_b2n, stride_b2se, stride_b2sn, stride_om,
    H: tl.constexpr, I: tl.constexpr, TOPK: tl.constexpr, NUM_EXPERTS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N1: tl.constexpr, BLOCK_N2: tl.constexpr, SPLIT1: tl.constexpr, SPLIT2: tl.constexpr,
    UPCAST: tl.constexpr, OUT_MANT: tl.constexpr,
    READY_STRIDE: tl.constexpr, SLEEP: tl.constexpr, ASM: tl.constexpr,  # inline PTX (compiled only)
):
    """The block-FP8 decode MoE's two GEMMs on unsorted pairs in one launch (ONE_LAUNCH), as the W4A16 decode's
    (w4a16_moe._moe_gemv_one_launch_kernel): programs [0, P1) are GEMM 1's (gate and up of a pair, silu * up into
    the 16-bit intermediate), pair by pair, then GEMM 2's (each of its programs quantizes its pair's row a group a K
    step, as the two-launch path's GEMM 2 does, and the slots are added by the token's last program) in the same pair
    order. A GEMM 2 program waits until every GEMM 1 program of its pair has stored and counted itself in
    ready[pair]; the GPU starts a launch's programs in index order, so every GEMM 1 program holds a slot before any
    GEMM 2 program takes one and no program waits on one not yet started. The second GEMM's ramp overlaps the first
    one's tail; the pair's last GEMM 2 program leaves its counter at zero. Each program is moe_fp8_program's, bit for
    bit the two launches' (BLOCK_M-row tiles, one pair in the first row; column tiles inside a scale block)."""
    pid = tl.program_id(0)
    pairs = M * TOPK
    N1T: tl.constexpr = I // BLOCK_N1  # GEMM 1's column tiles
    N2T: tl.constexpr = H // BLOCK_N2
    PER1: tl.constexpr = N1T * SPLIT1  # GEMM 1's programs a pair
    PER2: tl.constexpr = N2T * SPLIT2  # GEMM 2's programs a pair
    if pid < pairs * PER1:
        pair = pid // PER1
        pid_n = pid % N1T
        moe_fp8_program(
            pair * N1T + pid_n, pair, pid_n, (pid % PER1) // N1T,
            x_ptr, xs_ptr, b1_ptr, b1s_ptr, inter_ptr, inter_ptr, topk_weights_ptr, ids_ptr, ids_ptr, ids_ptr,
            part1_ptr, count1_ptr, I, pairs, pairs, q_eps, stride_xm, 1, stride_xsm, 1, stride_b1e, stride_b1n, 1,
            stride_b1se, stride_b1sn, 1, stride_im, 1, 0, H, TOPK, True, False, True, 128, 128, True, BLOCK_M, BLOCK_N1,
            128, 1, UPCAST, OUT_MANT, True, 0, NUM_EXPERTS, False, True, False, True, SPLIT1, False)
        tl.debug_barrier()  # every thread's stores are made before the arrival is counted (release, gpu scope)
        tl.atomic_add(ready_ptr + pair * READY_STRIDE, 1, sem="release")
    else:
        q = pid - pairs * PER1
        pair = q // PER2
        pid_n = q % N2T
        tok = pair // TOPK
        flag = ready_ptr + pair * READY_STRIDE
        wait_count(flag, PER1, SLEEP, ASM)  # GEMM 1's programs of the pair
        moe_fp8_program(
            tok * N2T + pid_n, tok, pid_n, (pair % TOPK) * SPLIT2 + (q % PER2) // N2T,
            inter_ptr, topk_weights_ptr, b2_ptr, b2s_ptr, out_ptr, out_ptr, topk_weights_ptr, ids_ptr, ids_ptr,
            ids_ptr, part2_ptr, count2_ptr, H, M, M, q_eps, stride_im, 1, 0, 0, stride_b2e, stride_b2n, 1,
            stride_b2se, stride_b2sn, 1, stride_om, 1, 0, I, 1, False, True, True, 128, 128, True, BLOCK_M, BLOCK_N2,
            128, 1, UPCAST, OUT_MANT, True, TOPK, NUM_EXPERTS, True, True, False, True, SPLIT2, False)
        # the pair's last reader leaves its counter at zero
        if tl.atomic_add(flag, 1, sem="relaxed") == PER1 + PER2 - 1:
            tl.atomic_xchg(flag, 0)


_moe_fp8_one_launch = triton_kernel(_moe_fp8_one_launch_kernel)


def _moe_fp8_ws_kernel(
    a_ptr, as_ptr,  # A fp8 [P, K] in the padded list's order (row p: pair sorted_token_ids[p]); scales [P, K/GROUP_K]
    b_ptr, bs_ptr,  # B fp8 [E * NB, K] (each expert's NB rows: 2N gated, else N); scales [E, NB/GROUP_N, K/GROUP_K]
    c_ptr,  # SORTED_OUT: [P, N], rows in list order (padding rows included); else [M*topk, N], rows of pairs
    topk_weights_ptr,  # fp32 [M*topk]
    sorted_token_ids_ptr, expert_ids_ptr,  # int32 [P], [P / BLOCK_M]
    num_tokens_post_padded_ptr,  # int32 [1]: the list's length
    N, NB, num_valid_tokens, num_pid_m, P, B_ROWS,
    stride_am, stride_asm, stride_bn, stride_bse, stride_bsn, stride_cm,
    K: tl.constexpr, GATED: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr, SORTED_OUT: tl.constexpr,
    GROUP_N: tl.constexpr, GROUP_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, OUT_MANT: tl.constexpr,
    WS: tl.constexpr,  # the K loop warp-specialized: a producer warp group issuing the TMA loads, consumer groups
    # the wgmma and the scaled sums (Hopper; needs every operand of the loop's dots loaded through descriptors)
    LIST_M: tl.constexpr = 0,  # the list's row block when BLOCK_M divides it (GEMM 2 on GEMM 1's list with smaller
    # blocks): a block's expert is that of the list block holding it, and a block of padding only is skipped
):
    """One GEMM of the sorted-list MoE with block scales, its A and B tiles loaded through TMA descriptors, so the
    K loop can be warp-specialized. A is contiguous in list order (GEMM 1: x quantized in that order;
    GEMM 2: GEMM 1's SORTED_OUT intermediate, quantized), so each row block is one descriptor box; BLOCK_N divides
    the weight's scale block (one scale a tile and K block, B_SCALE_TILE's arithmetic) and BLOCK_K = GROUP_K."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M)
    # the grid covers the worst case; row blocks past the list's end run no K step and store nothing (an early
    # return would put the loop under a branch the warp specialization does not take)
    total = tl.load(num_tokens_post_padded_ptr)  # a multiple of BLOCK_M
    row0 = pid_m * BLOCK_M
    live_block = row0 < total
    if LIST_M:
        tl.static_assert(LIST_M % BLOCK_M == 0)
        # padding closes each expert's run, so a block is padding only if its first row is
        live_block = live_block & (tl.load(sorted_token_ids_ptr + row0) < num_valid_tokens)
    k_steps = tl.where(live_block, K // BLOCK_K, 0)
    tl.static_assert(GROUP_N % BLOCK_N == 0 and BLOCK_K == GROUP_K and K % BLOCK_K == 0)
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[P, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[B_ROWS, K], strides=[stride_bn, 1],
                                       block_shape=[BLOCK_N, BLOCK_K])
    if LIST_M:
        expert = tl.load(expert_ids_ptr + pid_m * BLOCK_M // LIST_M)
    else:
        expert = tl.load(expert_ids_ptr + pid_m)
    offs_r = row0 + tl.arange(0, BLOCK_M)  # [BLOCK_M] list positions
    b_row = expert * NB + pid_n * BLOCK_N
    bs_row = bs_ptr + expert.to(tl.int64) * stride_bse
    bs_ptrs = bs_row + (pid_n * BLOCK_N // GROUP_N) * stride_bsn  # the tile's one scale a K block
    as_ptrs = as_ptr + offs_r.to(tl.int64) * stride_asm  # [BLOCK_M]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATED:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        bus_ptrs = bs_row + ((pid_n * BLOCK_N + N) // GROUP_N) * stride_bsn
    for kb in tl.range(0, k_steps, warp_specialize=WS):
        a = a_desc.load([row0, kb * BLOCK_K])  # [BLOCK_M, BLOCK_K]
        b = b_desc.load([b_row, kb * BLOCK_K])  # [BLOCK_N, BLOCK_K]
        if UPCAST:  # the interpreter multiplies fp8 wrongly; on the GPU fp8 goes to the tensor cores as is
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        a_s = tl.load(as_ptrs + kb)  # [BLOCK_M] (GROUP_K = BLOCK_K: K block kb is scale group kb)
        acc += tl.dot(a, tl.trans(b)) * (a_s * tl.load(bs_ptrs + kb))[:, None]
        if GATED:
            bu = b_desc.load([b_row + N, kb * BLOCK_K])
            if UPCAST:
                bu = bu.to(tl.float32)
            acc_up += tl.dot(a, tl.trans(bu)) * (a_s * tl.load(bus_ptrs + kb))[:, None]

    offs_tok = tl.load(sorted_token_ids_ptr + offs_r)  # [BLOCK_M] pair indices; padding: num_valid_tokens
    live = offs_r < total  # [BLOCK_M]: the whole block or none of it
    tok_mask = (offs_tok < num_valid_tokens) & live
    offs_tok64 = offs_tok.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if GATED:
        acc = acc * tl.sigmoid(acc) * acc_up  # silu(gate) * up, in fp32
    if MUL_ROUTED_WEIGHT:
        acc = acc * tl.load(topk_weights_ptr + offs_tok64, mask=tok_mask, other=0.0)[:, None]
    if OUT_MANT:  # the interpreter's fp32 -> bf16 cast truncates: round to nearest even first
        acc = round_to_out_grid(acc, OUT_MANT)
    if SORTED_OUT:  # every row of the block, so GEMM 2's quantization reads no uninitialized row
        c_ptrs = c_ptr + offs_r.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        c_mask = ((offs_r < P) & live)[:, None] & (offs_n < N)[None, :]
    else:
        c_ptrs = c_ptr + offs_tok64[:, None] * stride_cm + offs_n[None, :]
        c_mask = tok_mask[:, None] & (offs_n < N)[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


_moe_fp8_ws = triton_kernel(_moe_fp8_ws_kernel)


def _moe_sum_kernel(
    y_ptr,  # [M*topk, H]: each (token, slot)'s weighted expert output; rows of unrouted pairs were never written
    ids_ptr,  # [M, topk] expert ids
    out_ptr,  # [M, H]
    M, H, num_experts,
    stride_ym, stride_yh, stride_im, stride_ik, stride_om, stride_oh,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, OUT_MANT: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] tokens
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    rmask = rows < M
    cmask = cols < H
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for s in range(TOP_K):  # in slot order, in fp32
        expert = tl.load(ids_ptr + rows64 * stride_im + s * stride_ik, mask=rmask, other=-1)  # [BLOCK_M]
        routed = rmask & (expert >= 0) & (expert < num_experts)
        y_ptrs = y_ptr + (rows64 * TOP_K + s)[:, None] * stride_ym + cols[None, :] * stride_yh
        acc += tl.load(y_ptrs, mask=routed[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    if OUT_MANT:  # the interpreter's fp32 -> bf16 cast truncates: round to nearest even first
        acc = round_to_out_grid(acc, OUT_MANT)
    o_ptrs = out_ptr + rows64[:, None] * stride_om + cols[None, :] * stride_oh
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


_moe_sum = triton_kernel(_moe_sum_kernel)


def _moe_default_config(m: int, topk: int, num_experts: int) -> dict:
    if INTERPRETED:
        # the interpreter pays per program instance and per operation, not per element: few, large tiles
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=1)
    # H100/H200. BLOCK_M follows the expected pairs per expert, so decode pads little; BLOCK_K = 128 matches the
    # scale block. GEMM 1 keeps two accumulators (gate and up), hence 8 warps at the larger tiles.
    per_expert = m * topk / max(num_experts, 1)
    if per_expert <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    if per_expert <= 32:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=4, num_warps=4, num_stages=4)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)


def moe_config(device: torch.device, m: int, topk: int, num_experts: int, inter: int, hidden: int,
               scheme: str) -> dict:
    """Block configuration for both GEMMs: configs/fp8_moe.json, else the defaults. An entry's "GEMM2" dict gives
    the down GEMM its own tile over the shared one; with another BLOCK_M it walks a sorted list of its own (the
    intermediate's rows are pairs, in any order). Returns GEMM 1's config, with GEMM 2's whole under "GEMM2"."""
    cfg = select_config(load_config_table("fp8_moe.json"), device_key(device),
                        f"E={num_experts},I={inter},H={hidden},{scheme}", m, _moe_default_config(m, topk, num_experts))
    return resolve_moe_config(cfg, scheme)


def resolve_moe_config(entry: dict, scheme: str) -> dict:
    """A table entry (GEMM 1's keys, GEMM 2's own under "GEMM2") as the launcher runs it: GEMM 1's config with GEMM
    2's whole under "GEMM2", BLOCK_K checked against the scale block."""
    cfg = {k: v for k, v in entry.items() if k in CONFIG_KEYS}
    own = dict(cfg.pop("GEMM2", None) or {})
    cfg2 = {**cfg, **{k: v for k, v in own.items() if k in CONFIG_KEYS and k != "GEMM2"}}
    for c in (cfg, cfg2):
        if scheme == "block":
            c["BLOCK_K"] = min(c["BLOCK_K"], SCALE_BLOCK)
            if SCALE_BLOCK % c["BLOCK_K"]:
                raise ValueError(f"BLOCK_K={c['BLOCK_K']} does not divide the scale block {SCALE_BLOCK}")
    return {**cfg, "GEMM2": cfg2}


def table_entry(cfg: dict) -> dict:
    """The inverse of resolve_moe_config: a resolved config as a table entry, GEMM 2's keys only where they differ
    from GEMM 1's."""
    entry = {k: v for k, v in cfg.items() if k != "GEMM2"}
    own = {k: v for k, v in cfg.get("GEMM2", {}).items() if entry.get(k) != v}
    return {**entry, "GEMM2": own} if own else entry


def _launch_moe_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, c: torch.Tensor,
                     topk_weights: torch.Tensor, sorted_token_ids: torch.Tensor, expert_ids: torch.Tensor,
                     num_tokens_post_padded: torch.Tensor, n: int, k: int, a_row_div: int, gated: bool,
                     mul_routed_weight: bool, block_scaled: bool, cfg: dict, pairs: int = 0,
                     slot_sum: int = 0, quant_a: bool = False, c_scale: torch.Tensor | None = None,
                     inter_dtype: torch.dtype = torch.bfloat16) -> None:
    """One GEMM of the layer; pairs = E: the pairs unsorted, one a row block (expert_ids being topk_ids), GEMM 2
    adding its slot_sum slots itself (rows of c: tokens). c_scale: GEMM 1 writes c as FP8 codes and these scales
    (QUANT_OUT), what per_token_group_quant_fp8 makes of the inter_dtype intermediate."""
    num_pid_m = c.shape[0] if pairs else sorted_token_ids.numel() // cfg["BLOCK_M"]
    tiles = num_pid_m * triton.cdiv(n, cfg["BLOCK_N"])
    # K shares a tile (unsorted pairs only): the largest divisor of the K blocks not above the config's SPLIT_K
    split = fp8_gemm.split_divisor(cfg.get("SPLIT_K", 1), triton.cdiv(k, cfg["BLOCK_K"])) if pairs else 1
    grid = (tiles, max(slot_sum, 1) * split)
    part, counters = split_k_workspace(max(slot_sum, 1) * split, c.shape[0], 2 * n if gated else n, tiles, c.device)
    extra = dict(PAIRS=True, SLOT_SUM=slot_sum, NUM_EXPERTS=pairs, QUANT_A=quant_a, SPLIT_K=split) if pairs else {}
    if block_scaled and fp8_gemm.tile_scales(SCALE_BLOCK, cfg["BLOCK_N"], n if gated else 0):
        extra["B_SCALE_TILE"] = True
    if c_scale is not None:
        extra.update(QUANT_OUT=True, INTER_BF16=inter_dtype == torch.bfloat16)
    _fused_moe_fp8[grid](
        a, a_s, b, b_s, c, c if c_scale is None else c_scale, topk_weights, sorted_token_ids, expert_ids,
        num_tokens_post_padded, part, counters,
        n, c.shape[0], num_pid_m, SCALE_EPS,
        a.stride(0), a.stride(1), a_s.stride(0), a_s.stride(1),
        b.stride(0), b.stride(1), b.stride(2), b_s.stride(0), b_s.stride(1), b_s.stride(2),
        c.stride(0), c.stride(1), 0 if c_scale is None else c_scale.stride(0),
        K=k, A_ROW_DIV=a_row_div, GATED=gated, MUL_ROUTED_WEIGHT=mul_routed_weight,
        BLOCK_SCALED=block_scaled, GROUP_N=SCALE_BLOCK if block_scaled else 1,
        GROUP_K=SCALE_BLOCK if block_scaled else 1, EVEN_K=k % cfg["BLOCK_K"] == 0,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        UPCAST=INTERPRETED, OUT_MANT=0 if c_scale is not None else out_mantissa_bits(c.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **extra, **fp8_gemm.pdl_kwargs(c.device),
    )


def _check_moe_args(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                    w2_scale: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    scheme: str) -> tuple[int, int, int, int, int]:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if x.dim() != 2 or x.dtype not in ACT_DTYPES:
        raise ValueError(f"x must be [M, H] in one of {ACT_DTYPES}, got {tuple(x.shape)} {x.dtype}")
    m, h = x.shape
    if w13.dim() != 3 or w2.dim() != 3 or w13.dtype != FP8_DTYPE or w2.dtype != FP8_DTYPE:
        raise ValueError(f"w13 and w2 must be 3-D {FP8_DTYPE}, got {tuple(w13.shape)} {w13.dtype} and "
                         f"{tuple(w2.shape)} {w2.dtype}")
    e, two_i, h13 = w13.shape
    if two_i % 2 or h13 != h:
        raise ValueError(f"w13 must be [E, 2I, H={h}], got {tuple(w13.shape)}")
    i = two_i // 2
    if tuple(w2.shape) != (e, h, i):
        raise ValueError(f"w2 must be [E={e}, H={h}, I={i}], got {tuple(w2.shape)}")
    if w13.stride(2) != 1 or w2.stride(2) != 1 or x.stride(1) != 1:
        raise ValueError("x, w13 and w2 must be contiguous along their last dimension")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != m or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_weights and topk_ids must both be [M={m}, topk], got {tuple(topk_weights.shape)} "
                         f"and {tuple(topk_ids.shape)}")
    if topk_ids.dtype.is_floating_point or topk_weights.dtype != torch.float32:
        raise ValueError(f"topk_ids must be integer and topk_weights float32, got {topk_ids.dtype} and "
                         f"{topk_weights.dtype}")
    if scheme == "block":
        if h % SCALE_BLOCK or i % SCALE_BLOCK:
            raise ValueError(f"block scheme: H={h} and I={i} must be multiples of {SCALE_BLOCK} (the scale block; "
                             f"gate and up must not share a scale tile)")
        want13, want2 = (e, two_i // SCALE_BLOCK, h // SCALE_BLOCK), (e, h // SCALE_BLOCK, i // SCALE_BLOCK)
    else:
        want13, want2 = (e, two_i, 1), (e, h, 1)
    for s, want, name in ((w13_scale, want13, "w13_scale"), (w2_scale, want2, "w2_scale")):
        if s.dtype != torch.float32 or tuple(s.shape) != want:
            raise ValueError(f"{scheme} scheme: {name} must be float32 {want}, got {s.dtype} {tuple(s.shape)}")
    return m, h, e, i, topk_ids.shape[1]


def fused_moe_fp8(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                  w2_scale: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  scheme: str = "block", x_quant: tuple[torch.Tensor, torch.Tensor] | None = None,
                  config: dict | None = None) -> torch.Tensor:
    """MoE layer with FP8 experts: x [M, H] -> [M, H] in x.dtype. Shapes and layout: module docstring.

    x_quant: x already quantized as per_token_group_quant_fp8(x, 128) would (block scheme; e.g. by the RMSNorm that
    made x), which saves that launch. config: a table entry to run instead of the table's (over the defaults, as
    one is; benchmarks and tuning)."""
    m, h, e, i, topk = _check_moe_args(x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, scheme)
    device = check_device(x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids)
    if m == 0:
        return torch.empty_like(x)
    block = scheme == "block"
    if config is None:
        cfg = moe_config(device, m, topk, e, i, h, scheme)
    else:  # over the defaults, as a table entry is
        cfg = resolve_moe_config({**_moe_default_config(m, topk, e), **config}, scheme)
    cfg2 = cfg.get("GEMM2", cfg)  # the down GEMM's tile
    if cfg.get("ONE_LAUNCH", 0) not in (0, 1, 2):
        raise ValueError(f"block config {cfg}: ONE_LAUNCH must be 0, 1 or 2 (2: back off while waiting)")

    # the TMA GEMMs (an entry's "WS", sorted lists) quantize x themselves, in the list's order
    ws = m > PAIRS_MAX_TOKENS and _ws_applies(cfg, cfg2, block, w13, w2)
    if x_quant is not None:
        xq, xs = x_quant
        if not block or xq.dtype != FP8_DTYPE or xq.shape != x.shape or tuple(xs.shape) != (m, h // SCALE_BLOCK):
            raise ValueError(f"x_quant must be (fp8 {tuple(x.shape)}, fp32 [{m}, {h // SCALE_BLOCK}]) for the block "
                             f"scheme, got {tuple(xq.shape)} {xq.dtype}, {tuple(xs.shape)} ({scheme} scheme)")
    elif ws:
        xq = xs = None
    else:
        xq, xs = per_token_group_quant_fp8(x, SCALE_BLOCK) if block else per_token_quant_fp8(x)  # [M, H], [M, *]
    weights = topk_weights.contiguous().view(-1)  # [M*topk]
    # rows of pairs routed to no expert are never written (nor read by GEMM 2, nor summed); zeroed in the interpreter
    # only, where garbage would make numpy warn in the quantization
    alloc = torch.zeros if INTERPRETED else torch.empty
    if m <= PAIRS_MAX_TOKENS:  # decode: no sort, no separate slot sum
        ids = topk_ids.contiguous().view(-1)  # [M*topk]
        if cfg.get("ONE_LAUNCH") and _one_launch_applies(cfg, cfg2, block, i, x):
            return _one_launch(xq, xs, x, w13, w13_scale, w2, w2_scale, weights, ids, topk, e, i, cfg, cfg2, alloc)
        inter = alloc((m * topk, i), dtype=x.dtype, device=device)  # [M*topk, I] silu(gate) * up
        _launch_moe_gemm(xq, xs, w13, w13_scale, inter, weights, ids, ids, ids, n=i, k=h, a_row_div=topk,
                         gated=True, mul_routed_weight=False, block_scaled=block, cfg=cfg, pairs=e)
        quant_a = block and QUANT_IN_GEMM and cfg2["BLOCK_K"] == SCALE_BLOCK
        if quant_a:  # GEMM 2 quantizes its pair's row itself
            hq, hs = inter, weights.view(-1, 1)  # (the scales' pointer and strides go unused)
        else:
            hq, hs = per_token_group_quant_fp8(inter, SCALE_BLOCK) if block else per_token_quant_fp8(inter)
        out = torch.empty_like(x)  # [M, H]
        _launch_moe_gemm(hq, hs, w2, w2_scale, out, weights, ids, ids, ids, n=h, k=i, a_row_div=1, gated=False,
                         mul_routed_weight=True, block_scaled=block, cfg=cfg2, pairs=e, slot_sum=topk,
                         quant_a=quant_a)
        return out
    sorted_token_ids, expert_ids, num_tokens_post_padded = _route(topk_ids, cfg["BLOCK_M"], e)  # no host sync
    if ws:
        return _moe_ws_layer(x, w13, w13_scale, w2, w2_scale, weights, topk_ids, sorted_token_ids,
                             expert_ids, num_tokens_post_padded, cfg, cfg2, alloc)

    # [M*topk, I] silu(gate) * up; with QUANT_OUT, GEMM 1 writes it as GEMM 2's A: FP8 codes and group scales
    quant_out = block and QUANT_OUT_GEMM and cfg["BLOCK_N"] == SCALE_BLOCK and x.dtype != torch.float16
    inter = alloc((m * topk, i), dtype=FP8_DTYPE if quant_out else x.dtype, device=device)
    inter_s = alloc((m * topk, i // SCALE_BLOCK), dtype=torch.float32, device=device) if quant_out else None
    _launch_moe_gemm(xq, xs, w13, w13_scale, inter, weights, sorted_token_ids, expert_ids, num_tokens_post_padded,
                     n=i, k=h, a_row_div=topk, gated=True, mul_routed_weight=False, block_scaled=block, cfg=cfg,
                     c_scale=inter_s, inter_dtype=x.dtype)
    if quant_out:
        hq, hs = inter, inter_s
    else:
        hq, hs = per_token_group_quant_fp8(inter, SCALE_BLOCK) if block else per_token_quant_fp8(inter)
    y = torch.empty((m * topk, h), dtype=x.dtype, device=device)  # [M*topk, H] each slot's weighted expert output
    if cfg2["BLOCK_M"] != cfg["BLOCK_M"]:  # GEMM 2's own row blocks
        sorted_token_ids, expert_ids, num_tokens_post_padded = _route(topk_ids, cfg2["BLOCK_M"], e)
    _launch_moe_gemm(hq, hs, w2, w2_scale, y, weights, sorted_token_ids, expert_ids, num_tokens_post_padded,
                     n=h, k=i, a_row_div=1, gated=False, mul_routed_weight=True, block_scaled=block, cfg=cfg2)

    # atomic-free reduction over the slots, in fp32, skipping unrouted pairs
    return moe_sum(y, topk_ids, x, e)


def _one_launch_applies(cfg: dict, cfg2: dict, block: bool, i: int, x: torch.Tensor) -> bool:
    """Whether an entry's ONE_LAUNCH can run as asked: block scales, both GEMMs on 128-deep K steps (GEMM 2
    quantizing its rows), column tiles inside a scale block (B_SCALE_TILE, as the two launches take them), one
    BLOCK_M, and 16-bit activations (an fp32 intermediate takes the two launches)."""
    return (block and QUANT_IN_GEMM and x.dtype != torch.float32 and cfg["BLOCK_K"] == cfg2["BLOCK_K"] == SCALE_BLOCK
            and cfg["BLOCK_M"] == cfg2["BLOCK_M"] and fp8_gemm.tile_scales(SCALE_BLOCK, cfg["BLOCK_N"], i)
            and fp8_gemm.tile_scales(SCALE_BLOCK, cfg2["BLOCK_N"]))


READY_STRIDE = 32  # int32s between two pairs' ready counters (ONE_LAUNCH): a 128-byte line each


def _one_launch(xq: torch.Tensor, xs: torch.Tensor, x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor,
                w2: torch.Tensor, w2_scale: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, topk: int, e: int,
                i: int, cfg: dict, cfg2: dict, alloc) -> torch.Tensor:
    """The single-token layer's two GEMMs in one launch (_moe_fp8_one_launch_kernel; GEMM 1's warps and stages for
    both)."""
    m, h = x.shape
    pairs = m * topk
    bn1, bn2 = cfg["BLOCK_N"], cfg2["BLOCK_N"]
    s1 = fp8_gemm.split_divisor(cfg.get("SPLIT_K", 1), h // SCALE_BLOCK)
    s2 = fp8_gemm.split_divisor(cfg2.get("SPLIT_K", 1), i // SCALE_BLOCK)
    n1t, n2t = i // bn1, h // bn2
    inter = alloc((pairs, i), dtype=x.dtype, device=x.device)  # [M*topk, I] silu(gate) * up
    out = torch.empty_like(x)
    part1 = fp8_gemm.split_k_workspace(s1, pairs, 2 * i, 1, x.device)[0]
    part2 = fp8_gemm.split_k_workspace(topk * s2, m, h, 1, x.device)[0]
    t1 = pairs * n1t if s1 > 1 else 0  # arrival counters: the pairs' ready counters, then GEMM 1's, GEMM 2's
    ready_n = READY_STRIDE * pairs
    counters = fp8_gemm.arrival_counters(x.device, ready_n + t1 + m * n2t)
    _moe_fp8_one_launch[(pairs * (n1t * s1 + n2t * s2),)](
        xq, xs, w13, w13_scale, w2, w2_scale, inter, out, weights, ids, part1, counters[ready_n:], part2,
        counters[ready_n + t1:], counters, m, SCALE_EPS,
        xq.stride(0), xs.stride(0), w13.stride(0), w13.stride(1), w13_scale.stride(0), w13_scale.stride(1),
        inter.stride(0), w2.stride(0), w2.stride(1), w2_scale.stride(0), w2_scale.stride(1), out.stride(0),
        H=h, I=i, TOPK=topk, NUM_EXPERTS=e, BLOCK_M=cfg["BLOCK_M"], BLOCK_N1=bn1, BLOCK_N2=bn2, SPLIT1=s1,
        SPLIT2=s2, UPCAST=INTERPRETED, OUT_MANT=out_mantissa_bits(x.dtype), READY_STRIDE=READY_STRIDE,
        SLEEP=cfg["ONE_LAUNCH"] == 2 and not INTERPRETED, ASM=not INTERPRETED, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return out


def _ws_applies(cfg: dict, cfg2: dict, block: bool, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether a config asking for the TMA / warp-specialized GEMMs ("WS") can have them: block scales, both GEMMs
    on GEMM 1's padded list (GEMM 2 reads GEMM 1's rows by position, in blocks of its BLOCK_M, which must divide GEMM
    1's), K blocks of one scale group, column tiles inside a scale block, weights contiguous (viewed as [E * rows, K]
    descriptors). Otherwise the launcher's usual GEMMs run."""
    return (block and cfg["BLOCK_M"] % cfg2["BLOCK_M"] == 0 and w13.is_contiguous() and w2.is_contiguous()
            and fp8_gemm.ws_applies(cfg, SCALE_BLOCK, SCALE_BLOCK, w13)
            and fp8_gemm.ws_applies(cfg2, SCALE_BLOCK, SCALE_BLOCK, w2)
            and all(fp8_gluon.applies(c, w.shape[-1], w.device) for c, w in ((cfg, w13), (cfg2, w2))
                    if c.get("WS") == "gluon"))


def _launch_ws_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, c: torch.Tensor,
                    weights: torch.Tensor, sorted_token_ids: torch.Tensor, expert_ids: torch.Tensor,
                    num_tokens_post_padded: torch.Tensor, n: int, gated: bool, sorted_out: bool, cfg: dict,
                    num_valid: int, list_m: int) -> None:
    """One TMA GEMM over the padded list of row blocks of list_m (cfg's BLOCK_M dividing it)."""
    e, nb, k = b.shape
    num_pid_m = sorted_token_ids.numel() // cfg["BLOCK_M"]
    grid = (num_pid_m * triton.cdiv(n, cfg["BLOCK_N"]),)
    args = (a, a_s, b, b_s, c, weights, sorted_token_ids, expert_ids, num_tokens_post_padded,
            n, nb, num_valid, num_pid_m, a.shape[0], e * nb,
            a.stride(0), a_s.stride(0), b.stride(1), b_s.stride(0), b_s.stride(1), c.stride(0))  # both kernels'
    if cfg.get("WS") == "gluon":  # the Gluon loop (fp8_gluon): one warp-group MMA in flight while the last is summed
        fp8_gluon._moe_fp8_gluon_kernel[grid](
            *args, K=k, GATED=gated, MUL_ROUTED_WEIGHT=not gated, SORTED_OUT=sorted_out, BLOCK_M=cfg["BLOCK_M"],
            BLOCK_N=cfg["BLOCK_N"], GROUP_M=cfg["GROUP_M"], STAGES=cfg["num_stages"],
            UNROLL=fp8_gluon.unroll(k // 128, cfg.get("UNROLL")), LIST_M=list_m, num_warps=cfg["num_warps"])
        return
    _moe_fp8_ws[grid](
        *args, K=k, GATED=gated, MUL_ROUTED_WEIGHT=not gated, SORTED_OUT=sorted_out, GROUP_N=SCALE_BLOCK,
        GROUP_K=SCALE_BLOCK, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"], UPCAST=INTERPRETED, OUT_MANT=out_mantissa_bits(c.dtype),
        WS=fp8_gemm.ws_split(cfg["BLOCK_M"], 2 if gated else 1),
        LIST_M=list_m if list_m != cfg["BLOCK_M"] else 0, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def _moe_ws_layer(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor,
                  w2: torch.Tensor, w2_scale: torch.Tensor, weights: torch.Tensor, topk_ids: torch.Tensor,
                  sorted_token_ids: torch.Tensor, expert_ids: torch.Tensor, num_tokens_post_padded: torch.Tensor,
                  cfg: dict, cfg2: dict, alloc) -> torch.Tensor:
    """The sorted-list layer on the TMA GEMMs: x quantized in list order (one launch, up to the list's length), GEMM
    1 writing the intermediate in list order, its quantization (up to the same length), GEMM 2 storing each pair's
    row, the slot sum. The same arithmetic as the pointer GEMMs, K block by K block."""
    m, topk = topk_ids.shape
    e, two_i, h = w13.shape
    i = two_i // 2
    # x quantized in list order up to the list's length (the bits of x's own quantization, row for row: x_quant is
    # not needed); padding rows take the last token's row, their results are never stored
    a1, a1_s = per_token_group_quant_fp8_rows(x, SCALE_BLOCK, num_tokens_post_padded, sorted_token_ids, topk)
    triton.set_allocator(fp8_gemm.tma_scratch(x.device))
    inter = alloc((a1.shape[0], i), dtype=x.dtype, device=x.device)  # [P, I] in list order
    _launch_ws_gemm(a1, a1_s, w13, w13_scale, inter, weights, sorted_token_ids, expert_ids, num_tokens_post_padded,
                    n=i, gated=True, sorted_out=True, cfg=cfg, num_valid=m * topk, list_m=cfg["BLOCK_M"])
    hq, hs = per_token_group_quant_fp8_rows(inter, SCALE_BLOCK, num_tokens_post_padded)  # [P, I], [P, I/128]
    y = torch.empty((m * topk, h), dtype=x.dtype, device=x.device)  # [M*topk, H]
    _launch_ws_gemm(hq, hs, w2, w2_scale, y, weights, sorted_token_ids, expert_ids, num_tokens_post_padded,
                    n=h, gated=False, sorted_out=False, cfg=cfg2, num_valid=m * topk, list_m=cfg["BLOCK_M"])
    return moe_sum(y, topk_ids, x, e)


def moe_sum(y: torch.Tensor, topk_ids: torch.Tensor, x: torch.Tensor, num_experts: int) -> torch.Tensor:
    """out[t] = sum over t's routed slots of y[t * topk + s], in fp32, without atomics; [M, H] in x's dtype."""
    m, topk = topk_ids.shape
    h = y.shape[1]
    out = torch.empty_like(x)  # [M, H]
    block_m, block_h = (64, min(triton.next_power_of_2(h), 4096)) if INTERPRETED else (4, 512)
    _moe_sum[(triton.cdiv(m, block_m), triton.cdiv(h, block_h))](
        y, topk_ids, out, m, h, num_experts, y.stride(0), y.stride(1), topk_ids.stride(0), topk_ids.stride(1),
        out.stride(0), out.stride(1), TOP_K=topk, BLOCK_M=block_m, BLOCK_H=block_h,
        OUT_MANT=out_mantissa_bits(x.dtype), num_warps=4,
    )
    return out


def fused_moe_fp8_ref(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                      w2_scale: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                      scheme: str = "block") -> torch.Tensor:
    """Reference of fused_moe_fp8: a loop over experts in PyTorch, with the same quantization and roundings
    (activations to FP8 per token (group), the intermediate and each slot's output to x.dtype)."""
    m, h, e, i, topk = _check_moe_args(x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, scheme)
    block = scheme == "block"
    quant = (lambda t: per_token_group_quant_fp8_ref(t, SCALE_BLOCK)) if block else per_token_quant_fp8_ref

    def gemm(aq: torch.Tensor, a_s: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor) -> torch.Tensor:
        if block:
            return w8a8_block_fp8_matmul_ref(aq, a_s, w, w_s, (SCALE_BLOCK, SCALE_BLOCK), out_dtype=torch.float32)
        return w8a8_channel_fp8_matmul_ref(aq, a_s, w, w_s, out_dtype=torch.float32)

    xq, xs = quant(x)  # [M, H], [M, *]
    slots = torch.zeros((m, topk, h), dtype=torch.float32, device=x.device)  # [M, topk, H]
    for ex in range(e):
        tok, slot = (topk_ids == ex).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        gate_up = gemm(xq[tok], xs[tok], w13[ex], w13_scale[ex])  # [n, 2I]
        gate, up = gate_up[:, :i], gate_up[:, i:]
        inter = (gate * torch.sigmoid(gate) * up).to(x.dtype)  # [n, I]
        hq, hs = quant(inter)
        y = gemm(hq, hs, w2[ex], w2_scale[ex]) * topk_weights[tok, slot][:, None]  # [n, H]
        slots[tok, slot] = y.to(x.dtype).float()
    return slots.sum(dim=1).to(x.dtype)
