"""GEMMs on GGUF block-quantized weights (Q8_0, Q4_K, Q5_K, Q6_K), in Triton, with pure-PyTorch references beside them.

The weight stays in GGUF's own bytes, as llama.cpp stores it: row n of W [N, K] is K / QK blocks of `size` bytes
(QK = 32 for Q8_0, 256 for the k-quants; layouts in specs/gguf-kquants.md section 1). The kernel reads those bytes,
dequantizes a [32, BLOCK_N] piece of W at a time in registers and multiplies it in with fp32 accumulation: no
repacking at load time, and the file's bytes are the GPU's bytes.

Two inner products, picked by BLOCK_M. From 16 rows, tl.dot on the tensor cores. Below (decode: one or two rows
per expert), fp32 FMAs into a [BLOCK_M, 32, BLOCK_N] accumulator reduced over its middle axis once after the K
loop: with so few rows the dequantization is the work, and this path spends no instructions shuffling dequantized
values into tensor-core operand layouts.

Usage:
    from quantkit.kernels.gguf_gemm import gguf_linear, gguf_linear_ref, dequantize_ref

    y = gguf_linear(x, w_bytes, "q4_k")        # x [M, K] bf16/fp16/fp32, w_bytes uint8 [N, K/256*144] -> [M, N]
    w = dequantize_ref(w_bytes, "q4_k")        # uint8 [..., K/QK*size] -> float32 [..., K], bit-exact with ggml

How a K step is cut. The loop walks K in steps of 256 (one k-quant super-block, or eight Q8_0 blocks); each step is
two "quads" of 128 values, and a quad is four pieces of 32 consecutive k, so every type feeds four products of
K = 32 per quad. A quad is chosen so that the bytes its pieces share are loaded once: Q4_K/Q5_K chunk c's byte holds
sub-block 2c in its low nibble and 2c+1 in its high one (a quad = chunks 2q, 2q+1); Q6_K's half h packs its four
32-runs into two ql runs and one qh run (a quad = a half). Scales and mins are decoded once per sub-block as
[BLOCK_N] vectors. fp16 fields are assembled from two byte loads, so no alignment is assumed anywhere.

Precision. Dequantized values are computed in fp32 as ggml does ((d * sc) * q - (dmin * m); the GPU may contract
it into one FMA). For tl.dot on the GPU they are rounded to x's dtype (bf16/fp16), or kept fp32 with IEEE products
for fp32 x; the FMA path is fp32 throughout. On the CPU (Triton's interpreter, TRITON_INTERPRET=1; see
kernels/fp8_gemm.py) everything is fp32 and the output is rounded to x's dtype by the kernel itself.

The GEMV kernel (`_gguf_gemv_kernel`, "PATH": "gemv" in a config; decode sizes, Q4_K, Q5_K, Q6_K and Q8_0). The same
bytes, read as words: Q4_K and Q5_K rows as int32 (144- and 176-byte blocks keep 16-byte alignment; Q5_K merges a
word's nibbles with the matching qh word's bits first: 4.6 instructions a weight against 11.9 for the FMA path), Q6_K
rows as int16 (210-byte blocks keep only 2), Q8_0 rows as int32 in pairs of 34-byte blocks (a byte moved to bits
15-22 with its sign bit flipped under 2^8's exponent is the float 384 + q: 4.0 instructions a weight, against 8.2 and
128 integer-to-float conversions a loop for the FMA path). A thread owns a whole weight row and walks it a
super-block at a time: a Q4_K super-block is one 16-byte load of the header (d | dmin, the 12 scale bytes) and eight
of nibbles, split into words in registers; the four bytes of a word form a [rows, 4] tile whose second axis one
thread holds, so every shift is an immediate.
Each nibble is moved to bits 16-19 under the exponent of 2^7, which makes the float 128 + q with one shift and one
LOP3 (no integer-to-float conversion), and meets its activation in one FFMA. The scales apply once per scale group
(32 values for Q4_K, Q5_K and Q8_0, 16 for Q6_K):
    sum over the group of (d sc q - dmin m) x = d sc * sum (128 + q) x - (128 d sc + dmin m) * sum x,
so the sums of the activations over each group are needed; with X_SUMS they come in precomputed (`gemv_prep`: x
in fp32 and its group sums, one small launch) instead of being added up by every thread. Q6_K's low nibble and
two high bits of four values are first merged in one word (two LOP3s a word), then moved as one 6-bit field
(128 + q6; the 32 offset comes off with the group sum too). The MoE's GEMM 1 writes its intermediate in fp32 with
the sums over down's scale groups (SUMS_OUT), which GEMM 2 takes as its X_SUMS. Counted for sm_90 without a GPU
(scripts/sass_loop.py, triton 3.9), the loop issues 3.9 instructions a weight for Q4_K (gate and up, fp32 x with
its sums; 4.1 with PREFETCH, 6.3 for bf16 x summed in the loop) and 5.0 for Q6_K, against 8.0 and 14.6 for the
tile path's dequantization at one token (BLOCK_M = 16, the tuned choice there) and 10 for the FMA path. In fp32
the 128 carried by each product until it comes off per group costs about 7 bits of the sums: fp32 outputs agree
with the reference to about 1e-6, not exactly. With PREFETCH (Q4_K) the next super-block's nine loads are issued
before the current one is computed (131 registers against 94). One thread a row, a warp's 16-byte loads touch 32
rows, 32 cache lines an instruction, which may hold L1 to about 16 bytes a cycle (some 3.7 TB/s over an H200's 132
SMs); Q6_K's 2-byte loads would hold it to 2 bytes a cycle, so with Q6_WORDS (rows of an even number of super-blocks)
Q6_K is read as int32 words, an odd super-block's words each merged from two (53 loads a super-block against 105);
LANES = 2 gives a row two threads, one piece of each 32-byte chunk each (16 lines), and costs 4.7 instructions a
weight (each lane decodes its row's scales), against 4.1. Which wins is the tuner's to say.

Block configurations: `configs/gguf_gemm.json` (shape key "N=..,K=..,<qtype>") and `configs/gguf_moe.json` (see
kernels/gguf_moe.py), by device and M bucket as the FP8 ones; defaults below.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_gemm import (
    INTERPRETED,
    _cuda_device_info,
    _cuda_index,
    device_key,
    gemv_prep,
    grouped_pid,
    load_config_table,
    out_mantissa_bits,
    pdl_enter,
    pdl_kwargs,
    round_to_out_grid,
    select_config,
    split_k_sum,
    split_k_workspace,
    triton_kernel,
)
from .fp8_gemm import check_device as _check_device
from .fp8_moe import block_rows, gemv_store, pair_rows, pick4

ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# qtype -> (values per block, bytes per block), ggml's table for the types the kernels read
QTYPES: dict[str, tuple[int, int]] = {
    "q8_0": (32, 34),
    "q4_k": (256, 144),
    "q5_k": (256, 176),
    "q6_k": (256, 210),
}
# the kernels' QTYPE constexpr: ggml's type ids
QTYPE_IDS = {"q8_0": 8, "q4_k": 12, "q5_k": 13, "q6_k": 14}
SUPER = 256  # the K step of the main loop: one k-quant super-block, eight Q8_0 blocks
# types the GEMV kernel reads, the word type each is viewed as, and its scale group (values per scale)
GEMV_QTYPES = {"q4_k": (torch.int32, 32), "q5_k": (torch.int32, 32), "q6_k": (torch.int16, 16),
               "q8_0": (torch.int32, 32)}
GEMV_ROWS_MAX = 4  # gguf_linear takes the GEMV kernel up to this many rows on a GPU (tokens share the decoding)


# --------------------------------------------------------------------------------------------------------------------
# pure-PyTorch decoders (the references' weights; bit-exact with ggml's dequantize_row_* and gguf.quants.dequantize)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Two little-endian bytes [..., 2] -> float32 [..., 1]."""
    return b.contiguous().view(torch.float16).float()


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed scale bytes [nb, 12] of Q4_K/Q5_K -> 6-bit scales and mins, float32 [nb, 8] each."""
    s = s.int()
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([lo & 63, (hi & 15) | ((lo >> 6) << 4)], dim=1)
    m = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], dim=1)
    return sc.float(), m.float()


def dequantize_ref(data: torch.Tensor, qtype: str) -> torch.Tensor:
    """GGUF bytes uint8 [..., nb * size] -> float32 [..., nb * QK], on data's device."""
    if qtype not in QTYPES:
        raise ValueError(f"qtype must be one of {tuple(QTYPES)}, got {qtype!r}")
    if data.dtype != torch.uint8:
        raise ValueError(f"GGUF block data must be uint8, got {data.dtype}")
    qk, size = QTYPES[qtype]
    if data.shape[-1] % size:
        raise ValueError(f"{qtype}: last dimension {data.shape[-1]} is not a multiple of the block size {size}")
    lead = data.shape[:-1]
    b = data.reshape(-1, size)  # [nb, size]
    nb = b.shape[0]
    if qtype == "q8_0":
        y = _f16(b[:, 0:2]) * b[:, 2:].contiguous().view(torch.int8).float()  # [nb, 32]
    elif qtype in ("q4_k", "q5_k"):
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])  # [nb, 1]
        sc, m = _scale_min_k4(b[:, 4:16])  # [nb, 8]
        qs = b[:, 16:].int() if qtype == "q4_k" else b[:, 48:].int()  # [nb, 128]
        qs = qs.view(nb, 4, 1, 32)
        q = torch.cat([qs & 15, qs >> 4], dim=2).view(nb, 8, 32)  # sub-block 2c low nibbles, 2c+1 high
        if qtype == "q5_k":
            qh = b[:, 16:48].int().view(nb, 1, 32)  # bit j of qh[l] is bit 4 of sub-block j's weight l
            q = q | (((qh >> torch.arange(8, device=b.device).view(1, 8, 1)) & 1) << 4)
        y = ((d * sc)[..., None] * q.float() - (dmin * m)[..., None]).view(nb, 256)
    else:  # q6_k
        ql, qh = b[:, 0:128].int().view(nb, 2, 2, 32), b[:, 128:192].int().view(nb, 2, 1, 32)  # [nb, half, ...]
        sc = b[:, 192:208].contiguous().view(torch.int8).float()  # [nb, 16]
        d = _f16(b[:, 208:210])  # [nb, 1]
        low = torch.cat([ql & 15, ql >> 4], dim=2)  # [nb, 2, 4, 32]: the four 32-runs of each half
        high = (qh >> torch.tensor([0, 2, 4, 6], device=b.device).view(1, 1, 4, 1)) & 3
        q = (low | (high << 4)).view(nb, 16, 16).float() - 32.0  # [nb, 16 scale groups, 16]
        y = ((d * sc)[..., None] * q).view(nb, 256)
    return y.reshape(*lead, -1)


