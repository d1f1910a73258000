"""The serving loop: many requests through a slot cache (queue, chunked prefill, batched decode) give what
one-at-a-time generation gives; sampling and stop conditions per request; `quantkit bench`'s table adds up."""

from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():  # the fp8 backend imports the kernels: Triton's interpreter on a CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conftest import assert_one_line_error, run_cli  # noqa: E402
from quantkit.evals.bench import pct, per_layer_run  # noqa: E402

from quantkit.errors import QuantkitError  # noqa: E402
from quantkit.runtime import Sampling, generate, load_model  # noqa: E402
from quantkit.runtime.serve import Request, Server, buckets_for, serve  # noqa: E402

LENGTHS = [3, 17, 1, 9, 30, 5, 12]


@pytest.fixture(scope="module")
def model(tiny_bf16):
    return load_model(tiny_bf16, dtype=torch.float32)


def prompts(lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 2000, (n,), generator=g).tolist() for n in lengths]


def test_batched_serving_equals_one_at_a_time_greedy(model):
    ps = prompts()
    ref = [generate(model, [p], max_new_tokens=6)[0] for p in ps]
    # 3 slots for 7 requests: a queue; chunks of 7 tokens: the 30- and 17-token prompts prefill over several steps,
    # interleaved with other requests' decoding; a budget of 14 tokens batches two chunks per prefill forward
    server = Server(model, slots=3, max_len=40, prefill_chunk=7, prefill_budget=14)
    for p in ps:
        server.submit(Request(p, max_new_tokens=6))
    out = server.run()
    assert [c.tokens for c in out] == ref
    assert all(c.finish == "length" for c in out)
    assert server.steps["prefill"] > 3 and server.steps["decode"] >= 6
    assert all(c.t_submit <= c.t_first <= c.t_done for c in out)


def test_decode_attention_kernel_in_the_serving_loop(model, monkeypatch):
    """The slot cache's one-launch decode path (QK-norm, rotary, cache write and attention over each row's own
    columns, the rows a queue's index of slots) gives the tokens of SDPA over the masked cache, and takes every
    decode step."""
    from quantkit.kernels import fused_ops

    import quantkit.runtime.serve as serve_mod

    def run():
        server = Server(model, slots=3, max_len=40, prefill_chunk=7, prefill_budget=14)
        for p in prompts(LENGTHS[:5], seed=1):
            server.submit(Request(p, max_new_tokens=5))
        return [c.tokens for c in server.run()], server.steps["decode"]

    ref, _ = run()
    calls = []
    kernel = fused_ops.decode_attention
    monkeypatch.setattr(fused_ops, "decode_attention",
                        lambda *a, **kw: calls.append(kw.get("qk_norm") is not None) or kernel(*a, **kw))
    monkeypatch.setattr(serve_mod, "_fused", lambda *ts: True)  # the kernels, under the interpreter on a CPU
    got, decode_steps = run()
    assert got == ref
    assert len(calls) == decode_steps * model.cfg.num_hidden_layers > 0 and all(calls)  # QK-norm inside too


def test_decode_attention_kernel_in_a_sharded_model(tiny_bf16, monkeypatch, tmp_path):
    """The tensor-parallel attention (one rank of one here: its 1/rms all-reduced over a group of one) takes the
    same one-launch decode path, with the 1/rms given to the kernel, and serves the tokens of its SDPA path."""
    import torch.distributed as dist
    from quantkit.kernels import fused_ops

    import quantkit.runtime.serve as serve_mod
    from quantkit.checkpoint import CheckpointReader
    from quantkit.runtime.parallel import ParallelSpec, ShardedAttention, load_sharded

    sharded = load_sharded(CheckpointReader(tiny_bf16), torch.float32, "cpu", "dense", ParallelSpec())
    assert isinstance(sharded.layers[0].self_attn, ShardedAttention)

    def run():
        server = Server(sharded, slots=2, max_len=32, prefill_chunk=8)
        for p in prompts(LENGTHS[:3], seed=2):
            server.submit(Request(p, max_new_tokens=4))
        return [c.tokens for c in server.run()]

    calls = []
    kernel = fused_ops.decode_attention
    # the sharded head all-gathers its vocabulary slices: a process group of one
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        ref = run()
        monkeypatch.setattr(fused_ops, "decode_attention",
                            lambda *a, **kw: calls.append(len(kw.get("qk_norm") or ())) or kernel(*a, **kw))
        monkeypatch.setattr(serve_mod, "_fused", lambda *ts: True)
        got = run()
    finally:
        dist.destroy_process_group()
    assert got == ref
    assert calls and all(n == 7 for n in calls)  # gains, rotary, eps and the two 1/rms


