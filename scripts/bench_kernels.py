#!/usr/bin/env python
"""FP8 kernels on MiniMax-M2 shapes against the GPU's measured ceilings and the torch baselines.

    python scripts/bench_kernels.py --out evals/results            # on an H100/H200; prints a Markdown table

Measured in one run: the ceilings (HBM read, device-to-device copy, bf16 and FP8 matmul peaks), then for
M = 1 ... 4096 tokens: the attention projections (q, k, v, o) through `fp8_block_linear` (activation quantization
included) beside torch bf16 (cuBLAS) and `torch._scaled_mm` with row-wise scales; and the whole MoE layer
(E=256, top-8, H=3072, I=1536: both GEMMs, SiLU*mul, router weights, top-k sum) through `fused_moe_fp8` (block and
channel scales) beside a bf16 loop over the touched experts. Every kernel is checked against its reference on the
same data before it is timed. Timings: medians of CUDA-graph replays (triton.testing.do_bench_cudagraph; this
machine's launch overhead would otherwise dominate every small-M figure), plain do_bench for the bf16 MoE loop, which
synchronises with the host.
Bandwidth counts the weight bytes touched (FP8: 1 byte per weight plus scales; bf16: 2) plus activations.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
import triton
from bench_common import bf16_moe_loop, block_quant, channel_quant, commit_id, rel_err
from quantkit.kernels import fp8_gemm, fp8_moe

ROOT = Path(__file__).resolve().parents[1]
H, I, E, TOPK = 3072, 1536, 256, 8
PROJ = {"q_proj": (6144, 3072), "k_proj": (1024, 3072), "v_proj": (1024, 3072), "o_proj": (3072, 6144)}
MS = [1, 4, 16, 64, 256, 1024, 4096]
AB = {"on": False}  # --tile-scales-ab: also time the block scheme with a weight scale a column (TILE_SCALES off)


def per_column(fn) -> float | None:
    """fn's time with fp8_gemm.TILE_SCALES off (the scale-a-column K loop), when --tile-scales-ab asks."""
    if not AB["on"]:
        return None
    fp8_gemm.TILE_SCALES = False
    try:
        return bench(fn, graph=True)
    finally:
        fp8_gemm.TILE_SCALES = True


