"""W8A8 FP8 GEMMs as vLLM and DeepSeek run block FP8, in Triton, with the pure-PyTorch references beside them.

Two weight formats, both float8_e4m3fn W [N, K]:
  block    fp32 `weight_scale_inv` [ceil(N/128), ceil(K/128)], one scale per 128x128 tile (the MiniMax-M2 release);
           activations are quantized per token per 128-column group, scales [M, K/128].
  channel  fp32 scale [N, 1], one per output channel; activations per token, scales [M, 1].

Usage:
    from quantkit.kernels.fp8_gemm import fp8_block_linear, per_token_group_quant_fp8, w8a8_block_fp8_matmul

    y = fp8_block_linear(x, w, w_scale_inv)               # x [..., K] bf16, w fp8 [N, K] -> y [..., N] bf16
    xq, xs = per_token_group_quant_fp8(x, 128)             # [M, K] fp8, [M, K/128] fp32
    y = w8a8_block_fp8_matmul(xq, xs, w, w_scale_inv)     # [M, N] bf16
    y = fp8_channel_linear(x, w, w_scale)                  # per-channel weights, per-token activations

Each `foo` has a `foo_ref` in plain PyTorch that tests compare against.

Where kernels run. CUDA tensors run compiled (FP8 operands go straight to `tl.dot`: FP8 tensor cores, compute
capability 8.9+). CPU tensors run in Triton's interpreter, which needs TRITON_INTERPRET=1 in the environment before
triton is first imported: triton reads it when each `@triton.jit` decorator runs, its own standard library
(`tl.cdiv`, `tl.max`, `tl.sigmoid`, ...) included, and an interpreted kernel cannot call a compiled library function
nor the reverse. So the kernels here follow the mode `triton.language` was imported in (`INTERPRETED`), whatever the
variable says when this module is imported. Interpreted, the kernels convert FP8/BF16 values to fp32 at once and
round to the FP8/BF16 grid themselves before each narrowing cast (the interpreter's own casts truncate, or round
half up without carrying into the exponent); that is the `UPCAST` flag.

Block configurations: `configs/fp8_gemm.json`, {device name: {"N=..,K=..,block|channel": {M bucket: config}}},
nearest M bucket; defaults below when a device or shape is absent.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# fp8_block_linear on one token: the GEMM quantizes the row itself (bit for bit per_token_group_quant_fp8's), one
# launch instead of two
QUANT_IN_GEMM = True
# Block scales: a column tile inside one scale block folds that block's one weight scale into the rows' scales each
# K block (B_SCALE_TILE); False reads a scale per column as wider tiles must (kept to measure the two side by side)
TILE_SCALES = True

SCALE_EPS = 1e-10  # smallest amax a scale is made from: an all-zero group quantizes to zeros, not NaN
ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "SPLIT_K", "num_warps", "num_stages",
               "GEMM2", "WS", "PATH", "ONE_LAUNCH", "UNROLL")
# (fp8_moe) GEMM2: the down GEMM's own tile over the shared one; WS: the TMA GEMMs ("gluon": on fp8_gluon's loop,
# num_stages its stages, UNROLL its K blocks a step); PATH "gemv" (block scales): the rows on the CUDA cores, one
# activation row a program (_w8a8_fp8_gemv_kernel); ONE_LAUNCH (fp8_moe, single-token steps): both GEMMs in one
# launch (1; 2: backing off while GEMM 2's programs wait)


def tile_scales(group_n: int, block_n: int, n_offset: int = 0) -> bool:
    """Whether column tiles of block_n starting at multiples of block_n (plus n_offset: the up rows of a gated
    GEMM lie N further down) each lie inside one group_n-row scale block: the launch's B_SCALE_TILE."""
    return TILE_SCALES and group_n % block_n == 0 and n_offset % block_n == 0
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

# True when triton.language was imported with TRITON_INTERPRET=1: its standard-library functions are then
# interpreted ones, and our kernels must be too (see the module docstring).
INTERPRETED: bool = not isinstance(tl.cdiv, triton.runtime.JITFunction)


def triton_kernel(fn: Callable) -> Callable:
    """`triton.jit`, in the mode triton.language was imported in rather than the one TRITON_INTERPRET says now."""
    if INTERPRETED:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn)
    return triton.runtime.JITFunction(fn)


def _round_to_out_grid(acc, OUT_MANT: tl.constexpr):
    """fp32 values rounded to nearest even on the grid of an output type with OUT_MANT mantissa bits (7 for bf16),
    so that the interpreter's truncating fp32 -> bf16 cast stores what a GPU's rounding cast stores."""
    mag = tl.abs(acc)
    e = tl.maximum((mag.to(tl.int32, bitcast=True) >> 23) & 0xFF, 1)
    big = ((e + 23 - OUT_MANT) << 23).to(tl.float32, bitcast=True)
    mag = (mag + big) - big
    return tl.where(acc < 0, -mag, mag)


def _grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(row block, column block) of program pid, visiting GROUP_M row blocks per column sweep (L2 reuse of B)."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


def _split_k_sum(acc, part_ptr, count_ptr, pid_s, offs_m64, offs_n64, mn_mask, M, N, SPLIT_K: tl.constexpr):
    """Split-K's one-launch reduction: each of a tile's SPLIT_K programs leaves its fp32 partial sum acc in
    part [SPLIT_K, M, N] and counts its arrival at count_ptr (the tile's counter, zero between launches); the last to
    arrive adds the partials up in split order (the same sum whichever arrives last), resets the counter for the
    next launch and gets (sum, True); the others get (acc, False) and store nothing."""
    p_ptrs = part_ptr + offs_m64[:, None] * N + offs_n64[None, :]  # [BLOCK_M, BLOCK_N] of split 0
    tl.store(p_ptrs + pid_s * M * N, acc, mask=mn_mask)
    tl.debug_barrier()  # every thread's partial is written before the arrival is counted (release, gpu scope)
    last = tl.atomic_add(count_ptr, 1, sem="acq_rel") == SPLIT_K - 1
    if last:
        acc = tl.zeros(acc.shape, dtype=tl.float32)
        for s in range(SPLIT_K):
            acc += tl.load(p_ptrs + s * M * N, mask=mn_mask, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(count_ptr, 0)
    return acc, last


def _quant_groups(x, eps, UPCAST: tl.constexpr):
    """fp32 groups [R, G] -> (values [R, G] that a cast to e4m3 stores exactly, fp32 scales [R]): scale =
    max(amax, eps) / 448 and x / scale clamped to +-448, with IEEE divisions (div_rn) as torch divides, so the
    references agree bit for bit. Interpreted (UPCAST), rounded to the e4m3 grid here: the interpreter's fp32 -> fp8
    cast rounds half up and drops the carry into the exponent (the GPU's cvt.rn.satfinite rounds ties to even)."""
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), eps), 448.0)  # [R]
    y = tl.clamp(tl.math.div_rn(x, scale[:, None]), -448.0, 448.0)
    if UPCAST:
        mag = tl.abs(y)
        e = tl.maximum((mag.to(tl.int32, bitcast=True) >> 23) & 0xFF, 121)  # biased exponent; e4m3 normals >= 2^-6
        big = ((e + 20) << 23).to(tl.float32, bitcast=True)  # ulp(big) = e4m3 spacing at mag
        mag = (mag + big) - big
        y = tl.where(y < 0, -mag, mag)
    return y, scale


