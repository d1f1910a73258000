"""The FP8 runtime backend: W8A8 through the kernels' references on the CPU (and the kernels on a GPU) against the
dequantized dense path, within FP8 tolerance."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli

from quantkit.convert import convert
from quantkit.errors import QuantkitError
from quantkit.runtime import generate, load_model


def logits(model, ids):
    return model(ids.to(model.device), model.new_cache(ids.shape[0], ids.shape[1])).float().cpu()


@pytest.fixture(scope="module")
def tiny_channel(tiny_bf16, tmp_path_factory):
    out = tmp_path_factory.mktemp("rt8") / "channel"
    convert(tiny_bf16, out, target="fp8", scheme="channel", progress=False)
    return out


@pytest.mark.parametrize("ckpt", ["tiny_fp8", "tiny_channel"])
def test_fp8_backend_matches_dense_within_fp8_tolerance(ckpt, request):
    folder = request.getfixturevalue(ckpt)
    ids = torch.randint(0, 2000, (2, 20), generator=torch.Generator().manual_seed(3))
    dense = logits(load_model(folder, dtype=torch.float32, backend="dense"), ids)
    model = load_model(folder, dtype=torch.float32, backend="auto")
    assert type(model.layers[0].moe.experts).__name__ == "Fp8Experts"
    w8a8 = logits(model, ids)
    rel = ((w8a8 - dense).norm() / dense.norm()).item()
    assert 0 < rel < 0.05  # activations now go through FP8 too: close, not equal
    # random weights give flat next-token distributions, so near-ties flip easily; most still agree
    top1 = (w8a8.argmax(-1) == dense.argmax(-1)).float().mean().item()
    assert top1 > 0.7


def test_fp8_backend_needs_an_fp8_checkpoint(tiny_bf16):
    with pytest.raises(QuantkitError, match="needs an FP8 checkpoint"):
        load_model(tiny_bf16, backend="fp8")


def test_fp8_generation_on_cpu(tiny_fp8):
    model = load_model(tiny_fp8, dtype=torch.bfloat16, backend="fp8")
    out = generate(model, [[5, 6, 7], [8, 9]], max_new_tokens=4)
    assert [len(o) for o in out] == [4, 4]
    proc = run_cli("generate", tiny_fp8, "--prompt", "Hi", "--backend", "fp8", "--max-new-tokens", "3", "--device",
                   "cpu")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("ckpt", ["tiny_fp8", "tiny_channel"])
def test_fp8_backend_on_gpu_matches_cpu_reference(ckpt, request):
    folder = request.getfixturevalue(ckpt)
    ids = torch.randint(0, 2000, (2, 20), generator=torch.Generator().manual_seed(4))
    cpu = logits(load_model(folder, dtype=torch.float32, backend="fp8"), ids)
    gpu = logits(load_model(folder, dtype=torch.float32, backend="fp8", device="cuda"), ids)
    # the tensor cores accumulate FP8 products in reduced precision, and each layer re-quantizes its activations,
    # so roundings that flip compound over the layers: measured 1.2% on an H200 for the channel model
    assert ((gpu - cpu).norm() / cpu.norm()).item() < 3e-2


def test_a_norm_quantized_input_gives_the_same_bits(tiny_fp8):
    """An Fp8Linear fed a tensor carrying its quantization (model.FP8_INPUT, as the fused norm makes it on a GPU)
    computes what it computes from the tensor alone; a quantization of other rows is not taken."""
    from quantkit.kernels.fp8_gemm import per_token_group_quant_fp8_ref

    from quantkit.runtime.model import FP8_INPUT, fp8_input

    model = load_model(tiny_fp8, dtype=torch.bfloat16, backend="fp8")
    lin = model.layers[0].self_attn.q_proj
    assert lin.act_group == 128 and model.layers[0].moe.experts.act_group == 128
    x = torch.randn(2, 3, lin.in_features, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    plain = lin(x)
    carried = x.clone()
    setattr(carried, FP8_INPUT, per_token_group_quant_fp8_ref(x.reshape(6, -1), 128))
    assert fp8_input(carried, 128) is not None
    assert torch.equal(lin(carried), plain)
    other = x.clone()
    setattr(other, FP8_INPUT, per_token_group_quant_fp8_ref(x.reshape(6, -1)[:3], 128))  # 3 rows, not 6
    assert fp8_input(other, 128) is None and torch.equal(lin(other), plain)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_norms_quantizing_for_the_fp8_gemms_change_no_bit_on_gpu(tiny_fp8, monkeypatch):
    """On a GPU the RMSNorms before the q/k/v projection and the experts quantize their outputs in their own launch;
    the logits are those of quantizing in the consumers."""
    from quantkit.runtime import model as M

    ids = torch.randint(0, 2000, (2, 20), generator=torch.Generator().manual_seed(6))
    model = load_model(tiny_fp8, dtype=torch.bfloat16, backend="fp8", device="cuda")
    assert M.act_group(model.layers[0].self_attn.qkv_proj) == 128
    fused = logits(model, ids)
    monkeypatch.setattr(M, "act_group", lambda consumer: 0)
    assert torch.equal(logits(model, ids), fused)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("ckpt,backend", [("tiny_fp8", "fp8"), ("tiny_bf16", "dense")])
def test_norm_in_router_on_gpu(ckpt, backend, request, monkeypatch):
    """With NORM_IN_ROUTER a single-token step's post-attention add + RMSNorm and its routing run as one launch a layer
    (fused_ops.add_rms_norm_router; with the FP8 groups the experts take on the fp8 backend): that step's logits are
    those of the norm's and the router's own launches, to a bf16 ulp of the norm where its sum runs in another
    order; prefill steps keep the separate launches."""
    from quantkit.kernels import fused_ops

    from quantkit.runtime import model as M

    ids = torch.randint(0, 2000, (1, 12), generator=torch.Generator().manual_seed(7))
    model = load_model(request.getfixturevalue(ckpt), dtype=torch.bfloat16, backend=backend, device="cuda")

    def step() -> torch.Tensor:
        cache = model.new_cache(1, ids.shape[1])
        model(ids[:, :-1].cuda(), cache)
        return model(ids[:, -1:].cuda(), cache).float().cpu()

    monkeypatch.setattr(M, "NORM_IN_ROUTER", True)  # (QUANTKIT_NORM_IN_ROUTER=1)
    calls = []
    fused_call = fused_ops.add_rms_norm_router
    monkeypatch.setattr(fused_ops, "add_rms_norm_router", lambda *a: calls.append(a[0].shape) or fused_call(*a))
    fused = step()
    assert len(calls) == model.cfg.num_hidden_layers and all(s[:-1] == (1, 1) for s in calls)
    monkeypatch.setattr(M, "NORM_IN_ROUTER", False)
    plain = step()
    assert len(calls) == model.cfg.num_hidden_layers
    assert torch.equal(fused.argmax(-1), plain.argmax(-1))
    assert float((fused - plain).norm() / plain.norm()) < 1e-2
