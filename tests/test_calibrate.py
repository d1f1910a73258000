"""Calibration: data sources, the layer-streaming forward, per-expert statistics against a direct computation on the
runtime model, expert coverage (`--experts all`), the starved-expert fallback, the statistics file and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error, edited_copy, run_cli

from quantkit.calibrate.data import builtin_samples, calibration_tokens, sample_texts
from quantkit.calibrate.engine import LayerStream, calibrate
from quantkit.calibrate.stats import CalibrationStats
from quantkit.checkpoint import CheckpointReader
from quantkit.errors import QuantkitError
from quantkit.runtime import load_model


@pytest.fixture(scope="module")
def ids(tiny_bf16) -> torch.Tensor:
    return calibration_tokens(tiny_bf16, None, n_samples=4, seq_len=48)


def direct_stats(ckpt, ids: torch.Tensor) -> dict:
    """Every statistic computed the plain way: the runtime model's inputs captured by hooks, sums in float64,
    experts evaluated row by row over the tokens that chose them."""
    model = load_model(ckpt, dtype=torch.float32)
    seen: dict = {}
    for i, block in enumerate(model.layers):
        block.self_attn.q_proj.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__((i, "qkv"), a[0]))
        block.self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__((i, "o"), a[0]))
        block.moe.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__((i, "moe"), a[0]))
    model(ids, model.new_cache(*ids.shape))
    out = {}
    cfg = model.cfg
    for i, block in enumerate(model.layers):
        h = seen[(i, "moe")].reshape(-1, cfg.hidden_size).double()
        scores = torch.sigmoid(h @ block.moe.gate.double().t())
        idx = torch.topk(scores + block.moe.bias.double(), cfg.num_experts_per_tok, dim=-1).indices
        ex = block.moe.experts
        w13 = torch.zeros(cfg.num_local_experts, 3, cfg.hidden_size, dtype=torch.float64)
        w2 = torch.zeros(cfg.num_local_experts, 3, cfg.intermediate_size, dtype=torch.float64)
        for e in range(cfg.num_local_experts):
            rows = (idx == e).any(-1)
            x = h[rows]
            a = F.silu(x @ ex.w1[e].double().t()) * (x @ ex.w3[e].double().t())
            w13[e] = torch.stack([torch.full_like(x[0], x.shape[0]) if len(x) else torch.zeros_like(h[0]),
                                  x.abs().sum(0), x.square().sum(0)])
            w2[e] = torch.stack([torch.full((cfg.intermediate_size,), float(a.shape[0]), dtype=torch.float64),
                                 a.abs().sum(0), a.square().sum(0)])
        out[i] = {"w13": w13, "w2": w2, "idx": idx, "router": (h.shape[0], h.abs().sum(0), h.square().sum(0))}
        for p in ("qkv", "o"):
            x = seen[(i, p)].reshape(-1, seen[(i, p)].shape[-1]).double()
            out[i][p] = (x.shape[0], x.abs().sum(0), x.square().sum(0))
    return out


def test_statistics_equal_a_direct_computation(tiny_bf16, ids):
    stats = calibrate(tiny_bf16, ids, device="cpu", min_tokens=0, progress=False)
    ref = direct_stats(tiny_bf16, ids)
    for n, r in ref.items():
        for p in ("qkv", "o", "router"):
            s = stats.get(n, p)
            assert int(s.count[0]) == r[p][0] == ids.numel()
            torch.testing.assert_close(s.sum_abs[0], r[p][1], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(s.sum_sq[0], r[p][2], rtol=1e-5, atol=1e-6)
        for p in ("w13", "w2"):
            s = stats.get(n, p)
            assert s.count.tolist() == r[p][:, 0, 0].long().tolist()
            torch.testing.assert_close(s.sum_abs, r[p][:, 1], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(s.sum_sq, r[p][:, 2], rtol=1e-5, atol=1e-6)
        # every token chose top-k experts: the routed counts add up to tokens x k
        assert int(stats.get(n, "routed").count.sum()) == ids.numel() * 4
        assert torch.equal(stats.get(n, "routed").count, torch.bincount(r["idx"].flatten(), minlength=16))


def test_stream_hidden_states_are_the_runtime_forward(tiny_bf16, ids):
    model = load_model(tiny_bf16, dtype=torch.float32)
    hidden: list = []
    model(ids, model.new_cache(*ids.shape), hidden=hidden)
    stream = LayerStream(CheckpointReader(tiny_bf16), ids, "cpu", torch.float32, micro_batch=3)
    for n in range(model.cfg.num_hidden_layers):
        stream.skip_to(n + 1)
        torch.testing.assert_close(stream.x, hidden[n], rtol=1e-5, atol=1e-5)


def test_experts_all_covers_every_expert_and_keeps_routing(tiny_bf16, ids):
    routed = calibrate(tiny_bf16, ids, device="cpu", progress=False)
    full = calibrate(tiny_bf16, ids, device="cpu", experts="all", progress=False)
    for n in (0, 1):
        w13 = full.get(n, "w13")
        assert w13.count.tolist() == [ids.numel()] * 16  # every token through every expert
        # the w1/w3 input of every expert is then the router's input: all tokens
        torch.testing.assert_close(w13.sum_sq, full.get(n, "router").sum_sq.expand(16, -1))
        assert (full.get(n, "w2").count == ids.numel()).all()
        assert torch.equal(full.get(n, "routed").count, routed.get(n, "routed").count)  # routing untouched
        assert not full.fallbacks()
        # statistics of a routed expert over all tokens differ from those over its routed tokens
        c = routed.get(n, "routed").count
        e = int(((c > 0) & (c < ids.numel())).nonzero()[0])  # an expert that saw some tokens, not all
        assert not torch.allclose(full.get(n, "w2").mean_sq()[e], routed.get(n, "w2").mean_sq()[e])
    # the next layer's input does not depend on the statistics mode
    torch.testing.assert_close(full.get(1, "qkv").sum_sq, routed.get(1, "qkv").sum_sq)


def starved_copy(src, dest):
    """Expert 3 of layer 0 never chosen: its correction bias is far below every other."""
    return edited_copy(src, dest, "model.layers.0.block_sparse_moe.e_score_correction_bias",
                       lambda t: t[3].fill_(-100.0))


def test_starved_expert_falls_back_and_is_reported(tiny_bf16, ids, tmp_path):
    src = starved_copy(tiny_bf16, tmp_path / "starved")
    stats = calibrate(src, ids, device="cpu", min_tokens=4, progress=False)
    w13, w2 = stats.get(0, "w13"), stats.get(0, "w2")
    assert int(w13.count[3]) == 0 and bool(w13.fallback[3]) and bool(w2.fallback[3])
    assert 3 in stats.fallbacks()["0.w13"] and 3 in stats.fallbacks()["0.w2"]
    for s in (w13, w2):
        for m in (s.mean_abs(), s.mean_sq()):
            assert torch.isfinite(m).all()
        n, pooled_abs, pooled_sq = s.pooled()
        torch.testing.assert_close(s.mean_abs()[3], pooled_abs / n)  # pooled statistics, not zeros
        sq, counts = s.imatrix_sums()
        assert torch.isfinite(sq / counts[:, None]).all() and int(counts[3]) == 1
    busy = int(w13.count.argmax())
    assert not bool(w13.fallback[busy])
    torch.testing.assert_close(w13.mean_abs()[busy], w13.sum_abs[busy] / w13.count[busy])

    # the command line: a table naming the fallback count, the statistics file, its JSON and the PNG
    out = tmp_path / "stats" / "s.safetensors"
    proc = run_cli("calibrate", src, "--n-samples", "4", "--seq-len", "48", "--min-tokens", "4", "-o", out,
                   "--no-progress", check=True)
    assert "fell back to pooled statistics" in proc.stdout
    assert out.is_file() and out.with_suffix(".png").stat().st_size > 1000
    meta = json.loads(out.with_suffix(".json").read_text())
    assert 3 in meta["fallback"]["0.w13"] and meta["tokens"] == ids.numel()
    loaded = CalibrationStats.load(out)
    torch.testing.assert_close(loaded.get(0, "w2").sum_sq, w2.sum_sq)
    assert torch.equal(loaded.get(0, "w13").fallback, w13.fallback)
    loaded.check_matches(CheckpointReader(src).config, "stats")


def test_calibration_sources(tiny_bf16, tmp_path):
    (tmp_path / "a.txt").write_text("First paragraph of text.\n\nSecond one, a bit longer than the first.\n")
    rows = [{"text": "a jsonl text sample"},
            {"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"text": ["a parquet row", "another parquet row"]}), tmp_path / "c.parquet")
    texts = list(sample_texts(tiny_bf16, [str(tmp_path / n) for n in ("a.txt", "b.jsonl", "c.parquet")]))
    assert texts[:3] == ["First paragraph of text.", "Second one, a bit longer than the first.\n",
                         "a jsonl text sample"]
    assert "]~b]user\nhi there" in texts[3] and "]~b]ai\nhello" in texts[3]  # rendered with the chat template
    assert texts[4:] == ["a parquet row", "another parquet row"]
    chat = list(sample_texts(tiny_bf16, [str(tmp_path / "a.txt")], chat=True))
    assert chat[0].startswith("]~!b[]~b]system") and "]~b]user\nFirst paragraph" in chat[0]
    # the built-in set holds plain text and rendered tool-call conversations, offline
    builtin = [t for _, t in zip(range(30), builtin_samples(tiny_bf16))]
    assert any("<minimax:tool_call>" in t for t in builtin) and any("]~b]" not in t for t in builtin)
    ids = calibration_tokens(tiny_bf16, [str(tmp_path / "a.txt")] * 3, n_samples=2, seq_len=8)
    assert ids.shape == (2, 8) and ids.dtype == torch.long
    with pytest.raises(QuantkitError, match="fewer than --n-samples"):
        calibration_tokens(tiny_bf16, [str(tmp_path / "a.txt")], n_samples=50, seq_len=8)
    (tmp_path / "bad.jsonl").write_text('{"nope": 1}\n')
    with pytest.raises(QuantkitError, match="bad.jsonl line 1"):
        calibration_tokens(tiny_bf16, [str(tmp_path / "bad.jsonl")], 1, 8)


def test_calibrate_bad_input(tiny_bf16, tmp_path):
    proc = run_cli("calibrate", tiny_bf16, "--calib", tmp_path / "data.csv", "-o", tmp_path / "s.safetensors")
    assert_one_line_error(proc, "data.csv")  # a path that does not exist is taken for a Hub dataset: offline here
    (tmp_path / "data.csv").write_text("x\n")
    proc = run_cli("calibrate", tiny_bf16, "--calib", tmp_path / "data.csv", "-o", tmp_path / "s.safetensors")
    assert_one_line_error(proc, "data.csv", ".jsonl")
    proc = run_cli("calibrate", tiny_bf16, "-o", tmp_path / "s.bin")
    assert_one_line_error(proc, "s.bin", ".safetensors")
    with pytest.raises(QuantkitError, match="--experts"):
        calibrate(tiny_bf16, torch.zeros(1, 4, dtype=torch.long), experts="some")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_calibration_on_gpu_matches_the_cpu(tiny_bf16, ids):
    """The layer-streaming forward on a GPU, through the fused kernels (one rotary table for the whole batch of
    samples): the statistics the CPU's references give, to bf16 rounding."""
    cpu = calibrate(tiny_bf16, ids, device="cpu", min_tokens=0, progress=False)
    gpu = calibrate(tiny_bf16, ids, device="cuda", min_tokens=0, progress=False)
    assert sorted(cpu.layers) == sorted(gpu.layers)
    for n in cpu.layers:
        for p in ("qkv", "o", "router"):
            a, b = cpu.get(n, p), gpu.get(n, p)
            assert torch.equal(a.count.cpu(), b.count.cpu())
            torch.testing.assert_close(b.mean_sq().cpu(), a.mean_sq().cpu(), rtol=5e-2, atol=1e-4)
