"""The small steps of a decoder layer fused into one launch each, with the pure-PyTorch references beside them.

A decode step at low concurrency is launch-bound: the RMSNorms, the QK-norm and rotary embedding, and the router's
sigmoid/top-k each took five to ten PyTorch launches per layer (about 70 of the 87 kernels of an FP8 MiniMax-M2
layer at concurrency 1, half of its time in a CUDA graph). Here each is one kernel:

    y = rms_norm(x, w, eps)                       # w * bf16(x * rsqrt(mean(x^2) + eps)), as the model computes it
    s, y = add_rms_norm(x, r, w, eps)             # s = x + r (the residual stream), y = rms_norm(s)
    y, yq, ys = rms_norm_fp8(x, w, eps, 128)      # and y quantized for a block-FP8 GEMM, bit for bit as
    s, y, yq, ys = add_rms_norm_fp8(x, r, w, eps, 128)  # per_token_group_quant_fp8(y, 128) (one launch fewer)
    q = qk_norm_rope(y, w, cos, sin, heads, eps)  # y [B, T, heads*D] -> [B, T, heads, D]: RMSNorm over the whole
                                                  # width (or a given 1/rms, for tensor parallelism), then NeoX
                                                  # rotary on the first 2*cos.shape[-1] dims of every head
    idx, w = route_topk(logits, bias, k)          # sigmoid, + correction bias, top-k, weights renormalised
    idx, w = router(h, gate, bias, k)             # logits = h @ gate^T in fp32 and route_topk, one launch
    kv_write(kc, vc, k, v, slots, cols)           # a step's keys and values into the per-slot cache
    o = decode_attention(q, k, v, kc, vc, slots, cols, scale, qk_norm=(wq, wk, cos, sin, eps))
                                                  # one new token per row: QK-norm and rotary of q and k, the cache
                                                  # write, attention over the row's own columns (split along them)

Each `foo` has a `foo_ref` computing the same steps in PyTorch: the model runs the references wherever the kernels
do not (CPU tensors, autograd). Kernels and references agree to fp32 rounding (reductions sum in another order), not
bit for bit. CUDA tensors run compiled, CPU tensors under Triton's interpreter (see kernels/fp8_gemm.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from quantkit.kernels.fp8_gemm import (
    FP8_DTYPE,
    INTERPRETED,
    SCALE_EPS,
    arrival_counters,
    check_device,
    out_mantissa_bits,
    pdl_enter,
    pdl_kwargs,
    per_token_group_quant_fp8_ref,
    quant_groups,
    round_to_out_grid,
    triton_kernel,
)

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _narrow(v, OUT_MANT: tl.constexpr, dtype: tl.constexpr):
    """fp32 -> the output dtype -> fp32: the rounding a PyTorch cast to that dtype makes."""
    if OUT_MANT:
        v = round_to_out_grid(v, OUT_MANT)
    return v.to(dtype).to(tl.float32)


narrow = triton_kernel(_narrow)


# --------------------------------------------------------------------------------------------------------------------
# RMSNorm, with the residual add before it


def rms_norm_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * y.to(x.dtype)  # cast before the gain, as transformers does


def add_rms_norm_ref(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    s = x + r
    return s, rms_norm_ref(s, w, eps)


def rms_norm_fp8_ref(x: torch.Tensor, w: torch.Tensor, eps: float, group: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y = rms_norm_ref(x, w, eps)
    yq, ys = per_token_group_quant_fp8_ref(y.reshape(-1, y.shape[-1]), group)
    return y, yq, ys


def add_rms_norm_fp8_ref(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float, group: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    s = x + r
    return (s, *rms_norm_fp8_ref(s, w, eps, group))


def _norm_group(x_ptr, r_ptr, w_ptr, s_ptr, y_ptr, q_ptr, qs_ptr, g, rstd, q_eps, HAS_RES: tl.constexpr,
                QUANT: tl.constexpr, GROUP: tl.constexpr, OUT_MANT: tl.constexpr, UPCAST: tl.constexpr):
    """Columns [g GROUP, (g + 1) GROUP) of one row (pointers at the row's start), given its 1/rms: x (+ r, rounded
    to the row's dtype and stored at s), the normalized values times the gain stored at y and, QUANT, quantized as
    per_token_group_quant_fp8 quantizes the stored values (fp8 at q, the group's scale at qs[g])."""
    dtype = y_ptr.dtype.element_ty
    cols = g * GROUP + tl.arange(0, GROUP)  # [GROUP], inside the row (the launchers check GROUP | N)
    x = tl.load(x_ptr + cols).to(tl.float32)
    if HAS_RES:
        x = narrow(x + tl.load(r_ptr + cols).to(tl.float32), OUT_MANT, dtype)
        tl.store(s_ptr + cols, x.to(dtype))
    y = narrow(narrow(x * rstd, OUT_MANT, dtype) * tl.load(w_ptr + cols).to(tl.float32), OUT_MANT, dtype)
    tl.store(y_ptr + cols, y.to(dtype))
    if QUANT:
        yq, ys = quant_groups(tl.reshape(y, (1, GROUP)), q_eps, UPCAST)  # [1, GROUP], [1]
        tl.store(q_ptr + tl.reshape(cols, (1, GROUP)), yq.to(q_ptr.dtype.element_ty))
        tl.store(qs_ptr + g + tl.arange(0, 1), ys)


norm_group = triton_kernel(_norm_group)


def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr,  # x, r, sum, out [rows, N]; w [N]
    q_ptr, qs_ptr,  # QUANT: out quantized, fp8 [rows, N] and fp32 scales [rows, N / GROUP]
    N, stride_x, stride_r, stride_o, stride_s, stride_q, stride_qs, eps,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr, OUT_MANT: tl.constexpr,
    QUANT: tl.constexpr = False, GROUP: tl.constexpr = 128, UPCAST: tl.constexpr = False, q_eps=1e-10,
    PDL: tl.constexpr = False,  # programmatic dependent launch (fp8_gemm.pdl_enter)
):
    pdl_enter(PDL)  # x and r are the previous kernels' output
    # a program per row; with QUANT a program per row and GROUP columns (program_id 1): each computes the row's
    # 1/rms itself (the same reduction, so the same value) and normalizes and quantizes its group, so that the
    # divisions of one row spread over the GPU instead of one program
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:  # the residual stream, rounded to the model's dtype as x + r is
        x = narrow(x + tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32), OUT_MANT, dtype)
        if not QUANT:
            tl.store(sum_ptr + row * stride_s + cols, x.to(dtype), mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    if QUANT:
        norm_group(x_ptr + row * stride_x, r_ptr + row * stride_r, w_ptr, sum_ptr + row * stride_s,
                   out_ptr + row * stride_o, q_ptr + row * stride_q, qs_ptr + row * stride_qs, tl.program_id(1), rstd,
                   q_eps, HAS_RES, True, GROUP, OUT_MANT, UPCAST)
    else:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = narrow(narrow(x * rstd, OUT_MANT, dtype) * w, OUT_MANT, dtype)
        tl.store(out_ptr + row * stride_o + cols, y.to(dtype), mask=mask)


_rms_norm = triton_kernel(_rms_norm_kernel)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch_norm(x: torch.Tensor, r: torch.Tensor | None, w: torch.Tensor, eps: float, group: int = 0
                 ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    if x.dtype not in DTYPES or w.dtype != x.dtype or (r is not None and (r.dtype != x.dtype or r.shape != x.shape)):
        raise ValueError(f"rms_norm: x {x.dtype}, weight {w.dtype}{'' if r is None else f', residual {r.dtype}'}: "
                         f"one of {DTYPES}, the same for all")
    n = x.shape[-1]
    if w.shape != (n,):
        raise ValueError(f"rms_norm: weight {tuple(w.shape)} for rows of {n}")
    block = triton.next_power_of_2(n)
    if group and (group < 16 or group & (group - 1) or n % group):
        raise ValueError(f"rms_norm: FP8 groups of {group} for rows of {n} (a power of two >= 16 dividing the rows)")
    check_device(x, w, *(() if r is None else (r,)), min_capability=None)
    x2 = _rows(x)
    r2 = _rows(r) if r is not None else x2
    out = torch.empty_like(x2)
    s = torch.empty_like(x2) if r is not None else out
    q = torch.empty(x2.shape, dtype=FP8_DTYPE, device=x.device) if group else out  # [rows, N]
    qs = torch.empty((x2.shape[0], n // group), dtype=torch.float32, device=x.device) if group else out
    if x2.shape[0]:
        grid = (x2.shape[0], n // group if group else 1)
        _rms_norm[grid](x2, r2, w.contiguous(), out, s, q, qs, n, x2.stride(0), r2.stride(0), out.stride(0),
                        s.stride(0), q.stride(0), qs.stride(0), float(eps), HAS_RES=r is not None, BLOCK=block,
                        OUT_MANT=out_mantissa_bits(x.dtype) if x.dtype != torch.float32 else 0,
                        QUANT=bool(group), GROUP=max(group, 16), UPCAST=INTERPRETED, q_eps=SCALE_EPS,
                        num_warps=8 if n >= 2048 else 4, **pdl_kwargs(x.device))
    return (s.view(x.shape) if r is not None else None), out.view(x.shape), (q if group else None), \
        (qs if group else None)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., N], w [N] (same dtype) -> [..., N]."""
    return _launch_norm(x, None, w, eps)[1]


def add_rms_norm(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + r, rms_norm(x + r)) in one pass."""
    return _launch_norm(x, r, w, eps)[:2]


def rms_norm_fp8(x: torch.Tensor, w: torch.Tensor, eps: float, group: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y = rms_norm(x), y quantized per token and `group` columns: fp8 [rows, N], fp32 scales [rows, N/group]),
    the quantization bit for bit per_token_group_quant_fp8's of y."""
    _, y, q, qs = _launch_norm(x, None, w, eps, group)
    return y, q, qs


def add_rms_norm_fp8(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float, group: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x + r, y = rms_norm(x + r), y quantized as rms_norm_fp8 does) in one pass."""
    return _launch_norm(x, r, w, eps, group)


# --------------------------------------------------------------------------------------------------------------------
# QK-norm over all heads at once, then the rotary embedding of each head


def qk_norm_rope_ref(y: torch.Tensor, w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, eps: float,
                     rstd: torch.Tensor | None = None) -> torch.Tensor:
    """y [B, T, heads*D], w [heads*D], cos/sin [B, T, half] fp32, rstd [B, T, 1] fp32 (None: from y) ->
    [B, T, heads, D]."""
    B, T, W = y.shape
    f = y.float()
    if rstd is None:
        rstd = torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps)
    n = (w * (f * rstd).to(y.dtype)).view(B, T, heads, W // heads)
    half = cos.shape[-1]
    c, s = cos[:, :, None], sin[:, :, None]  # [B, T, 1, half]
    a, b, rest = n[..., :half].float(), n[..., half:2 * half].float(), n[..., 2 * half:]
    return torch.cat([(a * c - b * s).to(y.dtype), (b * c + a * s).to(y.dtype), rest], dim=-1)


def _norm_rope_heads(y_ptr, w_ptr, cos_ptr, sin_ptr, h, d, mask, rstd, D, HALF, OUT_MANT: tl.constexpr,
                     dtype: tl.constexpr):
    """Heads h [H, 1] x dims d [1, BLOCK_D] of one row y (at y_ptr, heads of D contiguous), normalised by rstd, cast,
    times the gains w, cast, then NeoX-rotated with the row's cos/sin on the first 2 * HALF dims -> fp32 values on
    the output dtype's grid, the roundings the model makes."""
    x = tl.load(y_ptr + h * D + d, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + h * D + d, mask=mask, other=0.0).to(tl.float32)
    n = narrow(narrow(x * rstd, OUT_MANT, dtype) * w, OUT_MANT, dtype)
    # the partner of d in the rotation (d + HALF in the first half, d - HALF in the second), normalised the same way
    first = d < HALF
    second = (d >= HALF) & (d < 2 * HALF)
    pd = tl.where(first, d + HALF, tl.where(second, d - HALF, d))
    xp = tl.load(y_ptr + h * D + pd, mask=mask, other=0.0).to(tl.float32)
    wp = tl.load(w_ptr + h * D + pd, mask=mask, other=0.0).to(tl.float32)
    npart = narrow(narrow(xp * rstd, OUT_MANT, dtype) * wp, OUT_MANT, dtype)
    j = tl.where(first, d, d - HALF)
    rot = first | second
    c = tl.load(cos_ptr + j, mask=rot & (d < D), other=1.0)
    s = tl.load(sin_ptr + j, mask=rot & (d < D), other=0.0)
    out = tl.where(first, n * c - npart * s, tl.where(second, n * c + npart * s, n))
    if OUT_MANT:
        out = round_to_out_grid(out, OUT_MANT)
    return out


norm_rope_heads = triton_kernel(_norm_rope_heads)


def _qk_norm_rope_kernel(
    y_ptr, w_ptr, cos_ptr, sin_ptr, rstd_ptr, out_ptr,  # y, out [rows, W]; cos, sin [rows, HALF]; rstd [rows]
    W, HEADS, D, HALF, stride_y, stride_o, stride_c, stride_s, eps,
    y2_ptr, w2_ptr, out2_ptr, W2, HEADS2, stride_y2, stride_o2,  # PAIR: the second projection (k), same rows
    HAS_RSTD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, OUT_MANT: tl.constexpr,
    PAIR: tl.constexpr = False,  # program axis 1 picks the projection: q and k in one launch
):
    row = tl.program_id(0).to(tl.int64)
    if PAIR:
        if tl.program_id(1) == 1:
            y_ptr, w_ptr, out_ptr, W, HEADS, stride_y, stride_o = y2_ptr, w2_ptr, out2_ptr, W2, HEADS2, stride_y2, \
                stride_o2
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < HEADS) & (d < D)
    dtype = out_ptr.dtype.element_ty
    x = tl.load(y_ptr + row * stride_y + h * D + d, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_H, BLOCK_D]
    if HAS_RSTD:
        rstd = tl.load(rstd_ptr + row)
    else:
        rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(x * x, axis=1), axis=0) / W + eps)
    out = norm_rope_heads(y_ptr + row * stride_y, w_ptr, cos_ptr + row * stride_c, sin_ptr + row * stride_s, h, d,
                          mask, rstd, D, HALF, OUT_MANT, dtype)
    tl.store(out_ptr + row * stride_o + h * D + d, out.to(dtype), mask=mask)


_qk_norm_rope = triton_kernel(_qk_norm_rope_kernel)


def qk_norm_rope(y: torch.Tensor, w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, eps: float,
                 rstd: torch.Tensor | None = None) -> torch.Tensor:
    """y [B, T, heads*D] -> [B, T, heads, D]; see qk_norm_rope_ref."""
    B, T, W = y.shape
    if y.dtype not in DTYPES or w.dtype != y.dtype:
        raise ValueError(f"qk_norm_rope: y {y.dtype}, weight {w.dtype}: one of {DTYPES}, the same for both")
    if W % heads or w.shape != (W,):
        raise ValueError(f"qk_norm_rope: width {W} over {heads} heads, weight {tuple(w.shape)}")
    D, half = W // heads, cos.shape[-1]
    if cos.shape not in ((B, T, half), (1, T, half)) or sin.shape != cos.shape or 2 * half > D:
        raise ValueError(f"qk_norm_rope: cos/sin {tuple(cos.shape)} for y {tuple(y.shape)} of head dim {D}")
    check_device(y, w, cos, sin, min_capability=None)
    cos, sin = cos.expand(B, T, half), sin.expand(B, T, half)  # one table for every row of a batch
    y2 = _rows(y)
    c2, s2 = _rows(cos.float()), _rows(sin.float())
    r = rstd.reshape(-1).float().contiguous() if rstd is not None else y2
    out = torch.empty((B * T, W), dtype=y.dtype, device=y.device)
    w = w.contiguous()
    if B * T:
        _qk_norm_rope[(B * T,)](y2, w, c2, s2, r, out, W, heads, D, half, y2.stride(0), out.stride(0),
                                c2.stride(0), s2.stride(0), float(eps), y2, w, out, W, heads, y2.stride(0),
                                out.stride(0), HAS_RSTD=rstd is not None,
                                BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=triton.next_power_of_2(D),
                                OUT_MANT=out_mantissa_bits(y.dtype) if y.dtype != torch.float32 else 0,
                                num_warps=8 if W >= 2048 else 4)
    return out.view(B, T, heads, D)


def qk_norm_rope_pair(q: torch.Tensor, k: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, q_heads: int, k_heads: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """qk_norm_rope of q and of k (same rows, same head dim) in one launch: (q [B, T, q_heads, D],
    k [B, T, k_heads, D]). Under the interpreter, the bits of two qk_norm_rope calls; on a GPU the projection with
    fewer heads is laid out in the other's block (BLOCK_H, warps), so its sum of squares may be added in another
    order: the 1/rms within a unit in the last place of fp32, outputs within one of their own."""
    B, T, Wq = q.shape
    Wk = k.shape[-1]
    if k.shape[:2] != (B, T) or k.dtype != q.dtype or wq.dtype != q.dtype or wk.dtype != q.dtype or \
            q.dtype not in DTYPES or Wq % q_heads or Wk % k_heads or Wq // q_heads != Wk // k_heads or \
            wq.shape != (Wq,) or wk.shape != (Wk,):
        raise ValueError(f"qk_norm_rope_pair: q {tuple(q.shape)} {q.dtype} over {q_heads} heads, k {tuple(k.shape)} "
                         f"{k.dtype} over {k_heads}, weights {tuple(wq.shape)} {tuple(wk.shape)}")
    D, half = Wq // q_heads, cos.shape[-1]
    if cos.shape not in ((B, T, half), (1, T, half)) or sin.shape != cos.shape or 2 * half > D:
        raise ValueError(f"qk_norm_rope_pair: cos/sin {tuple(cos.shape)} for rows {(B, T)} of head dim {D}")
    check_device(q, k, wq, wk, cos, sin, min_capability=None)
    cos, sin = cos.expand(B, T, half), sin.expand(B, T, half)  # one table for every row of a batch
    q2, k2 = _rows(q), _rows(k)
    c2, s2 = _rows(cos.float()), _rows(sin.float())
    qo = torch.empty((B * T, Wq), dtype=q.dtype, device=q.device)
    ko = torch.empty((B * T, Wk), dtype=q.dtype, device=q.device)
    if B * T:
        _qk_norm_rope[(B * T, 2)](q2, wq.contiguous(), c2, s2, q2, qo, Wq, q_heads, D, half, q2.stride(0),
                                  qo.stride(0), c2.stride(0), s2.stride(0), float(eps), k2, wk.contiguous(), ko, Wk,
                                  k_heads, k2.stride(0), ko.stride(0), HAS_RSTD=False,
                                  BLOCK_H=triton.next_power_of_2(max(q_heads, k_heads)),
                                  BLOCK_D=triton.next_power_of_2(D),
                                  OUT_MANT=out_mantissa_bits(q.dtype) if q.dtype != torch.float32 else 0, PAIR=True,
                                  num_warps=8 if max(Wq, Wk) >= 2048 else 4)
    return qo.view(B, T, q_heads, D), ko.view(B, T, k_heads, D)


# --------------------------------------------------------------------------------------------------------------------
# the router: sigmoid scores, top-k on score + correction bias, weights renormalised


def route_topk_ref(logits: torch.Tensor, bias: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, E] fp32 (h @ gate^T), bias [E] -> (expert ids [N, k] int64, weights [N, k] fp32)."""
    scores = torch.sigmoid(logits.float())
    idx = torch.topk(scores + bias.float(), k, dim=-1).indices
    w = scores.gather(-1, idx)
    return idx, w / w.sum(-1, keepdim=True)


def _route_row(logits_ptr, bias_ptr, idx_ptr, w_ptr, row, E, stride_l, stride_i, stride_w,
               TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, CG: tl.constexpr):
    """One row's routing: sigmoid scores of its logits, top-k of scores + bias, the chosen scores renormalised.
    CG: the logits were written by other programs of this launch, so they are read past L1.
    Each pick is one max over int64 keys: the choice's fp32 bits made order-preserving as a signed integer in the
    high word, BLOCK_E - 1 - expert in the low one (the lowest id wins among equals, as torch.topk), so a pick costs
    one block reduction instead of three; the picked scores come out of one [BLOCK_K, BLOCK_E] reduction after."""
    e = tl.arange(0, BLOCK_E)
    emask = e < E
    if CG:
        lg = tl.load(logits_ptr + row * stride_l + e, mask=emask, other=0.0, cache_modifier=".cg")
    else:
        lg = tl.load(logits_ptr + row * stride_l + e, mask=emask, other=0.0)
    scores = tl.sigmoid(lg.to(tl.float32))
    choice = scores + tl.load(bias_ptr + e, mask=emask, other=0.0).to(tl.float32) + 0.0  # -0.0 becomes +0.0
    bits = choice.to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: larger magnitude, smaller integer
    key = (bits.to(tl.int64) << 32) | (BLOCK_E - 1 - e).to(tl.int64)
    key = tl.where(emask, key, -9223372036854775807 - 1)
    slots = tl.arange(0, BLOCK_K)
    ids = tl.zeros((BLOCK_K,), dtype=tl.int32)
    for s in tl.static_range(TOP_K):  # the largest remaining first, as torch.topk returns them
        best = tl.max(key, axis=0)
        pick = BLOCK_E - 1 - (best & (BLOCK_E - 1)).to(tl.int32)
        ids = tl.where(slots == s, pick, ids)
        key = tl.where(e == pick, -9223372036854775807 - 1, key)
    ws = tl.sum(tl.where(e[None, :] == ids[:, None], scores[None, :], 0.0), axis=1)
    kmask = slots < TOP_K
    ws = tl.where(kmask, ws, 0.0)
    ws = ws / tl.sum(ws, axis=0)
    tl.store(idx_ptr + row * stride_i + slots, ids.to(tl.int64), mask=kmask)
    tl.store(w_ptr + row * stride_w + slots, ws, mask=kmask)


route_row = triton_kernel(_route_row)


def _route_kernel(
    logits_ptr, bias_ptr, idx_ptr, w_ptr,  # logits [N, E]; bias [E]; idx, w [N, TOP_K]
    E, stride_l, stride_i, stride_w,
    TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    route_row(logits_ptr, bias_ptr, idx_ptr, w_ptr, tl.program_id(0).to(tl.int64), E, stride_l, stride_i, stride_w,
              TOP_K, BLOCK_E, BLOCK_K, False)


_route = triton_kernel(_route_kernel)


def route_topk(logits: torch.Tensor, bias: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, E] fp32, bias [E] -> (ids [N, k] int64, weights [N, k] fp32); see route_topk_ref."""
    N, E = logits.shape
    if bias.shape != (E,) or not 0 < k <= E:
        raise ValueError(f"route_topk: logits {tuple(logits.shape)}, bias {tuple(bias.shape)}, k {k}")
    check_device(logits, bias, min_capability=None)
    lg = logits.float()
    lg = lg if lg.stride(-1) == 1 else lg.contiguous()
    ids = torch.empty((N, k), dtype=torch.int64, device=logits.device)
    w = torch.empty((N, k), dtype=torch.float32, device=logits.device)
    if N:
        _route[(N,)](lg, bias.float().contiguous(), ids, w, E, lg.stride(0), ids.stride(0), w.stride(0), TOP_K=k,
                     BLOCK_E=triton.next_power_of_2(E), BLOCK_K=triton.next_power_of_2(k), num_warps=4)
    return ids, w


def router_ref(h: torch.Tensor, gate: torch.Tensor, bias: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole router: h [N, H] (any float dtype), gate [E, H] fp32, bias [E] -> (ids [N, k] int64, weights
    [N, k] fp32): logits = h @ gate^T in fp32, then route_topk_ref."""
    return route_topk_ref(h.float() @ gate.float().t(), bias, k)


def _router_kernel(
    h_ptr, gate_ptr, bias_ptr, logits_ptr, idx_ptr, w_ptr, count_ptr,  # h [N, H]; gate [E, H] fp32; bias [E];
    # logits [N, E] fp32 (workspace); idx, w [N, TOP_K]; count [row blocks] int32, zero between launches
    N, E, stride_h, stride_g, stride_l, stride_i, stride_w,
    H: tl.constexpr, TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_EG: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
    GEMV: tl.constexpr = False,  # a few rows (decode): products and row sums on the CUDA cores, no tl.dot
    PDL: tl.constexpr = False,  # programmatic dependent launch (fp8_gemm.pdl_enter): GEMV loads its gate rows first
    # NORM (GEMV, one row): h_ptr is the residual stream x and the routed row is rms_norm(x + r) * nw, made here as
    # _rms_norm_kernel makes it; the programs write it (y), x + r (s) and, QUANT, its FP8 groups (q, qs), a GROUP of
    # columns each in turn
    r_ptr=None, nw_ptr=None, s_ptr=None, y_ptr=None, q_ptr=None, qs_ptr=None, eps=1e-6, q_eps=1e-10,
    NORM: tl.constexpr = False, QUANT: tl.constexpr = False, GROUP: tl.constexpr = 128,
    OUT_MANT: tl.constexpr = 0, UPCAST: tl.constexpr = False,
):
    # program (experts block eb, rows block nb): logits of BLOCK_N rows x BLOCK_EG experts in fp32; the last program
    # of the row block to finish (an arrival counter, as fp8_gemm.split_k_sum) takes the top-k of its rows
    eb = tl.program_id(0)
    nb = tl.program_id(1)
    rows = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    ex = eb * BLOCK_EG + tl.arange(0, BLOCK_EG)
    xmask = ex < E
    cols = tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_N, BLOCK_EG), dtype=tl.float32)
    if GEMV:  # BLOCK_EG gate rows over all of H at once (BLOCK_H >= H: one load in flight per program), each row of
        # h against them
        hmask = cols < H
        g_all = tl.load(gate_ptr + ex.to(tl.int64)[:, None] * stride_g + cols[None, :],
                        mask=xmask[:, None] & hmask[None, :], other=0.0).to(tl.float32)  # [BLOCK_EG, BLOCK_H]
        pdl_enter(PDL)  # h is the previous kernel's output; the gate's rows were not
        sel = tl.arange(0, BLOCK_N)[:, None]
        if NORM:
            tl.static_assert(BLOCK_N == 1, "the norm in the router: one row")
            dtype = y_ptr.dtype.element_ty
            sv = narrow(tl.load(h_ptr + cols, mask=hmask, other=0.0).to(tl.float32)
                        + tl.load(r_ptr + cols, mask=hmask, other=0.0).to(tl.float32), OUT_MANT, dtype)
            rstd = 1.0 / tl.sqrt(tl.sum(sv * sv, axis=0) / H + eps)
            nw = tl.load(nw_ptr + cols, mask=hmask, other=0.0).to(tl.float32)
            h_row = narrow(narrow(sv * rstd, OUT_MANT, dtype) * nw, OUT_MANT, dtype)  # [BLOCK_H]: the row as stored
            acc += tl.sum(g_all * h_row[None, :], axis=1)[None, :]
            for grp in range(eb, H // GROUP, tl.num_programs(0)):  # this program's groups of the outputs
                norm_group(h_ptr, r_ptr, nw_ptr, s_ptr, y_ptr, q_ptr, qs_ptr, grp, rstd, q_eps, True, QUANT, GROUP,
                           OUT_MANT, UPCAST)
        else:
            for i_row in tl.static_range(BLOCK_N):
                n_row = nb.to(tl.int64) * BLOCK_N + i_row
                h_row = tl.load(h_ptr + n_row * stride_h + cols, mask=hmask & (cols * 0 + n_row < N),
                                other=0.0).to(tl.float32)  # [BLOCK_H]
                acc += tl.where(sel == i_row, tl.sum(g_all * h_row[None, :], axis=1)[None, :], 0.0)
    else:
        pdl_enter(PDL)
    for k0 in range(0, H if not GEMV else 0, BLOCK_H):
        hv = tl.load(h_ptr + rows64[:, None] * stride_h + (k0 + cols)[None, :],
                     mask=rmask[:, None] & (k0 + cols < H)[None, :], other=0.0).to(tl.float32)
        gv = tl.load(gate_ptr + ex.to(tl.int64)[None, :] * stride_g + (k0 + cols)[:, None],
                     mask=xmask[None, :] & (k0 + cols < H)[:, None], other=0.0).to(tl.float32)
        if IEEE:
            acc = tl.dot(hv, gv, acc, input_precision="ieee")
        else:
            acc = tl.dot(hv, gv, acc)
    tl.store(logits_ptr + rows64[:, None] * stride_l + ex[None, :], acc, mask=rmask[:, None] & xmask[None, :])
    tl.debug_barrier()  # every thread's logits written before the arrival is counted (release, gpu scope)
    if tl.atomic_add(count_ptr + nb, 1, sem="acq_rel") == tl.num_programs(0) - 1:
        for r in range(BLOCK_N):
            row = nb.to(tl.int64) * BLOCK_N + r
            if row < N:
                route_row(logits_ptr, bias_ptr, idx_ptr, w_ptr, row, E, stride_l, stride_i, stride_w, TOP_K, BLOCK_E,
                          BLOCK_K, True)
        tl.atomic_xchg(count_ptr + nb, 0)


_router = triton_kernel(_router_kernel)


GEMV_ROWS = 4  # rows up to which the router computes its logits on the CUDA cores


def router(h: torch.Tensor, gate: torch.Tensor, bias: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """router_ref in one launch: the fp32 logits over blocks of experts by many programs (fp32 products, IEEE on
    a GPU), the top-k of each row block by the last of its programs to finish. Up to GEMV_ROWS rows on the CUDA
    cores, two experts a program; more with tl.dot over blocks of 16 x 16. On an H200 it beats the cast, GEMM and
    route_topk it replaces at one row only (6.9 against 9.9 us; BENCHMARKS.md), which is where MoE.route uses it.
    The logits' fp32 sums run in another order than a cuBLAS GEMM's, so a near-tie between two experts may resolve
    the other way."""
    N, H = h.shape
    E = gate.shape[0]
    if gate.shape != (E, H) or gate.dtype != torch.float32 or bias.shape != (E,) or not 0 < k <= E or \
            h.dtype not in DTYPES:
        raise ValueError(f"router: h {tuple(h.shape)} {h.dtype}, gate {tuple(gate.shape)} {gate.dtype} (fp32), bias "
                         f"{tuple(bias.shape)}, k {k}")
    check_device(h, gate, bias, min_capability=None)
    h2 = h if h.stride(-1) == 1 else h.contiguous()
    g2 = gate if gate.stride(-1) == 1 else gate.contiguous()
    ids = torch.empty((N, k), dtype=torch.int64, device=h.device)
    w = torch.empty((N, k), dtype=torch.float32, device=h.device)
    if N:
        gemv = N <= GEMV_ROWS and H <= 8192
        if gemv:  # all rows in one block; two experts per program: 128 programs for MiniMax-M2's 256
            block_n, block_eg, block_h = triton.next_power_of_2(N), 2, triton.next_power_of_2(H)
        else:
            block_n, block_eg, block_h = 16, (32 if INTERPRETED else 16), 128
        logits = torch.empty((N, E), dtype=torch.float32, device=h.device)
        grid = (triton.cdiv(E, block_eg), triton.cdiv(N, block_n))
        counters = arrival_counters(h.device, grid[1])
        _router[grid](h2, g2, bias.float().contiguous(), logits, ids, w, counters, N, E, h2.stride(0), g2.stride(0),
                      logits.stride(0), ids.stride(0), w.stride(0), H=H, TOP_K=k, BLOCK_N=block_n,
                      BLOCK_EG=block_eg, BLOCK_H=block_h, BLOCK_E=triton.next_power_of_2(E),
                      BLOCK_K=triton.next_power_of_2(k), IEEE=not INTERPRETED, GEMV=gemv, num_warps=4,
                      **pdl_kwargs(h.device))
    return ids, w


def add_rms_norm_router(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float, gate: torch.Tensor,
                        bias: torch.Tensor, k: int, group: int = 0):
    """One token's post-attention norm and its routing in one launch: (x + r, h = rms_norm(x + r) * w, h's FP8
    groups (fp8 [1, N], fp32 scales [1, N / group]) or None where group is 0, expert ids [1, k], weights [1, k]),
    each as add_rms_norm(_fp8) and router compute it: the router's programs each normalize the row themselves (a
    6 KB read) before their two experts' logits, and write a group of the outputs each. x, r [1, N] (or [N]);
    N a multiple of 128 (and of group) up to 8192."""
    n = x.shape[-1]
    e = gate.shape[0]
    chunk = group or 128
    if x.numel() != n or r.shape != x.shape or x.dtype not in DTYPES or r.dtype != x.dtype or w.dtype != x.dtype \
            or w.shape != (n,) or n > 8192 or n % 128 or (group and (group < 16 or group & (group - 1) or n % group)) \
            or gate.shape != (e, n) or gate.dtype != torch.float32 or bias.shape != (e,) or not 0 < k <= e:
        raise ValueError(f"add_rms_norm_router: x {tuple(x.shape)} {x.dtype}, r {tuple(r.shape)} {r.dtype}, weight "
                         f"{tuple(w.shape)} {w.dtype}, gate {tuple(gate.shape)} {gate.dtype} (fp32), bias "
                         f"{tuple(bias.shape)}, k {k}, group {group}: one row of a multiple of 128 up to 8192")
    check_device(x, r, w, gate, bias, min_capability=None)
    x1, r1 = x.reshape(1, n).contiguous(), r.reshape(1, n).contiguous()
    g2 = gate if gate.stride(-1) == 1 else gate.contiguous()
    s, y = torch.empty_like(x1), torch.empty_like(x1)
    q = torch.empty((1, n), dtype=FP8_DTYPE, device=x.device) if group else y
    qs = torch.empty((1, n // group), dtype=torch.float32, device=x.device) if group else y
    ids = torch.empty((1, k), dtype=torch.int64, device=x.device)
    wts = torch.empty((1, k), dtype=torch.float32, device=x.device)
    logits = torch.empty((1, e), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(e, 2), 1)  # two experts a program, as router's GEMV
    _router[grid](x1, g2, bias.float().contiguous(), logits, ids, wts, arrival_counters(x.device, 1), 1, e, n,
                  g2.stride(0), logits.stride(0), ids.stride(0), wts.stride(0), H=n, TOP_K=k, BLOCK_N=1, BLOCK_EG=2,
                  BLOCK_H=triton.next_power_of_2(n), BLOCK_E=triton.next_power_of_2(e),
                  BLOCK_K=triton.next_power_of_2(k), IEEE=not INTERPRETED, GEMV=True, r_ptr=r1,
                  nw_ptr=w.contiguous(), s_ptr=s, y_ptr=y, q_ptr=q, qs_ptr=qs, eps=float(eps), q_eps=SCALE_EPS,
                  NORM=True, QUANT=bool(group), GROUP=chunk,
                  OUT_MANT=out_mantissa_bits(x.dtype) if x.dtype != torch.float32 else 0, UPCAST=INTERPRETED,
                  num_warps=8, **pdl_kwargs(x.device))
    return s.view(x.shape), y.view(x.shape), (q if group else None), (qs if group else None), ids, wts


# --------------------------------------------------------------------------------------------------------------------
# the KV-cache write of one step


def kv_write_ref(kc: torch.Tensor, vc: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
                 cols: torch.Tensor) -> None:
    """kc, vc [S, NKV, C, D] (the cache of one layer); k, v [B, NKV, T, D]; slots, cols [B, T] int64: token (b, t)
    goes to slot slots[b, t], column cols[b, t]."""
    kc[slots, :, cols] = k.transpose(1, 2)  # [B, T, NKV, D]
    vc[slots, :, cols] = v.transpose(1, 2)


def _kv_write_kernel(
    kc_ptr, vc_ptr, k_ptr, v_ptr, slots_ptr, cols_ptr,
    T, NKV, D,
    s_cs, s_ch, s_cc,  # cache strides: slot, head, column (the last dimension is contiguous)
    s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,  # k and v strides: batch, head, token
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0)  # token b * T + t
    b, t = i // T, i % T
    slot = tl.load(slots_ptr + i).to(tl.int64)
    col = tl.load(cols_ptr + i).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < NKV) & (d < D)
    dst = slot * s_cs + h * s_ch + col * s_cc + d
    kk = tl.load(k_ptr + b.to(tl.int64) * s_kb + h * s_kh + t * s_kt + d, mask=mask)
    tl.store(kc_ptr + dst, kk, mask=mask)
    vv = tl.load(v_ptr + b.to(tl.int64) * s_vb + h * s_vh + t * s_vt + d, mask=mask)
    tl.store(vc_ptr + dst, vv, mask=mask)


_kv_write = triton_kernel(_kv_write_kernel)


def kv_write(kc: torch.Tensor, vc: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
             cols: torch.Tensor) -> None:
    """The keys and values of a step into the cache, one launch; see kv_write_ref."""
    B, NKV, T, D = k.shape
    if v.shape != k.shape or kc.shape[1] != NKV or kc.shape[3] != D or vc.shape != kc.shape or \
            kc.dtype != k.dtype or vc.dtype != v.dtype or slots.shape != (B, T) or cols.shape != (B, T):
        raise ValueError(f"kv_write: cache {tuple(kc.shape)} {kc.dtype}, k/v {tuple(k.shape)} {k.dtype}, slots "
                         f"{tuple(slots.shape)}, columns {tuple(cols.shape)}")
    if kc.stride() != vc.stride() or kc.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("kv_write: the cache's and the step's last dimension must be contiguous, k/v caches alike")
    check_device(kc, vc, k, v, slots, cols, min_capability=None)
    sl, co = slots.reshape(-1).contiguous(), cols.reshape(-1).contiguous()
    if B * T:
        _kv_write[(B * T,)](kc, vc, k, v, sl, co, T, NKV, D, kc.stride(0), kc.stride(1), kc.stride(2),
                            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                            BLOCK_H=triton.next_power_of_2(NKV), BLOCK_D=triton.next_power_of_2(D), num_warps=4)


# --------------------------------------------------------------------------------------------------------------------
# attention of one new token per sequence over the per-slot cache, its keys and values written on the way


def decode_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                         slots: torch.Tensor, cols: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, NH, D], k, v [B, NKV, D] (one new token per row); caches kc, vc [S, NKV, C, D]; slots, cols [B] int64.
    Writes k, v at (slots[b], cols[b]) of the caches, then each q head h attends (fp32 softmax) over columns
    0..cols[b] of its slot's kv head h // (NH / NKV). -> [B, NH, D] in q's dtype."""
    B, NH, D = q.shape
    NKV = k.shape[1]
    kc[slots, :, cols] = k
    vc[slots, :, cols] = v
    out = torch.empty_like(q)
    for b in range(B):
        n = int(cols[b]) + 1
        keys = kc[slots[b], :, :n].float().repeat_interleave(NH // NKV, 0)  # [NH, n, D]
        vals = vc[slots[b], :, :n].float().repeat_interleave(NH // NKV, 0)
        p = torch.softmax((keys @ q[b].float()[:, :, None])[..., 0] * scale, -1)  # [NH, n]
        out[b] = (p[:, None, :] @ vals)[:, 0].to(q.dtype)
    return out


def _attention_store(y, o_ptrs, gmask, oq_row, os_row, heads, d, q_eps, D: tl.constexpr, QUANT: tl.constexpr,
                     OUT_MANT: tl.constexpr, UPCAST: tl.constexpr):
    """A row's output heads y [BLOCK_G, D] (fp32) rounded to the output dtype and stored at o_ptrs; QUANT: that
    value's block-FP8 codes and scales (a head a group, quant_groups, what per_token_group_quant_fp8 makes of the
    output) stored at the row's oq_row + head * D and os_row + head."""
    dtype = o_ptrs.dtype.element_ty
    y = narrow(y, OUT_MANT, dtype)
    tl.store(o_ptrs, y.to(dtype), mask=gmask[:, None])
    if QUANT:
        yq, ys = quant_groups(y, q_eps, UPCAST)  # [BLOCK_G, D], [BLOCK_G]
        tl.store(oq_row + heads[:, None] * D + d[None, :], yq.to(oq_row.dtype.element_ty), mask=gmask[:, None])
        tl.store(os_row + heads, ys, mask=gmask)


attention_store = triton_kernel(_attention_store)


def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, slots_ptr, cols_ptr, o_ptr, part_ptr, ml_ptr, count_ptr,
    NKV, G, qk_scale,  # G = NH / NKV query heads per kv head; qk_scale = scale * log2(e)
    s_qb, s_qh, s_kb, s_kh, s_vb, s_vh, s_cs, s_ch, s_cc, s_ob, s_oh,
    wq_ptr, wk_ptr, cos_ptr, sin_ptr, s_cos, s_sin, HALF, eps,  # NORM: QK-norm gains, rotary tables [B, HALF]
    rq_ptr, rk_ptr,  # HAS_RSTD: 1/rms of q and of k per row [B] fp32 (their widths split over tensor-parallel ranks)
    oq_ptr, os_ptr, s_oqb, s_osb, q_eps,  # QUANT: the output's block-FP8 codes [B, NH * D] and scales [B, NH]
    D: tl.constexpr, CHUNK: tl.constexpr, SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
    IEEE: tl.constexpr,
    NORM: tl.constexpr = False,  # q, k as projected: the QK-norm over all heads and the rotary first (as qk_norm_rope)
    BLOCK_HQ: tl.constexpr = 16, BLOCK_HK: tl.constexpr = 16, OUT_MANT: tl.constexpr = 0,
    HAS_RSTD: tl.constexpr = False,
    PDL: tl.constexpr = False,  # programmatic dependent launch (fp8_gemm.pdl_enter)
    QUANT: tl.constexpr = False,  # also write the output as per_token_group_quant_fp8 makes it in groups of D (a
    # head a group): the input of a block-FP8 o_proj, its quantization launch saved
    UPCAST: tl.constexpr = False,  # QUANT, interpreted: quant_groups rounds to the e4m3 grid itself
):
    pdl_enter(PDL)  # q, k, v, the cache, its slots and columns: all written before this kernel
    # program (row b and kv head, split sp): the G query heads of the kv head against cached columns
    # [sp * CHUNK, sp * CHUNK + CHUNK) below the new token's column, online softmax in fp32 (exp2); the split that
    # holds the new column takes the new key and value from k, v and writes them into the cache (the other splits
    # never read that column). One split: the result is stored; several: fp32 partials and (max, sum) per head, and
    # the last program of the row's kv head to arrive (an arrival counter, as fp8_gemm.split_k_sum) merges them.
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    b = pid // NKV
    kvh = pid % NKV
    slot = tl.load(slots_ptr + b).to(tl.int64)
    col = tl.load(cols_ptr + b)  # the new token's column: cached columns 0..col-1 come before it
    g = tl.arange(0, BLOCK_G)
    gmask = g < G
    d = tl.arange(0, D)
    heads = (kvh * G + g).to(tl.int64)
    dtype = o_ptr.dtype.element_ty
    if NORM:  # the row's whole q for its mean square (every program of the row: 2 * NH * D bytes, cheap), then
        # this kv head's query heads normalised and rotated, rounded as the model rounds them
        if HAS_RSTD:
            rq = tl.load(rq_ptr + b)
        else:
            hq = tl.arange(0, BLOCK_HQ)[:, None]
            xq = tl.load(q_ptr + b.to(tl.int64) * s_qb + hq * D + d[None, :], mask=hq < NKV * G, other=0.0)
            xq = xq.to(tl.float32)
            rq = 1.0 / tl.sqrt(tl.sum(tl.sum(xq * xq, axis=1), axis=0) / (NKV * G * D) + eps)
        q = norm_rope_heads(q_ptr + b.to(tl.int64) * s_qb, wq_ptr, cos_ptr + b.to(tl.int64) * s_cos,
                            sin_ptr + b.to(tl.int64) * s_sin, heads[:, None], d[None, :], gmask[:, None], rq, D, HALF,
                            OUT_MANT, dtype)
        if not IEEE:
            q = q.to(dtype)
    else:
        q = tl.load(q_ptr + b.to(tl.int64) * s_qb + heads[:, None] * s_qh + d[None, :], mask=gmask[:, None],
                    other=0.0)
        if IEEE:
            q = q.to(tl.float32)
    m = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    lsum = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, D), dtype=tl.float32)
    start = sp * CHUNK
    end = tl.minimum(start + CHUNK, col)
    base = slot * s_cs + kvh.to(tl.int64) * s_ch
    c = tl.arange(0, BLOCK_C)
    for c0 in range(start, end, BLOCK_C):
        cm = c0 + c < end
        offs = base + (c0 + c).to(tl.int64)[:, None] * s_cc + d[None, :]
        kt = tl.load(kc_ptr + offs, mask=cm[:, None], other=0.0)
        vt = tl.load(vc_ptr + offs, mask=cm[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(kt.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kt))
        s = tl.where(cm[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        lsum = lsum * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, vt.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        m = m_new
    if (col >= start) & (col < start + CHUNK):  # the new token: attend to it, write it into the cache
        if NORM:  # k's mean square over all its heads, this head normalised and rotated
            if HAS_RSTD:
                rk = tl.load(rk_ptr + b)
            else:
                hk = tl.arange(0, BLOCK_HK)[:, None]
                xk = tl.load(k_ptr + b.to(tl.int64) * s_kb + hk * D + d[None, :], mask=hk < NKV, other=0.0)
                xk = xk.to(tl.float32)
                rk = 1.0 / tl.sqrt(tl.sum(tl.sum(xk * xk, axis=1), axis=0) / (NKV * D) + eps)
            kh = kvh + tl.zeros((1, 1), dtype=tl.int32)
            kn = norm_rope_heads(k_ptr + b.to(tl.int64) * s_kb, wk_ptr, cos_ptr + b.to(tl.int64) * s_cos,
                                 sin_ptr + b.to(tl.int64) * s_sin, kh, d[None, :], kh < NKV, rk, D, HALF, OUT_MANT,
                                 dtype)
            kn = tl.sum(kn, axis=0).to(dtype)  # [1, D] -> [D]
        else:
            kn = tl.load(k_ptr + b.to(tl.int64) * s_kb + kvh.to(tl.int64) * s_kh + d)
        vn = tl.load(v_ptr + b.to(tl.int64) * s_vb + kvh.to(tl.int64) * s_vh + d)
        dst = base + col.to(tl.int64) * s_cc + d
        tl.store(kc_ptr + dst, kn)
        tl.store(vc_ptr + dst, vn)
        sn = tl.sum(q.to(tl.float32) * kn.to(tl.float32)[None, :], axis=1) * qk_scale  # [BLOCK_G]
        m_new = tl.maximum(m, sn)
        alpha = tl.exp2(m - m_new)
        pn = tl.exp2(sn - m_new)
        lsum = lsum * alpha + pn
        acc = acc * alpha[:, None] + pn[:, None] * vn.to(tl.float32)[None, :]
        m = m_new
    out_offs = b.to(tl.int64) * s_ob + heads[:, None] * s_oh + d[None, :]
    if SPLITS == 1:
        attention_store(acc / lsum[:, None], o_ptr + out_offs, gmask, oq_ptr + b.to(tl.int64) * s_oqb,
                        os_ptr + b.to(tl.int64) * s_osb, heads, d, q_eps, D, QUANT, OUT_MANT, UPCAST)
    else:
        slot_part = (pid.to(tl.int64) * SPLITS + sp) * BLOCK_G
        tl.store(part_ptr + (slot_part + g)[:, None] * D + d[None, :], acc)
        tl.store(ml_ptr + (slot_part + g) * 2, m)
        tl.store(ml_ptr + (slot_part + g) * 2 + 1, lsum)
        tl.debug_barrier()  # every thread's partial written before the arrival is counted (release, gpu scope)
        if tl.atomic_add(count_ptr + pid, 1, sem="acq_rel") == SPLITS - 1:
            m_all = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
            for s_i in range(SPLITS):
                row0 = (pid.to(tl.int64) * SPLITS + s_i) * BLOCK_G + g
                m_all = tl.maximum(m_all, tl.load(ml_ptr + row0 * 2, cache_modifier=".cg"))
            tot = tl.zeros((BLOCK_G, D), dtype=tl.float32)
            den = tl.zeros((BLOCK_G,), dtype=tl.float32)
            for s_i in range(SPLITS):
                row0 = (pid.to(tl.int64) * SPLITS + s_i) * BLOCK_G + g
                w = tl.exp2(tl.load(ml_ptr + row0 * 2, cache_modifier=".cg") - m_all)  # 0 for an empty split
                den += w * tl.load(ml_ptr + row0 * 2 + 1, cache_modifier=".cg")
                tot += w[:, None] * tl.load(part_ptr + row0[:, None] * D + d[None, :], cache_modifier=".cg")
            attention_store(tot / den[:, None], o_ptr + out_offs, gmask, oq_ptr + b.to(tl.int64) * s_oqb,
                            os_ptr + b.to(tl.int64) * s_osb, heads, d, q_eps, D, QUANT, OUT_MANT, UPCAST)
            tl.atomic_xchg(count_ptr + pid, 0)


_decode_attention = triton_kernel(_decode_attention_kernel)

DECODE_BLOCK_C = 64  # cached columns a loop step


def decode_split(rows: int, capacity: int, sms: int) -> tuple[int, int]:
    """(CHUNK, SPLITS) for a step of `rows` rows x kv heads over caches of `capacity` columns: chunks of whole loop
    steps, as many as bring the programs to about two per SM (a row's columns are not known on the host)."""
    steps = triton.cdiv(max(capacity, 1), DECODE_BLOCK_C)
    want = max(1, min(steps, triton.cdiv(2 * sms, max(rows, 1))))
    chunk = triton.cdiv(steps, want) * DECODE_BLOCK_C
    return chunk, triton.cdiv(max(capacity, 1), chunk)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                     slots: torch.Tensor, cols: torch.Tensor, scale: float,
                     qk_norm: tuple | None = None, quant_group: int = 0
                     ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """decode_attention_ref in one launch (the cache write included): the cache is read in place, only up to each
    row's column, and split over programs along the columns where a step has few rows (flash-decoding).
    qk_norm = (wq, wk, cos, sin, eps): q and k come as projected and get qk_norm_rope first (gains [NH * D] and
    [NKV * D]; cos, sin [B, half] fp32), the model's QK-norm and rotary in the same launch; (..., eps, rq, rk): with
    the 1/rms of q and k given per row ([B] fp32: a tensor-parallel rank's heads, normalised over all ranks').
    quant_group = D (16-bit q): also returns the output's block-FP8 quantization (fp8 [B, NH * D], fp32 scales
    [B, NH]), bit for bit per_token_group_quant_fp8 of the returned output viewed as [B, NH * D], made in the same
    launch for a block-FP8 o_proj."""
    B, NH, D = q.shape
    S, NKV, C, _ = kc.shape
    if k.shape != (B, NKV, D) or v.shape != k.shape or vc.shape != kc.shape or kc.shape[3] != D or NH % NKV or \
            slots.shape != (B,) or cols.shape != (B,) or D & (D - 1) or D < 16 or \
            not q.dtype == k.dtype == v.dtype == kc.dtype == vc.dtype or q.dtype not in DTYPES:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} {q.dtype}, k/v {tuple(k.shape)}, cache "
                         f"{tuple(kc.shape)} {kc.dtype}, slots {tuple(slots.shape)}, columns {tuple(cols.shape)}")
    if kc.stride() != vc.stride() or kc.stride(-1) != 1 or q.stride(-1) != 1 or k.stride(-1) != 1 or \
            v.stride(-1) != 1:
        raise ValueError("decode_attention: the last dimension of q, k, v and the caches must be contiguous")
    check_device(q, k, v, kc, vc, slots, cols, min_capability=None)
    norm = qk_norm is not None
    if norm:
        wq, wk, cos, sin, eps, *rstds = qk_norm
        half = cos.shape[-1]
        if rstds:
            rq, rk = (r.reshape(-1).float().contiguous() for r in rstds)
            if rq.shape != (B,) or rk.shape != (B,):
                raise ValueError(f"decode_attention: 1/rms of q and k {tuple(rq.shape)} {tuple(rk.shape)}, "
                                 f"one per row of {B}")
        else:
            rq = rk = q
        if q.stride(1) != D or k.stride(1) != D or wq.shape != (NH * D,) or wk.shape != (NKV * D,) or \
                wq.dtype != q.dtype or wk.dtype != q.dtype or cos.shape != (B, half) or sin.shape != cos.shape or \
                2 * half > D:
            raise ValueError(f"decode_attention: QK-norm gains {tuple(wq.shape)} {tuple(wk.shape)}, rotary "
                             f"{tuple(cos.shape)}, for q {tuple(q.shape)} with heads side by side")
        wq, wk = wq.contiguous(), wk.contiguous()
        cos, sin = cos.float(), sin.float()
        cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (cos, sin))
    else:
        wq = wk = cos = sin = rq = rk = q
        half, eps, rstds = 0, 0.0, ()
    if quant_group and (quant_group != D or q.dtype == torch.float32):
        raise ValueError(f"decode_attention: quantizing the output takes groups of head_dim {D} and 16-bit q, got "
                         f"{quant_group} and {q.dtype}")
    out = torch.empty((B, NH, D), dtype=q.dtype, device=q.device)
    if quant_group:
        oq = torch.empty((B, NH * D), dtype=FP8_DTYPE, device=q.device)
        os_ = torch.empty((B, NH), dtype=torch.float32, device=q.device)
    else:
        oq = os_ = out
    if not B:
        return (out, (oq, os_)) if quant_group else out
    G = NH // NKV
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 8
    chunk, splits = decode_split(B * NKV, C, sms)
    block_g = max(16, triton.next_power_of_2(G))
    if splits > 1:
        part = torch.empty((B * NKV * splits * block_g, D), dtype=torch.float32, device=q.device)
        ml = torch.empty((B * NKV * splits * block_g, 2), dtype=torch.float32, device=q.device)
        counters = arrival_counters(q.device, B * NKV)
    else:
        part = ml = counters = out
    sl, co = slots.contiguous(), cols.contiguous()
    _decode_attention[(B * NKV, splits)](
        q, k, v, kc, vc, sl, co, out, part, ml, counters, NKV, G, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), out.stride(0), out.stride(1),
        wq, wk, cos, sin, cos.stride(0), sin.stride(0), half, float(eps), rq, rk,
        oq, os_, oq.stride(0), os_.stride(0), SCALE_EPS,
        D=D, CHUNK=chunk, SPLITS=splits, BLOCK_G=block_g, BLOCK_C=DECODE_BLOCK_C,
        IEEE=INTERPRETED or q.dtype == torch.float32, NORM=norm, BLOCK_HQ=triton.next_power_of_2(NH),
        BLOCK_HK=triton.next_power_of_2(NKV), OUT_MANT=out_mantissa_bits(q.dtype) if q.dtype != torch.float32 else 0,
        HAS_RSTD=bool(rstds), QUANT=bool(quant_group), UPCAST=INTERPRETED, num_warps=4, **pdl_kwargs(q.device))
    return (out, (oq, os_)) if quant_group else out
