"""`quantkit eval` fidelity: exact zero against itself, a corrupted quant caught at the right layer, mismatched
references refused."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_one_line_error, edited_copy, run_cli
from quantkit.evals.fidelity import fidelity, token_windows

from quantkit.errors import QuantkitError
from quantkit.runtime import load_model
from quantkit.synth import make_checkpoint

WINDOWS = [list(range(i, i + 32)) for i in range(100, 400, 50)]  # 6 windows of 32 token ids


def test_a_model_against_itself_is_exact(tiny_bf16):
    model = load_model(tiny_bf16, dtype=torch.float32)
    r = fidelity(model, model, WINDOWS, batch=4)
    assert r.tokens == 6 * 31
    assert r.kld_mean == 0 and r.kld_max == 0 and r.top1_agreement == 1.0
    assert r.ppl_quant == r.ppl_reference and r.ppl_reference > 1
    assert r.layer_rel_error == [0.0, 0.0]


def test_a_zeroed_tensor_is_caught_where_it_enters(tiny_bf16, tmp_path):
    bad = edited_copy(tiny_bf16, tmp_path / "bad", "model.layers.1.self_attn.o_proj.weight", torch.Tensor.zero_)
    ref = load_model(tiny_bf16, dtype=torch.float32)
    r = fidelity(load_model(bad, dtype=torch.float32), ref, WINDOWS)
    assert r.layer_rel_error[0] == 0.0 and r.layer_rel_error[1] > 0.01  # enters at layer 1, not before
    assert r.kld_mean > 1e-4 and r.top1_agreement < 1.0


def test_fp8_against_bf16_is_close_not_equal(tiny_fp8, tmp_path):
    proc = run_cli("convert", tiny_fp8, "--to", "bf16", "-o", tmp_path / "bf16", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("eval", tiny_fp8, "--reference", tmp_path / "bf16", "-o", tmp_path / "ev", "--window", "64",
                   "--max-windows", "4", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "ev" / "results.json").read_text())["fidelity"]
    assert res["tokens"] == 4 * 63
    assert 0 < res["kld_mean"] < 0.01  # W8A8 activations: small, nonzero
    assert res["top1_agreement"] > 0.7
    assert (tmp_path / "ev" / "layer_error.png").stat().st_size > 1000
    assert "mean KLD" in (tmp_path / "ev" / "report.md").read_text()


def test_reference_of_another_architecture_is_refused(tiny_bf16, tmp_path):
    make_checkpoint(tmp_path / "one-layer", preset="tiny", layers=1)
    proc = run_cli("eval", tiny_bf16, "--reference", tmp_path / "one-layer", "-o", tmp_path / "ev", "--device", "cpu")
    assert_one_line_error(proc, "num_hidden_layers")


def test_windows():
    assert token_windows(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(QuantkitError, match="fewer than one window"):
        token_windows([1, 2], 4)


def test_comparison_table(tiny_fp8, tmp_path):
    from quantkit.evals.compare import compare

    from quantkit.convert import convert

    convert(tiny_fp8, tmp_path / "bf16", target="bf16", progress=False)
    rows = compare(tmp_path / "bf16", {"fp8-block": tiny_fp8}, tmp_path / "cmp", window=64, max_windows=2,
                   needle_lengths=(256,), needle_depths=(0.5,))
    ref, q = rows
    assert ref["kld_mean"] == 0 and ref["top1"] == 1 and ref["bits_per_weight"] == 16
    assert 8 < q["bits_per_weight"] < 8.01  # one byte per weight plus one fp32 scale per 128 x 128 tile
    assert q["kld_mean"] > 0 and q["bytes"] < ref["bytes"] and q["tokens_per_s"] > 0
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| fp8-block |" in table and (tmp_path / "cmp" / "comparison.png").stat().st_size > 1000
    # the same rows, in the same order, when the checkpoints are evaluated in two processes at once
    lines = []
    again = compare(tmp_path / "bf16", {"fp8-block": tiny_fp8}, tmp_path / "cmp2", window=64, max_windows=2,
                    needle_lengths=(256,), needle_depths=(0.5,), jobs=2, log=lines.append)
    assert [r["format"] for r in again] == ["bf16 (reference)", "fp8-block"] and len(lines) == 2
    for a, b in zip(rows, again):
        for key in ("bytes", "bits_per_weight", "needle"):
            assert a[key] == b[key]
        for key in ("kld_mean", "kld_p99", "top1", "perplexity"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7)
