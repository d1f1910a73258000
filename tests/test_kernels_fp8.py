"""FP8 GEMM and fused-MoE Triton kernels (kernels/fp8_gemm.py, kernels/fp8_moe.py) against their PyTorch references.

Every test runs on two devices:
  cpu   Triton's interpreter. Triton reads TRITON_INTERPRET when each @triton.jit decorator runs, its standard library's
        (tl.cdiv, tl.max, tl.sigmoid) at `import triton`; so tests/kernel_devices.py, imported before anything here
        imports triton, sets it, and only where no CUDA device is present, where no compiled Triton kernel could run
        anyway: on a GPU machine it changes nothing for other test modules. The kernels follow the mode triton.language
        was imported in (fp8_gemm.INTERPRETED); the cpu cases are skipped when it is compiled (a GPU machine; run
        `TRITON_INTERPRET=1 pytest` there to run them), and test_cpu_machines_interpret fails if a CPU-only machine
        somehow imported triton compiled first, so that CI cannot skip them silently.
  cuda  the compiled kernels (FP8 operands straight into tl.dot), marked `gpu`, skipped without a CUDA device.

Two comparisons, with different tolerances:
  kernel vs *_ref    same quantization and roundings, so they differ only by fp32 summation order (and on the GPU
                     in exp/sigmoid): quantization is bit-exact, outputs agree to about one unit in the last place
                     of the output dtype (TOL).
  *_ref vs fp32 math on dequantized weights and unquantized activations: the FP8 error itself. Activations in
                     e4m3 carry up to 2^-4 relative rounding error each; one quantized operand gives about 2 % relative
                     (Frobenius) error, the MoE's two (x and the intermediate, through silu * up) about 4.5 % (REL_FP8).
"""

from __future__ import annotations

import zlib

import pytest
import torch
from kernel_devices import CUDA, DEVICES, IGNORE_EXP_OVERFLOW, INTERPRETED, gpu_only  # sets TRITON_INTERPRET first
from quantkit.kernels import fp8_gemm, fp8_moe
from quantkit.kernels.fp8_gemm import (
    FP8_DTYPE,
    fp8_block_linear,
    fp8_block_linear_ref,
    fp8_channel_linear,
    fp8_channel_linear_ref,
    per_token_group_quant_fp8,
    per_token_group_quant_fp8_ref,
    per_token_quant_fp8,
    per_token_quant_fp8_ref,
    w8a8_block_fp8_matmul,
    w8a8_block_fp8_matmul_ref,
    w8a8_channel_fp8_matmul,
    w8a8_channel_fp8_matmul_ref,
)
from quantkit.kernels.fp8_moe import fused_moe_fp8, fused_moe_fp8_ref, moe_align_block_size

pytestmark = IGNORE_EXP_OVERFLOW  # the result of the overflowing exp, 0, is right (and what the GPU gives)


# kernel vs *_ref: output dtype -> (rtol, atol as a fraction of max |ref|). One bf16 ulp is 2^-8 relative (2^-7 at the
# bottom of a binade), one fp16 ulp 2^-11.
TOL = {
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (2**-7, 2**-9),
    torch.float16: (2**-10, 2**-12),
}
# on the GPU, plus: Hopper's FP8 tensor cores keep about 14 significant bits while they add up the products inside
# a tl.dot (DeepSeek-V3 report, 3.3.2; the kernels add each BLOCK_K partial sum in fp32). Measured on H100/H200:
# 1.3e-4 to 2.3e-4 of max |ref| for K = 384..3072, block and channel alike
GPU_ACC = 1e-3
# the fused MoE chains two GEMMs through a bf16 intermediate that is quantized again: a last-place difference there
# moves one fp8 code (6 % of one element of the intermediate), hence a looser absolute part
TOL_MOE = (2**-6, 2**-7)
# *_ref vs fp32 math on dequantized weights, relative Frobenius error: one FP8 activation, two (MoE)
REL_FP8 = {"linear": 0.04, "moe": 0.07}


def gen_for(*case) -> torch.Generator:
    """A generator seeded from the test case: fresh data per case, the same data every run."""
    return torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))


