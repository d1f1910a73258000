"""The comparison table users choose a quant by: size, bits per weight, fidelity, needle score, speed.

    rows = compare("ref-bf16", {"fp8-block": "q-fp8", "fp8-channel": "q-fp8c"}, out="table")   # table.md, PNG

Every checkpoint, the reference included, is evaluated on quantkit's runtime with the same windows of the same
text; bits per weight count the stored bytes of the quantized tensors (attention and expert projections, scales
included) over their parameter count; tokens/s is greedy decoding at batch 1 after a warm-up, on the device given.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from quantkit.evals import needle
from quantkit.evals.fidelity import fidelity, token_windows
from quantkit.evals.report import held_out_text

from quantkit import tokenizer as tok
from quantkit.checkpoint import CheckpointReader
from quantkit.runtime import generate, load_model


def storage(folder: str | Path) -> tuple[int, float]:
    """(bytes of all tensors, bits per weight of the attention and expert projections, scales and zero points
    included) of a safetensors folder (BF16, FP8, AutoAWQ or compressed-tensors INT4) or a GGUF model."""
    from quantkit.runtime.gguf import find_gguf, gguf_storage

    if find_gguf(folder) is not None:
        return gguf_storage(folder)
    from quantkit.formats.awq import open_awq_reader

    reader = open_awq_reader(folder) or CheckpointReader(folder)
    specs = {s.name: s for s in reader.specs()}
    total = sum(e.nbytes for e in reader.entries.values())
    linear_bytes, counted = 0, set()
    for name, entry in reader.entries.items():
        stem, _, leaf = name.rpartition(".")
        base = f"{stem}.weight" if leaf in INT4_LEAVES else name.removesuffix("_scale_inv").removesuffix("_scale")
        spec = specs.get(base)
        if spec is not None and spec.is_linear:
            linear_bytes += entry.nbytes
            counted.add(base)
    return total, 8 * linear_bytes / max(1, sum(specs[b].numel for b in counted))


# AutoAWQ and compressed-tensors pack-quantized tensors standing for one `.weight`
INT4_LEAVES = ("qweight", "qzeros", "scales", "weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


@torch.inference_mode()
def decode_speed(model, steps: int = 32) -> float:
    prompt = [[1, 2, 3, 4, 5, 6, 7, 8]]
    generate(model, prompt, 4)  # warm-up: kernels compiled, caches allocated
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = generate(model, prompt, steps)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return len(out[0]) / (time.perf_counter() - t0)


def compare(reference: str | Path, quants: dict[str, str | Path], out: str | Path, device: str = "cpu",
            window: int = 256, max_windows: int = 8, needle_lengths: tuple[int, ...] | None = None,
            needle_depths: tuple[float, ...] = (0.0, 0.5, 1.0), jobs: int = 1,
            log: Callable[[str], None] | None = None) -> list[dict]:
    """The table's rows, the reference first. `jobs` > 1 evaluates that many checkpoints at once, each in its own
    process (on a GPU, mostly to overlap the kernels' first compilation); the rows are the same either way: the
    decoding speed is then measured afterwards, one checkpoint at a time, so that no row is timed while others run."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    todo = list({"bf16 (reference)": reference, **quants}.items())
    args = [(name, str(path), str(reference), device, window, max_windows, needle_lengths, needle_depths)
            for name, path in todo]
    rows: list[dict] = []
    if jobs <= 1:
        try:
            for a in args:
                rows.append(evaluate_one(*a))
                if log:
                    log(progress_line(rows[-1]))
        finally:
            _reference.cache_clear()  # the reference model is not kept past the table
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=min(jobs, len(args)), mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(evaluate_one, *a, measure_speed=False): i for i, a in enumerate(args)}
            done: dict[int, dict] = {}
            for f in as_completed(futures):
                done[futures[f]] = f.result()
        rows = [done[i] for i in range(len(args))]
        for row in rows:
            t0 = time.perf_counter()
            backend = "dense" if row["path"] == str(reference) else "auto"
            row["tokens_per_s"] = decode_speed(load_model(row["path"], dtype=torch.float32, device=device,
                                                          backend=backend))
            row["seconds"]["speed"] = time.perf_counter() - t0
            if log:
                log(progress_line(row))
    (out / "comparison.json").write_text(json.dumps({"device": device, "rows": rows}, indent=2) + "\n")
    (out / "comparison.md").write_text(format_table(rows, device))
    plot(rows, out / "comparison.png")
    return rows


