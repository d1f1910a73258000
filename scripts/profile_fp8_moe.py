#!/usr/bin/env python
"""Where the FP8 MoE layer's time goes at prefill sizes, and each GEMM's own best tile.

    python scripts/profile_fp8_moe.py --out evals/results/fp8_moe_prefill      # on an H100/H200, a few minutes

For each M (default 1024 and 4096 tokens; MiniMax-M2's E=256, top-8, H=3072, I=1536, block scales): the whole
layer with the launcher's config (median of CUDA-graph replays) and each of its launches timed by the profiler;
the whole layer on the TMA GEMMs warp-specialized ("WS" entries of 64- and 128-row blocks); then GEMM 1 (gate + up,
SiLU * mul) and GEMM 2 (down, router weight) alone over a grid of tiles, each checked against the launcher config's
output first. TFLOP/s count the routed pairs' FLOPs ("useful") and the padded
row blocks' ("issued": every block of the sorted list runs whole), so the padding's share is visible. Rows go to
stdout as JSON and to OUT/rows.jsonl.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import triton
from bench_common import commit_id, rel_err
from bench_decode_moe import kernel_times
from bench_kernels import ceilings
from quantkit.kernels import fp8_gemm, fp8_moe

H, I, E, TOPK, S = 3072, 1536, 256, 8, 128


def timed(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")


def tiles(gated: bool) -> list[dict]:
    """Tiles of 64 or 128 rows (the sort's block) on 8 warps: GEMM 1 holds two accumulators, so at most 128 x 128 a
    program; GEMM 2 one, up to 128 x 256. Two stages for the largest only (room for the accumulators)."""
    out = []
    for bm, bn, ns in itertools.product([64, 128], [64, 128, 256], [2, 3, 4]):
        acc = bm * bn * (2 if gated else 1)
        smem = ns * 128 * (bm + bn * (2 if gated else 1))
        if bn == 256 and gated or acc > 128 * 256 or smem > 200 * 1024 or ns == 2 and acc < 128 * 256:
            continue
        if bm == 128 and bn == 64:
            continue
        out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=ns))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ms", default="1024,4096")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "rows.jsonl"

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")

    ceil = ceilings()
    dev = torch.device("cuda")
    emit({"device": fp8_gemm.device_key(dev), "commit": commit_id(), **ceil})
    peak = ceil["fp8_matmul_tflops"]
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(E, 2 * I, H, device="cuda", generator=g) * 64).to(torch.float8_e4m3fn)
    w2 = (torch.randn(E, H, I, device="cuda", generator=g) * 64).to(torch.float8_e4m3fn)
    w13_s = torch.rand(E, 2 * I // S, H // S, device="cuda", generator=g) * 1e-4 + 1e-4
    w2_s = torch.rand(E, H // S, I // S, device="cuda", generator=g) * 1e-4 + 1e-4
    for m in (256, 512, 1024, 4096):  # the sort by expert: torch kernels against the chunked Triton launches
        ids = torch.topk(torch.rand(m, E, device="cuda", generator=g), TOPK, dim=-1)[1]
        for bm in (64, 128):
            same = all(torch.equal(a, b)
                       for a, b in zip(fp8_moe._align(ids, bm, E), fp8_moe._align_chunked(ids, bm, E)))
            emit({"M": m, "what": "align", "BLOCK_M": bm, "identical": same,
                  "torch_us": round(1e3 * timed(lambda ids=ids, bm=bm: fp8_moe._align(ids, bm, E)), 1),
                  "chunked_us": round(1e3 * timed(lambda ids=ids, bm=bm: fp8_moe._align_chunked(ids, bm, E)), 1),
                  "route_us": round(1e3 * timed(lambda ids=ids, bm=bm: fp8_moe._route(ids, bm, E)), 1)})
    for m in (int(v) for v in args.ms.split(",")):
        x = torch.randn(m, H, device="cuda", dtype=torch.bfloat16, generator=g)
        scores = torch.sigmoid(torch.randn(m, E, device="cuda", generator=g))
        topk_w, topk_ids = torch.topk(scores, TOPK, dim=-1)
        topk_w = (topk_w / topk_w.sum(-1, keepdim=True)).contiguous()
        counts = torch.bincount(topk_ids.flatten(), minlength=E)
        pairs = m * TOPK
        layer = lambda x=x, tw=topk_w, ti=topk_ids: fp8_moe.fused_moe_fp8(x, w13, w13_s, w2, w2_s, tw, ti)  # noqa: E731
        layer_out = layer()
        t = timed(layer)
        flops = 2 * pairs * 3 * H * I
        cfg = fp8_moe.moe_config(dev, m, TOPK, E, I, H, "block")
        emit({"M": m, "what": "layer", "config": cfg, "ms": round(t, 4), "tflops": round(flops / t / 1e9, 1),
              "pct_peak": round(100 * flops / t / 1e9 / peak, 1), "kernels_us": kernel_times(layer)})
        defaults = fp8_moe.QUANT_OUT_GEMM, fp8_moe.ALIGN_CHUNKED
        for quant_out, chunked in ((True, False), (False, True), (True, True)):  # the launches around the GEMMs
            fp8_moe.QUANT_OUT_GEMM, fp8_moe.ALIGN_CHUNKED = quant_out, chunked
            same = torch.equal(layer(), layer_out)
            t2, ks = timed(layer), kernel_times(layer)
            emit({"M": m, "what": f"layer, QUANT_OUT {quant_out}, ALIGN_CHUNKED {chunked}", "ms": round(t2, 4),
                  "bit_identical": same, "kernels_us": ks})
        fp8_moe.QUANT_OUT_GEMM, fp8_moe.ALIGN_CHUNKED = defaults
        for bm, ns in itertools.product((64, 128), (3, 4)):  # the TMA GEMMs, warp-specialized, on the same list
            entry = dict(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=ns, WS=True)
            ws_layer = lambda x=x, tw=topk_w, ti=topk_ids, entry=entry: fp8_moe.fused_moe_fp8(  # noqa: E731
                x, w13, w13_s, w2, w2_s, tw, ti, config=entry)
            try:
                err = rel_err(ws_layer(), layer_out)
                t2 = timed(ws_layer)
                emit({"M": m, "what": "layer, WS", "config": entry, "ms": round(t2, 4), "rel_err": err,
                      "tflops": round(flops / t2 / 1e9, 1), "pct_peak": round(100 * flops / t2 / 1e9 / peak, 1),
                      "kernels_us": kernel_times(ws_layer)})
            except Exception as e:  # a tile this GPU or Triton cannot compile or hold
                emit({"M": m, "what": "layer, WS", "config": entry, "error": f"{type(e).__name__}: {str(e)[:160]}"})

        xq, xs = fp8_gemm.per_token_group_quant_fp8(x, S)
        w = topk_w.view(-1)
        inter_ref = torch.empty((pairs, I), dtype=x.dtype, device=dev)
        y_ref = torch.empty((pairs, H), dtype=x.dtype, device=dev)
        hq = hs = None
        for gemm, gated in ((1, True), (2, False)):
            n, k = (I, H) if gated else (H, I)
            gflop = 2 * pairs * n * k * (2 if gated else 1) / 1e9
            for i, c in enumerate([cfg if gated else cfg.get("GEMM2", cfg)] + tiles(gated)):
                sorted_ids, expert_ids, npost = fp8_moe._route(topk_ids, c["BLOCK_M"], E)
                padded = int((((counts + c["BLOCK_M"] - 1) // c["BLOCK_M"]) * c["BLOCK_M"]).sum())
                out = torch.empty((pairs, n), dtype=x.dtype, device=dev)
                a, a_s, b, b_s = (xq, xs, w13, w13_s) if gated else (hq, hs, w2, w2_s)

                def run(c=c, sorted_ids=sorted_ids, expert_ids=expert_ids, npost=npost, out=out, a=a, a_s=a_s, b=b,
                        b_s=b_s, n=n, k=k, gated=gated, w=w):
                    fp8_moe._launch_moe_gemm(a, a_s, b, b_s, out, w, sorted_ids, expert_ids, npost, n=n, k=k,
                                             a_row_div=TOPK if gated else 1, gated=gated,
                                             mul_routed_weight=not gated, block_scaled=True, cfg=c)
                try:
                    run()
                    if i == 0:  # the launcher's tile: the reference for the others
                        (inter_ref if gated else y_ref).copy_(out)
                        if gated:
                            hq, hs = fp8_gemm.per_token_group_quant_fp8(inter_ref, S)
                        err = 0.0
                    else:
                        err = rel_err(out, inter_ref if gated else y_ref)
                        if not err < 1e-2:
                            emit({"M": m, "gemm": gemm, "config": c, "wrong": err})
                            continue
                    t = timed(run)
                except Exception as e:  # a tile this GPU cannot compile or hold
                    emit({"M": m, "gemm": gemm, "config": c, "error": f"{type(e).__name__}: {str(e)[:100]}"})
                    continue
                emit({"M": m, "gemm": gemm, "launcher": i == 0, "config": c, "ms": round(t, 4),
                      "tflops_useful": round(gflop / t, 1), "tflops_issued": round(gflop * padded / pairs / t, 1),
                      "pct_peak": round(100 * gflop / t / peak, 1), "padding": round(padded / pairs, 3),
                      "rel_err": err})


if __name__ == "__main__":
    main()