def assert_close(out: torch.Tensor, ref: torch.Tensor, rtol: float, atol_frac: float) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    if out.is_cuda:
        atol_frac = max(atol_frac, GPU_ACC)
    out, ref = out.float(), ref.float()
    atol = atol_frac * max(ref.abs().max().item(), 1e-30)
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def activations(m: int, k: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Rows of very different magnitudes (scales over ~8 decades), a zero group and a zero row where there is room."""
    x = torch.randn(m, k, generator=gen) * torch.exp(torch.randn(m, 1, generator=gen) * 2)
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    if m > 3:
        x[1] = 0.0
        x[2, :64] = 0.0
    return x.to(dtype)


def quantize_block(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N, K] float -> (fp8 [..., N, K], fp32 weight_scale_inv [..., ceil(N/128), ceil(K/128)])."""
    *lead, n, k = w.shape
    nb, kb = -(-n // block), -(-k // block)
    pad = torch.zeros(*lead, nb * block, kb * block)
    pad[..., :n, :k] = w
    t = pad.view(*lead, nb, block, kb, block)
    s = t.abs().amax(dim=(-3, -1)).clamp(min=1e-12) / 448.0  # [..., nb, kb]
    q = (t / s[..., :, None, :, None]).clamp(-448, 448).to(FP8_DTYPE).view(*lead, nb * block, kb * block)
    return q[..., :n, :k].contiguous(), s


def quantize_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N, K] float -> (fp8 [..., N, K], fp32 scale [..., N, 1])."""
    s = w.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 448.0
    return (w / s).clamp(-448, 448).to(FP8_DTYPE), s


def dequantize(q: torch.Tensor, s: torch.Tensor, block: int = 128) -> torch.Tensor:
    if s.shape[-1] == 1 and q.shape[-1] != 1 and s.shape[-2] == q.shape[-2]:  # per channel
        return q.float() * s
    n, k = q.shape[-2:]
    return q.float() * s.repeat_interleave(block, -2)[..., :n, :].repeat_interleave(block, -1)[..., :k]


def weights(n: int, k: int, gen: torch.Generator, experts: int | None = None) -> torch.Tensor:
    """Random weights whose 128x128 tiles differ in magnitude, so that a wrong scale index shows."""
    lead = () if experts is None else (experts,)
    w = torch.randn(*lead, n, k, generator=gen) / k**0.5
    tiles = torch.exp(torch.randn(*lead, -(-n // 128), -(-k // 128), generator=gen) * 0.7)
    return w * tiles.repeat_interleave(128, -2)[..., :n, :].repeat_interleave(128, -1)[..., :k]


def test_cpu_machines_interpret():
    if CUDA:
        pytest.skip("a CUDA device is present: kernels compile")
    assert INTERPRETED, ("no CUDA device, yet triton was imported without TRITON_INTERPRET=1 (by something imported "
                         "before this module): set TRITON_INTERPRET=1 in the environment")


# --------------------------------------------------------------------------------------------------------------------
# activation quantization


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,k,group", [(1, 128, 128), (37, 384, 128), (130, 256, 128), (37, 256, 64)])
def test_per_token_group_quant_is_bit_exact(device, dtype, m, k, group):
    x = activations(m, k, dtype, gen_for("group", dtype, m, k, group)).to(device)
    xq, xs = per_token_group_quant_fp8(x, group)
    rq, rs = per_token_group_quant_fp8_ref(x, group)
    assert xq.dtype == FP8_DTYPE and xq.shape == (m, k) and xs.dtype == torch.float32 and xs.shape == (m, k // group)
    assert torch.equal(xs, rs)
    assert torch.equal(xq.float(), rq.float())
    # and it is a quantization of x: each element within half an e4m3 step (2^-4 relative, 2^-9 * scale subnormal)
    deq = (xq.float().view(m, -1, group) * xs[..., None]).view(m, k)
    bound = x.float().abs() * 2**-4 + xs.repeat_interleave(group, 1) * 2**-9
    assert (deq - x.float()).abs().le(bound * 1.0001).all()
    if m > 3:
        assert xq[1].float().eq(0).all() and xs[1].gt(0).all() and xs[1].isfinite().all()  # zero row: zero codes


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,limit", [(torch.bfloat16, 70), (torch.float32, 5), (torch.float16, 96)])
def test_group_quant_of_indexed_rows_up_to_a_device_limit(device, dtype, limit):
    """Output row r < limit holds per_token_group_quant_fp8's bits of x row clamp(index[r] // row_div) (a sentinel
    past the pairs takes the last row); rows from the limit on are not written; without an index, x's own rows."""
    gen = gen_for("group_rows", dtype, limit)
    m, topk, k = 12, 4, 256
    x = activations(m, k, dtype, gen).to(device)
    index = torch.randint(0, m * topk, (96,), generator=gen, dtype=torch.int32)
    index[::7] = m * topk  # padding sentinels
    index[-5:] = -3  # a tail the list never reached
    index = index.to(device)
    lim = torch.tensor([limit], dtype=torch.int32, device=device)
    q, s = fp8_gemm.per_token_group_quant_fp8_rows(x, 128, lim, index, topk)
    rq, rs = per_token_group_quant_fp8(x, 128)
    src = (index.long() // topk).clamp(0, m - 1)[:limit]
    assert q.shape == (96, k) and s.shape == (96, k // 128)
    assert torch.equal(q[:limit].float(), rq[src].float()) and torch.equal(s[:limit], rs[src])
    if INTERPRETED:  # zeros where nothing was written
        assert not q[limit:].float().any() and not s[limit:].any()
    own_q, own_s = fp8_gemm.per_token_group_quant_fp8_rows(x, 128, torch.tensor([7], dtype=torch.int32,
                                                                                   device=device))
    assert torch.equal(own_q[:7].float(), rq[:7].float()) and torch.equal(own_s[:7], rs[:7])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,k", [(1, 256), (37, 200), (130, 384)])
def test_per_token_quant_is_bit_exact(device, dtype, m, k):
    x = activations(m, k, dtype, gen_for("token", dtype, m, k)).to(device)
    xq, xs = per_token_quant_fp8(x)
    rq, rs = per_token_quant_fp8_ref(x)
    assert xs.shape == (m, 1) and torch.equal(xs, rs)
    assert torch.equal(xq.float(), rq.float())
    assert xq.float().abs().amax(dim=1).max() == 448.0  # every row's amax maps to the largest code


def test_quant_refuses_bad_inputs():
    x = torch.zeros(4, 200, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of group_size"):
        per_token_group_quant_fp8(x, 128)
    with pytest.raises(ValueError, match="power of two"):
        per_token_group_quant_fp8(torch.zeros(4, 384), 96)
    with pytest.raises(ValueError, match="must be one of"):
        per_token_quant_fp8(torch.zeros(4, 128, dtype=torch.int32))
    with pytest.raises(ValueError, match="contiguous along K"):
        per_token_quant_fp8(torch.zeros(128, 4).T)


# --------------------------------------------------------------------------------------------------------------------
# GEMMs


BLOCK_GEMM_CASES = [  # M, N, K, out dtype
    (1, 256, 256, torch.bfloat16),
    (37, 200, 384, torch.bfloat16),  # N not a multiple of 128: a partial scale row and masked columns
    (130, 256, 128, torch.float32),  # M over two row tiles
    (37, 320, 256, torch.float16),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,n,k,out_dtype", BLOCK_GEMM_CASES)
def test_block_matmul_matches_ref(device, m, n, k, out_dtype):
    gen = gen_for("block_mm", m, n, k, out_dtype)
    xq, xs = per_token_group_quant_fp8_ref(activations(m, k, torch.float32, gen))
    w, ws = quantize_block(weights(n, k, gen))
    xq, xs, w, ws = (t.to(device) for t in (xq, xs, w, ws))
    out = w8a8_block_fp8_matmul(xq, xs, w, ws, out_dtype=out_dtype)
    assert_close(out, w8a8_block_fp8_matmul_ref(xq, xs, w, ws, out_dtype=out_dtype), *TOL[out_dtype])



@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,n,k,out_dtype", BLOCK_GEMM_CASES)
def test_block_matmul_on_tma_descriptors_gives_the_pointer_gemm(device, m, n, k, out_dtype, monkeypatch):
    """A config with WS runs the TMA GEMM (rows and columns past M and N read as zeros by the descriptors): the
    pointer GEMM's result on the same tile, to rounding; a tile across scale blocks or a K block short of the scale
    group keeps the pointer GEMM."""
    gen = gen_for("block_mm_ws", m, n, k, out_dtype)
    xq, xs = per_token_group_quant_fp8_ref(activations(m, k, torch.float32, gen))
    w, ws = quantize_block(weights(n, k, gen))
    xq, xs, w, ws = (t.to(device) for t in (xq, xs, w, ws))
    ws_seen, seen = [], []
    monkeypatch.setattr(fp8_gemm, "_w8a8_ws", _Spy(fp8_gemm._w8a8_ws, ws_seen,
                                                    record=lambda kw: (kw["BLOCK_N"], kw["WS"])))
    monkeypatch.setattr(fp8_gemm, "_w8a8_fp8_matmul", _Spy(fp8_gemm._w8a8_fp8_matmul, seen))
    # on a GPU, 64-row blocks warp-specialized and 128-row blocks as a plain loop (fp8_gemm.ws_split)
    for block_m in (16,) if device == "cpu" else (64, 128):
        tile = dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=128, GROUP_M=2, SPLIT_K=1, num_warps=4, num_stages=3)
        base = w8a8_block_fp8_matmul(xq, xs, w, ws, out_dtype=out_dtype, config=tile)
        ws_seen.clear()
        seen.clear()
        out = w8a8_block_fp8_matmul(xq, xs, w, ws, out_dtype=out_dtype, config={**tile, "WS": True})
        assert ws_seen == [(64, block_m == 64 and device != "cpu")] and not seen
        # to rounding: the TMA tiles' MMA order may differ on a GPU, and the interpreter's dot (numpy's matmul)
        # may add in another order for the descriptor's tile copies than for the pointer loads' tiles
        assert_close(out, base, *TOL[out_dtype])
        assert_close(out, w8a8_block_fp8_matmul_ref(xq, xs, w, ws, out_dtype=out_dtype), *TOL[out_dtype])
    ws_seen.clear()
    for other in ({"BLOCK_N": 256}, {"BLOCK_K": 64}):
        seen.clear()
        w8a8_block_fp8_matmul(xq, xs, w, ws, out_dtype=out_dtype, config={**tile, "WS": True, **other})
        assert not ws_seen and len(seen) == 1, other


def test_programmatic_dependent_launch_is_opt_in_and_compiled_only(monkeypatch):
    """QUANTKIT_PDL=1 asks for it; never under the interpreter or on the CPU, off by default."""
    monkeypatch.delenv(fp8_gemm.PDL_ENV, raising=False)
    assert fp8_gemm.pdl_kwargs(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setenv(fp8_gemm.PDL_ENV, "1")
    assert not fp8_gemm.pdl(torch.device("cpu"))
    if INTERPRETED:
        assert not fp8_gemm.pdl(torch.device("cuda"))
    monkeypatch.setattr(fp8_gemm, "INTERPRETED", False)
    monkeypatch.setattr(fp8_gemm, "_cuda_device_info", lambda index: ("GPU", (9, 0), 132))
    assert fp8_gemm.pdl_kwargs(torch.device("cuda", 0)) == {"PDL": True, "launch_pdl": True}
    monkeypatch.setenv(fp8_gemm.PDL_ENV, "5")  # the mode reaches the kernels: no weight prefetch
    assert fp8_gemm.pdl_kwargs(torch.device("cuda", 0)) == {"PDL": 1 | fp8_gemm.PDL_NO_PREFETCH, "launch_pdl": True}
    monkeypatch.setenv(fp8_gemm.PDL_ENV, "2")
    with pytest.raises(ValueError, match="QUANTKIT_PDL must be"):
        fp8_gemm.pdl(torch.device("cuda", 0))
    monkeypatch.setenv(fp8_gemm.PDL_ENV, "1")
    monkeypatch.setattr(fp8_gemm, "_cuda_device_info", lambda index: ("GPU", (8, 9), 132))
    assert not fp8_gemm.pdl(torch.device("cuda", 0))
    monkeypatch.setenv(fp8_gemm.PDL_ENV, "0")
    monkeypatch.setattr(fp8_gemm, "_cuda_device_info", lambda index: ("GPU", (9, 0), 132))
    assert not fp8_gemm.pdl(torch.device("cuda", 0))


def test_warp_specialization_only_where_measured_right(monkeypatch):
    """The compiled TMA GEMMs split their K loop only for one dot on 64-row blocks (what gave the unsplit loop's
    results on an H100); never under the interpreter."""
    assert not fp8_gemm.ws_split(64, 1) or not INTERPRETED
    monkeypatch.setattr(fp8_gemm, "INTERPRETED", False)
    assert fp8_gemm.ws_split(64, 1)
    assert not any(fp8_gemm.ws_split(m, d) for m, d in ((128, 1), (32, 1), (64, 2), (128, 2)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_n", [32, 128, 256])
def test_block_matmul_column_tiles_in_and_across_scale_blocks(device, block_n, monkeypatch):
    """A column tile inside one 128-row scale block takes that block's one scale (folded into the rows' scales); a
    tile of 256 columns spans two scale blocks and reads a scale per column. Both give the reference's sums, N = 320
    leaving a partial tile and a partial scale block."""
    gen = gen_for("block_mm_tile", block_n)
    xq, xs = per_token_group_quant_fp8_ref(activations(19, 384, torch.float32, gen))
    w, ws = quantize_block(weights(320, 384, gen))
    xq, xs, w, ws = (t.to(device) for t in (xq, xs, w, ws))
    seen = []
    kernel = fp8_gemm._w8a8_fp8_matmul
    monkeypatch.setattr(fp8_gemm, "_w8a8_fp8_matmul", _Spy(kernel, seen))
    out = w8a8_block_fp8_matmul(xq, xs, w, ws, config=dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=128, SPLIT_K=1))
    assert seen == [block_n <= 128]
    assert_close(out, w8a8_block_fp8_matmul_ref(xq, xs, w, ws), *TOL[torch.bfloat16])


class _Spy:
    """Stands in for a launcher: records record(the launch's keyword arguments), by default its B_SCALE_TILE, and
    launches the kernel."""

    def __init__(self, kernel, seen: list, record=lambda kw: kw.get("B_SCALE_TILE", False)):
        self.kernel, self.seen, self.record = kernel, seen, record

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append(self.record(kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,n,k,out_dtype", [
    (1, 256, 256, torch.bfloat16),
    (37, 200, 200, torch.bfloat16),  # K not a multiple of BLOCK_K: masked along K too
    (130, 256, 384, torch.float32),
])
def test_channel_matmul_matches_ref(device, m, n, k, out_dtype):
    gen = gen_for("chan_mm", m, n, k, out_dtype)
    xq, xs = per_token_quant_fp8_ref(activations(m, k, torch.float32, gen))
    w, ws = quantize_channel(weights(n, k, gen))
    xq, xs, w, ws = (t.to(device) for t in (xq, xs, w, ws))
    out = w8a8_channel_fp8_matmul(xq, xs, w, ws, out_dtype=out_dtype)
    assert_close(out, w8a8_channel_fp8_matmul_ref(xq, xs, w, ws, out_dtype=out_dtype), *TOL[out_dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme", ["block", "channel"])
def test_linear_matches_ref_and_dequantized_math(device, scheme):
    gen = gen_for("linear", scheme)
    x = torch.randn(3, 11, 384, generator=gen).to(torch.bfloat16).to(device)  # leading dims are kept
    wf = weights(256, 384, gen)
    w, ws = (t.to(device) for t in (quantize_block(wf) if scheme == "block" else quantize_channel(wf)))
    linear, linear_ref = (fp8_block_linear, fp8_block_linear_ref) if scheme == "block" else (fp8_channel_linear,
                                                                                            fp8_channel_linear_ref)
    out = linear(x, w, ws)
    ref = linear_ref(x, w, ws)
    assert out.shape == (3, 11, 256) and out.dtype == torch.bfloat16
    assert_close(out, ref, *TOL[torch.bfloat16])
    exact = x.float() @ dequantize(w, ws).T
    assert rel_err(ref, exact) < REL_FP8["linear"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_block_linear_one_token_quantizes_in_the_gemm(device, dtype, monkeypatch):
    """One token: the GEMM quantizes x itself, with the bits per_token_group_quant_fp8 gives (a zero group too)."""
    gen = gen_for("linear-one", dtype)
    x = torch.randn(1, 1, 512, generator=gen).to(dtype)
    x[..., 128:256] = 0.0  # an all-zero group: scale from SCALE_EPS, zeros
    x = x.to(device)
    w, ws = (t.to(device) for t in quantize_block(weights(200, 512, gen)))  # N = 200: a partial tile
    calls = []
    quant = fp8_gemm.per_token_group_quant_fp8
    monkeypatch.setattr(fp8_gemm, "per_token_group_quant_fp8", lambda *a: calls.append(1) or quant(*a))
    fused = fp8_block_linear(x, w, ws)
    assert calls == [] and fused.shape == (1, 1, 200)
    monkeypatch.setattr(fp8_gemm, "QUANT_IN_GEMM", False)
    assert torch.equal(fused, fp8_block_linear(x, w, ws)) and calls == [1]
    assert_close(fused, fp8_block_linear_ref(x, w, ws), *TOL[dtype])


SPLIT_CASES = [  # m, n, k, out dtype, SPLIT_K
    (1, 256, 512, torch.bfloat16, 4),
    (3, 200, 384, torch.bfloat16, 3),  # N not a multiple of the tile, three splits of one K block
    (16, 384, 256, torch.float16, 2),
    (5, 256, 512, torch.float32, 2),
    (20, 130, 640, torch.bfloat16, 4),  # 4 does not divide 5 K blocks: the launcher takes 1
]


GEMV_CASES = [  # m, n, k, out dtype, BLOCK_N, SPLIT_K
    (1, 256, 512, torch.bfloat16, 32, 1),
    (1, 200, 384, torch.bfloat16, 64, 3),  # N not a multiple of the tile: masked rows, a partial scale row
    (3, 320, 256, torch.float16, 16, 2),  # several rows of A: a program each
    (1, 130, 640, torch.float32, 128, 4),  # 4 does not divide 5 K blocks: the launcher takes 1
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,n,k,out_dtype,block_n,split", GEMV_CASES)
def test_block_matmul_gemv_path_matches_ref(device, m, n, k, out_dtype, block_n, split):
    """PATH "gemv": the weight rows on the CUDA cores, the products scaled before they are summed: the reference's
    result within its tolerance, the same bits on a second run, the arrival counters back at zero; with one 16-bit
    row (fp8_block_linear), the row quantized in the GEMV as per_token_group_quant_fp8 quantizes it."""
    gen = gen_for("gemv", m, n, k, out_dtype, block_n, split)
    x = activations(m, k, torch.float32, gen)
    (xq, xs), (w, ws) = per_token_group_quant_fp8_ref(x), quantize_block(weights(n, k, gen))
    xq, xs, w, ws, x = (t.to(device) for t in (xq, xs, w, ws, x))
    cfg = dict(PATH="gemv", BLOCK_N=block_n, SPLIT_K=split, num_warps=4, num_stages=2)
    out = w8a8_block_fp8_matmul(xq, xs, w, ws, out_dtype=out_dtype, config=cfg)
    assert_close(out, w8a8_block_fp8_matmul_ref(xq, xs, w, ws, out_dtype=out_dtype), *TOL[out_dtype])
    assert torch.equal(w8a8_block_fp8_matmul(xq, xs, w, ws, out_dtype=out_dtype, config=cfg), out)
    assert not any(c.any() for c in fp8_gemm._COUNTERS.values())
    xa = x.to(out_dtype)
    if m == 1:  # the row quantized in the GEMV: the same codes and scales, so the same sums as from xq, xs
        xq1, xs1 = fp8_gemm.per_token_group_quant_fp8(xa, 128)
        cfg_bk = fp8_gemm._gemm_config(fp8_gemm.check_device(xa, w, ws), n, k, 1, "block", 128)
        fused = fp8_gemm._block_matmul(xa, ws, w, ws, 128, 128, out_dtype, {**cfg_bk, **cfg}, xa.device, quant_a=True)
        assert torch.equal(fused, w8a8_block_fp8_matmul(xq1, xs1, w, ws, out_dtype=out_dtype, config=cfg))
        # fp8_block_linear's config override reaches the same launch
        assert torch.equal(fp8_gemm.fp8_block_linear(xa, w, ws, config=cfg), fused)
    else:  # several rows: quantized first, then the GEMM under the override
        assert torch.equal(fp8_gemm.fp8_block_linear(xa, w, ws, config=cfg),
                           w8a8_block_fp8_matmul(*fp8_gemm.per_token_group_quant_fp8(xa, 128), w, ws,
                                                 out_dtype=out_dtype, config=cfg))
    # an entry it cannot take (a column tile wider than the scale block): the tiled kernel's defaults
    wide = {**cfg, "BLOCK_M": 1, "BLOCK_N": 256}
    assert_close(w8a8_block_fp8_matmul(xq, xs, w, ws, out_dtype=out_dtype, config=wide),
                 w8a8_block_fp8_matmul_ref(xq, xs, w, ws, out_dtype=out_dtype), *TOL[out_dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,n,k,out_dtype,split", SPLIT_CASES)
@pytest.mark.parametrize("scheme", ["block", "channel"])
def test_split_k_matches_ref(device, scheme, m, n, k, out_dtype, split):
    """K split over programs, the partial sums added by the last to finish: the reference's result, the same bits
    on a second run, and the arrival counters left at zero for the next launch."""
    gen = gen_for("split_k", scheme, m, n, k, out_dtype)
    x = activations(m, k, torch.float32, gen)
    if scheme == "block":
        (xq, xs), (w, ws) = per_token_group_quant_fp8_ref(x), quantize_block(weights(n, k, gen))
        matmul, ref = w8a8_block_fp8_matmul, w8a8_block_fp8_matmul_ref
    else:
        (xq, xs), (w, ws) = per_token_quant_fp8_ref(x), quantize_channel(weights(n, k, gen))
        matmul, ref = w8a8_channel_fp8_matmul, w8a8_channel_fp8_matmul_ref
    xq, xs, w, ws = (t.to(device) for t in (xq, xs, w, ws))
    cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=split)
    out = matmul(xq, xs, w, ws, out_dtype=out_dtype, config=cfg)
    assert_close(out, ref(xq, xs, w, ws, out_dtype=out_dtype), *TOL[out_dtype])
    assert torch.equal(matmul(xq, xs, w, ws, out_dtype=out_dtype, config=cfg), out)
    assert not any(c.any() for c in fp8_gemm._COUNTERS.values())


@pytest.mark.parametrize("device", DEVICES)
def test_default_config_splits_k_for_few_rows(device):
    dev = torch.device(device)
    assert fp8_gemm._gemm_config(dev, 3072, 6144, 1, "block", 128)["SPLIT_K"] > 1
    assert fp8_gemm._gemm_config(dev, 3072, 6144, 512, "block", 128).get("SPLIT_K", 1) == 1


def test_tuned_buckets_reach_only_nearby_m(monkeypatch):
    """A shape tuned at decode sizes only keeps the defaults for M far above its buckets."""
    dev = torch.device("cpu")
    tuned = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, SPLIT_K=3, num_warps=4, num_stages=4)
    table = {fp8_gemm.device_key(dev): {"N=8192,K=3072,block": {"1": tuned, "16": tuned}}}
    monkeypatch.setattr(fp8_gemm, "load_config_table", lambda name: table)
    assert fp8_gemm._gemm_config(dev, 8192, 3072, 64, "block", 128) == tuned  # within 4x of 16
    far = fp8_gemm._gemm_config(dev, 8192, 3072, 128, "block", 128)
    assert far == {**fp8_gemm._gemm_default_config(dev, 128, 8192), "BLOCK_K": 128}


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu_only)])
def test_split_k_captures_in_a_cuda_graph(device):
    """Replays find the counters the kernel reset: every replay gives the eager result."""
    gen = gen_for("split_graph")
    x = activations(4, 3072, torch.bfloat16, gen).to(device)
    w, ws = (t.to(device) for t in quantize_block(weights(1024, 3072, gen)))
    cfg = dict(BLOCK_M=16, BLOCK_N=32, SPLIT_K=8)
    xq, xs = per_token_group_quant_fp8(x)
    eager = w8a8_block_fp8_matmul(xq, xs, w, ws, config=cfg)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w8a8_block_fp8_matmul(xq, xs, w, ws, config=cfg)
    for _ in range(3):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)


def test_matmul_refuses_bad_inputs():
    xq = torch.zeros(4, 200, dtype=FP8_DTYPE)
    w = torch.zeros(256, 200, dtype=FP8_DTYPE)
    with pytest.raises(ValueError, match="K=200 must be a multiple of the block size 128"):
        w8a8_block_fp8_matmul(xq, torch.ones(4, 2), w, torch.ones(2, 2))
    xq = torch.zeros(4, 256, dtype=FP8_DTYPE)
    w = torch.zeros(256, 256, dtype=FP8_DTYPE)
    with pytest.raises(ValueError, match="ws has shape"):
        w8a8_block_fp8_matmul(xq, torch.ones(4, 2), w, torch.ones(2, 3))
    with pytest.raises(ValueError, match="xs must be float32"):
        w8a8_block_fp8_matmul(xq, torch.ones(4, 2, dtype=torch.float64), w, torch.ones(2, 2))
    with pytest.raises(ValueError, match="must be torch.float8_e4m3fn"):
        w8a8_channel_fp8_matmul(xq.float(), torch.ones(4, 1), w, torch.ones(256, 1))
    with pytest.raises(ValueError, match="has K=128"):
        w8a8_channel_fp8_matmul(xq, torch.ones(4, 1), w[:, :128], torch.ones(256, 1))


# --------------------------------------------------------------------------------------------------------------------
# MoE routing


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,topk,e,block_m,drop", [
    (1, 2, 4, 16, False),
    (37, 2, 8, 16, False),
    (37, 8, 16, 64, True),  # some pairs routed nowhere (id -1)
    (200, 8, 256, 16, False),
    (64, 1, 4, 1, False),
])
def test_moe_align_block_size_invariants(device, m, topk, e, block_m, drop):
    gen = gen_for("align", m, topk, e, block_m, drop)
    topk_ids = torch.rand(m, e - 1, generator=gen).topk(topk, dim=1).indices + 1  # expert 0 gets nothing
    if drop:
        topk_ids[torch.rand(m, topk, generator=gen) < 0.2] = -1
    topk_ids = topk_ids.to(torch.int32).to(device)
    sorted_ids, expert_ids, total = moe_align_block_size(topk_ids, block_m, e)
    assert sorted_ids.dtype == torch.int32 and expert_ids.dtype == torch.int32
    assert sorted_ids.shape == (total,) and total % block_m == 0 and expert_ids.shape == (total // block_m,)
    flat = topk_ids.view(-1).long().cpu()
    sid = sorted_ids.long().cpu()
    eid = expert_ids.long().cpu()
    sentinel = m * topk
    routed = ((flat >= 0) & (flat < e)).nonzero().view(-1)
    real = sid[sid != sentinel]
    assert torch.equal(real.sort().values, routed)  # every routed (token, slot) exactly once, nothing else
    assert (sid <= sentinel).all() and (sid >= 0).all()
    block_of = torch.arange(total) // block_m
    assert torch.equal(flat[real], eid[block_of[sid != sentinel]])  # each pair in a block of its own expert
    assert (eid[1:] >= eid[:-1]).all()  # experts in order
    counts = torch.bincount(flat[routed], minlength=e)
    assert torch.equal(torch.bincount(eid, minlength=e), (counts + block_m - 1) // block_m)  # padded, no empty blocks
    assert counts[0] == 0 and not (eid == 0).any()
    for b in range(total // block_m):  # within a block: the expert's pairs in order, then only sentinels
        ids = sid[b * block_m:(b + 1) * block_m]
        n_real = int((ids != sentinel).sum())
        assert n_real > 0 and (ids[n_real:] == sentinel).all() and (ids[1:n_real] > ids[:n_real - 1]).all()
    # the sync-free form fused_moe_fp8 runs: the same list at the head of a worst-case buffer, sentinels after
    buf_ids, buf_experts, buf_total = fp8_moe._align(topk_ids, block_m, e)
    assert int(buf_total.item()) == total and buf_ids.numel() >= total and buf_ids.numel() % block_m == 0
    assert torch.equal(buf_ids[:total].cpu(), sorted_ids.cpu()) and (buf_ids[total:] == sentinel).all()
    assert torch.equal(buf_experts[:total // block_m].cpu(), expert_ids.cpu())


def test_moe_align_block_size_no_tokens():
    sorted_ids, expert_ids, total = moe_align_block_size(torch.full((3, 2), -1), 16, 4)
    assert total == 0 and sorted_ids.numel() == 0 and expert_ids.numel() == 0


def routings(m: int, topk: int, e: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Expert ids [M, topk] of several kinds, int64."""
    distinct = torch.rand(m, max(e, topk), generator=gen).argsort(dim=1)[:, :topk] % e  # distinct where E >= topk
    dropped = distinct.clone()
    dropped[torch.rand(m, topk, generator=gen) < 0.25] = -1
    return {
        "distinct": distinct,
        "dropped": dropped,  # some pairs routed nowhere
        "any": torch.randint(-3, e + 3, (m, topk), generator=gen),  # repeats, -1 and ids >= E (routed nowhere)
        "skewed": torch.randint(0, min(e, 3), (m, topk), generator=gen),  # a few experts, several blocks each
        "none": torch.full((m, topk), -1),
    }


ALIGN_CASES = [  # M, topk, E, block_m
    (1, 8, 256, 16),  # MiniMax-M2 decode
    (4, 8, 256, 16),
    (16, 8, 256, 16),
    (64, 8, 256, 16),
    (128, 8, 256, 16),
    (256, 8, 256, 64),  # 2048 pairs: the most the kernel path takes
    (3, 8, 256, 64),
    (1, 1, 1, 16),
    (37, 2, 8, 16),
    (33, 3, 5, 32),
    (64, 1, 4, 1),  # block_m 1: no padding
    (50, 6, 3, 64),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,topk,e,block_m", ALIGN_CASES)
def test_align_kernel_is_identical_to_torch(device, m, topk, e, block_m):
    """The one-program alignment (_align_small, what fused_moe_fp8 runs for few pairs) gives `_align`'s buffers
    element for element: the pairs of each expert in the same order, the same padding and sentinels, the same
    expert per block (E past the end), the same P."""
    gen = gen_for("align_kernel", m, topk, e, block_m)
    large = m * topk > 1024  # the interpreter sorts slowly: fewer routings there
    for kind, ids in routings(m, topk, e, gen).items():
        if large and kind not in ("dropped", "skewed"):
            continue
        layouts = {"int64": ids, "int32": ids.to(torch.int32)}
        if kind == "dropped":
            layouts["strided"] = torch.stack((ids, -ids), dim=2)[:, :, 0]  # not contiguous
            layouts["transposed"] = ids.t().contiguous().t()
        for layout, topk_ids in layouts.items():
            topk_ids = topk_ids.to(device)
            want = fp8_moe._align(topk_ids, block_m, e)
            got = fp8_moe._align_small(topk_ids, block_m, e)
            for name, g, w in zip(("sorted_token_ids", "expert_ids", "P"), got, want):
                assert g.dtype == w.dtype == torch.int32 and g.shape == w.shape and g.device == w.device, \
                    (kind, layout, name, g.dtype, g.shape, w.shape)
                assert torch.equal(g, w), (kind, layout, name, g.cpu(), w.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,topk,e,block_m", [(300, 8, 256, 16), (40, 8, 256, 128), (33, 3, 5, 32), (1, 1, 1, 16),
                                              (64, 1, 4, 1), (97, 6, 3, 64)])
def test_chunked_align_is_identical_to_torch(device, m, topk, e, block_m):
    """The three-launch alignment over chunks of pairs (_align_chunked, what fused_moe_fp8 runs past
    ALIGN_KERNEL_MAX_PAIRS) gives `_align`'s buffers element for element, chunk boundaries inside experts' runs
    included."""
    gen = gen_for("align_chunked", m, topk, e, block_m)
    for kind, ids in routings(m, topk, e, gen).items():
        if m * topk > 1024 and kind not in ("dropped", "skewed"):
            continue
        layouts = {"int64": ids}
        if kind == "dropped":
            layouts["transposed int32"] = ids.to(torch.int32).t().contiguous().t()
        for layout, topk_ids in layouts.items():
            topk_ids = topk_ids.to(device)
            want = fp8_moe._align(topk_ids, block_m, e)
            got = fp8_moe._align_chunked(topk_ids, block_m, e)
            for name, g, w in zip(("sorted_token_ids", "expert_ids", "P"), got, want):
                assert g.dtype == w.dtype == torch.int32 and g.shape == w.shape, (kind, layout, name)
                assert torch.equal(g, w), (kind, layout, name, g.cpu(), w.cpu())


def test_route_takes_the_kernels(monkeypatch):
    monkeypatch.setattr(fp8_moe, "ALIGN_CHUNKED", True)
    calls = []
    monkeypatch.setattr(fp8_moe, "_align_small", lambda *a: calls.append("small") or fp8_moe._align(*a))
    monkeypatch.setattr(fp8_moe, "_align_chunked", lambda *a: calls.append("chunked") or fp8_moe._align(*a))
    limit = fp8_moe.ALIGN_KERNEL_MAX_PAIRS
    for rows, want in ((0, []), (1, ["small"]), (limit // 8, ["small"]), (limit // 8 + 1, ["chunked"])):
        calls.clear()
        fp8_moe._route(torch.zeros(rows, 8, dtype=torch.int64), 16, 4)
        assert calls == want, rows


# --------------------------------------------------------------------------------------------------------------------
# fused MoE


def moe_case(m: int, e: int, topk: int, h: int, i: int, scheme: str, dtype: torch.dtype, gen: torch.Generator,
             device: str, drop: float = 0.0):
    x = (torch.randn(m, h, generator=gen) * torch.exp(torch.randn(m, 1, generator=gen))).to(dtype)
    w13f, w2f = weights(2 * i, h, gen, experts=e), weights(h, i, gen, experts=e)
    quant = quantize_block if scheme == "block" else quantize_channel
    (w13, s13), (w2, s2) = quant(w13f), quant(w2f)
    logits = torch.randn(m, e, generator=gen)
    logits[:, 0] = -torch.inf  # expert 0 gets no tokens
    topk_weights, topk_ids = torch.softmax(logits, dim=-1).topk(topk, dim=-1)
    topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    if drop:
        topk_ids[torch.rand(m, topk, generator=gen) < drop] = -1
    return tuple(t.to(device) for t in (x, w13, s13, w2, s2, topk_weights, topk_ids))


MOE_CASES = [  # M, E, topk, H, I, x dtype
    (1, 4, 2, 256, 128, torch.bfloat16),
    (37, 8, 2, 256, 256, torch.bfloat16),
    (37, 4, 2, 256, 128, torch.float16),
    (130, 5, 2, 256, 128, torch.bfloat16),  # several row blocks for one expert
    (20, 12, 8, 256, 128, torch.bfloat16),  # MiniMax-M2's top-8
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme", ["block", "channel"])
@pytest.mark.parametrize("m,e,topk,h,i,dtype", MOE_CASES)
def test_fused_moe_matches_ref(device, scheme, m, e, topk, h, i, dtype):
    args = moe_case(m, e, topk, h, i, scheme, dtype, gen_for("moe", scheme, m, e, topk, h, i, dtype), device)
    out = fused_moe_fp8(*args, scheme=scheme)
    assert out.shape == (m, h) and out.dtype == dtype
    assert_close(out, fused_moe_fp8_ref(*args, scheme=scheme), *TOL_MOE)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_n", [64, 128, 256])
def test_fused_moe_column_tiles_in_and_across_scale_blocks(device, block_n, monkeypatch):
    """Block scheme, sorted list: tiles of 64 or 128 columns lie in one scale block (one scale a K block, for the
    up rows too), tiles of 256 span two and read a scale per column; all give the reference's layer."""
    args = moe_case(37, 8, 2, 256, 256, "block", torch.bfloat16, gen_for("moe_tile", block_n), device)
    cfg = dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=2)
    monkeypatch.setattr(fp8_moe, "moe_config", lambda *a: dict(cfg))
    monkeypatch.setattr(fp8_moe, "PAIRS_MAX_TOKENS", 0)
    seen = []
    monkeypatch.setattr(fp8_moe, "_fused_moe_fp8", _Spy(fp8_moe._fused_moe_fp8, seen))
    out = fused_moe_fp8(*args, scheme="block")
    assert seen == [block_n <= 128] * 2
    assert_close(out, fused_moe_fp8_ref(*args, scheme="block"), *TOL_MOE)

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme", ["block", "channel"])
def test_fused_moe_pairs_routed_nowhere(device, scheme):
    """Slots with expert id -1 (expert parallelism: the expert lives elsewhere) add nothing; a token with no slot
    left gets zeros."""
    args = moe_case(37, 8, 2, 256, 128, scheme, torch.bfloat16, gen_for("moe_drop", scheme), device, drop=0.3)
    topk_ids = args[6]
    topk_ids[5] = -1
    out = fused_moe_fp8(*args, scheme=scheme)
    assert_close(out, fused_moe_fp8_ref(*args, scheme=scheme), *TOL_MOE)
    assert out[5].eq(0).all()
    kept = args[:5] + (torch.where(topk_ids >= 0, args[5], 0.0), torch.where(topk_ids >= 0, topk_ids, 1))
    assert_close(out, fused_moe_fp8_ref(*kept, scheme=scheme), *TOL_MOE)  # = weight 0 on any expert
    none = fused_moe_fp8(*args[:6], torch.full_like(topk_ids, -1), scheme=scheme)
    assert none.eq(0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme", ["block", "channel"])
@pytest.mark.parametrize("m,e,topk,dtype,drop", [
    (1, 16, 8, torch.bfloat16, 0.0),
    (4, 8, 8, torch.float16, 0.3),
    (3, 6, 2, torch.bfloat16, 0.0),
])
def test_fused_moe_unsorted_pairs(device, scheme, m, e, topk, dtype, drop, monkeypatch):
    """Decode's path (pairs unsorted, GEMM 2 adding the slots) against the sorted list with its separate slot sum:
    the same products, the slot sum without each slot's rounding to x.dtype; ids -1 and E add nothing."""
    args = list(moe_case(m, e, topk, 256, 128, scheme, dtype, gen_for("moe_pairs", scheme, m, e, topk, dtype),
                         device, drop=drop))
    args[6][0, 0] = e  # out of range above too
    calls = []
    route = fp8_moe._route
    monkeypatch.setattr(fp8_moe, "_route", lambda *a: calls.append(1) or route(*a))
    monkeypatch.setattr(fp8_moe, "PAIRS_MAX_TOKENS", 8)  # the launcher's choice at one token only
    pairs = fused_moe_fp8(*args, scheme=scheme)
    assert calls == []  # no sort
    monkeypatch.setattr(fp8_moe, "PAIRS_MAX_TOKENS", 0)
    sorted_out = fused_moe_fp8(*args, scheme=scheme)
    assert calls == [1]
    assert_close(pairs, sorted_out, *TOL_MOE)
    assert_close(pairs, fused_moe_fp8_ref(*args, scheme=scheme), *TOL_MOE)
    monkeypatch.setattr(fp8_moe, "PAIRS_MAX_TOKENS", 8)
    assert fused_moe_fp8(*args[:6], torch.full_like(args[6], -1), scheme=scheme).eq(0).all()
    monkeypatch.setattr(fp8_moe, "QUANT_IN_GEMM", False)  # block: GEMM 2 quantizes its A itself, bit for bit
    assert torch.equal(fused_moe_fp8(*args, scheme=scheme), pairs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme", ["block", "channel"])
@pytest.mark.parametrize("m,e,topk,drop", [(1, 16, 8, 0.0), (3, 6, 2, 0.3)])
def test_fused_moe_unsorted_pairs_split_k(device, scheme, m, e, topk, drop, monkeypatch):
    """SPLIT_K on unsorted pairs: each tile's K blocks shared by programs whose fp32 sums the last adds (GEMM 1 its
    raw gate and up sums, then gates; GEMM 2 each slot's shares in turn), as many shares as divide the K blocks; the
    layer within rounding of one program a tile, and with block scales GEMM 2 quantizing its own A gives the same
    bits."""
    args = list(moe_case(m, e, topk, 512, 256, scheme, torch.bfloat16,
                         gen_for("moe_pairs_split", scheme, m, e, topk), device, drop=drop))
    monkeypatch.setattr(fp8_moe, "PAIRS_MAX_TOKENS", 8)
    base_cfg = fp8_moe.moe_config(torch.device(device), m, topk, e, 256, 512, scheme)
    one = fused_moe_fp8(*args, scheme=scheme)
    launches = []
    monkeypatch.setattr(fp8_moe, "_fused_moe_fp8", _Spy(fp8_moe._fused_moe_fp8, launches,
                                                        record=lambda kw: kw.get("SPLIT_K")))
    for s1, s2, want in ((2, 2, [2, 2]), (3, 1, [2, 1]), (4, 8, [4, 2])):  # K blocks: 4 (GEMM 1), 2 (GEMM 2)
        entry = {**{k: v for k, v in base_cfg.items() if k != "GEMM2"}, "SPLIT_K": s1, "GEMM2": {"SPLIT_K": s2}}
        launches.clear()
        out = fused_moe_fp8(*args, scheme=scheme, config=entry)  # an entry given: as the table's would run
        assert launches == want, (s1, s2)
        assert_close(out, one, *TOL_MOE)
        assert_close(out, fused_moe_fp8_ref(*args, scheme=scheme), *TOL_MOE)
        monkeypatch.setattr(fp8_moe, "QUANT_IN_GEMM", False)
        assert torch.equal(fused_moe_fp8(*args, scheme=scheme, config=entry), out)
        monkeypatch.setattr(fp8_moe, "QUANT_IN_GEMM", True)
        picker = fp8_moe.moe_config
        monkeypatch.setattr(fp8_moe, "moe_config", lambda *a, entry=entry: fp8_moe.resolve_moe_config(entry, scheme))
        assert torch.equal(fused_moe_fp8(*args, scheme=scheme), out)
        monkeypatch.setattr(fp8_moe, "moe_config", picker)
    assert fused_moe_fp8(*args[:6], torch.full_like(args[6], -1), scheme=scheme).eq(0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,e,topk,drop,s1,s2,bn2", [
    (1, 16, 8, 0.0, 1, 1, 64),  # MiniMax-M2's top-8, one token
    (3, 6, 2, 0.3, 2, 2, 32),  # K split in both GEMMs, GEMM 2's own column tile, slots routed nowhere
    (2, 8, 4, 0.0, 4, 1, 128),
])
def test_fused_moe_one_launch_same_bits(device, m, e, topk, drop, s1, s2, bn2, monkeypatch):
    """ONE_LAUNCH (block scales, unsorted pairs): both GEMMs in one launch give the two launches' bits, with K split
    or not and GEMM 2's own tile; its counters are left at zero (a second run gives the same bits); fp32
    activations and the channel scheme keep the two launches; a bad value is refused."""
    args = list(moe_case(m, e, topk, 512, 256, "block", torch.bfloat16, gen_for("moe_one", m, e, topk, s1), device,
                         drop=drop))
    args[6][0, 0] = e  # out of range above too
    monkeypatch.setattr(fp8_moe, "PAIRS_MAX_TOKENS", 8)
    entry = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=2, SPLIT_K=s1,
                 GEMM2={"BLOCK_N": bn2, "SPLIT_K": s2})
    two = fused_moe_fp8(*args, config=entry)
    launches = []
    for name in ("_fused_moe_fp8", "_moe_fp8_one_launch"):
        monkeypatch.setattr(fp8_moe, name, _Spy(getattr(fp8_moe, name), launches, record=lambda kw, n=name: n))
    for mode in (1, 2, 1):
        launches.clear()
        one = fused_moe_fp8(*args, config={**entry, "ONE_LAUNCH": mode})
        assert launches == ["_moe_fp8_one_launch"]
        assert torch.equal(one, two), mode
    assert fp8_moe.fp8_gemm.arrival_counters(torch.device(device), 1).eq(0).all()
    assert_close(one, fused_moe_fp8_ref(*args), *TOL_MOE)
    launches.clear()
    fused_moe_fp8(args[0].float(), *args[1:], config={**entry, "ONE_LAUNCH": 1})
    assert launches == ["_fused_moe_fp8"] * 2  # an fp32 intermediate: the two launches
    with pytest.raises(ValueError, match="ONE_LAUNCH"):
        fused_moe_fp8(*args, config={**entry, "ONE_LAUNCH": 3})


@pytest.mark.parametrize("scheme", ["block", "channel"])
def test_fused_moe_ref_is_within_fp8_error_of_dequantized_math(scheme):
    """The looser comparison: the reference (hence the kernel) against fp32 math on the dequantized weights, with x and
    the intermediate unquantized. The gap is the FP8 activation error, about 4.5 % relative here."""
    x, w13, s13, w2, s2, topk_weights, topk_ids = moe_case(64, 8, 2, 512, 256, scheme, torch.bfloat16,
                                                           gen_for("moe_deq", scheme), "cpu")
    ref = fused_moe_fp8_ref(x, w13, s13, w2, s2, topk_weights, topk_ids, scheme=scheme)
    w13d, w2d = dequantize(w13, s13), dequantize(w2, s2)  # [E, 2I, H], [E, H, I]
    i = w2.shape[2]
    exact = torch.zeros(x.shape, dtype=torch.float32)
    for slot in range(topk_ids.shape[1]):
        e = topk_ids[:, slot].long()
        gate_up = torch.einsum("th,tnh->tn", x.float(), w13d[e])  # [M, 2I]
        inter = torch.nn.functional.silu(gate_up[:, :i]) * gate_up[:, i:]
        exact += topk_weights[:, slot, None] * torch.einsum("ti,thi->th", inter, w2d[e])
    assert rel_err(ref, exact) < REL_FP8["moe"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheme", ["block", "channel"])
@pytest.mark.parametrize("m,e,topk,dtype,drop", [
    (1, 16, 8, torch.bfloat16, 0.0),
    (5, 8, 8, torch.bfloat16, 0.3),
    (20, 6, 4, torch.float16, 0.0),
    (64, 8, 8, torch.bfloat16, 0.1),
])
def test_fused_moe_small_m_path_is_bit_identical(device, scheme, m, e, topk, dtype, drop, monkeypatch):
    """For few pairs fused_moe_fp8 aligns in one Triton program, for more in three over chunks of pairs; both give
    the same output, bit for bit."""
    args = moe_case(m, e, topk, 256, 128, scheme, dtype, gen_for("moe_small", scheme, m, e, topk, dtype), device,
                    drop=drop)
    monkeypatch.setattr(fp8_moe, "PAIRS_MAX_TOKENS", 0)  # the sorted list at any M
    seen = []
    align_small = fp8_moe._align_small
    monkeypatch.setattr(fp8_moe, "_align_small", lambda *a: seen.append(1) or align_small(*a))
    small = fused_moe_fp8(*args, scheme=scheme)
    assert seen == [1]
    monkeypatch.setattr(fp8_moe, "ALIGN_KERNEL_MAX_PAIRS", 0)
    monkeypatch.setattr(fp8_moe, "ALIGN_CHUNKED", True)
    large = fused_moe_fp8(*args, scheme=scheme)
    assert seen == [1]
    assert torch.equal(small, large)
    assert_close(small, fused_moe_fp8_ref(*args, scheme=scheme), *TOL_MOE)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,drop", [(torch.bfloat16, 0.2), (torch.float32, 0.0), (torch.float16, 0.0)])
def test_fused_moe_gemm1_writes_the_fp8_intermediate(device, dtype, drop, monkeypatch):
    """Sorted list, block scales, 128-column tiles: GEMM 1's epilogue writes GEMM 2's FP8 A and its scales
    (QUANT_OUT), the bits of quantizing the 16-bit (or fp32) intermediate in a launch of its own; an fp16
    intermediate keeps that launch."""
    args = moe_case(37, 8, 2, 256, 256, "block", dtype, gen_for("moe_qout", dtype, drop), device, drop=drop)
    cfg = dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=2)
    monkeypatch.setattr(fp8_moe, "moe_config", lambda *a: dict(cfg))
    monkeypatch.setattr(fp8_moe, "PAIRS_MAX_TOKENS", 0)
    monkeypatch.setattr(fp8_moe, "QUANT_OUT_GEMM", True)
    quants = []
    quant = fp8_moe.per_token_group_quant_fp8
    monkeypatch.setattr(fp8_moe, "per_token_group_quant_fp8", lambda *a: quants.append(a[0].shape) or quant(*a))
    fused = fused_moe_fp8(*args)
    assert len(quants) == (2 if dtype == torch.float16 else 1)  # x (and the fp16 intermediate)
    monkeypatch.setattr(fp8_moe, "QUANT_OUT_GEMM", False)
    quants.clear()
    assert torch.equal(fused, fused_moe_fp8(*args))
    assert len(quants) == 2
    assert_close(fused, fused_moe_fp8_ref(*args), *TOL_MOE)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_moe_down_gemm_takes_its_own_tile(device, monkeypatch):
    """A table entry's GEMM2 dict tiles the down GEMM apart from gate + up, with another BLOCK_M on a sorted list of
    its own; the layer is the one-tile layer's."""
    args = moe_case(37, 8, 2, 256, 256, "block", torch.bfloat16, gen_for("moe_gemm2"), device)
    one = dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=2)
    own = dict(BLOCK_N=64, GROUP_M=2, num_warps=4, num_stages=1)
    key = "E=8,I=256,H=256,block"
    dev = fp8_moe.device_key(torch.device(device))
    monkeypatch.setattr(fp8_moe, "PAIRS_MAX_TOKENS", 0)
    monkeypatch.setattr(fp8_moe, "load_config_table", lambda name: {dev: {key: {"64": dict(one)}}})
    base = fused_moe_fp8(*args)
    monkeypatch.setattr(fp8_moe, "load_config_table", lambda name: {dev: {key: {"64": {**one, "GEMM2": own}}}})
    cfg = fp8_moe.moe_config(torch.device(device), 37, 2, 8, 256, 256, "block")
    assert cfg["BLOCK_N"] == 128 and cfg["GEMM2"] == {**one, **own}
    launches = []
    monkeypatch.setattr(fp8_moe, "_fused_moe_fp8", _Spy(fp8_moe._fused_moe_fp8, launches, record=lambda kw: kw))
    assert torch.equal(fused_moe_fp8(*args), base)
    assert [kw["BLOCK_N"] for kw in launches] == [128, 64] and launches[1]["num_stages"] == 1
    monkeypatch.setattr(fp8_moe, "load_config_table",
                        lambda name: {dev: {key: {"64": {**one, "GEMM2": {**own, "BLOCK_M": 32}}}}})
    routes = []
    route = fp8_moe._route
    monkeypatch.setattr(fp8_moe, "_route", lambda ids, bm, e: routes.append(bm) or route(ids, bm, e))
    launches.clear()
    assert torch.equal(fused_moe_fp8(*args), base)
    assert routes == [16, 32] and [kw["BLOCK_M"] for kw in launches] == [16, 32]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,block_n,dtype,drop", [(37, 128, torch.bfloat16, 0.2), (70, 64, torch.float16, 0.0),
                                                  (130, 128, torch.float32, 0.1)])
def test_fused_moe_tma_gemms_give_the_pointer_gemms_layer(device, m, block_n, dtype, drop, monkeypatch):
    """An entry with WS runs both GEMMs on TMA descriptors (x's rows gathered into list order, GEMM 1's
    intermediate kept in that order): the layer of the pointer GEMMs on the same tiles, to rounding (each K block's
    product and scaled sum the same, the dot's order of additions not); a config it cannot serve (GEMM 2 on another
    BLOCK_M, or column tiles across scale blocks) runs the pointer GEMMs."""
    args = moe_case(m, 8, 2, 256, 256, "block", dtype, gen_for("moe_ws", m, block_n, dtype), device, drop=drop)
    # on a GPU, 64-row blocks: the compiler splits the loop into producer and consumers from 64 rows on
    cfg = dict(BLOCK_M=16 if device == "cpu" else 64, BLOCK_N=block_n, BLOCK_K=128, GROUP_M=2, num_warps=4,
               num_stages=2)
    monkeypatch.setattr(fp8_moe, "PAIRS_MAX_TOKENS", 0)
    base = fused_moe_fp8(*args, config=cfg)
    ws_launches, launches = [], []
    monkeypatch.setattr(fp8_moe, "_moe_fp8_ws", _Spy(fp8_moe._moe_fp8_ws, ws_launches, record=lambda kw: kw))
    monkeypatch.setattr(fp8_moe, "_fused_moe_fp8", _Spy(fp8_moe._fused_moe_fp8, launches, record=lambda kw: kw))
    out = fused_moe_fp8(*args, config={**cfg, "WS": True})
    assert [kw["GATED"] for kw in ws_launches] == [True, False] and not launches
    assert [kw["SORTED_OUT"] for kw in ws_launches] == [True, False]
    # on a GPU, GEMM 2's loop (one dot, 64 rows) warp-specialized, GEMM 1's (two dots) a plain loop
    assert [kw["WS"] for kw in ws_launches] == [False, device != "cpu"]
    # to rounding: the TMA tiles' MMA order may differ on a GPU, and the interpreter's dot (numpy's matmul) may add
    # in another order for the descriptor's tile copies
    assert_close(out, base, *TOL_MOE)
    assert_close(out, fused_moe_fp8_ref(*args), *TOL_MOE)
    for other in ({"GEMM2": {"BLOCK_M": 2 * cfg["BLOCK_M"]}}, {"BLOCK_N": 256}):
        ws_launches.clear()
        launches.clear()
        fused_moe_fp8(*args, config={**cfg, "WS": True, **other})
        assert not ws_launches and len(launches) == 2, other
    # GEMM 2 in half blocks of GEMM 1's list (the halves of padding only skipped): the pointer GEMMs' layer with
    # GEMM 2 on a list of its own
    big = {**cfg, "BLOCK_M": 2 * cfg["BLOCK_M"], "GEMM2": {"BLOCK_M": cfg["BLOCK_M"]}}
    base = fused_moe_fp8(*args, config=big)
    ws_launches.clear()
    launches.clear()
    out = fused_moe_fp8(*args, config={**big, "WS": True})
    assert [kw["BLOCK_M"] for kw in ws_launches] == [big["BLOCK_M"], cfg["BLOCK_M"]] and not launches
    assert [kw["LIST_M"] for kw in ws_launches] == [0, big["BLOCK_M"]]
    assert_close(out, base, *TOL_MOE)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu_only)])
@pytest.mark.parametrize("m,block_n,warps,dtype,drop", [(37, 64, 4, torch.bfloat16, 0.2),
                                                        (70, 128, 4, torch.float16, 0.0),
                                                        (130, 64, 8, torch.bfloat16, 0.1)])
def test_fused_moe_gluon_gemms_give_the_pointer_gemms_layer(device, m, block_n, warps, dtype, drop, monkeypatch):
    """An entry with WS "gluon" runs both GEMMs of the sorted list on the Gluon loop (fp8_gluon: the gate and up
    products of a K block in flight while the block before is summed): the pointer GEMMs' layer to rounding, with
    experts dropped, 8 warps (two warp groups) and GEMM 2 in half blocks of GEMM 1's list."""
    from quantkit.kernels import fp8_gluon
    args = moe_case(m, 8, 2, 256, 256, "block", dtype, gen_for("moe_gluon", m, block_n, dtype), device, drop=drop)
    cfg = dict(BLOCK_M=16 * warps, BLOCK_N=block_n, BLOCK_K=128, GROUP_M=2, num_warps=warps, num_stages=3)
    monkeypatch.setattr(fp8_moe, "PAIRS_MAX_TOKENS", 0)
    base = fused_moe_fp8(*args, config=cfg)
    gl_launches = []
    monkeypatch.setattr(fp8_gluon, "_moe_fp8_gluon_kernel",
                        _Spy(fp8_gluon._moe_fp8_gluon_kernel, gl_launches, record=lambda kw: kw))
    out = fused_moe_fp8(*args, config={**cfg, "WS": "gluon"})
    assert [(kw["GATED"], kw["SORTED_OUT"]) for kw in gl_launches] == [(True, True), (False, False)]
    assert_close(out, base, *TOL_MOE)
    assert_close(out, fused_moe_fp8_ref(*args), *TOL_MOE)
    if warps == 8:  # GEMM 2 on 64-row halves of GEMM 1's 128-row list blocks
        gl_launches.clear()
        half = {**cfg, "WS": "gluon", "GEMM2": {"BLOCK_M": 64, "num_warps": 4, "WS": "gluon"}}
        out = fused_moe_fp8(*args, config=half)
        assert [(kw["BLOCK_M"], kw["LIST_M"]) for kw in gl_launches] == [(128, 128), (64, 128)]
        assert_close(out, base, *TOL_MOE)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_moe_takes_x_already_quantized(device):
    """x_quant (the block scheme's quantization of x, made elsewhere) gives the bits of quantizing x here; a pair of
    the wrong shape is refused in one line."""
    args = moe_case(5, 8, 4, 256, 128, "block", torch.bfloat16, gen_for("moe_xq"), device)
    x = args[0]
    xq, xs = per_token_group_quant_fp8(x, 128)
    assert torch.equal(fused_moe_fp8(*args, x_quant=(xq, xs)), fused_moe_fp8(*args))
    with pytest.raises(ValueError, match="x_quant must be"):
        fused_moe_fp8(*args, x_quant=(xq[:3], xs[:3]))


def test_fused_moe_refuses_bad_inputs():
    args = list(moe_case(4, 4, 2, 256, 128, "block", torch.bfloat16, gen_for("moe_bad"), "cpu"))
    with pytest.raises(ValueError, match="scheme must be one of"):
        fused_moe_fp8(*args, scheme="tensor")
    with pytest.raises(ValueError, match="w13_scale must be float32"):
        fused_moe_fp8(*args, scheme="channel")
    bad = list(args)
    bad[3] = args[3][:, :, :64]
    with pytest.raises(ValueError, match="w2 must be"):
        fused_moe_fp8(*bad)
    bad = list(args)
    bad[5] = args[5].double()
    with pytest.raises(ValueError, match="topk_weights float32"):
        fused_moe_fp8(*bad)
    x, w13, s13, w2, s2, tw, ti = moe_case(4, 4, 2, 192, 128, "channel", torch.bfloat16, gen_for("moe_bad2"), "cpu")
    with pytest.raises(ValueError, match="multiples of 128"):
        fused_moe_fp8(x, w13, torch.ones(4, 2, 2), w2, torch.ones(4, 2, 1), tw, ti, scheme="block")


# --------------------------------------------------------------------------------------------------------------------
# block configurations


def test_config_selection():
    default = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=1)
    table = {"Dev": {"N=1,K=2,block": {"1": {"BLOCK_M": 16}, "64": {"BLOCK_M": 32, "num_warps": 8, "bogus": 1},
                                       "512": {"BLOCK_M": 128}}}}
    assert fp8_gemm.select_config(table, "Other", "N=1,K=2,block", 64, default) == default
    assert fp8_gemm.select_config(table, "Dev", "N=9,K=2,block", 64, default) == default
    assert fp8_gemm.select_config(table, "Dev", "N=1,K=2,block", 2, default)["BLOCK_M"] == 16
    cfg = fp8_gemm.select_config(table, "Dev", "N=1,K=2,block", 100, default)
    assert cfg == {**default, "BLOCK_M": 32, "num_warps": 8}  # nearest bucket, unknown keys dropped
    assert fp8_gemm.select_config(table, "Dev", "N=1,K=2,block", 10**6, default)["BLOCK_M"] == 128


@pytest.mark.parametrize("name", ["fp8_gemm.json", "fp8_moe.json"])
def test_shipped_config_tables_are_valid(name):
    table = fp8_gemm.load_config_table(name)
    for device, shapes in table.items():
        for shape, buckets in shapes.items():
            for bucket, cfg in buckets.items():
                int(bucket)
                assert set(cfg) <= set(fp8_gemm.CONFIG_KEYS), (device, shape, bucket)
                own = cfg.get("GEMM2", {})  # fp8_moe: the down GEMM's keys over the entry's
                assert name == "fp8_moe.json" or not own, (device, shape, bucket)
                assert set(own) <= set(fp8_gemm.CONFIG_KEYS) - {"GEMM2"}, (device, shape, bucket)
                for c in (cfg, {**cfg, **own}):
                    assert all(isinstance(v, int) and v > 0 for k, v in c.items() if k not in ("GEMM2", "PATH")), \
                        (device, shape, bucket)
                    if "PATH" in c:  # the block GEMV: the dense projections, a column tile inside a scale block
                        assert name == "fp8_gemm.json" and c["PATH"] == "gemv" and shape.endswith(",block") and \
                            128 % c["BLOCK_N"] == 0, (device, shape, bucket)
                    if shape.endswith(",block"):
                        assert 128 % c.get("BLOCK_K", 128) == 0, (device, shape, bucket)


TUNED = [  # configs other than the defaults: several K steps per scale block, swizzled row groups, narrow tiles
    dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=2, num_warps=4, num_stages=3),
    dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=3, num_warps=2, num_stages=2),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", TUNED)