def _quant_row_operand(xr, eps, dtype, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr):
    """One row's group xr [G] quantized as per_token_group_quant_fp8 would (quant_groups), as a tl.dot operand
    [BLOCK_M, G] of that row and zero rows (in `dtype`, fp32 interpreted), and its scales [BLOCK_M] (zero below):
    GEMMs of one row that quantize their A themselves."""
    yq, ys = quant_groups(tl.reshape(xr.to(tl.float32), (1, xr.shape[0])), eps, UPCAST)  # [1, G], [1]
    first = tl.arange(0, BLOCK_M) == 0
    a = tl.where(first[:, None], yq, 0.0)  # [BLOCK_M, G]
    if not UPCAST:
        a = a.to(dtype)
    return a, tl.where(first, tl.sum(ys, axis=0), 0.0)


def _pdl_enter(PDL: tl.constexpr):
    """Programmatic dependent launch (Hopper on): where a kernel launched with `pdl_kwargs` first needs what the
    kernels before it wrote. Waits for the previous kernel to finish and its writes to show, then lets the next
    kernel's programs launch while this one runs (they run up to their own wait: reading weights, which no kernel
    writes, is all a kernel does before it). Every program calls it before it returns. No-op when PDL is off.
    PDL is a mode (`pdl_mode`): with PDL_LATE set the next kernel launches only as this one's programs exit."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        if (PDL & 2) == 0:
            tl.extra.cuda.gdc_launch_dependents()


def _prefetch_l2(ptrs):
    """An L2 prefetch of the 128-byte line holding each address (valid addresses only): the weights a program will
    read, fetched while the previous kernel finishes (before _pdl_enter)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0", "=r,l", [ptrs], dtype=tl.int32, is_pure=False,
                              pack=1)


def _prefetch_rows(rows, first, limit, stride, COUNT: tl.constexpr, LINE: tl.constexpr):
    """prefetch_l2 of COUNT elements from `first` along each row (rows: [R] pointers to each row's element 0, stride
    between elements), a line of LINE elements at a time, the offsets kept below limit: a program's weight rows."""
    for i in range(0, (COUNT + LINE - 1) // LINE):
        prefetch_l2(rows + tl.minimum(first + i * LINE, limit - 1) * stride)


round_to_out_grid = triton_kernel(_round_to_out_grid)
pdl_enter = triton_kernel(_pdl_enter)
prefetch_l2 = triton_kernel(_prefetch_l2)
prefetch_rows = triton_kernel(_prefetch_rows)
quant_groups = triton_kernel(_quant_groups)
split_k_sum = triton_kernel(_split_k_sum)
quant_row_operand = triton_kernel(_quant_row_operand)
grouped_pid = triton_kernel(_grouped_pid)


@functools.cache
def _cuda_device_info(index: int) -> tuple[str, tuple[int, int], int]:
    """(name, compute capability, multiprocessors); asked once per device, as every launcher call needs them."""
    props = torch.cuda.get_device_properties(index)
    return props.name, (props.major, props.minor), props.multi_processor_count


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def check_device(*tensors: torch.Tensor, min_capability: tuple[int, int] | None = (8, 9),
                 need: str = "FP8 tensor cores") -> torch.device:
    """All tensors on one device that can run the kernels here (a CUDA GPU of at least min_capability, or the CPU
    under the interpreter); returns it."""
    dev = tensors[0].device
    for t in tensors[1:]:
        if t.device != dev:
            raise ValueError(f"tensors on different devices: {dev} and {t.device}")
    if dev.type == "cpu" and not INTERPRETED:
        raise ValueError("CPU tensors run only in Triton's interpreter: set TRITON_INTERPRET=1 before triton is "
                         "first imported (or pass CUDA tensors)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"no Triton kernels for device {dev}")
    if dev.type == "cuda" and not INTERPRETED:
        name, capability, _ = _cuda_device_info(_cuda_index(dev))
        if min_capability is not None and capability < min_capability:
            raise ValueError(f"{need} need compute capability {min_capability[0]}.{min_capability[1]}+; {name} has "
                             f"{capability}")
    return dev


PDL_ENV = "QUANTKIT_PDL"  # "1": the decode path's kernels launch with programmatic dependent launch (Hopper on)


PDL_LATE = 2  # pdl_mode bits beside 1 (on): the next kernel launches as this one's programs exit, not at its wait
PDL_NO_PREFETCH = 4  # no L2 prefetch of weights before the wait


def pdl_mode(device: torch.device) -> int:
    """The kernels' PDL constexpr on device: 0 (off) unless compiled mode, a CUDA GPU of compute capability 9.0 or
    more and QUANTKIT_PDL set; QUANTKIT_PDL=1 is 1 (wait, then let the next kernel launch; weights prefetched before
    the wait), other values add PDL_LATE / PDL_NO_PREFETCH (3, 5, 7). Off by default until measured to pay."""
    raw = os.environ.get(PDL_ENV, "0")
    if raw not in ("0", "1", "3", "5", "7"):
        raise ValueError(f"{PDL_ENV} must be 0, 1, 3, 5 or 7, got {raw!r}")
    if (raw == "0" or INTERPRETED or device.type != "cuda"
            or _cuda_device_info(_cuda_index(device))[1] < (9, 0)):
        return 0
    return int(raw)


def pdl(device: torch.device) -> bool:
    """Whether kernels on device launch with programmatic dependent launch (pdl_mode non-zero)."""
    return pdl_mode(device) != 0


def pdl_kwargs(device: torch.device) -> dict:
    """A PDL-capable kernel's launch arguments: its PDL constexpr (the mode) and, when on, Triton's launch_pdl."""
    mode = pdl_mode(device)
    return {"PDL": mode, "launch_pdl": True} if mode else {"PDL": False}


def out_mantissa_bits(dtype: torch.dtype) -> int:
    """Mantissa bits a kernel rounds its output to itself before the cast (interpreter only; 0: the cast is right)."""
    if dtype not in ACT_DTYPES:
        raise ValueError(f"output dtype must be one of {ACT_DTYPES}, got {dtype}")
    # numpy's fp32 -> fp16 cast rounds to nearest even; the interpreter's fp32 -> bf16 cast truncates
    return 7 if (INTERPRETED and dtype == torch.bfloat16) else 0


# --------------------------------------------------------------------------------------------------------------------
# block configurations


@functools.cache
def load_config_table(name: str) -> dict:
    """configs/<name>.json, or {} when absent. Keys starting with '_' are comments."""
    path = os.path.join(CONFIG_DIR, name)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        table = json.load(f)
    return {k: v for k, v in table.items() if not k.startswith("_")}


def device_key(device: torch.device) -> str:
    """The name configurations are filed under: torch.cuda.get_device_name(), or 'interpreter'."""
    if INTERPRETED or device.type != "cuda":
        return "interpreter"
    return _cuda_device_info(_cuda_index(device))[0]


def select_config(table: dict, device: str, shape: str, m: int, default: dict) -> dict:
    """The tuned config for (device, shape) at the M bucket nearest to m, over `default`; `default` when none."""
    buckets = table.get(device, {}).get(shape)
    if not buckets:
        return dict(default)
    bucket = min(buckets, key=lambda b: (abs(int(b) - m), int(b)))
    cfg = {**default, **{k: v for k, v in buckets[bucket].items() if k in CONFIG_KEYS}}
    return cfg


def _gemm_default_config(device: torch.device, m: int, n: int) -> dict:
    if INTERPRETED:
        # the interpreter pays per program instance and per operation, not per element: few, large tiles
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, SPLIT_K=2 if m <= 16 else 1, num_warps=4,
                    num_stages=1)
    # H100/H200. BLOCK_K = 128 matches the scale block, so each tl.dot gets one scale pair. Up to M = 512 the
    # weights' bandwidth bounds the time, so the tile is narrowed until every multiprocessor has a program (a sweep of
    # MiniMax-M2's qkv (8192 x 3072) and o_proj (3072 x 6144) shapes on an H200 put this within ~10 % of the best
    # of 18 configs at M = 1..512); above, 128 x 128 tiles run at 600+ TFLOP/s.
    if m > 512:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
    block_m = 16 if m <= 16 else 32 if m <= 64 else 64
    num_sms = _cuda_device_info(_cuda_index(device))[2]
    block_n = next((bn for bn in (128, 64) if triton.cdiv(m, block_m) * triton.cdiv(n, bn) >= num_sms), 32)
    # up to 16 rows, K split until about two programs per multiprocessor: MiniMax-M2's o_proj (3072 x 6144) has 96
    # column tiles of 32 for 132 multiprocessors, each reading all 6144 columns of K otherwise
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split = max(1, min(8, 2 * num_sms // tiles)) if m <= 16 else 1
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=128, GROUP_M=8, SPLIT_K=split, num_warps=4, num_stages=4)


BUCKET_REACH = 4  # a tuned M bucket speaks for M within this factor of it; farther, the defaults apply


def _gemm_config(device: torch.device, n: int, k: int, m: int, scheme: str, block_k: int) -> dict:
    table = load_config_table("fp8_gemm.json")
    shape = f"N={n},K={k},{scheme}"
    buckets = table.get(device_key(device), {}).get(shape, {})
    if buckets and not any(int(b) / BUCKET_REACH <= m <= int(b) * BUCKET_REACH for b in buckets):
        table = {}  # e.g. a shape tuned for decode (buckets 1 to 16) at M = 128: 16-row split-K tiles would not do
    cfg = select_config(table, device_key(device), shape, m, _gemm_default_config(device, m, n))
    if scheme == "block":
        # one scale per 128 columns of K: a K tile may not straddle two scale blocks
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], block_k)
        if block_k % cfg["BLOCK_K"]:
            raise ValueError(f"BLOCK_K={cfg['BLOCK_K']} does not divide the scale block {block_k}")
    return cfg