def test_fp8_o_proj_takes_the_decode_attention_quantization(tmp_path, monkeypatch):
    """A block-FP8 model whose heads are 128 wide (o_proj's activation group): the one-launch decode attention also
    quantizes its output for o_proj at every decode step, and the served tokens are those of the same launches with
    o_proj quantizing the output itself."""
    from quantkit.kernels import fp8_gemm, fused_ops

    import quantkit.runtime.model as model_mod
    import quantkit.runtime.serve as serve_mod
    from quantkit import synth

    monkeypatch.setitem(synth.PRESETS, "tiny-heads128", {**synth.PRESETS["tiny"], "head_dim": 128, "rotary_dim": 64})
    synth.make_checkpoint(tmp_path / "ckpt", preset="tiny-heads128", dtype="fp8", seed=3)
    fp8 = load_model(tmp_path / "ckpt", dtype=torch.bfloat16, backend="fp8")

    def run():
        server = Server(fp8, slots=2, max_len=24, prefill_chunk=8)
        for p in prompts([5, 9], seed=3):
            server.submit(Request(p, max_new_tokens=4))
        return [c.tokens for c in server.run()]

    groups, o_quant = [], []  # the launches' quant_group; o_proj's own quantizations (its input: 4 heads of 128)
    kernel, quant = fused_ops.decode_attention, fp8_gemm.per_token_group_quant_fp8_ref
    monkeypatch.setattr(fused_ops, "decode_attention",
                        lambda *a, **kw: groups.append(kw.get("quant_group", 0)) or kernel(*a, **kw))
    monkeypatch.setattr(fp8_gemm, "per_token_group_quant_fp8_ref",
                        lambda x, g=128: o_quant.append(x.shape[-1] == 512) or quant(x, g))
    monkeypatch.setattr(serve_mod, "_fused", lambda *ts: True)  # the kernels, under the interpreter on a CPU
    got = run()
    assert groups and set(groups) == {128}
    carried = sum(o_quant)  # the prefill steps' only
    groups.clear(), o_quant.clear()
    monkeypatch.setattr(model_mod, "ATTN_QUANT", False)  # QUANTKIT_ATTN_QUANT=0: o_proj quantizes its input itself
    assert run() == got
    assert groups and set(groups) == {0}
    assert sum(o_quant) == carried + len(groups)  # and now each decode launch's output too


def test_fp8_backend_serving_equals_generation(tiny_fp8):
    fp8 = load_model(tiny_fp8, dtype=torch.float32, backend="fp8")
    ps = prompts([4, 7, 2], seed=1)
    ref = [generate(fp8, [p], max_new_tokens=3)[0] for p in ps]
    assert [c.tokens for c in serve(fp8, [Request(p, max_new_tokens=3) for p in ps], prefill_chunk=5)] == ref


def test_stop_ids_and_stop_strings_per_request(model):
    p = prompts([6])[0]
    ref = generate(model, [p], max_new_tokens=8)[0]
    stop_tok = ref[3]
    first = ref.index(stop_tok)  # the stop id may already appear earlier
    reqs = [Request(p, max_new_tokens=8, stop_ids=(stop_tok,)), Request(p, max_new_tokens=8),
            Request(p, max_new_tokens=8, stop=(f" {ref[2]} ",))]
    text = " ".join  # a stand-in detokenizer: ids as words

    def detok(ids):
        return " " + text(map(str, ids)) + " "

    out = serve(model, reqs, detokenize=detok)
    assert out[0].tokens == ref[:first + 1] and out[0].finish == "stop"
    assert out[1].tokens == ref and out[1].finish == "length"
    done = ref.index(ref[2])  # the string is complete once ref[2] first comes out
    assert out[2].finish == "stop" and out[2].tokens == ref[:done + 1]
    assert out[2].text.split() == [str(t) for t in ref[:done]]  # cut before the stop string