def test_tuned_configs_are_read_and_run(device, cfg, monkeypatch):
    """A table entry for this device and shape is what the launcher runs; results match the references."""
    dev = fp8_gemm.device_key(torch.device(device))
    asked = []

    def table(entries: dict):
        return lambda name: asked.append(name) or {dev: {shape: {"1": {}, "40": cfg} for shape in entries}}

    monkeypatch.setattr(fp8_gemm, "load_config_table", table(["N=200,K=384,block", "N=200,K=384,channel"]))
    monkeypatch.setattr(fp8_moe, "load_config_table", table(["E=6,I=128,H=256,block", "E=6,I=128,H=256,channel"]))
    chosen = fp8_gemm._gemm_config(torch.device(device), 200, 384, 37, "block", 128)
    assert {key: chosen[key] for key in cfg} == cfg
    gen = gen_for("tuned", tuple(cfg.values()))
    x = activations(37, 384, torch.bfloat16, gen).to(device)
    wf = weights(200, 384, gen)
    w, ws = (t.to(device) for t in quantize_block(wf))
    assert_close(fp8_block_linear(x, w, ws), fp8_block_linear_ref(x, w, ws), *TOL[torch.bfloat16])
    w, ws = (t.to(device) for t in quantize_channel(wf))
    assert_close(fp8_channel_linear(x, w, ws), fp8_channel_linear_ref(x, w, ws), *TOL[torch.bfloat16])
    for scheme in ("block", "channel"):
        args = moe_case(37, 6, 2, 256, 128, scheme, torch.bfloat16, gen, device)
        assert_close(fused_moe_fp8(*args, scheme=scheme), fused_moe_fp8_ref(*args, scheme=scheme), *TOL_MOE)
    assert asked.count("fp8_gemm.json") == 3 and asked.count("fp8_moe.json") == 2


