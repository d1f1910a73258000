#!/usr/bin/env python
"""Tune the block configurations of the FP8 kernels for this GPU on MiniMax-M2 shapes.

    python scripts/tune_fp8.py --out kernels/configs          # on an H100/H200; merges into fp8_moe.json, fp8_gemm.json

For each M bucket and scheme, every candidate configuration is checked against the kernel's reference on the
same data (a wrong or failing candidate is dropped), then timed (median, triton.testing.do_bench); the fastest is
filed under torch.cuda.get_device_name(). From M = 256 the MoE's down GEMM is then tuned on its own ("GEMM2", the
gate + up tile kept). Existing entries for other devices are kept.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import triton
from bench_common import block_quant, channel_quant, rel_err
from quantkit.kernels import fp8_gemm, fp8_moe

ROOT = Path(__file__).resolve().parents[1]
H, I, E, TOPK = 3072, 1536, 256, 8
MS = [1, 4, 16, 64, 256, 1024, 4096]
SCHEMES = ["block", "channel"]
PROJ = {"q_proj": (6144, 3072), "kv_proj": (1024, 3072), "o_proj": (3072, 6144)}


def candidates(m_rows: float, ws: bool = False) -> list[dict]:
    """A grid around what suits m_rows rows per expert (MoE) or per GEMM; ws (block scales, prefill sizes):
    with the TMA GEMMs warp-specialized too (fp8_moe._moe_fp8_ws, fp8_gemm._w8a8_ws: 4 warps a program, which the
    compiler makes a producer and two consumer warp groups)."""
    block_m = [16, 32, 64] if m_rows <= 64 else [32, 64, 128]
    out = []
    stages = [3, 4] if m_rows <= 64 else [2, 3, 4]  # two stages: room for two programs a multiprocessor
    for bm, bn, ns in itertools.product(block_m, [64, 128], stages):
        if bm == 128 and bn == 128 and ns == 4:
            continue  # does not fit in shared memory with two accumulators
        nw = 8 if bm * bn >= 64 * 128 else 4
        gm = 8 if m_rows > 64 else 1
        out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=gm, num_warps=nw, num_stages=ns))
    if ws:
        out += [dict(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=ns, WS=True)
                for bm, ns in itertools.product((64, 128), (3, 4))]
    return out


def timed(fn) -> float:
    """Median milliseconds of CUDA-graph replays: without a graph, this machine's launch overhead (about 40 us a
    kernel) would decide the small-M choices instead of the kernels."""
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median")
    except Exception:
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def quant(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    return channel_quant(w) if scheme == "channel" else block_quant(w)


def fastest(cands: list[dict], module, picker: str, ref: torch.Tensor, run) -> tuple[float, dict]:
    """(ms, config) of the fastest candidate whose output matches ref, each forced through module.<picker> (the
    launcher's config lookup), which is restored afterwards. Candidates that fail to compile or run are skipped."""
    original, best = getattr(module, picker), None
    try:
        for cfg in cands:
            setattr(module, picker, lambda *a, _c=cfg, **kw: dict(_c))
            try:
                err = rel_err(run(), ref)
                if not err <= 1e-2:  # NaN too
                    print(f"wrong {cfg}: relative error {err:.3g}", flush=True)
                    continue
                ms = timed(run)
            except Exception as e:  # out of resources and the like: not a candidate here
                print(f"skip {cfg}: {type(e).__name__}", flush=True)
                continue
            if best is None or ms < best[0]:
                best = (ms, cfg)
    finally:
        setattr(module, picker, original)
    if best is None:
        raise RuntimeError("no candidate configuration ran correctly")
    return best


def tune_moe(device: str) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    table: dict = {}
    for scheme in SCHEMES:
        w13 = torch.empty(E, 2 * I, H, device="cuda", dtype=torch.float8_e4m3fn)
        w2 = torch.empty(E, H, I, device="cuda", dtype=torch.float8_e4m3fn)
        s13 = torch.empty((E, 2 * I // 128, H // 128) if scheme == "block" else (E, 2 * I, 1), device="cuda")
        s2 = torch.empty((E, H // 128, I // 128) if scheme == "block" else (E, H, 1), device="cuda")
        for e in range(E):
            w13[e], s13[e] = quant(torch.randn(2 * I, H, device="cuda", generator=g) * 0.02, scheme)
            w2[e], s2[e] = quant(torch.randn(H, I, device="cuda", generator=g) * 0.02, scheme)
        entries = {}
        for m in MS:
            x = torch.randn(m, H, device="cuda", dtype=torch.bfloat16, generator=g)
            topk_w, topk_ids = torch.topk(torch.rand(m, E, device="cuda", generator=g), TOPK, dim=-1)
            topk_w = topk_w / topk_w.sum(-1, keepdim=True)
            ref = fp8_moe.fused_moe_fp8_ref(x, w13, s13, w2, s2, topk_w, topk_ids, scheme=scheme)
            now = fp8_moe.moe_config(torch.device("cuda"), m, TOPK, E, I, H, scheme)  # never file a slower one
            run = lambda: fp8_moe.fused_moe_fp8(x, w13, s13, w2, s2, topk_w, topk_ids, scheme=scheme)  # noqa: E731
            cands = candidates(m * TOPK / E, ws=scheme == "block" and m >= 1024)
            best = fastest([now] + cands, fp8_moe, "moe_config", ref, run)
            if m >= 256:  # sorted lists at prefill sizes: then the down GEMM's own tile (and row block), gate + up kept
                shared = {k: v for k, v in best[1].items() if k != "GEMM2"}
                # the TMA layer (GEMM 1 with WS): GEMM 2 on GEMM 1's list, in its blocks or in halves
                halves = [{**c, "BLOCK_M": shared["BLOCK_M"] // d} for c in cands if c.get("WS")
                          for d in (1, 2)] if shared.get("WS") else []
                best = fastest([best[1]] + [{**shared, "GEMM2": c} for c in candidates(m * TOPK / E) + halves],
                               fp8_moe, "moe_config", ref, run)
            entries[str(m)] = best[1]
            print(f"moe {scheme} M={m}: {best[0]:.4f} ms {best[1]}", flush=True)
        table[f"E={E},I={I},H={H},{scheme}"] = entries
    return {device: table}


def tune_gemm(device: str) -> dict:
    g = torch.Generator(device="cuda").manual_seed(1)
    table: dict = {}
    for (n, k), scheme in itertools.product(PROJ.values(), SCHEMES):
        w, ws = quant(torch.randn(n, k, device="cuda", generator=g) * 0.02, scheme)
        entries = {}
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
            if scheme == "block":
                run = lambda: fp8_gemm.fp8_block_linear(x, w, ws)  # noqa: E731
                ref = fp8_gemm.fp8_block_linear_ref(x, w, ws)
            else:
                run = lambda: fp8_gemm.fp8_channel_linear(x, w, ws)  # noqa: E731
                ref = fp8_gemm.fp8_channel_linear_ref(x, w, ws)
            now = fp8_gemm._gemm_config(torch.device("cuda"), n, k, m, scheme, 128)  # never file a slower one
            best = fastest([now] + candidates(m, ws=scheme == "block" and m >= 256), fp8_gemm, "_gemm_config", ref, run)
            entries[str(m)] = best[1]
            print(f"gemm {scheme} N={n} K={k} M={m}: {best[0]:.4f} ms {best[1]}", flush=True)
        table[f"N={n},K={k},{scheme}"] = entries
    return {device: table}


def merge(path: Path, new: dict) -> None:
    """new's buckets into the table at path: a tuned bucket replaces that bucket, the others of its shape stay."""
    table = json.loads(path.read_text()) if path.exists() else {}
    for dev, shapes in new.items():
        for shape, buckets in shapes.items():
            table.setdefault(dev, {}).setdefault(shape, {}).update(buckets)
    path.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "kernels" / "configs")
    ap.add_argument("--only", choices=["moe", "gemm"], default=None)
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="the M buckets to tune (the others are kept)")
    ap.add_argument("--schemes", default="block,channel")
    args = ap.parse_args()
    MS[:] = [int(v) for v in args.ms.split(",") if v]
    SCHEMES[:] = [v for v in args.schemes.split(",") if v]
    device = torch.cuda.get_device_name()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "moe"):
        merge(args.out / "fp8_moe.json", tune_moe(device))
    if args.only in (None, "gemm"):
        merge(args.out / "fp8_gemm.json", tune_gemm(device))


if __name__ == "__main__":
    main()
