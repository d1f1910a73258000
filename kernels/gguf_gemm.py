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
Block configurations: `configs/gguf_gemm.json` (shape key "N=..,K=..,<qtype>") and `configs/gguf_moe.json` (see
kernels/gguf_moe.py), by device and M bucket as the FP8 ones; defaults below.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_gemm import (
    INTERPRETED,
    device_key,
    grouped_pid,
    load_config_table,
    out_mantissa_bits,
    round_to_out_grid,
    select_config,
    split_k_sum,
    split_k_workspace,
    triton_kernel,
)
from .fp8_gemm import check_device as _check_device
from .fp8_moe import pair_rows

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
    if routing is None:
        dummy = torch.empty((1,), dtype=torch.int32, device=x.device)
        weights, sorted_ids, expert_ids, total = torch.empty((1,), dtype=torch.float32, device=x.device), dummy, \
            dummy, dummy
        num_pid_m = triton.cdiv(x.shape[0], cfg["BLOCK_M"])
        m_rows = x.shape[0]
    else:
        weights, sorted_ids, expert_ids, total = routing
        num_pid_m = c.shape[0] if pairs else sorted_ids.numel() // cfg["BLOCK_M"]
        m_rows = c.shape[0]
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


def _gemm_default_config(device: torch.device, m: int, n: int) -> dict:
    if INTERPRETED:
        # the interpreter pays per program instance and per operation, not per element: few, large tiles
        return dict(BLOCK_M=64, BLOCK_N=128, GROUP_M=1, num_warps=4, num_stages=1)
    # H100/H200: the weight bytes bound the time up to a few hundred tokens. Up to 4 rows the fp32 FMA path
    # (BLOCK_M < 16) skips the tensor cores' operand shuffles, which cost more than they save with so few rows;
    # narrow tiles give every multiprocessor a program at decode sizes
    if m <= 4:
        return dict(BLOCK_M=triton.next_power_of_2(m), BLOCK_N=32, GROUP_M=1, num_warps=4, num_stages=2)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 32 if n <= 4096 and m <= 16 else 64
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, GROUP_M=8, num_warps=4, num_stages=3)


def gemm_config(device: torch.device, m: int, n: int, k: int, qtype: str) -> dict:
    """Block configuration for gguf_linear: configs/gguf_gemm.json, else the defaults."""
    return select_config(load_config_table("gguf_gemm.json"), device_key(device), f"N={n},K={k},{qtype}", m,
                         _gemm_default_config(device, m, n))


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
    launch_gguf_matmul(x, w_bytes, qtype, y, n, k, config or gemm_config(device, m, n, k, qtype))
    return y