def bench(fn, graph: bool = False) -> float:
    """Milliseconds, median; replayed from a CUDA graph when asked and the function can be captured."""
    if graph:
        try:
            return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
        except Exception as e:  # a host synchronisation inside fn makes it uncapturable
            print(f"(no CUDA graph: {type(e).__name__}: {str(e).splitlines()[0][:100]})", flush=True)
            torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def ceilings() -> dict:
    x = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)  # 2 GiB
    read_ms = bench(lambda: x.sum(dtype=torch.float32))
    y = torch.empty_like(x)
    copy_ms = bench(lambda: y.copy_(x))
    x = y = None  # free 4 GiB before the matmuls
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    bf16_ms = bench(lambda: a @ b.t())
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    fp8_ms = bench(lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
    sa, sb = torch.ones(n, 1, device="cuda"), torch.ones(1, n, device="cuda")
    fp8_row_ms = bench(lambda: torch._scaled_mm(a8, b8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16))
    flops = 2 * n**3
    return {
        "hbm_read_tbps": 2 * (1 << 30) / read_ms / 1e9,
        "d2d_copy_tbps": 4 * (1 << 30) / copy_ms / 1e9,
        "bf16_matmul_tflops": flops / bf16_ms / 1e9,
        "fp8_matmul_tflops": flops / fp8_ms / 1e9,
        "fp8_rowwise_matmul_tflops": flops / fp8_row_ms / 1e9,
    }


def bench_projections(ceil: dict) -> list[dict]:
    rows = []
    for name, (n, k) in PROJ.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        wq, ws = block_quant(w)
        wc, wcs = channel_quant(w)
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            out = fp8_gemm.fp8_block_linear(x, wq, ws)
            xq, xs = fp8_gemm.per_token_group_quant_fp8_ref(x, 128)
            ref = fp8_gemm.w8a8_block_fp8_matmul_ref(xq, xs, wq, ws, (128, 128), torch.bfloat16)
            err = rel_err(out, ref)
            t_ours = bench(lambda: fp8_gemm.fp8_block_linear(x, wq, ws), graph=True)
            t_percol = per_column(lambda: fp8_gemm.fp8_block_linear(x, wq, ws))
            t_bf16 = bench(lambda: x @ w.t(), graph=True)
            xr, xrs = fp8_gemm.per_token_quant_fp8_ref(x)
            t_scaled = bench(lambda: torch._scaled_mm(xr, wc.t(), scale_a=xrs, scale_b=wcs.t(),
                                                      out_dtype=torch.bfloat16), graph=True)
            flops = 2 * m * n * k
            bytes_fp8 = n * k + ws.numel() * 4 + m * k * 2 + m * n * 2
            rows.append({
                "op": name, "M": m, "N": n, "K": k, "rel_err_vs_ref": err,
                "fp8_block_ms": t_ours, "fp8_block_scale_per_column_ms": t_percol, "bf16_ms": t_bf16,
                "scaled_mm_rowwise_ms": t_scaled,
                "fp8_block_tbps": bytes_fp8 / t_ours / 1e9, "fp8_block_tflops": flops / t_ours / 1e9,
                "fp8_block_frac_bw": bytes_fp8 / t_ours / 1e9 / ceil["hbm_read_tbps"],
                "fp8_block_frac_fp8_peak": flops / t_ours / 1e9 / ceil["fp8_matmul_tflops"],
            })
            print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_moe(ceil: dict) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(0)
    w13_bf = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    w2_bf = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    w13_q = torch.empty(E, 2 * I, H, device="cuda", dtype=torch.float8_e4m3fn)
    w2_q = torch.empty(E, H, I, device="cuda", dtype=torch.float8_e4m3fn)
    w13_s = torch.empty(E, 2 * I // 128, H // 128, device="cuda")
    w2_s = torch.empty(E, H // 128, I // 128, device="cuda")
    w13_c = torch.empty_like(w13_q)
    w2_c = torch.empty_like(w2_q)
    w13_cs = torch.empty(E, 2 * I, 1, device="cuda")
    w2_cs = torch.empty(E, H, 1, device="cuda")
    for e in range(E):
        w13_q[e], w13_s[e] = block_quant(w13_bf[e])
        w2_q[e], w2_s[e] = block_quant(w2_bf[e])
        w13_c[e], w13_cs[e] = channel_quant(w13_bf[e])
        w2_c[e], w2_cs[e] = channel_quant(w2_bf[e])
    w1_bf, w3_bf = w13_bf[:, :I], w13_bf[:, I:]
    rows = []
    for m in MS:
        x = torch.randn(m, H, device="cuda", dtype=torch.bfloat16, generator=g)
        logits = torch.randn(m, E, device="cuda", generator=g)
        scores = torch.sigmoid(logits)
        topk_w, topk_ids = torch.topk(scores, TOPK, dim=-1)
        topk_w = topk_w / topk_w.sum(-1, keepdim=True)
        touched = int(topk_ids.unique().numel())
        out = fp8_moe.fused_moe_fp8(x, w13_q, w13_s, w2_q, w2_s, topk_w, topk_ids, scheme="block")
        ref = fp8_moe.fused_moe_fp8_ref(x, w13_q, w13_s, w2_q, w2_s, topk_w, topk_ids, scheme="block")
        err_block = rel_err(out, ref)
        out_c = fp8_moe.fused_moe_fp8(x, w13_c, w13_cs, w2_c, w2_cs, topk_w, topk_ids, scheme="channel")
        ref_c = fp8_moe.fused_moe_fp8_ref(x, w13_c, w13_cs, w2_c, w2_cs, topk_w, topk_ids, scheme="channel")
        err_chan = rel_err(out_c, ref_c)
        err_vs_bf16 = rel_err(out, bf16_moe_loop(x, w1_bf, w3_bf, w2_bf, topk_w, topk_ids))
        t_block = bench(lambda: fp8_moe.fused_moe_fp8(x, w13_q, w13_s, w2_q, w2_s, topk_w, topk_ids,
                                                      scheme="block"), graph=True)
        t_percol = per_column(lambda: fp8_moe.fused_moe_fp8(x, w13_q, w13_s, w2_q, w2_s, topk_w, topk_ids,
                                                            scheme="block"))
        t_chan = bench(lambda: fp8_moe.fused_moe_fp8(x, w13_c, w13_cs, w2_c, w2_cs, topk_w, topk_ids,
                                                     scheme="channel"), graph=True)
        t_bf16 = bench(lambda: bf16_moe_loop(x, w1_bf, w3_bf, w2_bf, topk_w, topk_ids))  # host syncs: no graph
        wbytes = touched * 3 * H * I
        bytes_block = wbytes + touched * (w13_s[0].numel() + w2_s[0].numel()) * 4 + 2 * m * H * 2
        flops = 2 * m * TOPK * 3 * H * I
        rows.append({
            "M": m, "experts_touched": touched, "rel_err_block_vs_ref": err_block,
            "rel_err_channel_vs_ref": err_chan, "rel_err_block_vs_bf16": err_vs_bf16,
            "fp8_block_ms": t_block, "fp8_block_scale_per_column_ms": t_percol, "fp8_channel_ms": t_chan,
            "bf16_loop_ms": t_bf16,
            "fp8_block_tbps": bytes_block / t_block / 1e9,
            "fp8_block_frac_bw": bytes_block / t_block / 1e9 / ceil["hbm_read_tbps"],
            "fp8_block_tflops": flops / t_block / 1e9,
            "fp8_block_frac_fp8_peak": flops / t_block / 1e9 / ceil["fp8_matmul_tflops"],
            "bw_floor_ms": bytes_block / ceil["hbm_read_tbps"] / 1e9,
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "evals" / "results")
    ap.add_argument("--skip-proj", action="store_true")
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="the M values to run (tokens)")
    ap.add_argument("--tile-scales-ab", action="store_true",
                    help="also time the block scheme reading a weight scale per column (fp8_gemm.TILE_SCALES off)")
    args = ap.parse_args()
    MS[:] = [int(v) for v in args.ms.split(",") if v]
    AB["on"] = args.tile_scales_ab
    torch.manual_seed(0)
    ceil = ceilings()
    print(json.dumps(ceil), flush=True)
    proj = [] if args.skip_proj else bench_projections(ceil)
    moe = bench_moe(ceil)
    commit = commit_id()
    result = {
        "benchmark": "FP8 kernels on MiniMax-M2 shapes",
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": triton.__version__,
        "ceilings": ceil, "projections": proj, "moe": moe,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    dest = args.out / f"bench_kernels-{result['date']}-{result['device'].replace(' ', '_')}-{commit}.json"
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['device']}, torch {result['torch']}, triton {result['triton']}, commit {commit}")
    print("ceilings: " + ", ".join(f"{k} {v:.2f}" for k, v in ceil.items()))
    print("\nMoE layer (E=256, top-8, H=3072, I=1536)\n")
    def col(v: float | None, digits: int) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    print("| M | experts | FP8-block ms | % BW | TFLOP/s | % FP8 peak | scale a column ms | FP8-channel ms "
          "| bf16 loop ms | floor ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in moe:
        print(f"| {r['M']} | {r['experts_touched']} | {r['fp8_block_ms']:.3f} | {100 * r['fp8_block_frac_bw']:.0f} "
              f"| {r['fp8_block_tflops']:.0f} | {100 * r['fp8_block_frac_fp8_peak']:.0f} "
              f"| {col(r['fp8_block_scale_per_column_ms'], 3)} | {r['fp8_channel_ms']:.3f} "
              f"| {r['bf16_loop_ms']:.3f} | {r['bw_floor_ms']:.3f} |")
    if proj:
        print("\nAttention projections\n")
        print("| op | M | FP8-block ms | scale a column ms | bf16 ms | scaled_mm row-wise ms | % BW | TFLOP/s |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in proj:
            print(f"| {r['op']} | {r['M']} | {r['fp8_block_ms']:.4f} | {col(r['fp8_block_scale_per_column_ms'], 4)} "
                  f"| {r['bf16_ms']:.4f} | {r['scaled_mm_rowwise_ms']:.4f} | {100 * r['fp8_block_frac_bw']:.0f} "
                  f"| {r['fp8_block_tflops']:.0f} |")
    print(f"\nwritten to {dest}")


if __name__ == "__main__":
    main()
