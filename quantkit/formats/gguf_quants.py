"""GGML block types for GGUF: vectorised torch quantize / dequantize, byte-identical to llama.cpp's C reference.

    data = quantize(w, "q4_k")                       # w [..., n] float -> uint8 [..., n // 256 * 144]
    data = quantize(w, "q4_k", imatrix=im, name=nm)  # im [n] (or [*w.shape[:-2], n], one vector per expert)
    w2 = dequantize(data, "q4_k", w.shape)           # float32, bit-identical to gguf.quants.dequantize
    row_bytes("q6_k", 3072)                          # 2520
    TYPES["q8_0"].type_id                            # 8, equal to gguf.GGMLQuantizationType.Q8_0

One class per type, registered from the size table below, each implementing block quantize/dequantize over many
blocks at once (float32 [nblocks, block] <-> uint8 [nblocks, type_size]) on CPU or CUDA tensors.

Bit-exactness with ggml (specs/gguf-kquants.md §0) decides how the arithmetic is written:
- every reduction the C code does as a running float32 sum is a Python loop over the element positions,
  vectorised across blocks (`_seqsum`): torch.sum (pairwise) or float64 changes ~2-4% of k-quant blocks;
- blocks are held position-major ([32, M]: element position first) so each step of such a loop reads a
  contiguous row;
- `_nearest_int` is ggml's magic-number rounding itself, so out-of-range and non-finite values map as in C;
  where the argument is provably small (make_qx_quants) or each block's bounds show it is (`_grid_levels`),
  rounding half to even, its equivalent there, takes fewer passes;
- division goes through `_div` with tensors on both sides: CUDA replaces `t / scalar` by a multiplication with
  the reciprocal and `scalar / t` is `t.reciprocal() * scalar` everywhere, both one rounding too many;
- square roots go through float64 (`_sqrt`): torch's float32 CPU sqrt is not correctly rounded;
- eager elementwise ops only (no torch.compile, addcmul or lerp), so nothing is contracted into an FMA;
- float constants are computed as C computes them in float32 (`_f32`) before they meet a tensor.

imatrix use follows `ggml_quantize_chunk`: none -> the `quantize_row_*_ref` paths; given -> the `*_impl` paths
(Q4_K/Q5_K: make_qkx3 + make_qp_quants with sigma2-scaled weights; Q6_K: raw imatrix in make_qx_quants; the
32-block fallback types Q4_0/Q4_1/Q5_0/Q5_1 likewise). Q8_0, F16, BF16 and F32 ignore it, as llama.cpp does.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from quantkit.errors import QuantkitError
from quantkit.formats import first_nonfinite

QK_K = 256
GROUP_MAX_EPS = float(np.float32(1e-15))
_MAGIC = 12582912.0  # 1.5 * 2**23: adding it leaves round-half-even(v) in the low mantissa bits (ggml nearest_int)

# Rows of at most this many weights are quantized per step: on the CPU 512K (~20 live [32, M] temporaries of 2 MB)
# measured fastest on 2 cores (1.3x 128K); on a GPU a large chunk amortises the ~2,000 small launches of a search.
CHUNK_WEIGHTS = {"cpu": 1 << 19, "cuda": 1 << 24}
# CPU threads quantizing chunks side by side (None: torch.get_num_threads())
CPU_WORKERS: int | None = None

# llama-quantize's `tensor_type_fallback` for rows that are not a multiple of 256 (then F16 if not of 32 either).
FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


# ----------------------------------------------------------------------------------------------------------------
# numerics helpers


def _f32(v: float) -> float:
    """A constant rounded to float32, the way the C code holds it (exactly representable when it meets a tensor)."""
    return float(np.float32(v))


@functools.lru_cache(maxsize=1024)
def _const(v: float, device: torch.device) -> torch.Tensor:
    """A 0-d float32 constant on the device, made once (a fresh CUDA one per division would copy and sync)."""
    return torch.tensor(_f32(v), dtype=torch.float32, device=device)


def _div(a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
    """IEEE float32 a / b with a tensor on both sides (see module docstring)."""
    ref = a if isinstance(a, torch.Tensor) else b
    if not isinstance(a, torch.Tensor):
        a = _const(float(a), ref.device)
    if not isinstance(b, torch.Tensor):
        b = _const(float(b), ref.device)
    return torch.div(a, b)


def _nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml nearest_int: float32 -> int32, round half to even for |v| <= 4194303, C's bit pattern elsewhere."""
    return ((v + _MAGIC).view(torch.int32) & 0x7FFFFF) - 0x400000


