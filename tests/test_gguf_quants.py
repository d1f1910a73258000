"""GGUF block quantizers: bit-exact with gguf-py where it quantizes (Q8_0, F16, BF16, the 32-blocks), with the
scalar transcription of llama.cpp's k-quant reference (tests/gguf_reference.py) elsewhere, and decoded by gguf-py's
dequantize to exactly our dequantize."""

from __future__ import annotations

import gguf
import gguf_reference as ref
import numpy as np
import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.formats import gguf_quants as gq
from quantkit.formats.gguf_quants import TYPES, dequantize, fallback, quantize, row_bytes

KQUANTS = ["q4_k", "q5_k", "q6_k"]
BLOCK32 = ["q4_0", "q4_1", "q5_0", "q5_1"]


def sample_rows(rows: int, cols: int, seed: int) -> np.ndarray:
    """Weights as they come: Gaussian rows over six decades of scale, heavy tails, zeros, tiny and edge rows."""
    g = np.random.default_rng(seed)
    x = g.standard_normal((rows, cols)) * np.exp(g.uniform(-8, 4, (rows, 1)))
    x[::5] = g.standard_t(2, (len(x[::5]), cols)) * 0.01
    x[1] = 0.0
    x[2] = 0.37  # constant
    x[3] = -np.abs(x[3])  # negative only
    x[4, 5] = 90.0  # one huge outlier
    x[5] *= 1e-30  # tiny
    x[6] = np.round(x[6] * 8) / 8  # many ties
    x[7, ::3] = 0.0
    return x.astype(np.float32)


def sample_imatrix(rows: int, cols: int, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed)
    im = g.exponential(1.0, (rows, cols)) * np.exp(g.uniform(-3, 3, (rows, 1)))
    im[:, g.random(cols) < 0.1] = 0.0  # columns no calibration token touched
    return im.astype(np.float32)


def bad_blocks(ours: np.ndarray, theirs: np.ndarray, type_size: int) -> list[int]:
    a, b = ours.reshape(-1, type_size), theirs.reshape(-1, type_size)
    return np.nonzero((a != b).any(1))[0].tolist()


def test_type_table_is_gguf_py_s():
    for name, cls in TYPES.items():
        t = gguf.GGMLQuantizationType(cls.type_id)
        assert t.name.lower() == name
        assert gguf.GGML_QUANT_SIZES[t] == (cls.block_size, cls.type_size)
    assert row_bytes("q4_k", 3072) == 12 * 144 and row_bytes("Q6_K", 1536) == 6 * 210
    with pytest.raises(QuantkitError, match="block size 256"):
        row_bytes("q4_k", 100)
    with pytest.raises(QuantkitError, match="unknown GGML type"):
        row_bytes("q3_k_m", 256)


def test_fallback_rule():
    assert fallback("q4_k", 3072) == "q4_k"
    assert fallback("q4_k", 96) == "q5_0" and fallback("q5_k", 96) == "q5_1" and fallback("q6_k", 96) == "q8_0"
    assert fallback("q4_k", 100) == "f16" and fallback("q8_0", 64) == "q8_0"


@pytest.mark.parametrize("qtype", ["f32", "f16", "bf16", "q8_0", *BLOCK32])
def test_bit_exact_with_gguf_py(qtype):
    x = sample_rows(64, 512, seed=1)
    if qtype == "bf16":  # subnormals and rounding carries near the top of the range
        x[8] = np.float32(1e-40) * np.arange(512, dtype=np.float32)
        x[9] = np.float32(3.3e38)
    x[10] = np.float32(60000.0) * np.sign(x[10])  # near the fp16 limit
    ours = quantize(torch.from_numpy(x), qtype).numpy()
    theirs = gguf.quants.quantize(x, gguf.GGMLQuantizationType(TYPES[qtype].type_id)).view(np.uint8)
    theirs = theirs.reshape(ours.shape)
    bad = bad_blocks(ours, theirs, TYPES[qtype].type_size)
    assert not bad, f"{qtype}: {len(bad)} blocks differ from gguf-py, first {bad[:10]}"


@pytest.mark.parametrize("qtype", list(TYPES))
def test_gguf_py_dequantize_equals_ours(qtype):
    x = sample_rows(32, 512, seed=2)
    im = torch.from_numpy(sample_imatrix(1, 512, seed=3)[0])
    for imatrix in (None, im):
        data = quantize(torch.from_numpy(x), qtype, imatrix)
        ours = dequantize(data, qtype, x.shape).numpy()
        theirs = gguf.quants.dequantize(data.numpy(), gguf.GGMLQuantizationType(TYPES[qtype].type_id))
        assert ours.shape == theirs.shape == x.shape
        assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)), qtype
        if qtype not in ("f32", "f16", "bf16"):  # and the data is a sane approximation of x
            rel = np.linalg.norm(ours[8:] - x[8:], axis=1) / np.linalg.norm(x[8:], axis=1)
            assert rel.max() < 0.5 and np.median(rel) < 0.12, (qtype, rel.max(), np.median(rel))