# --------------------------------------------------------------------------------------------------------------------
# activation quantization


def _per_token_group_quant_kernel(
    x_ptr, q_ptr, s_ptr,  # [M, K] in, [M, K] fp8 out, [M, K/GROUP] fp32 out (ROW_DIV: M output rows of x's M_X)
    idx_ptr,  # ROW_DIV: int32 [M], output row r quantizes x row idx[r] // ROW_DIV, clamped to [0, M_X)
    limit_ptr,  # LIMIT: int32 [1], output rows from this one on are left as they are
    M, M_X, stride_xm, stride_qm, stride_sm,
    eps,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr,
    ROW_DIV: tl.constexpr = 0, LIMIT: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    cols = g * GROUP + tl.arange(0, GROUP)  # [GROUP]
    rmask = rows < M
    if LIMIT:
        rmask = rmask & (rows < tl.load(limit_ptr))
    rows64 = rows.to(tl.int64)
    src = rows64
    if ROW_DIV:
        src = tl.load(idx_ptr + rows64, mask=rmask, other=0).to(tl.int64) // ROW_DIV
        src = tl.minimum(tl.maximum(src, 0), M_X - 1)
    x = tl.load(x_ptr + src[:, None] * stride_xm + cols[None, :], mask=rmask[:, None], other=0.0)
    y, scale = quant_groups(x.to(tl.float32), eps, UPCAST)  # [BLOCK_M, GROUP], [BLOCK_M]
    tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], y.to(q_ptr.dtype.element_ty), mask=rmask[:, None])
    tl.store(s_ptr + rows64 * stride_sm + g, scale, mask=rmask)


def _per_token_quant_kernel(
    x_ptr, q_ptr, s_ptr,  # [M, K] in, [M, K] fp8 out, [M, 1] fp32 out
    M, stride_xm, stride_qm, stride_sm,
    eps,
    K: tl.constexpr,  # constexpr: a loop bound (see _w8a8_fp8_matmul_kernel)
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # pass 1: the row's amax
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = rmask[:, None] & (cols[None, :] < K)
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    scale = tl.math.div_rn(tl.maximum(amax, eps), 448.0)  # [BLOCK_M]
    for k0 in range(0, K, BLOCK_K):  # pass 2: quantize
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = rmask[:, None] & (cols[None, :] < K)
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.clamp(tl.math.div_rn(x, scale[:, None]), -448.0, 448.0)
        if UPCAST:  # see _per_token_group_quant_kernel
            mag = tl.abs(y)
            e = tl.maximum((mag.to(tl.int32, bitcast=True) >> 23) & 0xFF, 121)
            big = ((e + 20) << 23).to(tl.float32, bitcast=True)
            mag = (mag + big) - big
            y = tl.where(y < 0, -mag, mag)
        tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], y.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rows64 * stride_sm, scale, mask=rmask)


_per_token_group_quant = triton_kernel(_per_token_group_quant_kernel)
_per_token_quant = triton_kernel(_per_token_quant_kernel)


def _check_activation(x: torch.Tensor, name: str = "x") -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"{name} must be one of {ACT_DTYPES}, got {x.dtype}")
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"{name} must be contiguous along K (stride {x.stride()})")