def _levels(v: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """MAX(lo, MIN(hi, nearest_int(v))) as float (the quantized levels L)."""
    if v.is_cuda:  # CUDA's NaN (inf * 0, a sub-block of range < 1e-37) has another payload than x86's, read as 0
        v = v.nan_to_num(nan=0.0, posinf=math.inf, neginf=-math.inf)
    return _nearest_int(v).clamp_(lo, hi).float()


_NEAREST_EXACT = 4194303.0  # |v| up to this: nearest_int(v) is round-half-even(v)


def _grid_levels(x: torch.Tensor, x_lo: torch.Tensor, x_hi: torch.Tensor, origin: torch.Tensor,
                 iscale: torch.Tensor, nmax: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """`_levels((x - origin) * iscale, 0, nmax)` for x [n, M] whose columns lie in [x_lo, x_hi] ([M] each, the
    columns' extremes). v = (x - origin) * iscale is monotonic in x in float32 too, so (x_lo - origin) * iscale and
    (x_hi - origin) * iscale bound each column's v: where all are finite and within +-4194303 (the CPU check, one
    sync), nearest_int is round-half-even and two passes replace the five of `_levels`. out: a buffer like x for v
    (a fresh [n, M] tensor a step costs the CPU as much as a pass in page faults)."""
    v = torch.sub(x, origin, out=out).mul_(iscale) if out is not None else (x - origin).mul_(iscale)
    if x.device.type == "cpu":
        ends = torch.stack([(x_lo - origin) * iscale, (x_hi - origin) * iscale])
        if bool((ends.abs() <= _NEAREST_EXACT).all()):  # False for NaN and inf
            return v.round_().clamp_(0, nmax)
    return _levels(v, 0, nmax)


def _seqsum(t: torch.Tensor, from_first: bool = False) -> torch.Tensor:
    """Running float32 sum over dim 0 in index order: `s = 0; for i: s += t[i]` ([n, ...] -> [...]).
    from_first starts at t[0] instead of 0 (differs only in the sign of a zero sum)."""
    if from_first:
        acc = t[0].clone()
        rest = range(1, t.shape[0])
    else:
        acc = torch.zeros_like(t[0])
        rest = range(t.shape[0])
    for i in rest:
        acc += t[i]
    return acc


def _seq_extreme(x: torch.Tensor, smaller: bool, init: float) -> torch.Tensor:
    """`m = init; for i: if (x[i] < m) m = x[i]` (or `>`) over dim 0: keeps the first of equal values, so the sign
    of a zero minimum is C's (it reaches the bytes of Q4_1/Q5_1)."""
    m = torch.full_like(x[0], init)
    for i in range(x.shape[0]):
        m = torch.where(x[i] < m if smaller else x[i] > m, x[i], m)
    return m


def _sqrt(v: torch.Tensor) -> torch.Tensor:
    """sqrtf, correctly rounded: torch's float32 sqrt on the CPU is not (it differs from IEEE in ~20% of values);
    the float64 root rounded to float32 is (53 >= 2*24 + 2 bits)."""
    return torch.sqrt(v.double()).float()


def _fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    """float32 [M] -> the fp16 bytes [M, 2] (round to nearest even; ggml's GGML_FP32_TO_FP16 for finite values)."""
    return v.to(torch.float16).contiguous().view(torch.uint8).view(-1, 2)


def _fp16_value(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float16).float()


def _u8(v: torch.Tensor) -> torch.Tensor:
    """int -> the C uint8_t it is stored as (two's complement wrap)."""
    return (v & 0xFF).to(torch.uint8)


# ----------------------------------------------------------------------------------------------------------------
# the shared searches of ggml-quants.c, on position-major tensors: x, w [n, M] = element position x block


def _make_qkx(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
              zero_sign: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_qkx2_quants / make_qkx3_quants (one algorithm): asymmetric (scale, min) search.
    x, w [n, M] -> scale [M], the_min [M] (>= 0), L [n, M] (float, 0..nmax).
    zero_sign: find min/max by C's sequential scan, for callers that store the min itself (Q4_1, Q5_1)."""
    if zero_sign:
        xmin, xmax = _seq_extreme(x, True, math.inf), _seq_extreme(x, False, -math.inf)
    else:
        xmin, xmax = x.amin(0), x.amax(0)  # [M]
    x_lo = xmin  # the columns' extremes bound the levels' arguments (_grid_levels)
    xmin = torch.where(xmin > 0, 0.0, xmin)  # `if (min > 0) min = 0`
    flat = xmax == xmin
    sum_w = _seqsum(w, from_first=True)
    sum_x = _seqsum(w * x, from_first=True)
    iscale = _div(float(nmax), xmax - xmin)
    scale = _div(1.0, iscale)
    n, M = x.shape
    prods = torch.empty(n, 3, M, dtype=torch.float32, device=x.device)  # w*La, w*La*La, w*La*x, summed together
    buf = torch.empty_like(x)  # the levels, then the differences, of each step
    # [n, M]; 0 <= (x - xmin) * iscale <= nmax (1 + eps) where finite (non-finite: 0, as in make_qx)
    L = torch.sub(x, xmin, out=buf).mul_(iscale).round_().nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).clamp_(0, nmax)
    diff = L.mul_(scale).add_(xmin).sub_(x)
    best = _seqsum(diff.mul_(diff).mul_(w))
    # L is a function of the grid (iscale, min) it was rounded on: keep the grid of the best step ([M] each) and
    # round once at the end instead of carrying an [n, M] choice through every step
    grid_iscale, grid_min = iscale, xmin
    cur_min = xmin
    for s in range(nstep + 1):
        c = float(np.float32(rmin) + np.float32(rdelta) * np.float32(s) + np.float32(nmax))
        iscale = _div(c, xmax - cur_min)  # the current min: an accepted step moves the grid of later ones
        # exact nearest_int: once the min has moved, x - min can be far below 0 for a skewed weighting (checked)
        La = _grid_levels(x, x_lo, xmax, cur_min, iscale, nmax, out=buf)
        torch.mul(w, La, out=prods[:, 0])
        torch.mul(prods[:, 0], La, out=prods[:, 1])
        torch.mul(prods[:, 0], x, out=prods[:, 2])
        sl, sl2, sxl = _seqsum(prods)  # [M] each
        D = sum_w * sl2 - sl * sl
        this_scale = _div(sum_w * sxl - sum_x * sl, D)
        this_min = _div(sl2 * sum_x - sl * sxl, D)
        pos = this_min > 0
        this_min = torch.where(pos, 0.0, this_min)
        this_scale = torch.where(pos, _div(sxl, sl2), this_scale)
        diff = La.mul_(this_scale).add_(this_min).sub_(x)
        err = _seqsum(diff.mul_(diff).mul_(w))
        take = (D > 0) & (err < best)
        grid_iscale = torch.where(take, iscale, grid_iscale)
        grid_min = torch.where(take, cur_min, grid_min)
        best = torch.where(take, err, best)
        scale = torch.where(take, this_scale, scale)
        cur_min = torch.where(take, this_min, cur_min)
    L = _grid_levels(x, x_lo, xmax, grid_min, grid_iscale, nmax)
    scale = torch.where(flat, 0.0, scale)
    L = torch.where(flat, 0.0, L)
    return scale, -cur_min, L


def _make_qp(x: torch.Tensor, w: torch.Tensor, nmax: int = 63) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qp_quants: the 8 sub-block scales (or mins) of each super-block to 6 bits, weighted.
    x, w [n, B] -> scale [B], L [n, B] (int32, as the uint8 C stores)."""
    mx = x.amax(0)
    mx = torch.where(mx > 0, mx, 0.0)  # `max = 0; max = MAX(max, x[i])`
    zero = mx < GROUP_MAX_EPS
    iscale = _div(float(nmax), mx)
    L0 = (_nearest_int(iscale * x) & 0xFF).float()  # stored as uint8 before the first error is measured
    diff = x - _div(1.0, iscale) * L0
    best = _seqsum((w * diff) * diff)
    for s in (-4, -3, -2, -1, 1, 2, 3, 4):
        isi = _div(float(np.float32(0.1) * np.float32(s) + np.float32(nmax)), mx)
        l = _nearest_int(isi * x).clamp_(max=nmax).float()
        diff = x - _div(1.0, isi) * l
        mse = _seqsum((w * diff) * diff)
        better = mse < best
        best = torch.where(better, mse, best)
        iscale = torch.where(better, isi, iscale)
    li = _nearest_int(iscale * x).clamp_(max=nmax)  # int; the sums use it unwrapped
    l = li.float()
    sumlx = _seqsum((w * x) * l)
    suml2 = _seqsum((w * l) * l)
    Lu = (li & 0xFF).float()  # [n, B]
    for _ in range(5):  # a pass that changes nothing leaves the state as it is, so all five are run
        for i in range(x.shape[0]):
            wi, xi, Li = w[i], x[i], Lu[i]
            slx0 = sumlx - (wi * xi) * Li
            sl20 = suml2 - (wi * Li) * Li
            ni = _nearest_int(_div(xi * sl20, slx0)).clamp_(max=nmax)
            new = ni.float()
            slx = slx0 + (wi * xi) * new
            sl2 = sl20 + (wi * new) * new
            ok = (slx0 > 0) & (sl20 > 0) & (new != Li) & ((slx * slx) * suml2 > (sumlx * sumlx) * sl2)
            Lu[i] = torch.where(ok, (ni & 0xFF).float(), Li)
            sumlx = torch.where(ok, slx, sumlx)
            suml2 = torch.where(ok, sl2, suml2)
    scale = torch.where(suml2 > 0, _div(sumlx, suml2), 0.0)
    scale = torch.where(zero, 0.0, scale)
    Lu = torch.where(zero, 0.0, Lu)
    return scale, Lu.to(torch.int32)


def _make_qx(x: torch.Tensor, nmax: int, qw: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants with rmse_type 1: symmetric search, weights qw or x*x.
    x [n, M] -> signed scale [M], L [n, M] (float, 0..2*nmax-1)."""
    n, M = x.shape
    amax = x[0].abs()
    mx = x[0].clone()
    for i in range(1, n):  # the value of largest |x|, the first one on ties (C's `if (ax > amax)` scan)
        ax = x[i].abs()
        bigger = ax > amax
        amax = torch.where(bigger, ax, amax)
        mx = torch.where(bigger, x[i], mx)
    zero = amax < GROUP_MAX_EPS
    w = x * x if qw is None else qw
    wx = w * x
    l = torch.empty_like(x)  # the levels of the step at hand
    prods = torch.empty(n, 2, M, dtype=torch.float32, device=x.device)

    def sums(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # |iscale * x| <= nmax + 1: rounding half to even is nearest_int; a non-finite value (an infinite iscale
        # over a sub-block of range below ~1e-37) is 0, as x86 ggml makes it
        torch.mul(iscale, x, out=l)
        l.round_().nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).clamp_(-nmax, nmax - 1)
        torch.mul(wx, l, out=prods[:, 0])
        torch.mul(w, l, out=prods[:, 1]).mul_(l)
        sumlx, suml2 = _seqsum(prods)
        return sumlx, suml2

    # L is a function of the iscale it was rounded with: keep the best step's iscale ([M]) and round once at the end
    grid = _div(float(-nmax), mx)
    sumlx, suml2 = sums(grid)
    scale = torch.where(suml2 != 0, _div(sumlx, suml2), 0.0)
    best = scale * sumlx
    for s in range(-9, 10):
        if s == 0:
            continue
        c = float(-(np.float32(nmax) + np.float32(0.1) * np.float32(s)))
        iscale = _div(c, mx)
        sumlx, suml2 = sums(iscale)
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        grid = torch.where(take, iscale, grid)
        scale = torch.where(take, _div(sumlx, suml2), scale)
        best = torch.where(take, scale * sumlx, best)
    sums(grid)
    L = l.add_(nmax)
    scale = torch.where(zero, 0.0, scale)
    L = torch.where(zero, 0.0, L)
    return scale, L


# ----------------------------------------------------------------------------------------------------------------
# packing helpers shared by Q4_K / Q5_K


def _pack_scales_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """The 12 scale bytes of Q4_K/Q5_K from ls, lm [nb, 8] (int, 0..255 as stored uint8), written in C's order."""
    s = torch.zeros(ls.shape[0], 12, dtype=torch.int32, device=ls.device)
    s[:, 0:4] = ls[:, :4]
    s[:, 4:8] = lm[:, :4]
    s[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    s[:, 0:4] |= (ls[:, 4:] >> 4) << 6
    s[:, 4:8] |= (lm[:, 4:] >> 4) << 6
    return _u8(s)


def _unpack_scales_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """get_scale_min_k4 for all 8 sub-blocks: uint8 [nb, 12] -> sc, m int32 [nb, 8] (0..63)."""
    s = s.to(torch.int32)
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([lo & 63, (hi & 0xF) | ((lo >> 6) << 4)], dim=1)
    m = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], dim=1)
    return sc, m


def _pack_nibbles(L: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K qs: L [nb, 256] (0..15 used) -> [nb, 128]; byte 32c+l = q[64c+l] | q[64c+32+l] << 4."""
    q = (L & 0xF).view(-1, 4, 2, 32)
    return _u8(q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def _unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    q = qs.to(torch.int32).view(-1, 4, 1, 32)
    return torch.cat([q & 0xF, q >> 4], dim=2).reshape(-1, 256)


# ----------------------------------------------------------------------------------------------------------------
# the types


TYPES: dict[str, type[GGMLQuant]] = {}

# name: (ggml type id, block size, bytes per block) -- the ids and sizes of gguf.constants (GGML_QUANT_SIZES)
_SIZES = {
    "f32": (0, 1, 4), "f16": (1, 1, 2), "q4_0": (2, 32, 18), "q4_1": (3, 32, 20), "q5_0": (6, 32, 22),
    "q5_1": (7, 32, 24), "q8_0": (8, 32, 34), "q4_k": (12, 256, 144), "q5_k": (13, 256, 176),
    "q6_k": (14, 256, 210), "bf16": (30, 1, 2),
}


class GGMLQuant:
    """One GGML type: block quantize (float32 [nb, block] -> uint8 [nb, type_size]) and dequantize back."""

    name: str
    type_id: int
    block_size: int
    type_size: int
    uses_imatrix: bool = False
    fp16_fields: tuple[int, ...] = ()  # byte offsets of fp16 scales in a block, checked for overflow

    def __init_subclass__(cls, name: str, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.name = name
        cls.type_id, cls.block_size, cls.type_size = _SIZES[name]
        TYPES[name] = cls

    @classmethod
    def quantize_rows(cls, rows: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
        """rows, qw float32 [R, n] -> uint8 [R, n // block * type_size]. Types whose imatrix path looks at the
        whole row (sigma2 of the 32-blocks) override this."""
        blk = cls.block_size
        blocks = cls.quantize_blocks(rows.reshape(-1, blk), None if qw is None else qw.reshape(-1, blk))
        return blocks.view(rows.shape[0], -1)

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def dequantize_blocks(cls, data: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class F32(GGMLQuant, name="f32"):
    @classmethod
    def quantize_blocks(cls, blocks, qw):
        return blocks.contiguous().view(torch.uint8)

    @classmethod
    def dequantize_blocks(cls, data):
        return data.contiguous().view(torch.float32)


class F16(GGMLQuant, name="f16"):
    fp16_fields = (0,)

    @classmethod
    def quantize_blocks(cls, blocks, qw):
        return blocks.to(torch.float16).view(torch.uint8)

    @classmethod
    def dequantize_blocks(cls, data):
        return data.contiguous().view(torch.float16).float()


class BF16(GGMLQuant, name="bf16"):
    @classmethod
    def quantize_blocks(cls, blocks, qw):
        # ggml_compute_fp32_to_bf16 on the bits: torch's own cast may use an instruction that flushes subnormals
        n = blocks.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        n = torch.where((n & 0x7FFFFFFF) > 0x7F800000, (n & 0xFFFF0000) | (64 << 16), n)  # quiet NaN
        n = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
        return torch.cat([_u8(n), _u8(n >> 8)], dim=1)

    @classmethod
    def dequantize_blocks(cls, data):
        return (data.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)


class Q8_0(GGMLQuant, name="q8_0"):
    fp16_fields = (0,)

    @classmethod
    def quantize_blocks(cls, blocks, qw):
        d = _div(blocks.abs().amax(1), 127.0)  # [nb]
        inv = torch.where(d != 0, _div(1.0, d), 0.0)
        v = blocks * inv[:, None]  # x * id, as C rounds it; |v| <= 127 (1 + eps)
        # roundf, half away from zero: t + trunc(2 * (v - t)) with t = trunc(v), the doubled fraction in (-2, 2)
        # giving -1, 0 or 1 with v's sign exactly where |v - t| >= 0.5 (all exact). Truncation by the int32
        # conversion: torch.trunc on the CPU is ~40x slower than a conversion
        t = v.to(torch.int32)
        q = t.add_(v.sub_(t).mul_(2.0).to(torch.int32))
        return torch.cat([_fp16_bytes(d), q.to(torch.int8).view(torch.uint8)], dim=1)

    @classmethod
    def dequantize_blocks(cls, data):
        d = data[:, :2].contiguous().view(torch.float16).float()
        return data[:, 2:].contiguous().view(torch.int8).float() * d


def _row_sigma2(rows: torch.Tensor) -> torch.Tensor:
    """sum_x2 / n_per_row of the 32-block imatrix paths: [R, n] -> [R], a running sum over the row."""
    t = rows.t()
    return _div(_seqsum(t * t), float(rows.shape[1]))


def _impl_weights(rows: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """qw * sqrt(sigma2 + x*x), position-major per 32-block: [R, n] -> [32, R*n/32]."""
    w = qw * _sqrt(_row_sigma2(rows)[:, None] + rows * rows)
    return w.reshape(-1, 32).t().contiguous()


def _pack_q4_32(L: torch.Tensor) -> torch.Tensor:
    """qs of Q4_0/Q4_1: L int [nb, 32] -> [nb, 16]; byte j = L[j] | L[j+16] << 4."""
    return _u8((L[:, :16] & 0xFF) | (L[:, 16:] << 4))


def _pack_q5_32(L: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """qh (u32 little-endian, bit j = bit 4 of L[j]) and qs of Q5_0/Q5_1 from L int [nb, 32]."""
    qs = _u8((L[:, :16] & 0xF) | ((L[:, 16:] & 0xF) << 4))
    bits = ((L >> 4) & 1).view(-1, 4, 8) << torch.arange(8, device=L.device, dtype=torch.int32)
    return _u8(bits.sum(2)), qs


def _unpack_q5_32(data: torch.Tensor, off: int) -> torch.Tensor:
    """q 0..31 [nb, 32] from qh at off..off+3 and qs after it."""
    qh = data[:, off:off + 4].to(torch.int32).view(-1, 4, 1)
    hb = ((qh >> torch.arange(8, device=data.device, dtype=torch.int32)) & 1).reshape(-1, 32)
    qs = data[:, off + 4:off + 20].to(torch.int32)
    return torch.cat([qs & 0xF, qs >> 4], dim=1) | (hb << 4)


class Q4_0(GGMLQuant, name="q4_0"):
    """Q4_0: fp16 d, 16 bytes of nibbles; y = d * (q - 8)."""

    uses_imatrix = True
    fp16_fields = (0,)
    nmax = 8  # make_qx_quants' nmax on the imatrix path

    @classmethod
    def quantize_rows(cls, rows, qw):
        if qw is None:
            return super().quantize_rows(rows, None)
        xs = rows.reshape(-1, 32).t().contiguous()  # [32, M]
        d, L = _make_qx(xs, cls.nmax, _impl_weights(rows, qw))
        return cls._pack(d, L.t().to(torch.int32)).view(rows.shape[0], -1)

    @classmethod
    def quantize_blocks(cls, blocks, qw):
        amax = blocks.abs()
        mx = blocks.gather(1, amax.argmax(1, keepdim=True))[:, 0]  # signed value of largest |x|, first on ties
        d = _div(mx, -float(cls.nmax))
        inv = torch.where(d != 0, _div(1.0, d), 0.0)
        # (int) of a value in [0.5, 2 * nmax + 0.5]: the int32 conversion truncates as C's cast does
        L = (blocks * inv[:, None] + (cls.nmax + 0.5)).to(torch.int32).clamp_(max=2 * cls.nmax - 1)
        return cls._pack(d, L)

    @classmethod
    def _pack(cls, d, L):
        return torch.cat([_fp16_bytes(d), _pack_q4_32(L)], dim=1)

    @classmethod
    def dequantize_blocks(cls, data):
        d = data[:, :2].contiguous().view(torch.float16).float()
        qs = data[:, 2:].to(torch.int32)
        q = torch.cat([qs & 0xF, qs >> 4], dim=1) - 8
        return d * q.float()




class Q5_0(Q4_0, name="q5_0"):
    """Q5_0: fp16 d, u32 qh, 16 bytes of nibbles; y = d * (q - 16)."""

    nmax = 16

    @classmethod
    def _pack(cls, d, L):
        qh, qs = _pack_q5_32(L)
        return torch.cat([_fp16_bytes(d), qh, qs], dim=1)

    @classmethod
    def dequantize_blocks(cls, data):
        d = data[:, :2].contiguous().view(torch.float16).float()
        return d * (_unpack_q5_32(data, 2) - 16).float()


class Q4_1(GGMLQuant, name="q4_1"):
    """Q4_1: fp16 d, fp16 m, 16 bytes of nibbles; y = d * q + m."""

    uses_imatrix = True
    fp16_fields = (0, 2)
    nmax = 15

    @classmethod
    def quantize_rows(cls, rows, qw):
        if qw is None:
            return super().quantize_rows(rows, None)
        xs = rows.reshape(-1, 32).t().contiguous()
        d, the_min, L = _make_qkx(xs, _impl_weights(rows, qw), cls.nmax, -0.9, 0.05, 36, zero_sign=True)
        return cls._pack(d, -the_min, L.t().to(torch.int32)).view(rows.shape[0], -1)

    @classmethod
    def quantize_blocks(cls, blocks, qw):
        xt = blocks.t()
        mn, mx = _seq_extreme(xt, True, math.inf), _seq_extreme(xt, False, -math.inf)  # C's scan: zero signs
        d = _div(mx - mn, float(cls.nmax))
        inv = torch.where(d != 0, _div(1.0, d), 0.0)
        L = ((blocks - mn[:, None]) * inv[:, None] + 0.5).to(torch.int32)  # C's (int8_t) cast of a value >= 0
        if cls.nmax == 15:
            L = L.clamp_(max=15)  # Q4_1 clamps; Q5_1 stores the uint8 as is
        return cls._pack(d, mn, L)

    @classmethod
    def _pack(cls, d, m, L):
        return torch.cat([_fp16_bytes(d), _fp16_bytes(m), _pack_q4_32(L)], dim=1)

    @classmethod
    def dequantize_blocks(cls, data):
        d = data[:, 0:2].contiguous().view(torch.float16).float()
        m = data[:, 2:4].contiguous().view(torch.float16).float()
        qs = data[:, 4:].to(torch.int32)
        return d * torch.cat([qs & 0xF, qs >> 4], dim=1).float() + m




class Q5_1(Q4_1, name="q5_1"):
    """Q5_1: fp16 d, fp16 m, u32 qh, 16 bytes of nibbles; y = d * q + m."""

    nmax = 31

    @classmethod
    def _pack(cls, d, m, L):
        qh, qs = _pack_q5_32(L)
        return torch.cat([_fp16_bytes(d), _fp16_bytes(m), qh, qs], dim=1)

    @classmethod
    def dequantize_blocks(cls, data):
        d = data[:, 0:2].contiguous().view(torch.float16).float()
        m = data[:, 2:4].contiguous().view(torch.float16).float()
        return d * _unpack_q5_32(data, 4).float() + m


class Q4_K(GGMLQuant, name="q4_k"):
    """Q4_K: fp16 d, fp16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles; y = (d*sc)*q - dmin*m."""

    uses_imatrix = True
    fp16_fields = (0, 2)
    nmax = 15
    ref_search = (-1.0, 0.1, 20)  # rmin, rdelta, nstep of quantize_row_q4_K_ref
    clamp_ls = False  # quantize_row_q5_K_impl clamps the make_qp_quants levels to 63, q4_K's does not

    @classmethod
    def quantize_blocks(cls, blocks, qw):
        nb = blocks.shape[0]
        xs = blocks.reshape(nb * 8, 32).t().contiguous()  # [32, M], M = nb*8 sub-blocks
        if qw is None:  # quantize_row_q*_K_ref
            av_x = _sqrt(_div(_seqsum(xs * xs), 32.0))  # [M]
            w = av_x + xs.abs()
            scales, mins, L = _make_qkx(xs, w, cls.nmax, *cls.ref_search)
            scales, mins = scales.view(nb, 8), mins.view(nb, 8)
            max_scale, max_min = scales.amax(1), mins.amax(1)
            max_scale = torch.where(max_scale > 0, max_scale, 0.0)  # running max from 0
            max_min = torch.where(max_min > 0, max_min, 0.0)
            inv_s = torch.where(max_scale > 0, _div(63.0, max_scale), 0.0)
            inv_m = torch.where(max_min > 0, _div(63.0, max_min), 0.0)
            ls = (_nearest_int(inv_s[:, None] * scales) & 0xFF).clamp_(max=63)
            lm = (_nearest_int(inv_m[:, None] * mins) & 0xFF).clamp_(max=63)
            d, dmin = _div(max_scale, 63.0), _div(max_min, 63.0)
        else:  # quantize_row_q*_K_impl
            bt = blocks.t()
            sigma2 = _div(2 * _seqsum(bt * bt), 256.0)  # [nb], over the whole super-block
            qws = qw.reshape(nb * 8, 32).t()
            w = qws * _sqrt(sigma2.repeat_interleave(8)[None, :] + xs * xs)
            sw = _seqsum(w).view(nb, 8).t()  # [8, nb]
            scales, mins, L = _make_qkx(xs, w, cls.nmax, -0.9, 0.05, 36)
            # scales and mins side by side: one make_qp_quants pass over [8, 2*nb] (its loops are launch-bound)
            both, lsm = _make_qp(torch.cat([scales.view(nb, 8).t(), mins.view(nb, 8).t()], 1), torch.cat([sw, sw], 1))
            d, dmin = both[:nb], both[nb:]
            ls, lm = lsm[:, :nb].t(), lsm[:, nb:].t()
            if cls.clamp_ls:
                ls, lm = ls.clamp(max=63), lm.clamp(max=63)
        packed = _pack_scales_k4(ls, lm)
        sc, m = _unpack_scales_k4(packed)
        dd = _fp16_value(d)[:, None] * sc.float()  # [nb, 8]
        dm = _fp16_value(dmin)[:, None] * m.float()
        x3 = blocks.view(nb, 8, 32)
        Lr = _nearest_int(_div(x3 + dm[..., None], dd[..., None].expand_as(x3))).clamp_(0, cls.nmax).float()
        L = torch.where((dd != 0)[..., None], Lr, L.t().reshape(nb, 8, 32))  # dd == 0 keeps the search's L
        return cls._pack(d, dmin, packed, L.reshape(nb, 256).to(torch.int32))

    @classmethod
    def _pack(cls, d, dmin, packed, L):
        return torch.cat([_fp16_bytes(d), _fp16_bytes(dmin), packed, _pack_nibbles(L)], dim=1)

    @classmethod
    def _q(cls, data):
        return _unpack_nibbles(data[:, 16:144])

    @classmethod
    def dequantize_blocks(cls, data):
        nb = data.shape[0]
        d = data[:, 0:2].contiguous().view(torch.float16).float()
        dmin = data[:, 2:4].contiguous().view(torch.float16).float()
        sc, m = _unpack_scales_k4(data[:, 4:16])
        dsc = (d * sc.float())[..., None]  # [nb, 8, 1]
        dm = (dmin * m.float())[..., None]
        q = cls._q(data).view(nb, 8, 32).float()
        return (dsc * q - dm).view(nb, 256)


class Q5_K(Q4_K, name="q5_k"):
    """Q5_K: Q4_K plus qh (32 bytes, bit 2c / 2c+1 of qh[l] = bit 4 of q[64c+l] / q[64c+32+l]); q in 0..31."""

    nmax = 31
    ref_search = (-0.5, 0.1, 15)
    clamp_ls = True

    @classmethod
    def _pack(cls, d, dmin, packed, L):
        hb = (L >> 4).view(-1, 4, 2, 32)
        shifts = torch.arange(8, device=L.device, dtype=torch.int32).view(1, 4, 2, 1)
        qh = _u8((hb << shifts).sum((1, 2)))
        return torch.cat([_fp16_bytes(d), _fp16_bytes(dmin), packed, qh, _pack_nibbles(L)], dim=1)

    @classmethod
    def _q(cls, data):
        qh = data[:, 16:48].to(torch.int32).view(-1, 1, 1, 32)
        shifts = torch.arange(8, device=data.device, dtype=torch.int32).view(1, 4, 2, 1)
        hb = ((qh >> shifts) & 1).reshape(-1, 256)
        return _unpack_nibbles(data[:, 48:176]) | (hb << 4)


class Q6_K(GGMLQuant, name="q6_k"):
    """Q6_K: ql 128 bytes, qh 64 bytes, int8 scales[16], fp16 d last; y = (d*sc)*(q - 32)."""

    uses_imatrix = True
    fp16_fields = (208,)

    @classmethod
    def quantize_blocks(cls, blocks, qw):
        nb = blocks.shape[0]
        xs = blocks.reshape(nb * 16, 16).t().contiguous()  # [16, M], M = nb*16 sub-blocks
        qws = None if qw is None else qw.reshape(nb * 16, 16).t().contiguous()  # the raw imatrix
        scales, L = _make_qx(xs, 32, qws)
        scales = scales.view(nb, 16)
        abs_s = scales.abs()
        max_abs = abs_s.amax(1)
        max_scale = scales.gather(1, abs_s.argmax(1, keepdim=True))[:, 0]
        zero = max_abs < GROUP_MAX_EPS  # the whole block is zero bytes
        iscale = _div(-128.0, max_scale)
        d = _div(1.0, iscale)
        sc = _nearest_int(iscale[:, None] * scales).clamp_(max=127)
        sc = ((sc + 128) & 0xFF) - 128  # int8_t store
        dd = _fp16_value(d)[:, None] * sc.float()  # [nb, 16]
        x3 = blocks.view(nb, 16, 16)
        Lr = (_nearest_int(_div(x3, dd[..., None].expand_as(x3))).clamp_(-32, 31) + 32).float()
        L = torch.where((dd != 0)[..., None], Lr, L.t().reshape(nb, 16, 16)).reshape(nb, 2, 4, 32).to(torch.int32)
        ql = torch.cat([(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4),
                        (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)], dim=2).reshape(nb, 128)
        qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4)
              | ((L[:, :, 3] >> 4) << 6)).reshape(nb, 64)
        out = torch.cat([_u8(ql), _u8(qh), _u8(sc), _fp16_bytes(d)], dim=1)
        return torch.where(zero[:, None], 0, out).to(torch.uint8)

    @classmethod
    def dequantize_blocks(cls, data):
        nb = data.shape[0]
        ql = data[:, 0:128].to(torch.int32).view(nb, 2, 2, 32)  # [nb, half, ql row, l]
        qh = data[:, 128:192].to(torch.int32).view(nb, 2, 1, 32)
        sc = data[:, 192:208].contiguous().view(torch.int8).float()
        d = data[:, 208:210].contiguous().view(torch.float16).float()
        lo = torch.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], dim=2)
        hi = (qh >> torch.tensor([0, 2, 4, 6], device=data.device, dtype=torch.int32).view(1, 1, 4, 1)) & 3
        q = ((lo | (hi << 4)) - 32).view(nb, 16, 16).float()
        return ((d * sc)[..., None] * q).view(nb, 256)


# ----------------------------------------------------------------------------------------------------------------
# public API


def qtype_info(qtype: str) -> type[GGMLQuant]:
    cls = TYPES.get(str(qtype).lower())
    if cls is None:
        raise QuantkitError(f"unknown GGML type {qtype!r}; known: {', '.join(TYPES)}")
    return cls


def row_bytes(qtype: str, n: int) -> int:
    """Bytes of one row of n values (ggml_row_size)."""
    cls = qtype_info(qtype)
    if n % cls.block_size:
        raise QuantkitError(f"rows of {n} values are not a multiple of the {cls.name} block size {cls.block_size}")
    return n // cls.block_size * cls.type_size


def fallback(qtype: str, n: int) -> str:
    """The type llama-quantize actually writes for rows of n values (`tensor_type_fallback`)."""
    qtype = qtype_info(qtype).name
    if n % TYPES[qtype].block_size == 0:
        return qtype
    qtype = FALLBACK.get(qtype, qtype)
    return qtype if n % TYPES[qtype].block_size == 0 else "f16"


def _check_finite(t: torch.Tensor, what: str) -> None:
    first = first_nonfinite(t)
    if first is not None:
        raise QuantkitError(f"{what}: NaN or inf (first at {first}); refusing to quantize it")


def quantize(x: torch.Tensor, qtype: str, imatrix: torch.Tensor | None = None, *, name: str | None = None
             ) -> torch.Tensor:
    """x [..., n] (any float dtype, CPU or CUDA) -> uint8 [..., n // block * type_size], bytes as llama.cpp's
    ggml_quantize_chunk writes them. imatrix: per-column importance [n], or one vector per leading index,
    [*x.shape[:-2], n] (per-expert slices of a stacked [n_expert, rows, n] tensor); ignored by q8_0/f16/bf16/f32."""
    cls = qtype_info(qtype)
    label = name or "tensor"
    if x.dim() == 0 or not x.is_floating_point():
        raise QuantkitError(f"{label}: cannot quantize a {x.dtype} tensor of shape {list(x.shape)} to {cls.name}")
    n = x.shape[-1]
    if n % cls.block_size:
        raise QuantkitError(f"{label}: rows of {n} values are not a multiple of the {cls.name} block size "
                            f"{cls.block_size}")
    _check_finite(x, label)
    rows = x.reshape(-1, n)
    R = rows.shape[0]
    qw_rows, per = None, R
    if imatrix is not None and cls.uses_imatrix:
        im = torch.as_tensor(imatrix).to(device=x.device, dtype=torch.float32)
        lead = tuple(x.shape[:-2]) if x.dim() >= 2 else ()
        if im.shape[-1] != n or (im.dim() > 1 and tuple(im.shape[:-1]) != lead):
            raise QuantkitError(f"{label}: imatrix of shape {list(im.shape)} does not fit a weight of shape "
                                f"{list(x.shape)} (want [{n}] or {list(lead) + [n]})")
        _check_finite(im, f"{label} imatrix")
        qw_rows = im.reshape(-1, n)
        per = R // qw_rows.shape[0]
    out = torch.empty(R, n // cls.block_size * cls.type_size, dtype=torch.uint8, device=x.device)
    step = max(1, CHUNK_WEIGHTS.get(x.device.type, CHUNK_WEIGHTS["cuda"]) // n)
    chunks = [(a, min(R, a + step)) for a in range(0, R, step)]

    def one(ab: tuple[int, int]) -> None:
        a, b = ab
        qw = None
        if qw_rows is not None:
            idx = torch.arange(a, b, device=x.device) // per
            qw = qw_rows[idx]  # [b-a, n]
        out[a:b] = cls.quantize_rows(rows[a:b].to(torch.float32), qw)

    workers = 1
    if x.device.type == "cpu" and cls.block_size == QK_K:
        workers = min(len(chunks), CPU_WORKERS or torch.get_num_threads())
    if workers > 1:
        # k-quant chunks side by side, one torch thread each: their searches are thousands of small element-wise
        # ops, which intra-op threads barely split, while torch releases the GIL inside each (measured on 2 cores:
        # q4_k 1.5x, q6_k 1.6x; Q8_0's few large ops split better by themselves). Bytes do not depend on this.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="kquant") as pool:
                list(pool.map(one, chunks))
        finally:
            torch.set_num_threads(threads)
    else:
        for ab in chunks:
            one(ab)
    if cls.fp16_fields:
        fields = out.view(-1, cls.type_size)
        for off in cls.fp16_fields:
            bits = fields[:, off:off + 2].to(torch.int32)
            if (((bits[:, 0] | (bits[:, 1] << 8)) & 0x7C00) == 0x7C00).any():
                raise QuantkitError(f"{label}: values too large for {cls.name} (max |x| = "
                                    f"{float(x.abs().max()):.4g}); its fp16 scale overflows")
    return out.view(*x.shape[:-1], -1)


def dequantize(data: torch.Tensor, qtype: str, shape: Sequence[int]) -> torch.Tensor:
    """uint8 bytes of `shape` values in qtype -> float32 [*shape] (bit-identical to gguf.quants.dequantize)."""
    cls = qtype_info(qtype)
    shape = tuple(int(s) for s in shape)
    want = math.prod(shape[:-1]) * row_bytes(cls.name, shape[-1])
    if data.dtype != torch.uint8 or data.numel() != want:
        raise QuantkitError(f"{cls.name} data of {data.numel()} {data.dtype} elements does not hold a tensor of "
                            f"shape {list(shape)} ({want} bytes)")
    blocks = data.reshape(-1, cls.type_size)
    return cls.dequantize_blocks(blocks).reshape(shape)
