"""GGUF dequant-GEMM and fused-MoE Triton kernels (kernels/gguf_gemm.py, kernels/gguf_moe.py) against their references.

Devices as in tests/test_kernels_fp8.py: `cpu` runs the kernels in Triton's interpreter (TRITON_INTERPRET=1 is set
by tests/kernel_devices.py where no CUDA device exists, before triton's first import), `cuda` runs them compiled
(marked gpu).

Test data are random valid blocks: random bytes for the quants and packed scales, random small finite fp16 for d
and dmin, so every bit of every field is exercised without a quantizer. The decoder the references use is checked
bit for bit against gguf-py's `gguf.quants.dequantize` (itself bit-identical to ggml's dequantize_row_*).

Tolerances (kernel vs reference, both on the same dequantized values):
  cpu   everything in fp32 in both; they differ by summation order, and the output's rounding to its dtype: TOL.
  cuda  the dequantized weights are rounded to x's dtype for the tensor cores (bf16: 2^-9 relative per weight), so
        outputs differ by about 2^-10 of their typical size, a few bf16 ulps at most: TOL_GPU. A misread field (a
        wrong nibble, scale or sub-block) moves outputs by O(1) of their size, which every tolerance here catches.
"""

from __future__ import annotations

import zlib

import gguf
import numpy as np
import pytest
import torch
from kernel_devices import CUDA, DEVICES, IGNORE_EXP_OVERFLOW, INTERPRETED, gpu_only  # sets TRITON_INTERPRET first
from quantkit.kernels import fp8_gemm, gguf_moe
from quantkit.kernels.gguf_gemm import (
    QTYPES,
    dequantize_ref,
    gemv_prep,
    gemv_supported,
    gguf_linear,
    gguf_linear_ref,
    q6_words_supported,
)
from quantkit.kernels.gguf_gemv_q8 import (
    gguf_gemv_q8,
    gguf_gemv_q8_ref,
    q8_dequant_ref,
    q8_prep,
    q8_prep_ref,
    q8_supported,
)
from quantkit.kernels.gguf_moe import fused_moe_gguf, fused_moe_gguf_ref

pytestmark = IGNORE_EXP_OVERFLOW

GGML = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_k": gguf.GGMLQuantizationType.Q4_K,
        "q5_k": gguf.GGMLQuantizationType.Q5_K, "q6_k": gguf.GGMLQuantizationType.Q6_K}

# kernel vs reference: output dtype -> (rtol, atol as a fraction of max |ref|)
TOL = {
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (2**-7, 2**-9),
    torch.float16: (2**-10, 2**-12),
}
TOL_GPU = {
    torch.float32: (1e-4, 1e-5),  # IEEE fp32 products; FMA contraction in the dequantization
    torch.bfloat16: (2**-6, 2**-7),
    torch.float16: (2**-8, 2**-10),
}
# the MoE's intermediate is rounded to x's dtype between the GEMMs: a last-place difference there moves GEMM 2's
# inputs by one ulp, hence looser absolute parts
TOL_MOE = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2**-5, 2**-6), torch.float16: (2**-7, 2**-9)}
# relative Frobenius error, kernel vs reference
REL = {"cpu": {torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.float16: 5e-4},
       "cuda": {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}}


def gen_for(*case) -> torch.Generator:
    """A generator seeded from the test case: fresh data per case, the same data every run."""
    return torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))


def random_blocks(rows: int, k: int, qtype: str, gen: torch.Generator) -> torch.Tensor:
    """uint8 [rows, K/QK*size] of valid blocks: random quants and packed scales, d and dmin small finite fp16
    (magnitudes over three decades, so that a d read from the wrong block shows)."""
    qk, size = QTYPES[qtype]
    nb = k // qk
    b = torch.randint(0, 256, (rows, nb, size), generator=gen, dtype=torch.uint8)

    def f16_bytes(scale: float) -> torch.Tensor:
        v = torch.exp(torch.rand(rows, nb, generator=gen) * 7.0 - 9.0) * scale  # [rows, nb] in ~[1e-4, 0.1]
        return v.half().view(torch.uint8).view(rows, nb, 2)

    if qtype == "q6_k":
        b[..., 208:210] = f16_bytes(0.1)
    else:
        b[..., 0:2] = f16_bytes(1.0 if qtype == "q8_0" else 0.1)
        if qtype != "q8_0":
            b[..., 2:4] = f16_bytes(0.1)
    return b.view(rows, nb * size)


def activations(m: int, k: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(m, k, generator=gen) * torch.exp(torch.randn(m, 1, generator=gen))
    if m > 3:
        x[1] = 0.0  # a zero row
    return x.to(dtype)


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: tuple[float, float]) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    out, ref = out.float(), ref.float()
    torch.testing.assert_close(out, ref, rtol=tol[0], atol=tol[1] * max(ref.abs().max().item(), 1e-30))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30)).item()


def test_cpu_machines_interpret():
    if CUDA:
        pytest.skip("a CUDA device is present: kernels compile")
    assert INTERPRETED and fp8_gemm.INTERPRETED


# --------------------------------------------------------------------------------------------------------------------
# the reference decoder