def _group_quant(x: torch.Tensor, group_size: int, rows: int, alloc, index: torch.Tensor | None = None,
                 limit: torch.Tensor | None = None, row_div: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The launch behind per_token_group_quant_fp8 and its indexed / limited form, for checked arguments: `rows`
    output rows (x's own, or x[index // row_div] with row_div > 0), those from limit[0] on left unwritten."""
    k = x.shape[1]
    if group_size < 16 or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two >= 16, got {group_size}")
    if k % group_size:
        raise ValueError(f"K={k} must be a multiple of group_size={group_size}")
    device = check_device(x, *(t for t in (index, limit) if t is not None))
    xq = alloc((rows, k), dtype=FP8_DTYPE, device=device)  # [rows, K]
    xs = alloc((rows, k // group_size), dtype=torch.float32, device=device)  # [rows, K/G]
    if rows == 0 or k == 0:
        return xq, xs
    block_m = 64 if INTERPRETED else 16
    _per_token_group_quant[(triton.cdiv(rows, block_m), k // group_size)](
        x, xq, xs, x if index is None else index, x if limit is None else limit, rows, x.shape[0], x.stride(0),
        xq.stride(0), xs.stride(0), SCALE_EPS, GROUP=group_size, BLOCK_M=block_m, UPCAST=INTERPRETED,
        ROW_DIV=row_div if index is not None else 0, LIMIT=limit is not None, num_warps=4)
    return xq, xs


def per_token_group_quant_fp8(x: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations to FP8 with one scale per token per `group_size` columns.

    x [M, K] bf16/fp16/fp32 -> (xq float8_e4m3fn [M, K], xs fp32 [M, K // group_size]), with
    xs = max(amax, 1e-10) / 448 and xq = clamp(x / xs, -448, 448) rounded to nearest even; x ~= xq * xs.
    """
    _check_activation(x)
    return _group_quant(x, group_size, x.shape[0], torch.empty)


def per_token_group_quant_fp8_rows(x: torch.Tensor, group_size: int, limit: torch.Tensor,
                                   index: torch.Tensor | None = None,
                                   row_div: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """per_token_group_quant_fp8 of the rows x[clamp(index[r] // row_div, 0, M_x - 1)] (index None: x's own rows),
    for output rows r < limit[0] (an int32 on the device: no host sync); the rows past it are left unwritten
    (zeros under the interpreter). Each row written holds the bits per_token_group_quant_fp8 gives that row. The
    MoE's TMA path quantizes x in its padded list's order with it (index: the sorted pairs, row_div: topk)."""
    _check_activation(x)
    if index is not None and (row_div < 1 or index.dtype != torch.int32):
        raise ValueError(f"index must be int32 and row_div >= 1, got {index.dtype} and {row_div}")
    rows = x.shape[0] if index is None else index.numel()
    return _group_quant(x, group_size, rows, torch.zeros if INTERPRETED else torch.empty, index, limit, row_div)


def per_token_quant_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations to FP8 with one scale per token (the per-channel weight scheme's activations).

    x [M, K] -> (xq float8_e4m3fn [M, K], xs fp32 [M, 1]), xs = max(row amax, 1e-10) / 448.
    """
    _check_activation(x)
    m, k = x.shape
    device = check_device(x)
    xq = torch.empty((m, k), dtype=FP8_DTYPE, device=device)  # [M, K]
    xs = torch.empty((m, 1), dtype=torch.float32, device=device)  # [M, 1]
    if m == 0:
        return xq, xs
    if INTERPRETED:
        block_m, block_k = 64, min(triton.next_power_of_2(max(k, 16)), 4096)
    else:
        block_m, block_k = 4, min(triton.next_power_of_2(max(k, 16)), 1024)
    _per_token_quant[(triton.cdiv(m, block_m),)](x, xq, xs, m, x.stride(0), xq.stride(0), xs.stride(0), SCALE_EPS,
                                                 K=k, BLOCK_M=block_m, BLOCK_K=block_k, UPCAST=INTERPRETED, num_warps=4)
    return xq, xs


def per_token_group_quant_fp8_ref(x: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of per_token_group_quant_fp8 (same result bit for bit)."""
    m, k = x.shape
    xg = x.float().view(m, k // group_size, group_size)  # [M, G, group]
    amax = xg.abs().amax(dim=-1).clamp(min=SCALE_EPS)  # [M, G]
    # a tensor divisor: PyTorch's CUDA division by a Python scalar multiplies by its reciprocal, not IEEE division
    xs = amax / torch.full_like(amax, FP8_MAX)
    xq = (xg / xs[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(m, k)  # [M, K]
    return xq, xs


def per_token_quant_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of per_token_quant_fp8 (same result bit for bit)."""
    xf = x.float()  # [M, K]
    amax = xf.abs().amax(dim=1, keepdim=True).clamp(min=SCALE_EPS)  # [M, 1]
    xs = amax / torch.full_like(amax, FP8_MAX)  # a tensor divisor, as in per_token_group_quant_fp8_ref
    return (xf / xs).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), xs


# --------------------------------------------------------------------------------------------------------------------
# GEMMs


def _w8a8_fp8_matmul_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr,  # A [M, K] fp8, A scales, B [N, K] fp8, B scales, C [M, N]
    part_ptr, count_ptr,  # SPLIT_K > 1: fp32 [SPLIT_K, M, N] partial sums, int32 [tiles] counters (zero between)
    M, N,
    K: tl.constexpr,  # a loop bound: triton 3.6's interpreter can't take a runtime int in range() under numpy >= 2.5
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
    stride_asm, stride_ask, stride_bsn, stride_bsk,
    BLOCK_SCALED: tl.constexpr,  # True: scales per (row, K block) x (N block, K block); False: per row x per column
    GROUP_N: tl.constexpr, GROUP_K: tl.constexpr,  # the weight's scale block
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask along K
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, OUT_MANT: tl.constexpr,
    SPLIT_K: tl.constexpr = 1,  # programs per output tile, each over cdiv(K, BLOCK_K) / SPLIT_K K blocks
    QUANT_A: tl.constexpr = False,  # M = 1, block scales: A is the 16-bit row, each K block quantized here as
    # per_token_group_quant_fp8 would (bit for bit; as_ptr unused), the separate launch saved
    Q_EPS: tl.constexpr = 0.0,  # QUANT_A: SCALE_EPS
    B_SCALE_TILE: tl.constexpr = False,  # block scales, BLOCK_N dividing GROUP_N: the column tile lies in one scale
    # block, whose one scale a K block is folded into the rows' (one FMA an element where a vector took two ops)
    PDL: tl.constexpr = False,  # programmatic dependent launch: the program's weights toward L2 first (pdl_enter)
):
    # GROUP_M row tiles share each column sweep, so the B tiles they read stay in L2
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)  # this program's share of K
    KB_PER: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K // SPLIT_K  # the launcher makes SPLIT_K divide the blocks
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_m64 = offs_m.to(tl.int64)
    offs_n64 = offs_n.to(tl.int64)
    k_first = pid_s * KB_PER * BLOCK_K
    a_ptrs = a_ptr + offs_m64[:, None] * stride_am + (k_first + offs_k)[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + offs_n64[None, :] * stride_bn + (k_first + offs_k)[:, None] * stride_bk  # [BLOCK_K, BLOCK_N]
    as_ptrs = as_ptr + offs_m64 * stride_asm  # [BLOCK_M]
    if B_SCALE_TILE:
        tl.static_assert(BLOCK_SCALED and GROUP_N % BLOCK_N == 0)
        bs_ptrs = bs_ptr + (pid_n * BLOCK_N // GROUP_N) * stride_bsn  # the tile's one scale
    elif BLOCK_SCALED:
        bs_ptrs = bs_ptr + (offs_n // GROUP_N) * stride_bsn  # [BLOCK_N]
    else:
        bs_ptrs = bs_ptr + offs_n64 * stride_bsn  # [BLOCK_N]
    if PDL and (PDL & 4) == 0:  # this program's share of the weight rows (one byte a code), a line a row and 128
        # codes along K; the first row block's programs only (the others read the same rows)
        if pid_m == 0:
            prefetch_rows(b_ptr + tl.minimum(offs_n64, N - 1) * stride_bn, k_first, K, stride_bk, KB_PER * BLOCK_K,
                          128)
    pdl_enter(PDL)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if QUANT_A:  # the row, a group ahead: its load in flight while the previous group is computed
        row_ptr = a_ptr + (k_first + offs_k) * stride_ak  # [BLOCK_K]
        xr_next = tl.load(row_ptr)
    for i in range(0, KB_PER):
        kb = pid_s * KB_PER + i
        if QUANT_A:  # the only row, one group: quantized once, placed in the tile's first row
            tl.static_assert(BLOCK_SCALED and BLOCK_K == GROUP_K and EVEN_K)
            xr = xr_next  # [BLOCK_K]
            ahead = (i + 1) * BLOCK_K + offs_k < KB_PER * BLOCK_K  # this program's share of K only
            xr_next = tl.load(row_ptr + (i + 1) * BLOCK_K * stride_ak, mask=ahead, other=0.0)
            a, a_s_row = quant_row_operand(xr, Q_EPS, b_ptr.dtype.element_ty, BLOCK_M, UPCAST)
            b = tl.load(b_ptrs, mask=n_mask[None, :], other=0.0)
        elif EVEN_K:
            a = tl.load(a_ptrs, mask=m_mask[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=n_mask[None, :], other=0.0)
        else:
            k_left = K - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=m_mask[:, None] & (offs_k[None, :] < k_left), other=0.0)
            b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & n_mask[None, :], other=0.0)
        if UPCAST:  # the interpreter multiplies fp8 wrongly; on the GPU fp8 goes to the tensor cores as is
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if BLOCK_SCALED:
            k_group = (kb * BLOCK_K) // GROUP_K
            if QUANT_A:
                a_s = a_s_row
            else:
                a_s = tl.load(as_ptrs + k_group * stride_ask, mask=m_mask, other=0.0)  # [BLOCK_M]
            # scales applied per K block, in fp32: the FP8 dot only ever sums BLOCK_K products
            if B_SCALE_TILE:
                acc += tl.dot(a, b) * (a_s * tl.load(bs_ptrs + k_group * stride_bsk))[:, None]
            else:
                b_s = tl.load(bs_ptrs + k_group * stride_bsk, mask=n_mask, other=0.0)  # [BLOCK_N]
                acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        else:
            acc += tl.dot(a, b)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if not BLOCK_SCALED:
        a_s = tl.load(as_ptrs, mask=m_mask, other=0.0)
        b_s = tl.load(bs_ptrs, mask=n_mask, other=0.0)
        acc = acc * a_s[:, None] * b_s[None, :]
    mn_mask = m_mask[:, None] & n_mask[None, :]
    last = True
    if SPLIT_K > 1:
        acc, last = split_k_sum(acc, part_ptr, count_ptr + pid, pid_s, offs_m64, offs_n64, mn_mask, M, N, SPLIT_K)
    if last:
        if OUT_MANT:  # the interpreter's fp32 -> bf16 cast truncates: round to nearest even first
            acc = round_to_out_grid(acc, OUT_MANT)
        c_ptrs = c_ptr + offs_m64[:, None] * stride_cm + offs_n64[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mn_mask)


_w8a8_fp8_matmul = triton_kernel(_w8a8_fp8_matmul_kernel)


def _w8a8_fp8_gemv_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr,  # A [M, K] fp8 (QUANT_A: 16-bit), its group scales, B [N, K] fp8, block scales
    part_ptr, count_ptr,  # SPLIT_K > 1: fp32 [SPLIT_K, M, N] partial sums, int32 [tiles] counters (zero between)
    M, N,
    K: tl.constexpr,
    stride_am, stride_bn, stride_cm, stride_asm, stride_bsn,
    GROUP_N: tl.constexpr, GROUP_K: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
    OUT_MANT: tl.constexpr, SPLIT_K: tl.constexpr = 1, STAGES: tl.constexpr = 1,
    QUANT_A: tl.constexpr = False, Q_EPS: tl.constexpr = 0.0,
):
    """Block-FP8 y = x W^T for a few rows on the CUDA cores (PATH "gemv"): program (column tile, row of A; share
    of K) reads its BLOCK_N weight rows GROUP_K bytes a row a step (one scale block along K, in one load each),
    converts them to fp32 and multiplies each by the row's activation times the step's two scales, keeping the
    products' running sums per column of the step ([BLOCK_N, GROUP_K] in registers, no reduction in the loop); one
    reduction at the end. The tile lies in one scale block (GROUP_N % BLOCK_N == 0): a scale a step. K split over
    SPLIT_K programs as the tiled kernel's (split_k_sum). QUANT_A: one 16-bit row quantized here per group as
    per_token_group_quant_fp8 would (quant_groups)."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_n = pid % num_pid_n
    row = (pid // num_pid_n).to(tl.int64)  # the row of A (and C)
    KB_PER: tl.constexpr = K // GROUP_K // SPLIT_K
    tl.static_assert(GROUP_N % BLOCK_N == 0, "the column tile lies in one scale block")
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, GROUP_K)
    kb0 = pid_s * KB_PER
    w_ptrs = b_ptr + offs_n.to(tl.int64)[:, None] * stride_bn + (kb0 * GROUP_K + offs_k)[None, :]  # [BLOCK_N, GK]
    x_ptrs = a_ptr + row * stride_am + kb0 * GROUP_K + offs_k[None, :]  # [1, GROUP_K]: the weights' column layout
    bs_ptrs = bs_ptr + (pid_n * BLOCK_N // GROUP_N) * stride_bsn + kb0  # the tile's scale block, its first K block
    as_ptrs = as_ptr + row * stride_asm + kb0
    acc = tl.zeros((BLOCK_N, GROUP_K), dtype=tl.float32)
    for i in tl.range(0, KB_PER, num_stages=STAGES):
        w = tl.load(w_ptrs + i * GROUP_K, mask=n_mask[:, None], other=0.0).to(tl.float32)  # [BLOCK_N, GROUP_K]
        xr = tl.load(x_ptrs + i * GROUP_K).to(tl.float32)  # [1, GROUP_K]
        if QUANT_A:
            yq, ys = quant_groups(xr, Q_EPS, UPCAST)  # [1, GK], [1]
            if not UPCAST:  # the e4m3 rounding of the cast (interpreted: quant_groups rounded already)
                yq = yq.to(b_ptr.dtype.element_ty).to(tl.float32)
            xr = yq
            x_s = tl.sum(ys, axis=0)
        else:
            x_s = tl.load(as_ptrs + i)
        acc += w * (xr * (x_s * tl.load(bs_ptrs + i)))
    y = tl.reshape(tl.sum(acc, axis=1), (1, BLOCK_N))  # [1, BLOCK_N]
    rows = row + tl.arange(0, 1).to(tl.int64)  # [1]
    offs_n64 = offs_n.to(tl.int64)
    mn_mask = n_mask[None, :]  # [1, BLOCK_N] (the grid holds rows of A only)
    last = True
    if SPLIT_K > 1:
        y, last = split_k_sum(y, part_ptr, count_ptr + pid, pid_s, rows, offs_n64, mn_mask, M, N, SPLIT_K)
    if last:
        if OUT_MANT:
            y = round_to_out_grid(y, OUT_MANT)
        tl.store(c_ptr + rows[:, None] * stride_cm + offs_n64[None, :], y.to(c_ptr.dtype.element_ty), mask=mn_mask)


_w8a8_fp8_gemv = triton_kernel(_w8a8_fp8_gemv_kernel)


def _w8a8_ws_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr,  # A [M, K] fp8, its scales [M, K/GROUP_K], B [N, K] fp8, its block scales
    M, N,
    stride_am, stride_asm, stride_bn, stride_bsn, stride_cm,
    K: tl.constexpr, GROUP_N: tl.constexpr, GROUP_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, OUT_MANT: tl.constexpr,
    WS: tl.constexpr,  # the K loop warp-specialized (Hopper: a producer warp group issuing the TMA loads, consumers)
):
    """The block-scaled GEMM with its A and B tiles loaded through TMA descriptors (rows and columns past M and N
    read as zeros), so that Triton can warp-specialize the K loop; a column tile inside one scale block (one weight
    scale a tile and K block), BLOCK_K = GROUP_K. The same products and scaled sums as _w8a8_fp8_matmul_kernel's
    B_SCALE_TILE path, K block by K block."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M)
    tl.static_assert(GROUP_N % BLOCK_N == 0 and BLOCK_K == GROUP_K and K % BLOCK_K == 0)
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_bn, 1], block_shape=[BLOCK_N, BLOCK_K])
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    m_mask = offs_m < M
    offs_m64 = offs_m.to(tl.int64)
    as_ptrs = as_ptr + offs_m64 * stride_asm  # [BLOCK_M]
    bs_ptrs = bs_ptr + (pid_n * BLOCK_N // GROUP_N) * stride_bsn  # the tile's one scale a K block
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in tl.range(0, K // BLOCK_K, warp_specialize=WS):
        a = a_desc.load([pid_m * BLOCK_M, kb * BLOCK_K])  # [BLOCK_M, BLOCK_K]
        b = b_desc.load([pid_n * BLOCK_N, kb * BLOCK_K])  # [BLOCK_N, BLOCK_K]
        if UPCAST:  # the interpreter multiplies fp8 wrongly; on the GPU fp8 goes to the tensor cores as is
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        a_s = tl.load(as_ptrs + kb, mask=m_mask, other=0.0)  # [BLOCK_M]
        acc += tl.dot(a, tl.trans(b)) * (a_s * tl.load(bs_ptrs + kb))[:, None]
    if OUT_MANT:  # the interpreter's fp32 -> bf16 cast truncates: round to nearest even first
        acc = round_to_out_grid(acc, OUT_MANT)
    c_ptrs = c_ptr + offs_m64[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & (offs_n < N)[None, :])


_w8a8_ws = triton_kernel(_w8a8_ws_kernel)


@functools.cache
def tma_scratch(device: torch.device):
    """triton.set_allocator's function (one a device): the global scratch a launch writes its in-kernel TMA
    descriptors to."""
    return lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device)


def ws_split(block_m: int, dots: int) -> bool:
    """Whether a TMA GEMM's K loop is handed to the compiler's warp specialization, or runs on its descriptors
    as a plain pipelined loop. Measured on an H100 with triton 3.6 against the same kernel unsplit: a loop of one
    dot with 64-row blocks gives the same results; with 128-row blocks the second consumer group's rows come out
    wrong, and a loop of two dots (the MoE's gate and up) is wrong at 64 rows too."""
    return not INTERPRETED and block_m == 64 and dots == 1


def ws_applies(cfg: dict, group_n: int, group_k: int, *tensors: torch.Tensor) -> bool:
    """Whether a config asking for the TMA GEMM ("WS") can have it: K blocks of one scale group, column tiles inside
    a scale block, each operand contiguous along K with rows of whole 16-byte units (TMA's alignment)."""
    return (bool(cfg.get("WS")) and cfg["BLOCK_K"] == group_k and group_n % cfg["BLOCK_N"] == 0
            and all(t.stride(-1) == 1 and t.stride(-2) % 16 == 0 and t.data_ptr() % 16 == 0 for t in tensors))


def _check_fp8_operands(xq: torch.Tensor, w: torch.Tensor) -> tuple[int, int, int]:
    if xq.dim() != 2 or w.dim() != 2:
        raise ValueError(f"xq must be [M, K] and w [N, K], got {tuple(xq.shape)} and {tuple(w.shape)}")
    if xq.dtype != FP8_DTYPE or w.dtype != FP8_DTYPE:
        raise ValueError(f"xq and w must be {FP8_DTYPE}, got {xq.dtype} and {w.dtype}")
    m, k = xq.shape
    n, kw = w.shape
    if kw != k:
        raise ValueError(f"xq has K={k} but w has K={kw}")
    if k > 1 and (xq.stride(1) != 1 or w.stride(1) != 1):
        raise ValueError(f"xq and w must be contiguous along K (strides {xq.stride()} and {w.stride()})")
    return m, n, k


def _check_scale(s: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
    if s.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {s.dtype}")
    if tuple(s.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(s.shape)}, expected {shape}")


_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}


def arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """int32 zeros, at least n, kept per device and CUDA stream: the split-K kernels that count arrivals in them
    leave them zero. Kernels of one stream run one after another, so they can share them; two streams at once must
    not (each gets its own), or one kernel's arrivals would count for another's tiles."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    have = _COUNTERS.get((device, stream))
    if have is None or have.numel() < n:
        have = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device, stream] = have
    return have


def _split_k_grid(cfg: dict, m: int, n: int, k: int,
                  device: torch.device) -> tuple[tuple[int, int], torch.Tensor, torch.Tensor]:
    """(grid, fp32 partials [SPLIT_K, M, N], arrival counters) for a config; SPLIT_K falls back to the largest
    divisor of the K blocks not above the asked one."""
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    split = split_divisor(cfg.get("SPLIT_K", 1), triton.cdiv(k, cfg["BLOCK_K"]))
    return (tiles, split), *split_k_workspace(split, m, n, tiles, device)


def split_divisor(split: int, blocks: int) -> int:
    """The largest divisor of `blocks` (a GEMM's K steps) not above `split` (at least 1)."""
    return max(s for s in range(1, max(1, min(split, blocks)) + 1) if blocks % s == 0)


def split_k_workspace(split: int, m: int, n: int, tiles: int, device: torch.device
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 partials [split, M, N], arrival counters for `tiles` tiles) of a split-K launch (split_k_sum); at
    split 1 a placeholder for both, which the kernel does not touch."""
    if split == 1:
        part = torch.empty((1,), dtype=torch.float32, device=device)
        return part, part
    return torch.empty((split, m, n), dtype=torch.float32, device=device), arrival_counters(device, tiles)


def w8a8_block_fp8_matmul(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
                          block_size: tuple[int, int] = (128, 128),
                          out_dtype: torch.dtype = torch.bfloat16, config: dict | None = None) -> torch.Tensor:
    """out[m, n] = sum over K blocks kb of (xq[m, kb] . w[n, kb]) * xs[m, kb] * ws[n // bn, kb], fp32 accumulation.

    xq fp8 [M, K], xs fp32 [M, K/bk], w fp8 [N, K], ws fp32 [ceil(N/bn), K/bk] -> [M, N] out_dtype.
    K must be a multiple of bk (the activations' group size); M and N are arbitrary. config overrides the block
    configuration's keys. With SPLIT_K > 1 (decode sizes), SPLIT_K programs share each output tile's K blocks and
    the last to finish adds their fp32 partial sums in split order: deterministic, one launch, capturable.
    """
    bn, bk = block_size
    m, n, k = _check_fp8_operands(xq, w)
    if k % bk:
        raise ValueError(f"K={k} must be a multiple of the block size {bk} (activation groups match weight blocks)")
    if bk < 16 or bk & (bk - 1):
        raise ValueError(f"block size along K must be a power of two >= 16, got {bk}")
    _check_scale(xs, (m, k // bk), "xs")
    _check_scale(ws, (triton.cdiv(n, bn), k // bk), "ws")
    device = check_device(xq, xs, w, ws)
    cfg = {**_gemm_config(device, n, k, m, "block", bk), **(config or {})}
    return _block_matmul(xq, xs, w, ws, bn, bk, out_dtype, cfg, device)


def _block_matmul(a: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, bn: int, bk: int,
                  out_dtype: torch.dtype, cfg: dict, device: torch.device, quant_a: bool = False) -> torch.Tensor:
    """The block-scaled launch for checked operands and a block config; quant_a: a is one 16-bit row the kernel
    quantizes itself."""
    xq = a
    m, n, k = a.shape[0], w.shape[0], a.shape[1]
    out_mant = out_mantissa_bits(out_dtype)
    out = torch.empty((m, n), dtype=out_dtype, device=device)  # [M, N]
    if m == 0 or n == 0:
        return out
    if bk % cfg["BLOCK_K"]:
        raise ValueError(f"BLOCK_K={cfg['BLOCK_K']} does not divide the scale block {bk}")
    if quant_a and (m != 1 or cfg["BLOCK_K"] != bk):
        raise ValueError(f"quantizing in the GEMM takes one row and BLOCK_K = {bk}, got {m} rows and {cfg}")
    if cfg.get("PATH") == "gemv":  # the CUDA cores, a row of A a program (operands contiguous along K: checked)
        if bn % cfg["BLOCK_N"] == 0 and ws.stride(1) == 1 and (quant_a or xs.stride(1) == 1):
            grid, part, counters = _split_k_grid({**cfg, "BLOCK_M": 1, "BLOCK_K": bk}, m, n, k, device)
            _w8a8_fp8_gemv[grid](
                xq, xs, w, ws, out, part, counters, m, n, k, xq.stride(0), w.stride(0), out.stride(0), xs.stride(0),
                ws.stride(0), GROUP_N=bn, GROUP_K=bk, BLOCK_N=cfg["BLOCK_N"], UPCAST=INTERPRETED, OUT_MANT=out_mant,
                SPLIT_K=grid[1], STAGES=cfg.get("num_stages", 1), num_warps=cfg["num_warps"],
                num_stages=cfg.get("num_stages", 1), **(dict(QUANT_A=True, Q_EPS=SCALE_EPS) if quant_a else {}))
            return out
        cfg = {**_gemm_default_config(device, m, n), "BLOCK_K": cfg["BLOCK_K"]}  # a GEMV entry it cannot take
    if cfg.get("WS") == "gluon" and not quant_a:  # the Gluon loop, where it applies; else the Triton kernels
        from . import fp8_gluon  # (it imports this module)
        if ws_applies(cfg, bn, bk, xq, w) and fp8_gluon.applies(cfg, k, device):
            return fp8_gluon.w8a8_block_fp8_matmul_gluon(
                xq, xs, w, ws, (bn, bk), out_dtype, {key: cfg[key] for key in ("BLOCK_M", "BLOCK_N", "GROUP_M",
                                                                                "num_warps", "UNROLL") if key in cfg}
                | {"STAGES": cfg["num_stages"]})
        cfg = {key: v for key, v in cfg.items() if key != "WS"}
    if not quant_a and ws_applies(cfg, bn, bk, xq, w):  # the TMA GEMM
        triton.set_allocator(tma_scratch(device))
        _w8a8_ws[(triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)](
            xq, xs, w, ws, out, m, n, xq.stride(0), xs.stride(0), w.stride(0), ws.stride(0), out.stride(0),
            K=k, GROUP_N=bn, GROUP_K=bk, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            GROUP_M=cfg["GROUP_M"], UPCAST=INTERPRETED, OUT_MANT=out_mant, WS=ws_split(cfg["BLOCK_M"], 1),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        return out
    grid, part, counters = _split_k_grid(cfg, m, n, k, device)
    _w8a8_fp8_matmul[grid](
        xq, xs, w, ws, out, part, counters, m, n, k,
        xq.stride(0), xq.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
        xs.stride(0), xs.stride(1), ws.stride(0), ws.stride(1),
        BLOCK_SCALED=True, GROUP_N=bn, GROUP_K=bk, EVEN_K=True,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        UPCAST=INTERPRETED, OUT_MANT=out_mant, SPLIT_K=grid[1], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], B_SCALE_TILE=tile_scales(bn, cfg["BLOCK_N"]), **pdl_kwargs(device),
        **(dict(QUANT_A=True, Q_EPS=SCALE_EPS) if quant_a else {}),
    )
    return out


def w8a8_channel_fp8_matmul(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
                            out_dtype: torch.dtype = torch.bfloat16, config: dict | None = None) -> torch.Tensor:
    """out[m, n] = (xq[m] . w[n]) * xs[m] * ws[n]: per-token x per-channel scales applied after fp32 accumulation.

    xq fp8 [M, K], xs fp32 [M, 1], w fp8 [N, K], ws fp32 [N, 1] -> [M, N] out_dtype. Any M, N, K. config and
    SPLIT_K: as w8a8_block_fp8_matmul (each split's partial sum is scaled before the sum).
    """
    m, n, k = _check_fp8_operands(xq, w)
    _check_scale(xs, (m, 1), "xs")
    _check_scale(ws, (n, 1), "ws")
    device = check_device(xq, xs, w, ws)
    out_mant = out_mantissa_bits(out_dtype)
    out = torch.empty((m, n), dtype=out_dtype, device=device)  # [M, N]
    if m == 0 or n == 0:
        return out
    cfg = {**_gemm_config(device, n, k, m, "channel", 128), **(config or {})}
    grid, part, counters = _split_k_grid(cfg, m, n, k, device)
    _w8a8_fp8_matmul[grid](
        xq, xs, w, ws, out, part, counters, m, n, k,
        xq.stride(0), xq.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
        xs.stride(0), 0, ws.stride(0), 0,
        BLOCK_SCALED=False, GROUP_N=1, GROUP_K=1, EVEN_K=k % cfg["BLOCK_K"] == 0,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        UPCAST=INTERPRETED, OUT_MANT=out_mant, SPLIT_K=grid[1], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **pdl_kwargs(device),
    )
    return out


def w8a8_block_fp8_matmul_ref(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
                              block_size: tuple[int, int] = (128, 128),
                              out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Reference of w8a8_block_fp8_matmul: the same sum, one K block at a time, in fp32."""
    bn, bk = block_size
    m, k = xq.shape
    n = w.shape[0]
    acc = torch.zeros((m, n), dtype=torch.float32, device=xq.device)  # [M, N]
    for kb in range(k // bk):
        a = xq[:, kb * bk:(kb + 1) * bk].float()  # [M, bk]
        b = w[:, kb * bk:(kb + 1) * bk].float()  # [N, bk]
        b_s = ws[:, kb].repeat_interleave(bn)[:n]  # [N]
        acc += (a @ b.T) * xs[:, kb:kb + 1] * b_s[None, :]
    return acc.to(out_dtype)


def w8a8_channel_fp8_matmul_ref(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
                                out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Reference of w8a8_channel_fp8_matmul."""
    acc = xq.float() @ w.float().T  # [M, N]
    return (acc * xs * ws.T).to(out_dtype)


# --------------------------------------------------------------------------------------------------------------------
# linear layers: quantize activations, then GEMM


def fp8_block_linear(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
                     block_size: tuple[int, int] = (128, 128), config: dict | None = None) -> torch.Tensor:
    """y = x @ dequant(w, ws)^T with x quantized per token per block_size[1] group. x [..., K] -> [..., N] x.dtype.
    config overrides the block configuration's keys, as in w8a8_block_fp8_matmul."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    bn, bk = block_size
    if x2.shape[0] == 1 and QUANT_IN_GEMM and x2.shape[1] == w.shape[1] and x2.shape[1] % bk == 0:
        cfg = {**_gemm_config(check_device(x2, w, ws), w.shape[0], x2.shape[1], 1, "block", bk), **(config or {})}
        if cfg["BLOCK_K"] == bk and w.dtype == FP8_DTYPE and x2.stride(1) == 1 and w.stride(1) == 1:
            # one token (decode): the GEMM quantizes x itself
            _check_scale(ws, (triton.cdiv(w.shape[0], bn), x2.shape[1] // bk), "ws")
            y = _block_matmul(x2, ws, w, ws, bn, bk, x.dtype, cfg, x2.device, quant_a=True)
            return y.view(*lead, w.shape[0])
    xq, xs = per_token_group_quant_fp8(x2, block_size[1])
    y = w8a8_block_fp8_matmul(xq, xs, w, ws, block_size, out_dtype=x.dtype, config=config)  # [M, N]
    return y.view(*lead, w.shape[0])


def fp8_channel_linear(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """y = x @ (w * ws)^T with x quantized per token. x [..., K], w fp8 [N, K], ws fp32 [N, 1] -> [..., N] x.dtype."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    xq, xs = per_token_quant_fp8(x2)
    y = w8a8_channel_fp8_matmul(xq, xs, w, ws, out_dtype=x.dtype)  # [M, N]
    return y.view(*lead, w.shape[0])


def fp8_block_linear_ref(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
                         block_size: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """Reference of fp8_block_linear."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = per_token_group_quant_fp8_ref(x2, block_size[1])
    y = w8a8_block_fp8_matmul_ref(xq, xs, w, ws, block_size, out_dtype=x.dtype)
    return y.view(*x.shape[:-1], w.shape[0])


def fp8_channel_linear_ref(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """Reference of fp8_channel_linear."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = per_token_quant_fp8_ref(x2)
    y = w8a8_channel_fp8_matmul_ref(xq, xs, w, ws, out_dtype=x.dtype)
    return y.view(*x.shape[:-1], w.shape[0])


def _gemv_prep_kernel(x_ptr, y_ptr, s_ptr, K, stride_xm, GROUP: tl.constexpr, BLOCK: tl.constexpr,
                      PDL: tl.constexpr = False):
    """Row pid(0) of x in fp32 (y) and its sums over groups of GROUP (s), BLOCK values per program."""
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)  # [BLOCK]
    tl.store(y_ptr + row * K + offs, v, mask=offs < K)
    sums = tl.sum(tl.reshape(v, (BLOCK // GROUP, GROUP)), axis=1)  # [BLOCK / GROUP]
    offs_g = tl.program_id(1) * (BLOCK // GROUP) + tl.arange(0, BLOCK // GROUP)
    tl.store(s_ptr + row * (K // GROUP) + offs_g, sums, mask=offs_g < K // GROUP)


_gemv_prep = triton_kernel(_gemv_prep_kernel)


def gemv_prep(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in fp32 [M, K], its sums over groups of `group` columns [M, K / group]), one launch: the activations of
    the GEMV kernels that take each group's sum instead of adding it up in every thread (kernels/gguf_gemm.py,
    kernels/w4a16_moe.py). K must be a multiple of group."""
    m, k = x.shape
    y = torch.empty((m, k), dtype=torch.float32, device=x.device)
    s = torch.empty((m, k // group), dtype=torch.float32, device=x.device)
    if m:
        block = min(1024, triton.next_power_of_2(k))
        _gemv_prep[(m, triton.cdiv(k, block))](x, y, s, k, x.stride(0), GROUP=group, BLOCK=block, num_warps=4,
                                               **pdl_kwargs(x.device))
    return y, s
