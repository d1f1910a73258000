"""Test oracle: a slow, literal, scalar transcription of llama.cpp's k-quant reference quantizers (ggml-quants.c),
from specs/gguf-kquants.md §0-§3. One block at a time, one float32 scalar at a time, loops in C's order, so that
it shares no vectorisation trick with quantkit.formats.gguf_quants. Small inputs only (~10 ms per block).

    data = quantize_row(x, "q4_k", imatrix=None)   # x float32 [n] (n % 256 == 0) -> bytes (numpy uint8)

Every value is an np.float32 and every operation is written as C evaluates it (left to right, no FMA), so numpy
rounds each step to float32 exactly as the compiled C does.
"""

from __future__ import annotations

import numpy as np

F = np.float32
QK_K = 256
GROUP_MAX_EPS = F(1e-15)


def nearest_int(v) -> int:
    val = F(F(v) + F(12582912.0))
    i = int(np.array([val], dtype=np.float32).view(np.int32)[0])
    return (i & 0x007FFFFF) - 0x00400000


def fp16_bytes(v) -> bytes:
    return np.array([v], dtype=np.float32).astype(np.float16).tobytes()


def fp16_value(v) -> np.float32:
    return F(np.array([v], dtype=np.float32).astype(np.float16)[0])


def make_qkx(n, nmax, x, weights, L, rmin, rdelta, nstep):
    """make_qkx2_quants / make_qkx3_quants; fills L, returns (scale, the_min)."""
    mn = x[0]
    mx = x[0]
    sum_w = weights[0]
    sum_x = F(sum_w * x[0])
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        w = weights[i]
        sum_w = F(sum_w + w)
        sum_x = F(sum_x + F(w * x[i]))
    if mn > 0:
        mn = F(0)
    if mx == mn:
        for i in range(n):
            L[i] = 0
        return F(0), F(-mn)
    iscale = F(F(nmax) / F(mx - mn))
    scale = F(F(1) / iscale)
    best_error = F(0)
    for i in range(n):
        l = nearest_int(F(iscale * F(x[i] - mn)))
        L[i] = max(0, min(nmax, l))
        diff = F(F(F(scale * F(L[i])) + mn) - x[i])
        diff = F(diff * diff)
        best_error = F(best_error + F(weights[i] * diff))
    Laux = [0] * n
    for step in range(nstep + 1):
        iscale = F(F(F(F(rmin) + F(F(rdelta) * F(step))) + F(nmax)) / F(mx - mn))
        sum_l = F(0)
        sum_l2 = F(0)
        sum_xl = F(0)
        for i in range(n):
            l = nearest_int(F(iscale * F(x[i] - mn)))
            l = max(0, min(nmax, l))
            Laux[i] = l
            w = weights[i]
            sum_l = F(sum_l + F(w * F(l)))
            sum_l2 = F(sum_l2 + F(F(w * F(l)) * F(l)))
            sum_xl = F(sum_xl + F(F(w * F(l)) * x[i]))
        D = F(F(sum_w * sum_l2) - F(sum_l * sum_l))
        if D > 0:
            this_scale = F(F(F(sum_w * sum_xl) - F(sum_x * sum_l)) / D)
            this_min = F(F(F(sum_l2 * sum_x) - F(sum_l * sum_xl)) / D)
            if this_min > 0:
                this_min = F(0)
                this_scale = F(sum_xl / sum_l2)
            mad = F(0)
            for i in range(n):
                diff = F(F(F(this_scale * F(Laux[i])) + this_min) - x[i])
                diff = F(diff * diff)
                mad = F(mad + F(weights[i] * diff))
            if mad < best_error:
                L[:n] = Laux
                best_error = mad
                scale = this_scale
                mn = this_min
    return scale, F(-mn)