@pytest.mark.parametrize("qtype", list(QTYPES))
def test_dequantize_ref_is_bit_exact_with_gguf(qtype):
    gen = gen_for("dequant", qtype)
    data = random_blocks(37, 1024, qtype, gen)
    # every d/dmin bit pattern class too: zero, subnormal, negative, large
    specials = torch.tensor([0.0, 6e-8, -3.5e-5, -0.75, 1000.0], dtype=torch.float16).view(torch.uint8).view(-1, 2)
    d_at = 208 if qtype == "q6_k" else 0
    size = QTYPES[qtype][1]
    for j in range(specials.shape[0]):
        data[j, d_at:d_at + 2] = specials[j]
        if qtype in ("q4_k", "q5_k"):
            data[j, size + 2:size + 4] = specials[-1 - j]
    want = gguf.quants.dequantize(data.numpy(), GGML[qtype])  # [37, 1024] float32
    got = dequantize_ref(data, qtype)
    assert got.dtype == torch.float32 and tuple(got.shape) == want.shape
    bad = np.nonzero(got.numpy().view(np.uint32) != want.view(np.uint32))
    assert bad[0].size == 0, f"{bad[0].size} values differ, first at row {bad[0][:5]}, column {bad[1][:5]}"


def test_dequantize_ref_keeps_leading_dims_and_refuses_bad_input():
    data = random_blocks(6, 512, "q4_k", gen_for("lead"))
    assert tuple(dequantize_ref(data.view(2, 3, -1), "q4_k").shape) == (2, 3, 512)
    torch.testing.assert_close(dequantize_ref(data.view(2, 3, -1), "q4_k").view(6, 512), dequantize_ref(data, "q4_k"))
    with pytest.raises(ValueError, match="qtype"):
        dequantize_ref(data, "q2_k")
    with pytest.raises(ValueError, match="multiple of the block size"):
        dequantize_ref(data[:, :100], "q4_k")
    with pytest.raises(ValueError, match="uint8"):
        dequantize_ref(data.view(torch.int8), "q4_k")


# --------------------------------------------------------------------------------------------------------------------
# plain GEMM


