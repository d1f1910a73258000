#!/usr/bin/env python
"""Decode-size FP8 kernels on MiniMax-M2 shapes: the one-launch block-FP8 linear (activations quantized inside the
GEMM, K split over programs) against quantize-then-GEMM and bf16 cuBLAS, and the fused MoE with its GEMMs quantizing
their own activations against the quantization launches.

    python scripts/tune_small_m.py --json out.json [--write-configs kernels/configs]   # on an H100/H200

Every call reads weights the previous calls did not: each timed function walks through enough copies of the weights
(or, for the MoE, routings) to pass 4x the GPU's L2, as a decode step reads each layer once from HBM. Times are
medians of CUDA-graph replays. Each one-launch candidate (BLOCK_N x SPLIT_K x num_stages) is checked against
fp8_block_linear_ref first; the fastest per shape and M bucket is filed in configs/fp8_gemm.json under
"N=..,K=..,block-small" with --write-configs.
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
from quantkit.kernels import fp8_gemm, fp8_moe

FP8 = torch.float8_e4m3fn
PROJ = {"qkv": (8192, 3072), "q_proj": (6144, 3072), "kv_proj": (1024, 3072), "o_proj": (3072, 6144)}
MS = [1, 4, 16]
MOE_MS = [1, 2, 4, 8, 16, 32, 64]
H, I, E, TOPK = 3072, 1536, 256, 8


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


def candidates(n: int, k: int) -> list[dict]:
    groups = k // 128
    splits = [s for s in (1, 2, 3, 4, 6, 8, 12, 16) if groups % s == 0]
    return [dict(BLOCK_N=bn, SPLIT_K=s, num_warps=4, num_stages=ns)
            for bn, s, ns in itertools.product((32, 64, 128), splits, (4,))
            if triton.cdiv(n, bn) * s <= 2048]


def tune_linear(hbm_tbps: float) -> tuple[list[dict], dict]:
    rows, table = [], {}
    for name, (n, k) in PROJ.items():
        copies = max(2, -(-4 * l2_bytes() // (n * k)))
        ws_list = rotating(n, k, copies)
        bf16 = [w.to(torch.bfloat16) for w, _ in ws_list[: max(2, copies // 2)]]
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = fp8_gemm.fp8_block_linear_ref(x, *ws_list[0])

            def two_launch():
                for w, ws in ws_list:
                    xq, xs = fp8_gemm.per_token_group_quant_fp8(x, 128)
                    fp8_gemm.w8a8_block_fp8_matmul(xq, xs, w, ws, out_dtype=x.dtype)

            t_two = graph_ms(two_launch, copies)
            t_bf16 = graph_ms(lambda: [F.linear(x, w) for w in bf16], len(bf16))
            best = None
            for cfg in candidates(n, k):
                try:
                    err = rel_err(fp8_gemm.fp8_block_linear_small(x, *ws_list[0], config=cfg), ref)
                    if not err < 2e-3:
                        print(f"{name} M={m} {cfg}: rel err {err:.2e}, dropped", flush=True)
                        continue
                    t = graph_ms(lambda cfg=cfg: [fp8_gemm.fp8_block_linear_small(x, w, ws, config=cfg)
                                                  for w, ws in ws_list], copies)
                except Exception as e:  # a candidate that does not compile (shared memory) is skipped
                    print(f"{name} M={m} {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
                    continue
                if best is None or t < best[0]:
                    best = (t, cfg, err)
            t_one, cfg, err = best
            floor = (n * k + n * k // 128 // 128 * 4) / (hbm_tbps * 1e9)  # ms
            row = dict(op=name, N=n, K=k, M=m, two_launch_ms=t_two, one_launch_ms=t_one, bf16_ms=t_bf16,
                       floor_ms=floor, frac_bw=floor / t_one, config=cfg, rel_err=err)
            rows.append(row)
            print(f"{name} {n}x{k} M={m}: quantize+GEMM {t_two * 1e3:.1f} us, one launch {t_one * 1e3:.1f} us "
                  f"({floor / t_one:.0%} of HBM), bf16 {t_bf16 * 1e3:.1f} us, floor {floor * 1e3:.1f} us; {cfg}",
                  flush=True)
            table.setdefault(f"N={n},K={k},block-small", {})[str(m)] = cfg
    return rows, table


def bench_moe(hbm_tbps: float) -> list[dict]:
    rows = []
    w13 = torch.randn(E, 2 * I, H, device="cuda").clamp(-8, 8).to(FP8)
    w2 = torch.randn(E, H, I, device="cuda").clamp(-8, 8).to(FP8)
    s13 = torch.rand(E, 2 * I // 128, H // 128, device="cuda") * 1e-2 + 1e-3
    s2 = torch.rand(E, H // 128, I // 128, device="cuda") * 1e-2 + 1e-3
    for m in MOE_MS:
        routings = []
        touched = 0
        for _ in range(16):
            ids = torch.stack([torch.randperm(E, device="cuda")[:TOPK] for _ in range(m)]).to(torch.int32)
            routings.append((ids, torch.rand(m, TOPK, device="cuda")))
            touched += ids.unique().numel()
        x = torch.randn(m, H, device="cuda", dtype=torch.bfloat16)
        args = (x, w13, s13, w2, s2)
        a = fp8_moe.fused_moe_fp8(*args, *routings[0][::-1], quant_in_gemm=True)
        b = fp8_moe.fused_moe_fp8(*args, *routings[0][::-1], quant_in_gemm=False)
        same = torch.equal(a, b)
        t = {}
        for q in (False, True):
            t[q] = graph_ms(lambda q=q: [fp8_moe.fused_moe_fp8(*args, w, ids, quant_in_gemm=q)
                                         for ids, w in routings], len(routings))
        per_expert = 3 * H * I * (1 + 1 / 128 / 128 * 4)
        floor = touched / len(routings) * per_expert / (hbm_tbps * 1e9)
        rows.append(dict(op="moe", M=m, experts=touched / len(routings), quant_launches_ms=t[False],
                         quant_in_gemm_ms=t[True], floor_ms=floor, bit_identical=same))
        print(f"MoE M={m}: {touched / len(routings):.1f} experts, with quantization launches {t[False] * 1e3:.1f} us "
              f"({floor / t[False]:.0%}), quantized in the GEMMs {t[True] * 1e3:.1f} us ({floor / t[True]:.0%}), "
              f"floor {floor * 1e3:.1f} us, bit-identical {same}", flush=True)
    return rows


def hbm_read_tbps() -> float:
    x = torch.empty(1 << 29, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    ms = triton.testing.do_bench(lambda: x.sum(dtype=torch.float32), return_mode="median")
    return x.numel() * 2 / (ms * 1e-3) / 1e12


def merge(path: Path, device: str, new: dict) -> None:
    table = json.loads(path.read_text()) if path.exists() else {}
    table.setdefault(device, {}).update(new)
    path.write_text(json.dumps(table, indent=1) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--write-configs", type=Path, default=None, help="merge the winners into DIR/fp8_gemm.json")
    ap.add_argument("--skip-moe", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("error: tune_small_m.py needs a CUDA GPU", file=sys.stderr)
        return 2
    hbm_tbps = hbm_read_tbps()
    name = torch.cuda.get_device_name(0)
    print(f"{name}, HBM read {hbm_tbps:.2f} TB/s, L2 {l2_bytes() >> 20} MiB", flush=True)
    rows, table = tune_linear(hbm_tbps)
    moe = [] if args.skip_moe else bench_moe(hbm_tbps)
    if args.write_configs:
        merge(args.write_configs / "fp8_gemm.json", name, table)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=name, torch=torch.__version__, triton=triton.__version__,
                                                   hbm_read_tbps=hbm_tbps, linear=rows, moe=moe), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