def check_against_oracle(qtype: str, rows: int, cols: int, seed: int, with_imatrix: bool):
    x = sample_rows(rows, cols, seed)
    im = sample_imatrix(rows, cols, seed + 100) if with_imatrix else None
    ts = TYPES[qtype].type_size
    # one imatrix vector per row: quantize row by row through the public API (the [lead..., n] form is tested below)
    ours = np.stack([quantize(torch.from_numpy(x[r]), qtype, None if im is None else torch.from_numpy(im[r])).numpy()
                     for r in range(rows)])
    oracle = np.stack([ref.quantize_row(x[r], qtype, None if im is None else im[r]) for r in range(rows)])
    bad = bad_blocks(ours, oracle, ts)
    assert not bad, (f"{qtype} imatrix={with_imatrix}: {len(bad)} of {rows * cols // 256} blocks differ from the "
                     f"reference, first {bad[:10]}")
    # the error, imatrix-weighted where given, is no worse than the reference's (it is the same bytes; this also
    # guards the oracle comparison from comparing two equally broken outputs that happen to decode to garbage)
    gt = gguf.GGMLQuantizationType(TYPES[qtype].type_id)
    w = np.ones_like(x) if im is None else im
    err_ours = (w * (gguf.quants.dequantize(ours, gt) - x) ** 2).sum(1)
    err_ref = (w * (gguf.quants.dequantize(oracle, gt) - x) ** 2).sum(1)
    assert (err_ours <= err_ref * (1 + 1e-6)).all()
    norm = (w * x**2).sum(1)
    live = norm > 0
    assert np.median(err_ours[live] / norm[live]) < {"q4_k": 0.02, "q5_k": 0.005, "q6_k": 0.002}[qtype]


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", KQUANTS)
def test_kquants_match_reference(qtype, with_imatrix):
    check_against_oracle(qtype, rows=16, cols=768, seed=7, with_imatrix=with_imatrix)  # 48 blocks


@pytest.mark.slow
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", KQUANTS)
def test_kquants_match_reference_many_blocks(qtype, with_imatrix):
    check_against_oracle(qtype, rows=64, cols=1024, seed=11, with_imatrix=with_imatrix)  # 256 blocks


@pytest.mark.parametrize("qtype", BLOCK32)
def test_fallback_types_imatrix_path_matches_reference(qtype):
    x = sample_rows(12, 256, seed=5)
    im = sample_imatrix(12, 256, seed=6)
    for r in range(12):
        ours = quantize(torch.from_numpy(x[r]), qtype, torch.from_numpy(im[r])).numpy()
        oracle = ref.quantize_row_32_impl(x[r], qtype, im[r])
        bad = bad_blocks(ours, oracle, TYPES[qtype].type_size)
        assert not bad, f"{qtype} row {r}: blocks {bad} differ from the reference"


@pytest.mark.parametrize("qtype", KQUANTS)
def test_edge_blocks(qtype):
    g = np.random.default_rng(9)
    blocks = np.zeros((6, 256), dtype=np.float32)  # row 0: all zero
    blocks[1] = -1.5  # constant
    blocks[2] = g.standard_normal(256) * 1e-3
    blocks[2, 77] = 1000.0  # one huge outlier
    blocks[3] = -np.abs(g.standard_normal(256))  # negative only
    blocks[4, :128] = 2.0 ** -20  # half zero, half tiny constant
    blocks[5] = g.standard_normal(256).astype(np.float32) * 2.0 ** -60
    im = sample_imatrix(1, 256, seed=4)[0]
    for imatrix in (None, im):
        ours = quantize(torch.from_numpy(blocks), qtype, None if imatrix is None else torch.from_numpy(imatrix))
        oracle = np.stack([ref.quantize_row(b, qtype, imatrix) for b in blocks])
        bad = bad_blocks(ours.numpy(), oracle, TYPES[qtype].type_size)
        assert not bad, f"{qtype} imatrix={imatrix is not None}: edge blocks {bad} differ"
        y = dequantize(ours, qtype, blocks.shape).numpy()
        assert (y[0] == 0).all()
        assert np.abs(y[1] + 1.5).max() < 0.02  # a constant is (nearly) exact
        assert abs(y[2, 77] - 1000.0) < 40.0  # the outlier survives
        assert np.linalg.norm(y[3] - blocks[3]) < 0.15 * np.linalg.norm(blocks[3])  # negative-only is no worse