LINEAR_CASES = [
    # (m, n, k): one token; masked M and N edges at big blocks; several super-blocks along K
    (1, 64, 256),
    (37, 130, 512),
    (70, 200, 768),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", list(QTYPES))
@pytest.mark.parametrize("m,n,k", LINEAR_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_matches_ref(device, qtype, m, n, k, dtype):
    gen = gen_for("linear", qtype, m, n, k, dtype)
    w = random_blocks(n, k, qtype, gen).to(device)
    x = activations(m, k, dtype, gen).to(device)
    out = gguf_linear(x, w, qtype)
    ref = gguf_linear_ref(x, w, qtype)
    assert_close(out, ref, (TOL_GPU if out.is_cuda else TOL)[dtype])
    assert rel_err(out, ref) < REL[device][dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", list(QTYPES))
@pytest.mark.parametrize("block_m", [1, 4])
def test_linear_fma_path_matches_ref(device, qtype, block_m):
    """BLOCK_M < 16 (decode configs) runs fp32 FMAs instead of tl.dot: same result, fp32 all the way."""
    gen = gen_for("fma", qtype, block_m)
    w = random_blocks(96, 512, qtype, gen).to(device)
    x = activations(7, 512, torch.bfloat16, gen).to(device)
    cfg = dict(BLOCK_M=block_m, BLOCK_N=32 if x.is_cuda else 128, GROUP_M=1, num_warps=4, num_stages=2)
    out, ref = gguf_linear(x, w, qtype, config=cfg), gguf_linear_ref(x, w, qtype)
    assert_close(out, ref, TOL[torch.bfloat16])  # no bf16 weights on this path, on the GPU either
    assert rel_err(out, ref) < REL["cpu"][torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [32, 96, 288])
def test_q8_0_rows_shorter_than_a_super_block(device, k):
    """Q8_0 rows need only be a multiple of 32: the loop masks the blocks past K."""
    gen = gen_for("q8_0 short", k)
    w = random_blocks(33, k, "q8_0", gen).to(device)
    x = activations(5, k, torch.float16, gen).to(device)
    out = gguf_linear(x, w, "q8_0")
    ref = gguf_linear_ref(x, w, "q8_0")
    assert_close(out, ref, (TOL_GPU if out.is_cuda else TOL)[torch.float16])


@pytest.mark.parametrize("device", DEVICES)
def test_linear_reads_strided_rows(device):
    """A weight that is a slice of a bigger byte tensor (an expert of a stacked tensor, a row range)."""
    gen = gen_for("strided")
    big = random_blocks(3 * 96, 512, "q6_k", gen).view(3, 96, -1).to(device)
    w = big[1, 10:90]  # [80, row bytes], row stride as stored
    x = activations(9, 512, torch.float32, gen).to(device)
    assert_close(gguf_linear(x, w, "q6_k"), gguf_linear_ref(x, w.contiguous(), "q6_k"),
                 (TOL_GPU if x.is_cuda else TOL)[torch.float32])


def test_linear_refuses_bad_inputs():
    w = random_blocks(8, 256, "q4_k", gen_for("bad"))
    x = torch.zeros(2, 256)
    with pytest.raises(ValueError, match="qtype"):
        gguf_linear(x, w, "iq4_xs")
    with pytest.raises(ValueError, match="take 176 bytes"):
        gguf_linear(x, w, "q5_k")
    with pytest.raises(ValueError, match="multiple of the block length"):
        gguf_linear(torch.zeros(2, 200), w, "q4_k")
    with pytest.raises(ValueError, match="uint8"):
        gguf_linear(x, w.view(torch.int8), "q4_k")
    with pytest.raises(ValueError, match=r"x must be \[M, K\]"):
        gguf_linear(x.long(), w, "q4_k")
    assert tuple(gguf_linear(torch.zeros(0, 256), w, "q4_k").shape) == (0, 8)


# the GEMV kernel (decode sizes; Q4_K and Q6_K read as words): x in bf16 with the sums over each scale group added
# up by the kernel, or in fp32 with the sums given (gemv_prep)
GEMV = dict(PATH="gemv", BLOCK_N=32, GROUP_M=1, num_warps=1, num_stages=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", ["q4_k", "q5_k", "q6_k", "q8_0"])
@pytest.mark.parametrize("m,block_m", [(1, 1), (3, 4)])
@pytest.mark.parametrize("dtype,prep", [(torch.bfloat16, False), (torch.float32, True)])
def test_linear_gemv_path_matches_ref(device, qtype, m, block_m, dtype, prep):
    gen = gen_for("gemv", qtype, m, dtype)
    w = random_blocks(80, 768, qtype, gen).to(device)  # 80 rows: a tail of 16 past the last full tile
    x = activations(m, 768, dtype, gen).to(device)
    # K = 768: three super-blocks, split over three programs a tile at BLOCK_M 4
    cfg = {**GEMV, "BLOCK_M": block_m, "PREP": prep, "PREFETCH": prep, "LANES": 2 if block_m > 1 else 1,
           "SPLIT_K": 3 if block_m > 1 else 1}
    out = gguf_linear(x, w, qtype, config=cfg)
    ref = gguf_linear_ref(x, w, qtype)
    assert_close(out, ref, (TOL_GPU if out.is_cuda else TOL)[dtype])
    # fp32 throughout on either device; the 128 carried by each (128 + q) product until it comes off per group
    # costs about 7 of fp32's 24 bits in the sums, so fp32 outputs are not exact to 1e-6 (REL's cpu bound)
    assert rel_err(out, ref) < REL["cuda"][dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_gemv_prep_converts_and_sums(device):
    x = activations(3, 512, torch.bfloat16, gen_for("prep")).to(device)
    y, s = gemv_prep(x, 16)
    assert y.dtype == torch.float32 and torch.equal(y, x.float())
    torch.testing.assert_close(s, x.float().view(3, 32, 16).sum(-1), rtol=1e-6, atol=1e-6)


def test_gemv_path_refuses_what_it_cannot_read():
    gen = gen_for("gemv refuse")
    x = torch.zeros(1, 256)
    assert gemv_supported((random_blocks(8, 256, "q4_k", gen), "q4_k"))
    # Q8_0 rows must be whole steps of 256 values (four pairs of 34-byte blocks)
    assert gemv_supported((random_blocks(8, 512, "q8_0", gen), "q8_0"))
    assert not gemv_supported((random_blocks(8, 288, "q8_0", gen), "q8_0"))
    with pytest.raises(ValueError, match="GEMV path"):
        gguf_linear(torch.zeros(1, 288), random_blocks(8, 288, "q8_0", gen), "q8_0", config={**GEMV, "BLOCK_M": 1})
    # Q4_K rows starting off a 16-byte boundary cannot be read as aligned words
    buf = torch.zeros(8 * 144 + 1, dtype=torch.uint8)
    w = buf[1:].view(8, 144)
    w.copy_(random_blocks(8, 256, "q4_k", gen))
    assert not gemv_supported((w, "q4_k"))
    with pytest.raises(ValueError, match="GEMV path"):
        gguf_linear(x, w, "q4_k", config={**GEMV, "BLOCK_M": 1})
    assert gemv_supported((w.clone(), "q4_k"))  # a fresh allocation is aligned
    # Q6_K (210-byte blocks) needs 2-byte alignment only
    buf6 = torch.zeros(8 * 210 + 2, dtype=torch.uint8)
    assert gemv_supported((buf6[2:].view(8, 210), "q6_k")) and not gemv_supported((buf6[1:-1].view(8, 210), "q6_k"))


# --------------------------------------------------------------------------------------------------------------------
# fused MoE


def moe_case(e: int, h: int, i: int, m: int, topk: int, qtypes: tuple[str, str, str], dtype: torch.dtype,
             device: str, drop: bool = False):
    gen = gen_for("moe", e, h, i, m, topk, qtypes, dtype, drop)
    gate = random_blocks(e * i, h, qtypes[0], gen).view(e, i, -1).to(device)  # [E, I, H bytes]
    up = random_blocks(e * i, h, qtypes[1], gen).view(e, i, -1).to(device)
    down = random_blocks(e * h, i, qtypes[2], gen).view(e, h, -1).to(device)  # [E, H, I bytes]
    x = activations(m, h, dtype, gen).to(device)
    ids = torch.stack([torch.randperm(e, generator=gen)[:topk] for _ in range(m)]).to(device)  # [M, topk]
    if drop:
        ids[::3, 0] = -1  # slots routed nowhere
    w = torch.rand(m, topk, generator=gen).to(device)
    w = w / w.sum(-1, keepdim=True)
    return x, gate, up, down, w, ids


MOE_CASES = [
    # (e, h, i, m, topk, qtypes)
    (8, 256, 256, 1, 2, ("q4_k", "q4_k", "q6_k")),  # Q4_K_M's mix, one token
    (8, 256, 512, 21, 3, ("q5_k", "q5_k", "q8_0")),
    (8, 512, 256, 24, 2, ("q8_0", "q6_k", "q4_k")),  # gate and up of different types
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("e,h,i,m,topk,qtypes", MOE_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_moe_matches_ref(device, e, h, i, m, topk, qtypes, dtype):
    x, gate, up, down, w, ids = moe_case(e, h, i, m, topk, qtypes, dtype, device, drop=m > 20)
    out = fused_moe_gguf(x, gate, up, down, w, ids, qtypes)
    ref = fused_moe_gguf_ref(x, gate, up, down, w, ids, qtypes)
    assert_close(out, ref, TOL_MOE[dtype])
    assert rel_err(out, ref) < 2 * REL[device][dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_m", [1, 2])
@pytest.mark.parametrize("pairs_max", [0, 8])  # the sorted list; decode's unsorted pairs, the slots summed in GEMM 2
def test_fused_moe_fma_path_matches_ref(device, block_m, pairs_max, monkeypatch):
    monkeypatch.setattr(gguf_moe, "PAIRS_MAX_TOKENS", pairs_max)
    route = gguf_moe._route
    calls = []
    monkeypatch.setattr(gguf_moe, "_route", lambda *a: calls.append(1) or route(*a))
    qtypes = ("q4_k", "q5_k", "q6_k")
    x, gate, up, down, w, ids = moe_case(8, 256, 256, 5, 3, qtypes, torch.bfloat16, device, drop=True)
    ids[1, 2] = 8  # out of range above: routed nowhere too
    cfg = dict(BLOCK_M=block_m, BLOCK_N=64 if x.is_cuda else 128, GROUP_M=1, num_warps=4, num_stages=2)
    out = fused_moe_gguf(x, gate, up, down, w, ids, qtypes, config=cfg)
    assert calls == ([] if pairs_max else [1])
    ref = fused_moe_gguf_ref(x, gate, up, down, w, ids, qtypes)
    assert_close(out, ref, TOL_MOE[torch.bfloat16])
    assert rel_err(out, ref) < 2 * REL["cpu"][torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtypes", [("q4_k", "q4_k", "q6_k"), ("q5_k", "q5_k", "q8_0"), ("q8_0", "q8_0", "q4_k")])
@pytest.mark.parametrize("block_m,prep", [(1, True), (2, False), (8, True)])  # unsorted; sorted, 2 or 8 a block
def test_fused_moe_gemv_path_matches_ref(device, qtypes, block_m, prep, monkeypatch):
    """The GEMV path keeps the intermediate in fp32 (with its group sums for GEMM 2): with fp32 activations it is
    the fp32 reference to rounding; slots routed nowhere (-1, E) add zeros."""
    route = gguf_moe._route
    calls = []
    monkeypatch.setattr(gguf_moe, "_route", lambda *a: calls.append(1) or route(*a))
    x, gate, up, down, w, ids = moe_case(8, 256, 256, 3, 2, qtypes, torch.float32, device, drop=True)
    ids[1, 1] = 8
    cfg = dict(PATH="gemv", PREP=prep, PREFETCH=not prep, LANES=2 if prep else 1, BLOCK_M=block_m, BLOCK_N=32,
               GROUP_M=1, num_warps=2, num_stages=1)
    out = fused_moe_gguf(x, gate, up, down, w, ids, qtypes, config=cfg)
    assert calls == ([] if block_m == 1 else [1])
    ref = fused_moe_gguf_ref(x, gate, up, down, w, ids, qtypes)
    assert_close(out, ref, TOL_MOE[torch.float32])
    assert rel_err(out, ref) < REL["cuda"][torch.float32]  # as test_linear_gemv_path_matches_ref says


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_m,split,split2", [(1, 2, 2), (2, 4, 3)])  # unsorted pairs; the sorted list
def test_fused_moe_gemv_path_split_k(device, block_m, split, split2):
    """SPLIT_K on the GEMV path: GEMM 1's 4 super-blocks over `split` programs, which leave the raw gate and up sums
    for the last to add in split order and gate, writing the intermediate's group sums; GEMM 2's 2 over split2
    (3 falls to 2), on unsorted pairs each slot's shares in turn. The fp32 reference to rounding, the same bits
    twice, every arrival counter back at zero."""
    qtypes = ("q4_k", "q4_k", "q6_k")
    x, gate, up, down, w, ids = moe_case(8, 1024, 512, 3, 2, qtypes, torch.float32, device, drop=True)
    cfg = dict(PATH="gemv", PREP=True, PREFETCH=True, BLOCK_M=block_m, BLOCK_N=32, GROUP_M=1, num_warps=2,
               num_stages=1, SPLIT_K=split, SPLIT_K2=split2)
    out = fused_moe_gguf(x, gate, up, down, w, ids, qtypes, config=cfg)
    ref = fused_moe_gguf_ref(x, gate, up, down, w, ids, qtypes)
    assert_close(out, ref, TOL_MOE[torch.float32])
    assert rel_err(out, ref) < REL["cuda"][torch.float32]
    assert torch.equal(fused_moe_gguf(x, gate, up, down, w, ids, qtypes, config=cfg), out)
    assert not any(c.any() for c in fp8_gemm._COUNTERS.values())


@pytest.mark.parametrize("device", DEVICES)
def test_fused_moe_gemv_path_bf16(device):
    """bf16 activations: against the reference, which rounds the intermediate to bf16 where the GEMV path keeps
    fp32, within the MoE tolerance."""
    qtypes = ("q4_k", "q4_k", "q6_k")
    x, gate, up, down, w, ids = moe_case(8, 256, 256, 1, 3, qtypes, torch.bfloat16, device)
    cfg = dict(PATH="gemv", PREP=True, BLOCK_M=1, BLOCK_N=32, GROUP_M=1, num_warps=2, num_stages=1)
    out = fused_moe_gguf(x, gate, up, down, w, ids, qtypes, config=cfg)
    ref = fused_moe_gguf_ref(x, gate, up, down, w, ids, qtypes)
    assert_close(out, ref, TOL_MOE[torch.bfloat16])
    assert rel_err(out, ref) < 2 * REL[device][torch.bfloat16]


def test_gemv_path_is_the_decode_default(monkeypatch):
    """On a GPU, decode sizes of a mix the GEMV kernel reads take it, also over a tuned entry chosen among tile
    configs only (no PATH); an entry naming its PATH is taken as it is; gate and up of two types keep the tiles."""
    monkeypatch.setattr(gguf_moe, "INTERPRETED", False)
    q4km = ("q4_k", "q4_k", "q6_k")
    assert gguf_moe._moe_default_config(1, 8, 256, q4km)["PATH"] == "gemv"
    assert gguf_moe._moe_default_config(1, 8, 256, q4km)["Q6_WORDS"]  # bit-identical, where K allows
    assert gguf_moe._moe_default_config(8, 8, 256, q4km)["PATH"] == "gemv"
    # past the unsorted pairs, the sorted list's GEMV two pairs a program up to two pairs an expert (Q8_0: half)
    for m, q8_path, q4_path in ((9, "gemv", "gemv"), (16, "gemv", "gemv"), (17, "tile", "gemv"),
                                (64, "tile", "gemv"), (65, "tile", "tile"), (256, "tile", "tile")):
        assert gguf_moe._moe_default_config(m, 8, 256, q4km)["PATH"] == q4_path, m
        assert gguf_moe._moe_default_config(m, 8, 256, ("q8_0",) * 3)["PATH"] == q8_path, m
    assert gguf_moe._moe_default_config(16, 8, 256, q4km)["BLOCK_M"] == 2
    assert gguf_moe._moe_default_config(1, 8, 256, ("q8_0",) * 3)["PATH"] == "gemv"
    assert gguf_moe._moe_default_config(1, 8, 256, ("q5_k", "q5_k", "q6_k"))["PATH"] == "gemv"
    assert gguf_moe._moe_default_config(1, 8, 256, ("q4_k", "q6_k", "q6_k"))["PATH"] == "tile"  # gate != up
    key = gguf_moe.moe_shape_key(256, 1536, 3072, q4km)
    table = {"cpu": {key: {"1": {"BLOCK_M": 16, "BLOCK_N": 64}, "64": {"PATH": "tile", "BLOCK_M": 16}}}}
    monkeypatch.setattr(gguf_moe, "load_config_table", lambda name: table)
    monkeypatch.setattr(gguf_moe, "device_key", lambda device: "cpu")
    assert gguf_moe.moe_config(torch.device("cpu"), 1, 8, 256, 1536, 3072, q4km)["PATH"] == "gemv"
    far = gguf_moe.moe_config(torch.device("cpu"), 256, 8, 256, 1536, 3072, q4km)
    assert far["PATH"] == "tile" and far["BLOCK_M"] == 16 and far["num_warps"] == 4
    table["cpu"][key]["1"] = {"PATH": "tile", "BLOCK_M": 16, "BLOCK_N": 64}
    assert gguf_moe.moe_config(torch.device("cpu"), 1, 8, 256, 1536, 3072, q4km)["PATH"] == "tile"


def test_fused_moe_ref_is_the_dense_moe():
    """The reference on dequantized weights equals the plain expert loop of the runtime (DenseExperts' math)."""
    qtypes = ("q4_k", "q4_k", "q6_k")
    x, gate, up, down, w, ids = moe_case(4, 256, 256, 6, 2, qtypes, torch.float32, "cpu")
    g, u, d = (dequantize_ref(t, q) for t, q in zip((gate, up, down), qtypes))  # [E, I, H], [E, I, H], [E, H, I]
    want = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for s in range(ids.shape[1]):
            e = ids[t, s]
            hid = torch.nn.functional.silu(g[e] @ x[t]) * (u[e] @ x[t])
            want[t] += w[t, s] * (d[e] @ hid)
    torch.testing.assert_close(fused_moe_gguf_ref(x, gate, up, down, w, ids, qtypes), want, rtol=1e-4, atol=1e-4)


def test_fused_moe_refuses_bad_inputs():
    qtypes = ("q4_k", "q4_k", "q6_k")
    x, gate, up, down, w, ids = moe_case(4, 256, 256, 3, 2, qtypes, torch.float32, "cpu")
    with pytest.raises(ValueError, match="down: q4_k rows of K=256 take 144 bytes, got 210"):
        fused_moe_gguf(x, gate, up, down, w, ids, ("q4_k", "q4_k", "q4_k"))
    with pytest.raises(ValueError, match="down"):
        fused_moe_gguf(x, gate, up, down[:, :128], w, ids, qtypes)
    with pytest.raises(ValueError, match="topk_weights"):
        fused_moe_gguf(x, gate, up, down, w[:, :1], ids, qtypes)
    with pytest.raises(ValueError, match="qtypes"):
        fused_moe_gguf(x, gate, up, down, w, ids, ("q4_k", "q6_k"))


def test_shipped_config_table_is_valid():
    """configs/gguf_moe.json, where present: every entry names known keys with values the kernel accepts."""
    table = fp8_gemm.load_config_table("gguf_moe.json")
    for device, shapes in table.items():
        for shape, buckets in shapes.items():
            assert shape.startswith("E=") and len(shape.split(",")) == 6, shape
            for bucket, cfg in buckets.items():
                assert int(bucket) > 0
                assert set(cfg) <= set(gguf_moe.MOE_CONFIG_KEYS), cfg
                assert cfg.get("PATH", "tile") in gguf_moe.PATHS, cfg
                bm, bn = cfg.get("BLOCK_M", 16), cfg.get("BLOCK_N", 16)
                assert bm & (bm - 1) == 0 and bn >= 16 and bn & (bn - 1) == 0, (device, shape, bucket)


def test_tuned_config_is_taken(monkeypatch):
    table = {"interpreter": {gguf_moe.moe_shape_key(8, 256, 256, ("q4_k",) * 3): {"1": {"BLOCK_M": 16, "BLOCK_N": 32}}}}
    monkeypatch.setattr(gguf_moe, "load_config_table", lambda name: table)
    cfg = gguf_moe.moe_config(torch.device("cpu"), 3, 2, 8, 256, 256, ("q4_k",) * 3)
    assert cfg["BLOCK_M"] == 16 and cfg["BLOCK_N"] == 32 and "num_warps" in cfg
    assert gguf_moe.moe_config(torch.device("cpu"), 3, 2, 8, 256, 256, ("q6_k",) * 3)["BLOCK_N"] == 128


# --------------------------------------------------------------------------------------------------------------------
# MiniMax-M2 widths on the GPU


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu_only)])
@pytest.mark.parametrize("qtype", list(QTYPES))
@pytest.mark.parametrize("n,k", [(6144, 3072), (3072, 6144), (1024, 3072)])  # attn_q, attn_output, attn_k
@pytest.mark.parametrize("m", [1, 16, 200])
def test_linear_real_widths(device, qtype, n, k, m):
    gen = gen_for("real linear", qtype, n, k, m)
    w = random_blocks(n, k, qtype, gen).to(device)
    x = activations(m, k, torch.bfloat16, gen).to(device)
    out, ref = gguf_linear(x, w, qtype), gguf_linear_ref(x, w, qtype)
    assert_close(out, ref, TOL_GPU[torch.bfloat16])
    assert rel_err(out, ref) < REL["cuda"][torch.bfloat16]


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu_only)])
@pytest.mark.parametrize("qtypes", [("q4_k", "q4_k", "q6_k"), ("q5_k", "q5_k", "q6_k"), ("q6_k",) * 3,
                                    ("q8_0",) * 3])
@pytest.mark.parametrize("m", [1, 16, 256])
def test_fused_moe_real_widths(device, qtypes, m):
    """MiniMax-M2's MoE layer with this GPU's config. Where its table takes 8-bit activations (ACT_Q8, decode),
    the MoE on those activations is the reference, and the fp32 one holds loosely (ggml's Q8_1 rounding, which the
    tests' random Q4_K rows magnify: test_fused_moe_act_q8)."""
    x, gate, up, down, w, ids = moe_case(256, 3072, 1536, m, 8, qtypes, torch.bfloat16, device)
    out = fused_moe_gguf(x, gate, up, down, w, ids, qtypes)
    ref = fused_moe_gguf_ref(x, gate, up, down, w, ids, qtypes)
    if gguf_moe.moe_config(x.device, m, 8, 256, 1536, 3072, qtypes).get("ACT_Q8"):
        q8 = moe_q8_ref(x, gate, up, down, w, ids, qtypes, qtypes[2] != "q6_k")
        assert rel_err(out.cpu().float(), q8) < 2 * REL["cuda"][torch.bfloat16]
        assert rel_err(out, ref) < 6e-2
        return
    assert_close(out, ref, TOL_MOE[torch.bfloat16])
    assert rel_err(out, ref) < 2 * REL["cuda"][torch.bfloat16]


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=gpu_only)])
def test_fused_moe_captures_in_a_cuda_graph(device):
    qtypes = ("q4_k", "q4_k", "q6_k")
    x, gate, up, down, w, ids = moe_case(256, 3072, 1536, 4, 8, qtypes, torch.bfloat16, device)
    eager = fused_moe_gguf(x, gate, up, down, w, ids, qtypes)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe_gguf(x, gate, up, down, w, ids, qtypes)
    ids.copy_(torch.roll(ids, 1, dims=0))  # new routing, same buffers: the replay must follow it
    graph.replay()
    torch.testing.assert_close(out, fused_moe_gguf(x, gate, up, down, w, ids, qtypes), rtol=0, atol=0)
    assert not torch.equal(out, eager)


