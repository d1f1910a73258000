#!/usr/bin/env python
"""Calibration + AWQ at MiniMax-M2's real width: time and peak GPU/host memory per layer, projected to 62 layers.

    .venv/bin/python scripts/bench_awq.py --workdir /tmp/qk-awq --layers 2 --json evals/results/bench_awq.json

Generates a `minimax-m2` preset checkpoint (real widths: 256 experts of 1536 x 3072, 48/8 heads, vocab 200064) in the
official block-FP8 layout with --layers decoder layers, then in this process:

1. `calibrate` (statistics only) over the calibration tokens: seconds per layer;
2. `convert --to awq` (AutoAWQ layout, the full job: FP8 read and dequantized, calibration forward, scale and clip
   search, INT4 quantize and pack, shard writes): seconds per layer, split into the search and the rest;

and reports peak GPU memory (allocated and reserved) and peak host RSS, which must not depend on the layer count.
The projection: total = measured + (62 - layers) x the mean time of a full middle layer (the first layer also pays
for the calibration tokens and the embedding). The search's matmul work is estimated and printed as achieved
TFLOP/s. Writes a Markdown table to stdout and JSON to --json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_common import commit_id

ROOT = Path(__file__).resolve().parents[1]
FULL_LAYERS = 62


def search_flops(cfg, tokens: int, n_grid: int, expert_tokens: int, clip_tokens: int) -> float:
    """Matmul FLOPs of one layer's AWQ search (estimate): the MoE forward per w13 candidate, the attention per qkv
    candidate, the batched w2 candidates and the clipping search's grouped partial products."""
    H, Inter, E, K = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok
    moe = tokens * K * 3 * 2 * H * Inter
    attn = tokens * 2 * H * (cfg.q_width + 2 * cfg.kv_width) + tokens * 2 * cfg.q_width * H
    w2 = E * min(expert_tokens, tokens) * 2 * Inter * H
    clip_steps = 10
    clip = E * clip_tokens * 2 * (2 * Inter * H + H * Inter) * (clip_steps + 1)
    clip += clip_tokens * 2 * (cfg.kv_width * H + H * cfg.q_width) * (clip_steps + 1)
    return (n_grid + 2) * (moe + attn + w2) + clip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/qk-awq-bench")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--preset", default="minimax-m2", help="minimax-m2 (real width) or tiny (a quick smoke run)")
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--device", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint and the output")
    ap.add_argument("--json", dest="json_out", required=True)
    args = ap.parse_args()

    from quantkit.calibrate import plan as awq_plan
    from quantkit.calibrate.data import calibration_tokens
    from quantkit.calibrate.engine import calibrate
    from quantkit.checkpoint import CheckpointReader
    from quantkit.convert import convert

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    work = Path(args.workdir)
    src, out = work / f"{args.preset}-{args.layers}l-fp8", work / "awq"
    if not (src / "model.safetensors.index.json").is_file():
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "quantkit.cli", "make-checkpoint", "--preset", args.preset, "--layers",
                        str(args.layers), "--dtype", "fp8", "-o", str(src), "--force"], check=True)
        print(f"generated {src} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    reader = CheckpointReader(src)
    cfg = reader.config
    tokens = calibration_tokens(src, None, args.n_samples, args.seq_len)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # 1. statistics only
    t = time.perf_counter()
    calibrate(reader, tokens, device=device, progress=True)
    calib_s = time.perf_counter() - t
    calib_gpu = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0

    # 2. the whole AWQ conversion, with a timestamp at the start of each layer
    starts: dict[int, float] = {}
    searches: dict[int, float] = {}
    layer_fn = awq_plan.AWQProducer.layer

    def timed_layer(self, n):
        if n not in starts:
            starts[n] = time.perf_counter()
        res = layer_fn(self, n)
        searches[n] = res.report.get("seconds", 0.0)
        return res

    awq_plan.AWQProducer.layer = timed_layer
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = convert(src, out, target="awq", progress=True,
                      awq={"n_samples": args.n_samples, "seq_len": args.seq_len, "device": str(device)})
    total = time.perf_counter() - t0
    awq_plan.AWQProducer.layer = layer_fn
    gpu_alloc = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    gpu_reserved = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    order = sorted(starts)
    per_layer = [starts[b] - starts[a] for a, b in zip(order, order[1:])]  # full layers: layer n to layer n+1
    middle = per_layer[1:] or per_layer or [total]
    layer_s = sum(middle) / len(middle)
    projected = total + (FULL_LAYERS - args.layers) * layer_s
    flops = search_flops(cfg, tokens.numel(), 20, 1024, 512)
    search_s = [searches[n] for n in order]
    tflops = flops / max(sum(search_s[1:] or search_s) / max(len(search_s[1:] or search_s), 1), 1e-9) / 1e12
    calib_layer = calib_s / args.layers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"\nAWQ at MiniMax-M2 width on {name}: {args.layers} layers, calibration {tokens.shape[0]} x "
          f"{tokens.shape[1]} = {tokens.numel()} tokens")
    print("| stage | seconds per layer | projected, 62 layers | peak GPU allocated | peak host RSS |")
    print("|---|---:|---:|---:|---:|")
    print(f"| calibrate (statistics only) | {calib_layer:.1f} | {calib_layer * FULL_LAYERS / 60:.1f} min | "
          f"{calib_gpu / 2**30:.1f} GiB | |")
    print(f"| convert --to awq (search {sum(search_s) / len(search_s):.1f} s/layer, ~{tflops:.0f} TFLOP/s of search "
          f"matmuls) | {layer_s:.1f} | {projected / 60:.1f} min | {gpu_alloc / 2**30:.1f} GiB "
          f"({gpu_reserved / 2**30:.1f} reserved) | {rss / 2**30:.1f} GiB |")
    print(f"\nper layer (start to start): {[round(x, 1) for x in per_layer]} s; search: "
          f"{[round(x, 1) for x in search_s]} s; whole run {total:.1f} s; {summary.bytes_written / 1e9:.2f} GB written")
    res = {
        "device": name, "layers": args.layers, "tokens": int(tokens.numel()), "n_samples": args.n_samples,
        "seq_len": args.seq_len, "calibrate_seconds": calib_s, "calibrate_seconds_per_layer": calib_layer,
        "convert_seconds": total, "layer_seconds": per_layer, "search_seconds": search_s,
        "seconds_per_layer": layer_s, "projected_62_layers_seconds": projected,
        "search_flops_per_layer_estimate": flops, "search_tflops": tflops,
        "peak_gpu_allocated_bytes": gpu_alloc, "peak_gpu_reserved_bytes": gpu_reserved,
        "peak_gpu_calibrate_bytes": calib_gpu, "peak_rss_bytes": rss, "bytes_written": summary.bytes_written,
        "commit": commit_id(),
        "torch": torch.__version__,
    }
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.json_out}", file=sys.stderr)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