def test_grid_levels_takes_rounding_only_where_its_bounds_allow(monkeypatch):
    """The searches' levels: round-half-even where every column's bounds (its extremes mapped) are finite and within
    nearest_int's exact range, ggml's magic-number nearest_int otherwise (huge, infinite and NaN arguments, as a
    skewed weighting can make): the same values as `_levels` either way, and each path taken when it should be."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 64, generator=g)
    lo, hi = x.amin(0), x.amax(0)
    origin = -torch.rand(64, generator=g)
    tame = 15.0 / (hi - origin)
    wild = tame.clone()
    wild[3], wild[9], wild[20] = 3e7, float("inf"), float("nan")  # beyond 2**22; inf * 0 = NaN, and inf
    origin_wild = origin.clone()
    origin_wild[5] = 1e9  # x - origin far below 0
    taken = []
    real = gq._levels
    monkeypatch.setattr(gq, "_levels", lambda v, a, b: taken.append(1) or real(v, a, b))
    for iscale, org, slow in ((tame, origin, False), (wild, origin, True), (tame, origin_wild, True)):
        taken.clear()
        want = real((x - org) * iscale, 0, 15)
        got = gq._grid_levels(x, lo, hi, org, iscale, 15, out=torch.empty_like(x))
        assert torch.equal(got, want) and bool(taken) == slow
    assert torch.equal(gq._levels(torch.tensor([float("nan"), float("inf"), 4e6, 9e6]), 0, 15)[:2], torch.zeros(2))


def test_imatrix_is_ignored_by_q8_0_and_float_types():
    x = torch.from_numpy(sample_rows(8, 256, seed=12))
    im = torch.rand(256)
    for qtype in ("q8_0", "f16", "bf16", "f32"):
        assert torch.equal(quantize(x, qtype, im), quantize(x, qtype))
    assert not torch.equal(quantize(x, "q4_k", im), quantize(x, "q4_k"))


def test_per_expert_imatrix_slices_and_chunking(monkeypatch):
    x = torch.from_numpy(sample_rows(3 * 5, 512, seed=13)).view(3, 5, 512)  # [n_expert, rows, n]
    im = torch.from_numpy(sample_imatrix(3, 512, seed=14))  # [n_expert, n]
    whole = quantize(x, "q4_k", im)
    assert whole.shape == (3, 5, 2 * 144) and whole.dtype == torch.uint8
    for e in range(3):
        assert torch.equal(whole[e], quantize(x[e], "q4_k", im[e]))
    monkeypatch.setitem(gq.CHUNK_WEIGHTS, "cpu", 512 * 2)  # two rows per step: chunk borders inside experts
    assert torch.equal(quantize(x, "q4_k", im), whole)
    threads = torch.get_num_threads()
    for workers in (1, 3):  # eight chunks one after another, or three threads side by side: the same bytes
        monkeypatch.setattr(gq, "CPU_WORKERS", workers)
        assert torch.equal(quantize(x, "q4_k", im), whole)
        assert torch.get_num_threads() == threads  # the torch thread count is given back
    assert torch.equal(quantize(x.to(torch.bfloat16), "q6_k"), quantize(x.to(torch.bfloat16).float(), "q6_k"))


def test_bad_input_is_refused_naming_the_tensor():
    x = torch.randn(4, 256)
    x[2, 9] = float("nan")
    with pytest.raises(QuantkitError, match=r"blk\.3\.ffn_down_exps\.weight: NaN or inf"):
        quantize(x, "q4_k", name="blk.3.ffn_down_exps.weight")
    x[2, 9] = float("inf")
    with pytest.raises(QuantkitError, match="NaN or inf"):
        quantize(x, "q8_0", name="w")
    x[2, 9], x[1, 3] = float("-inf"), float("inf")  # a sum of NaN
    with pytest.raises(QuantkitError, match=r"NaN or inf \(first at \[1, 3\]\)"):
        quantize(x, "q8_0", name="w")
    x[1, 3] = 0.0
    big = torch.full((2, 256), 3e38)  # finite values whose sum overflows: taken (the exact check finds nothing)
    assert quantize(big, "f32", name="w").shape == (2, 1024)
    x[2, 9] = 0.0
    with pytest.raises(QuantkitError, match="w imatrix: NaN or inf"):
        quantize(x, "q6_k", torch.full((256,), float("nan")), name="w")
    with pytest.raises(QuantkitError, match="does not fit"):
        quantize(x, "q6_k", torch.ones(128), name="w")
    with pytest.raises(QuantkitError, match="w: rows of 200 values are not a multiple of the q4_k block size 256"):
        quantize(torch.randn(2, 200), "q4_k", name="w")
    with pytest.raises(QuantkitError, match="values too large for q4_k"):
        quantize(torch.full((1, 256), 1e9) * torch.linspace(-1, 1, 256), "q4_k", name="w")
    with pytest.raises(QuantkitError, match="does not hold"):
        dequantize(torch.zeros(100, dtype=torch.uint8), "q4_k", (1, 256))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("qtype", list(TYPES))
def test_cuda_writes_the_cpu_bytes(qtype):
    """The same eager ops on the GPU: no FMA, IEEE division and sqrt, so the bytes must not change."""
    x = torch.from_numpy(sample_rows(64, 1024, seed=21))
    im = torch.from_numpy(sample_imatrix(1, 1024, seed=22)[0])
    for imatrix in (None, im):
        cpu = quantize(x, qtype, imatrix)
        gpu = quantize(x.cuda(), qtype, None if imatrix is None else imatrix.cuda())
        bad = bad_blocks(gpu.cpu().numpy(), cpu.numpy(), TYPES[qtype].type_size)
        assert not bad, f"{qtype} imatrix={imatrix is not None}: CUDA blocks {bad[:10]} differ from the CPU's"
        assert torch.equal(dequantize(gpu, qtype, x.shape).cpu(), dequantize(cpu, qtype, x.shape))