# --------------------------------------------------------------------------------------------------------------------
# the GEMV on 8-bit activations (kernels/gguf_gemv_q8.py)


@pytest.mark.parametrize("device", DEVICES)
def test_q8_prep_matches_ref(device):
    """Codes, scales and the scaled code sums bit for bit with the PyTorch reference (a zero row: scale 0, codes 0);
    ties of x / d round away from zero."""
    gen = gen_for("q8-prep")
    x = activations(5, 512, torch.float32, gen)
    ties = [127.0, 2.5, -2.5, 0.5, -0.5, 1.5, -1.5, 0.25, -126.5]  # amax 127: d = 1, x / d = x
    x[0, :32] = 0.0
    x[0, :len(ties)] = torch.tensor(ties)
    x = x.to(device)
    q, d, s = q8_prep(x)
    q_ref, d_ref, s_ref = q8_prep_ref(x.cpu())
    assert torch.equal(q.cpu(), q_ref) and torch.equal(d.cpu(), d_ref) and torch.equal(s.cpu(), s_ref)
    assert q[0, :9].tolist() == [127, 3, -3, 1, -1, 2, -2, 0, -127]
    assert not q[1].any() and not d[1].any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", ["q4_k", "q8_0", "q6_k", "q5_k"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_q8_matches_its_ref(device, qtype, dtype):
    """The integer-dot GEMV against the fp32 product with the 8-bit activations (integer sums are exact: to fp32
    rounding) and against the fp32 GEMV within the activations' 8-bit rounding (1%). N = 80: a partial 32-row
    tile. Q6_K: four super-blocks a row, two of them starting 2 bytes into a word."""
    gen = gen_for("gemv-q8", qtype, dtype)
    n, k = 80, (1024 if qtype == "q6_k" else 768)
    w = random_blocks(n, k, qtype, gen).to(device)
    x = activations(3, k, dtype, gen).to(device)
    out = gguf_gemv_q8(x, w, qtype)
    ref = gguf_gemv_q8_ref(x.cpu(), w.cpu(), qtype)
    assert out.dtype == dtype
    assert rel_err(out.cpu(), ref) < (2e-6 if dtype == torch.float32 else 4e-3)
    assert rel_err(out.cpu(), gguf_linear_ref(x.cpu(), w.cpu(), qtype)) < 1e-2
    # the next super-block's words loaded during this one (Q8_PREFETCH; Q8_0 takes none): the same words, the same
    # arithmetic
    assert torch.equal(gguf_gemv_q8(x, w, qtype, config={"Q8_PREFETCH": True}), out)
    if qtype == "q6_k":  # two and four threads a row, each a word of every four
        for lanes in (2, 4):
            assert torch.equal(gguf_gemv_q8(x, w, qtype, config={"Q6_LANES": lanes}), out)
    if qtype == "q8_0":  # its super-blocks in 16-byte loads, with and without the prefetch
        assert torch.equal(gguf_gemv_q8(x, w, qtype, config={"Q8_0_VEC16": True}), out)
        assert torch.equal(gguf_gemv_q8(x, w, qtype, config={"Q8_0_VEC16": True, "Q8_PREFETCH": True}), out)


