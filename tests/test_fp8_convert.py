"""`convert --to fp8`: the official block layout reproduced byte for byte, compressed-tensors per-channel FP8
checked against transformers, error bounds, bad weights, resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import assert_one_line_error, edited_copy, run_cli
from safetensors import safe_open

from quantkit.checkpoint.fp8 import dequantize_block_fp8
from quantkit.convert import convert
from quantkit.errors import QuantkitError
from quantkit.formats import fp8
from quantkit.runtime import load_model


def tensors(folder) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / shard), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.fixture(scope="module")
def tiny_fp8_as_bf16(tiny_fp8, tmp_path_factory):
    out = tmp_path_factory.mktemp("rt") / "bf16"
    convert(tiny_fp8, out, target="bf16", progress=False)
    return out


def test_block_round_trip_reproduces_the_official_bytes(tiny_fp8, tiny_fp8_as_bf16, tmp_path):
    out = tmp_path / "fp8"
    proc = run_cli("convert", tiny_fp8_as_bf16, "--to", "fp8", "-o", out, "--max-shard-size", "3MB", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "relative RMS" in proc.stdout
    src, got = tensors(tiny_fp8), tensors(out)
    assert src.keys() == got.keys()
    bad = [k for k in src if not same_bytes(src[k], got[k])]
    assert not bad, bad[:5]
    # same shard size, same plan: the shard files themselves are identical
    for f in sorted(tiny_fp8.glob("*.safetensors")):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    assert json.loads((out / "config.json").read_text())["quantization_config"] == json.loads(
        (tiny_fp8 / "config.json").read_text())["quantization_config"]


def test_fp8_source_is_passed_through_unchanged(tiny_fp8, tmp_path):
    summary = convert(tiny_fp8, tmp_path / "fp8", target="fp8", progress=False)
    src, got = tensors(tiny_fp8), tensors(tmp_path / "fp8")
    assert all(same_bytes(src[k], got[k]) for k in src)
    assert summary.errors and max(summary.errors.values()) == 0.0


def test_block_quantization_error_is_bounded_and_reported(tiny_bf16, tmp_path):
    summary = convert(tiny_bf16, tmp_path / "fp8", target="fp8", progress=False)
    got, src = tensors(tmp_path / "fp8"), tensors(tiny_bf16)
    assert len(summary.errors) == 2 * (4 + 16 * 3)
    name = "model.layers.1.block_sparse_moe.experts.5.w2.weight"
    w = src[name].float()
    deq = dequantize_block_fp8(got[name], got[name + "_scale_inv"], dtype=torch.float32)
    rel = fp8.relative_rms(w, deq)
    assert rel == pytest.approx(summary.errors[name], rel=1e-6)
    # e4m3 keeps 3 mantissa bits: a Gaussian weight loses about 2-3% RMS, never near 5%
    assert 0.01 < max(summary.errors.values()) < 0.035
    assert got["model.layers.0.block_sparse_moe.gate.weight"].dtype == torch.bfloat16  # kept as stored
    assert got["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert "model.layers.0.block_sparse_moe.gate.weight_scale_inv" not in got
    manifest = json.loads((tmp_path / "fp8" / "quantkit-manifest.json").read_text())
    recorded = {n: e for s in manifest["shards"].values() for n, e in s.get("rel_rms", {}).items()}
    assert recorded == summary.errors


@pytest.fixture(scope="module")
def tiny_channel(tiny_bf16, tmp_path_factory):
    out = tmp_path_factory.mktemp("ch") / "fp8-channel"
    proc = run_cli("convert", tiny_bf16, "--to", "fp8", "--scheme", "channel", "-o", out, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    return out


def test_channel_layout_and_config(tiny_channel, tiny_bf16):
    got, src = tensors(tiny_channel), tensors(tiny_bf16)
    name = "model.layers.0.self_attn.o_proj.weight"
    assert got[name].dtype == torch.float8_e4m3fn and got[name + "_scale"].shape == (256, 1)
    err = fp8.relative_rms(src[name].float(), fp8.dequantize_channel(got[name], got[name + "_scale"], torch.float32))
    assert err < 0.035
    q = json.loads((tiny_channel / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "float-quantized"
    group = q["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "channel" and group["input_activations"]["strategy"] == "token"
    assert group["input_activations"]["dynamic"] is True
    targets = " ".join(group["targets"])
    for alias in ("w1|w2|w3", "gate_up|gate|up|down"):
        assert alias in targets


def test_channel_variant_matches_transformers_compressed_tensors(tiny_channel, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    dst = tmp_path / "hf"
    shutil.copytree(tiny_channel, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["partial_rotary_factor"] = cfg["rotary_dim"] / cfg["head_dim"]  # transformers ignores rotary_dim
    (dst / "config.json").write_text(json.dumps(cfg))
    ids = torch.randint(0, 2000, (2, 24), generator=torch.Generator().manual_seed(5))
    ours = load_model(tiny_channel, dtype=torch.float32)
    mine = ours(ids, ours.new_cache(2, 24))
    # compressed-tensors decompresses the weights on load: the same weights, so the same logits
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        dst, dtype=torch.float32, quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
    with torch.no_grad():
        ref = hf(ids).logits
    assert (mine - ref).abs().max().item() <= 1e-4
    # its default route also quantizes attention activations per token to FP8: close, not equal
    hf_w8a8 = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32)
    with torch.no_grad():
        sim = hf_w8a8(ids).logits
    diff = (sim - ref).abs().max().item()
    assert 0 < diff < 0.05 * ref.abs().max().item()


def test_nan_in_source_weight_is_refused(tiny_bf16, tmp_path):
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    src = edited_copy(tiny_bf16, tmp_path / "src", name, lambda t: t[3, 7].fill_(float("inf")))
    proc = run_cli("convert", src, "--to", "fp8", "-o", tmp_path / "out", "--no-progress")
    assert_one_line_error(proc, name, "NaN or inf")


def test_zero_and_ragged_tiles():
    w = torch.zeros(200, 300)
    w[150:, 200:] = torch.randn(50, 100)
    q, s = fp8.quantize_block(w, name="w")
    assert s.shape == (2, 3) and s[0, 0] == 1.0 and s[0, 2] == 1.0  # all-zero tiles
    assert torch.equal(q[:128, :128].float(), torch.zeros(128, 128))
    deq = dequantize_block_fp8(q, s, dtype=torch.float32)
    assert fp8.relative_rms(w, deq) < 0.035
    assert s[1, 2] == w[128:, 256:].abs().max() / 448
    # the error measured on the way (what convert reports): the same bytes, the same figure to float rounding
    q2, s2, err = fp8.quantize_block(w, name="w", with_error=True)
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s2, s)
    assert err == pytest.approx(fp8.relative_rms(w, deq), rel=1e-6) and err > 0
    exact = float(torch.linalg.vector_norm((w - deq).double()) / torch.linalg.vector_norm(w.double()))
    assert fp8.relative_rms(w, deq) == pytest.approx(exact, rel=1e-7)
    qc, sc, err_c = fp8.quantize_channel(w, name="w", with_error=True)
    assert err_c == pytest.approx(fp8.relative_rms(w, fp8.dequantize_channel(qc, sc, torch.float32)), rel=1e-6)
    assert fp8.quantize_block(torch.zeros(128, 128), with_error=True)[2] == 0.0
    big = torch.randn(256, 256, generator=torch.Generator().manual_seed(1)) * 1e6  # scales above 2^8
    qb, sb, err_b = fp8.quantize_block(big, name="w", with_error=True)
    assert 0.01 < err_b < 0.035
    assert err_b == pytest.approx(fp8.relative_rms(big, dequantize_block_fp8(qb, sb, dtype=torch.float32)), rel=1e-6)
    with pytest.raises(QuantkitError, match="2-D"):
        fp8.quantize_channel(torch.zeros(3), name="v")


def test_fp8_resume_with_a_scale_in_the_next_shard(tiny_bf16, tmp_path):
    """Weights and their scales may land in different shards; a resume that rewrites only the scale's shard must
    recompute it from the source."""
    # 64 KiB shards hold one 256 x 256 FP8 expert weight each, so every scale lands in the shard after its weight
    args = ["convert", tiny_bf16, "--to", "fp8", "--max-shard-size", "65536B", "--no-progress"]
    assert run_cli(*args, "-o", tmp_path / "a").returncode == 0
    wmap = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())["weight_map"]
    split = [n for n in wmap if n + "_scale_inv" in wmap and wmap[n] != wmap[n + "_scale_inv"]]
    assert split and min(int(wmap[n][6:11]) for n in split) == 3  # first split pair: the weight's shard is kept
    crashed = run_cli(*args, "-o", tmp_path / "b", env={"QUANTKIT_CRASH_AFTER_SHARDS": "3"})
    assert crashed.returncode == 137
    assert run_cli(*args, "-o", tmp_path / "b", "--resume").returncode == 0
    for f in sorted((tmp_path / "a").iterdir()):
        assert (tmp_path / "b" / f.name).read_bytes() == f.read_bytes(), f.name
