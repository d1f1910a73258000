"""`convert --to bf16`, `make-checkpoint` and `inspect` end to end on tiny checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import run_cli
from safetensors import safe_open

from quantkit.checkpoint import CheckpointReader
from quantkit.checkpoint.fp8 import dequantize_block_fp8_reference
from quantkit.errors import QuantkitError
from quantkit.recipe import Recipe
from quantkit.synth import make_checkpoint


def load_all(folder) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / shard), framework="pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    assert set(out) == set(index["weight_map"])
    return out


def test_fp8_to_bf16_is_the_exact_dequantization(tiny_fp8, tmp_path):
    proc = run_cli("convert", tiny_fp8, "--to", "bf16", "-o", tmp_path / "out", "--max-shard-size", "4MB")
    assert proc.returncode == 0, proc.stderr
    assert "GB/s" in proc.stdout and "peak RSS" in proc.stdout
    src, out = load_all(tiny_fp8), load_all(tmp_path / "out")
    assert not any(k.endswith("_scale_inv") for k in out)
    n_fp8 = 0
    for name, t in out.items():
        s = src[name]
        if s.dtype == torch.float8_e4m3fn:
            n_fp8 += 1
            want = dequantize_block_fp8_reference(s, src[name + "_scale_inv"])
            assert t.dtype == torch.bfloat16 and torch.equal(t.view(torch.int16), want.view(torch.int16)), name
            # the synthetic scales have four significant bits: nothing was rounded away
            exact = dequantize_block_fp8_reference(s, src[name + "_scale_inv"], dtype=torch.float32)
            assert torch.equal(t.float(), exact)
        elif "gate.weight" in name or "e_score_correction_bias" in name:
            assert t.dtype == torch.float32 and torch.equal(t, s), name  # the router keeps its stored dtype
        else:
            assert t.dtype == torch.bfloat16 and torch.equal(t, s.to(torch.bfloat16)), name
    assert n_fp8 == 2 * (4 + 16 * 3)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == "bfloat16"
    assert cfg["rotary_dim"] == 32 and cfg["architectures"] == ["MiniMaxM2ForCausalLM"]
    for aux in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (tmp_path / "out" / aux).read_bytes() == (tiny_fp8 / aux).read_bytes()
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())
    assert len(set(index["weight_map"].values())) > 1
    manifest = json.loads((tmp_path / "out" / "quantkit-manifest.json").read_text())
    assert manifest["complete"] and set(manifest["units"]) == {"embed", "layers.0", "layers.1", "head"}
    CheckpointReader(tmp_path / "out")  # and the output is itself a valid quantkit input


def test_make_checkpoint_is_deterministic_and_seeded(tmp_path):
    make_checkpoint(tmp_path / "a", preset="tiny", dtype="fp8", seed=7, layers=1)
    make_checkpoint(tmp_path / "b", preset="tiny", dtype="fp8", seed=7, layers=1, max_shard_bytes=10**6, workers=3)
    make_checkpoint(tmp_path / "c", preset="tiny", dtype="fp8", seed=8, layers=1)
    a, b, c = load_all(tmp_path / "a"), load_all(tmp_path / "b"), load_all(tmp_path / "c")
    assert a.keys() == b.keys() == c.keys()
    name = "model.layers.0.block_sparse_moe.experts.3.w2.weight"
    # neither sharding nor the number of threads drawing ahead changes a byte
    assert all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)
    assert not torch.equal(a[name].view(torch.uint8), c[name].view(torch.uint8))
    for k, s in a.items():
        if k.endswith("_scale_inv"):
            w = a[k.removesuffix("_scale_inv")].float()
            tiles = w.view(s.shape[0], 128, s.shape[1], 128).abs().amax(dim=(1, 3))
            assert torch.all(tiles == 448), k  # each tile reaches the FP8 maximum, as amax/448 scaling does
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    assert cfg["quantization_config"]["modules_to_not_convert"] == ["gate", "e_score_correction_bias", "lm_head"]
    gen = json.loads((tmp_path / "a" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == cfg["eos_token_id"]


def test_prefetcher_order_skips_and_groups():
    """Groups come back whole and in order, however far ahead the pool ran; a group the consumer skips (a resumed
    run's finished shard) is dropped, and nothing is computed twice."""
    import threading

    from quantkit.checkpoint import OutTensor
    from quantkit.synth import Prefetcher

    order = [OutTensor(f"t{i}", "F32", (2,), "u") for i in range(10)]
    calls, lock = [], threading.Lock()

    def compute(t):
        with lock:
            calls.append(t.name)
        i = int(t.name[1:])
        return {t.name: torch.full((2,), float(i)), t.name + "_scale_inv": torch.tensor([i + 0.5])}

    with Prefetcher(compute, order, workers=3, depth=2) as ahead:
        assert ahead.take(order[0], "t0").tolist() == [0.0, 0.0]
        assert ahead.take(order[0], "t0_scale_inv").tolist() == [0.5]
        assert 0 not in ahead.ready and len(ahead.futures) <= 2
        assert ahead.take(order[6], "t6").tolist() == [6.0, 6.0]  # t1..t5 skipped
        assert all(j >= 6 for j in [*ahead.futures, *ahead.ready])
        assert ahead.take(order[6], "t6_scale_inv").tolist() == [6.5]
        for i in (7, 8, 9):
            assert ahead.take(order[i], f"t{i}").tolist() == [float(i)] * 2
    assert len(calls) == len(set(calls)) and {"t0", "t6", "t7", "t8", "t9"} <= set(calls)


def test_minimax_m2_preset_has_the_real_widths(tmp_path):
    from quantkit.synth import release_config

    raw = release_config("minimax-m2", 2, fp8=True, special_ids={"bos_token_id": 1, "eos_token_id": 2})
    assert (raw["hidden_size"], raw["intermediate_size"], raw["num_local_experts"], raw["num_experts_per_tok"]) == (
        3072, 1536, 256, 8)
    assert (raw["num_attention_heads"], raw["num_key_value_heads"], raw["head_dim"], raw["vocab_size"]) == (
        48, 8, 128, 200064)
    assert raw["num_hidden_layers"] == 2 and raw["rotary_dim"] == 64


def test_minimax_m2_preset_routes_like_a_balanced_router():
    """The real-width preset's gate and correction bias, drawn as make_checkpoint draws them, against normalized
    rows: 128 tokens reach most of the 256 experts (a bias of the tiny preset's std would hold them to a few dozen),
    and the bias still changes which experts are picked."""
    from quantkit.synth import PRESET_INIT, PRESETS, Init

    p = PRESETS["minimax-m2"]
    h, e, k = p["hidden_size"], p["num_local_experts"], p["num_experts_per_tok"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, h, generator=g)
    scores = torch.sigmoid(x @ (PRESET_INIT["minimax-m2"].std * torch.randn(e, h, generator=g)).t())
    noise = torch.randn(e, generator=g)

    def experts(bias_std: float, rows: int = 128) -> torch.Tensor:
        return (scores[:rows] + bias_std * noise).topk(k, dim=-1).indices

    assert experts(PRESET_INIT["minimax-m2"].bias_std).unique().numel() >= 180
    assert experts(PRESET_INIT["minimax-m2"].bias_std, 32).unique().numel() >= 110
    assert experts(Init().bias_std).unique().numel() <= 64
    assert not torch.equal(experts(PRESET_INIT["minimax-m2"].bias_std), experts(0.0))


def test_inspect_json(tiny_fp8):
    proc = run_cli("inspect", tiny_fp8, "--json")
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["architecture"]["quantization"] == "block-fp8"
    assert d["parameters"]["total"] == 7_743_520
    expert = 3 * 256 * 256
    assert d["parameters"]["total"] - d["parameters"]["active_per_token"] == 2 * (16 - 4) * expert
    assert set(d["bytes"]["by_dtype"]) == {"BF16", "F32", "F8_E4M3"}
    assert d["bytes"]["by_dtype"]["F8_E4M3"] == 2 * (16 * expert + 256 * 256 * 2 + 128 * 256 * 2)
    est = d["estimated_output_bytes"]
    assert est["gguf-q4_k"] < est["awq-w4a16-g128"] < est["fp8-block"] < est["bf16"]
    assert [1, 1] in d["parallel"]["fp8-block"]["valid_tp_ep"]
    text = run_cli("inspect", tiny_fp8).stdout
    assert "active per token" in text and "valid (tp, ep)" in text


def test_recipes_validate(tmp_path):
    assert Recipe.load("bf16").keep_dtype == ("router", "router_bias")
    bad = tmp_path / "r.yaml"
    bad.write_text("name: x\nfamily: minimax-m2\ntarget: bf16\nkeep_dtype: [routers]\n")
    with pytest.raises(QuantkitError, match="unknown tensor kinds"):
        Recipe.load(bad)
    bad.write_text("name: x\nfamily: minimax-m2\ntarget: bf16\ncolour: red\n")
    with pytest.raises(QuantkitError, match="unknown recipe keys"):
        Recipe.load(bad)
    with pytest.raises(QuantkitError, match="no built-in recipe"):
        Recipe.load("int3")


def test_quantkit_puts_large_cpu_tensors_on_huge_pages_unless_told_not_to():
    """Importing quantkit before torch asks torch's CPU allocator for transparent huge pages (THP_MEM_ALLOC_ENABLE,
    read once as torch loads); a value already in the environment is kept."""
    code = "import os, quantkit, torch; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "THP_MEM_ALLOC_ENABLE": "0"}, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "0"