@pytest.mark.parametrize("device", DEVICES)
def test_gemv_q8_q6k_rows_of_odd_super_blocks_refused(device):
    """Q6_K rows of an odd number of super-blocks are not 4-byte aligned: not this kernel's (the MoE keeps the fp32
    GEMV for them), and the linear says so."""
    gen = gen_for("gemv-q8-odd")
    w = random_blocks(8, 768, "q6_k", gen).to(device)
    assert not q8_supported((w, "q6_k"))
    assert q8_supported((random_blocks(8, 512, "q6_k", gen).to(device), "q6_k"))
    with pytest.raises(ValueError, match="even number of super-blocks"):
        gguf_gemv_q8(torch.zeros(1, 768, device=device), w, "q6_k")


def moe_q8_ref(x, gate, up, down, w, ids, qtypes, down_q8: bool) -> torch.Tensor:
    """The MoE as ACT_Q8 computes it, in fp32 on the CPU: x through its 8-bit codes (q8_prep_ref), and the
    intermediate too where GEMM 2 takes them (down_q8); slots routed nowhere add nothing."""
    q8 = q8_dequant_ref
    x, ids, w = x.cpu().float(), ids.cpu(), w.cpu().float()
    out = torch.zeros_like(x)
    xq = q8(x)
    for t in range(x.shape[0]):
        for slot, e in enumerate(ids[t].tolist()):
            if not 0 <= e < gate.shape[0]:
                continue
            g = xq[t:t + 1] @ dequantize_ref(gate[e].cpu(), qtypes[0]).t()
            u = xq[t:t + 1] @ dequantize_ref(up[e].cpu(), qtypes[1]).t()
            inter = torch.nn.functional.silu(g) * u
            if down_q8:
                inter = q8(inter)
            out[t] += w[t, slot] * (inter @ dequantize_ref(down[e].cpu(), qtypes[2]).t())[0]
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtypes,split,sort,q6q8", [
    (("q4_k", "q4_k", "q6_k"), 1, False, False),  # Q4_K_M: GEMM 2 (Q6_K) on the fp32 GEMV and its group sums
    (("q4_k", "q4_k", "q6_k"), 2, False, True),  # Q4_K_M with Q6_Q8: GEMM 2 too, shares from odd super-blocks
    (("q6_k", "q6_k", "q6_k"), 1, True, True),  # Q6_K: both, over the sorted list
    (("q5_k", "q5_k", "q6_k"), 2, False, True),  # Q5_K_M: both
    (("q8_0", "q8_0", "q8_0"), 2, False, False),  # both GEMMs on 8-bit activations, K split in both
    (("q4_k", "q4_k", "q4_k"), 1, True, False),  # both, over the sorted list
])
def test_fused_moe_act_q8(device, qtypes, split, sort, q6q8, monkeypatch):
    """The MoE on 8-bit activations (ACT_Q8): GEMM 1, and GEMM 2 where down is Q4_K, Q5_K or Q8_0 (Q6_K with
    Q6_Q8); unsorted pairs or the sorted list, slots routed nowhere, K split or not; GEMM 2's activations quantized
    in GEMM 1's epilogue or
    by a launch of their own (EPI_Q8), the same bits. Against the fp32 MoE on the 8-bit activations
    (moe_q8_ref: to fp32 rounding, and the odd code an intermediate's rounding moves across a step) and, loosely,
    against the fp32 reference: the tests' random Q4_K rows (a large positive part less a large min) magnify the
    activations' rounding several times over; the same bits twice; BLOCK_M above 1 refused."""
    if sort:
        monkeypatch.setattr(gguf_moe, "GEMV_PAIRS_MAX", 0)
    inter = 512 if qtypes[2] == "q6_k" else 256  # Q6_K down: an even number of super-blocks a row
    x, gate, up, down, w, ids = moe_case(8, 512, inter, 2, 2, qtypes, torch.float32, device, drop=True)
    cfg = dict(PATH="gemv", BLOCK_M=1, BLOCK_N=32, GROUP_M=1, num_warps=2, num_stages=1, ACT_Q8=True,
               SPLIT_K=split, SPLIT_K2=split, Q6_Q8=q6q8)
    out = fused_moe_gguf(x, gate, up, down, w, ids, qtypes, config=cfg)
    down_q8 = qtypes[2] != "q6_k" or q6q8
    assert rel_err(out.cpu(), moe_q8_ref(x, gate, up, down, w, ids, qtypes, down_q8)) < 1e-3
    assert rel_err(out, fused_moe_gguf_ref(x, gate, up, down, w, ids, qtypes)) < 6e-2
    assert torch.equal(fused_moe_gguf(x, gate, up, down, w, ids, qtypes, config=cfg), out)
    if qtypes[0] == "q8_0":  # Q8_0 in 16-byte loads, K split, the next super-block prefetched: the same bits
        assert torch.equal(fused_moe_gguf(x, gate, up, down, w, ids, qtypes,
                                          config={**cfg, "Q8_0_VEC16": True, "Q8_PREFETCH": True}), out)
    if q6q8 and split == 2:  # Q5_K_M: the next super-block's words loaded during this one, Q5_K gate and up and
        # Q6_K down from odd super-blocks; Q4_K_M: Q6_K down on four threads a row (the same bits)
        extra = {"Q8_PREFETCH": True} if qtypes[0] == "q5_k" else {"Q6_LANES": 4}
        assert torch.equal(fused_moe_gguf(x, gate, up, down, w, ids, qtypes, config={**cfg, **extra}), out)
    if down_q8 and not sort:  # GEMM 2's activations from GEMM 1's epilogue: q8_prep's of the fp32 intermediate
        assert torch.equal(fused_moe_gguf(x, gate, up, down, w, ids, qtypes, config={**cfg, "EPI_Q8": True}), out)
    with pytest.raises(ValueError, match="ACT_Q8 takes BLOCK_M 1"):
        fused_moe_gguf(x, gate, up, down, w, ids, qtypes, config={**cfg, "BLOCK_M": 2})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [512, 1024, 768])  # 2 and 4 super-blocks a row; 3 (rows 2 bytes off 4: int16 kept)
