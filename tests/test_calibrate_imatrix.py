"""Calibration statistics become llama.cpp's imatrix: per expert, under the GGUF names, the same either way in."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from quantkit.calibrate.data import calibration_tokens
from quantkit.calibrate.engine import calibrate
from quantkit.calibrate.imatrix import stats_to_imatrix
from quantkit.errors import QuantkitError
from quantkit.formats.imatrix import ImatrixData
from quantkit.gguf_convert import convert_gguf


@pytest.fixture(scope="module")
def stats_file(tiny_bf16, tmp_path_factory):
    ids = calibration_tokens(tiny_bf16, None, n_samples=4, seq_len=48)
    stats = calibrate(tiny_bf16, ids, device="cpu", min_tokens=0, progress=False)
    path = tmp_path_factory.mktemp("calib") / "stats.safetensors"
    stats.save(path)
    return stats, path


def tensors(folder):
    (path,) = folder.glob("*.gguf")
    return {t.name: np.array(t.data) for t in GGUFReader(path).tensors}


def test_imatrix_holds_the_statistics_per_expert_under_gguf_names(stats_file, tmp_path):
    stats, _ = stats_file
    im = stats_to_imatrix(stats)
    w13 = stats.get(1, "w13")
    for name in ("blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight"):
        got = im.get(name)  # [E, H]: mean x^2 of the tokens routed to each expert
        want = w13.sum_sq / w13.count.clamp(min=1)[:, None]
        routed = w13.count > 0
        torch.testing.assert_close(got[routed].double(), want[routed], rtol=1e-5, atol=0)
    q = stats.get(0, "qkv")
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight"):
        torch.testing.assert_close(im.get(name).reshape(-1).double(), (q.sum_sq / q.count)[0], rtol=1e-5, atol=0)
    assert im.get("blk.0.ffn_down_exps.weight").shape[-1] == stats.get(0, "w2").sum_sq.shape[-1]
    # the llama.cpp file round-trips
    again = ImatrixData.load(im.save(tmp_path / "imatrix.gguf"))
    assert again.names() == im.names() and again.chunk_count == 4


def test_convert_takes_stats_or_the_imatrix_file_alike(stats_file, tiny_bf16, tmp_path):
    stats, path = stats_file
    gguf_file = stats_to_imatrix(stats).save(tmp_path / "imatrix.gguf")
    outs = {}
    for key, im in (("stats", path), ("gguf", gguf_file), ("none", None)):
        convert_gguf(tiny_bf16, tmp_path / key, qtype="q4_k_m", imatrix=im, progress=False)
        outs[key] = tensors(tmp_path / key)
    assert all(np.array_equal(outs["stats"][n], outs["gguf"][n]) for n in outs["stats"])
    changed = [n for n in outs["stats"] if not np.array_equal(outs["stats"][n], outs["none"][n])]
    assert any("ffn_gate_exps" in n for n in changed) and any("attn_q" in n for n in changed)


def test_statistics_of_another_model_are_refused(stats_file, tiny_fp8, tmp_path):
    _, path = stats_file
    bad = ImatrixData.from_stats({"blk.9.attn_q.weight": (torch.ones(8), 3)}, chunk_count=1, chunk_size=1)
    with pytest.raises(QuantkitError, match="another model"):
        convert_gguf(tiny_fp8, tmp_path / "x", qtype="q4_k_m", imatrix=bad.save(tmp_path / "bad.gguf"),
                     progress=False)