# --------------------------------------------------------------------------------------------------------------------
# GPU only: MiniMax-M2's widths (H=3072, I=1536), fewer experts to keep the reference loop short


@pytest.mark.parametrize("m", [1, 16, 200, 1000])
@pytest.mark.parametrize("n,k", [(3072, 1536), (2 * 1536, 3072)])
@pytest.mark.parametrize("scheme", ["block", "channel"])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu_only)])
def test_linear_real_widths(device, scheme, n, k, m):
    gen = gen_for("linear_real", scheme, n, k, m)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(device)
    wf = weights(n, k, gen)
    if scheme == "block":
        w, ws = (t.to(device) for t in quantize_block(wf))
        out, ref = fp8_block_linear(x, w, ws), fp8_block_linear_ref(x, w, ws)
    else:
        w, ws = (t.to(device) for t in quantize_channel(wf))
        out, ref = fp8_channel_linear(x, w, ws), fp8_channel_linear_ref(x, w, ws)
    assert_close(out, ref, *TOL[torch.bfloat16])


@pytest.mark.parametrize("m", [1, 64, 512])
@pytest.mark.parametrize("scheme", ["block", "channel"])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu_only)])
def test_fused_moe_real_widths(device, scheme, m):
    args = moe_case(m, 16, 8, 3072, 1536, scheme, torch.bfloat16, gen_for("moe_real", scheme, m), device)
    out = fused_moe_fp8(*args, scheme=scheme)
    assert_close(out, fused_moe_fp8_ref(*args, scheme=scheme), *TOL_MOE)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu_only)])
