#!/usr/bin/env python
"""GGUF block quantizer throughput on MiniMax-M2 expert shapes (quantkit.formats.gguf_quants).

    .venv/bin/python scripts/bench_gguf_quants.py --out evals/results/bench_gguf_quants-cpu.json
    .venv/bin/python scripts/bench_gguf_quants.py --device cuda --experts 32 --out gguf-h100.json

For each shape (default: one expert's gate/up [1536, 3072] and down [3072, 1536], or --experts E of them stacked
[E, 1536, 3072], as a converter would hand them over), each type (q4_k, q6_k: what Q4_K_M writes for experts;
q5_k, q8_0 for comparison) and without / with an imatrix: best-of-N wall time of `quantize` on a bf16 weight.
Reported: GB/s of bf16 input, Mweights/s, and the fraction of the device's copy bandwidth measured in the same
run (the roofline a single pass over the weight would have; the k-quant searches make ~20-40 passes).
A table goes to stdout and the same rows, with device, commit and threads, to --out as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from quantkit.formats.gguf_quants import quantize

ROOT = Path(__file__).resolve().parents[1]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: str) -> float:
    """GB/s of a 256 MiB float32 copy (bytes read + written): the memory ceiling on this device."""
    a = torch.empty(64 << 20, dtype=torch.float32, device=device).fill_(1.0)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * 4 / best / 1e9


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON results path")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--types", default="q4_k,q6_k,q5_k,q8_0")
    ap.add_argument("--shapes", default="1536x3072,3072x1536", help="rows x cols of one weight")
    ap.add_argument("--experts", type=int, default=1, help="stack this many weights of each shape")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    ceiling = copy_bandwidth(dev)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    meta = {"device": device_name(dev), "device_type": dev, "commit": commit, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "copy_GBps": round(ceiling, 2), "experts": args.experts}
    print(f"# {meta['device']} ({dev}, {meta['threads']} threads), commit {commit}, copy ceiling {ceiling:.1f} GB/s")
    print(f"| {'shape':>18} | type | imatrix | {'s':>8} | bf16 GB/s | Mweights/s | of ceiling |")
    print("|---:|---|---|---:|---:|---:|---:|")
    rows = []
    g = torch.Generator(device=dev).manual_seed(0)
    for shape_s in args.shapes.split(","):
        r, c = (int(v) for v in shape_s.lower().split("x"))
        shape = (args.experts, r, c) if args.experts > 1 else (r, c)
        w = (torch.randn(shape, generator=g, device=dev) * 0.02).to(torch.bfloat16)
        im_shape = (args.experts, c) if args.experts > 1 else (c,)
        im = torch.rand(im_shape, generator=g, device=dev) * 2
        for qtype in args.types.split(","):
            for use_im in (False, True):
                if use_im and qtype == "q8_0":
                    continue  # ignored by q8_0
                best = float("inf")
                for _ in range(args.repeat):
                    sync(dev)
                    t0 = time.perf_counter()
                    quantize(w, qtype, im if use_im else None)
                    sync(dev)
                    best = min(best, time.perf_counter() - t0)
                gbps = w.numel() * 2 / best / 1e9
                row = {"shape": list(shape), "type": qtype, "imatrix": use_im, "seconds": round(best, 4),
                       "bf16_GBps": round(gbps, 4), "Mweights_per_s": round(w.numel() / best / 1e6, 2),
                       "fraction_of_copy": round(gbps / ceiling, 5)}
                if dev == "cuda":  # the bytes must not depend on the device: 64 rows against the CPU path
                    w64 = w.reshape(-1, c)[:64]
                    im64 = im.reshape(-1, c)[0] if use_im else None
                    on_gpu = quantize(w64, qtype, im64).cpu()
                    on_cpu = quantize(w64.cpu(), qtype, None if im64 is None else im64.cpu())
                    row["cuda_equals_cpu"] = bool(torch.equal(on_gpu, on_cpu))
                    if not row["cuda_equals_cpu"]:
                        print(f"WARNING: {qtype} imatrix={use_im}: CUDA bytes differ from the CPU's")
                rows.append(row)
                print(f"| {'x'.join(map(str, shape)):>18} | {qtype} | {'yes' if use_im else 'no':7} | {best:8.3f} | "
                      f"{gbps:9.4f} | {row['Mweights_per_s']:10.2f} | {row['fraction_of_copy']:10.4%} |")
        del w
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
