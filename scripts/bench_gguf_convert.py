#!/usr/bin/env python
"""End-to-end `convert --to gguf` on a real-width MiniMax-M2 slice: throughput and peak memory per type and device.

    .venv/bin/python scripts/bench_gguf_convert.py --workdir /tmp/qk-gguf --types bf16 q8_0 --out gguf-convert-cpu.json
    .venv/bin/python scripts/bench_gguf_convert.py --workdir /tmp/qk-gguf --types q8_0 q4_k_m q6_k --device cuda \
        --out gguf-convert-h100.json

Generates (once, kept in --workdir) a `minimax-m2` preset checkpoint of --layers layers in the official FP8 layout
(real widths: 256 experts of 1536 x 3072, vocab 200064: 4.9 B parameters for one layer), then converts it to each
--type in a fresh process, one after the other, deleting each output before the next. Reported per run: wall time,
GB/s of BF16-equivalent input (2 bytes per parameter, the figure llama-quantize is usually quoted in), GB written,
and the converting process's peak RSS, which must stay at one expert plus the 1.2 GB embedding/output table
whatever the layer count. A table goes to stdout and the rows, with device, commit and threads, to --out as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUN = r"""
import json, sys
from quantkit.gguf_convert import convert_gguf
s = convert_gguf(sys.argv[1], sys.argv[2], qtype=sys.argv[3], device=sys.argv[4], progress=False)
print(json.dumps({"seconds": s.seconds, "bytes_read": s.bytes_read, "bytes_written": s.bytes_written,
                  "peak_rss": s.peak_rss, "tensors": s.tensors}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--types", nargs="+", default=["bf16", "q8_0"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, required=True, help="JSON results file")
    args = ap.parse_args()

    import torch

    from quantkit.arch import MiniMaxM2Config
    from quantkit.synth import make_checkpoint

    ckpt = args.workdir / f"m2-{args.layers}l-fp8"
    if not (ckpt / "model.safetensors.index.json").is_file():
        make_checkpoint(ckpt, preset="minimax-m2", layers=args.layers, dtype="fp8", force=True, progress=True)
    params = MiniMaxM2Config.from_folder(ckpt).parameter_count()[0]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    rows = []
    for qtype in args.types:
        out = args.workdir / f"out-{qtype}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", RUN, str(ckpt), str(out), qtype, args.device],
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:
            sys.exit(f"{qtype}: conversion failed\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        shutil.rmtree(out, ignore_errors=True)
        rows.append({"type": qtype, "device": args.device, "layers": args.layers, "parameters": params,
                     "seconds": r["seconds"], "wall_seconds": wall, "bf16_gb_per_s": 2 * params / r["seconds"] / 1e9,
                     "gb_written": r["bytes_written"] / 1e9, "peak_rss_gib": r["peak_rss"] / 2**30})
        print(f"{qtype:8s} {args.device:6s} {r['seconds']:8.1f} s  {rows[-1]['bf16_gb_per_s']:7.3f} GB/s bf16-in  "
              f"{rows[-1]['gb_written']:6.2f} GB out  peak RSS {rows[-1]['peak_rss_gib']:.2f} GiB", flush=True)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": commit,
            "device": device_name, "threads": torch.get_num_threads(), "checkpoint": str(ckpt), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(meta, indent=2) + "\n")
    print("\n| type | device | layers | s | GB/s (bf16 in) | GB out | peak RSS GiB |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['type']} | {r['device']} | {r['layers']} | {r['seconds']:.1f} | {r['bf16_gb_per_s']:.3f} | "
              f"{r['gb_written']:.2f} | {r['peak_rss_gib']:.2f} |")


if __name__ == "__main__":
    main()