def test_sampling_is_per_request_and_independent_of_the_batch(model):
    ps = prompts([5, 8, 3], seed=2)
    hot = Sampling(temperature=0.9, top_k=50)
    alone = generate(model, [ps[1]], max_new_tokens=6, sampling=hot, seed=7)[0]
    mixed = serve(model, [Request(ps[0], 6), Request(ps[1], 6, sampling=hot, seed=7), Request(ps[2], 6)])
    assert mixed[1].tokens == alone  # same seed, same tokens, whoever shares the batch
    assert mixed[0].tokens == generate(model, [ps[0]], max_new_tokens=6)[0]  # greedy neighbours stay greedy


def test_requests_that_cannot_fit_are_refused(model):
    server = Server(model, slots=2, max_len=16)
    with pytest.raises(QuantkitError, match="exceed the 16 positions"):
        server.submit(Request(list(range(10)), max_new_tokens=7))
    with pytest.raises(QuantkitError, match="at least one token"):
        server.submit(Request([], max_new_tokens=2))
    with pytest.raises(QuantkitError, match="detokenizer"):
        server.submit(Request([1], max_new_tokens=2, stop=("x",)))


def test_buckets_and_percentiles():
    assert buckets_for(1) == [1]
    assert buckets_for(6) == [1, 2, 4, 6]
    assert buckets_for(32) == [1, 2, 4, 8, 16, 32]
    assert pct([4.0], 99) == 4.0
    assert pct([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert pct([0.0, 10.0], 99) == pytest.approx(9.9)


def test_bench_table_counts_what_was_requested(tiny_fp8, tmp_path):
    out = tmp_path / "bench"
    proc = run_cli("bench", tiny_fp8, "-o", out, "--concurrency", "1,3", "--input-len", "9", "--output-len", "4",
                   "--per-layer", "--device", "cpu", "--dtype", "fp32", check=True)
    res = json.loads((out / "bench.json").read_text())
    assert res["meta"]["backend"] == "fp8" and res["meta"]["world"] == 1
    assert res["meta"]["pdl"] is False  # the CPU launches plainly, whatever QUANTKIT_PDL says
    assert [r["concurrency"] for r in res["serving"]] == [1, 3]
    for r in res["serving"]:
        assert r["requests"] == r["concurrency"]
        assert r["output_tokens"] == r["requested_tokens"] == r["concurrency"] * 4
        assert r["output_tok_s"] == pytest.approx(r["output_tokens"] / r["wall_s"])
        assert r["output_tok_s_per_gpu"] == pytest.approx(r["output_tok_s"])
        assert r["decode_steps"] == 3  # all requests decode together: output_len - 1 steps after the prefill
        for k in ("ttft_ms", "tpot_ms"):
            assert 0 < r[k]["p50"] <= r[k]["p99"] and r[k]["mean"] > 0
    for r in res["per_layer"]:
        assert 1 <= r["experts_hit"] <= 16 and r["layer_bytes"] > 0 and r["floor_ms"] > 0
        assert r["tpot_62_ms"] == pytest.approx(62 * r["layer_ms"] + r["head_ms"])
    md = (out / "bench.md").read_text()
    assert "| 3 | 3 | 12 |" in md and "TPOT at 62 layers" in md and "vLLM" in md
    assert (out / "bench.png").stat().st_size > 0
    assert "| 1 | 1 | 4 |" in proc.stdout


@pytest.mark.parametrize("dtype", ["fp8", "awq"])
def test_per_layer_floor_counts_packed_weights(dtype, tmp_path):
    """The floor's bytes are those of the checkpoint's layer: attention and router in full, and the experts hit at
    their stored size (AWQ keeps its weights in buffers, FP8 in parameters: both counted)."""
    from safetensors import safe_open

    from quantkit.synth import make_checkpoint

    ckpt = tmp_path / dtype
    make_checkpoint(ckpt, preset="tiny", dtype=dtype, seed=3)
    stored = {"experts": 0, "fixed": 0}
    for f in ckpt.glob("*.safetensors"):
        with safe_open(f, "pt") as sf:
            for name in sf.keys():
                if name.startswith("model.layers.0."):
                    t = sf.get_tensor(name)
                    stored["experts" if ".experts." in name else "fixed"] += t.numel() * t.element_size()
    model = load_model(str(ckpt), dtype=torch.float32, device="cpu", backend=dtype)
    n_experts = model.cfg.num_local_experts
    row = per_layer_run(model, 2, 8, bandwidth=1e9, graphs=False)
    kv = row["layer_bytes"] - stored["fixed"] - row["experts_hit"] * stored["experts"] / n_experts
    # fp32 runtime norms against bf16 stored ones and the repacked AWQ zeros make a few percent of difference
    assert abs(kv) < 0.1 * row["layer_bytes"], (row, stored)
    assert row["layer_bytes"] > row["experts_hit"] * 0.9 * stored["experts"] / n_experts


@pytest.mark.slow  # three processes start torch
def test_bench_under_tensor_parallel(tiny_fp8, tmp_path):
    out = tmp_path / "tp"
    run_cli("bench", tiny_fp8, "-o", out, "--concurrency", "2", "--input-len", "5", "--output-len", "3", "--device",
            "cpu", "--dtype", "fp32", "--tp", "2", check=True)
    row = json.loads((out / "bench.json").read_text())["serving"][0]
    assert row["output_tokens"] == 6 and row["output_tok_s_per_gpu"] == pytest.approx(row["output_tok_s"] / 2)


def test_bench_bad_options_one_line(tiny_fp8, tmp_path):
    proc = run_cli("bench", tiny_fp8, "-o", tmp_path / "x", "--concurrency", "1,a", "--device", "cpu")
    assert_one_line_error(proc, "--concurrency")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_decode_equals_eager(tiny_fp8):
    gpu = load_model(tiny_fp8, dtype=torch.bfloat16, backend="fp8", device="cuda")
    ps = prompts([4, 11, 2, 7, 9], seed=3)
    reqs = [Request(p, max_new_tokens=8) for p in ps]
    eager = serve(gpu, reqs, slots=4, cuda_graphs=False)
    graphs = serve(gpu, reqs, slots=4, cuda_graphs=True)
    assert [c.tokens for c in graphs] == [c.tokens for c in eager]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs a Hopper or newer GPU")
def test_programmatic_dependent_launch_serves_the_same_tokens(tiny_fp8, monkeypatch):
    """QUANTKIT_PDL=1: the decode kernels wait for the kernels before them in the kernel (griddepcontrol) instead of
    at the launch, eager and in CUDA graphs; the tokens are those of the plain launches."""
    from quantkit.kernels import fp8_gemm

    gpu = load_model(tiny_fp8, dtype=torch.bfloat16, backend="fp8", device="cuda")
    reqs = [Request(p, max_new_tokens=8) for p in prompts([4, 11, 2, 7, 9], seed=5)]
    monkeypatch.setenv(fp8_gemm.PDL_ENV, "0")
    plain = [c.tokens for c in serve(gpu, reqs, slots=4, cuda_graphs=True)]
    monkeypatch.setenv(fp8_gemm.PDL_ENV, "1")
    assert fp8_gemm.pdl(torch.device("cuda"))
    assert [c.tokens for c in serve(gpu, reqs, slots=4, cuda_graphs=False)] == plain
    assert [c.tokens for c in serve(gpu, reqs, slots=4, cuda_graphs=True)] == plain


def test_scaling_table_from_bench_results(tmp_path):
    """scripts/scaling_table.py: speed-up and efficiency against the same machine's one-GPU run of the backend."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("scaling_table", os.path.join(os.path.dirname(__file__), "..",
                                                                                "scripts", "scaling_table.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def result(name: str, backend: str, tp: int, ep: int, toks: list[float]) -> None:
        meta = {"backend": backend, "world": max(tp, ep), "tp": tp, "ep": ep, "setup": f"TP{tp}/EP{ep}",
                "commit": "abc"}
        rows = [{"concurrency": c, "output_tok_s": t} for c, t in zip((1, 32), toks)]
        (tmp_path / f"bench_{name}.json").write_text(json.dumps({"meta": meta, "serving": rows,
                                                                 "per_layer": [{"concurrency": 1, "layer_ms": 0.5}]}))

    result("tp1", "fp8", 1, 1, [100.0, 1000.0])
    result("tp4", "fp8", 4, 1, [150.0, 3200.0])
    result("ep4", "fp8", 1, 4, [90.0, 4000.0])
    lines = mod.table(mod.load([str(tmp_path)])).splitlines()
    assert [ln.split(" | ")[1] for ln in lines[2:]] == ["TP1/EP1", "TP4/EP1", "TP1/EP4"]
    assert "| 150 (1.50x, 38%) | 3,200 (3.20x, 80%) | 0.500 | abc |" in lines[3]
    assert "| 90 (0.90x, 22%) | 4,000 (4.00x, 100%) |" in lines[4]
    with pytest.raises(SystemExit, match="no bench"):
        mod.load([str(tmp_path / "empty")])
