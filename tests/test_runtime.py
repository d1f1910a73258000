"""The reference runtime against transformers' MiniMaxM2ForCausalLM, and its cache, batching and sampling."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli

from quantkit.convert import convert
from quantkit.runtime import Sampling, generate, load_model
from quantkit.runtime.generate import sample

transformers = pytest.importorskip("transformers")


def hf_model(folder, tmp_path):
    """transformers reads partial_rotary_factor, not the release's rotary_dim: hand it both."""
    dst = tmp_path / "hf"
    shutil.copytree(folder, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["partial_rotary_factor"] = cfg["rotary_dim"] / cfg["head_dim"]
    (dst / "config.json").write_text(json.dumps(cfg))
    model = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32)
    assert type(model).__name__ == "MiniMaxM2ForCausalLM"
    return model.eval()


def random_ids(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_logits_match_transformers_bf16_checkpoint(tiny_bf16, tmp_path):
    ref_model = hf_model(tiny_bf16, tmp_path)
    ours = load_model(tiny_bf16, dtype=torch.float32)
    ids = random_ids(2, 40, ours.cfg.vocab_size)
    with torch.no_grad():
        ref = ref_model(ids).logits
    out = ours(ids, ours.new_cache(2, 64))
    assert ref.abs().max() > 0.1  # a real signal, not all zeros
    assert (out - ref).abs().max().item() <= 1e-4


def test_logits_match_transformers_fp8_checkpoint(tiny_fp8, tmp_path):
    """transformers reads the checkpoint dequantized by `convert --to bf16`; quantkit reads the FP8 directly."""
    convert(tiny_fp8, tmp_path / "bf16", target="bf16", progress=False)
    ref_model = hf_model(tmp_path / "bf16", tmp_path)
    ours = load_model(tiny_fp8, dtype=torch.float32)
    ids = random_ids(2, 33, ours.cfg.vocab_size, seed=1)
    with torch.no_grad():
        ref = ref_model(ids).logits
    out = ours(ids, ours.new_cache(2, 33))
    assert (out - ref).abs().max().item() <= 1e-4


def test_router_bias_changes_the_choice_but_not_the_weights(tiny_bf16):
    model = load_model(tiny_bf16, dtype=torch.float32)
    moe = model.layers[0].moe
    h = torch.randn(64, model.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    idx, w = moe.route(h)
    assert torch.allclose(w.sum(-1), torch.ones(64))
    scores = torch.sigmoid(h @ moe.gate.t())
    assert torch.allclose(w, scores.gather(-1, idx) / scores.gather(-1, idx).sum(-1, keepdim=True))
    unbiased = torch.topk(scores, model.cfg.num_experts_per_tok, dim=-1).indices
    assert not torch.equal(idx.sort(-1).values, unbiased.sort(-1).values)  # bias of std 0.5 must matter


def test_incremental_decode_equals_full_forward(tiny_bf16):
    model = load_model(tiny_bf16, dtype=torch.float32)
    ids = random_ids(1, 20, model.cfg.vocab_size, seed=2)
    full = model(ids, model.new_cache(1, 20))
    cache = model.new_cache(1, 20)
    parts = [model(ids[:, :12], cache)] + [model(ids[:, t:t + 1], cache) for t in range(12, 20)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_residual_add_in_the_next_norm_changes_no_bit(tiny_bf16, dtype):
    """Each layer's last residual add is left to the next layer's input norm (and the last to the final norm);
    asking for every layer's output makes them plain adds again: the same logits bit for bit."""
    model = load_model(tiny_bf16, dtype=dtype)
    ids = random_ids(2, 9, model.cfg.vocab_size, seed=5)
    deferred = model(ids, model.new_cache(2, 9))
    hidden = []
    plain = model(ids, model.new_cache(2, 9), hidden=hidden)
    assert len(hidden) == model.cfg.num_hidden_layers and torch.equal(deferred, plain)


def test_left_padded_batch_equals_single_runs(tiny_bf16):
    model = load_model(tiny_bf16, dtype=torch.float32)
    prompts = [random_ids(1, n, model.cfg.vocab_size, seed=n)[0].tolist() for n in (5, 17, 11)]
    batched = generate(model, prompts, max_new_tokens=6)
    singles = [generate(model, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == singles


def test_generate_stops_at_stop_token(tiny_bf16):
    model = load_model(tiny_bf16, dtype=torch.float32)
    prompt = random_ids(1, 7, model.cfg.vocab_size, seed=9)[0].tolist()
    free = generate(model, [prompt], max_new_tokens=8)[0]
    stopped = generate(model, [prompt], max_new_tokens=8, stop_ids=(free[2],))[0]
    assert stopped == free[: free.index(free[2]) + 1]


def test_sampling_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = lambda s: {int(sample(logits, s, gen)) for _ in range(300)}  # noqa: E731
    assert draws(Sampling(temperature=1.0, top_k=1)) == {0}
    assert draws(Sampling(temperature=1.0, top_p=0.5)) == {0}
    assert draws(Sampling(temperature=1.0, top_p=0.75)) == {0, 1}
    assert draws(Sampling(temperature=1.0, top_k=3)) == {0, 1, 2}
    assert draws(Sampling(temperature=1.0)) == {0, 1, 2, 3}
    assert int(sample(logits, Sampling(temperature=0))) == 0


def test_generate_cli_on_fp8_checkpoint(tiny_fp8):
    proc = run_cli("generate", tiny_fp8, "--prompt", "Hello", "--prompt", "def f(x):", "--chat",
                   "--max-new-tokens", "5", "--temperature", "0.8", "--top-p", "0.95", "--top-k", "40")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("--- ") == 2
    assert "tokens/s" in proc.stderr


def test_attn_bias_is_the_mask_sdpa_would_make():
    """The additive mask made once per step gives what the boolean mask gives, causal and padded rows alike."""
    from quantkit.runtime.model import attn_bias

    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 4, 3, 16, generator=g).to(torch.bfloat16) for _ in range(3))
    k, v = (torch.randn(2, 4, 6, 16, generator=g).to(torch.bfloat16) for _ in range(2))
    cols = torch.arange(6)
    pos = torch.tensor([[3, 4, 5], [0, 1, 2]])
    mask = (cols[None, None, :] <= pos[:, :, None])[:, None]  # [2, 1, 3, 6]
    bias = attn_bias(mask, torch.bfloat16)
    assert bias.dtype == torch.bfloat16 and bool((bias == 0).eq(mask).all()) and bool(bias[~mask].isinf().all())
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(F.scaled_dot_product_attention(q, k, v, attn_mask=bias), want)