def gguf_linear_ref(x: torch.Tensor, w_bytes: torch.Tensor, qtype: str) -> torch.Tensor:
    """Reference of gguf_linear: dequantize in PyTorch, fp32 matmul, result in x.dtype."""
    m, k, n = _check_linear_args(x, w_bytes, qtype)
    w = dequantize_ref(w_bytes, qtype)  # [N, K] fp32
    return (x.float() @ w.t()).to(x.dtype)


# --------------------------------------------------------------------------------------------------------------------
# in-register dequantization of one quad (128 values along K) of BLOCK_N rows


@triton_kernel
def _ld_u8(p, mask):
    return tl.load(p, mask=mask, other=0).to(tl.int32)


@triton_kernel
def _ld_f16(p, mask):
    """fp16 from two byte loads (GGUF blocks have odd sizes, so fields carry no alignment) -> fp32."""
    lo = tl.load(p, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(p + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton_kernel
def _ld_i8(p, mask):
    return tl.load(p, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)


@triton_kernel
def _scale_min_k4_tl(s, j: tl.constexpr, mask):
    """Sub-block j's 6-bit (scale, min) of a Q4_K/Q5_K super-block; s points at the 12 scale bytes. [BLOCK_N] fp32."""
    if j < 4:
        sc = _ld_u8(s + j, mask) & 63
        m = _ld_u8(s + j + 4, mask) & 63
    else:
        b = _ld_u8(s + j + 4, mask)
        sc = (b & 15) | ((_ld_u8(s + j - 4, mask) >> 6) << 4)
        m = (b >> 4) | ((_ld_u8(s + j, mask) >> 6) << 4)
    return sc.to(tl.float32), m.to(tl.float32)


@triton_kernel
def _dequant_quad(w_ptr, row_off, sb, n_mask, offs_l, K: tl.constexpr, QTYPE: tl.constexpr, QUAD: tl.constexpr):
    """Values k in [256*sb + 128*QUAD, +128) of BLOCK_N rows as four fp32 [32, BLOCK_N] pieces, in k order.

    row_off [BLOCK_N] int64: byte offset of each row's first block; offs_l = arange(0, 32).
    """
    if QTYPE == 8:  # Q8_0: four blocks of 32, each d fp16 then 32 int8
        b0 = sb * 8 + QUAD * 4
        p0 = w_ptr + row_off + b0 * 34  # [BLOCK_N]
        bvec = row_off * 0 + b0  # [BLOCK_N] the block index as a tensor (blocks past K are masked off)
        m0 = n_mask & (bvec < K // 32)
        m1 = n_mask & (bvec + 1 < K // 32)
        m2 = n_mask & (bvec + 2 < K // 32)
        m3 = n_mask & (bvec + 3 < K // 32)
        w0 = _ld_f16(p0, m0)[None, :] * _ld_i8(p0[None, :] + 2 + offs_l[:, None], m0[None, :])
        w1 = _ld_f16(p0 + 34, m1)[None, :] * _ld_i8(p0[None, :] + 36 + offs_l[:, None], m1[None, :])
        w2 = _ld_f16(p0 + 68, m2)[None, :] * _ld_i8(p0[None, :] + 70 + offs_l[:, None], m2[None, :])
        w3 = _ld_f16(p0 + 102, m3)[None, :] * _ld_i8(p0[None, :] + 104 + offs_l[:, None], m3[None, :])
    elif QTYPE == 12 or QTYPE == 13:  # Q4_K (144 B) / Q5_K (176 B): d, dmin, scales[12], (qh[32]), qs[128]
        if QTYPE == 12:
            base = w_ptr + row_off + sb * 144  # [BLOCK_N]
            qs = base + 16
        else:
            base = w_ptr + row_off + sb * 176
            qs = base + 48
        d = _ld_f16(base, n_mask)
        dmin = _ld_f16(base + 2, n_mask)
        sc0, mn0 = _scale_min_k4_tl(base + 4, 4 * QUAD + 0, n_mask)
        sc1, mn1 = _scale_min_k4_tl(base + 4, 4 * QUAD + 1, n_mask)
        sc2, mn2 = _scale_min_k4_tl(base + 4, 4 * QUAD + 2, n_mask)
        sc3, mn3 = _scale_min_k4_tl(base + 4, 4 * QUAD + 3, n_mask)
        tmask = n_mask[None, :]
        qa = _ld_u8(qs[None, :] + 64 * QUAD + offs_l[:, None], tmask)  # [32, BLOCK_N] chunk 2*QUAD
        qb = _ld_u8(qs[None, :] + 64 * QUAD + 32 + offs_l[:, None], tmask)  # chunk 2*QUAD + 1
        q0 = qa & 15
        q1 = qa >> 4
        q2 = qb & 15
        q3 = qb >> 4
        if QTYPE == 13:  # bit j of qh[l]: bit 4 of sub-block j's value l
            qh = _ld_u8(base[None, :] + 16 + offs_l[:, None], tmask)
            q0 = q0 | (((qh >> (4 * QUAD + 0)) & 1) << 4)
            q1 = q1 | (((qh >> (4 * QUAD + 1)) & 1) << 4)
            q2 = q2 | (((qh >> (4 * QUAD + 2)) & 1) << 4)
            q3 = q3 | (((qh >> (4 * QUAD + 3)) & 1) << 4)
        # ggml: (d * sc) * q - (dmin * m), each product in fp32
        w0 = (d * sc0)[None, :] * q0.to(tl.float32) - (dmin * mn0)[None, :]
        w1 = (d * sc1)[None, :] * q1.to(tl.float32) - (dmin * mn1)[None, :]
        w2 = (d * sc2)[None, :] * q2.to(tl.float32) - (dmin * mn2)[None, :]
        w3 = (d * sc3)[None, :] * q3.to(tl.float32) - (dmin * mn3)[None, :]
    else:  # Q6_K (210 B): ql[128], qh[64], scales int8[16], d fp16 last; QUAD is the half h
        base = w_ptr + row_off + sb * 210  # [BLOCK_N]
        d = _ld_f16(base + 208, n_mask)
        tmask = n_mask[None, :]
        qla = _ld_u8(base[None, :] + 64 * QUAD + offs_l[:, None], tmask)  # [32, BLOCK_N]
        qlb = _ld_u8(base[None, :] + 64 * QUAD + 32 + offs_l[:, None], tmask)
        qh = _ld_u8(base[None, :] + 128 + 32 * QUAD + offs_l[:, None], tmask)
        q0 = ((qla & 15) | ((qh & 3) << 4)) - 32
        q1 = ((qlb & 15) | (((qh >> 2) & 3) << 4)) - 32
        q2 = ((qla >> 4) | (((qh >> 4) & 3) << 4)) - 32
        q3 = ((qlb >> 4) | (((qh >> 6) & 3) << 4)) - 32
        # value k of the super-block uses scales[k // 16]: two scales per 32-piece
        first = offs_l[:, None] < 16
        s = base + 192 + 8 * QUAD
        w0 = tl.where(first, (d * _ld_i8(s + 0, n_mask))[None, :], (d * _ld_i8(s + 1, n_mask))[None, :])
        w1 = tl.where(first, (d * _ld_i8(s + 2, n_mask))[None, :], (d * _ld_i8(s + 3, n_mask))[None, :])
        w2 = tl.where(first, (d * _ld_i8(s + 4, n_mask))[None, :], (d * _ld_i8(s + 5, n_mask))[None, :])
        w3 = tl.where(first, (d * _ld_i8(s + 6, n_mask))[None, :], (d * _ld_i8(s + 7, n_mask))[None, :])
        w0 = w0 * q0.to(tl.float32)
        w1 = w1 * q1.to(tl.float32)
        w2 = w2 * q2.to(tl.float32)
        w3 = w3 * q3.to(tl.float32)
    return w0, w1, w2, w3


@triton_kernel
def _dot_quad(acc, x0, x1, x2, x3, w0, w1, w2, w3, DOT_F32: tl.constexpr):
    if DOT_F32:
        acc = tl.dot(x0, w0, acc, input_precision="ieee")
        acc = tl.dot(x1, w1, acc, input_precision="ieee")
        acc = tl.dot(x2, w2, acc, input_precision="ieee")
        acc = tl.dot(x3, w3, acc, input_precision="ieee")
    else:  # bf16/fp16 tensor cores, fp32 accumulation
        acc = tl.dot(x0, w0.to(x0.dtype), acc)
        acc = tl.dot(x1, w1.to(x1.dtype), acc)
        acc = tl.dot(x2, w2.to(x2.dtype), acc)
        acc = tl.dot(x3, w3.to(x3.dtype), acc)
    return acc


@triton_kernel
def _fma_quad(acc3, x0, x1, x2, x3, w0, w1, w2, w3):
    """acc3 [BLOCK_M, 32, BLOCK_N] += x piece (row, l) * w piece (l, n), fp32 FMAs only: reduced over l once, after
    the K loop, so the loop has no cross-thread reduction and no operand shuffles into tensor-core layouts."""
    acc3 += x0[:, :, None] * w0[None, :, :]
    acc3 += x1[:, :, None] * w1[None, :, :]
    acc3 += x2[:, :, None] * w2[None, :, :]
    acc3 += x3[:, :, None] * w3[None, :, :]
    return acc3


@triton_kernel
def _ld_x(x_ptrs, k, a_mask, K: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr):
    """Activation piece [BLOCK_M, 32] at columns k + arange(32) (x_ptrs already points at column offs_l)."""
    if EVEN_K:
        xp = tl.load(x_ptrs + k, mask=a_mask, other=0.0)
    else:
        offs_l = tl.arange(0, 32)
        xp = tl.load(x_ptrs + k, mask=a_mask & ((k + offs_l)[None, :] < K), other=0.0)
    if DOT_F32:
        xp = xp.to(tl.float32)
    return xp


# --------------------------------------------------------------------------------------------------------------------
# the kernel: plain GEMM, or the grouped GEMM of a fused MoE over tokens sorted by expert


def _gguf_matmul_kernel(
    x_ptr,  # [rows, K] activations, contiguous along K
    w_ptr,  # uint8 [E, N, K/QK*size] (E = 1 for a plain GEMM): GGUF blocks, row by row
    u_ptr,  # GATED: the up projection's bytes, same shape (its own qtype QTYPE_UP); else unused
    c_ptr,  # [M_out, N]
    topk_weights_ptr,  # fp32 [M*topk] (ROUTED)
    sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,  # int32 (ROUTED): see kernels/fp8_moe.py
    part_ptr, count_ptr,  # SLOT_SUM > 1: fp32 partial sums and int32 arrival counters (fp8_gemm.split_k_sum)
    M, N, num_pid_m,
    stride_xm, stride_we, stride_wn, stride_ue, stride_un, stride_cm,
    K: tl.constexpr,  # a loop bound (see kernels/fp8_gemm.py)
    QTYPE: tl.constexpr, QTYPE_UP: tl.constexpr,  # ggml type ids
    ROUTED: tl.constexpr,  # rows come from the sorted, padded (token, slot) list; one expert per row block
    A_ROW_DIV: tl.constexpr,  # ROUTED: row of x = pair index // A_ROW_DIV (topk for GEMM 1, 1 for GEMM 2)
    GATED: tl.constexpr,  # silu(x W^T) * (x U^T) in the epilogue
    MUL_ROUTED_WEIGHT: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % 256 == 0: no masks along K
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    FMA: tl.constexpr,  # BLOCK_M < 16: CUDA-core FMAs in fp32 instead of tl.dot (decode: few rows, the dequant rules)
    DOT_F32: tl.constexpr,  # tl.dot in fp32 (IEEE products): fp32 x, or the interpreter
    X_F32: tl.constexpr,  # activations converted to fp32 on load (DOT_F32 or FMA)
    OUT_MANT: tl.constexpr,
    PAIRS: tl.constexpr = False,  # ROUTED decode: no sorted list, row block pid_m holds one pair in its first row
    # (GEMM 1: pair pid_m; GEMM 2, SLOT_SUM: pair pid_m * SLOT_SUM + slot, C row = token pid_m), its expert read from
    # topk_ids (at expert_ids_ptr); experts outside [0, NUM_EXPERTS) read nothing and add zeros
    SLOT_SUM: tl.constexpr = 0,  # PAIRS GEMM 2: axis 1 is the slot; split_k_sum adds the slots in slot order
    NUM_EXPERTS: tl.constexpr = 0,
):
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    n_mask = offs_n < N

    if PAIRS:
        pid_s = tl.program_id(1)
        pair, rows, tok_mask, a_rows, expert, routed = pair_rows(expert_ids_ptr, pid_m, pid_s, M, offs_n, A_ROW_DIV,
                                                                 SLOT_SUM, NUM_EXPERTS, BLOCK_M)
        n_mask = n_mask & routed
    elif ROUTED:
        # the grid covers the worst case; row blocks past the padded list's end have nothing to do
        if pid_m * BLOCK_M >= tl.load(num_tokens_post_padded_ptr):
            return
        offs_tok = tl.load(sorted_token_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M] pairs
        tok_mask = offs_tok < M  # padding holds the sentinel M (= M*topk pairs)
        rows = offs_tok.to(tl.int64)
        a_rows = rows // A_ROW_DIV
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    else:
        rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BLOCK_M]
        tok_mask = rows < M
        a_rows = rows
        expert = 0

    offs_n64 = offs_n.to(tl.int64)
    offs_l = tl.arange(0, 32)
    w_row = expert * stride_we + offs_n64 * stride_wn  # [BLOCK_N] byte offsets of each row
    if GATED:
        u_row = expert * stride_ue + offs_n64 * stride_un
    x_ptrs = x_ptr + a_rows[:, None] * stride_xm + offs_l[None, :]  # [BLOCK_M, 32]
    a_mask = tok_mask[:, None]

    if FMA:
        acc3 = tl.zeros((BLOCK_M, 32, BLOCK_N), dtype=tl.float32)
        if GATED:
            acc3_up = tl.zeros((BLOCK_M, 32, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if GATED:
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for sb in range(0, tl.cdiv(K, 256)):
        for quad in tl.static_range(2):
            k = sb * 256 + quad * 128
            x0 = _ld_x(x_ptrs, k, a_mask, K, EVEN_K, X_F32)
            x1 = _ld_x(x_ptrs, k + 32, a_mask, K, EVEN_K, X_F32)
            x2 = _ld_x(x_ptrs, k + 64, a_mask, K, EVEN_K, X_F32)
            x3 = _ld_x(x_ptrs, k + 96, a_mask, K, EVEN_K, X_F32)
            w0, w1, w2, w3 = _dequant_quad(w_ptr, w_row, sb, n_mask, offs_l, K, QTYPE, quad)
            if FMA:
                acc3 = _fma_quad(acc3, x0, x1, x2, x3, w0, w1, w2, w3)
            else:
                acc = _dot_quad(acc, x0, x1, x2, x3, w0, w1, w2, w3, DOT_F32)
            if GATED:
                u0, u1, u2, u3 = _dequant_quad(u_ptr, u_row, sb, n_mask, offs_l, K, QTYPE_UP, quad)
                if FMA:
                    acc3_up = _fma_quad(acc3_up, x0, x1, x2, x3, u0, u1, u2, u3)
                else:
                    acc_up = _dot_quad(acc_up, x0, x1, x2, x3, u0, u1, u2, u3, DOT_F32)
    if FMA:
        acc = tl.sum(acc3, axis=1)  # [BLOCK_M, BLOCK_N]
        if GATED:
            acc_up = tl.sum(acc3_up, axis=1)

    if GATED:
        acc = acc * tl.sigmoid(acc) * acc_up  # silu(gate) * up, in fp32
    if MUL_ROUTED_WEIGHT:
        if PAIRS:
            acc = acc * tl.load(topk_weights_ptr + pair)
        else:
            acc = acc * tl.load(topk_weights_ptr + rows, mask=tok_mask, other=0.0)[:, None]
    c_mask = tok_mask[:, None] & (offs_n < N)[None, :]
    last = True
    if SLOT_SUM > 1:  # partials [SLOT_SUM, M, N]
        acc, last = split_k_sum(acc, part_ptr, count_ptr + pid, pid_s, rows, offs_n64, c_mask, M, N, SLOT_SUM)
    if last:
        if OUT_MANT:  # the interpreter's fp32 -> bf16 cast truncates: round to nearest even first
            acc = round_to_out_grid(acc, OUT_MANT)
        c_ptrs = c_ptr + rows[:, None] * stride_cm + offs_n64[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


_gguf_matmul = triton_kernel(_gguf_matmul_kernel)


def _routing_args(x: torch.Tensor, c: torch.Tensor, routing: tuple[torch.Tensor, ...] | None, pairs: int,
                 block_m: int) -> tuple:
    """(topk weights, sorted ids, expert ids, padded length, row blocks, valid rows) of a launch: placeholders and
    the rows of x for a plain GEMM (routing None); the pairs, one a row block (pairs), or the sorted list's blocks."""
    if routing is None:
        dummy = torch.empty((1,), dtype=torch.int32, device=x.device)
        return (torch.empty((1,), dtype=torch.float32, device=x.device), dummy, dummy, dummy,
                triton.cdiv(x.shape[0], block_m), x.shape[0])
    weights, sorted_ids, expert_ids, total = routing
    return weights, sorted_ids, expert_ids, total, c.shape[0] if pairs else sorted_ids.numel() // block_m, c.shape[0]


def launch_gguf_matmul(x: torch.Tensor, w: torch.Tensor, qtype: str, c: torch.Tensor, n: int, k: int, cfg: dict,
                       u: torch.Tensor | None = None, qtype_up: str | None = None,
                       routing: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                       a_row_div: int = 1, mul_routed_weight: bool = False, pairs: int = 0,
                       slot_sum: int = 0) -> None:
    """One launch of the kernel. w (and u) uint8 [E, N, row bytes] or [N, row bytes], contiguous along the last dim.

    routing = (topk_weights fp32 [M*topk], sorted_token_ids, expert_ids, num_tokens_post_padded) for the MoE GEMMs;
    None for a plain GEMM over the rows of x into c. pairs = E: the pairs unsorted, one a row block, expert_ids
    being topk_ids [M*topk] (the other two routing tensors unused); slot_sum = topk with it: GEMM 2 adds each
    token's slots itself (rows of c: tokens).
    """
    w3 = w if w.dim() == 3 else w.unsqueeze(0)
    u3 = (u if u.dim() == 3 else u.unsqueeze(0)) if u is not None else w3
    weights, sorted_ids, expert_ids, total, num_pid_m, m_rows = _routing_args(x, c, routing, pairs, cfg["BLOCK_M"])
    tiles = num_pid_m * triton.cdiv(n, cfg["BLOCK_N"])
    grid = (tiles, max(slot_sum, 1))
    part, counters = split_k_workspace(max(slot_sum, 1), c.shape[0], n, tiles, c.device)
    extra = dict(PAIRS=True, SLOT_SUM=slot_sum, NUM_EXPERTS=pairs) if pairs else {}
    dot_f32 = INTERPRETED or x.dtype == torch.float32
    _gguf_matmul[grid](
        x, w3, u3, c, weights, sorted_ids, expert_ids, total, part, counters,
        m_rows, n, num_pid_m,
        x.stride(0), w3.stride(0), w3.stride(1), u3.stride(0), u3.stride(1), c.stride(0),
        K=k, QTYPE=QTYPE_IDS[qtype], QTYPE_UP=QTYPE_IDS[qtype_up or qtype], ROUTED=routing is not None,
        A_ROW_DIV=a_row_div, GATED=u is not None, MUL_ROUTED_WEIGHT=mul_routed_weight, EVEN_K=k % SUPER == 0,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], GROUP_M=cfg["GROUP_M"], FMA=cfg["BLOCK_M"] < 16,
        DOT_F32=dot_f32, X_F32=dot_f32 or cfg["BLOCK_M"] < 16, OUT_MANT=out_mantissa_bits(c.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **extra,
    )


# --------------------------------------------------------------------------------------------------------------------
# plain GEMM


def check_device(*tensors: torch.Tensor) -> torch.device:
    """All tensors on one device that can run the kernels here (CUDA compiled, or CPU under the interpreter)."""
    return _check_device(*tensors, min_capability=None)


def row_bytes(k: int, qtype: str) -> int:
    """Bytes of one GGUF row of k values."""
    qk, size = QTYPES[qtype]
    return k // qk * size


def check_weight_bytes(w: torch.Tensor, k: int, qtype: str, name: str = "w_bytes") -> None:
    if qtype not in QTYPES:
        raise ValueError(f"qtype must be one of {tuple(QTYPES)}, got {qtype!r}")
    qk, _ = QTYPES[qtype]
    if k % qk:
        raise ValueError(f"{qtype}: K={k} must be a multiple of the block length {qk}")
    if w.dtype != torch.uint8:
        raise ValueError(f"{name} must be uint8 GGUF blocks, got {w.dtype}")
    if w.shape[-1] != row_bytes(k, qtype):
        raise ValueError(f"{name}: {qtype} rows of K={k} take {row_bytes(k, qtype)} bytes, got {w.shape[-1]}")
    if w.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous along its last dimension (strides {w.stride()})")


def _check_linear_args(x: torch.Tensor, w_bytes: torch.Tensor, qtype: str) -> tuple[int, int, int]:
    if x.dim() != 2 or x.dtype not in ACT_DTYPES:
        raise ValueError(f"x must be [M, K] in one of {ACT_DTYPES}, got {tuple(x.shape)} {x.dtype}")
    if w_bytes.dim() != 2:
        raise ValueError(f"w_bytes must be [N, row bytes], got shape {tuple(w_bytes.shape)}")
    m, k = x.shape
    check_weight_bytes(w_bytes, k, qtype)
    return m, k, w_bytes.shape[0]


def _gemm_default_config(device: torch.device, m: int, n: int, gemv: bool = False, k: int = SUPER) -> dict:
    """gemv: the weights can take the GEMV kernel (a type it reads, rows it can view as words)."""
    if INTERPRETED:
        # the interpreter pays per program instance and per operation, not per element: few, large tiles
        return dict(BLOCK_M=64, BLOCK_N=128, GROUP_M=1, num_warps=4, num_stages=1)
    if gemv and m <= GEMV_ROWS_MAX:  # the GEMV kernel, a weight row a thread (instruction counts above); K split
        # until every multiprocessor has about two programs (k/v: 32 tiles of 32 rows, o_proj 96)
        num_sms = _cuda_device_info(_cuda_index(device))[2]
        tiles, split, sbs = triton.cdiv(n, 32), 1, k // SUPER
        while tiles * split < 2 * num_sms and sbs % (2 * split) == 0 and sbs // (2 * split) >= 2:
            split *= 2
        return dict(PATH="gemv", PREP=True, PREFETCH=True, BLOCK_M=triton.next_power_of_2(m), BLOCK_N=32, GROUP_M=1,
                    num_warps=1, num_stages=1, SPLIT_K=split)
    # H100/H200: the weight bytes bound the time up to a few hundred tokens. Up to 4 rows the fp32 FMA path
    # (BLOCK_M < 16) skips the tensor cores' operand shuffles, which cost more than they save with so few rows;
    # narrow tiles give every multiprocessor a program at decode sizes
    if m <= 4:
        return dict(BLOCK_M=triton.next_power_of_2(m), BLOCK_N=32, GROUP_M=1, num_warps=4, num_stages=2)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 32 if n <= 4096 and m <= 16 else 64
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, GROUP_M=8, num_warps=4, num_stages=3)


def gemm_config(device: torch.device, m: int, n: int, k: int, qtype: str, gemv: bool = False) -> dict:
    """Block configuration for gguf_linear: configs/gguf_gemm.json (tile configs), else the defaults; up to
    GEMV_ROWS_MAX rows of weights the GEMV kernel reads (gemv), that kernel."""
    default = _gemm_default_config(device, m, n, gemv, k)
    if default.get("PATH") == "gemv":
        return default
    return select_config(load_config_table("gguf_gemm.json"), device_key(device), f"N={n},K={k},{qtype}", m,
                         default)


def gguf_linear(x: torch.Tensor, w_bytes: torch.Tensor, qtype: str, config: dict | None = None) -> torch.Tensor:
    """y = x W^T with W in GGUF blocks: x [M, K], w_bytes uint8 [N, K/QK*size] -> y [M, N] in x.dtype.

    config overrides the block configuration (the tuning script's candidates)."""
    m, k, n = _check_linear_args(x, w_bytes, qtype)
    device = check_device(x, w_bytes)
    if x.stride(1) != 1 and k > 1:
        x = x.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=device)  # [M, N]
    if m == 0 or n == 0:
        return y
    gemv = gemv_supported((w_bytes, qtype))
    cfg = config or gemm_config(device, m, n, k, qtype, gemv)
    if cfg.get("PATH") == "gemv":
        if not gemv:
            raise ValueError(f"the GEMV path reads Q4_K, Q5_K, Q6_K and Q8_0 rows, contiguous and aligned; got {qtype}")
        x_in, x_sums = gemv_prep(x, GEMV_QTYPES[qtype][1]) if cfg.get("PREP", True) else (x, None)
        launch_gguf_gemv(x_in, w_bytes, qtype, y, n, k, cfg, x_sums=x_sums)
        return y
    launch_gguf_matmul(x, w_bytes, qtype, y, n, k, cfg)
    return y


# --------------------------------------------------------------------------------------------------------------------
# the GEMV path (decode): CUDA cores, whole super-blocks per thread row, the k-quant fields as words


@triton_kernel
def _u2f(v):
    """Small non-negative int32 values (< 2^23) -> fp32, exactly, without an integer-to-float conversion."""
    return (v | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton_kernel
def _split4(v):
    """The four entries along the last axis of a [ROWS, LANES, 4] tile (held by one thread) as [ROWS, LANES] tiles:
    register moves."""
    a, b = tl.split(tl.reshape(v, (v.shape[0], v.shape[1], 2, 2)))  # columns (0, 2), (1, 3)
    a0, a1 = tl.split(a)
    b0, b1 = tl.split(b)
    return a0, b0, a1, b1


@triton_kernel
def _nib16v(v, bit, mask16):
    """The 4 bits of int32 v at `bit` moved to bits 16-19 and masked (mask16 = 0x000F0000, or wider): `bit` a tensor
    of compile-time constants (an arange along an axis one thread holds), so each shift is an immediate."""
    return tl.where(bit <= 16, v << tl.maximum(16 - bit, 0), v >> tl.maximum(bit - 16, 0)) & mask16


@triton_kernel
def _bits_to(v, bit, to: tl.constexpr):
    """v shifted so that bit `bit` (a tensor of compile-time constants along an axis one thread holds) lands at
    `to`: each shift an immediate."""
    return tl.where(bit <= to, v << tl.maximum(to - bit, 0), v >> tl.maximum(bit - to, 0))


@triton_kernel
def _k4_sub_acc(acc4, part, xs, ds, dc, lane0, xsum_ptr, xrow, stride_sm, group, t: tl.constexpr, tcol,
                X_SUMS: tl.constexpr, BLOCK_M: tl.constexpr):
    """Q4_K / Q5_K: sub-block `group`'s [ROWS, LANES, 4] partial products (128 + q) x into acc4 for token t:
    sum (d sc q - dmin m) x = d sc sum (128 + q) x - (128 d sc + dmin m) sum x, the sum of x given (X_SUMS, taken by
    lane 0) or each lane's share of xs."""
    if X_SUMS:
        xsum = tl.where(lane0, tl.load(xsum_ptr + xrow * stride_sm + group), 0.0)  # [1, LANES]
    else:
        xsum = tl.sum(xs, axis=2)  # [ROWS, LANES]
    rs = ds * tl.sum(part, axis=2) - dc * xsum  # [ROWS, LANES]
    if BLOCK_M == 1:
        acc4 = acc4 + rs
    else:
        acc4 = acc4 + tl.where(tcol[None, None, :] == t, rs[:, :, None], 0.0)
    return acc4


@triton_kernel
def _q5k_word(qs, qh, J: tl.constexpr, P: tl.constexpr, m_lo, m_hi):
    """Q5_K: sub-block J's four 5-bit values (J = 2c + P) of a nibble word (low nibbles for P = 0, high for 1) and the
    qh word of the same four l, at bits 8b .. 8b + 4 of the result (bit J of each qh byte moved to bit 4)."""
    if P == 1:
        qs = qs >> 4
    if J < 4:
        qh = qh << (4 - J)
    elif J > 4:
        qh = qh >> (J - 4)
    return (qs & m_lo) | (qh & m_hi)


@triton_kernel
def _q4k_pieces(w_ptrs, h_ptrs, off, LANES: tl.constexpr):
    """A Q4_K super-block at word offset `off`: the header, then the 16-byte pieces of nibbles, [ROWS, LANES, 4]
    int32 each: pieces 0-7 (LANES = 1), or chunk c's two pieces, one a lane, as the c-th (LANES = 2; the last four
    are the first again, unused)."""
    hdr = tl.load(h_ptrs + off)
    q0 = tl.load(w_ptrs + (off + 4))
    if LANES == 2:
        q1 = tl.load(w_ptrs + (off + 12))
        q2 = tl.load(w_ptrs + (off + 20))
        q3 = tl.load(w_ptrs + (off + 28))
        q4, q5, q6, q7 = q0, q0, q0, q0
    else:
        q1 = tl.load(w_ptrs + (off + 8))
        q2 = tl.load(w_ptrs + (off + 12))
        q3 = tl.load(w_ptrs + (off + 16))
        q4 = tl.load(w_ptrs + (off + 20))
        q5 = tl.load(w_ptrs + (off + 24))
        q6 = tl.load(w_ptrs + (off + 28))
        q7 = tl.load(w_ptrs + (off + 32))
    return hdr, q0, q1, q2, q3, q4, q5, q6, q7


@triton_kernel
def _pick8(i: tl.constexpr, v0, v1, v2, v3, v4, v5, v6, v7):
    """v_i, i a compile-time constant."""
    if i < 4:
        out = pick4(i, v0, v1, v2, v3)
    else:
        out = pick4(i - 4, v4, v5, v6, v7)
    return out


@triton_kernel
def _q4k_scale_min(h0, h1, h2, h3, J: tl.constexpr):
    """Sub-block J's (d * sc, dmin * m) of Q4_K super-blocks from their header words [ROWS]: h0 = d | dmin << 16,
    h1..h3 = the 12 packed scale bytes (6-bit sc, m; sub-blocks 4-7 keep their high bits in bytes 0-7's top bits)."""
    d = (h0 & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    dmin = (h0 >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    if J < 4:
        sc = (h1 >> (8 * J)) & 63
        m = (h2 >> (8 * J)) & 63
    else:
        s: tl.constexpr = 8 * (J - 4)
        sc = ((h3 >> s) & 15) | ((h1 >> (s + 2)) & 48)
        m = ((h3 >> (s + 4)) & 15) | ((h2 >> (s + 2)) & 48)
    return d * _u2f(sc), dmin * _u2f(m)


@triton_kernel
def _q4k_sub_scales(h0, h1, h2, h3, J: tl.constexpr):
    """Sub-block J's (d * sc, 128 * d * sc + dmin * m) (_q4k_scale_min): the 128 is the offset of the 128 + q values
    the loop multiplies (see _gguf_gemv_kernel)."""
    ds, dm = _q4k_scale_min(h0, h1, h2, h3, J)
    return ds, 128.0 * ds + dm


@triton_kernel
def _gemv_x_row(t: tl.constexpr, pid_m, pair, sorted_token_ids_ptr, num_valid_tokens, A_ROW_DIV: tl.constexpr,
                BLOCK_M: tl.constexpr, DENSE: tl.constexpr, PAIRS: tl.constexpr):
    """Row of x (int64) of the row block's token t. A token past the end (the sorted list's padding, a last row
    block's tail) reads the last valid row instead: its output is never stored, and no load needs a mask."""
    if PAIRS:
        tok = pair
    else:
        if DENSE:
            tok = pid_m * BLOCK_M + t
        else:
            tok = tl.load(sorted_token_ids_ptr + pid_m * BLOCK_M + t)  # a pair index; padding holds the sentinel
        tok = tl.minimum(tok, num_valid_tokens - 1)
    return (tok // A_ROW_DIV).to(tl.int64)


@triton_kernel
def _gemv_x_sum(xs, xsum_ptr, xrow, stride_sm, group, X_SUMS: tl.constexpr):
    """The sum of a scale group's activations: given (X_SUMS), or from the [ROWS, 4] partial sums xs."""
    if X_SUMS:
        total = tl.load(xsum_ptr + xrow * stride_sm + group)
    else:
        total = tl.sum(xs, axis=1)
    return total


@triton_kernel
def _gemv_acc(acc, rs, t: tl.constexpr, tcol, BLOCK_M: tl.constexpr):
    """acc [ROWS] (one token) or [ROWS, BLOCK_M] plus token t's [ROWS] sums."""
    if BLOCK_M == 1:
        acc = acc + rs
    else:
        acc = acc + tl.where(tcol[None, :] == t, rs[:, None], 0.0)
    return acc


@triton_kernel
def _ld_h16(p):
    """int16 at p, zero-extended to int32."""
    return tl.load(p).to(tl.uint16, bitcast=True).to(tl.int32)


@triton_kernel
def _ld_w16(p):
    """The int32 of the two int16 at p, p + 1 (little-endian): four bytes from a 2-byte aligned address."""
    return _ld_h16(p) | (_ld_h16(p + 1) << 16)


@triton_kernel
def _ld_s8(p, e: tl.constexpr):
    """Byte e of the int16 at p as a signed value, fp32."""
    v = tl.load(p).to(tl.int32)  # sign-extended int16
    if e == 0:
        v = (v << 24) >> 24
    else:
        v = v >> 8
    return v.to(tl.float32)


@triton_kernel
def _q6k_run_word(src, wh, run: tl.constexpr, m_lo, m_hi):
    """Q6_K: the four 6-bit values of run `run` (0-3) of four consecutive l, at bits 8b .. 8b + 5 of the result:
    the low nibbles from src (ql bytes; runs 2 and 3 take the high nibbles), the two high bits from wh (qh bytes,
    at bit 2 run of each) moved to bit 4 of each byte. m_lo = 0x0F0F0F0F, m_hi = 0x30303030."""
    if run >= 2:
        src = src >> 4
    if run == 0:
        wh = wh << 4
    elif run == 1:
        wh = wh << 2
    elif run == 3:
        wh = wh >> 2
    return (src & m_lo) | (wh & m_hi)


@triton_kernel
def _q8_0_pair(wbase):
    """A pair of Q8_0 blocks (68 bytes) as its 17 int32 words from pointers `wbase`: word 0 = d0 | q0[0, 2) << 16,
    words 1-7 q0[2, 30), word 8 = q0[30, 32) | d1 << 16, words 9-16 q1."""
    return (tl.load(wbase), tl.load(wbase + 1), tl.load(wbase + 2), tl.load(wbase + 3), tl.load(wbase + 4),
            tl.load(wbase + 5), tl.load(wbase + 6), tl.load(wbase + 7), tl.load(wbase + 8), tl.load(wbase + 9),
            tl.load(wbase + 10), tl.load(wbase + 11), tl.load(wbase + 12), tl.load(wbase + 13), tl.load(wbase + 14),
            tl.load(wbase + 15), tl.load(wbase + 16))


@triton_kernel
def _q8_0_scale(wd, blk: tl.constexpr):
    """Block blk's (0, 1) fp16 scale d of a pair's words (_q8_0_pair), as fp32."""
    if blk == 0:
        bits = wd[0] & 0xFFFF
    else:
        bits = wd[8] >> 16
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton_kernel
def _q8_0_word(wd, blk: tl.constexpr, i: tl.constexpr):
    """Codes 4i .. 4i + 3 of block blk of a pair's words (_q8_0_pair) as one int32: block 0's sit 2 bytes into its
    words (bytes 2 + 4i .. 5 + 4i of the pair)."""
    if blk == 0:
        word = ((wd[i] >> 16) & 0xFFFF) | (wd[i + 1] << 16)
    else:
        word = wd[9 + i]
    return word


@triton_kernel
def _prmt(a, b, sel, EMULATE: tl.constexpr):
    """The bytes of int32 words a (0-3) and b (4-7) that sel's four nibbles name, low byte first (PTX prmt: one
    instruction); sel 0x3210 (a) or 0x5432 (a's high half, then b's low half) under the interpreter."""
    if EMULATE:
        out = tl.where(sel == 0x5432, ((a >> 16) & 0xFFFF) | (b << 16), a)
    else:
        out = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, sel], dtype=tl.int32,
                                        is_pure=True, pack=1)
    return out


@triton_kernel
def _q6k_words(base, w: tl.constexpr, sel, EMULATE: tl.constexpr):
    """Q6_K as int32 words (Q6_WORDS): the four words of super-block bytes 4w .. 4w + 15 from its first word `base`
    [ROWS]: five loads, each word one byte permute of two (sel 0x5432 where the super-block starts 2 bytes into
    `base`, its words the high half of one and the low half of the next; else 0x3210)."""
    v0 = tl.load(base + w)
    v1 = tl.load(base + (w + 1))
    v2 = tl.load(base + (w + 2))
    v3 = tl.load(base + (w + 3))
    v4 = tl.load(base + (w + 4))
    return (_prmt(v0, v1, sel, EMULATE), _prmt(v1, v2, sel, EMULATE), _prmt(v2, v3, sel, EMULATE),
            _prmt(v3, v4, sel, EMULATE))


@triton_kernel
def _q6k_head(s_base, sb, EMULATE: tl.constexpr):
    """Q6_K super-block sb as int32 words from its first word `s_base` (a tensor of pointers): the byte permute
    selector of its words (_q6k_words), d as fp32 (bytes 208 .. 209) and the four words of its 16 int8 scales
    (bytes 192 .. 207)."""
    sel = tl.where(sb % 2 == 1, 0x5432, 0x3210) + tl.zeros(s_base.shape, dtype=tl.int32)
    dw = tl.load(s_base + 52)  # bytes 208 .. 211 (even) or 206 .. 209 (odd) of the super-block
    d = _prmt(dw, dw, sel, EMULATE).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return sel, d, _q6k_words(s_base, 48, sel, EMULATE)


def _gguf_gemv_kernel(
    x_ptr,  # [rows, K] activations (fp32, or 16-bit), contiguous along K
    xsum_ptr,  # X_SUMS: fp32 [rows, K / XG], the sum of each group of XG activations (XG: the type's scale group)
    w_ptr,  # GGUF rows [E, N, row bytes] viewed as words: int32 for Q4_K (144-byte blocks), int16 for Q6_K (210)
    u_ptr,  # GATED: the up projection's, same type and shape
    c_ptr,  # [M_out, N]
    csum_ptr,  # SUMS_OUT: fp32 [M_out, N / SUMS_OUT], the sums of each group of SUMS_OUT outputs as stored
    topk_weights_ptr, sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,  # as _gguf_matmul_kernel
    part_ptr, count_ptr,  # SLOT_SUM > 1: fp32 partial sums and int32 arrival counters (fp8_gemm.split_k_sum)
    N, num_valid_tokens, num_pid_m,
    mask16,  # 0x000F0000 as a launch argument: an immediate would be rematerialized before every LOP3
    stride_xm, stride_sm, stride_we, stride_ue, stride_cm,  # the weight strides in words
    K: tl.constexpr, QTYPE: tl.constexpr,
    A_ROW_DIV: tl.constexpr, GATED: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, OUT_MANT: tl.constexpr,
    X_SUMS: tl.constexpr = False,  # the activations' group sums come in (xsum_ptr) instead of being added up here
    SUMS_OUT: tl.constexpr = 0,  # write the output's sums over groups of this many columns (csum_ptr)
    PREFETCH: tl.constexpr = False,  # Q4_K: the next super-block's words loaded while this one is computed
    LANES: tl.constexpr = 1,  # Q4_K: threads a row (1 or 2)
    DENSE: tl.constexpr = False,  # a plain linear: rows of x in order, expert 0
    PAIRS: tl.constexpr = False, SLOT_SUM: tl.constexpr = 0, NUM_EXPERTS: tl.constexpr = 0,  # as _gguf_matmul_kernel
    SPLIT_K: tl.constexpr = 1,  # programs a tile (SLOT_SUM: a slot) along axis 1, each over K/256/SPLIT_K super-blocks
    Q6_WORDS: tl.constexpr = False,  # Q6_K rows as int32 (K/256 even): 4-byte loads, a super-block 2 bytes in when odd
    EMULATE: tl.constexpr = False,  # the interpreter: PTX (Q6_WORDS' byte permutes) computed in plain operations
    PDL: tl.constexpr = False,  # programmatic dependent launch (fp8_gemm.pdl_enter)
):
    pdl_enter(PDL)  # the activations and the routing are the previous kernels' output
    pid = tl.program_id(0)
    pid_m = pid % num_pid_m  # row blocks fastest: the blocks of one expert read its rows at about the same time
    pid_n = pid // num_pid_m
    if not (DENSE or PAIRS):
        if pid_m * BLOCK_M >= tl.load(num_tokens_post_padded_ptr):
            return
    pid_s = tl.program_id(1)
    HALVES: tl.constexpr = 2 if GATED else 1
    ROWS: tl.constexpr = HALVES * BLOCK_N
    r = tl.arange(0, ROWS)
    offs_n = pid_n * BLOCK_N + r % BLOCK_N  # [ROWS] output column of each weight row
    row_mask = offs_n < N  # (rows past N read row N - 1: no load needs a mask)
    pair = pid_m
    if PAIRS:
        tl.static_assert(BLOCK_M == 1, "PAIRS: one pair per program")
        pair, offs_tok64, tok_mask, _, expert, routed = pair_rows(expert_ids_ptr, pid_m, pid_s, num_valid_tokens, r,
                                                                  A_ROW_DIV, SLOT_SUM, NUM_EXPERTS, 1, SPLIT_K)
        row_mask = row_mask & routed
    else:
        _, tok_mask, offs_tok64, expert = block_rows(sorted_token_ids_ptr, expert_ids_ptr, pid_m, num_valid_tokens,
                                                     BLOCK_M, DENSE)
    # the row stride in words follows from K (a constexpr), so the compiler knows each row's alignment
    if QTYPE == 12:
        SB_WORDS: tl.constexpr = 36  # 144 bytes: d | dmin, 3 words of scales, 32 words of nibbles
    elif QTYPE == 13:
        SB_WORDS: tl.constexpr = 44  # 176 bytes: d | dmin, 3 words of scales, 8 of qh, 32 of nibbles
    elif QTYPE == 8:
        SB_WORDS: tl.constexpr = 68  # 256 values as int32: four pairs of 34-byte blocks, 17 words a pair
    else:
        SB_WORDS: tl.constexpr = 105  # 210 bytes as int16: ql[64], qh[32], scales[8], d
    ROW_WORDS: tl.constexpr = K // 256 * SB_WORDS // (2 if Q6_WORDS else 1)  # (Q6_WORDS: int32 words)
    row64 = tl.minimum(offs_n, N - 1).to(tl.int64) * ROW_WORDS
    if GATED:
        row_base = tl.where(r < BLOCK_N, w_ptr + expert * stride_we + row64, u_ptr + expert * stride_ue + row64)
    else:
        row_base = w_ptr + expert * stride_we + row64  # [ROWS] pointers
    tcol = tl.arange(0, BLOCK_M)
    acc = tl.zeros((ROWS,) if BLOCK_M == 1 else (ROWS, BLOCK_M), dtype=tl.float32)
    offs_4 = tl.arange(0, 4)
    bytes_at = 8 * offs_4[None, :]  # [1, 4] bit of byte b of a word
    bytes3 = bytes_at[:, None, :]  # [1, 1, 4]
    zero_tile = tl.zeros((ROWS, 4), dtype=tl.int32)
    # four consecutive activations as a [ROWS, 4] tile, the same for every row: a tile that small would be spread
    # over the threads, while one vector each is what every thread needs
    x_tile = zero_tile + offs_4[None, :]

    SB_PER: tl.constexpr = K // 256 // SPLIT_K  # super-blocks a program (the launcher makes SPLIT_K divide them)
    sb0 = (pid_s % SPLIT_K) * SB_PER if SPLIT_K > 1 else 0  # (SLOT_SUM: pid_s = slot * SPLIT_K + share)
    if QTYPE == 12 or QTYPE == 13:  # [ROWS, LANES, 4] tiles: lane j of a row reads 16-byte pieces 2c + j
        # (Q4_K, LANES = 2) or all of them (LANES = 1, the launcher's only choice for Q5_K)
        offs_j = tl.arange(0, LANES)[None, :, None]
        base3 = tl.multiple_of(row_base, 16)[:, None, None] + offs_4[None, None, :]  # 16-byte aligned pieces
        x3 = tl.zeros((ROWS, LANES, 4), dtype=tl.int32) + 16 * offs_j + offs_4[None, None, :]  # lane j: 16 further
        lane0 = tl.arange(0, LANES)[None, :] == 0  # [1, LANES]
        acc4 = tl.zeros((ROWS, LANES) if BLOCK_M == 1 else (ROWS, LANES, BLOCK_M), dtype=tl.float32)
    if QTYPE == 12:
        w_ptrs = base3 + 4 * offs_j  # [ROWS, LANES, 4]
        h_ptrs = base3 + 0 * offs_j  # the header, read by every lane
        nxt = _q4k_pieces(w_ptrs, h_ptrs, sb0 * 36, LANES)  # (PREFETCH: the program's first super-block)
    if QTYPE == 13:  # Q5_K's masks (its tiles take one thread a row)
        tl.static_assert(LANES == 1, "Q5_K: one thread a row")
        m5 = mask16 | (mask16 << 1)  # 0x001F0000, from the launch argument as the other masks
        m_lo = (mask16 >> 16) * 0x01010101  # 0x0F0F0F0F
        m_hi = ((mask16 >> 15) & 0x10) * 0x01010101  # 0x10101010
    for sb in range(sb0, sb0 + SB_PER):
        if QTYPE == 12:  # Q4_K: word 8c + w of the nibbles holds, byte b, value 4w + b of sub-block 2c (low nibble)
            # and of sub-block 2c + 1 (high nibble). A row is one thread's (LANES = 1) or two's: each 16-byte piece
            # is one load, split into its four words in registers; a word's four bytes make a tile whose last axis
            # (byte b) one thread holds, so its shifts are constants, and meet the four consecutive activations
            # 4w .. 4w + 3. Two lanes read 32 contiguous bytes of a row per load, half as many rows a warp's load
            if PREFETCH:  # this super-block's pieces came in during the last one; the next one's go out now
                hdr, q0, q1, q2, q3, q4, q5, q6, q7 = nxt
                nxt = _q4k_pieces(w_ptrs, h_ptrs, tl.minimum(sb + 1, sb0 + SB_PER - 1) * 36, LANES)
            else:
                hdr, q0, q1, q2, q3, q4, q5, q6, q7 = _q4k_pieces(w_ptrs, h_ptrs, sb * 36, LANES)
            h0, h1, h2, h3 = _split4(hdr)  # [ROWS, LANES] d | dmin << 16, then the 12 scale bytes
            for c in tl.static_range(4):
                for p in tl.static_range(2):
                    ds, dc = _q4k_sub_scales(h0, h1, h2, h3, 2 * c + p)  # [ROWS, LANES]
                    for t in tl.static_range(BLOCK_M):
                        xrow = _gemv_x_row(t, pid_m, pair, sorted_token_ids_ptr, num_valid_tokens, A_ROW_DIV, BLOCK_M,
                                           DENSE, PAIRS)
                        x_ptrs = x_ptr + xrow * stride_xm + (sb * 256 + 64 * c + 32 * p) + x3  # [ROWS, LANES, 4]
                        part = tl.full((ROWS, LANES, 4), -0.0, dtype=tl.float32)
                        xs = tl.full((ROWS, LANES, 4), -0.0, dtype=tl.float32)
                        for hw in tl.static_range(2 // LANES):
                            wq = _split4(_pick8(c if LANES == 2 else 2 * c + hw, q0, q1, q2, q3, q4, q5, q6, q7))
                            for w in tl.static_range(4):
                                f = (_nib16v(wq[w][:, :, None], bytes3 + 4 * p, mask16) | 0x43000000).to(
                                    tl.float32, bitcast=True)  # [ROWS, LANES, 4] 128 + q
                                xw = tl.load(x_ptrs + 4 * (4 * hw + w)).to(tl.float32)
                                part += f * xw
                                if not X_SUMS:
                                    xs += xw
                        acc4 = _k4_sub_acc(acc4, part, xs, ds, dc, lane0, xsum_ptr, xrow, stride_sm,
                                           sb * 8 + 2 * c + p, t, tcol, X_SUMS, BLOCK_M)
        elif QTYPE == 13:  # Q5_K (176 bytes: d | dmin, 3 words of scales, 8 words of qh, 32 of nibbles): Q4_K's
            # value with a fifth bit, bit j of qh byte l for value l of sub-block j. qh byte 4w + b sits in qh word w
            # at byte b, as the nibbles' word 8c + w does: the two words merge into one of four 5-bit values (two
            # LOP3s), each then moved to bits 16-19 + 20 under 2^7's exponent: 128 + q5
            off = sb * 44
            h0, h1, h2, h3 = _split4(tl.load(base3 + off))  # [ROWS, 1] d | dmin << 16, then the scale bytes
            qa0, qa1, qa2, qa3 = _split4(tl.load(base3 + (off + 4)))  # qh words 0-3
            qb0, qb1, qb2, qb3 = _split4(tl.load(base3 + (off + 8)))  # qh words 4-7
            for c in tl.static_range(4):
                lo = _split4(tl.load(base3 + (off + 12 + 8 * c)))  # nibble words 8c .. 8c + 3
                hi = _split4(tl.load(base3 + (off + 16 + 8 * c)))  # 8c + 4 .. 8c + 7
                for p in tl.static_range(2):
                    ds, dc = _q4k_sub_scales(h0, h1, h2, h3, 2 * c + p)  # [ROWS, 1]
                    for t in tl.static_range(BLOCK_M):
                        xrow = _gemv_x_row(t, pid_m, pair, sorted_token_ids_ptr, num_valid_tokens, A_ROW_DIV, BLOCK_M,
                                           DENSE, PAIRS)
                        x_ptrs = x_ptr + xrow * stride_xm + (sb * 256 + 64 * c + 32 * p) + x3  # [ROWS, 1, 4]
                        part = tl.full((ROWS, 1, 4), -0.0, dtype=tl.float32)
                        xs = tl.full((ROWS, 1, 4), -0.0, dtype=tl.float32)
                        for w in tl.static_range(8):
                            qs_w = _pick8(w, lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3])
                            qh_w = _pick8(w, qa0, qa1, qa2, qa3, qb0, qb1, qb2, qb3)
                            z = _q5k_word(qs_w, qh_w, 2 * c + p, p, m_lo, m_hi)  # [ROWS, 1]
                            f = (_nib16v(z[:, :, None], bytes3, m5) | 0x43000000).to(tl.float32, bitcast=True)
                            xw = tl.load(x_ptrs + 4 * w).to(tl.float32)  # [ROWS, 1, 4] values 4w .. 4w + 3
                            part += f * xw
                            if not X_SUMS:
                                xs += xw
                        acc4 = _k4_sub_acc(acc4, part, xs, ds, dc, lane0, xsum_ptr, xrow, stride_sm,
                                           sb * 8 + 2 * c + p, t, tcol, X_SUMS, BLOCK_M)
        elif QTYPE == 8:  # Q8_0 as int32, blocks in pairs (68 bytes, 17 words): word 0 = d0 | q0[0, 2) << 16,
            # words 1-7 q0[2, 30), word 8 = q0[30, 32) | d1 << 16, words 9-16 q1. Block 0's words are shifted
            # 2 bytes (one funnel shift a word). Byte b of a word, moved to bits 15-22 and its sign bit flipped
            # under the exponent of 2^8, is the float 384 + q (one shift and one LOP3)
            m8 = (mask16 >> 1) | (mask16 << 3)  # 0x007F8000
            for pr in tl.static_range(4):
                wbase = row_base + (sb * 68 + pr * 17)
                wd = _q8_0_pair(wbase)
                for blk in tl.static_range(2):
                    d = _q8_0_scale(wd, blk)
                    for t in tl.static_range(BLOCK_M):
                        xrow = _gemv_x_row(t, pid_m, pair, sorted_token_ids_ptr, num_valid_tokens, A_ROW_DIV, BLOCK_M,
                                           DENSE, PAIRS)
                        x_ptrs = x_ptr + xrow * stride_xm + (sb * 256 + 64 * pr + 32 * blk) + x_tile  # [ROWS, 4]
                        part = tl.full((ROWS, 4), -0.0, dtype=tl.float32)
                        xs = tl.full((ROWS, 4), -0.0, dtype=tl.float32)
                        for i in tl.static_range(8):
                            word = _q8_0_word(wd, blk, i)
                            f = ((_bits_to(word[:, None], bytes_at, 15) & m8) ^ 0x43C00000).to(tl.float32,
                                                                                             bitcast=True)
                            xw = tl.load(x_ptrs + 4 * i).to(tl.float32)  # values 4i .. 4i + 3 of the block
                            part += f * xw
                            if not X_SUMS:
                                xs += xw
                        xsum = _gemv_x_sum(xs, xsum_ptr, xrow, stride_sm, sb * 8 + 2 * pr + blk, X_SUMS)
                        # sum d q x = d (sum (384 + q) x - 384 sum x)
                        acc = _gemv_acc(acc, d * (tl.sum(part, axis=1) - 384.0 * xsum), t, tcol, BLOCK_M)
        else:  # Q6_K, as int16: ql[0, 64) (two halves of 32), qh[64, 96), int8 scales in [96, 104), d at 104. Half
            # h's value 128h + 32 run + l (l < 32): low bits from ql byte 64h + l (runs 0, 2: low, high nibble) or
            # 64h + 32 + l (runs 1, 3), two high bits at 2 run of qh byte 32h + l; scale (128h + 32 run + l) // 16.
            # Two int16 loads make the word of bytes l .. l + 3 (4-byte alignment is not given: blocks are 210 bytes)
            m6 = mask16 | (mask16 << 2)  # 0x003F0000, from the launch argument as the other masks
            m_lo = (mask16 >> 16) * 0x01010101  # 0x0F0F0F0F
            m_hi = ((mask16 >> 12) & 0x30) * 0x01010101  # 0x30303030
            if Q6_WORDS:  # int32 words: super-block sb starts at word (105 sb) // 2, 2 bytes into it when sb is odd;
                # the word of bytes o .. o + 3 (o a multiple of 4) is word o / 4 there, or its high half and the next
                # word's low half (_q6k_words: 5 loads for 4 words)
                s_base = row_base + (105 * sb) // 2  # [ROWS] int32 pointers
                sel, d, sc4 = _q6k_head(s_base, sb, EMULATE)
            else:
                s_base = row_base + sb * 105
                d = tl.load(s_base + 104).to(tl.float16, bitcast=True).to(tl.float32)  # [ROWS]
            for h in tl.static_range(2):
                for g in tl.static_range(2):  # l in [16 g, 16 g + 16): one scale per run
                    if Q6_WORDS:  # ql bytes 64h + 16g .., 64h + 32 + 16g .., qh bytes 128 + 32h + 16g ..: 4 words each
                        qa = _q6k_words(s_base, 16 * h + 4 * g, sel, EMULATE)
                        qb = _q6k_words(s_base, 16 * h + 8 + 4 * g, sel, EMULATE)
                        qh4 = _q6k_words(s_base, 32 + 8 * h + 4 * g, sel, EMULATE)
                    for t in tl.static_range(BLOCK_M):  # the weights' loads and decoding are shared
                        part0 = tl.full((ROWS, 4), -0.0, dtype=tl.float32)
                        part1 = tl.full((ROWS, 4), -0.0, dtype=tl.float32)
                        part2 = tl.full((ROWS, 4), -0.0, dtype=tl.float32)
                        part3 = tl.full((ROWS, 4), -0.0, dtype=tl.float32)
                        xrow = _gemv_x_row(t, pid_m, pair, sorted_token_ids_ptr, num_valid_tokens, A_ROW_DIV, BLOCK_M,
                                           DENSE, PAIRS)
                        x_ptrs = x_ptr + xrow * stride_xm + (sb * 256 + 128 * h + 16 * g) + x_tile  # [ROWS, 4]
                        xs0 = tl.full((ROWS, 4), -0.0, dtype=tl.float32)
                        xs1 = tl.full((ROWS, 4), -0.0, dtype=tl.float32)
                        xs2 = tl.full((ROWS, 4), -0.0, dtype=tl.float32)
                        xs3 = tl.full((ROWS, 4), -0.0, dtype=tl.float32)
                        for q in tl.static_range(4):  # bytes l = 16 g + 4 q .. + 3
                            if Q6_WORDS:
                                wa = pick4(q, qa[0], qa[1], qa[2], qa[3])
                                wb = pick4(q, qb[0], qb[1], qb[2], qb[3])
                                wh = pick4(q, qh4[0], qh4[1], qh4[2], qh4[3])
                            else:
                                o = 32 * h + 8 * g + 2 * q  # int16 index of ql byte 64 h + l
                                wa = _ld_w16(s_base + o)  # [ROWS] ql bytes 64h + l .. + 3
                                wb = _ld_w16(s_base + (o + 16))  # 64h + 32 + l ..
                                wh = _ld_w16(s_base + (64 + 16 * h + 8 * g + 2 * q))  # qh bytes 32h + l ..
                            for run in tl.static_range(4):
                                # the run's four 6-bit values at bits 8b .. 8b + 5 of one word, then each moved to
                                # bits 16-21 under the exponent of 2^7: 128 + q6
                                z = _q6k_run_word(wa if run % 2 == 0 else wb, wh, run, m_lo, m_hi)
                                f = (_nib16v(z[:, None], bytes_at, m6) | 0x43000000).to(tl.float32, bitcast=True)
                                xw = tl.load(x_ptrs + (32 * run + 4 * q)).to(tl.float32)
                                if run == 0:
                                    part0 += f * xw
                                    xs0 += xw
                                elif run == 1:
                                    part1 += f * xw
                                    xs1 += xw
                                elif run == 2:
                                    part2 += f * xw
                                    xs2 += xw
                                else:
                                    part3 += f * xw
                                    xs3 += xw
                        # scale j = 8h + 2 run + g: int8 byte j of the scales, in int16 96 + 4h + run
                        # sum d sc (q6 - 32) x = d sc sum (128 + q6) x - 160 d sc sum x
                        for run in tl.static_range(4):
                            if Q6_WORDS:  # scale byte j = 8h + 2 run + g: byte j % 4 of word j // 4, signed
                                sw = pick4((8 * h + 2 * run + g) // 4, sc4[0], sc4[1], sc4[2], sc4[3])
                                ds = d * ((sw << (24 - 8 * ((2 * run + g) % 4))) >> 24).to(tl.float32)
                            else:
                                ds = d * _ld_s8(s_base + (96 + 4 * h + run), g)
                            if run == 0:
                                pr, xr = part0, xs0
                            elif run == 1:
                                pr, xr = part1, xs1
                            elif run == 2:
                                pr, xr = part2, xs2
                            else:
                                pr, xr = part3, xs3
                            xsum = _gemv_x_sum(xr, xsum_ptr, xrow, stride_sm, sb * 16 + 8 * h + 2 * run + g, X_SUMS)
                            acc = _gemv_acc(acc, ds * (tl.sum(pr, axis=1) - 160.0 * xsum), t, tcol,
                                        BLOCK_M)

    if QTYPE == 12 or QTYPE == 13:
        acc = tl.sum(acc4, axis=1)  # the lanes of each row
    if BLOCK_M == 1:
        if PAIRS:  # a slot routed nowhere read expert 0 or E - 1 and adds zeros
            acc = tl.where(row_mask, acc, 0.0)
        acc = tl.reshape(acc, (1, ROWS))
    else:
        acc = tl.trans(acc)  # [BLOCK_M, ROWS]
    gemv_store(acc, c_ptr, csum_ptr, topk_weights_ptr, part_ptr, count_ptr, pid, pid_s, pid_n, pair, offs_tok64,
               tok_mask, N, num_valid_tokens, stride_cm, GATED, BLOCK_M, BLOCK_N, MUL_ROUTED_WEIGHT, SLOT_SUM, SPLIT_K,
               OUT_MANT, SUMS_OUT)


_gguf_gemv = triton_kernel(_gguf_gemv_kernel)

def gemv_supported(*ws_qtypes: tuple[torch.Tensor, str]) -> bool:
    """Whether the GEMV kernel can read these (weight, qtype) pairs: a type it decodes, rows contiguous, each
    tensor viewable as its words (Q4_K's rows start 16-byte aligned, Q8_0's 4-byte aligned with K a multiple of
    256)."""
    for w, qtype in ws_qtypes:
        if qtype not in GEMV_QTYPES:
            return False
        word = GEMV_QTYPES[qtype][0]
        align = {"q4_k": 16, "q5_k": 16, "q8_0": 4}.get(qtype, 2)
        if qtype == "q8_0" and (w.shape[-1] // 34) % 8:  # whole 256-value steps (four pairs of blocks)
            return False
        if w.stride(-1) != 1 or (w.dim() > 1 and w.stride(-2) != w.shape[-1]):
            return False
        if w.data_ptr() % align or any(st * w.element_size() % align for st in w.stride()[:-1]):
            return False
        if w.shape[-1] % word.itemsize:
            return False
    return True


def launch_gguf_gemv(x: torch.Tensor, w: torch.Tensor, qtype: str, c: torch.Tensor, n: int, k: int, cfg: dict,
                     u: torch.Tensor | None = None,
                     routing: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                     a_row_div: int = 1, mul_routed_weight: bool = False, pairs: int = 0, slot_sum: int = 0,
                     x_sums: torch.Tensor | None = None, c_sums: torch.Tensor | None = None) -> None:
    """One launch of the GEMV kernel; arguments as launch_gguf_matmul's (u of the same qtype as w; gemv_supported
    must hold for both). x_sums: fp32 [rows of x, K / group], the sums of x over the type's scale groups, given
    instead of added up by every program; c_sums: fp32 [rows of c, N / g] written with the sums of c over groups of
    g columns as stored (the next GEMM's x_sums; BLOCK_N must be a multiple of g)."""
    word, group = GEMV_QTYPES[qtype]
    q6_words = bool(cfg.get("Q6_WORDS", False)) and qtype == "q6_k" and q6_words_supported(w, u, k)
    if q6_words:
        word = torch.int32
    w3 = (w if w.dim() == 3 else w.unsqueeze(0)).view(word)
    u3 = ((u if u.dim() == 3 else u.unsqueeze(0)).view(word)) if u is not None else w3
    weights, sorted_ids, expert_ids, total, num_pid_m, m_rows = _routing_args(x, c, routing, pairs, cfg["BLOCK_M"])
    if x_sums is not None and tuple(x_sums.shape) != (x.shape[0], k // group):
        raise ValueError(f"x_sums must be [{x.shape[0]}, {k // group}], got {tuple(x_sums.shape)}")
    sums_out, tiles, split, part, counters = gemv_grid(c, n, k, cfg, num_pid_m, u is not None, slot_sum, c_sums)
    extra = dict(PAIRS=True, SLOT_SUM=slot_sum, NUM_EXPERTS=pairs) if pairs else {}
    xs = x_sums if x_sums is not None else part
    cs = c_sums if c_sums is not None else part
    _gguf_gemv[(tiles, max(slot_sum, 1) * split)](
        x, xs, w3, u3, c, cs, weights, sorted_ids, expert_ids, total, part, counters,
        n, m_rows, num_pid_m, 0x000F0000,
        x.stride(0), xs.stride(0), w3.stride(0), u3.stride(0), c.stride(0),
        K=k, QTYPE=QTYPE_IDS[qtype], A_ROW_DIV=a_row_div, GATED=u is not None, MUL_ROUTED_WEIGHT=mul_routed_weight,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], OUT_MANT=out_mantissa_bits(c.dtype),
        X_SUMS=x_sums is not None, SUMS_OUT=sums_out, PREFETCH=bool(cfg.get("PREFETCH", False)) and qtype == "q4_k",
        LANES=cfg.get("LANES", 1) if qtype == "q4_k" else 1,
        DENSE=routing is None, SPLIT_K=split, Q6_WORDS=q6_words, EMULATE=INTERPRETED, num_warps=cfg["num_warps"],
        num_stages=1, **extra, **pdl_kwargs(c.device),
    )


def gemv_grid(c: torch.Tensor, n: int, k: int, cfg: dict, num_pid_m: int, gated: bool, slot_sum: int,
              c_sums: torch.Tensor | None) -> tuple[int, int, int, torch.Tensor, torch.Tensor]:
    """The GEMV kernels' (this module's and kernels/gguf_gemv_q8.py's) launch plan: (SUMS_OUT, tiles, SPLIT_K, fp32
    partials, arrival counters). c_sums: [rows of c, N / g], g dividing BLOCK_N; SPLIT_K must divide the
    super-blocks of K. Gated, the split programs leave the raw gate and up sums (fp8_moe.gemv_store): partials 2N
    wide; adding slots, each slot's shares leave theirs."""
    sums_out = 0
    if c_sums is not None:
        sums_out = n // c_sums.shape[1]
        if c_sums.shape[0] != c.shape[0] or n % sums_out or cfg["BLOCK_N"] % sums_out:
            raise ValueError(f"c_sums [{tuple(c_sums.shape)}] does not tile c [{c.shape[0]}, {n}] with BLOCK_N "
                             f"{cfg['BLOCK_N']}")
    tiles = num_pid_m * triton.cdiv(n, cfg["BLOCK_N"])
    split = cfg.get("SPLIT_K", 1)
    if split < 1 or (k // SUPER) % split:
        raise ValueError(f"SPLIT_K={split} must divide the {k // SUPER} super-blocks of K={k}")
    part, counters = split_k_workspace(max(slot_sum, 1) * split, c.shape[0], 2 * n if gated else n, tiles, c.device)
    return sums_out, tiles, split, part, counters


def q6_words_supported(w: torch.Tensor, u: torch.Tensor | None, k: int) -> bool:
    """Whether Q6_K weights (gemv_supported already) can be read as int32 words (Q6_WORDS): an even number of
    super-blocks a row, so that every row starts 4-byte aligned, as every tensor and stride does."""
    return (k // SUPER) % 2 == 0 and all(t.data_ptr() % 4 == 0 and all(st % 4 == 0 for st in t.stride()[:-1])
                                         for t in (w, u) if t is not None)
