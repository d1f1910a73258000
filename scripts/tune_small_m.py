#!/usr/bin/env python
"""Decode-size block-FP8 projections on MiniMax-M2 shapes, timed as the model runs them: the GEMM alone on rows
quantized before it (q/k/v, q_proj, kv_proj: by the fused RMSNorm; o_proj: by the decode attention launch, a head a
group); K split over programs against the same without the split, and bf16 cuBLAS.

    python scripts/tune_small_m.py --json out.json [--write-configs kernels/configs]   # on an H100/H200
    python scripts/tune_small_m.py --ms 1 --ops qkv,o_proj --json out.json            # one token's projections

Every call reads weights the previous calls did not: each timed function walks through enough copies of the weights
to pass 4x the GPU's L2, as a decode step reads each layer once from HBM. Times are medians of CUDA-graph replays.
Each candidate (BLOCK_M x BLOCK_N x SPLIT_K; at one row also the CUDA-core GEMV) is checked against
fp8_block_linear_ref first; the fastest per shape and M bucket is merged into configs/fp8_gemm.json
("N=..,K=..,block", buckets 1, 4, 16 by default; --ms 32,128 adds those) with --write-configs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from bench_common import rel_err
from quantkit.kernels import fp8_gemm

FP8 = torch.float8_e4m3fn
PROJ = {"qkv": (8192, 3072), "q_proj": (6144, 3072), "kv_proj": (1024, 3072), "o_proj": (3072, 6144)}
MS = [1, 4, 16]


def graph_ms(fn, calls: int) -> float:
    """Milliseconds per call of fn (which itself makes `calls` calls), median of CUDA-graph replays."""
    return triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median") / calls


def l2_bytes() -> int:
    return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)


def rotating(n: int, k: int, copies: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for _ in range(copies):
        w = torch.randn(n, k, device="cuda").clamp(-8, 8).to(FP8)
        ws = torch.rand(triton.cdiv(n, 128), k // 128, device="cuda") * 1e-2 + 1e-3
        out.append((w, ws))
    return out


def candidates(n: int, k: int, m: int) -> list[dict]:
    """Tiles on the tensor cores: 16 rows (BLOCK_N 16-128, 2 or 4 warps, 4 or 6 stages) up to 16 rows, 32 to 128
    rows a tile past them; at one row also the CUDA-core GEMV (PATH "gemv": 32-128 rows a program on 4 or 8 warps,
    the loop pipelined in 2 stages or not; compiled for sm_90 these hold 3.7-5.7 instructions a weight). K splits
    are kept where the grid holds 256 to 1600 programs (from 128 past 16 rows): fewer leave multiprocessors idle,
    more only add split-K sums."""
    groups = k // 128
    splits = [s for s in (1, 2, 3, 4, 6, 8, 12, 16) if groups % s == 0]

    def fits(bm: int, bn: int, s: int) -> bool:
        return (256 if m <= 16 else 128) <= triton.cdiv(m, bm) * triton.cdiv(n, bn) * s <= 1600

    if m <= 16:
        tiles = [(16, bn, nw, st) for bn, nw, st in ((16, 4, 4), (32, 4, 4), (32, 2, 4), (64, 4, 4), (64, 4, 6),
                                                      (128, 4, 4))]
    else:
        tiles = [(bm, bn, nw, st) for bm in ((32, 64) if m <= 64 else (64, 128))
                 for bn, nw, st in ((32, 4, 4), (64, 4, 4), (64, 8, 3), (128, 4, 3), (128, 8, 3))]
    out = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=1 if m <= 16 else 8, SPLIT_K=s, num_warps=nw,
                num_stages=st) for (bm, bn, nw, st), s in itertools.product(tiles, splits) if fits(bm, bn, s)]
    if m == 1:
        gemvs = ((32, 4, 1), (32, 4, 2), (64, 8, 1), (64, 4, 2), (128, 8, 1))
        out += [dict(PATH="gemv", BLOCK_M=1, BLOCK_N=bn, BLOCK_K=128, GROUP_M=1, SPLIT_K=s, num_warps=nw,
                     num_stages=st)
                for (bn, nw, st), s in itertools.product(gemvs, splits) if fits(1, bn, s)]
    return out


def model_call(x: torch.Tensor):
    """The projection's call as the decode step makes it: fn(w, ws, cfg) -> y. Every input comes quantized by the
    launch that made it (model.FP8_INPUT: the norms for q/k/v, the decode attention for o_proj), outside the timed
    call."""
    xq, xs = fp8_gemm.per_token_group_quant_fp8(x, 128)
    return lambda w, ws, cfg: fp8_gemm.w8a8_block_fp8_matmul(xq, xs, w, ws, out_dtype=x.dtype, config=cfg)


def tune_linear(hbm_tbps: float, ms: list[int], ops: list[str]) -> tuple[list[dict], dict]:
    rows, table = [], {}
    for name, (n, k) in PROJ.items():
        if name not in ops:
            continue
        copies = max(2, -(-4 * l2_bytes() // (n * k)))
        ws_list = rotating(n, k, copies)
        bf16 = [w.to(torch.bfloat16) for w, _ in ws_list[: max(2, copies // 2)]]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = fp8_gemm.fp8_block_linear_ref(x, *ws_list[0])
            linear = model_call(x)
            t_bf16 = graph_ms(lambda: [F.linear(x, w) for w in bf16], len(bf16))
            timed = []
            for cfg in candidates(n, k, m):
                try:
                    err = rel_err(linear(*ws_list[0], cfg), ref)
                    if not err < 2e-3:
                        print(f"{name} M={m} {cfg}: rel err {err:.2e}, dropped", flush=True)
                        continue
                    t = graph_ms(lambda cfg=cfg: [linear(w, ws, cfg) for w, ws in ws_list], copies)
                except Exception as e:  # a candidate that does not compile (shared memory) is skipped
                    print(f"{name} M={m} {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
                    continue
                timed.append((t, cfg, err))
            best = min(timed, key=lambda r: r[0])
            unsplit = min((r for r in timed if r[1]["SPLIT_K"] == 1 and "PATH" not in r[1]), key=lambda r: r[0],
                          default=(float("nan"), None, None))
            gemv = [r for r in timed if "PATH" in r[1]]
            gemv_best = min(gemv, key=lambda r: r[0]) if gemv else None
            floor = (n * k + n * k // 128 // 128 * 4) / (hbm_tbps * 1e9)  # ms
            row = dict(op=name, N=n, K=k, M=m, split_ms=best[0], unsplit_ms=unsplit[0], bf16_ms=t_bf16,
                       floor_ms=floor, frac_bw=floor / best[0], config=best[1], unsplit_config=unsplit[1],
                       rel_err=best[2], gemv_ms=gemv_best and gemv_best[0], gemv_config=gemv_best and gemv_best[1])
            rows.append(row)
            print(f"{name} {n}x{k} M={m}: best unsplit {unsplit[0] * 1e3:.1f} us, split {best[0] * 1e3:.1f} us "
                  f"({floor / best[0]:.0%} of HBM), bf16 {t_bf16 * 1e3:.1f} us, floor {floor * 1e3:.1f} us, "
                  f"gemv {gemv_best[0] * 1e3 if gemv_best else float('nan'):.1f} us; "
                  f"{best[1]}", flush=True)
            table.setdefault(f"N={n},K={k},block", {})[str(m)] = best[1]
    return rows, table


def hbm_read_tbps() -> float:
    x = torch.empty(1 << 29, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    ms = triton.testing.do_bench(lambda: x.sum(dtype=torch.float32), return_mode="median")
    return x.numel() * 2 / (ms * 1e-3) / 1e12


def merge(path: Path, device: str, new: dict) -> None:
    table = json.loads(path.read_text()) if path.exists() else {}
    for shape, buckets in new.items():  # bucket by bucket: the larger buckets' entries stay
        table.setdefault(device, {}).setdefault(shape, {}).update(buckets)
    path.write_text(json.dumps(table, indent=1) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="M buckets to tune (default 1,4,16)")
    ap.add_argument("--ops", default=",".join(PROJ), help=f"projections to tune (default {','.join(PROJ)})")
    ap.add_argument("--write-configs", type=Path, default=None, help="merge the winners into DIR/fp8_gemm.json")
    args = ap.parse_args()
    try:
        ms = [int(m) for m in args.ms.split(",")]
    except ValueError:
        ms = []
    if not ms or min(ms) < 1:
        print(f"error: --ms {args.ms}: comma-separated row counts >= 1", file=sys.stderr)
        return 2
    ops = args.ops.split(",")
    if not set(ops) <= set(PROJ):
        print(f"error: --ops {args.ops}: choose among {', '.join(PROJ)}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: tune_small_m.py needs a CUDA GPU", file=sys.stderr)
        return 2
    hbm_tbps = hbm_read_tbps()
    name = torch.cuda.get_device_name(0)
    print(f"{name}, HBM read {hbm_tbps:.2f} TB/s, L2 {l2_bytes() >> 20} MiB", flush=True)
    rows, table = tune_linear(hbm_tbps, ms, ops)
    if args.write_configs:
        merge(args.write_configs / "fp8_gemm.json", name, table)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=name, torch=torch.__version__, triton=triton.__version__,
                                                   hbm_read_tbps=hbm_tbps, linear=rows), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