def test_gemv_q6k_words_same_bits(device, k):
    """Q6_K on the GEMV path read as int32 words (Q6_WORDS: odd super-blocks 2 bytes into a word, merged from two)
    gives the bits of the int16 reads: the same words meet the same arithmetic. A linear of 3 rows, and the MoE's
    GEMM 2 (Q4_K_M's down) with its K split so that programs start on odd super-blocks."""
    gen = gen_for("q6-words", k)
    w = random_blocks(48, k, "q6_k", gen).to(device)
    x = activations(3, k, torch.float32, gen).to(device)
    cfg = dict(PATH="gemv", PREP=True, BLOCK_M=4, BLOCK_N=32, GROUP_M=1, num_warps=2, num_stages=1)
    assert q6_words_supported(w, None, k) == (k == 512 or k == 1024)
    out = gguf_linear(x, w, "q6_k", config={**cfg, "Q6_WORDS": True})
    assert torch.equal(out, gguf_linear(x, w, "q6_k", config=cfg))
    assert rel_err(out.cpu(), gguf_linear_ref(x.cpu(), w.cpu(), "q6_k")) < 1e-5
    qtypes = ("q4_k", "q4_k", "q6_k")
    x, gate, up, down, wt, ids = moe_case(8, 256, k, 2, 2, qtypes, torch.float32, device, drop=True)
    moe = dict(PATH="gemv", PREP=True, BLOCK_M=1, BLOCK_N=32, GROUP_M=1, num_warps=2, num_stages=1,
               SPLIT_K2=k // 256)
    out = fused_moe_gguf(x, gate, up, down, wt, ids, qtypes, config={**moe, "Q6_WORDS": True})
    assert torch.equal(out, fused_moe_gguf(x, gate, up, down, wt, ids, qtypes, config=moe))
