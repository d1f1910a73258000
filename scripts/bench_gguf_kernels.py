#!/usr/bin/env python
"""GGUF kernels (kernels/gguf_gemm.py, kernels/gguf_moe.py) on MiniMax-M2 shapes against the GPU's measured ceilings.

    python scripts/bench_gguf_kernels.py --check --tune 240 --out evals/results     # on an H100/H200

Three stages, in this order, each optional:
  --check      every kernel against its PyTorch reference on the GPU at MiniMax-M2 widths (all four types, the
               Q4_K_M / Q5_K_M expert mixes, M = 1, 16, 256); exits non-zero before timing anything if one is off.
  --tune S     block configurations for the fused MoE (the Q4_K_M and Q8_0 mixes, M buckets 1..256), at most S
               seconds: each candidate is checked against the reference, then timed from CUDA-graph replays; the
               fastest per bucket is merged into kernels/configs/gguf_moe.json under torch.cuda.get_device_name()
               (other devices' entries are kept), and a copy of that file is written to --out.
  (always)     the benchmark: HBM read and copy ceilings; for M = 1..256 the whole MoE layer (E=256, top-8,
               H=3072, I=1536: both GEMMs, SiLU*mul, router weights, top-k sum) for each type mix, beside a bf16 loop
               over the touched experts and the bf16 bandwidth floor; the attention projections (q 6144x3072,
               k/v 1024x3072, o 3072x6144) for each type beside cuBLAS bf16.
Bytes moved count the GGUF bytes of the weights touched (experts actually routed to) plus activations in and out;
"% BW" is that over the measured HBM read bandwidth. Timings are medians of CUDA-graph replays (the launch overhead
would otherwise decide every small-M figure). Results: a Markdown table on stdout and JSON in --out.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import triton
from bench_common import bf16_moe_loop, commit_id, rel_err
from quantkit.kernels import fp8_gemm, gguf_gemm, gguf_gemv_q8, gguf_moe
from quantkit.kernels.gguf_gemm import QTYPES, gguf_linear, gguf_linear_ref, row_bytes
from quantkit.kernels.gguf_moe import fused_moe_gguf, fused_moe_gguf_ref

ROOT = Path(__file__).resolve().parents[1]
H, I, E, TOPK = 3072, 1536, 256, 8
PROJ = {"q": (6144, 3072), "k/v": (1024, 3072), "o": (3072, 6144)}
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
MIXES = {  # name -> (gate, up, down): llama-quantize's expert types for the presets
    "Q4_K_M": ("q4_k", "q4_k", "q6_k"),
    "Q5_K_M": ("q5_k", "q5_k", "q6_k"),
    "Q4_K": ("q4_k",) * 3,
    "Q6_K": ("q6_k",) * 3,
    "Q8_0": ("q8_0",) * 3,
}
TUNE_MIXES = ("Q4_K_M", "Q8_0")
TUNE_MS = [1, 4, 16, 64, 256]
DEVICE = "cuda"  # a module constant so that the stages can be smoke-run elsewhere with small shapes


def timed(fn, rep: int = 100) -> float:
    """Median milliseconds of CUDA-graph replays (plain do_bench when fn cannot be captured)."""
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")
    except Exception as e:  # a host synchronisation inside fn
        print(f"(no CUDA graph: {type(e).__name__})", flush=True)
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")


def random_blocks(shape: tuple[int, ...], k: int, qtype: str, g: torch.Generator) -> torch.Tensor:
    """uint8 [*shape, row bytes] of valid blocks on the GPU: random quants and scales, small finite d and dmin."""
    qk, size = QTYPES[qtype]
    rows = 1
    for s in shape:
        rows *= s
    nb = k // qk
    b = torch.randint(0, 256, (rows, nb, size), device=DEVICE, dtype=torch.uint8, generator=g)
    d = (torch.rand(rows, nb, device=DEVICE, generator=g) * 2e-3 + 1e-4).half().view(torch.uint8).view(rows, nb, 2)
    if qtype == "q6_k":
        b[..., 208:210] = d
    else:
        b[..., 0:2] = d
        if qtype != "q8_0":
            b[..., 2:4] = d.flip(0)
    return b.view(*shape, nb * size)


def ceilings() -> dict:
    x = torch.randn(1 << 30, device=DEVICE, dtype=torch.bfloat16)  # 2 GiB
    read_ms = triton.testing.do_bench(lambda: x.sum(dtype=torch.float32), rep=200, return_mode="median")
    y = torch.empty_like(x)
    copy_ms = triton.testing.do_bench(lambda: y.copy_(x), rep=200, return_mode="median")
    return {"hbm_read_tbps": 2 * (1 << 30) / read_ms / 1e9, "d2d_copy_tbps": 4 * (1 << 30) / copy_ms / 1e9}


class Experts:
    """One layer's experts in every mix's types, made once (the bytes of a type are shared between mixes)."""

    def __init__(self, g: torch.Generator):
        self.gate, self.up, self.down = {}, {}, {}
        for qt in QTYPES:
            self.gate[qt] = random_blocks((E, I), H, qt, g)
            self.up[qt] = random_blocks((E, I), H, qt, g)
            self.down[qt] = random_blocks((E, H), I, qt, g)

    def of(self, mix: tuple[str, str, str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.gate[mix[0]], self.up[mix[1]], self.down[mix[2]]

    @staticmethod
    def bytes_per_expert(mix: tuple[str, str, str]) -> int:
        return I * (row_bytes(H, mix[0]) + row_bytes(H, mix[1])) + H * row_bytes(I, mix[2])


def routing(m: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(m, H, device=DEVICE, dtype=torch.bfloat16, generator=g)
    topk_w, topk_ids = torch.topk(torch.sigmoid(torch.randn(m, E, device=DEVICE, generator=g)), TOPK, dim=-1)
    return x, topk_w / topk_w.sum(-1, keepdim=True), topk_ids


# --------------------------------------------------------------------------------------------------------------------
# stages


def check(experts: Experts, g: torch.Generator) -> list[dict]:
    rows = []
    for name, mix in MIXES.items():
        gate, up, down = experts.of(mix)
        for m in (1, 16, 256):
            x, w, ids = routing(m, g)
            err = rel_err(fused_moe_gguf(x, gate, up, down, w, ids, mix), fused_moe_gguf_ref(x, gate, up, down, w,
                                                                                             ids, mix))
            rows.append({"what": f"moe {name}", "M": m, "rel_err": err, "ok": err < 2e-2})
    for qt, (n, k) in itertools.product(QTYPES, PROJ.values()):
        wb = random_blocks((n,), k, qt, g)
        for m in (1, 16, 256):
            x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16, generator=g)
            err = rel_err(gguf_linear(x, wb, qt), gguf_linear_ref(x, wb, qt))
            rows.append({"what": f"linear {qt} {n}x{k}", "M": m, "rel_err": err, "ok": err < 1e-2})
    for r in rows:
        print(f"check {r['what']} M={r['M']}: rel err {r['rel_err']:.2e} {'ok' if r['ok'] else 'FAILED'}", flush=True)
    return rows


def candidates(m: int, mix: tuple[str, str, str]) -> list[dict]:
    """Likely-best first, so that a tuning cut short by its budget has tried the good ones: what the launcher runs
    today (the table's entry for this device and bucket, or the default: a tuning never files anything slower than
    it), the default, the GEMV path's (for the mixes it reads, at decode sizes), a few hand-picked tile configs, then
    a grid (BLOCK_M < 16 is the FMA path, 16 and up tl.dot). Every entry names its PATH."""
    per_expert = m * TOPK / E
    first = [gguf_moe.moe_config(torch.device(DEVICE), m, TOPK, E, I, H, mix),
             gguf_moe._moe_default_config(m, TOPK, E, mix)]
    if gguf_moe.gemv_types(mix) and m * TOPK <= 16 * gguf_moe.GEMV_PAIRS_MAX:  # up to 2-4 pairs an expert
        gemv = hand = [dict(PATH="gemv", PREP=prep, PREFETCH=pf, LANES=lanes, BLOCK_M=bm, BLOCK_N=bn,
                     num_warps=nw * lanes, num_stages=1)
                for bm, bn, nw, prep, pf, lanes in (
                    (1, 32, 2, True, True, 1), (1, 32, 2, True, True, 2), (1, 32, 2, True, False, 1),
                    (1, 32, 2, False, True, 1), (1, 16, 1, True, True, 1), (1, 16, 1, True, True, 2),
                    (1, 64, 4, True, True, 1), (1, 64, 2, True, True, 1), (2, 32, 2, True, True, 1),
                    (2, 32, 2, True, True, 2), (4, 32, 2, True, True, 1), (2, 64, 4, True, True, 1),
                    (8, 32, 2, True, True, 1), (8, 32, 4, True, True, 1), (4, 64, 4, True, True, 1))]
        if m <= 2:  # K split over programs (GEMM 1 / GEMM 2; more warps at the fewest rows), before the rest: it
            # is what won at one and two tokens (evals/results/decode_moe-2026-12-05-*)
            split = [{**gemv[i], "SPLIT_K": s1, "SPLIT_K2": s2} for i in (0, 2, 1, 4, 6)
                     for s1, s2 in ((4, 2), (2, 2), (3, 3), (2, 1))]
            gemv = split + gemv
        if mix[2] == "q6_k":  # Q6_K down read as int32 words, first of all
            gemv = [{**c, "Q6_WORDS": True} for c in gemv[:4]] + gemv
        if mix[0] in gguf_gemv_q8.Q8_QTYPES and m * TOPK <= gguf_moe.GEMV_PAIRS_MAX:  # GEMM 1 on 8-bit activations
            q8 = [{**hand[0], "ACT_Q8": True, "SPLIT_K": s1, "SPLIT_K2": s2}
                  for s1, s2 in ((1, 1), (2, 1), (4, 2), (2, 2))]
            if mix[2] == "q6_k":  # a Q6_K down as words on fp32 activations (what won), or on 8-bit ones (Q6_Q8)
                q8 = [{**c, "Q6_WORDS": True} for c in q8] + [{**c, "Q6_Q8": True} for c in q8]
            # GEMM 2's 8-bit activations made in GEMM 1's epilogue
            q8 += [{**c, "EPI_Q8": True} for c in q8 if mix[2] != "q6_k" or c.get("Q6_Q8")]
            gemv = q8 + gemv
        group = gguf_gemm.GEMV_QTYPES[mix[2]][1]  # the launcher reads down's rows in groups of this many
        first += [c for c in gemv if (c["BLOCK_M"] > 1 or m * TOPK <= gguf_moe.GEMV_PAIRS_MAX)
                  and c["BLOCK_N"] % group == 0]
    if per_expert <= 4:
        first += [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns) for bm, bn, nw, ns in
                  ((1, 32, 4, 2), (2, 64, 4, 2), (16, 64, 4, 3), (1, 16, 4, 2), (2, 32, 8, 3), (4, 32, 4, 2))]
        grid = itertools.product([1, 2, 4, 16], [16, 32, 64, 128], [4, 8], [2, 3])
    else:
        first += [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns) for bm, bn, nw, ns in
                  ((16, 64, 4, 3), (16, 32, 4, 3), (32, 64, 4, 3), (16, 128, 8, 3))]
        grid = itertools.product([16, 32, 64], [32, 64, 128], [4, 8], [2, 3, 4])
    first += [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=ns) for bm, bn, nw, ns in grid
              if not (bm < 16 and bm * bn > 4 * 64 and nw == 4)]  # the FMA path's 3-D accumulators need warps
    out, seen = [], set()
    for c in first:
        c = {"GROUP_M": 1, "PATH": "tile", **c}
        key = tuple(sorted(c.items()))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def tune(experts: Experts, g: torch.Generator, budget_s: float, out: Path, tune_ms: list[int] = TUNE_MS,
         mixes: tuple[str, ...] = TUNE_MIXES) -> dict:
    start = time.monotonic()
    device = fp8_gemm.device_key(torch.device(DEVICE))  # torch.cuda.get_device_name(), as the launchers look it up
    table: dict = {}
    pairs = len(mixes) * len(tune_ms)
    for j, name in enumerate(mixes):
        mix = MIXES[name]
        gate, up, down = experts.of(mix)
        entries = {}
        for jm, m in enumerate(tune_ms):
            deadline = start + budget_s * (j * len(tune_ms) + jm + 1) / pairs  # an equal share of the budget each
            x, w, ids = routing(m, g)
            ref = fused_moe_gguf_ref(x, gate, up, down, w, ids, mix)
            best = None
            for cfg in candidates(m, mix):
                if time.monotonic() > deadline:
                    break
                run = lambda c=cfg: fused_moe_gguf(x, gate, up, down, w, ids, mix, config=c)  # noqa: E731
                try:
                    if rel_err(run(), ref) > 2e-2:
                        print(f"tune {name} M={m} {cfg}: wrong result, dropped", flush=True)
                        continue
                    ms = timed(run, rep=40)
                except Exception as e:  # out of shared memory or registers: not a candidate here
                    print(f"tune {name} M={m} {cfg}: {type(e).__name__}, skipped", flush=True)
                    torch.cuda.synchronize()
                    continue
                if best is None or ms < best[0]:
                    best = (ms, cfg)
            if best is not None:
                entries[str(m)] = best[1]
                print(f"tune {name} M={m}: {best[0]:.4f} ms {best[1]}", flush=True)
        if entries:
            table[gguf_moe.moe_shape_key(E, I, H, mix)] = entries
    path = ROOT / "kernels" / "configs" / "gguf_moe.json"
    merged = json.loads(path.read_text()) if path.exists() else {}
    if "_comment" not in merged:
        merged["_comment"] = ("Tuned block configurations for kernels/gguf_moe.py (fused_moe_gguf), written by "
                              "scripts/bench_gguf_kernels.py --tune. {device name: {'E=..,I=..,H=..,<gate>,<up>,"
                              "<down>' qtypes: {M bucket: config}}}; the nearest bucket is taken, missing keys "
                              "take the launcher's defaults.")
    for key, entries in table.items():  # buckets not tuned this time keep their entries
        merged.setdefault(device, {}).setdefault(key, {}).update(entries)
    path.write_text(json.dumps(merged, indent=1) + "\n")
    (out / "gguf_moe.json").write_text(json.dumps(merged, indent=1) + "\n")
    fp8_gemm.load_config_table.cache_clear()  # the benchmark below runs the new entries
    print(f"wrote {path} and {out / 'gguf_moe.json'}", flush=True)
    return table


def bench_moe(experts: Experts, g: torch.Generator, ceil: dict, ms: list[int]) -> list[dict]:
    w1 = torch.randn(E, I, H, device=DEVICE, dtype=torch.bfloat16, generator=g) * 0.02
    w3 = torch.randn(E, I, H, device=DEVICE, dtype=torch.bfloat16, generator=g) * 0.02
    w2 = torch.randn(E, H, I, device=DEVICE, dtype=torch.bfloat16, generator=g) * 0.02
    bw = ceil["hbm_read_tbps"] * 1e9  # bytes per ms
    rows = []
    for m in ms:
        x, w, ids = routing(m, g)
        touched = int(ids.unique().numel())
        act = 2 * m * H * 2  # x in, out
        t_bf16 = triton.testing.do_bench(lambda: bf16_moe_loop(x, w1, w3, w2, w, ids), rep=50, return_mode="median")
        row = {"M": m, "experts_touched": touched, "bf16_loop_ms": t_bf16,
               "bf16_floor_ms": (touched * 3 * H * I * 2 + act) / bw}
        for name, mix in MIXES.items():
            gate, up, down = experts.of(mix)
            t = timed(lambda: fused_moe_gguf(x, gate, up, down, w, ids, mix))
            nbytes = touched * Experts.bytes_per_expert(mix) + act
            row[name] = {"ms": t, "bytes": nbytes, "tbps": nbytes / t / 1e9, "frac_bw": nbytes / t / bw,
                         "floor_ms": nbytes / bw, "tflops": 2 * m * TOPK * 3 * H * I / t / 1e9}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bench_linear(g: torch.Generator, ceil: dict, ms: list[int]) -> list[dict]:
    bw = ceil["hbm_read_tbps"] * 1e9
    rows = []
    for op, (n, k) in PROJ.items():
        wbf = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16, generator=g) * 0.02
        ws = {qt: random_blocks((n,), k, qt, g) for qt in QTYPES}
        for m in ms:
            x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16, generator=g)
            t_bf16 = timed(lambda: x @ wbf.t())
            row = {"op": op, "N": n, "K": k, "M": m, "bf16_ms": t_bf16,
                   "bf16_frac_bw": (n * k * 2 + (m * k + m * n) * 2) / t_bf16 / bw}
            for qt, wb in ws.items():
                t = timed(lambda: gguf_linear(x, wb, qt))
                nbytes = wb.numel() + (m * k + m * n) * 2
                row[qt] = {"ms": t, "tbps": nbytes / t / 1e9, "frac_bw": nbytes / t / bw}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "evals" / "results")
    ap.add_argument("--check", action="store_true", help="validate every kernel against its reference first")
    ap.add_argument("--tune", type=float, default=0.0, metavar="SECONDS", help="tune the MoE configs, bounded")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="token counts of the MoE benchmark")
    ap.add_argument("--tune-ms", default=",".join(map(str, TUNE_MS)), help="token counts tuned")
    ap.add_argument("--tune-mixes", default=",".join(TUNE_MIXES), help=f"type mixes tuned, of {', '.join(MIXES)}")
    args = ap.parse_args()
    ms = [int(v) for v in args.ms.split(",")]
    tune_ms = [int(v) for v in args.tune_ms.split(",")]
    mixes = tuple(args.tune_mixes.split(","))
    if unknown := [m for m in mixes if m not in MIXES]:
        sys.exit(f"--tune-mixes: unknown {', '.join(unknown)} (known: {', '.join(MIXES)})")
    if not torch.cuda.is_available() or gguf_gemm.INTERPRETED:
        sys.exit("needs a CUDA device and compiled Triton (TRITON_INTERPRET unset)")
    args.out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    commit = commit_id()
    device = torch.cuda.get_device_name()
    result = {"benchmark": "GGUF kernels on MiniMax-M2 shapes", "date": datetime.date.today().isoformat(),
              "commit": commit, "device": device, "torch": torch.__version__, "triton": triton.__version__}
    dest = args.out / f"bench_gguf_kernels-{result['date']}-{device.replace(' ', '_')}-{commit}.json"

    def save() -> None:
        dest.write_text(json.dumps(result, indent=2) + "\n")

    t0 = time.monotonic()
    experts = Experts(g)
    if args.check:
        result["check"] = check(experts, g)
        save()
        if not all(r["ok"] for r in result["check"]):
            sys.exit(f"check failed: see {dest}")
        print(f"check passed in {time.monotonic() - t0:.0f} s", flush=True)
    if args.tune > 0:
        result["tuned"] = tune(experts, g, args.tune, args.out, tune_ms, mixes)
        save()
    if args.no_bench:
        return
    ceil = ceilings()
    result["ceilings"] = ceil
    print(json.dumps(ceil), flush=True)
    result["moe"] = bench_moe(experts, g, ceil, ms)
    save()
    result["linear"] = bench_linear(g, ceil, [m for m in (1, 4, 16, 64, 256) if m <= max(ms)])
    save()

    print(f"\n{device}, torch {result['torch']}, triton {result['triton']}, commit {commit}; "
          f"HBM read {ceil['hbm_read_tbps']:.2f} TB/s\n")
    print("MoE layer (E=256, top-8, H=3072, I=1536), ms and % of HBM read bandwidth\n")
    print("| M | experts | " + " | ".join(f"{n} ms | {n} % BW" for n in MIXES) + " | bf16 loop ms | bf16 floor ms |")
    print("|---:|---:|" + "---:|---:|" * len(MIXES) + "---:|---:|")
    for r in result["moe"]:
        cells = " | ".join(f"{r[n]['ms']:.4f} | {100 * r[n]['frac_bw']:.0f}" for n in MIXES)
        print(f"| {r['M']} | {r['experts_touched']} | {cells} | {r['bf16_loop_ms']:.3f} | {r['bf16_floor_ms']:.4f} |")
    print("\nAttention projections, ms (% BW)\n")
    print("| op | M | bf16 | " + " | ".join(QTYPES) + " |")
    print("|---|---:|---:|" + "---:|" * len(QTYPES))
    for r in result["linear"]:
        cells = " | ".join(f"{r[q]['ms']:.4f} ({100 * r[q]['frac_bw']:.0f})" for q in QTYPES)
        print(f"| {r['op']} | {r['M']} | {r['bf16_ms']:.4f} ({100 * r['bf16_frac_bw']:.0f}) | {cells} |")
    print(f"\nwritten to {dest} in {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
