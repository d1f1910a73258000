"""Needle in a haystack: prompt construction, chunked prefill, exact-match scoring on a known answer."""

from __future__ import annotations

import pytest
import torch
from quantkit.evals import needle
from quantkit.evals.report import held_out_text

from quantkit import tokenizer as tok
from quantkit.errors import QuantkitError


class ScriptedModel:
    """Stands in for the runtime: records how it is fed and answers with a fixed token sequence."""

    def __init__(self, vocab: int, script: list[int]):
        self.vocab, self.script, self.calls = vocab, list(script), []
        self.device = torch.device("cpu")

    def new_cache(self, batch: int, max_len: int):
        self.capacity = max_len
        return object()

    def __call__(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        self.calls.append(tokens.shape[1])
        logits = torch.zeros(1, tokens.shape[1], self.vocab)
        logits[0, -1, self.script.pop(0) if self.script else 0] = 1.0
        return logits


@pytest.fixture(scope="module")
def tokenizer(tiny_bf16):
    return tok.load_tokenizer(tiny_bf16)


def test_grid_is_clipped_to_the_context():
    cases = needle.needle_grid(4096)
    assert sorted({c.length for c in cases}) == [1024, 2048]
    assert len(cases) == 2 * len(needle.DEFAULT_DEPTHS)
    assert all(len(c.key) == 5 for c in cases) and cases == needle.needle_grid(4096)  # seeded
    with pytest.raises(QuantkitError, match="fits"):
        needle.needle_grid(512, lengths=(1024, 2048))
    # a context under the default grid's first length: the same shape over the model's own context
    small = sorted({c.length for c in needle.needle_grid(512)})
    assert small == [64, 125, 250, 375, 500]  # eighths of 512 - ANSWER_TOKENS, at least 64


def test_prompt_has_the_length_and_the_needle_at_its_depth(tokenizer):
    filler = tokenizer.encode(held_out_text(5, code=False), add_special_tokens=False).ids
    for depth in (0.0, 0.5, 1.0):
        case = needle.NeedleCase(1024, depth, "31337")
        ids = needle.build_prompt(tokenizer, filler, case)
        assert len(ids) == 1024
        assert tokenizer.decode(ids).endswith(needle.QUESTION)
        marker = tokenizer.encode(" The pass key is 31337", add_special_tokens=False).ids[:3]
        at = next(i for i in range(len(ids)) if ids[i:i + 3] == marker)
        assert abs(at / len(ids) - depth) < 0.05  # measured in tokens


def test_known_answer_scores_and_prefill_is_chunked(tokenizer):
    answer = tokenizer.encode(" 31337. Remember", add_special_tokens=False).ids
    model = ScriptedModel(2048, [0] * 2 + answer)  # the last of three prefill chunks gives the first answer token
    cases = [needle.NeedleCase(1024, 0.5, "31337")]
    out = needle.run_needle(model, tokenizer, cases, held_out_text(5, code=False), chunk=400)
    assert model.calls[:3] == [400, 400, 224] and set(model.calls[3:]) == {1}
    assert out[0].correct and out[0].answer.startswith(" 31337")
    wrong = ScriptedModel(2048, [0] * 2 + tokenizer.encode(" 31338", add_special_tokens=False).ids)
    assert not needle.run_needle(wrong, tokenizer, cases, held_out_text(5, code=False), chunk=400)[0].correct


def test_score():
    assert needle.score(" 48213. Remember it.", "48213")
    assert not needle.score(" 482130", "48213")
    assert not needle.score(" the key", "48213")
    assert not needle.score(" 12 then 48213", "48213")  # the first number is the answer


def test_needle_runs_on_the_runtime_through_the_cli(tiny_bf16, tmp_path):
    from conftest import run_cli

    proc = run_cli("eval", tiny_bf16, "--reference", tiny_bf16, "-o", tmp_path / "ev", "--no-fidelity", "--needle",
                   "--needle-lengths", "256,512", "--needle-depths", "0,1", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "needle: 4 cases" in proc.stdout
    assert (tmp_path / "ev" / "needle.png").stat().st_size > 1000
