"""`quantkit bench`: serving throughput and latency as vLLM and SGLang report them, and decode time per layer
against the HBM roofline.

    rows = serving_sweep(model, [1, 4, 32, 128], input_len=128, output_len=512, world=1)
    layers = per_layer_sweep(model, [1, 4, 32, 128], context=128)      # real-width slices: GPU-meaningful
    write_report(out, meta, rows, layers)                                # bench.md, bench.json, bench.png

Serving: at each concurrency C, C requests of input_len random tokens arrive together and each generates exactly
output_len tokens (no stop ids) on quantkit's server (runtime/serve.py: chunked prefill, batched decode, CUDA
graphs on the GPU). Output tokens/s = all output tokens / wall time; per GPU divides by the world size. TTFT is
arrival to first token, TPOT the mean gap between a request's later tokens; both as mean, p50 and p99 over requests.
A warm-up wave at the same concurrency (graphs captured, kernels compiled) runs first and is not counted.

Per layer: C slots each holding `context` tokens; one decode step through all layers and one through none (embed,
final norm, lm_head) are timed (CUDA-graph replays on the GPU); their difference over the layer count is the
decode time per layer. The floor beside it is the bytes one step must read on this rank (attention weights,
router, the experts the step's tokens actually hit, the KV cache) over the measured HBM read bandwidth. The
projection to MiniMax-M2's 62 layers adds the head's time, for comparison with vLLM's published TPOT on H100.
"""

from __future__ import annotations

import json
import os
import statistics
import time
import warnings
from pathlib import Path

import torch

from quantkit.runtime.model import DenseExperts
from quantkit.runtime.serve import Request, Server, SlotCache, forward_slots