def test_fused_moe_captures_in_a_cuda_graph(device):
    """No host sync in fused_moe_fp8: it records into a CUDA graph, and replays with new routing and inputs."""
    args = list(moe_case(48, 16, 8, 256, 256, "block", torch.bfloat16, gen_for("graph"), device))
    eager = fused_moe_fp8(*args)  # compiles the kernels outside the capture
    static = [t.clone() for t in args]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fused_moe_fp8(*static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fused_moe_fp8(*static)
    graph.replay()
    assert torch.equal(captured, eager)
    other = moe_case(48, 16, 8, 256, 256, "block", torch.bfloat16, gen_for("graph", 2), device)
    for dst, src in zip(static, other):
        dst.copy_(src)
    graph.replay()
    assert_close(captured, fused_moe_fp8_ref(*other), *TOL_MOE)


def test_moe_kernels_share_the_interpreter_mode():
    assert fp8_moe.INTERPRETED == fp8_gemm.INTERPRETED


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu_only)])
@pytest.mark.parametrize("m,n,k", [(200, 384, 512), (1024, 256, 3072), (64, 192, 256)])
@pytest.mark.parametrize("cfg", [dict(BLOCK_N=64, STAGES=4), dict(BLOCK_N=128, STAGES=3),
                                 dict(BLOCK_M=128, num_warps=8, BLOCK_N=64, STAGES=3),
                                 dict(SPECIALIZE=True, BLOCK_N=128, STAGES=3),
                                 dict(SPECIALIZE=True, BLOCK_N=64, STAGES=4)])
