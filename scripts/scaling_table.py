#!/usr/bin/env python
"""The scaling table of `quantkit bench` results: output tokens/s per setup and concurrency, and its efficiency
against the one-GPU run of the same backend on the same machine.

    python scripts/scaling_table.py evals/results/gpu_parallel-*xH200 [--md out.md]

Each DIR holds bench_*.json files written by scripts/gpu_parallel_check.sh (one machine per DIR). Efficiency is
tok/s(N GPUs) / (N x tok/s(1 GPU)), the one-GPU run being that DIR's TP1 run of the same backend; speed-up is
tok/s(N) / tok/s(1). The per-layer column is decode time per layer at concurrency 1 (quantkit bench --per-layer).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(dirs: list[str]) -> list[dict]:
    runs = []
    for d in dirs:
        for f in sorted(Path(d).glob("bench_*.json")):
            r = json.loads(f.read_text())
            r["dir"] = d
            runs.append(r)
    if not runs:
        raise SystemExit(f"error: no bench_*.json in {' '.join(dirs)}")
    return runs


def table(runs: list[dict]) -> str:
    concs = sorted({s["concurrency"] for r in runs for s in r["serving"]})
    head = ["backend", "setup", "GPUs"] + [f"c={c} tok/s (speed-up, efficiency)" for c in concs] + \
        ["layer ms at c=1", "commit"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|" + "---:|" * len(concs) + "---:|---|"]
    for r in sorted(runs, key=lambda r: (r["meta"]["backend"], r["meta"]["world"], r["meta"]["tp"] < r["meta"]["ep"])):
        m = r["meta"]
        base = next((b for b in runs if b["dir"] == r["dir"] and b["meta"]["backend"] == m["backend"]
                     and b["meta"]["world"] == 1), None)
        cells = [m["backend"], m["setup"], str(m["world"])]
        for c in concs:
            s = next((s for s in r["serving"] if s["concurrency"] == c), None)
            b = next((s for s in base["serving"] if s["concurrency"] == c), None) if base else None
            if s is None:
                cells.append("-")
            elif b is None or m["world"] == 1:
                cells.append(f"{s['output_tok_s']:,.0f}")
            else:
                up = s["output_tok_s"] / b["output_tok_s"]
                cells.append(f"{s['output_tok_s']:,.0f} ({up:.2f}x, {up / m['world']:.0%})")
        layer = next((p["layer_ms"] for p in r.get("per_layer", []) if p["concurrency"] == 1), None)
        cells += [f"{layer:.3f}" if layer is not None else "-", m.get("commit", "-")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--md", default=None, help="write the table here too")
    args = ap.parse_args()
    md = table(load(args.dirs))
    print(md)
    if args.md:
        Path(args.md).write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