def make_qp_quants(n, nmax, x, L, quant_weights):
    """Fills L (as uint8), returns the scale."""
    mx = F(0)
    for i in range(n):
        mx = mx if mx > x[i] else x[i]
    if mx < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return F(0)
    iscale = F(F(nmax) / mx)
    for i in range(n):
        L[i] = nearest_int(F(iscale * x[i])) & 0xFF
    scale = F(F(1) / iscale)
    best_mse = F(0)
    for i in range(n):
        diff = F(x[i] - F(scale * F(L[i])))
        best_mse = F(best_mse + F(F(quant_weights[i] * diff) * diff))
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = F(F(F(F(0.1) * F(step)) + F(nmax)) / mx)
        scale_is = F(F(1) / iscale_is)
        mse = F(0)
        for i in range(n):
            l = min(nmax, nearest_int(F(iscale_is * x[i])))
            diff = F(x[i] - F(scale_is * F(l)))
            mse = F(mse + F(F(quant_weights[i] * diff) * diff))
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = F(0)
    suml2 = F(0)
    for i in range(n):
        l = min(nmax, nearest_int(F(iscale * x[i])))
        L[i] = l & 0xFF
        w = quant_weights[i]
        sumlx = F(sumlx + F(F(w * x[i]) * F(l)))
        suml2 = F(suml2 + F(F(w * F(l)) * F(l)))
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = quant_weights[i]
            slx = F(sumlx - F(F(w * x[i]) * F(L[i])))
            sl2 = F(suml2 - F(F(w * F(L[i])) * F(L[i])))
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, nearest_int(F(F(x[i] * sl2) / slx)))
                if new_l != L[i]:
                    slx = F(slx + F(F(w * x[i]) * F(new_l)))
                    sl2 = F(sl2 + F(F(w * F(new_l)) * F(new_l)))
                    if F(F(slx * slx) * suml2) > F(F(sumlx * sumlx) * sl2):
                        L[i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if not n_changed:
            break
    return F(sumlx / suml2) if suml2 > 0 else F(0)


def make_qx_quants(n, nmax, x, L, qw):
    """rmse_type 1: weights qw or x*x. Fills L (l + nmax), returns the signed scale."""
    mx = F(0)
    amax = F(0)
    for i in range(n):
        ax = F(abs(x[i]))
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return F(0)
    iscale = F(F(-nmax) / mx)
    sumlx = F(0)
    suml2 = F(0)
    for i in range(n):
        l = max(-nmax, min(nmax - 1, nearest_int(F(iscale * x[i]))))
        L[i] = l + nmax
        w = qw[i] if qw is not None else F(x[i] * x[i])
        sumlx = F(sumlx + F(F(w * x[i]) * F(l)))
        suml2 = F(suml2 + F(F(w * F(l)) * F(l)))
    scale = F(sumlx / suml2) if suml2 != 0 else F(0)
    best = F(scale * sumlx)
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = F(F(-F(F(nmax) + F(F(0.1) * F(step)))) / mx)
        sumlx = F(0)
        suml2 = F(0)
        for i in range(n):
            l = max(-nmax, min(nmax - 1, nearest_int(F(iscale * x[i]))))
            w = qw[i] if qw is not None else F(x[i] * x[i])
            sumlx = F(sumlx + F(F(w * x[i]) * F(l)))
            suml2 = F(suml2 + F(F(w * F(l)) * F(l)))
        if suml2 > 0 and F(sumlx * sumlx) > F(best * suml2):
            for i in range(n):
                L[i] = nmax + max(-nmax, min(nmax - 1, nearest_int(F(iscale * x[i]))))
            scale = F(sumlx / suml2)
            best = F(scale * sumlx)
    return scale


def _pack_scales(ls, lm) -> list[int]:
    s = [0] * 12
    for j in range(8):
        if j < 4:
            s[j] = ls[j] & 0xFF
            s[j + 4] = lm[j] & 0xFF
        else:
            s[j + 4] = ((ls[j] & 0xF) | ((lm[j] & 0xF) << 4)) & 0xFF
            s[j - 4] = (s[j - 4] | ((ls[j] >> 4) << 6)) & 0xFF
            s[j] = (s[j] | ((lm[j] >> 4) << 6)) & 0xFF
    return s


def _get_scale_min_k4(j, s):
    if j < 4:
        return s[j] & 63, s[j + 4] & 63
    return (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)


def _qkx_block(x, qw, nmax):
    """One Q4_K (nmax 15) or Q5_K (nmax 31) super-block: returns (d, dmin, scale bytes, L[256])."""
    L = [0] * QK_K
    scales = [F(0)] * 8
    mins = [F(0)] * 8
    if qw is None:  # quantize_row_q*_K_ref
        rmin, rdelta, nstep = (-1.0, 0.1, 20) if nmax == 15 else (-0.5, 0.1, 15)
        max_scale = F(0)
        max_min = F(0)
        for j in range(8):
            xs = x[32 * j:32 * j + 32]
            sum_x2 = F(0)
            for l in range(32):
                sum_x2 = F(sum_x2 + F(xs[l] * xs[l]))
            av_x = F(np.sqrt(F(sum_x2 / F(32))))
            weights = [F(av_x + F(abs(xs[l]))) for l in range(32)]
            Lj = [0] * 32
            scales[j], mins[j] = make_qkx(32, nmax, xs, weights, Lj, rmin, rdelta, nstep)
            L[32 * j:32 * j + 32] = Lj
            if scales[j] > max_scale:
                max_scale = scales[j]
            if mins[j] > max_min:
                max_min = mins[j]
        inv_scale = F(F(63) / max_scale) if max_scale > 0 else F(0)
        inv_min = F(F(63) / max_min) if max_min > 0 else F(0)
        ls = [min(63, nearest_int(F(inv_scale * scales[j])) & 0xFF) for j in range(8)]
        lm = [min(63, nearest_int(F(inv_min * mins[j])) & 0xFF) for j in range(8)]
        d = F(max_scale / F(63))
        dmin = F(max_min / F(63))
    else:  # quantize_row_q*_K_impl
        sum_x2 = F(0)
        for l in range(QK_K):
            sum_x2 = F(sum_x2 + F(x[l] * x[l]))
        sigma2 = F(F(F(2) * sum_x2) / F(QK_K))
        sw = [F(0)] * 8
        for j in range(8):
            xs = x[32 * j:32 * j + 32]
            weights = [F(qw[32 * j + l] * F(np.sqrt(F(sigma2 + F(xs[l] * xs[l]))))) for l in range(32)]
            sumw = F(0)
            for l in range(32):
                sumw = F(sumw + weights[l])
            sw[j] = sumw
            Lj = [0] * 32
            scales[j], mins[j] = make_qkx(32, nmax, xs, weights, Lj, -0.9, 0.05, 36)
            L[32 * j:32 * j + 32] = Lj
        ls = [0] * 8
        lm = [0] * 8
        d = make_qp_quants(8, 63, scales, ls, sw)
        dmin = make_qp_quants(8, 63, mins, lm, sw)
        if nmax == 31:
            ls = [min(63, v) for v in ls]
            lm = [min(63, v) for v in lm]
    s = _pack_scales(ls, lm)
    for j in range(8):
        sc, m = _get_scale_min_k4(j, s)
        dd = F(fp16_value(d) * F(sc))
        if not dd:
            continue
        dm = F(fp16_value(dmin) * F(m))
        for ii in range(32):
            l = nearest_int(F(F(x[32 * j + ii] + dm) / dd))
            L[32 * j + ii] = max(0, min(nmax, l))
    return d, dmin, s, L


def quantize_block_q4_k(x, qw=None) -> bytes:
    d, dmin, s, L = _qkx_block(x, qw, 15)
    qs = []
    for j in range(0, QK_K, 64):
        qs += [L[j + l] | (L[j + l + 32] << 4) for l in range(32)]
    return fp16_bytes(d) + fp16_bytes(dmin) + bytes(s) + bytes(qs)


def quantize_block_q5_k(x, qw=None) -> bytes:
    d, dmin, s, L = _qkx_block(x, qw, 31)
    qh = [0] * 32
    ql = []
    m1, m2 = 1, 2
    for n in range(0, QK_K, 64):
        for j in range(32):
            l1 = L[n + j]
            if l1 > 15:
                l1 -= 16
                qh[j] |= m1
            l2 = L[n + j + 32]
            if l2 > 15:
                l2 -= 16
                qh[j] |= m2
            ql.append(l1 | (l2 << 4))
        m1 <<= 2
        m2 <<= 2
    return fp16_bytes(d) + fp16_bytes(dmin) + bytes(s) + bytes(qh) + bytes(ql)


def quantize_block_q6_k(x, qw=None) -> bytes:
    L = [0] * QK_K
    scales = [F(0)] * 16
    max_scale = F(0)
    max_abs_scale = F(0)
    for ib in range(16):
        Lb = [0] * 16
        scale = make_qx_quants(16, 32, x[16 * ib:16 * ib + 16], Lb, None if qw is None else qw[16 * ib:16 * ib + 16])
        L[16 * ib:16 * ib + 16] = Lb
        scales[ib] = scale
        abs_scale = F(abs(scale))
        if abs_scale > max_abs_scale:
            max_abs_scale = abs_scale
            max_scale = scale
    if max_abs_scale < GROUP_MAX_EPS:
        return bytes(210)
    iscale = F(F(-128) / max_scale)
    d = F(F(1) / iscale)
    sc = []
    for ib in range(16):
        v = min(127, nearest_int(F(iscale * scales[ib])))
        sc.append(((v + 128) & 0xFF) - 128)
    for j in range(16):
        dd = F(fp16_value(d) * F(sc[j]))
        if not dd:
            continue
        for ii in range(16):
            l = nearest_int(F(x[16 * j + ii] / dd))
            L[16 * j + ii] = max(-32, min(31, l)) + 32
    ql = [0] * 128
    qh = [0] * 64
    for h, j in enumerate(range(0, QK_K, 128)):
        for l in range(32):
            q1, q2, q3, q4 = L[j + l] & 0xF, L[j + l + 32] & 0xF, L[j + l + 64] & 0xF, L[j + l + 96] & 0xF
            ql[64 * h + l] = q1 | (q3 << 4)
            ql[64 * h + l + 32] = q2 | (q4 << 4)
            qh[32 * h + l] = ((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4)
                              | ((L[j + l + 96] >> 4) << 6))
    return bytes(ql) + bytes(qh) + bytes(v & 0xFF for v in sc) + fp16_bytes(d)


def _pack_32(L, nbits):
    qs = bytes(((L[j] & 0xF) | ((L[j + 16] & 0xF) << 4)) for j in range(16))
    if nbits == 4:
        return qs
    qh = 0
    for j in range(16):
        qh |= ((L[j] & 0x10) >> 4) << j
        qh |= ((L[j + 16] & 0x10) >> 4) << (j + 16)
    return qh.to_bytes(4, "little") + qs


def quantize_row_32_impl(x: np.ndarray, qtype: str, imatrix: np.ndarray) -> np.ndarray:
    """quantize_row_q4_0/q4_1/q5_0/q5_1_impl (the imatrix paths of the 32-block fallback types) for one row."""
    x = [F(v) for v in np.asarray(x, dtype=np.float32)]
    qw = [F(v) for v in np.asarray(imatrix, dtype=np.float32)]
    sum_x2 = F(0)
    for v in x:
        sum_x2 = F(sum_x2 + F(v * v))
    sigma2 = F(sum_x2 / F(len(x)))
    out = b""
    for ib in range(0, len(x), 32):
        xb = x[ib:ib + 32]
        weight = [F(qw[ib + j] * F(np.sqrt(F(sigma2 + F(xb[j] * xb[j]))))) for j in range(32)]
        L = [0] * 32
        if qtype in ("q4_0", "q5_0"):
            d = make_qx_quants(32, 8 if qtype == "q4_0" else 16, xb, L, weight)
            out += fp16_bytes(d) + _pack_32(L, 4 if qtype == "q4_0" else 5)
        else:
            d, the_min = make_qkx(32, 15 if qtype == "q4_1" else 31, xb, weight, L, -0.9, 0.05, 36)
            out += fp16_bytes(d) + fp16_bytes(F(-the_min)) + _pack_32(L, 4 if qtype == "q4_1" else 5)
    return np.frombuffer(out, dtype=np.uint8).copy()


BLOCK_QUANTIZERS = {"q4_k": quantize_block_q4_k, "q5_k": quantize_block_q5_k, "q6_k": quantize_block_q6_k}


def quantize_row(x: np.ndarray, qtype: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """One row x [n] -> uint8 [n // 256 * type_size]; the imatrix, if given, is this row's [n] vector."""
    x = [F(v) for v in np.asarray(x, dtype=np.float32)]
    qw = None if imatrix is None else [F(v) for v in np.asarray(imatrix, dtype=np.float32)]
    fn = BLOCK_QUANTIZERS[qtype]
    out = b"".join(fn(x[i:i + QK_K], None if qw is None else qw[i:i + QK_K]) for i in range(0, len(x), QK_K))
    return np.frombuffer(out, dtype=np.uint8).copy()
