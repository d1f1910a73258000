"""W4A16 GEMM on the AutoAWQ GEMM layout, in Triton, with the pure-PyTorch reference beside it.

Weights as AutoAWQ (and vLLM's AWQ loader) store them, read directly with no repack:
  qweight  int32 [K, N/8]    eight 4-bit codes per word along N; nibble i of word c holds column 8c + AWQ_ORDER[i],
                             AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
  qzeros   int32 [K/G, N/8]  4-bit zero points, packed the same way
  scales   fp16  [K/G, N]    one scale per group of G consecutive K rows (G = 128 for MiniMax-M2's AWQ export)
  W[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n]

Usage:
    from quantkit.kernels.w4a16_gemm import w4a16_linear

    y = w4a16_linear(x, qweight, qzeros, scales)     # x [..., K] bf16/fp16/fp32 -> y [..., N] x.dtype
    y_ref = w4a16_linear_ref(x, qweight, qzeros, scales)
    w = awq_dequantize_ref(qweight, qzeros, scales)  # fp32 [K, N]

In the kernel each program loads a [BLOCK_K, BLOCK_N/8] tile of words, spreads every word over its eight columns
(`tl.interleave` three times), shifts each column's nibble out and subtracts the zero point: the integer codes
q - z (in [-15, 15], exact in bf16/fp16) go to the tensor cores against the activations, and the group's scale
multiplies the fp32 partial product of that K block, once per output element rather than once per weight. BLOCK_K
divides G, so one K block never straddles two groups. At small M the weights' bandwidth bounds the time; SPLIT_K > 1
splits the K loop over programs so that narrow outputs still fill the GPU, in the same launch: the tile's last program
to finish adds the fp32 partial sums in split order (kernels/fp8_gemm.py's split_k_sum).

The fused MoE and the runtime's projections (kernels/w4a16_moe.py) read another layout, K-major, faster at decode
sizes, which this module also defines (the one-time repack at load and its reference dequantization, torch only);
the kernel here is for the AutoAWQ tensors as stored, and the benchmark's baseline:
  qweight  int32 [.., N, K/8]  each row's codes contiguous along K; within a group of G codes (G/8 words) nibble j
                               of word c holds code j * G/8 + c
  zeros    uint8 [.., N, K/G]
  scales         [.., N, K/G]  (the stored dtype)
    qkw = awq_to_kmajor(qweight, qzeros, scales)   # from AutoAWQ tensors, any leading dims, on their device
    qkw = pack_kmajor(q, scales, zeros)            # from codes q [.., N, K] (compressed-tensors: unpacked first)
    w = kmajor_dequantize_ref(*qkw)                # fp32 [.., N, K]

Running on CPU (Triton's interpreter, TRITON_INTERPRET=1) follows kernels/fp8_gemm.py: activations are converted to
fp32 at once and the output rounded to the bf16 grid before the store (`UPCAST`, `OUT_MANT`). Block configurations:
`configs/w4a16_gemm.json` ({device: {"N=..,K=..,G=..": {M bucket: config}}}), else the defaults below.
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
    device_key,
    grouped_pid,
    load_config_table,
    out_mantissa_bits,
    round_to_out_grid,
    split_k_sum,
    split_k_workspace,
    triton_kernel,
)
from .fp8_gemm import (
    check_device as _check_device,
)

PACK = 8  # 4-bit codes per int32 word
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "SPLIT_K", "num_warps", "num_stages")


def check_device(*tensors: torch.Tensor) -> torch.device:
    """All tensors on one device that can run the kernels (any CUDA GPU with bf16 tensor cores, or the interpreter)."""
    return _check_device(*tensors, min_capability=(8, 0), need="the W4A16 kernels")


def check_awq_weight(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                     name: str = "") -> tuple[int, int, int]:
    """(K, N, G) of an AutoAWQ weight, with optional leading expert dimension; raises on any inconsistency."""
    lead = qweight.shape[:-2]
    if qweight.dim() < 2 or qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(f"{name}qweight and qzeros must be int32 [.., K, N/8], got {qweight.dtype} "
                         f"{tuple(qweight.shape)} and {qzeros.dtype}")
    k, n8 = qweight.shape[-2:]
    n = n8 * PACK
    if scales.dtype not in (torch.float16, torch.bfloat16, torch.float32) or scales.dim() != qweight.dim() \
            or scales.shape[:-2] != lead or scales.shape[-1] != n or scales.shape[-2] == 0 or k % scales.shape[-2]:
        raise ValueError(f"{name}scales must be float [.., K/G, N={n}] for qweight {tuple(qweight.shape)}, got "
                         f"{scales.dtype} {tuple(scales.shape)}")
    g = k // scales.shape[-2]
    if tuple(qzeros.shape) != (*lead, k // g, n8):
        raise ValueError(f"{name}qzeros must be [.., K/G={k // g}, N/8={n8}], got {tuple(qzeros.shape)}")
    if g < 16 or g & (g - 1):
        raise ValueError(f"{name}group size {g} must be a power of two >= 16")
    if qweight.stride(-1) != 1 or qzeros.stride(-1) != 1 or scales.stride(-1) != 1:
        raise ValueError(f"{name}qweight, qzeros and scales must be contiguous along N")
    return k, n, g


# --------------------------------------------------------------------------------------------------------------------
# reference


def awq_dequantize_ref(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W = (q - z) * s in fp32, [.., K, N], from the AutoAWQ tensors (any leading dimensions)."""
    k, n, g = check_awq_weight(qweight, qzeros, scales)
    shifts = torch.tensor([4 * AWQ_ORDER.index(j) for j in range(PACK)], dtype=torch.int32, device=qweight.device)

    def unpack(p: torch.Tensor) -> torch.Tensor:  # int32 [.., R, N/8] -> float [.., R, N], column 8c + j
        return ((p[..., None] >> shifts) & 0xF).flatten(-2).float()

    q = unpack(qweight)  # [.., K, N]
    z = unpack(qzeros)  # [.., K/G, N]
    lead = qweight.shape[:-2]
    w = (q.view(*lead, k // g, g, n) - z[..., None, :]) * scales.float()[..., None, :]
    return w.view(*lead, k, n)


def w4a16_gemm_ref(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reference of w4a16_gemm: x [M, K] @ W [K, N] in fp32, cast to out_dtype (x.dtype by default)."""
    return (x.float() @ awq_dequantize_ref(qweight, qzeros, scales)).to(out_dtype or x.dtype)


def w4a16_linear_ref(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                     scales: torch.Tensor) -> torch.Tensor:
    """Reference of w4a16_linear."""
    y = w4a16_gemm_ref(x.reshape(-1, x.shape[-1]), qweight, qzeros, scales)
    return y.view(*x.shape[:-1], y.shape[-1])


# --------------------------------------------------------------------------------------------------------------------
# the K-major layout the fused MoE reads (kernels/w4a16_moe.py), repacked once at load


def check_kmajor_weight(qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                        name: str = "") -> tuple[int, int, int]:
    """(N, K, G) of a K-major weight (qweight int32 [.., N, K/8], zeros uint8 [.., N, K/G], scales [.., N, K/G];
    nibble order: pack_kmajor)."""
    if qweight.dim() < 2 or qweight.dtype != torch.int32 or zeros.dtype != torch.uint8:
        raise ValueError(f"{name}qweight must be int32 [.., N, K/8] and zeros uint8, got {qweight.dtype} "
                         f"{tuple(qweight.shape)} and {zeros.dtype}")
    n, k8 = qweight.shape[-2:]
    k = k8 * PACK
    if scales.dtype not in (torch.float16, torch.bfloat16, torch.float32) or scales.dim() != qweight.dim() \
            or scales.shape[:-1] != qweight.shape[:-1] or scales.shape[-1] == 0 or k % scales.shape[-1]:
        raise ValueError(f"{name}scales must be float [.., N={n}, K/G] for qweight {tuple(qweight.shape)}, got "
                         f"{scales.dtype} {tuple(scales.shape)}")
    g = k // scales.shape[-1]
    if tuple(zeros.shape) != tuple(scales.shape):
        raise ValueError(f"{name}zeros must be [.., N, K/G] = {tuple(scales.shape)}, got {tuple(zeros.shape)}")
    if g < 16 or g & (g - 1):
        raise ValueError(f"{name}group size {g} must be a power of two >= 16")
    if any(t.shape[-1] > 1 and t.stride(-1) != 1 for t in (qweight, zeros, scales)):
        raise ValueError(f"{name}qweight, zeros and scales must be contiguous along K")
    return n, k, g


def pack_kmajor(q: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes q [.., N, K] (0..15), scales [.., N, K/G], zeros [.., N, K/G] -> the K-major tensors: qweight int32
    [.., N, K/8] where, within each group of G codes (G/8 words), nibble j of word c holds code j * G/8 + c (so the
    codes one nibble place holds across a group's words are consecutive in K: see kernels/w4a16_moe.py), zeros
    uint8, scales as given."""
    k = q.shape[-1]
    if scales.shape[-1] == 0 or k % scales.shape[-1] or (k // scales.shape[-1]) % PACK:
        raise ValueError(f"codes {tuple(q.shape)} and scales {tuple(scales.shape)}: groups of a multiple of 8 codes")
    g = k // scales.shape[-1]
    codes = q.to(torch.int32).unflatten(-1, (k // g, PACK, g // PACK))  # [.., N, K/G, 8 nibbles, G/8 words]
    qweight = codes[..., 0, :].clone()
    for j in range(1, PACK):
        qweight |= codes[..., j, :] << (4 * j)  # wraps into the sign bit: the two's-complement word torch stores
    return qweight.flatten(-2).contiguous(), zeros.to(torch.uint8).contiguous(), scales.contiguous()


def awq_to_kmajor(qweight: torch.Tensor, qzeros: torch.Tensor,
                  scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AutoAWQ (qweight [.., K, N/8], qzeros [.., K/G, N/8], scales [.., K/G, N]) -> K-major (qweight [.., N, K/8],
    zeros uint8 [.., N, K/G], scales [.., N, K/G] in their dtype): the one-time repack at load, torch ops on the
    tensors' device (any leading dimensions; a GPU repacks a MiniMax-M2 MoE layer in milliseconds)."""
    check_awq_weight(qweight, qzeros, scales)
    shifts = torch.tensor([4 * AWQ_ORDER.index(j) for j in range(PACK)], dtype=torch.int32, device=qweight.device)

    def unpack(p: torch.Tensor) -> torch.Tensor:  # int32 [.., R, N/8] -> int32 [.., R, N], column 8c + j
        return ((p[..., None] >> shifts) & 0xF).flatten(-2)

    q = unpack(qweight).transpose(-1, -2)  # [.., N, K]
    z = unpack(qzeros).transpose(-1, -2)  # [.., N, K/G]
    return pack_kmajor(q, scales.transpose(-1, -2), z)


def kmajor_dequantize_ref(qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W = (q - z) * s in fp32, [.., N, K] (the nn.Linear orientation), from the K-major tensors."""
    n, k, g = check_kmajor_weight(qweight, zeros, scales)
    shifts = torch.arange(0, 4 * PACK, 4, dtype=torch.int32, device=qweight.device)
    words = qweight.unflatten(-1, (k // g, g // PACK))  # [.., N, K/G, G/8]
    q = ((words[..., None, :] >> shifts[:, None]) & 0xF).flatten(-3).float()  # [.., N, K/G, 8, G/8] -> [.., N, K]
    lead = qweight.shape[:-2]
    w = (q.view(*lead, n, k // g, g) - zeros.float()[..., None]) * scales.float()[..., None]
    return w.view(*lead, n, k)


# --------------------------------------------------------------------------------------------------------------------
# kernel


def _w4a16_gemm_kernel(
    a_ptr,  # [M, K] activations
    b_ptr,  # qweight int32 [K, N/8]
    z_ptr,  # qzeros int32 [K/G, N/8]
    s_ptr,  # scales [K/G, N]
    c_ptr,  # [M, N] output
    part_ptr, count_ptr,  # SPLIT_K > 1: fp32 [SPLIT_K, M, N] partial sums and arrival counters (fp8_gemm.split_k_sum)
    M, N,
    stride_am, stride_ak, stride_bk, stride_bn, stride_zk, stride_zn, stride_sk, stride_sn,
    stride_cm, stride_cn,
    K: tl.constexpr,  # a loop bound: see kernels/fp8_gemm.py
    GROUP: tl.constexpr,  # quantization group along K; BLOCK_K divides it
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
    UPCAST: tl.constexpr, OUT_MANT: tl.constexpr, F32_DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_w = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)  # [BLOCK_N/8] packed columns
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    m_mask = offs_m < M
    n_mask = offs_n < N
    w_mask = offs_w < N // 8
    offs_m64 = offs_m.to(tl.int64)
    # column 8c + j sits in nibble AWQ_ORDER.index(j) = j // 2 + 4 * (j % 2) of word c
    j = offs_n % 8
    shifts = ((j // 2) + (j % 2) * 4) * 4  # [BLOCK_N]

    k_per_split: tl.constexpr = K // SPLIT_K  # a multiple of BLOCK_K (the launcher checks)
    k0 = pid_k * k_per_split
    a_ptrs = a_ptr + offs_m64[:, None] * stride_am + (k0 + offs_k)[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + (k0 + offs_k).to(tl.int64)[:, None] * stride_bk + offs_w[None, :] * stride_bn  # [BK, BN/8]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, k_per_split // BLOCK_K):
        g = (k0 + kb * BLOCK_K) // GROUP
        a = tl.load(a_ptrs, mask=m_mask[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
        words = tl.load(b_ptrs, mask=w_mask[None, :], other=0)  # [BLOCK_K, BLOCK_N/8]
        words = tl.interleave(words, words)
        words = tl.interleave(words, words)
        words = tl.interleave(words, words)  # [BLOCK_K, BLOCK_N]: word c in columns 8c .. 8c+7
        zw = tl.load(z_ptr + g * stride_zk + offs_w * stride_zn, mask=w_mask, other=0)  # [BLOCK_N/8]
        zw = tl.interleave(zw, zw)
        zw = tl.interleave(zw, zw)
        zw = tl.interleave(zw, zw)  # [BLOCK_N]
        z = (zw >> shifts) & 0xF
        w = (((words >> shifts[None, :]) & 0xF) - z[None, :]).to(a.dtype)  # [BLOCK_K, BLOCK_N] q - z, exact
        s = tl.load(s_ptr + g * stride_sk + offs_n * stride_sn, mask=n_mask, other=0.0).to(tl.float32)
        if F32_DOT:
            part = tl.dot(a, w, input_precision="ieee")
        else:
            part = tl.dot(a, w)
        acc += part * s[None, :]
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    mn_mask = m_mask[:, None] & n_mask[None, :]
    last = True
    if SPLIT_K > 1:  # one launch: the tile's last program adds the partial sums in split order
        acc, last = split_k_sum(acc, part_ptr, count_ptr + pid, pid_k, offs_m64, offs_n.to(tl.int64), mn_mask, M, N,
                                SPLIT_K)
    if last:
        if OUT_MANT:  # the interpreter's fp32 -> bf16 cast truncates: round to nearest even first
            acc = round_to_out_grid(acc, OUT_MANT)
        c_ptrs = c_ptr + offs_m64[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mn_mask)


_w4a16_gemm = triton_kernel(_w4a16_gemm_kernel)


def _gemm_default_config(device: torch.device, m: int, n: int, k: int, g: int) -> dict:
    if INTERPRETED:
        # the interpreter pays per program instance and per operation, not per element: few, large tiles
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=min(128, g), GROUP_M=1, SPLIT_K=1, num_warps=4, num_stages=1)
    if m > 256:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=min(64, g), GROUP_M=8, SPLIT_K=1, num_warps=8, num_stages=3)
    # bandwidth-bound: narrow tiles, and split K until every multiprocessor has a program or two
    block_m = 16 if m <= 16 else 32 if m <= 64 else 64
    block_n = 64
    num_sms = _cuda_device_info(_cuda_index(device))[2]
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split = 1
    while tiles * split < 2 * num_sms and k % (2 * split * g) == 0 and split < 8:
        split *= 2
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=min(128, g), GROUP_M=8, SPLIT_K=split, num_warps=4,
                num_stages=4)


def select_config(table: dict, device: str, shape: str, m: int, default: dict) -> dict:
    """The tuned config for (device, shape) at the M bucket nearest to m (the smaller on a tie), over `default`.
    As kernels/fp8_gemm.py's, with SPLIT_K among the keys."""
    buckets = table.get(device, {}).get(shape)
    if not buckets:
        return dict(default)
    bucket = min(buckets, key=lambda b: (abs(int(b) - m), int(b)))
    return {**default, **{k: v for k, v in buckets[bucket].items() if k in CONFIG_KEYS}}


def gemm_config(device: torch.device, m: int, n: int, k: int, g: int, override: dict | None = None) -> dict:
    """Block configuration: configs/w4a16_gemm.json, else the defaults, then `override`; validated against K and G."""
    cfg = select_config(load_config_table("w4a16_gemm.json"), device_key(device), f"N={n},K={k},G={g}", m,
                        _gemm_default_config(device, m, n, k, g))
    cfg = {"SPLIT_K": 1, **cfg, **(override or {})}
    if g % cfg["BLOCK_K"] or cfg["BLOCK_N"] % 8 or k % (cfg["SPLIT_K"] * cfg["BLOCK_K"]):
        raise ValueError(f"block config {cfg} does not fit K={k}, group {g} (BLOCK_K | G, 8 | BLOCK_N, "
                         f"SPLIT_K*BLOCK_K | K)")
    return cfg


def w4a16_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               out_dtype: torch.dtype | None = None, config: dict | None = None) -> torch.Tensor:
    """out = x @ W with W the AutoAWQ weight (module docstring), fp32 accumulation. x [M, K] -> [M, N] out_dtype."""
    if x.dim() != 2 or x.dtype not in ACT_DTYPES:
        raise ValueError(f"x must be [M, K] in one of {ACT_DTYPES}, got {tuple(x.shape)} {x.dtype}")
    k, n, g = check_awq_weight(qweight, qzeros, scales)
    if qweight.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x {tuple(x.shape)} does not fit qweight {tuple(qweight.shape)} [K, N/8]")
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError("x must be contiguous along K")
    device = check_device(x, qweight, qzeros, scales)
    out_dtype = out_dtype or x.dtype
    m = x.shape[0]
    if m == 0:
        return torch.empty((0, n), dtype=out_dtype, device=device)
    cfg = gemm_config(device, m, n, k, g, config)
    split = cfg["SPLIT_K"]
    c = torch.empty((m, n), dtype=out_dtype, device=device)
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    part, counters = split_k_workspace(split, m, n, tiles, device)
    _w4a16_gemm[(tiles, split)](
        x, qweight, qzeros, scales, c, part, counters, m, n,
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), qzeros.stride(0), qzeros.stride(1),
        scales.stride(0), scales.stride(1), c.stride(0), c.stride(1),
        K=k, GROUP=g, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        SPLIT_K=split, UPCAST=INTERPRETED, OUT_MANT=out_mantissa_bits(out_dtype),
        F32_DOT=x.dtype == torch.float32 and not INTERPRETED,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return c


def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """y = x @ W: x [..., K] -> [..., N] in x.dtype."""
    lead = x.shape[:-1]
    y = w4a16_gemm(x.reshape(-1, x.shape[-1]), qweight, qzeros, scales)
    return y.view(*lead, y.shape[-1])
