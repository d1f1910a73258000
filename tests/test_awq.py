"""AWQ for MoE: the pseudo-quantizer against quantkit.formats.awq, exact scale folding (logits and routing unchanged
before quantization), AWQ beating round-to-nearest on held-out data, and `convert --to awq` in both layouts
(AutoAWQ tensors and config; compressed-tensors loaded by transformers, logits matching the dequantized model)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import run_cli
from quantkit.evals.fidelity import fidelity
from safetensors import safe_open
from safetensors.torch import save_file

from quantkit.calibrate.awq import (
    AWQConfig,
    awq_all_layers,
    fake_quant,
    fake_quantize_model,
    grid_scales,
    search_clip,
    set_layer_weights,
)
from quantkit.calibrate.data import calibration_tokens
from quantkit.calibrate.engine import LayerStream
from quantkit.checkpoint import CheckpointReader
from quantkit.formats import awq as fmt
from quantkit.runtime import load_model

OUTLIERS = list(range(0, 256, 37))  # 7 hidden channels whose activations are 12x the others
FAST = AWQConfig(n_grid=10, clip_tokens=128, expert_tokens=256)


def tensors(folder) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / shard), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def outlier_ckpt(tiny_bf16, tmp_path_factory):
    """The tiny checkpoint with a few outlier input channels, as trained LLMs have: the norm gains feeding
    q/k/v and the experts are 12x larger on OUTLIERS. Random weights alone give AWQ nothing to find."""
    dest = tmp_path_factory.mktemp("outlier") / "ckpt"
    shutil.copytree(tiny_bf16, dest)
    for shard in sorted(dest.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            data = {k: f.get_tensor(k) for k in f.keys()}
        for name, t in data.items():
            if name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
                t[OUTLIERS] *= 12
        save_file(data, str(shard), metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="module")
def tokens(outlier_ckpt) -> torch.Tensor:
    return calibration_tokens(outlier_ckpt, None, n_samples=12, seq_len=64)  # 8 to calibrate, 4 held out


def test_fake_quant_is_the_formats_quantizer():
    w = torch.randn(48, 256) * 0.02
    w[3, 5] = 0.5
    for zp, dt in ((True, torch.float16), (False, torch.bfloat16)):
        ref = fmt.dequantize_groups(*fmt.quantize_groups(w, 128, zero_point=zp, scale_dtype=dt))
        assert torch.equal(fake_quant(w, 128, zp, dt), ref)
        stacked = fake_quant(torch.stack([w, 2 * w]), 128, zp, dt)
        assert torch.equal(stacked[0], ref)


def test_scale_grid_and_clip_search():
    x_mean = torch.rand(256) + 0.1
    w_mean = torch.rand(256) + 0.1
    grid = list(grid_scales(x_mean, w_mean, 20))
    assert [a for a, _ in grid] == [i / 20 for i in range(20)]
    for _, s in grid:
        assert torch.isfinite(s).all() and float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-5)
    # clipping never picks a range that quantizes worse than no clipping, and shrinks ranges set by an outlier
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, 16, 256, generator=g) * 0.02
    w[0, :, 7] = 0.3  # one outlier per row in group 0
    x = torch.randn(1, 64, 256, generator=g)
    mv = search_clip(w, x, AWQConfig())
    org = w.abs().reshape(1, 16, 2, 128).amax(-1)
    assert (mv <= org + 1e-7).all() and (mv >= 0.5 * org - 1e-7).all()


def fold_only(ckpt, tok):
    cfg = AWQConfig(n_grid=6, clip=False, qkv_scale="on", expert_tokens=256)
    stream = LayerStream(CheckpointReader(ckpt), tok, "cpu", torch.float32)
    return awq_all_layers(stream, cfg)


def routes(model, tok) -> list[torch.Tensor]:
    got: list[torch.Tensor] = []
    for block in model.layers:
        block.moe.register_forward_pre_hook(
            lambda m, a: got.append(m.route(a[0].reshape(-1, a[0].shape[-1]))[0].sort(-1).values))
    return got


def test_scale_folding_leaves_the_model_unchanged(outlier_ckpt, tokens):
    weights, reports = fold_only(outlier_ckpt, tokens[:8])
    ref = load_model(outlier_ckpt, dtype=torch.float32)
    folded = load_model(outlier_ckpt, dtype=torch.float32)
    orig = {k: v.clone() for k, v in folded.state_dict().items()}
    set_layer_weights(folded, weights)
    # the scales were folded for real: norms, gate columns, q/k/v, and w3/w2 of each expert changed
    for rep in reports:
        assert rep["qkv"]["applied"] and rep["w13"]["applied"]
    sd = folded.state_dict()
    for key in ("layers.0.input_layernorm", "layers.0.post_attention_layernorm", "layers.1.moe.gate",
                "layers.0.self_attn.q_proj.weight", "layers.1.moe.experts.w3", "layers.1.moe.experts.w2"):
        assert not torch.allclose(sd[key], orig[key], rtol=1e-3), key
    r_ref, r_fold = routes(ref, tokens[8:]), routes(folded, tokens[8:])
    held = tokens[8:]
    a = ref(held, ref.new_cache(*held.shape))
    b = folded(held, folded.new_cache(*held.shape))
    assert (a - b).abs().max() <= 2e-4 * a.abs().max()  # fp32 rounding only
    assert all(torch.equal(x, y) for x, y in zip(r_ref, r_fold))  # identical router decisions


def test_awq_beats_round_to_nearest_on_held_out_data(outlier_ckpt, tokens):
    stream = LayerStream(CheckpointReader(outlier_ckpt), tokens[:8], "cpu", torch.float32)
    weights, reports = awq_all_layers(stream, FAST)
    ref = load_model(outlier_ckpt, dtype=torch.float32)
    rtn = load_model(outlier_ckpt, dtype=torch.float32)
    fake_quantize_model(rtn, FAST)
    awq = load_model(outlier_ckpt, dtype=torch.float32)
    set_layer_weights(awq, weights)
    fake_quantize_model(awq, FAST)
    windows = tokens[8:].tolist()
    f_rtn, f_awq = fidelity(rtn, ref, windows), fidelity(awq, ref, windows)
    print(f"held-out KLD rtn {f_rtn.kld_mean:.3e} awq {f_awq.kld_mean:.3e}; ppl ref {f_rtn.ppl_reference:.3f} "
          f"rtn {f_rtn.ppl_quant:.3f} awq {f_awq.ppl_quant:.3f}; layer error rtn {f_rtn.layer_rel_error} "
          f"awq {f_awq.layer_rel_error}")
    assert f_awq.kld_mean < 0.8 * f_rtn.kld_mean
    assert abs(f_awq.ppl_quant - f_awq.ppl_reference) < abs(f_rtn.ppl_quant - f_rtn.ppl_reference)
    assert all(a < r for a, r in zip(f_awq.layer_rel_error, f_rtn.layer_rel_error))
    # the search's own losses say the same on the calibration data
    for rep in reports:
        assert rep["w13"]["loss_scaled"] < rep["w13"]["loss_rtn"]


RECIPE = """name: awq-test
family: minimax-m2
target: awq
dtype: bfloat16
quantize: [attn, expert]
keep_dtype: [router, router_bias]
options: {format: FORMAT, group_size: 128, n_samples: 4, seq_len: 64, n_grid: 5, clip_tokens: 64, min_tokens: 4}
"""


def dequantized_model(src, out, expert_dtype: torch.dtype = torch.float32):
    """The runtime model of `src` with every tensor `out` rewrote: INT4 weights unpacked and dequantized (fp32;
    experts rounded to expert_dtype), the folded norms and router gate as written."""
    t = tensors(out)
    weights = {}
    for name, v in t.items():
        if name.endswith(".qweight"):
            base = name.removesuffix(".qweight")
            q, s, z = fmt.unpack_autoawq(v, t[base + ".qzeros"], t[base + ".scales"])
        elif name.endswith(".weight_packed"):
            base = name.removesuffix(".weight_packed")
            q, s, z = fmt.unpack_compressed_tensors(v, t[base + ".weight_scale"], t.get(base + ".weight_zero_point"),
                                                    t[base + ".weight_shape"])
        elif name.startswith("model.layers.") and name.endswith((".weight", "_bias")):
            weights[name] = v.float()
            continue
        else:
            continue
        w = fmt.dequantize_groups(q, s, z)
        weights[base + ".weight"] = w.to(expert_dtype).float() if ".experts." in base else w
    model = load_model(src, dtype=torch.float32)
    set_layer_weights(model, weights)
    return model


@pytest.fixture(scope="module")
def awq_out(outlier_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("awq")
    (root / "recipe.yaml").write_text(RECIPE.replace("FORMAT", "autoawq"))
    out = root / "out"
    proc = run_cli("convert", outlier_ckpt, "--to", "awq", "--recipe", root / "recipe.yaml", "-o", out,
                   "--no-progress", "--max-shard-size", "1MB", check=True)
    assert "relative RMS" in proc.stdout
    return root


def test_autoawq_layout_and_config(outlier_ckpt, awq_out, tokens):
    out = awq_out / "out"
    t = tensors(out)
    src = CheckpointReader(outlier_ckpt)
    for n in (0, 1):
        p = f"model.layers.{n}."
        assert t[p + "self_attn.q_proj.qweight"].dtype == torch.int32 and t[p + "self_attn.q_proj.qweight"].shape == (
            256, 32)
        assert t[p + "self_attn.k_proj.qzeros"].shape == (2, 16) and t[p + "self_attn.k_proj.scales"].shape == (2, 128)
        assert t[p + "self_attn.k_proj.scales"].dtype == torch.float16
        e = p + "block_sparse_moe.experts.7."
        assert t[e + "w2.qweight"].shape == (256, 32) and t[e + "w1.scales"].shape == (2, 256)
        assert not any(k.startswith(p) and k.endswith("proj.weight") for k in t)
        assert not any(".w1.weight" in k or ".w2.weight" in k for k in t)
        assert t[p + "block_sparse_moe.gate.weight"].dtype == torch.float32
        assert t[p + "post_attention_layernorm.weight"].dtype == torch.bfloat16
        # the MoE scale is folded: the norm shrank on the outlier channels, the gate grew there to compensate
        ln = src.weight(p + "post_attention_layernorm.weight", torch.float32)
        assert (t[p + "post_attention_layernorm.weight"].float()[OUTLIERS] < ln[OUTLIERS]).all()
    assert torch.equal(t["lm_head.weight"], src.tensor("lm_head.weight"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == fmt.quantization_config_autoawq(
        ["gate", "e_score_correction_bias", "lm_head"], 128, True)
    report = json.loads((out / "quantkit-awq-report.json").read_text())
    assert set(report["layers"]) == {"0", "1"} and "fallback" in report["layers"]["0"]["w2"]
    # the written model is the one the search found: the same search in memory, fake-quantized, gives the same
    # logits up to the bf16 rounding of the folded norms
    cfg = AWQConfig(n_grid=5, clip_tokens=64, min_tokens=4)
    weights, _ = awq_all_layers(LayerStream(CheckpointReader(outlier_ckpt), tokens[:4], "cpu", torch.float32), cfg)
    mem = load_model(outlier_ckpt, dtype=torch.float32)
    set_layer_weights(mem, weights)
    fake_quantize_model(mem, cfg)
    ref = load_model(outlier_ckpt, dtype=torch.float32)
    quant = dequantized_model(outlier_ckpt, out)
    ids = tokens[8:10]
    a, b, r = (m(ids, m.new_cache(*ids.shape)) for m in (quant, mem, ref))
    print(f"written vs in-memory AWQ: {(a - b).abs().max():.2e}; INT4 vs original: {(a - r).abs().max():.2e}")
    assert (a - b).abs().max() < 0.05 * (a - r).abs().max()
    f = fidelity(quant, ref, tokens[8:].tolist())
    assert f.kld_mean < 0.01 and max(f.layer_rel_error) < 0.3


@pytest.mark.slow
def test_awq_resume_is_byte_identical(outlier_ckpt, awq_out):
    """A run killed after its first shard, resumed: layer 1's search runs on hidden states rebuilt by passing
    through layer 0 without searching it, and the bytes match the uninterrupted run."""
    args = ["convert", outlier_ckpt, "--to", "awq", "--recipe", awq_out / "recipe.yaml", "--no-progress",
            "--max-shard-size", "1MB", "-o", awq_out / "resumed"]
    crashed = run_cli(*args, env={"QUANTKIT_CRASH_AFTER_SHARDS": "2"})
    assert crashed.returncode == 137
    run_cli(*args, "--resume", check=True)
    shards = sorted((awq_out / "out").glob("*.safetensors"))
    assert len(shards) >= 3
    for f in shards:
        assert (awq_out / "resumed" / f.name).read_bytes() == f.read_bytes(), f.name


def test_compressed_tensors_output_loads_in_transformers(outlier_ckpt, tmp_path, tokens):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    recipe = RECIPE.replace("FORMAT", "compressed-tensors").replace("n_grid: 5", "n_grid: 4, clip: false")
    (tmp_path / "recipe.yaml").write_text(recipe)
    out = tmp_path / "ct"
    run_cli("convert", outlier_ckpt, "--to", "awq", "--recipe", tmp_path / "recipe.yaml", "-o", out, "--no-progress",
            check=True)
    t = tensors(out)
    name = "model.layers.0.block_sparse_moe.experts.3.w2."
    assert t[name + "weight_packed"].shape == (256, 32) and t[name + "weight_scale"].dtype == torch.bfloat16
    assert name + "weight_zero_point" not in t  # compressed-tensors' W4A16: symmetric
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    group = q["config_groups"]["group_0"]
    assert q["format"] == "pack-quantized" and group["weights"]["symmetric"] is True
    targets = " ".join(group["targets"])
    assert "w1|w2|w3" in targets and "gate_up|gate|up|down" in targets
    dst = tmp_path / "hf"
    shutil.copytree(out, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["partial_rotary_factor"] = cfg["rotary_dim"] / cfg["head_dim"]  # transformers ignores rotary_dim
    (dst / "config.json").write_text(json.dumps(cfg))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        dst, dtype=torch.float32, quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
    ids = tokens[8:10]
    with torch.no_grad():
        got = hf(ids).logits
    mine = dequantized_model(outlier_ckpt, out, torch.bfloat16)  # transformers holds the stacked experts in bf16
    ref = mine(ids, mine.new_cache(*ids.shape))
    orig = load_model(outlier_ckpt, dtype=torch.float32)
    base = orig(ids, orig.new_cache(*ids.shape))
    diff, quant_err = (got - ref).abs().max().item(), (base - ref).abs().max().item()
    print(f"transformers vs dequantized runtime: max |diff| {diff:.2e}; INT4 vs original {quant_err:.2e}")
    # transformers keeps the stacked experts in bf16 and runs them there (activations rounded too): a rounding-level
    # difference, some 60x below the INT4 error it sits on
    assert diff < 0.03 * quant_err
