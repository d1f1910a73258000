"""The lm-eval adapter: its loglikelihoods are the runtime's own, and the shipped tasks run offline."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_one_line_error, run_cli

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from quantkit.evals.lm_eval_adapter import QuantkitLM  # noqa: E402


def test_loglikelihoods_equal_the_runtime(tiny_bf16):
    lm = QuantkitLM(str(tiny_bf16), device="cpu", dtype="float32")
    pairs = [("The capital of France is", " Paris"), ("def f(x):", "\n    return x + 1")]
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    model = lm.model
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        # lm-eval's split: the context encoded alone, the continuation as the rest of the encoded whole
        ctx_ids = lm.tok_encode(ctx)
        n_ctx = len(ctx_ids)
        whole = ctx_ids + lm.tok_encode(ctx + cont)[n_ctx:]
        ids = torch.tensor([whole])
        logp = torch.log_softmax(model(ids, model.new_cache(1, len(whole))).float()[0], -1)
        want = sum(float(logp[i - 1, whole[i]]) for i in range(n_ctx, len(whole)))
        assert ll == pytest.approx(want, abs=1e-4)
        assert greedy == all(int(logp[i - 1].argmax()) == whole[i] for i in range(n_ctx, len(whole)))
    # rolling loglikelihood of a short document: the sum over its tokens after the prefix token
    doc = "A short document about quantization."
    (rolled,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (doc,), 0)])
    ids = [lm.prefix_token_id] + lm.tok_encode(doc)
    logp = torch.log_softmax(model(torch.tensor([ids[:-1]]), model.new_cache(1, len(ids) - 1)).float()[0], -1)
    assert rolled == pytest.approx(sum(float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1)), abs=1e-4)


def test_generate_until_stops_at_the_stop_string(tiny_bf16):
    lm = QuantkitLM(str(tiny_bf16), device="cpu", dtype="float32")
    free = lm.generate_until([Instance("generate_until", {}, ("Q: hi\nA:", {"max_gen_toks": 12}), 0)])[0]
    assert free
    stop = free[2:4]
    cut = lm.generate_until([Instance("generate_until", {}, ("Q: hi\nA:", {"until": [stop], "max_gen_toks": 12}),
                                      0)])[0]
    assert cut == free[: free.index(stop)]


def test_shipped_tasks_run_offline_through_the_cli(tiny_fp8, tmp_path):
    proc = run_cli("eval", tiny_fp8, "--reference", tiny_fp8, "-o", tmp_path / "ev", "--no-fidelity", "--tasks",
                   "quantkit_mc,quantkit_gen,quantkit_ppl", "--limit", "4", "--device", "cpu",
                   env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "ev" / "results.json").read_text())["lm_eval"]["results"]
    assert set(res) == {"quantkit_mc", "quantkit_gen", "quantkit_ppl"}
    assert 0 <= res["quantkit_mc"]["acc,none"] <= 1
    assert res["quantkit_ppl"]["byte_perplexity,none"] > 1
    assert "| quantkit_mc | acc |" in (tmp_path / "ev" / "report.md").read_text()


def test_unknown_task_is_one_line(tiny_bf16, tmp_path):
    proc = run_cli("eval", tiny_bf16, "--reference", tiny_bf16, "-o", tmp_path / "ev", "--no-fidelity", "--tasks",
                   "no_such_task", "--device", "cpu")
    assert_one_line_error(proc, "no_such_task")


def test_a_gguf_file_brings_its_own_tokenizer(tiny_bf16, tmp_path):
    from quantkit.evals.lm_eval_adapter import QuantkitLM

    from quantkit import tokenizer as tok
    from quantkit.gguf_convert import convert_gguf

    convert_gguf(tiny_bf16, tmp_path / "gguf", qtype="q8_0", progress=False)
    lm = QuantkitLM(str(tmp_path / "gguf"), device="cpu")
    text = "def f(x):\n    return x + 1  # the pass key is 31415"
    assert lm.tok.encode(text, add_special_tokens=False).ids == \
        tok.load_tokenizer(tiny_bf16).encode(text, add_special_tokens=False).ids
