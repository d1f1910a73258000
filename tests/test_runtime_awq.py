"""The AWQ (W4A16) runtime backend on INT4 checkpoints of the tiny model, in both on-disk layouts.

The checkpoints are made here with quantkit.formats.awq (round to nearest, no calibration), named as the AWQ
conversion writes them (`...q_proj.qweight`, `...experts.E.w1.qweight`; `weight_packed` etc. for compressed-tensors),
beside a dense BF16 checkpoint holding their dequantized weights. On the CPU the backend must equal that dense model
bit for bit; on a GPU the kernels must agree with it to rounding.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # quantkit.runtime.awq imports the kernels, hence triton: in the mode the kernel tests need
    # (tests/test_kernels_fp8.py), whichever test module is collected first
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conftest import assert_one_line_error, run_cli  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from quantkit.checkpoint import CheckpointReader  # noqa: E402
from quantkit.errors import QuantkitError  # noqa: E402
from quantkit.formats.awq import (  # noqa: E402
    dequantize_groups,
    packed_tensors,
    quantization_config_autoawq,
    quantization_config_compressed_tensors,
    quantize_groups,
)
from quantkit.runtime import generate, load_model  # noqa: E402
from quantkit.runtime.awq import AwqExperts, AwqLinear  # noqa: E402


def write_int4(src: Path, out: Path, dense_out: Path, layout: str, attention: bool = True) -> None:
    """src's linears quantized to INT4 groups of 128 in `layout` (out), and the same weights dequantized (dense_out)."""
    reader = CheckpointReader(src)
    packed: dict[str, torch.Tensor] = {}
    dense: dict[str, torch.Tensor] = {}
    ignore = ["lm_head"]
    for name in reader.entries:
        w = reader.tensor(name)
        is_attn = ".self_attn." in name and name.endswith("_proj.weight")
        is_expert = ".experts." in name and name.endswith(".weight")
        if not (is_expert or (is_attn and attention)):
            packed[name] = dense[name] = w
            if name.endswith("gate.weight") or is_attn:
                ignore.append(name[: -len(".weight")])
            continue
        asym = layout == "autoawq"  # AutoAWQ asymmetric with fp16 scales; compressed-tensors W4A16 symmetric, bf16
        q, s, z = quantize_groups(w, zero_point=asym, scale_dtype=torch.float16 if asym else torch.bfloat16, name=name)
        packed.update(packed_tensors(name[: -len("weight")], q, s, z, layout, symmetric=not asym))
        dense[name] = dequantize_groups(q, s, z, dtype=torch.bfloat16)
    reader.close()
    for folder, tensors in ((out, packed), (dense_out, dense)):
        shutil.copytree(src, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = (quantization_config_autoawq(ignore) if layout == "autoawq"
                                  else quantization_config_compressed_tensors(ignore, attention=attention))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))