FULL_LAYERS = 62  # MiniMax-M2
# vLLM serving MiniMax-M2 FP8 on H100 (specs/perf-anchors.md): (setup, concurrency, TPOT ms)
VLLM_H100 = [("TP8/EP8", 4, 9.0), ("TP4", 10, 16.0)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def pct(values: list[float], q: float) -> float:
    """Percentile by linear interpolation between order statistics (numpy's default)."""
    v = sorted(values)
    if len(v) == 1:
        return v[0]
    x = q / 100 * (len(v) - 1)
    lo = int(x)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (x - lo)


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


def metadata(ckpt: str | Path, model, spec, backend: str, dtype: str) -> dict:
    """What a result needs beside it: checkpoint, device, world and degrees, backend, commit, date, and whether the
    kernels launched with programmatic dependent launch (QUANTKIT_PDL)."""
    import subprocess

    from quantkit.kernels.fp8_gemm import pdl

    device = model.device
    commit = os.environ.get("QUANTKIT_COMMIT", "")  # where a copied tree's git metadata may not be current
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                          cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    tp, ep = (spec.tp, spec.ep) if spec else (1, 1)
    cfg = model.cfg
    experts = model.layers[0].moe.experts
    if backend == "auto":  # name what ran: the experts' module (inside a rank's shard wrapper)
        backend = {"Fp8Experts": "fp8", "DenseExperts": "dense"}.get(
            type(getattr(experts, "inner", experts)).__name__, backend)
    return {
        "checkpoint": str(ckpt), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world": max(tp, ep), "tp": tp, "ep": ep, "setup": f"TP{tp}/EP{ep}", "backend": backend, "dtype": dtype,
        "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size, "experts": cfg.num_local_experts,
        "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "pdl": device.type == "cuda" and pdl(device),
    }


def serving_run(model, concurrency: int, input_len: int, output_len: int, world: int = 1,
                prefill_chunk: int = 512, seed: int = 0, cuda_graphs: bool | None = None) -> dict:
    """One concurrency level: warm-up wave, then the timed wave. Returns the table's row."""
    server = Server(model, slots=concurrency, max_len=input_len + output_len, prefill_chunk=prefill_chunk,
                    cuda_graphs=cuda_graphs)
    vocab = model.cfg.vocab_size
    server.capture_all()
    for p in _prompts(concurrency, input_len, vocab, seed + 1):  # warm-up: short outputs
        server.submit(Request(p, max_new_tokens=min(4, output_len)))
    server.run()
    steps0 = dict(server.steps)
    _sync(model.device)
    _barrier()
    t0 = time.perf_counter()
    for i, p in enumerate(_prompts(concurrency, input_len, vocab, seed)):
        server.submit(Request(p, max_new_tokens=output_len, seed=seed + i), t_submit=t0)
    done = server.run()
    _sync(model.device)
    wall = time.perf_counter() - t0
    ttft = [c.ttft * 1e3 for c in done]
    tpot = [c.tpot * 1e3 for c in done if len(c.tokens) > 1]
    out_tokens = sum(len(c.tokens) for c in done)
    row = {
        "concurrency": concurrency, "requests": len(done), "input_len": input_len, "output_len": output_len,
        "requested_tokens": concurrency * output_len, "output_tokens": out_tokens, "wall_s": wall,
        "output_tok_s": out_tokens / wall, "output_tok_s_per_gpu": out_tokens / wall / world,
        "prefill_steps": server.steps["prefill"] - steps0["prefill"],
        "decode_steps": server.steps["decode"] - steps0["decode"],
    }
    for name, vals in (("ttft_ms", ttft), ("tpot_ms", tpot or [0.0])):
        row[name] = {"mean": statistics.fmean(vals), "p50": pct(vals, 50), "p99": pct(vals, 99)}
    return row


def serving_sweep(model, concurrency: list[int], input_len: int, output_len: int, world: int = 1,
                  progress=None, cuda_graphs: bool | None = None) -> list[dict]:
    rows = []
    for c in concurrency:
        rows.append(serving_run(model, c, input_len, output_len, world, cuda_graphs=cuda_graphs))
        if progress:
            progress(rows[-1])
    return rows


# ---- per-layer decode against the roofline -----------------------------------------------------------------


def hbm_bandwidth(device: torch.device) -> float:
    """Measured read bandwidth, bytes/s: a sum over 2 GiB (GPU) or 64 MiB (CPU) of fp32, best of several."""
    n = (2 << 30 if device.type == "cuda" else 64 << 20) // 4
    x = torch.ones(n, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(5 if device.type == "cuda" else 3):
        _sync(device)
        t0 = time.perf_counter()
        x.sum()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    del x
    return n * 4 / best


def time_call(fn, device: torch.device, iters: int = 20, graphs: bool = True) -> float:
    """Median seconds of fn(): CUDA-graph replays timed with events on a GPU (eager, synchronised, if the call
    cannot be captured or graphs is False), eager calls on the CPU."""
    if device.type == "cuda" and graphs:
        try:
            return _time_graph(fn, iters)
        except RuntimeError as e:
            warnings.warn(f"timing eagerly: CUDA-graph capture failed ({str(e).strip().splitlines()[0]})",
                          stacklevel=2)
            torch.cuda.synchronize(device)

    def call() -> None:
        fn()
        _sync(device)

    call()
    times = []
    for _ in range(max(3, iters // 4)):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _time_graph(fn, iters: int) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph: kernels compiled, allocator settled
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def _bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's weights: parameters and the buffers packed formats keep them in (AWQ, GGUF), each once."""
    seen = {}
    for t in module.state_dict(keep_vars=True).values():
        seen.setdefault((t.data_ptr(), t.dtype, tuple(t.shape)), t.numel() * t.element_size())
    return sum(seen.values())


def _experts_hit(model, tokens: torch.Tensor, cache: SlotCache, positions: torch.Tensor) -> list[int]:
    """Distinct experts this rank holds that one decode step's tokens route to, per layer (an eager step)."""
    hits: list[int] = []
    originals = []
    for block in model.layers:
        moe = block.moe
        experts = moe.experts
        lo, n = getattr(experts, "lo", 0), getattr(experts, "n", model.cfg.num_local_experts)

        def route(h, _orig=moe.route, _lo=lo, _n=n):
            idx, w = _orig(h)
            ids = idx.unique()
            hits.append(int(((ids >= _lo) & (ids < _lo + _n)).sum()))
            return idx, w

        originals.append((moe, moe.route))
        moe.route = route
    try:
        forward_slots(model, tokens, cache, slice(0, tokens.shape[0]), positions.clone())
    finally:
        for moe, _ in originals:
            del moe.route  # back to the class's method
    return hits


@torch.inference_mode()
def per_layer_sweep(model, concurrency: list[int], context: int, bandwidth: float | None = None,
                    seed: int = 0, graphs: bool = True) -> tuple[list[dict], float]:
    """Decode time per layer at each concurrency, and the floor from the bytes it must read. Returns (rows, B/s)."""
    bw = bandwidth or hbm_bandwidth(model.device)
    graphs = graphs and not any(isinstance(m, DenseExperts) for m in model.modules())  # host-synced expert loop
    return [per_layer_run(model, c, context, bw, seed, graphs) for c in concurrency], bw


def decode_step(model, concurrency: int, context: int, seed: int = 0):
    """One decode step of `concurrency` slots after `context` cached tokens: (cache, tokens, positions, the whole
    step, the step with no decoder layer). What the per-layer figures time (here and in scripts/profile_decode.py)."""
    c = concurrency
    cache = SlotCache.allocate(model, c, context + 1)
    cache.lengths.fill_(context)  # attention reads `context` + 1 columns per slot; their content does not matter
    g = torch.Generator().manual_seed(seed + c)
    tokens = torch.randint(0, model.cfg.vocab_size, (c, 1), generator=g).to(model.device)
    pos = cache.lengths[:, None].clone()
    return (cache, tokens, pos, lambda: forward_slots(model, tokens, cache, slice(0, c), pos),
            lambda: forward_slots(model, tokens, cache, slice(0, c), pos, layers=slice(0, 0)))


def per_layer_run(model, concurrency: int, context: int, bandwidth: float, seed: int = 0,
                  graphs: bool = True) -> dict:
    device, c, L = model.device, concurrency, len(model.layers)
    block = model.layers[0]
    experts = block.moe.experts
    per_expert = _bytes(experts) / getattr(experts, "n", model.cfg.num_local_experts)  # this rank's share
    norms = block.input_layernorm.numel() + block.post_attention_layernorm.numel()
    fixed = _bytes(block.self_attn) + 4 * (block.moe.gate.numel() + block.moe.bias.numel())  # router: fp32
    fixed += norms * block.input_layernorm.element_size()
    head_bytes = _bytes(model.lm_head) + model.norm.numel() * model.norm.element_size()
    cache, tokens, pos, full, head = decode_step(model, c, context, seed)
    hits = _experts_hit(model, tokens, cache, pos)
    full, head = time_call(full, device, graphs=graphs), time_call(head, device, graphs=graphs)
    per_layer = max(full - head, 0.0) / L
    k = cache.k[0]
    kv = 2 * c * (context + 1) * k.shape[1] * k.shape[3] * k.element_size()  # keys and values of this rank's heads
    layer_bytes = fixed + per_expert * statistics.fmean(hits) + kv
    floor = layer_bytes / bandwidth
    return {
        "concurrency": c, "context": context, "layers_timed": L, "step_ms": full * 1e3, "head_ms": head * 1e3,
        "layer_ms": per_layer * 1e3, "experts_hit": statistics.fmean(hits), "layer_bytes": layer_bytes,
        "floor_ms": floor * 1e3, "x_floor": per_layer / floor,
        "achieved_gb_s": layer_bytes / per_layer / 1e9 if per_layer else float("nan"),
        "tpot_62_ms": (FULL_LAYERS * per_layer + head) * 1e3,
        "floor_62_ms": (FULL_LAYERS * floor + head_bytes / bandwidth) * 1e3,
    }


# ---- report -------------------------------------------------------------------------------------------------------


def format_serving(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Serving on {meta['device']} x {meta['world']} ({meta['setup']}), {meta['backend']} backend, "
        f"input {rows[0]['input_len'] if rows else '-'} / output {rows[0]['output_len'] if rows else '-'} tokens"
        f"{', programmatic dependent launch' if meta.get('pdl') else ''}",
        "",
        "| concurrency | requests | output tokens | wall s | output tok/s | tok/s per GPU | TTFT mean / p50 / p99 ms "
        "| TPOT mean / p50 / p99 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t, p = r["ttft_ms"], r["tpot_ms"]
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['output_tokens']} | {r['wall_s']:.2f} "
                     f"| {r['output_tok_s']:.1f} | {r['output_tok_s_per_gpu']:.1f} "
                     f"| {t['mean']:.1f} / {t['p50']:.1f} / {t['p99']:.1f} "
                     f"| {p['mean']:.2f} / {p['p50']:.2f} / {p['p99']:.2f} |")
    return "\n".join(lines) + "\n"


def format_layers(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Decode per layer on {meta['device']} x {meta['world']} ({meta['setup']}), context {rows[0]['context']}, "
        f"HBM read {meta['bandwidth_gb_s']:.0f} GB/s measured; floor = bytes read per layer per step / that"
        f"{'; programmatic dependent launch' if meta.get('pdl') else ''}",
        "",
        "| concurrency | experts hit | MB read / layer | layer ms | floor ms | x floor | GB/s | head ms "
        "| TPOT at 62 layers ms | floor at 62 layers ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['experts_hit']:.1f} | {r['layer_bytes'] / 1e6:.1f} "
                     f"| {r['layer_ms']:.4f} | {r['floor_ms']:.4f} | {r['x_floor']:.2f} | {r['achieved_gb_s']:.0f} "
                     f"| {r['head_ms']:.3f} | {r['tpot_62_ms']:.2f} | {r['floor_62_ms']:.2f} |")
    lines.append("")
    lines.append("Published: vLLM, MiniMax-M2 FP8 on H100: "
                 + "; ".join(f"{s} at concurrency {c}: TPOT about {t:.0f} ms" for s, c, t in VLLM_H100) + ".")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], layers: list[dict], path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 + bool(layers)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), dpi=120)
    if rows:
        c = [r["concurrency"] for r in rows]
        axes[0].plot(c, [r["output_tok_s"] for r in rows], "o-", label="all GPUs")
        axes[0].plot(c, [r["output_tok_s_per_gpu"] for r in rows], "s--", label="per GPU")
        axes[0].set_ylabel("output tokens/s")
        axes[0].legend(fontsize=8)
        for q, style in (("mean", "o-"), ("p99", "s--")):
            axes[1].plot(c, [r["tpot_ms"][q] for r in rows], style, label=f"TPOT {q}")
            axes[1].plot(c, [r["ttft_ms"][q] for r in rows], style, alpha=0.5, label=f"TTFT {q}")
        axes[1].set_yscale("log")
        axes[1].set_ylabel("ms")
        axes[1].legend(fontsize=7)
    if layers:
        c = [r["concurrency"] for r in layers]
        axes[2].plot(c, [r["layer_ms"] for r in layers], "o-", label="measured")
        axes[2].plot(c, [r["floor_ms"] for r in layers], "k--", label="HBM floor")
        axes[2].set_ylabel("decode ms per layer")
        axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{meta['checkpoint']} ({meta['setup']}, {meta['device']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_report(out: str | Path, meta: dict, rows: list[dict], layers: list[dict]) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = f"# quantkit bench: {meta['checkpoint']}\n\n"
    if rows:
        md += format_serving(rows, meta) + "\n"
    if layers:
        md += format_layers(layers, meta)
    _write(out / "bench.md", md)
    _write(out / "bench.json", json.dumps({"meta": meta, "serving": rows, "per_layer": layers}, indent=2) + "\n")
    tmp = out / ".bench.png.partial.png"
    plot(rows, layers, tmp, meta)
    os.replace(tmp, out / "bench.png")
    return out
