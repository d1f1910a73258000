#!/usr/bin/env python3
"""A decode step's FP8 kernel chain at MiniMax-M2's widths, one token, timed with and without programmatic dependent
launch (QUANTKIT_PDL), in CUDA graphs: per layer, add+RMSNorm, q/k/v (block FP8, 8192 x 3072), o_proj on the q
part (3072 x 6144; the attention itself left out), add+RMSNorm, the router (fp32, 256 experts, top-8) and the FP8
MoE on unsorted pairs. LAYERS copies of the dense weights (one set of experts, picked afresh by random inputs) so
the projections read HBM, not L2. The outputs with PDL on must equal those with it off, bit for bit. --modes names
the QUANTKIT_PDL values timed (fp8_gemm.pdl_mode: 1 early launch with weight prefetch, 3 late launch, 5 no prefetch,
7 both). A mode with "+nr" (e.g. "0+nr") runs each layer's second add+RMSNorm inside the router's launch
(fused_ops.add_rms_norm_router, as a decode step at one token does): its outputs are compared within rounding, the
norm's sum running in another order.

    python scripts/bench_pdl_chain.py [--layers 4] [--modes 0,1] [--json OUT]      # on an H100/H200
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import triton
from bench_common import block_quant
from quantkit.kernels import fp8_gemm, fp8_moe, fused_ops

H, I, E, TOPK, QKV, QO = 3072, 1536, 256, 8, 8192, 6144


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--modes", default="0,1", help="QUANTKIT_PDL values timed, the first the reference")
    ap.add_argument("--json")
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    dev = torch.device("cuda")
    layers = []
    for _ in range(args.layers):
        wqkv, sqkv = block_quant(torch.randn(QKV, H, device=dev, generator=g) * 0.02)
        wo, so = block_quant(torch.randn(H, QO, device=dev, generator=g) * 0.02)
        layers.append(dict(wqkv=wqkv, sqkv=sqkv, wo=wo, so=so,
                           n1=1 + 0.1 * torch.randn(H, device=dev, generator=g).bfloat16(),
                           n2=1 + 0.1 * torch.randn(H, device=dev, generator=g).bfloat16(),
                           gate=torch.randn(E, H, device=dev, generator=g) * 0.05,
                           bias=torch.randn(E, device=dev, generator=g) * 0.01))
    w13 = torch.empty(E, 2 * I, H, device=dev, dtype=torch.float8_e4m3fn)
    w2 = torch.empty(E, H, I, device=dev, dtype=torch.float8_e4m3fn)
    s13 = torch.empty(E, 2 * I // 128, H // 128, device=dev)
    s2 = torch.empty(E, H // 128, I // 128, device=dev)
    for e in range(E):
        w13[e], s13[e] = block_quant(torch.randn(2 * I, H, device=dev, generator=g) * 0.02)
        w2[e], s2[e] = block_quant(torch.randn(H, I, device=dev, generator=g) * 0.02)
    x0 = torch.randn(1, H, device=dev, generator=g).bfloat16()
    r0 = torch.randn(1, H, device=dev, generator=g).bfloat16()

    def step(x: torch.Tensor, r: torch.Tensor, norm_router: bool) -> tuple[torch.Tensor, torch.Tensor]:
        for p in layers:
            r, h = fused_ops.add_rms_norm(x, r, p["n1"], 1e-6)
            qkv = fp8_gemm.fp8_block_linear(h, p["wqkv"], p["sqkv"])
            o = fp8_gemm.fp8_block_linear(qkv[:, :QO], p["wo"], p["so"])
            if norm_router:
                r, h, _, _, ids, tw = fused_ops.add_rms_norm_router(o, r, p["n2"], 1e-6, p["gate"], p["bias"], TOPK)
            else:
                r, h = fused_ops.add_rms_norm(o, r, p["n2"], 1e-6)
                ids, tw = fused_ops.router(h, p["gate"], p["bias"], TOPK)
            x = fp8_moe.fused_moe_fp8(h, w13, s13, w2, s2, tw, ids)
        return x, r

    results, outs = {}, {}
    modes = args.modes.split(",")
    for mode in modes:
        pdl, _, extra = mode.partition("+")
        os.environ[fp8_gemm.PDL_ENV] = pdl
        step(x0, r0, extra == "nr")  # compile
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step(x0, r0, extra == "nr")
        graph.replay()
        torch.cuda.synchronize()
        outs[mode] = [t.clone() for t in out]
        ms = triton.testing.do_bench(graph.replay, warmup=20, rep=200, return_mode="median")
        results[f"pdl={mode}"] = {"us_per_layer": 1000 * ms / args.layers, "pdl_active": fp8_gemm.pdl(dev)}
        print(f"QUANTKIT_PDL={mode}: {1000 * ms / args.layers:.1f} us a layer "
              f"(PDL active: {fp8_gemm.pdl(dev)})", flush=True)
    ref = modes[0]
    same = all(torch.equal(a, b) for m in modes[1:] if "+" not in m for a, b in zip(outs[ref], outs[m]))
    print(f"outputs bit for bit the same: {same}")
    for m in modes[1:]:
        if "+" in m:
            err = max(float((a.float() - b.float()).norm() / b.float().norm()) for a, b in zip(outs[m], outs[ref]))
            results[f"pdl={m}"]["rel_err"] = err
            print(f"{m}: relative difference from {ref} {err:.2e}", flush=True)
            same = same and err < 2e-2
    results.update(device=torch.cuda.get_device_name(), layers=args.layers, identical=same,
                   torch=torch.__version__, triton=triton.__version__)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if not same:
        raise SystemExit("PDL changed the outputs")


if __name__ == "__main__":
    main()
