#!/usr/bin/env python
"""The W4A16 K-major linear's paths on the runtime's projection shapes, and the router in one launch, on one GPU.

    python scripts/bench_w4a16_linear.py OUT.json      # on an H100/H200, about a minute

For q/k/v fused (N = 8192, K = 3072) and o_proj (3072 x 6144), group 128, random codes: w4a16_kmajor_linear with
the launcher's choice and with each path forced ("gemv" up to 8 rows, "mma" up to 1024, "dequant" everywhere), the
dequantization alone, and cuBLAS bf16 on a weight of the same shape, at M = 1 to 4096. Then fused_ops.router (one
launch) against what MoE.route otherwise runs (the hidden state cast to fp32, the fp32 GEMM, route_topk), checking
that both pick the same experts. Microseconds, medians of CUDA-graph replays (triton.testing.do_bench_cudagraph).
Correctness is the GPU tests' business (tests/test_kernels_w4a16.py, tests/test_kernels_fused_ops.py).

    python scripts/bench_w4a16_linear.py OUT.json --tune 60 [--tune-ms 1,2,4,8,16] [--write-configs]

tunes instead: for each shape and M, the launcher's config first, then the GEMV path (one row a program: 32 or 64
weight rows a program, K split 1-8 ways, the register prefetch or the loop software-pipelined over 2-3 stages with
one or two groups a step) at one row and the tensor-core (mma) path (16-row blocks of 32 or 64 columns, 2-3
stages, one or two groups a step, K split 1-4 ways) from two, each checked against w4a16_kmajor_linear_ref before it
is timed, within SECONDS a shape and M. --write-configs files each winner in kernels/configs/w4a16_linear.json under
this GPU's name (and copies the table to OUT's folder), with the launcher's present choices at the other buckets
(32 to 4096 rows), so that no other M changes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import triton
from bench_common import checked_timing, merge_table
from quantkit.kernels import fp8_gemm, fused_ops, w4a16_moe

SHAPES = {"qkv_proj": (8192, 3072), "o_proj": (3072, 6144)}
MS = (1, 2, 4, 8, 16, 64, 128, 256, 1024, 4096)
TUNE_MS = (1, 2, 4, 8, 16)
KEPT_BUCKETS = (32, 64, 128, 256, 1024, 4096)  # filed as the launcher runs them now


def bench(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median") * 1e3


def weights(n: int, k: int, gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.randint(-2**31, 2**31 - 1, (n, k // 8), generator=gen, device="cuda", dtype=torch.int32),
            torch.randint(0, 16, (n, k // 128), generator=gen, device="cuda", dtype=torch.uint8),
            (torch.rand(n, k // 128, generator=gen, device="cuda") * 4e-3 + 1e-3).half()]


def candidates(m: int, groups: int) -> list[dict]:
    """Configs to try at M rows (K of `groups` groups of 128): GEMV at one row, mma from two."""
    out = []
    if m == 1:
        # GSTEP named in each: the launcher's own entry (GSTEP 2) is under every candidate, and the register
        # prefetch takes one group a step
        loops = [dict(PREFETCH=0, STAGES=st, GSTEP=gs) for gs in (2, 1) for st in (2, 3)] + [dict(PREFETCH=2,
                                                                                                 STAGES=1, GSTEP=1)]
        for bn, nw in ((32, 2), (16, 2), (32, 4)):
            for split in (2, 4, 3, 6, 8, 1):
                if groups % split == 0:
                    out += [dict(PATH="gemv", BLOCK_M=1, BLOCK_N=bn, GROUP_M=1, num_warps=nw, num_stages=1,
                                 SPLIT_K=split, **loop) for loop in loops]
    else:  # from 32 rows, 32- and 64-row blocks first (each weight tile read once a row block), then 16-row ones
        for bm in [b for b in (64, 32) if b <= m] + [16]:
            for bn in (32, 64):
                for st in (2, 3):
                    for gs in (1, 2):
                        for split in (1, 2, 4) if bm == 16 else (1, 2):
                            if groups % split == 0:
                                out.append(dict(PATH="mma", BLOCK_M=bm, BLOCK_N=bn, GROUP_M=8 if bm > 16 else 1,
                                                num_warps=4, num_stages=st, GSTEP=gs, SPLIT_K=split))
    return out


def tune(out: Path, seconds: float, ms: list[int], write: bool) -> None:
    """Each shape and M's candidates, the launcher's config first; the fastest filed (--write-configs)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    device = torch.device("cuda")
    name = fp8_gemm.device_key(device)
    rows, entries, kept = [], {}, {}
    for op, (n, k) in SHAPES.items():
        wk = weights(n, k, gen)
        shape = f"N={n},K={k},G=128"
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = w4a16_moe.w4a16_kmajor_linear_ref(x, *wk)
            base = w4a16_moe.linear_config(device, m, n, k, 128)
            t0, best, launcher_us = time.monotonic(), None, None
            for i, cfg in enumerate([base] + candidates(m, k // 128)):
                if i and time.monotonic() - t0 > seconds:
                    break
                fn = lambda c=cfg: w4a16_moe.w4a16_kmajor_linear(x, *wk, config=c)  # noqa: E731
                timing = checked_timing(fn, ref, 1e-2, bench, f"{op} M={m} {cfg}")
                if timing is None:
                    continue
                err, us = timing
                row = dict(op=op, M=m, config=cfg, us=round(us, 2), rel_err=err, launcher=i == 0)
                rows.append(row)
                print(json.dumps(row), flush=True)
                launcher_us = row["us"] if i == 0 else launcher_us
                if best is None or us < best[0]:
                    best = (us, cfg)
            if best is not None:
                entries.setdefault(shape, {})[str(m)] = best[1]
                print(f"{op} M={m}: launcher {launcher_us} us, best {best[0]:.2f} us {best[1]}", flush=True)
        kept[shape] = {str(m): w4a16_moe.linear_config(device, m, n, k, 128) for m in KEPT_BUCKETS}
    out.write_text(json.dumps(rows, indent=1) + "\n")
    if write:
        for shape, buckets in entries.items():
            merge_table("w4a16_linear.json", shape, name, buckets, kept[shape], out.parent, TABLE_COMMENT)


TABLE_COMMENT = ("Tuned block configurations for w4a16_kmajor_linear (kernels/w4a16_moe.py): {device name as "
                 "torch.cuda.get_device_name() returns it: {'N=<out>,K=<in>,G=<group>': {M bucket: config}}}; the "
                 "launcher takes the bucket nearest to M (the smaller on a tie) over its defaults "
                 "(_linear_default_config), keys as the MoE table's less SPLIT_K2 and ONE_LAUNCH. Written by "
                 "scripts/bench_w4a16_linear.py --tune S --write-configs.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--tune", type=float, default=0.0, help="tune instead, SECONDS a shape and M")
    ap.add_argument("--tune-ms", default=",".join(map(str, TUNE_MS)))
    ap.add_argument("--write-configs", action="store_true")
    args = ap.parse_args()
    if args.tune:
        tune(args.out, args.tune, [int(v) for v in args.tune_ms.split(",")], args.write_configs)
        return
    rows = []
    gate = torch.randn(256, 3072, device="cuda") / 60
    bias = torch.randn(256, device="cuda") / 10
    for n in (1, 4, 32, 64):
        h = torch.randn(n, 3072, device="cuda").bfloat16()
        same = bool(torch.equal(fused_ops.router(h, gate, bias, 8)[0], fused_ops.router_ref(h, gate, bias, 8)[0]))
        rows.append(dict(op="router", N=n, one_launch_us=bench(lambda: fused_ops.router(h, gate, bias, 8)),
                         three_launches_us=bench(lambda: fused_ops.route_topk(h.float() @ gate.t(), bias, 8)),
                         same_ids=same))
        print(rows[-1], flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, (n, k) in SHAPES.items():
        wk = weights(n, k, gen)
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            r = dict(op=name, M=m, default_path=w4a16_moe.linear_config(x.device, m, n, k, 128)["PATH"])
            for p in ("default", "gemv", "mma", "dequant"):
                if p == "gemv" and m > 8 or p == "mma" and m > 1024:
                    continue
                cfg = None if p == "default" else {"PATH": p}
                r[p + "_us"] = bench(lambda: w4a16_moe.w4a16_kmajor_linear(x, *wk, config=cfg))
            r["dequant_only_us"] = bench(lambda: w4a16_moe.kmajor_dequantize(*wk))
            r["bf16_us"] = bench(lambda: x @ wb.t())
            rows.append(r)
            print({a: (round(v, 1) if isinstance(v, float) else v) for a, v in r.items()}, flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
