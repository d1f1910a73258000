#!/usr/bin/env python
"""W4A16 (group 128) MoE layer and projections on MiniMax-M2 shapes: check, tune, benchmark.

    python scripts/bench_w4a16.py --check --tune-seconds 240 --out evals/results     # on an H100/H200, ~6.5 min

One run, in order:
  1. ceilings: HBM read bandwidth (sum over 2 GiB of bf16) and the bf16 matmul peak (cuBLAS 8192^3), measured now;
  2. --check: the fused MoE (M = 1 ... 4096, E=256, top-8, H=3072, I=1536) with the launcher's choice, and both its
     paths forced ("gemv" at M <= 256, "dot" everywhere), and the linear kernel (q/kv/o shapes) against their
     PyTorch references on the GPU; any relative error above 1e-2 stops the run;
  3. --tune-seconds S: for each M bucket (decode sizes first, and with twice the share of the budget) candidate
     configurations of both paths are checked against the reference and timed, within about S seconds in all; the
     winners (PATH included) are written to OUT/w4a16_moe.json (this repository's kernels/configs/w4a16_moe.json
     with this device's entries replaced: copy it there to make it the launcher's default);
  4. the benchmark: the whole MoE layer (routing, both GEMMs, SiLU*mul, router weights, top-k sum) with the tuned
     configs, beside a bf16 loop over the touched experts (torch, what a user gets without fused kernels) and the
     bf16 bandwidth floor (the best any bf16 kernel could do: weight bytes / measured HBM bandwidth); and the
     attention projections (q/k/v fused, o) through w4a16_kmajor_linear (the runtime's layout; configs tuned with
     --tune-linear-seconds S into kernels/configs/w4a16_linear.json) beside the AutoAWQ-layout kernel and cuBLAS
     bf16;
  5. the one-time repack at load of one MoE layer's experts to the K-major layout, from AutoAWQ tensors and from
     compressed-tensors codes, expert by expert as quantkit/runtime/awq.py does it.
Timings: medians of CUDA-graph replays (triton.testing.do_bench_cudagraph); plain do_bench for the bf16 loop,
which synchronises with the host. Bandwidth counts the bytes of the experts actually touched: 4-bit codes, 16-bit
scales and 8-bit zero points (0.5 + 3/128 bytes per weight) plus the activations in and out.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import time
from pathlib import Path

import torch
import triton
from bench_common import bf16_moe_loop, commit_id, rel_err
from quantkit.kernels import w4a16_gemm, w4a16_moe

from quantkit.formats.awq import pack_autoawq, pack_compressed_tensors, unpack_compressed_tensors

ROOT = Path(__file__).resolve().parents[1]
H, I, E, TOPK, G = 3072, 1536, 256, 8, 128
MS = [1, 2, 4, 8, 16, 64, 256, 1024, 4096]
TUNE_ORDER = [1, 16, 4, 64, 256, 1024, 4096, 2, 8]  # decode first: the targets are at M <= 16
DECODE = 16  # M buckets up to this get twice the tuning share
# the runtime's attention projections (q, k, v fused into one) as [N, K]; the AutoAWQ-layout kernel is timed beside
PROJ = {"qkv_proj": (8192, 3072), "o_proj": (3072, 6144)}
PROJ_MS = [1, 4, 16, 32, 64, 256, 1024, 4096]
PROJ_TUNE = [1, 16, 32, 4, 64, 8, 128, 256, 1024, 4096]
SHAPE_KEY = f"E={E},I={I},H={H},G={G}"


def bench(fn, graph: bool = True, rep: int = 100) -> float:
    """Milliseconds, median; replayed from a CUDA graph when asked and the function can be captured."""
    if graph:
        try:
            return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")
        except Exception as e:  # a host synchronisation inside fn makes it uncapturable
            print(f"(no CUDA graph: {type(e).__name__}: {str(e).splitlines()[0][:100]})", flush=True)
            torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def ceilings() -> tuple[float, float]:
    """(HBM read TB/s, bf16 matmul TFLOP/s) measured now: the sum over 2 GiB of bf16, cuBLAS 8192^3."""
    x = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)  # 2 GiB
    ms = bench(lambda: x.sum(dtype=torch.float32), graph=False)
    x = None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = bench(lambda: a @ a.t(), graph=False)
    return 2 * (1 << 30) / ms / 1e9, 2 * 8192**3 / mm_ms / 1e9


def awq_weights(e: int, k: int, n: int, g: torch.Generator) -> list[torch.Tensor]:
    """Random AutoAWQ tensors [e, K, N/8], [e, K/G, N/8], fp16 [e, K/G, N] (the projections' layout): the kernels read
    any codes, and scales near 0.02 / 8 keep the outputs at the scale of a real layer."""
    lo, hi = -2**31, 2**31 - 1
    return [torch.randint(lo, hi, (e, k, n // 8), generator=g, device="cuda", dtype=torch.int32),
            torch.randint(lo, hi, (e, k // G, n // 8), generator=g, device="cuda", dtype=torch.int32),
            (torch.rand(e, k // G, n, generator=g, device="cuda") * 4e-3 + 1e-3).half()]


def kmajor_weights(e: int, n: int, k: int, g: torch.Generator) -> list[torch.Tensor]:
    """Random K-major expert tensors (the fused MoE's layout): qweight int32 [e, N, K/8], zeros uint8 [e, N, K/G],
    fp16 scales [e, N, K/G]."""
    return [torch.randint(-2**31, 2**31 - 1, (e, n, k // 8), generator=g, device="cuda", dtype=torch.int32),
            torch.randint(0, 16, (e, n, k // G), generator=g, device="cuda", dtype=torch.uint8),
            (torch.rand(e, n, k // G, generator=g, device="cuda") * 4e-3 + 1e-3).half()]


def routing(m: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.sigmoid(torch.randn(m, E, device="cuda", generator=g))
    w, ids = torch.topk(scores, TOPK, dim=-1)
    return w / w.sum(-1, keepdim=True), ids


def moe_bytes(touched: int, m: int) -> int:
    per_weight = 0.5 + 2 / G + 1 / G  # code, fp16 scale and 8-bit zero per group of G
    return int(touched * 3 * H * I * per_weight) + 2 * m * H * 2


def moe_candidates(m: int) -> list[dict]:
    """Configurations to try at M, most promising first (the budget may stop the list early): the GEMV path while
    experts get up to 8 tokens each, alternating with the tensor-core path, which is tried at every M."""
    per_expert = m * TOPK / E
    out = []
    if per_expert <= 8:
        block_m = [1] if per_expert < 0.5 else [1, 2] if per_expert <= 1 else [2, 4] if per_expert <= 4 else [4, 8]
        # BLOCK_N rows of 64 bytes per group: more rows put more bytes in flight per program and amortize the
        # activations, fewer make more programs; 16 rows per warp in GEMM 1 (BLOCK_N = 8 x num_warps) keep the
        # per-row zeros and scales in the words' layout (no shared-memory exchange per group in the compiled loop)
        tiles = [(16, 2), (32, 4), (64, 8), (8, 1), (32, 2), (64, 4), (16, 1), (64, 2), (16, 4), (32, 8)]
        # (num_stages does nothing here; PREFETCH is the kernel's own register prefetch, and STAGES > 1 with PREFETCH 0
        # has Triton pipeline the loop's loads through shared memory: the H100's winner at M <= 8)
        out += [dict(PATH="gemv", BLOCK_M=bm, BLOCK_N=bn, GROUP_M=1, PREFETCH=0, num_warps=2, num_stages=1, STAGES=st)
                for bn, st, bm in itertools.product((32, 16), (3, 4), block_m)]
        for pf, (bn, nw), bm in itertools.product([2, 1], tiles, block_m):
            out.append(dict(PATH="gemv", BLOCK_M=bm, BLOCK_N=bn, GROUP_M=1, PREFETCH=pf, num_warps=nw, num_stages=1))
        if m * TOPK <= w4a16_moe.PAIRS_MAX:  # a thread a row: 2 x BLOCK_N rows on 2 x BLOCK_N / 32 warps, or fewer
            rows = [dict(PATH="rows", BLOCK_M=1, BLOCK_N=bn, GROUP_M=1, num_warps=nw, num_stages=1)
                    for bn, nw in ((128, 8), (64, 4), (128, 4), (32, 2), (256, 8), (64, 2))]
            out = [c for pair in itertools.zip_longest(rows, out) for c in pair if c is not None]
        # K split over 2-4 programs a tile (more warps a multiprocessor at decode's few rows), early in the list
        out[2:2] = [{**c, "SPLIT_K": s} for s in (2, 3, 4) for c in out[:2]]
    # the tensor-core path competes at every M: at BLOCK_M = 16 its loop issues about as few instructions per weight
    # as the GEMV's (the MMA takes the multiply-adds), whatever the padding rows cost
    block_m = [16] if per_expert <= 2 else [16, 32] if per_expert <= 16 else [64, 32, 16] if per_expert <= 64 \
        else [128, 64]
    bns = [64, 128, 32] if per_expert <= 2 else [64, 128, 256]
    for ns, bm, bn, nw in itertools.product([3, 2, 4], block_m, bns, [4, 8]):
        if bn == 256 and bm > 64 or bm * bn >= 128 * 128 and nw == 4 or bn == 32 and nw == 8:
            continue  # the accumulators (two in GEMM 1) and the spread tile live in registers
        dot = dict(PATH="dot", BLOCK_M=bm, BLOCK_N=bn, GROUP_M=8 if per_expert > 16 else 1, num_warps=nw,
                   num_stages=ns)
        # one dot of K = G a group (WIDE 1): on an H100 the fastest loop at 1024 and 4096 tokens, on 64 x 64 tiles
        # over 4 warps; WIDE 2 (places j and j + 4 from one LOP3) was slower than both at every tile (BENCHMARKS.md)
        out += [{**dot, "WIDE": 1}, dot]
    # weights as the A operand (out^T = W x^T): BLOCK_N is the MMA's M (64 rows per warp group), BLOCK_M its N
    mma = []
    bms = [16] if per_expert <= 4 else [16, 32] if per_expert <= 16 else [32, 64] if per_expert <= 64 else [64, 128]
    for bn, nw, bm, ns in itertools.product([64, 128, 256], [4, 8], bms, [3, 4, 2]):
        if bn // 64 < nw // 4 or bn * bm > 128 * 128:
            continue  # a warp group per 64 rows at most; the accumulators (two in GEMM 1) live in registers
        mma.append(dict(PATH="mma", BLOCK_M=bm, BLOCK_N=bn, GROUP_M=1, num_warps=nw, num_stages=ns))
    # every path gets its best few tried: alternate
    lists = [mma] + [[c for c in out if c["PATH"] == p] for p in ("gemv", "dot")]
    return [c for row in itertools.zip_longest(*lists) for c in row if c is not None]


def pick_best(run, ref: torch.Tensor, default: dict, candidates: list[dict],
              t_stop: float) -> tuple[float, dict, int, float]:
    """(ms, config, candidates tried, the launcher's ms): the fastest correct one of the launcher's choice (config
    None, filed as `default`: an M left out of a table would take its nearest neighbour's config instead) and the
    candidates, tried in order until time.monotonic() passes t_stop. run(config) computes the op."""
    default_ms = bench(lambda: run(None), rep=40)
    best, tried = (default_ms, default), 0
    for cfg in candidates:
        if time.monotonic() > t_stop:
            break
        tried += 1
        try:
            if rel_err(run(cfg), ref) > 1e-2:
                print(f"  wrong result, dropped: {cfg}", flush=True)
                continue
            ms = bench(lambda: run(cfg), rep=40)
        except Exception as e:  # out of shared memory and the like: not a candidate on this GPU
            print(f"  skip {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}", flush=True)
            continue
        if ms < best[0]:
            best = (ms, cfg)
    return best[0], best[1], tried, default_ms


def tune_moe(w13, w2, budget_s: float, g: torch.Generator) -> dict:
    """{M bucket: config}: the fastest correct candidate per M, within about budget_s seconds."""
    t_end = time.monotonic() + budget_s
    table = {}
    for n_left, m in enumerate(TUNE_ORDER):
        weights = [2 if b <= DECODE else 1 for b in TUNE_ORDER[n_left:]]
        t_stop = time.monotonic() + (t_end - time.monotonic()) * weights[0] / sum(weights)
        x = torch.randn(m, H, device="cuda", dtype=torch.bfloat16, generator=g)
        tw, ids = routing(m, g)
        ref = w4a16_moe.fused_moe_w4a16_ref(x, *w13, *w2, tw, ids)
        ms, cfg, tried, default_ms = pick_best(
            lambda c: w4a16_moe.fused_moe_w4a16(x, *w13, *w2, tw, ids, config=c), ref,
            w4a16_moe.moe_config(x.device, m, TOPK, E, I, H, G), moe_candidates(m), t_stop)
        print(f"tune M={m}: default {default_ms:.4f} ms, best {ms:.4f} ms {cfg} ({tried} tried)", flush=True)
        table[str(m)] = cfg
    return table


def linear_candidates(m: int, k: int) -> list[dict]:
    """Configurations of w4a16_kmajor_linear to try at M, the three paths alternating, each with K split 1-8 ways
    (the projections make only 48-256 output tiles: too few for 132 SMs without a split)."""
    groups = k // G
    splits = [s for s in (4, 8, 2, 6, 12, 1, 3) if groups % s == 0]
    gemv, mma, other = [], [], []
    if m <= 2:  # a thread a weight row, x converted and summed once: 32 rows a warp
        for (bn, nw), sp in itertools.product([(32, 1), (64, 2), (128, 4)], splits[:4]):
            other.append(dict(PATH="rows", BLOCK_M=1, BLOCK_N=bn, GROUP_M=1, num_warps=nw, num_stages=1, SPLIT_K=sp))
    if m >= 16:  # dequantize, then cuBLAS: one candidate
        other.append(dict(PATH="dequant", BLOCK_M=64, BLOCK_N=64, GROUP_M=1, num_warps=4, num_stages=1, SPLIT_K=1))
    if m <= 8:
        bms = [triton.next_power_of_2(m)] + ([triton.next_power_of_2(m) // 2] if m > 1 else [])
        for (bn, nw), sp, pf, bm in itertools.product([(16, 2), (8, 1), (32, 4), (16, 1)], splits[:5], [2, 1], bms):
            gemv.append(dict(PATH="gemv", BLOCK_M=bm, BLOCK_N=bn, GROUP_M=1, PREFETCH=pf, num_warps=nw, num_stages=1,
                             SPLIT_K=sp))
    if m <= 256:  # (at M = 1 too: its loop issues fewer instructions per weight than the GEMV's, 5.4 against 7)
        bms = [16] if m <= 16 else [32, 16] if m <= 32 else [32, 64] if m <= 64 else [64, 128]
        for sp, pf, bn, nw, bm, ns in itertools.product(splits[:5], [2, 1], [64, 128], [4, 8], bms, [3, 2]):
            if bn // 64 < nw // 4 or bn * bm > 128 * 128:
                continue
            mma.append(dict(PATH="mma", BLOCK_M=bm, BLOCK_N=bn, GROUP_M=1, PREFETCH=pf, num_warps=nw, num_stages=ns,
                            SPLIT_K=sp))
    if m >= 256:
        for bm, bn, ns in itertools.product([64, 128], [128, 256], [3, 4]):
            if bm * bn <= 128 * 128:
                other.append(dict(PATH="dot", BLOCK_M=bm, BLOCK_N=bn, GROUP_M=8, num_warps=8, num_stages=ns,
                                  SPLIT_K=1))
    return [c for row in itertools.zip_longest(other, gemv, mma) for c in row if c is not None]


def tune_linear(budget_s: float, g: torch.Generator) -> dict:
    """{"N=..,K=..,G=..": {M bucket: config}} for the projections, within about budget_s seconds."""
    out = {}
    t_end = time.monotonic() + budget_s
    jobs = [(name, m) for m in PROJ_TUNE for name in PROJ]
    for n_left, (name, m) in enumerate(jobs):
        t_stop = time.monotonic() + (t_end - time.monotonic()) / (len(jobs) - n_left)
        n, k = PROJ[name]
        w = [t[0] for t in kmajor_weights(1, n, k, g)]
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
        ref = w4a16_moe.w4a16_kmajor_linear_ref(x, *w)
        ms, cfg, tried, default_ms = pick_best(
            lambda c: w4a16_moe.w4a16_kmajor_linear(x, *w, config=c), ref,
            w4a16_moe.linear_config(x.device, m, n, k, G), linear_candidates(m, k), t_stop)
        print(f"tune {name} M={m}: default {default_ms:.4f} ms, best {ms:.4f} ms {cfg} ({tried} tried)", flush=True)
        out.setdefault(f"N={n},K={k},G={G}", {})[str(m)] = cfg
    return out


def check_all(w13, w2, g: torch.Generator) -> list[dict]:
    rows = []
    for m in MS:
        x = torch.randn(m, H, device="cuda", dtype=torch.bfloat16, generator=g)
        tw, ids = routing(m, g)
        ref = w4a16_moe.fused_moe_w4a16_ref(x, *w13, *w2, tw, ids)
        for path in (None, "gemv", "dot", "mma"):
            if path == "gemv" and m > 256:
                continue
            out = w4a16_moe.fused_moe_w4a16(x, *w13, *w2, tw, ids, config={"PATH": path} if path else None)
            rows.append({"op": "moe", "path": path or "launcher", "M": m, "rel_err": rel_err(out, ref)})
            print(json.dumps(rows[-1]), flush=True)
    for name, (n, k) in PROJ.items():
        wq = [t[0] for t in awq_weights(1, k, n, g)]
        wk = [t[0] for t in kmajor_weights(1, n, k, g)]
        for m in (1, 7, 64, 300):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
            err = rel_err(w4a16_gemm.w4a16_linear(x, *wq), w4a16_gemm.w4a16_linear_ref(x, *wq))
            rows.append({"op": name, "layout": "autoawq", "M": m, "rel_err": err})
            print(json.dumps(rows[-1]), flush=True)
            ref = w4a16_moe.w4a16_kmajor_linear_ref(x, *wk)
            for path, split in ((None, None), ("gemv", 4), ("mma", 2), ("dot", 2), ("mma", 1), ("dequant", 1)):
                cfg = {"PATH": path, "SPLIT_K": split, "PREFETCH": 2 if path == "mma" else 1} if path else None
                err = rel_err(w4a16_moe.w4a16_kmajor_linear(x, *wk, config=cfg), ref)
                rows.append({"op": name, "layout": "kmajor", "path": path or "launcher", "split_k": split, "M": m,
                             "rel_err": err})
                print(json.dumps(rows[-1]), flush=True)
    bad = [r for r in rows if not r["rel_err"] < 1e-2]
    if bad:
        raise SystemExit(f"check failed: {bad}")
    return rows


def bench_moe(w13, w2, tuned: dict, bw: float, peak: float, g: torch.Generator) -> list[dict]:
    # bf16 experts for the baselines: the same layer at 16 bits (random values: only time is measured)
    w1_bf = torch.randn(E, I, H, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    w3_bf = torch.randn(E, I, H, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    w2_bf = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    rows = []
    for m in MS:
        x = torch.randn(m, H, device="cuda", dtype=torch.bfloat16, generator=g)
        tw, ids = routing(m, g)
        touched = int(ids.unique().numel())
        bucket = min(tuned, key=lambda b: (abs(int(b) - m), int(b))) if tuned else None
        cfg = tuned.get(bucket) if bucket else None
        path = w4a16_moe.moe_config(x.device, m, TOPK, E, I, H, G, cfg)["PATH"]
        t_w4 = bench(lambda: w4a16_moe.fused_moe_w4a16(x, *w13, *w2, tw, ids, config=cfg))
        t_bf16 = bench(lambda: bf16_moe_loop(x, w1_bf, w3_bf, w2_bf, tw, ids), graph=False)
        nbytes = moe_bytes(touched, m)
        bf16_floor = (touched * 3 * H * I * 2 + 2 * m * H * 2) / bw / 1e9
        flops = 2 * m * TOPK * 3 * H * I
        rows.append({
            "M": m, "experts_touched": touched, "path": path, "config": cfg, "w4a16_ms": t_w4, "bf16_loop_ms": t_bf16,
            "bf16_floor_ms": bf16_floor, "w4a16_floor_ms": nbytes / bw / 1e9,
            "w4a16_tbps": nbytes / t_w4 / 1e9, "w4a16_frac_bw": nbytes / t_w4 / 1e9 / bw,
            "w4a16_tflops": flops / t_w4 / 1e9, "w4a16_frac_bf16_peak": flops / t_w4 / 1e9 / peak,
            "speedup_vs_bf16_loop": t_bf16 / t_w4, "speedup_vs_bf16_floor": bf16_floor / t_w4,
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_proj(bw: float, g: torch.Generator) -> list[dict]:
    """The projections in the K-major layout (the runtime's, tuned configs) beside the AutoAWQ-layout kernel (the
    on-disk layout read as it is) and cuBLAS bf16."""
    rows = []
    for name, (n, k) in PROJ.items():
        wq = [t[0] for t in awq_weights(1, k, n, g)]
        wk = [t[0] for t in kmajor_weights(1, n, k, g)]
        w_bf = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
        for m in PROJ_MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
            t_k = bench(lambda: w4a16_moe.w4a16_kmajor_linear(x, *wk))
            t_awq = bench(lambda: w4a16_gemm.w4a16_linear(x, *wq))
            t_bf16 = bench(lambda: x @ w_bf.t())
            nbytes = n * k * (0.5 + 3 / G) + 2 * m * (n + k)  # codes, fp16 scales, 8-bit zeros, x and y
            cfg = w4a16_moe.linear_config(x.device, m, n, k, G)
            rows.append({"op": name, "M": m, "N": n, "K": k, "path": cfg["PATH"], "split_k": cfg["SPLIT_K"],
                         "kmajor_ms": t_k, "autoawq_ms": t_awq, "bf16_ms": t_bf16, "floor_ms": nbytes / bw / 1e9,
                         "kmajor_frac_bw": nbytes / t_k / 1e9 / bw, "kmajor_tflops": 2 * m * n * k / t_k / 1e9})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def repack_ms_per_layer() -> dict:
    """Milliseconds to repack one MoE layer's experts (w1, w3, w2 of E experts) to the K-major layout on the GPU,
    expert by expert as quantkit/runtime/awq.py does at load: from AutoAWQ tensors (awq_to_kmajor), and from
    compressed-tensors tensors (unpack to codes, then pack_kmajor with the scales as stored)."""
    def codes(out_f: int, in_f: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = torch.randint(0, 16, (out_f, in_f), dtype=torch.uint8, device="cuda")
        z = torch.full((out_f, in_f // G), 8, dtype=torch.uint8, device="cuda")
        return q, torch.rand(out_f, in_f // G, device="cuda") * 4e-3 + 1e-3, z

    shapes = ((I, H), (I, H), (H, I))  # w1, w3, w2 as [out, in]
    awq = [pack_autoawq(*codes(o, i)) for o, i in shapes]
    ct = [pack_compressed_tensors(*codes(o, i), symmetric=True) for o, i in shapes]

    def from_awq() -> None:
        for t in awq:
            w4a16_gemm.awq_to_kmajor(*t)

    def from_ct() -> None:
        for t in ct:
            q, _, z = unpack_compressed_tensors(*t)
            w4a16_gemm.pack_kmajor(q, t[1], z)

    out = {}
    for name, fn in (("autoawq", from_awq), ("compressed-tensors", from_ct)):
        fn()  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(4):
            fn()
        torch.cuda.synchronize()
        out[name] = (time.perf_counter() - t0) / 4 * 1e3 * E
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "evals" / "results")
    ap.add_argument("--check", action="store_true", help="check every kernel against its reference first")
    ap.add_argument("--tune-seconds", type=float, default=0.0, help="tuning budget (0: use the stored configs)")
    ap.add_argument("--tune-linear-seconds", type=float, default=0.0,
                    help="the projections' tuning budget (the new table replaces kernels/configs/w4a16_linear.json)")
    ap.add_argument("--skip-moe", action="store_true", help="projections only: no MoE benchmark")
    ap.add_argument("--skip-proj", action="store_true", help="the MoE only: no projections, no repack timing")
    ap.add_argument("--ms", default=",".join(map(str, MS)),
                    help="the MoE's M values to check, tune and time (tuned buckets replace those of the table)")
    args = ap.parse_args()
    ms = [int(v) for v in args.ms.split(",") if v]
    MS[:] = [m for m in MS if m in ms] + [m for m in ms if m not in MS]
    TUNE_ORDER[:] = [m for m in TUNE_ORDER if m in MS] + [m for m in MS if m not in TUNE_ORDER]
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name()
    g = torch.Generator(device="cuda").manual_seed(0)
    bw, peak = ceilings()
    print(f"{device}: HBM read {bw:.2f} TB/s, bf16 matmul {peak:.0f} TFLOP/s", flush=True)
    w13 = kmajor_weights(E, 2 * I, H, g)  # [E, 2I, H/8]
    w2 = kmajor_weights(E, H, I, g)  # [E, H, I/8]
    checks = check_all(w13, w2, g) if args.check else []

    tuned: dict = {}
    if args.tune_seconds > 0:
        tuned = tune_moe(w13, w2, args.tune_seconds, g)
        src = ROOT / "kernels" / "configs" / "w4a16_moe.json"
        table = json.loads(src.read_text()) if src.exists() else {}
        table.setdefault(device, {}).setdefault(SHAPE_KEY, {}).update(tuned)
        tuned = table[device][SHAPE_KEY]
        (args.out / "w4a16_moe.json").write_text(json.dumps(table, indent=1) + "\n")
        print(f"tuned configs written to {args.out / 'w4a16_moe.json'} (copy to kernels/configs/)", flush=True)
    tuned_linear: dict = {}
    if args.tune_linear_seconds > 0:
        tuned_linear = tune_linear(args.tune_linear_seconds, g)
        src = ROOT / "kernels" / "configs" / "w4a16_linear.json"
        table = json.loads(src.read_text()) if src.exists() else {}
        table.setdefault(device, {}).update(tuned_linear)
        (args.out / "w4a16_linear.json").write_text(json.dumps(table, indent=1) + "\n")
        # the launcher reads the new table for the benchmark below
        w4a16_moe.load_config_table.cache_clear()
        (ROOT / "kernels" / "configs" / "w4a16_linear.json").write_text(json.dumps(table, indent=1) + "\n")
    moe = bench_moe(w13, w2, tuned, bw, peak, g) if not args.skip_moe else []
    proj = bench_proj(bw, g) if not args.skip_proj else []
    repack = repack_ms_per_layer() if not args.skip_proj else None

    commit = commit_id()
    result = {
        "benchmark": "W4A16 kernels (K-major layout; projections also in the AutoAWQ layout; group 128) on "
                     "MiniMax-M2 shapes",
        "date": datetime.date.today().isoformat(), "commit": commit, "device": device,
        "torch": torch.__version__, "triton": triton.__version__, "hbm_read_tbps": bw, "bf16_matmul_tflops": peak,
        "checks": checks, "tuned": tuned, "tuned_linear": tuned_linear, "moe": moe, "projections": proj,
        "repack_gpu_ms_per_layer": repack,
    }
    dest = args.out / f"bench_w4a16-{result['date']}-{device.replace(' ', '_')}-{commit}.json"
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{device}, torch {result['torch']}, triton {result['triton']}, commit {commit}, HBM {bw:.2f} TB/s, "
          f"bf16 matmul {peak:.0f} TFLOP/s")
    print("\nMoE layer (E=256, top-8, H=3072, I=1536), W4A16 group 128\n")
    print("| M | experts | path | W4A16 ms | % BW | TFLOP/s | % bf16 peak | bf16 loop ms | x bf16 loop "
          "| bf16 floor ms | x bf16 floor |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in moe:
        print(f"| {r['M']} | {r['experts_touched']} | {r['path']} | {r['w4a16_ms']:.4f} "
              f"| {100 * r['w4a16_frac_bw']:.0f} | {r['w4a16_tflops']:.1f} | {100 * r['w4a16_frac_bf16_peak']:.0f} "
              f"| {r['bf16_loop_ms']:.3f} | {r['speedup_vs_bf16_loop']:.1f} "
              f"| {r['bf16_floor_ms']:.4f} | {r['speedup_vs_bf16_floor']:.2f} |")
    print("\nAttention projections (q/k/v fused), W4A16 group 128\n")
    print("| op | M | path | split K | K-major ms | % BW | TFLOP/s | AutoAWQ-layout ms | bf16 ms | floor ms |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in proj:
        print(f"| {r['op']} | {r['M']} | {r['path']} | {r['split_k']} | {r['kmajor_ms']:.4f} "
              f"| {100 * r['kmajor_frac_bw']:.0f} | {r['kmajor_tflops']:.0f} | {r['autoawq_ms']:.4f} "
              f"| {r['bf16_ms']:.4f} | {r['floor_ms']:.4f} |")
    if repack:
        print(f"\nrepack to the K-major layout at load (GPU, expert by expert): {repack['autoawq']:.0f} ms per MoE "
              f"layer from AutoAWQ, {repack['compressed-tensors']:.0f} ms from compressed-tensors")
    print(f"written to {dest}")


if __name__ == "__main__":
    main()
