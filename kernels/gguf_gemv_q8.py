"""The GGUF GEMV with 8-bit activations: integer dot products of four bytes (`dp4a`), as llama.cpp's CUDA kernels run.

kernels/gguf_gemm.py's GEMV kernel turns every weight into a float and meets its activation in an FFMA: 3.9-5.0
instructions a weight, and at one token too few warps to hide that chain (BENCHMARKS.md, "What bounds the decode
GEMVs"). Here the activations are quantized first, per block of 32 values, to int8 with one fp32 scale (amax / 127,
rounded half away from zero, as ggml's Q8_1), and each word of weight codes meets the matching word of activation
codes in one `dp4a` (four byte products added into an int32):
    Q4_K  sub-block j (32 values, 6-bit scale sc and min m):
          sum (d sc q - dmin m) x ~= d sc dx_j * sum q xq - dmin m * dx_j sum xq
          the nibbles of a word are split with one AND (low: sub-block 2c) or a shift and an AND (high: 2c + 1), and
          dx_j sum xq comes with the codes (ggml's Q8_1 `s`);
    Q5_K  as Q4_K, each code's bit 4 from its qh bit moved into the byte (one shift, AND and OR a word);
    Q8_0  block j: sum d q x ~= d dx_j * sum q xq (signed bytes on both sides);
    Q6_K  scale group of 16 (int8 scale sc): sum d sc (q - 32) x ~= d sc dx_j * (sum q xq - 32 sum xq), q the 6-bit
          code rebuilt in each byte from its low nibble and two high bits (kernels/gguf_gemm._q6k_run_word), the
          dot and the -32 term two `dp4a`s a word (the second of bytes -32), the two groups of a block of 32 added
          in int32 under their scales; rows of an even number of super-blocks (4-byte aligned), read as words, an
          odd super-block's each merged from the halves of two by one byte permute (`prmt`).
All four are the dot product of the weights with the dequantized activations, to fp32 rounding. (The exact sum of x in
the min term would not be: the error would then be that of the all-positive d sc q part alone, which the min's
cancellation magnifies several times over on a Q4_K row.)
The compiled loop issues 1.4 (Q4_K), 1.9 (Q5_K), 2.3 (Q6_K) and 0.9 (Q8_0) instructions a weight, against 4.1,
4.6, 4.8 and 4.0 for the fp32 GEMV (BENCHMARKS.md). The error is the activations' 8-bit rounding (0.5% of the
result on the tests' normal activations), which llama.cpp accepts for every quantized matmul on CUDA; the fp32
reference of that arithmetic is `gguf_gemv_q8_ref`.

Used by the MoE (kernels/gguf_moe.py, config "ACT_Q8": True on the GEMV path) for GEMM 1 (Q4_K, Q5_K, Q6_K or Q8_0
gate and up) and for GEMM 2 where down is Q4_K, Q5_K or Q8_0, or Q6_K with "Q6_Q8" (the intermediate quantized by
one more q8_prep launch or in GEMM 1's epilogue; otherwise GEMM 2 stays on the fp32 GEMV, which takes the fp32
intermediate and its group sums).
The launch arguments, the grid (PAIRS, DENSE, GATED, SPLIT_K, SLOT_SUM) and the epilogue are the GEMV kernel's,
one token a program.

Options (config keys, each the same words through the same arithmetic, so the same bits): "Q8_PREFETCH" loads the
next super-block's weight words while this one is computed; "Q8_0_VEC16" reads a Q8_0 super-block (272 bytes, 16-byte
aligned in 16-byte aligned rows) in 17 loads of 16 bytes instead of 68 of 4; "Q6_LANES" (2, 4) spreads each Q6_K row
(4-byte aligned only) over that many threads, so that a warp's load reads contiguous bytes of fewer rows.

Under Triton's interpreter (CPU tests) the `dp4a` is computed byte by byte; on a GPU it is the PTX instruction
(compute capability 6.1 and up).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_gemm import INTERPRETED, out_mantissa_bits, pdl_enter, pdl_kwargs, triton_kernel
from .fp8_moe import block_rows, gemv_store, pair_rows, pick4, q8_blocks
from .gguf_gemm import (
    QTYPE_IDS,
    SUPER,
    _gemv_x_row,
    _prmt,
    _q4k_scale_min,
    _q6k_head,
    _q6k_run_word,
    _q6k_words,
    _q8_0_pair,
    _q8_0_scale,
    _q8_0_word,
    _routing_args,
    _split4,
    dequantize_ref,
    gemv_grid,
)

Q8_QTYPES = ("q4_k", "q5_k", "q6_k", "q8_0")  # the types read (Q6_K: rows of an even number of super-blocks)
_NEG32 = tl.constexpr(-522133280)  # 0xE0E0E0E0: four bytes of -32, Q6_K's offset in a dp4a
QK = 32  # activations' block: one scale and one sum per 32 values
_QK = tl.constexpr(QK)  # the same inside kernels


def _q8_prep_kernel(x_ptr, q_ptr, d_ptr, s_ptr, K, stride_xm, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """Row pid(0) of x, BLOCK values a program: int8 codes round(x / d) (half away from zero), d = amax / 127 per
    block of 32 (1 / d taken first, as ggml), and d times the sum of each block's codes."""
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
    q3, d3 = q8_blocks(tl.reshape(v, (1, BLOCK // _QK, _QK)))
    q = tl.reshape(q3, (BLOCK // _QK, _QK))
    d = tl.reshape(d3, (BLOCK // _QK,))
    tl.store(q_ptr + row * K + tl.reshape(offs, (BLOCK // _QK, _QK)), q.to(tl.int8),
             mask=tl.reshape(offs < K, (BLOCK // _QK, _QK)))
    offs_b = tl.program_id(1) * (BLOCK // _QK) + tl.arange(0, BLOCK // _QK)
    b_mask = offs_b < K // _QK
    tl.store(d_ptr + row * (K // _QK) + offs_b, d, mask=b_mask)
    tl.store(s_ptr + row * (K // _QK) + offs_b, d * tl.sum(q, axis=1), mask=b_mask)


_q8_prep = triton_kernel(_q8_prep_kernel)


def q8_prep(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] (K a multiple of 256) -> (int8 codes [M, K], fp32 scales d [M, K/32], fp32 d * the sum of each
    block's codes [M, K/32]), one launch."""
    m, k = x.shape
    if k % SUPER:
        raise ValueError(f"8-bit activations need K a multiple of {SUPER}, got {k}")
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    d = torch.empty((m, k // QK), dtype=torch.float32, device=x.device)
    s = torch.empty((m, k // QK), dtype=torch.float32, device=x.device)
    if m:
        block = next(b for b in (1024, 512, 256) if k % b == 0)  # a power of two that tiles K
        _q8_prep[(m, triton.cdiv(k, block))](x, q, d, s, k, x.stride(0), BLOCK=block, num_warps=4,
                                             **pdl_kwargs(x.device))
    return q, d, s


def q8_prep_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q8_prep in PyTorch: the same operations in fp32 (the same bits)."""
    m, k = x.shape
    v = x.float().reshape(m, k // QK, QK)
    d = v.abs().amax(dim=-1) / 127.0
    inv = torch.where(d > 0, 1.0 / torch.where(d > 0, d, torch.ones_like(d)), torch.zeros_like(d))
    t = v * inv[..., None]
    q = torch.floor(t.abs() + 0.5) * torch.sign(t)
    return q.to(torch.int8).reshape(m, k), d, d * q.sum(dim=-1)


def q8_dequant_ref(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] as the kernels see it: its 8-bit codes times their scales (q8_prep_ref), fp32."""
    q, d, _ = q8_prep_ref(x)
    m, k = x.shape
    return (q.float().reshape(m, k // QK, QK) * d[..., None]).reshape(m, k)


def gguf_gemv_q8_ref(x: torch.Tensor, w_bytes: torch.Tensor, qtype: str) -> torch.Tensor:
    """x [M, K] @ dequantized w [N, K]^T with x taken as its 8-bit codes times their scales (module docstring):
    fp32 [M, N]."""
    return q8_dequant_ref(x) @ dequantize_ref(w_bytes, qtype).t()


@triton_kernel
def _qh_bit4(qh, bit: tl.constexpr):
    """Q5_K: bit `bit` of each byte of a word of qh bytes, moved to bit 4 (a code's fifth bit)."""
    return ((qh >> bit) & 0x01010101) << 4


@triton_kernel
def _dp4a(a, b, c, SIGNED_A: tl.constexpr, EMULATE: tl.constexpr):
    """c + the sum of the four byte products of int32 words a and b (b's bytes signed; a's signed or not)."""
    if EMULATE:
        out = c
        for k in tl.static_range(4):
            if SIGNED_A:
                ak = (a << (24 - 8 * k)) >> 24
            else:
                ak = (a >> (8 * k)) & 0xFF
            out += ak * ((b << (24 - 8 * k)) >> 24)
    else:
        if SIGNED_A:
            out = tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                            dtype=tl.int32, is_pure=True, pack=1)
        else:
            out = tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                            dtype=tl.int32, is_pure=True, pack=1)
    return out


@triton_kernel
def _kq_words(w3, off, QTYPE: tl.constexpr):
    """A Q4_K or Q5_K super-block's words at word offset `off` of the rows w3 ([ROWS, 1, 4] pointers), [ROWS, 1, 4]
    int32 each, 16 bytes a load: (header, qh 0 .. 15, qh 16 .. 31, then the nibbles' eight pieces); Q4_K has no qh
    (the header stands in, unused)."""
    QS0: tl.constexpr = 4 if QTYPE == 12 else 12
    hdr = tl.load(w3 + off)
    if QTYPE == 13:
        qa = tl.load(w3 + (off + 4))
        qb = tl.load(w3 + (off + 8))
    else:
        qa = hdr
        qb = hdr
    return (hdr, qa, qb, tl.load(w3 + (off + QS0)), tl.load(w3 + (off + QS0 + 4)), tl.load(w3 + (off + QS0 + 8)),
            tl.load(w3 + (off + QS0 + 12)), tl.load(w3 + (off + QS0 + 16)), tl.load(w3 + (off + QS0 + 20)),
            tl.load(w3 + (off + QS0 + 24)), tl.load(w3 + (off + QS0 + 28)))


@triton_kernel
def _q6k_raw(base):
    """A Q6_K super-block's 53 words from its first word `base` ([ROWS, 1] pointers) as loaded, before the byte
    permutes of _q6k_words."""
    return (tl.load(base + 0), tl.load(base + 1), tl.load(base + 2), tl.load(base + 3), tl.load(base + 4),
            tl.load(base + 5), tl.load(base + 6), tl.load(base + 7), tl.load(base + 8), tl.load(base + 9),
            tl.load(base + 10), tl.load(base + 11), tl.load(base + 12), tl.load(base + 13), tl.load(base + 14),
            tl.load(base + 15), tl.load(base + 16), tl.load(base + 17), tl.load(base + 18), tl.load(base + 19),
            tl.load(base + 20), tl.load(base + 21), tl.load(base + 22), tl.load(base + 23), tl.load(base + 24),
            tl.load(base + 25), tl.load(base + 26), tl.load(base + 27), tl.load(base + 28), tl.load(base + 29),
            tl.load(base + 30), tl.load(base + 31), tl.load(base + 32), tl.load(base + 33), tl.load(base + 34),
            tl.load(base + 35), tl.load(base + 36), tl.load(base + 37), tl.load(base + 38), tl.load(base + 39),
            tl.load(base + 40), tl.load(base + 41), tl.load(base + 42), tl.load(base + 43), tl.load(base + 44),
            tl.load(base + 45), tl.load(base + 46), tl.load(base + 47), tl.load(base + 48), tl.load(base + 49),
            tl.load(base + 50), tl.load(base + 51), tl.load(base + 52))


@triton_kernel
def _q6k_words_q8(s_base, raw, w: tl.constexpr, sel, EMULATE: tl.constexpr):
    """_q6k_words, from the prefetched words `raw` (_q6k_raw) where given."""
    if raw is None:
        out = _q6k_words(s_base, w, sel, EMULATE)
    else:
        out = (_prmt(raw[w], raw[w + 1], sel, EMULATE), _prmt(raw[w + 1], raw[w + 2], sel, EMULATE),
               _prmt(raw[w + 2], raw[w + 3], sel, EMULATE), _prmt(raw[w + 3], raw[w + 4], sel, EMULATE))
    return out


@triton_kernel
def _q6k_head_q8(s_base, sb, raw, EMULATE: tl.constexpr):
    """_q6k_head, from the prefetched words `raw` where given."""
    if raw is None:
        sel, d, sc4 = _q6k_head(s_base, sb, EMULATE)
    else:
        sel = tl.where(sb % 2 == 1, 0x5432, 0x3210) + tl.zeros(s_base.shape, dtype=tl.int32)
        d = _prmt(raw[52], raw[52], sel, EMULATE).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        sc4 = _q6k_words_q8(s_base, raw, 48, sel, EMULATE)
    return sel, d, sc4


@triton_kernel
def _q8_0_vecs(w3, off):
    """A Q8_0 super-block (four pairs of blocks, 68 words) at word offset `off` of the rows w3 ([ROWS, 1, 4]
    pointers, 16-byte aligned) as 17 [ROWS, 1, 4] int32 loads."""
    return (tl.load(w3 + (off + 0)), tl.load(w3 + (off + 4)), tl.load(w3 + (off + 8)), tl.load(w3 + (off + 12)),
            tl.load(w3 + (off + 16)), tl.load(w3 + (off + 20)), tl.load(w3 + (off + 24)), tl.load(w3 + (off + 28)),
            tl.load(w3 + (off + 32)), tl.load(w3 + (off + 36)), tl.load(w3 + (off + 40)), tl.load(w3 + (off + 44)),
            tl.load(w3 + (off + 48)), tl.load(w3 + (off + 52)), tl.load(w3 + (off + 56)), tl.load(w3 + (off + 60)),
            tl.load(w3 + (off + 64)))


@triton_kernel
def _q8_0_unvec(vec):
    """_q8_0_vecs' 17 tiles as the super-block's 68 words [ROWS, 1] (register moves)."""
    w0, w1, w2, w3 = _split4(vec[0])
    w4, w5, w6, w7 = _split4(vec[1])
    w8, w9, w10, w11 = _split4(vec[2])
    w12, w13, w14, w15 = _split4(vec[3])
    w16, w17, w18, w19 = _split4(vec[4])
    w20, w21, w22, w23 = _split4(vec[5])
    w24, w25, w26, w27 = _split4(vec[6])
    w28, w29, w30, w31 = _split4(vec[7])
    w32, w33, w34, w35 = _split4(vec[8])
    w36, w37, w38, w39 = _split4(vec[9])
    w40, w41, w42, w43 = _split4(vec[10])
    w44, w45, w46, w47 = _split4(vec[11])
    w48, w49, w50, w51 = _split4(vec[12])
    w52, w53, w54, w55 = _split4(vec[13])
    w56, w57, w58, w59 = _split4(vec[14])
    w60, w61, w62, w63 = _split4(vec[15])
    w64, w65, w66, w67 = _split4(vec[16])
    return (w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11, w12, w13, w14, w15, w16, w17, w18, w19, w20, w21, w22,
            w23, w24, w25, w26, w27, w28, w29, w30, w31, w32, w33, w34, w35, w36, w37, w38, w39, w40, w41, w42, w43,
            w44, w45, w46, w47, w48, w49, w50, w51, w52, w53, w54, w55, w56, w57, w58, w59, w60, w61, w62, w63, w64,
            w65, w66, w67)


@triton_kernel
def _q8_0_pair_of(words, pr: tl.constexpr):
    """Pair pr's 17 words (as _q8_0_pair loads them) out of a super-block's 68 (_q8_0_unvec)."""
    return (words[17 * pr + 0], words[17 * pr + 1], words[17 * pr + 2], words[17 * pr + 3], words[17 * pr + 4],
            words[17 * pr + 5], words[17 * pr + 6], words[17 * pr + 7], words[17 * pr + 8], words[17 * pr + 9],
            words[17 * pr + 10], words[17 * pr + 11], words[17 * pr + 12], words[17 * pr + 13], words[17 * pr + 14],
            words[17 * pr + 15], words[17 * pr + 16])


@triton_kernel
def _q6k_run_add(i0, i1, i2, i3, isum, sc4, j: tl.constexpr, run: tl.constexpr):
    """Each run's scaled integer sum (i0 .. i3), run `run`'s plus isum times Q6_K scale j (byte j % 4 of the scale
    words' word j // 4, signed)."""
    sw = pick4(j // 4, sc4[0], sc4[1], sc4[2], sc4[3])
    t = ((sw << (24 - 8 * (j % 4))) >> 24) * isum
    if run == 0:
        i0 += t
    elif run == 1:
        i1 += t
    elif run == 2:
        i2 += t
    else:
        i3 += t
    return i0, i1, i2, i3


@triton_kernel
def _q6k_sb(acc, s_base, sb, raw, x3, xd_row, EMULATE: tl.constexpr):
    """acc [ROWS, 1] fp32 plus one Q6_K super-block's share of each row's dot product, a thread a row: s_base
    [ROWS, 1] its first words, raw its words prefetched (_q6k_raw) or None, x3 the activation words ([ROWS, 1, 4]
    offsets from the row's), xd_row its block scales. Half h's value 128h + 32 run + l: low bits from ql byte
    64h + l (runs 0, 2) or 64h + 32 + l (1, 3), high bits 2 run of qh byte 32h + l, scale 8h + 2 run + l // 16
    (kernels/gguf_gemm.py's Q6_K GEMV, the same words)."""
    sel, d, sc4 = _q6k_head_q8(s_base, sb, raw, EMULATE)
    ROWS: tl.constexpr = s_base.shape[0]
    neg32 = tl.full((ROWS, 1), _NEG32, dtype=tl.int32)
    for h in tl.static_range(2):
        i0 = tl.zeros((ROWS, 1), dtype=tl.int32)  # each run's (block of 32's) scaled integer sum
        i1 = tl.zeros((ROWS, 1), dtype=tl.int32)
        i2 = tl.zeros((ROWS, 1), dtype=tl.int32)
        i3 = tl.zeros((ROWS, 1), dtype=tl.int32)
        for g in tl.static_range(2):  # l in [16g, 16g + 16)
            qa = _q6k_words_q8(s_base, raw, 16 * h + 4 * g, sel, EMULATE)  # ql bytes 64h + 16g ..
            qb = _q6k_words_q8(s_base, raw, 16 * h + 8 + 4 * g, sel, EMULATE)  # ql bytes 64h + 32 + 16g ..
            qh4 = _q6k_words_q8(s_base, raw, 32 + 8 * h + 4 * g, sel, EMULATE)  # qh bytes 32h + 16g ..
            for run in tl.static_range(4):
                xw = _split4(tl.load(x3 + (sb * 64 + 32 * h + 8 * run + 4 * g)))  # its 16 activation codes
                isum = tl.zeros((ROWS, 1), dtype=tl.int32)
                for q in tl.static_range(4):
                    if run % 2 == 0:
                        src = pick4(q, qa[0], qa[1], qa[2], qa[3])
                    else:
                        src = pick4(q, qb[0], qb[1], qb[2], qb[3])
                    z = _q6k_run_word(src, pick4(q, qh4[0], qh4[1], qh4[2], qh4[3]), run, 0x0F0F0F0F,
                                      0x30303030)  # four codes 0 .. 63
                    isum = _dp4a(z, xw[q], isum, False, EMULATE)
                    isum = _dp4a(neg32, xw[q], isum, True, EMULATE)  # - 32 x each
                i0, i1, i2, i3 = _q6k_run_add(i0, i1, i2, i3, isum, sc4, 8 * h + 2 * run + g, run)
        for run in tl.static_range(4):
            isum = pick4(run, i0, i1, i2, i3)
            acc += d * (isum.to(tl.float32) * tl.load(xd_row + (sb * 8 + 4 * h + run)))
    return acc


@triton_kernel
def _q6k_lanes_sb(acc, s_base, sb, x3l, xd_row, LANES: tl.constexpr, EMULATE: tl.constexpr):
    """_q6k_sb with LANES threads a row ([ROWS, LANES] tiles, lane j taking words j, j + LANES, .. of every four):
    x3l the activation words' pointers [ROWS, LANES] (lane j's at j), each run's integer sum added over the lanes
    before its scale, so the result is _q6k_sb's bit for bit."""
    ROWS: tl.constexpr = s_base.shape[0]
    lane = tl.arange(0, LANES)[None, :]
    sel, d, sc4 = _q6k_head(s_base, sb, EMULATE)  # [ROWS, 1], every lane of a row the same
    sl = s_base + lane  # [ROWS, LANES]: lane j's word j of each four
    sel_l = sel + lane * 0
    odd = sel_l == 0x5432  # an odd super-block's words are merged from two; an even one's are the first alone
    neg32 = tl.full((ROWS, LANES), _NEG32, dtype=tl.int32)
    for h in tl.static_range(2):
        i0 = tl.zeros((ROWS, LANES), dtype=tl.int32)
        i1 = tl.zeros((ROWS, LANES), dtype=tl.int32)
        i2 = tl.zeros((ROWS, LANES), dtype=tl.int32)
        i3 = tl.zeros((ROWS, LANES), dtype=tl.int32)
        for g in tl.static_range(2):
            for qq in tl.static_range(4 // LANES):  # this lane's word q = qq * LANES + lane of each four
                wa = 16 * h + 4 * g + qq * LANES  # ql bytes 64h + 16g .., 64h + 32 + 16g .., qh bytes 32h + 16g ..
                qa = _prmt(tl.load(sl + wa), tl.load(sl + (wa + 1), mask=odd, other=0), sel_l, EMULATE)
                qb = _prmt(tl.load(sl + (wa + 8)), tl.load(sl + (wa + 9), mask=odd, other=0), sel_l, EMULATE)
                wh = 32 + 8 * h + 4 * g + qq * LANES
                qh = _prmt(tl.load(sl + wh), tl.load(sl + (wh + 1), mask=odd, other=0), sel_l, EMULATE)
                for run in tl.static_range(4):
                    xw = tl.load(x3l + (sb * 64 + 32 * h + 8 * run + 4 * g + qq * LANES))  # [ROWS, LANES]
                    z = _q6k_run_word(qa if run % 2 == 0 else qb, qh, run, 0x0F0F0F0F, 0x30303030)
                    isum = _dp4a(z, xw, tl.zeros((ROWS, LANES), dtype=tl.int32), False, EMULATE)
                    isum = _dp4a(neg32, xw, isum, True, EMULATE)
                    i0, i1, i2, i3 = _q6k_run_add(i0, i1, i2, i3, isum, sc4, 8 * h + 2 * run + g, run)
        for run in tl.static_range(4):
            isum = tl.sum(pick4(run, i0, i1, i2, i3), axis=1, keep_dims=True)  # exact: int32
            acc += d * (isum.to(tl.float32) * tl.load(xd_row + (sb * 8 + 4 * h + run)))
    return acc


def _gguf_gemv_q8_kernel(
    xq_ptr,  # int8 activation codes [rows, K] viewed as int32 [rows, K/4]
    xd_ptr, xs_ptr,  # fp32 [rows, K/32]: each block's scale, and the scale times the sum of its codes
    w_ptr, u_ptr,  # GGUF rows [E, N, row bytes] as int32 (u: GATED, the up projection's)
    c_ptr, csum_ptr,  # [M_out, N]; SUMS_OUT: fp32 [M_out, N / SUMS_OUT]
    topk_weights_ptr, sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,
    part_ptr, count_ptr,  # SPLIT_K or SLOT_SUM: fp32 partials and arrival counters (fp8_gemm.split_k_sum)
    N, num_valid_tokens, num_pid_m,
    stride_we, stride_ue, stride_cm,  # the weight strides in words
    K: tl.constexpr, QTYPE: tl.constexpr,
    A_ROW_DIV: tl.constexpr, GATED: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr, OUT_MANT: tl.constexpr, EMULATE: tl.constexpr,
    SUMS_OUT: tl.constexpr = 0, DENSE: tl.constexpr = False, PAIRS: tl.constexpr = False,
    SLOT_SUM: tl.constexpr = 0, NUM_EXPERTS: tl.constexpr = 0, SPLIT_K: tl.constexpr = 1,
    Q8_OUT: tl.constexpr = False,  # c: int8 codes, csum_ptr: [2, rows, N / 32] scales and scaled sums (gemv_store)
    PDL: tl.constexpr = False,  # programmatic dependent launch (fp8_gemm.pdl_enter)
    PREFETCH: tl.constexpr = False,  # Q4_K, Q5_K, Q6_K (Q8_0 with VEC16): the next super-block's weight words loaded
    # while this one is computed (registers carried over the loop; the last super-block is loaded twice)
    VEC16: tl.constexpr = False,  # Q8_0: a super-block's 272 bytes as 17 loads of 16 bytes (rows and super-blocks
    # are 16-byte aligned), not 68 of 4
    Q6_LANES: tl.constexpr = 1,  # Q6_K: threads a row (2 or 4), each a word of every four: a warp's 4-byte loads
    # read 8 or 16 contiguous bytes of each of 16 or 8 rows instead of 4 of 32 (rows are only 4-byte aligned); the
    # lanes' integer sums added before the scales (the same bits)
):
    pdl_enter(PDL)  # the activation codes and the routing are the previous kernels' output
    pid = tl.program_id(0)
    pid_m = pid % num_pid_m
    pid_n = pid // num_pid_m
    if not (DENSE or PAIRS):
        if pid_m >= tl.load(num_tokens_post_padded_ptr):
            return
    pid_s = tl.program_id(1)
    HALVES: tl.constexpr = 2 if GATED else 1
    ROWS: tl.constexpr = HALVES * BLOCK_N
    r = tl.arange(0, ROWS)
    offs_n = pid_n * BLOCK_N + r % BLOCK_N
    row_mask = offs_n < N
    pair = pid_m
    if PAIRS:
        pair, offs_tok64, tok_mask, _, expert, routed = pair_rows(expert_ids_ptr, pid_m, pid_s, num_valid_tokens, r,
                                                                  A_ROW_DIV, SLOT_SUM, NUM_EXPERTS, 1, SPLIT_K)
        row_mask = row_mask & routed
    else:
        _, tok_mask, offs_tok64, expert = block_rows(sorted_token_ids_ptr, expert_ids_ptr, pid_m, num_valid_tokens,
                                                     1, DENSE)
    xrow = _gemv_x_row(0, pid_m, pair, sorted_token_ids_ptr, num_valid_tokens, A_ROW_DIV, 1, DENSE, PAIRS)
    # a row's int32 words: 36 a Q4_K super-block, 44 a Q5_K one, 68 four Q8_0 blocks (256 values), 105 two Q6_K
    # super-blocks
    SB_WORDS: tl.constexpr = 36 if QTYPE == 12 else (44 if QTYPE == 13 else 68)  # (Q6_K: unused)
    ROW_WORDS: tl.constexpr = K // 512 * 105 if QTYPE == 14 else K // 256 * SB_WORDS
    row64 = tl.minimum(offs_n, N - 1).to(tl.int64) * ROW_WORDS
    if GATED:
        row_base = tl.where(r < BLOCK_N, w_ptr + expert * stride_we + row64, u_ptr + expert * stride_ue + row64)
    else:
        row_base = w_ptr + expert * stride_we + row64
    offs_4 = tl.arange(0, 4)
    w3 = tl.multiple_of(row_base, 16)[:, None, None] + offs_4[None, None, :]  # [ROWS, 1, 4]: a row, four words
    x3 = (xq_ptr + xrow * (K // 4)) + (tl.zeros((ROWS, 1, 4), dtype=tl.int32) + offs_4[None, None, :])
    xd_row = xd_ptr + xrow * (K // 32)
    if Q6_LANES > 1:  # Q6_K, lane j of a row: activation word j of each four
        x3l = (xq_ptr + xrow * (K // 4)) + (tl.zeros((ROWS, Q6_LANES), dtype=tl.int32) +
                                            tl.arange(0, Q6_LANES)[None, :])
    xs_row = xs_ptr + xrow * (K // 32)
    acc = tl.zeros((ROWS, 1), dtype=tl.float32)
    SB_PER: tl.constexpr = K // 256 // SPLIT_K
    sb0 = (pid_s % SPLIT_K) * SB_PER if SPLIT_K > 1 else 0
    sb_last = sb0 + SB_PER - 1
    if PREFETCH:  # the program's first super-block
        if QTYPE == 12 or QTYPE == 13:
            nxt = _kq_words(w3, sb0 * SB_WORDS, QTYPE)
        elif QTYPE == 14:
            nxt = _q6k_raw(row_base[:, None] + (105 * sb0) // 2)
        else:
            tl.static_assert(VEC16, "Q8_0 prefetches its 16-byte loads (VEC16)")
            nxt = _q8_0_vecs(w3, sb0 * 68)
    for sb in range(sb0, sb0 + SB_PER):
        if QTYPE == 12 or QTYPE == 13:  # Q4_K: the header (d | dmin, 12 scale bytes), then chunk c's 8 words:
            # low nibbles sub-block 2c, high nibbles 2c + 1, byte b of word i holding values 4i + b. Q5_K: the same
            # with qh's 8 words between (value l of sub-block s: bit s of qh byte l, the code's bit 4)
            if PREFETCH:  # this super-block's words came in during the last one; the next one's go out now
                cur = nxt
                nxt = _kq_words(w3, tl.minimum(sb + 1, sb_last) * SB_WORDS, QTYPE)
            else:
                cur = _kq_words(w3, sb * SB_WORDS, QTYPE)
            h0, h1, h2, h3 = _split4(cur[0])  # [ROWS, 1]
            if QTYPE == 13:
                qa = _split4(cur[1])  # qh bytes 0 .. 15
                qb = _split4(cur[2])  # 16 .. 31
            for c in tl.static_range(4):
                wa = _split4(cur[3 + 2 * c])
                wb = _split4(cur[4 + 2 * c])
                xa = _split4(tl.load(x3 + (sb * 64 + 16 * c)))  # activation words of sub-block 2c
                xb = _split4(tl.load(x3 + (sb * 64 + 16 * c + 4)))
                ya = _split4(tl.load(x3 + (sb * 64 + 16 * c + 8)))  # of sub-block 2c + 1
                yb = _split4(tl.load(x3 + (sb * 64 + 16 * c + 12)))
                lo = tl.zeros((ROWS, 1), dtype=tl.int32)
                hi = tl.zeros((ROWS, 1), dtype=tl.int32)
                for i in tl.static_range(4):
                    la = wa[i] & 0x0F0F0F0F
                    ha = (wa[i] >> 4) & 0x0F0F0F0F
                    lb = wb[i] & 0x0F0F0F0F
                    hb = (wb[i] >> 4) & 0x0F0F0F0F
                    if QTYPE == 13:  # each code's bit 4: bit 2c (low nibbles) or 2c + 1 (high) of its qh byte
                        la = la | _qh_bit4(qa[i], 2 * c)
                        ha = ha | _qh_bit4(qa[i], 2 * c + 1)
                        lb = lb | _qh_bit4(qb[i], 2 * c)
                        hb = hb | _qh_bit4(qb[i], 2 * c + 1)
                    lo = _dp4a(la, xa[i], lo, False, EMULATE)
                    hi = _dp4a(ha, ya[i], hi, False, EMULATE)
                    lo = _dp4a(lb, xb[i], lo, False, EMULATE)
                    hi = _dp4a(hb, yb[i], hi, False, EMULATE)
                for p in tl.static_range(2):
                    ds, dm = _q4k_scale_min(h0, h1, h2, h3, 2 * c + p)  # [ROWS, 1]
                    j = sb * 8 + 2 * c + p
                    isum = lo if p == 0 else hi
                    acc += ds * (isum.to(tl.float32) * tl.load(xd_row + j)) - dm * tl.load(xs_row + j)
        elif QTYPE == 14:  # Q6_K: ql [0, 128), qh [128, 192), 16 int8 scales, d at 208; super-block sb from word
            # (105 sb) // 2 of the row, 2 bytes into it when sb is odd (_q6k_sb)
            s_base = row_base[:, None] + (105 * sb) // 2  # [ROWS, 1]
            if Q6_LANES > 1:
                tl.static_assert(not PREFETCH, "Q6_K: the prefetch with one thread a row")
                acc = _q6k_lanes_sb(acc, s_base, sb, x3l, xd_row, Q6_LANES, EMULATE)
            else:
                if PREFETCH:  # as Q4_K's, the 53 words of the super-block as loaded (then permuted as _q6k_words)
                    raw = nxt
                    nxt = _q6k_raw(row_base[:, None] + (105 * tl.minimum(sb + 1, sb_last)) // 2)
                else:
                    raw = None
                acc = _q6k_sb(acc, s_base, sb, raw, x3, xd_row, EMULATE)
        else:  # Q8_0 as int32, blocks in pairs (68 bytes, 17 words; block 0's codes 2 bytes into its words)
            if VEC16:  # the super-block's 68 words from 17 loads of four
                if PREFETCH:
                    vec = nxt
                    nxt = _q8_0_vecs(w3, tl.minimum(sb + 1, sb_last) * 68)
                else:
                    vec = _q8_0_vecs(w3, sb * 68)
                words = _q8_0_unvec(vec)
            for pr in tl.static_range(4):
                if VEC16:
                    wd = _q8_0_pair_of(words, pr)
                else:
                    wd = _q8_0_pair(row_base[:, None] + (sb * 68 + pr * 17))  # [ROWS, 1] pointers
                for blk in tl.static_range(2):
                    d = _q8_0_scale(wd, blk)
                    j = sb * 8 + 2 * pr + blk
                    xa = _split4(tl.load(x3 + 8 * j))  # the block's 8 activation words
                    xb = _split4(tl.load(x3 + (8 * j + 4)))
                    isum = tl.zeros((ROWS, 1), dtype=tl.int32)
                    for i in tl.static_range(8):
                        word = _q8_0_word(wd, blk, i)
                        if i < 4:
                            xw = xa[i]
                        else:
                            xw = xb[i - 4]
                        isum = _dp4a(word, xw, isum, True, EMULATE)
                    acc += d * (isum.to(tl.float32) * tl.load(xd_row + j))
    if PAIRS:  # a slot routed nowhere read expert 0 or E - 1 and adds zeros
        acc = tl.where(row_mask[:, None], acc, 0.0)
    acc = tl.reshape(acc, (1, ROWS))
    gemv_store(acc, c_ptr, csum_ptr, topk_weights_ptr, part_ptr, count_ptr, pid, pid_s, pid_n, pair, offs_tok64,
               tok_mask, N, num_valid_tokens, stride_cm, GATED, 1, BLOCK_N, MUL_ROUTED_WEIGHT, SLOT_SUM, SPLIT_K,
               OUT_MANT, SUMS_OUT, Q8_OUT)


_gguf_gemv_q8 = triton_kernel(_gguf_gemv_q8_kernel)


def q8_supported(*ws_qtypes: tuple[torch.Tensor, str]) -> bool:
    """Whether this kernel reads these (weight, qtype) pairs: Q4_K, Q5_K, Q6_K or Q8_0, rows contiguous, viewable as
    int32 (Q6_K: rows of an even number of super-blocks)."""
    for w, qtype in ws_qtypes:
        if qtype not in Q8_QTYPES:
            return False
        if w.stride(-1) != 1 or (w.dim() > 1 and w.stride(-2) != w.shape[-1]) or w.shape[-1] % 4:
            return False
        if w.data_ptr() % (16 if qtype in ("q4_k", "q5_k") else 4) or any(st % 4 for st in w.stride()[:-1]):
            return False
    return True


def launch_gguf_gemv_q8(xq: tuple[torch.Tensor, torch.Tensor, torch.Tensor], w: torch.Tensor, qtype: str,
                        c: torch.Tensor, n: int, k: int, cfg: dict, u: torch.Tensor | None = None,
                        routing: tuple[torch.Tensor, ...] | None = None, a_row_div: int = 1,
                        mul_routed_weight: bool = False, pairs: int = 0, slot_sum: int = 0,
                        c_sums: torch.Tensor | None = None, c_q8: torch.Tensor | None = None) -> None:
    """One launch: xq = q8_prep(x); the rest as kernels/gguf_gemm.launch_gguf_gemv's (BLOCK_M 1). c_q8: c holds
    int8 codes and c_q8 fp32 [2, rows of c, N / 32] the scales and scaled sums: the output as q8_prep would make
    it of the fp32 result (the next GEMV's activations; BLOCK_N a multiple of 32)."""
    q, d, s = xq
    if c_q8 is not None and (c.dtype != torch.int8 or cfg["BLOCK_N"] % QK or n % QK
                             or tuple(c_q8.shape) != (2, c.shape[0], n // QK)):
        raise ValueError(f"8-bit output: int8 c [rows, {n}] and c_q8 [2, rows, {n // QK}] with BLOCK_N a multiple "
                         f"of {QK}; got {c.dtype}, {tuple(c_q8.shape)}, BLOCK_N {cfg['BLOCK_N']}")
    w3 = (w if w.dim() == 3 else w.unsqueeze(0)).view(torch.int32)
    u3 = ((u if u.dim() == 3 else u.unsqueeze(0)).view(torch.int32)) if u is not None else w3
    weights, sorted_ids, expert_ids, total, num_pid_m, m_rows = _routing_args(q, c, routing, pairs, 1)
    sums_out, tiles, split, part, counters = gemv_grid(c, n, k, cfg, num_pid_m, u is not None, slot_sum, c_sums)
    parts = max(slot_sum, 1) * split
    lanes = int(cfg.get("Q6_LANES", 1)) if qtype == "q6_k" else 1  # threads a Q6_K row: that many times the warps
    if lanes not in (1, 2, 4):
        raise ValueError(f"Q6_LANES: 1, 2 or 4 threads a row, got {lanes}")
    # Q8_0 in 16-byte loads where its rows are 16-byte aligned (a super-block is 272 bytes)
    vec16 = qtype == "q8_0" and bool(cfg.get("Q8_0_VEC16", False)) and w3.data_ptr() % 16 == 0 and \
        u3.data_ptr() % 16 == 0 and w3.stride(0) % 4 == 0 and u3.stride(0) % 4 == 0
    extra = dict(PAIRS=True, SLOT_SUM=slot_sum, NUM_EXPERTS=pairs) if pairs else {}
    cs = c_sums if c_sums is not None else (c_q8 if c_q8 is not None else part)
    _gguf_gemv_q8[(tiles, parts)](
        q.view(torch.int32), d, s, w3, u3, c, cs, weights, sorted_ids, expert_ids, total, part, counters,
        n, m_rows, num_pid_m, w3.stride(0), u3.stride(0), c.stride(0),
        K=k, QTYPE=QTYPE_IDS[qtype], A_ROW_DIV=a_row_div, GATED=u is not None, MUL_ROUTED_WEIGHT=mul_routed_weight,
        BLOCK_N=cfg["BLOCK_N"], OUT_MANT=0 if c_q8 is not None else out_mantissa_bits(c.dtype), EMULATE=INTERPRETED,
        SUMS_OUT=sums_out, DENSE=routing is None, SPLIT_K=split, Q8_OUT=c_q8 is not None,
        num_warps=cfg["num_warps"] * lanes,
        num_stages=1, PREFETCH=bool(cfg.get("Q8_PREFETCH", False)) and (qtype != "q8_0" or vec16) and lanes == 1,
        VEC16=vec16, Q6_LANES=lanes, **extra,
        **pdl_kwargs(c.device),
    )


def gguf_gemv_q8(x: torch.Tensor, w_bytes: torch.Tensor, qtype: str, config: dict | None = None) -> torch.Tensor:
    """x [M, K] @ the GGUF weight [N, K]^T through 8-bit activations: [M, N] in x.dtype (a linear; tests and
    benchmarks; the MoE launches the kernel itself)."""
    m, k = x.shape
    n = w_bytes.shape[0]
    if not q8_supported((w_bytes, qtype)):
        raise ValueError(f"the 8-bit activation GEMV reads Q4_K, Q5_K, Q6_K (an even number of super-blocks a row) "
                         f"and Q8_0 rows, contiguous and aligned; got {qtype}")
    cfg = {"BLOCK_N": 32, "num_warps": 1, "SPLIT_K": 1, **(config or {})}
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m:
        launch_gguf_gemv_q8(q8_prep(x), w_bytes, qtype, y, n, k, cfg)
    return y
