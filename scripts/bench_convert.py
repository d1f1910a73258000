#!/usr/bin/env python
"""FP8 -> BF16 conversion throughput and peak memory on real-width MiniMax-M2 slices.

    .venv/bin/python scripts/bench_convert.py --workdir /tmp/qk-bench --layers 1 2

For each layer count: generate a `minimax-m2` preset checkpoint in the official FP8 layout (real widths: 256
experts of 1536 x 3072, vocab 200064), read its shards raw with a cold page cache, then convert it to BF16 in a
fresh process, also from a cold page cache. Reported: input GB/s of the conversion beside the raw read speed of
the same files in the same run, the disk's raw write speed for as many bytes as the conversion wrote, and the
conversion's peak RSS, which must not grow with the layer count. BF16 output is 1.6x the FP8 input, so where the
disk writes slower than it reads, the I/O floor (the larger of raw read time and raw write time) is the bound.
Results go to evals/results/bench_convert-<date>-<commit>.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 16 << 20


def drop_cache(files: list[Path]) -> None:
    """Evict the files from the page cache so the next read comes from the disk."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(files: list[Path]) -> tuple[int, float]:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total, t0 = 0, time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    return total, time.perf_counter() - t0


def raw_write(path: Path, nbytes: int) -> float:
    """Seconds to write nbytes of incompressible data to a file and fsync it: the disk's write ceiling."""
    block = os.urandom(CHUNK)
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as fh:
        left = nbytes
        while left > 0:
            left -= fh.write(block[:min(left, CHUNK)])
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - t0
    path.unlink()
    return seconds


CONVERT = """
import json, sys
from quantkit.convert import convert
s = convert(sys.argv[1], sys.argv[2], target=sys.argv[3], scheme=sys.argv[4] or None, force=True, progress=False)
print(json.dumps({"seconds": s.seconds, "bytes_read": s.bytes_read, "bytes_written": s.bytes_written,
                  "peak_rss": s.peak_rss, "shards": s.shards, "tensors": s.tensors}))
"""


def measure(src: Path, out: Path, target: str, scheme: str, workdir: Path) -> dict:
    """Convert src in a fresh process from a cold page cache, beside raw read and write of the same bytes."""
    files = sorted(src.glob("*.safetensors"))
    drop_cache(files)
    raw_bytes, raw_s = raw_read(files)
    drop_cache(files)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CONVERT, str(src), str(out), target, scheme], check=True,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    s = json.loads(proc.stdout.strip().splitlines()[-1])
    write_s = raw_write(workdir / "write-test.bin", s["bytes_written"])
    floor = max(raw_s, write_s)  # reading the input and writing the output, each at the disk's own speed
    row = {
        "conversion": f"{src.name} -> {target}{'-' + scheme if scheme else ''}",
        "source_bytes": raw_bytes,
        "raw_read_gbps": raw_bytes / raw_s / 1e9,
        "convert_seconds": s["seconds"],
        "convert_wall_seconds": wall,
        "convert_in_gbps": s["bytes_read"] / s["seconds"] / 1e9,
        "convert_out_gbps": s["bytes_written"] / s["seconds"] / 1e9,
        "bytes_written": s["bytes_written"],
        "peak_rss_gib": s["peak_rss"] / 2**30,
        "raw_write_gbps": s["bytes_written"] / write_s / 1e9,
        "io_floor_seconds": floor,
        "fraction_of_io_floor": floor / s["seconds"],
    }
    row["fraction_of_raw_read"] = row["convert_in_gbps"] / row["raw_read_gbps"]
    print(json.dumps(row), flush=True)
    return row


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=ROOT / "out" / "bench-convert")
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints and outputs")
    ap.add_argument("--fp8", action="store_true", help="also convert the BF16 result to FP8, block and channel")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.layers:
        src, out = args.workdir / f"m2-fp8-{n}L", args.workdir / f"m2-bf16-{n}L"
        if not (src / "model.safetensors.index.json").is_file():
            subprocess.run([sys.executable, "-m", "quantkit.cli", "make-checkpoint", "--preset", "minimax-m2",
                            "--layers", str(n), "--dtype", "fp8", "-o", str(src), "--force"], check=True)
        row = measure(src, out, "bf16", "", args.workdir)
        rows.append({"layers": n, **row})
        if args.fp8:
            for scheme in ("block", "channel"):
                dest = args.workdir / f"m2-fp8{scheme}-{n}L"
                rows.append({"layers": n, **measure(out, dest, "fp8", scheme, args.workdir)})
                shutil.rmtree(dest, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    result = {
        "benchmark": "convert fp8 -> bf16 (and bf16 -> fp8), minimax-m2 preset (real widths), cold page cache",
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
        "rows": rows,
    }
    dest = ROOT / "evals" / "results" / f"bench_convert-{result['date']}-{commit}.json"
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['benchmark']}; {result['machine']['cpu']}, {result['machine']['cores']} cores; commit {commit}\n")
    print("| conversion | layers | GB in | GB out | raw read GB/s | raw write GB/s | convert GB/s in | of raw read "
          "| of I/O floor | peak RSS GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['conversion']} | {r['layers']} | {r['source_bytes'] / 1e9:.2f} | {r['bytes_written'] / 1e9:.2f} "
              f"| {r['raw_read_gbps']:.2f} | {r['raw_write_gbps']:.2f} | {r['convert_in_gbps']:.2f} "
              f"| {r['fraction_of_raw_read']:.0%} | {r['fraction_of_io_floor']:.0%} | {r['peak_rss_gib']:.2f} |")
    print(f"\nwritten to {dest.relative_to(ROOT)}")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
