#!/usr/bin/env python
"""The W4A16 K-major linear's paths on the runtime's projection shapes, and the router in one launch, on one GPU.

    python scripts/bench_w4a16_linear.py OUT.json      # on an H100/H200, about a minute

For q/k/v fused (N = 8192, K = 3072) and o_proj (3072 x 6144), group 128, random codes: w4a16_kmajor_linear with
the launcher's choice and with each path forced ("gemv" up to 8 rows, "mma" up to 1024, "dequant" everywhere), the
dequantization alone, and cuBLAS bf16 on a weight of the same shape, at M = 1 to 4096. Then fused_ops.router (one
launch) against what MoE.route otherwise runs (the hidden state cast to fp32, the fp32 GEMM, route_topk), checking
that both pick the same experts. Microseconds, medians of CUDA-graph replays (triton.testing.do_bench_cudagraph).
Correctness is the GPU tests' business (tests/test_kernels_w4a16.py, tests/test_kernels_fused_ops.py).
"""

from __future__ import annotations

import json
import sys

import torch
import triton
from quantkit.kernels import fused_ops, w4a16_moe

SHAPES = {"qkv_proj": (8192, 3072), "o_proj": (3072, 6144)}
MS = (1, 2, 4, 8, 16, 64, 128, 256, 1024, 4096)


def bench(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median") * 1e3


def main() -> None:
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
        wk = [torch.randint(-2**31, 2**31 - 1, (n, k // 8), generator=gen, device="cuda", dtype=torch.int32),
              torch.randint(0, 16, (n, k // 128), generator=gen, device="cuda", dtype=torch.uint8),
              (torch.rand(n, k // 128, generator=gen, device="cuda") * 4e-3 + 1e-3).half()]
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
    with open(sys.argv[1], "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