@pytest.fixture(scope="module")
def int4(tiny_bf16, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("awq")
    made = {}
    for key, layout, attention in (("autoawq", "autoawq", True), ("ct", "compressed-tensors", True),
                                   ("ct-attn-bf16", "compressed-tensors", False)):
        made[key] = (root / key, root / f"{key}-dense")
        write_int4(tiny_bf16, *made[key], layout, attention)
    return made


def logits(model, ids):
    return model(ids.to(model.device), model.new_cache(ids.shape[0], ids.shape[1])).float().cpu()


IDS = torch.randint(0, 2000, (2, 24), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("key", ["autoawq", "ct", "ct-attn-bf16"])
def test_awq_backend_equals_dense_model_of_dequantized_weights(int4, key):
    folder, dense_folder = int4[key]
    model = load_model(folder, dtype=torch.bfloat16, backend="auto")  # auto picks awq for INT4 checkpoints
    att = model.layers[1].self_attn
    assert isinstance(model.layers[0].moe.experts, AwqExperts)
    assert isinstance(att.q_proj, AwqLinear) == (key != "ct-attn-bf16")
    assert att.o_proj.__class__.__name__ == ("AwqLinear" if key != "ct-attn-bf16" else "Linear")
    if key == "autoawq":
        assert model.layers[0].moe.experts.w13_scales.dtype == torch.float16
        # experts repacked at load to the K-major layout of kernels/w4a16_moe.py: [E, 2I, H/8], zeros uint8
        assert model.layers[0].moe.experts.w13_qweight.shape == (16, 2 * 256, 256 // 8)
        assert model.layers[0].moe.experts.w2_zeros.shape == (16, 256, 256 // 128)
    else:
        assert model.layers[0].moe.experts.w13_scales.dtype == torch.bfloat16  # kept as stored: no rounding
    got = logits(model, IDS)
    want = logits(load_model(dense_folder, dtype=torch.bfloat16), IDS)
    assert torch.equal(got, want)
    # the dense backend reads the same checkpoint by dequantizing on load: the same model again
    assert torch.equal(logits(load_model(folder, dtype=torch.bfloat16, backend="dense"), IDS), want)


def test_int4_model_is_close_to_the_bf16_one(int4, tiny_bf16):
    """RTN INT4 with groups of 128 moves the tiny model's logits by about a fifth (0.21 measured: random Gaussian
    weights are the worst case for 4 bits), while a scrambled weight layout gives about sqrt(2)."""
    bf16 = logits(load_model(tiny_bf16, dtype=torch.float32), IDS)
    q = logits(load_model(int4["autoawq"][0], dtype=torch.float32), IDS)
    rel = ((q - bf16).norm() / bf16.norm()).item()
    assert 0 < rel < 0.35


def test_generation_and_cli(int4):
    folder = int4["autoawq"][0]
    model = load_model(folder, dtype=torch.bfloat16, backend="awq")
    out = generate(model, [[5, 6, 7], [8, 9]], max_new_tokens=3)
    assert [len(o) for o in out] == [3, 3]
    proc = run_cli("generate", folder, "--prompt", "Hi", "--backend", "awq", "--max-new-tokens", "2", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr


def test_awq_backend_needs_an_int4_checkpoint(tiny_bf16):
    with pytest.raises(QuantkitError, match="awq backend needs an AWQ checkpoint"):
        load_model(tiny_bf16, backend="awq")
    proc = run_cli("generate", tiny_bf16, "--prompt", "Hi", "--backend", "awq", "--device", "cpu")
    assert_one_line_error(proc, "awq backend needs an AWQ checkpoint")


def _rewrite(folder: Path, dest: Path, edit) -> Path:
    shutil.copytree(folder, dest)
    path = dest / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        data = {k: f.get_tensor(k) for k in f.keys()}
    edit(data)
    save_file(data, str(path), metadata={"format": "pt"})
    return dest


def test_missing_or_misshapen_packed_tensors_are_refused(int4, tmp_path):
    folder = int4["autoawq"][0]
    name = "model.layers.1.block_sparse_moe.experts.3.w2.qzeros"
    bad = _rewrite(folder, tmp_path / "missing", lambda d: d.pop(name))
    proc = run_cli("generate", bad, "--prompt", "Hi", "--device", "cpu")
    assert_one_line_error(proc, name, "missing")
    name = "model.layers.0.self_attn.k_proj.scales"
    bad = _rewrite(folder, tmp_path / "shape", lambda d: d.__setitem__(name, d[name][:, :64].contiguous()))
    with pytest.raises(QuantkitError, match=r"k_proj\.scales.*has shape \[2, 64\], expected \[2, 128\]"):
        load_model(bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("key", ["autoawq", "ct"])
def test_awq_kernels_on_gpu_match_the_cpu_model(int4, key):
    folder = int4[key][0]
    cpu = logits(load_model(folder, dtype=torch.bfloat16, backend="awq"), IDS)
    gpu = logits(load_model(folder, dtype=torch.bfloat16, backend="awq", device="cuda"), IDS)
    # bf16 activations, fp32 accumulation in another order: last-place differences compound over two layers
    assert ((gpu - cpu).norm() / cpu.norm()).item() < 2e-2
