"""The Gluon block-FP8 GEMM (kernels/fp8_gluon.py) against the Triton one and torch._scaled_mm, on a Hopper GPU.

For MiniMax-M2's projections (q/k/v 8192 x 3072, o 3072 x 6144) and the MoE's expert shapes as dense GEMMs
(gate + up 3072 x 3072, down 3072 x 1536) at prefill sizes: each Gluon config checked against the Triton kernel on
the same operands (relative error, fp32 rounding of the same products), then timed (CUDA-graph replays, median)
beside the Triton kernel's tuned entry and torch._scaled_mm with row-wise scales (no K blocks: an upper bound of
what the tensor cores give at this shape). With --moe, the whole MoE layer (E=256, top-8, random routing) at the
same sizes: the table's entry against entries whose GEMMs run on the Gluon loop ("WS": "gluon"). Rows go to
OUT/rows.jsonl as they come; a Markdown table at the end.

    python scripts/bench_fp8_gluon.py --out DIR [--ms 1024,4096] [--moe]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
from bench_common import block_quant, commit_id
from bench_kernels import ceilings
from quantkit.kernels import fp8_gemm, fp8_gluon, fp8_moe

E, I, H, TOPK = 256, 1536, 3072, 8

SHAPES = {"qkv": (8192, 3072), "o_proj": (3072, 6144), "gate_up": (3072, 3072), "down": (3072, 1536)}
CONFIGS = ([dict(BLOCK_N=64, STAGES=st, UNROLL=u, GROUP_M=8) for st in (4, 6) for u in (4, 6)]
           + [dict(BLOCK_M=128, num_warps=8, BLOCK_N=64, STAGES=st, UNROLL=4, GROUP_M=8) for st in (3, 4)]
           + [dict(BLOCK_N=128, STAGES=st, UNROLL=4, GROUP_M=8) for st in (3, 4)]
           + [dict(SPECIALIZE=True, BLOCK_N=128, STAGES=st, GROUP_M=8) for st in (3, 4, 5)])


def timed(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ms", default="1024,4096")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--moe", action="store_true", help="the MoE layer too")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ceil = ceilings()
    peak = ceil["fp8_matmul_tflops"]
    dev = fp8_gemm.device_key(torch.device("cuda"))
    print(f"{dev}: FP8 peak {peak:.0f} TFLOP/s, HBM read {ceil['hbm_read_tbps']:.2f} TB/s, commit {commit_id()}",
          flush=True)
    log = args.out / "rows.jsonl"
    table = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
        wq, ws = block_quant(w)
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
            xq, xs = fp8_gemm.per_token_group_quant_fp8(x, 128)
            ref = fp8_gemm.w8a8_block_fp8_matmul(xq, xs, wq, ws)
            flops = 2 * m * n * k
            t_triton = timed(lambda: fp8_gemm.w8a8_block_fp8_matmul(xq, xs, wq, ws))
            xr, xrs = fp8_gemm.per_token_quant_fp8(x)
            one = torch.ones(1, n, device="cuda")
            t_scaled = timed(lambda: torch._scaled_mm(xr, wq.t(), scale_a=xrs, scale_b=one, out_dtype=torch.bfloat16))
            rows = [("triton (table)", None, t_triton, 0.0), ("scaled_mm rowwise", None, t_scaled, None)]
            for cfg in CONFIGS:
                try:
                    out = fp8_gluon.w8a8_block_fp8_matmul_gluon(xq, xs, wq, ws, config=cfg)
                    torch.cuda.synchronize()
                    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                    if not err < 1e-2:
                        print(f"{name} M={m} {cfg}: rel err {err:.3g}, not timed", flush=True)
                        rows.append((f"gluon {cfg}", cfg, None, err))
                        continue
                    t = timed(lambda c=cfg: fp8_gluon.w8a8_block_fp8_matmul_gluon(xq, xs, wq, ws, config=c))
                    label = (f"gluon bm {cfg.get('BLOCK_M', 64)} bn {cfg['BLOCK_N']} stages {cfg['STAGES']} "
                             f"unroll {cfg['UNROLL']}" if not cfg.get("SPECIALIZE") else
                             f"gluon specialized bn {cfg['BLOCK_N']} stages {cfg['STAGES']}")
                    rows.append((label, cfg, t, err))
                except Exception as e:  # a config that does not compile or launch: reported, the others go on
                    print(f"{name} M={m} {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            for label, cfg, t, err in rows:
                rec = {"device": dev, "commit": commit_id(), "op": name, "M": m, "N": n, "K": k, "variant": label,
                       "config": cfg, "ms": t, "rel_err_vs_triton": err,
                       "tflops": None if t is None else flops / t / 1e9,
                       "pct_fp8_peak": None if t is None else 100 * flops / t / 1e9 / peak}
                with open(log, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                table.append(rec)
                if t is not None:
                    print(f"{name} M={m} {label}: {t * 1e3:.1f} us, {rec['tflops']:.0f} TFLOP/s "
                          f"({rec['pct_fp8_peak']:.1f}% of peak), err {err}", flush=True)
    if args.moe:
        table += bench_moe([int(v) for v in args.ms.split(",")], g, peak, dev, log)
    print(f"\n{dev}, FP8 peak {peak:.0f} TFLOP/s, commit {commit_id()}\n")
    print("| op | M | variant | us | TFLOP/s | % FP8 peak |\n|---|---:|---|---:|---:|---:|")
    for r in table:
        if r["ms"] is not None:
            print(f"| {r['op']} | {r['M']} | {r['variant']} | {r['ms'] * 1e3:.1f} | {r['tflops']:.0f} "
                  f"| {r['pct_fp8_peak']:.1f} |")
    (args.out / "ceilings.json").write_text(json.dumps(ceil, indent=1) + "\n")


MOE_VARIANTS = [
    (f"gluon bm {16 * nw} bn {bn}/{bn2} stages {st}",
     dict(WS="gluon", BLOCK_M=16 * nw, BLOCK_N=bn, BLOCK_K=128, GROUP_M=8, num_warps=nw, num_stages=st, UNROLL=4,
          GEMM2=dict(BLOCK_N=bn2)))
    for nw in (4, 8) for bn, bn2 in ((32, 64), (64, 64), (32, 128)) for st in (3, 4)]


def bench_moe(ms: list[int], g: torch.Generator, peak: float, dev: str, log: Path) -> list[dict]:
    """The MoE layer on the table's entry and on the Gluon entries, each checked against the table's output."""
    w13 = (torch.randn(E, 2 * I, H, device="cuda", generator=g) * 64).to(torch.float8_e4m3fn)
    w2 = (torch.randn(E, H, I, device="cuda", generator=g) * 64).to(torch.float8_e4m3fn)
    s13 = torch.rand(E, 2 * I // 128, H // 128, device="cuda", generator=g) * 1e-4 + 1e-4
    s2 = torch.rand(E, H // 128, I // 128, device="cuda", generator=g) * 1e-4 + 1e-4
    out_rows = []
    for m in ms:
        x = torch.randn(m, H, device="cuda", dtype=torch.bfloat16, generator=g)
        tw, ids = torch.topk(torch.sigmoid(torch.randn(m, E, device="cuda", generator=g)), TOPK, dim=-1)
        tw = (tw / tw.sum(-1, keepdim=True)).contiguous()
        flops = 2 * m * TOPK * 3 * H * I
        entry = fp8_moe.table_entry(fp8_moe.moe_config(torch.device("cuda"), m, TOPK, E, I, H, "block"))
        ref = fp8_moe.fused_moe_fp8(x, w13, s13, w2, s2, tw, ids)
        for label, cfg in [("table", entry)] + MOE_VARIANTS:
            try:
                out = fp8_moe.fused_moe_fp8(x, w13, s13, w2, s2, tw, ids, config=cfg)
                torch.cuda.synchronize()
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                if not err < 2e-2:
                    print(f"moe M={m} {label}: rel err {err:.3g}, not timed", flush=True)
                    continue
                t = timed(lambda c=cfg: fp8_moe.fused_moe_fp8(x, w13, s13, w2, s2, tw, ids, config=c))
            except Exception as e:  # reported; the others go on
                print(f"moe M={m} {label}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
                continue
            rec = {"device": dev, "commit": commit_id(), "op": "moe layer", "M": m, "variant": label, "config": cfg,
                   "ms": t, "rel_err_vs_table": err, "tflops": flops / t / 1e9,
                   "pct_fp8_peak": 100 * flops / t / 1e9 / peak}
            with open(log, "a") as f:
                f.write(json.dumps(rec) + "\n")
            out_rows.append(rec)
            print(f"moe M={m} {label}: {t:.3f} ms, {rec['tflops']:.0f} TFLOP/s ({rec['pct_fp8_peak']:.1f}%), "
                  f"err {err:.2g}", flush=True)
    return out_rows


if __name__ == "__main__":
    main()
