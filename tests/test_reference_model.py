"""The trained reference model in evals/assets/reference: what its metrics claim, checked on this machine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from quantkit.evals import needle
from quantkit.evals.fidelity import token_windows
from quantkit.evals.report import held_out_text

from quantkit import tokenizer as tok
from quantkit.arch import MiniMaxM2Config
from quantkit.checkpoint import CheckpointReader
from quantkit.runtime import load_model

REF = Path(__file__).resolve().parents[1] / "evals" / "assets" / "reference"


def test_reference_is_minimax_m2_at_multiples_of_256_under_20_mib():
    cfg = MiniMaxM2Config.from_folder(REF)
    for dim in (cfg.hidden_size, cfg.intermediate_size, cfg.q_width, cfg.kv_width, cfg.vocab_size):
        assert dim % 256 == 0  # every row a whole number of GGUF super-blocks, AWQ groups and FP8 tiles
    reader = CheckpointReader(REF)
    weights = sum(reader.entry(s.name).nbytes for s in reader.specs())
    assert weights <= 20 * 2**20
    assert reader.entry("model.layers.0.block_sparse_moe.gate.weight").torch_dtype == torch.float32


def test_recorded_metrics_meet_the_bar():
    m = json.loads((REF / "metrics.json").read_text())
    assert m["passkey_accuracy"] >= 0.9 and m["passkey_cases"] >= 100
    assert m["heldout_perplexity"] < m["vocab_size"] / 100
    assert m["experts_unused"] == 0
    shares = torch.tensor(m["expert_share_per_layer"])
    assert (shares > 0).all() and (shares.max(-1).values > 1.5 * shares.min(-1).values).all()  # uneven, all used


def test_it_retrieves_pass_keys_and_predicts_held_out_python_here():
    tokenizer = tok.load_tokenizer(REF)
    model = load_model(REF, dtype=torch.float32)
    cases = needle.needle_grid(model.cfg.max_position_embeddings, depths=(0.0, 0.5, 1.0))[::2]
    score = needle.summary(needle.run_needle(model, tokenizer, cases))["score"]
    assert score >= 0.8, score
    windows = token_windows(tokenizer.encode(held_out_text(), add_special_tokens=False).ids, 256, 2)
    with torch.no_grad():
        t = torch.tensor(windows)
        logits = model(t[:, :-1], model.new_cache(len(windows), t.shape[1]))
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), t[:, 1:].flatten())
    assert math.exp(nll) < 100  # vocabulary 4096: a random model scores thousands