def test_gluon_block_gemm_gives_the_triton_gemm(device, m, n, k, cfg):
    """The Gluon GEMMs (one warp-group MMA in flight while the previous K block is scaled; or warp-specialized):
    the Triton kernel's result to rounding (the same products and scaled sums; the MMA's order of additions within a
    block may differ), with row blocks past M, column tiles past N (192 = 1.5 tiles of 128) and as few K blocks as
    2."""
    from quantkit.kernels import fp8_gluon
    gen = gen_for("gluon_mm", m, n, k, cfg["BLOCK_N"])
    xq, xs = per_token_group_quant_fp8_ref(activations(m, k, torch.float32, gen))
    w, ws = quantize_block(weights(n, k, gen))
    xq, xs, w, ws = (t.to(device) for t in (xq, xs, w, ws))
    ref = w8a8_block_fp8_matmul(xq, xs, w, ws)
    out = fp8_gluon.w8a8_block_fp8_matmul_gluon(xq, xs, w, ws, config=cfg)
    assert_close(out, ref, *TOL[torch.bfloat16])
    assert_close(out, w8a8_block_fp8_matmul_ref(xq, xs, w, ws), *TOL[torch.bfloat16])


def test_gluon_block_gemm_refuses_what_it_cannot_run():
    """One clear error where the Gluon GEMM cannot run: no Hopper GPU in compiled mode (the interpreter runs no
    Gluon), or an odd number of K blocks."""
    from quantkit.kernels import fp8_gluon
    gen = gen_for("gluon_refuse", 4, 128, 384)
    xq, xs = per_token_group_quant_fp8_ref(activations(4, 384, torch.float32, gen))
    w, ws = quantize_block(weights(128, 384, gen))
    dev = "cuda" if CUDA and not INTERPRETED else "cpu"
    xq, xs, w, ws = (t.to(dev) for t in (xq, xs, w, ws))
    with pytest.raises(ValueError, match="Gluon GEMM"):
        fp8_gluon.w8a8_block_fp8_matmul_gluon(xq, xs, w, ws)  # 3 K blocks, or no Hopper GPU