def progress_line(row: dict) -> str:
    t = row["seconds"]
    return (f"{row['format']}: KLD {row['kld_mean']:.5f}, top-1 {row['top1']:.4f}, {row['tokens_per_s']:.1f} tokens/s "
            f"(load {t['load']:.0f} s, fidelity {t['fidelity']:.0f} s, needle {t['needle']:.0f} s, "
            f"speed {t['speed']:.0f} s)")


@functools.lru_cache(maxsize=1)
def _reference(reference: str, device: str, window: int, max_windows: int) -> tuple:
    """(tokenizer, held-out windows, reference model): made once per process and table, shared by its rows."""
    tokenizer = tok.load_tokenizer(reference)
    windows = token_windows(tokenizer.encode(held_out_text(), add_special_tokens=False).ids, window, max_windows)
    return tokenizer, windows, load_model(reference, dtype=torch.float32, device=device, backend="dense")


@torch.inference_mode()
def evaluate_one(name: str, path: str, reference: str, device: str, window: int, max_windows: int,
                 needle_lengths: tuple[int, ...] | None, needle_depths: tuple[float, ...],
                 measure_speed: bool = True) -> dict:
    """One row of the table: `path` against `reference` on the same windows of the built-in held-out text."""
    seconds = {}
    t0 = time.perf_counter()
    tokenizer, windows, ref = _reference(reference, device, window, max_windows)
    model = ref if path == reference else load_model(path, dtype=torch.float32, device=device, backend="auto")
    seconds["load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    fid = fidelity(model, ref, windows)
    seconds["fidelity"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    context = model.cfg.max_position_embeddings
    # default: 1K and 2K tokens, or the model's own context grid when it is shorter than that
    lengths = needle_lengths or ((1024, 2048) if context >= 2048 + needle.ANSWER_TOKENS else needle.DEFAULT_LENGTHS)
    cases = needle.needle_grid(context, lengths, needle_depths)
    hay = needle.summary(needle.run_needle(model, tokenizer, cases))
    seconds["needle"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    speed = decode_speed(model) if measure_speed else float("nan")
    seconds["speed"] = time.perf_counter() - t0
    size, bpw = storage(path)
    return {
        "format": name, "path": path, "bytes": size, "bits_per_weight": bpw,
        "kld_mean": fid.kld_mean, "kld_p99": fid.kld_p99, "top1": fid.top1_agreement,
        "perplexity": fid.ppl_quant, "needle": hay["score"], "needle_cases": hay["cases"],
        "tokens_per_s": speed, "seconds": seconds,
    }


def format_table(rows: list[dict], device: str) -> str:
    lines = [
        f"| format | size MB | bits/weight | mean KLD | p99 KLD | top-1 | perplexity | needle | tokens/s ({device}) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['format']} | {r['bytes'] / 1e6:.2f} | {r['bits_per_weight']:.2f} | {r['kld_mean']:.5f} "
                     f"| {r['kld_p99']:.5f} | {r['top1']:.4f} | {r['perplexity']:.2f} | {r['needle']:.0%} "
                     f"| {r['tokens_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=120)
    for r in rows:
        ax.scatter(r["bits_per_weight"], max(r["kld_mean"], 1e-7), s=40)
        ax.annotate(r["format"], (r["bits_per_weight"], max(r["kld_mean"], 1e-7)), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (projections)")
    ax.set_ylabel("mean KL divergence vs BF16")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
