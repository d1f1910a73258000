#!/usr/bin/env python
"""Where a decode step's time goes, per layer: the GPU kernels one decoder layer launches (count and time, from the
PyTorch profiler on an eager step) beside the layer's CUDA-graph time, on a generated real-width MiniMax-M2 slice.

    python scripts/profile_decode.py --backends fp8,awq --concurrency 1,32 --json out.json

Per layer = (whole step - embedding and head alone) / layers, for both the kernel sums and the graph replay. The
difference between the graph time and the kernel sum is the time between kernels (launch gaps inside the graph).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
from quantkit.evals.bench import decode_step, time_call
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from quantkit.runtime import load_model
from quantkit.synth import make_checkpoint


def kernels(fn) -> collections.Counter:
    """{kernel name: [count, microseconds]} of one call of fn."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    out: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            out[e.name][0] += 1
            out[e.name][1] += e.time_range.elapsed_us()
    return out


def profile_step(model, c: int, context: int, top: int) -> dict:
    dev = model.device
    L = len(model.layers)
    *_, full, head = decode_step(model, c, context)
    kf, kh = kernels(full), kernels(head)
    per_layer = {}
    for name, (n, us) in kf.items():
        hn, hus = kh.get(name, (0, 0.0))
        if n - hn > 0:
            per_layer[name] = ((n - hn) / L, (us - hus) / L)
    graph_layer_us = (time_call(full, dev) - time_call(head, dev)) / L * 1e6
    rows = sorted(per_layer.items(), key=lambda kv: -kv[1][1])
    return {"concurrency": c, "kernels_per_layer": sum(n for n, _ in per_layer.values()),
            "kernel_us_per_layer": sum(us for _, us in per_layer.values()), "graph_us_per_layer": graph_layer_us,
            "top": [{"kernel": k[:120], "count": n, "us": us} for k, (n, us) in rows[:top]]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="fp8,awq")
    ap.add_argument("--concurrency", default="1,32")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--work", default="/tmp/quantkit-profile")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("error: profile_decode.py needs a CUDA GPU", file=sys.stderr)
        return 2
    results = []
    for backend in args.backends.split(","):
        ckpt = Path(args.work) / f"m2-{args.layers}layers-{backend}"
        if not (ckpt / "model.safetensors.index.json").exists():
            make_checkpoint(ckpt, preset="minimax-m2", layers=args.layers, dtype=backend)
        model = load_model(str(ckpt), dtype=torch.bfloat16, device="cuda", backend=backend)
        for c in (int(x) for x in args.concurrency.split(",")):
            r = profile_step(model, c, args.context, args.top)
            r["backend"] = backend
            results.append(r)
            print(f"\n## {backend}, concurrency {c}: {r['kernels_per_layer']:.0f} kernels per layer, "
                  f"{r['kernel_us_per_layer']:.1f} us in kernels, {r['graph_us_per_layer']:.1f} us per layer in a "
                  f"CUDA graph\n")
            print("| kernel | per layer | us per layer |\n|---|---:|---:|")
            for t in r["top"]:
                print(f"| `{t['kernel'][:90]}` | {t['count']:.1f} | {t['us']:.1f} |")
        del model
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                               "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
