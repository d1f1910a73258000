#!/usr/bin/env python
"""The decode MoE kernels (GGUF Q4_K_M and Q8_0, W4A16, block FP8) with K split over programs, against the launcher's
config.

    python scripts/bench_decode_moe.py --out evals/results/decode_moe          # on an H100/H200, about 2 minutes
    python scripts/bench_decode_moe.py --out DIR --write-configs               # and file the winners (see below)

At a few tokens the CUDA-core GEMV kernels run one pair's rows a program, so GEMM 1 of MiniMax-M2's MoE at one
token is 8 x 3072 weight rows, a thread (GGUF) or a few (W4A16) each: about 1.5 warps a scheduler on a 132-SM GPU,
each thread walking all of K. SPLIT_K gives each row's K to 2-4 programs (the last to finish adds the partials and
gates them; kernels/fp8_moe.gemv_store), multiplying the warps in flight. For each format and M = 1, 2, 4, 8:
the launcher's config, then the same with GEMM 1 split 2, 3, 4 ways and with both GEMMs split (SPLIT_K / SPLIT_K2;
W4A16 also its rows, pipelined and tensor-core (mma) paths), each checked against the reference before it is timed
(medians of CUDA-graph replays); and, at M = 1, each launch of the launcher's config and of the fastest split timed
by the profiler, so the table says where the time goes. "% BW" counts the bytes of
the experts touched over the HBM read rate measured in the same run. --write-configs merges each bucket's fastest
config into kernels/configs/gguf_moe.json, w4a16_moe.json and fp8_moe.json under this GPU's name (and copies them
to --out); the tuners' other buckets missing from the GPU's table are first filed with what the launcher runs there
now, so that no other M changes. FP8 ("--formats fp8"): x comes quantized (the norm's launch does that in a
decode step), the unsorted pairs at one token take SPLIT_K (GEMM 2's under "GEMM2"), and BLOCK_N 32-128 is tried.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
import triton
from bench_common import checked_timing, commit_id, merge_table
from bench_gguf_kernels import MIXES as GGUF_MIXES
from bench_gguf_kernels import Experts, ceilings
from bench_gguf_kernels import routing as gguf_routing
from bench_w4a16 import kmajor_weights, moe_bytes
from bench_w4a16 import routing as w4_routing
from quantkit.kernels import fp8_gemm, fp8_moe, gguf_moe, w4a16_moe

H, I, E, TOPK, G = 3072, 1536, 256, 8, 128
MS = [1, 2, 4, 8]
SPLITS = [2, 3, 4]  # GEMM 1's splits tried alone
GGUF_BUCKETS = [1, 4, 16, 64, 256]  # scripts/bench_gguf_kernels.py's tuned buckets
W4A16_BUCKETS = [1, 2, 4, 8, 16, 64, 256, 1024, 4096]  # scripts/bench_w4a16.py's
FP8_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096]  # scripts/tune_fp8.py's
FP8_SHAPE = f"E={E},I={I},H={H},block"
MIXES = {k: v for k, v in GGUF_MIXES.items() if k != "Q4_K"}  # the presets' expert types


def timed(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def kernel_times(fn, reps: int = 20) -> list[tuple[str, float]]:
    """[(kernel name, microseconds a call)] of fn's GPU kernels, in launch order, from the profiler."""
    fn()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            out[ev.name] = out.get(ev.name, 0.0) + ev.device_time / reps
    return [(k[:60], round(v, 2)) for k, v in out.items()]


def fp8_variants(base: dict, m: int) -> list[tuple[str, dict]]:
    """FP8 entries: the launcher's, then 16-row tiles of 32, 64 and 128 columns on 4 warps; at one token (unsorted
    pairs) each with GEMM 1 split 2, 3, 4 or 6 ways and GEMM 2 1, 2 or 3 (split_divisor keeps what divides K), and
    the launcher's and these tiles with both GEMMs in one launch (ONE_LAUNCH)."""
    out = [("launcher", base)]
    splits = ((1, 1), (2, 1), (3, 1), (4, 1), (6, 1), (2, 2), (4, 2), (3, 3), (6, 3)) if m == 1 else ((1, 1),)
    for bn in (32, 64, 128):
        tile = dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
        out += [(f"BLOCK_N {bn} split {s1}/{s2}", {**tile, "SPLIT_K": s1, "GEMM2": {"SPLIT_K": s2}})
                for s1, s2 in splits]
    if m == 1:  # both GEMMs in one launch (ONE_LAUNCH; 2: GEMM 2's programs back off while they wait)
        out += [(f"one launch{' sleep' if mode == 2 else ''}", {**base, "ONE_LAUNCH": mode}) for mode in (1, 2)]
        for bn in (32, 64, 128):
            tile = dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4, ONE_LAUNCH=1)
            out += [(f"one launch BLOCK_N {bn} split {s1}/{s2}", {**tile, "SPLIT_K": s1, "GEMM2": {"SPLIT_K": s2}})
                    for s1, s2 in ((1, 1), (2, 1), (2, 2), (3, 1))]
    return out


def variants(base: dict, w4: bool, q6k: bool = False) -> list[tuple[str, dict]]:
    """The launcher's config, then GEMM 1 split 2-4 ways, then both GEMMs split (SPLIT_K / SPLIT_K2); GGUF: GEMM 1
    on 8-bit activations (ACT_Q8) too, and where the mix holds Q6_K, its rows read as words (Q6_WORDS) with and
    without ACT_Q8, and GEMM 2 on 8-bit activations too (Q6_Q8); GEMM 2's 8-bit activations from GEMM 1's
    epilogue (EPI_Q8)."""
    def splits(label: str, cfg: dict) -> list[tuple[str, dict]]:
        one = [(f"{label}split {s}/1", {**cfg, "SPLIT_K": s, "SPLIT_K2": 1}) for s in SPLITS]
        both = [(f"{label}split {s}/{s2}", {**cfg, "SPLIT_K": s, "SPLIT_K2": s2}) for s, s2 in ((2, 2), (4, 2), (3, 3))]
        return one + both
    out = [("launcher", base)] + splits("", base)
    if q6k and base.get("PATH") == "gemv":  # Q6_K down read as int32 words (Q4_K_M)
        q6 = {**base, "Q6_WORDS": True}
        out += [("q6 words", q6)] + [(f"q6 words split {s}/{s2}", {**q6, "SPLIT_K": s, "SPLIT_K2": s2})
                                     for s, s2 in ((2, 2), (4, 2))]
    if not w4 and base.get("PATH") == "gemv":
        q8 = {**base, "ACT_Q8": True, "BLOCK_M": 1}
        out += [("act_q8", {**q8, "SPLIT_K": 1, "SPLIT_K2": 1})] + splits("act_q8 ", q8)
        out += [("act_q8 BLOCK_N 64 split 2/2", {**q8, "BLOCK_N": 64, "num_warps": 2, "SPLIT_K": 2, "SPLIT_K2": 2})]
        if q6k:
            q8w = {**q8, "Q6_WORDS": True}
            out += [(f"act_q8 q6 words split {s}/{s2}", {**q8w, "SPLIT_K": s, "SPLIT_K2": s2})
                    for s, s2 in ((1, 1), (2, 1), (2, 2), (4, 2))]
            out += [(f"act_q8 q6q8 split {s}/{s2}", {**q8, "Q6_Q8": True, "SPLIT_K": s, "SPLIT_K2": s2})
                    for s, s2 in ((1, 1), (2, 1), (2, 2), (4, 2))]
            out += [(f"act_q8 q6q8 epi split {s}/{s2}", {**q8, "Q6_Q8": True, "EPI_Q8": True, "SPLIT_K": s,
                                                          "SPLIT_K2": s2}) for s, s2 in ((1, 1), (2, 2), (4, 2))]
            # the next super-block's words loaded during this one (Q8_PREFETCH), one row a thread or two (1 warp)
            out += [(f"act_q8 q6q8 epi prefetch{'' if nw == 2 else ' warps 1'} split {s}/{s2}",
                     {**q8, "Q6_Q8": True, "EPI_Q8": True, "Q8_PREFETCH": True, "num_warps": nw, "SPLIT_K": s,
                      "SPLIT_K2": s2})
                    for nw in (2, 1) for s, s2 in ((1, 1), (2, 1), (2, 2), (4, 2), (4, 3))]
            # GEMM 2's Q6_K rows on 2 or 4 threads each (Q6_LANES: its programs that many times the warps)
            out += [(f"act_q8 q6q8 epi lanes {ln} split {s}/{s2}",
                     {**q8, "Q6_Q8": True, "EPI_Q8": True, "Q6_LANES": ln, "SPLIT_K": s, "SPLIT_K2": s2})
                    for ln in (2, 4) for s, s2 in ((1, 1), (2, 1), (2, 2), (4, 2), (4, 3))]
            # both: the other types' rows prefetched (Q4_K / Q5_K gate and up), the Q6_K rows on lanes
            out += [(f"act_q8 q6q8 epi prefetch lanes {ln} split {s}/{s2}",
                     {**q8, "Q6_Q8": True, "EPI_Q8": True, "Q8_PREFETCH": True, "Q6_LANES": ln, "SPLIT_K": s,
                      "SPLIT_K2": s2})
                    for ln in (2, 4) for s, s2 in ((1, 1), (2, 1), (2, 2))]
        else:  # GEMM 2 on 8-bit activations already: made in GEMM 1's epilogue
            out += [(f"act_q8 epi split {s}/{s2}", {**q8, "EPI_Q8": True, "SPLIT_K": s, "SPLIT_K2": s2})
                    for s, s2 in ((1, 1), (2, 1), (2, 2), (3, 3))]
            # Q8_0 super-blocks in 16-byte loads (Q8_0_VEC16), and the next one loaded during this one
            out += [(f"act_q8 epi vec16{' prefetch' if pf else ''} split {s}/{s2}",
                     {**q8, "EPI_Q8": True, "Q8_0_VEC16": True, "Q8_PREFETCH": pf, "SPLIT_K": s, "SPLIT_K2": s2})
                    for pf in (False, True) for s, s2 in ((1, 1), (2, 1), (2, 2), (3, 3))]
    if w4 and base.get("PATH") == "gemv":
        rows = dict(PATH="rows", BLOCK_M=1, BLOCK_N=128, GROUP_M=1, num_warps=8, num_stages=1)
        out += [("rows", rows)] + splits("rows ", rows)
    # the K loop software-pipelined (STAGES; W4A16 without its register prefetch), the launcher's splits kept
    if w4 and base.get("PATH") == "gemv":
        out += [(f"stages {st}", {**base, "PREFETCH": 0, "STAGES": st}) for st in (2, 3, 4, 6)]
        out += [(f"stages {st} bn {bn}", {**base, "PREFETCH": 0, "STAGES": st, "BLOCK_N": bn})
                for st in (3, 4) for bn in (32, 64) if bn != base.get("BLOCK_N")]
        out += [(f"bn {bn} prefetch 2", {**base, "PREFETCH": 2, "STAGES": 1, "BLOCK_N": bn}) for bn in (32, 64)]
        out += [(f"stages 3 bn 32 warps {nw} split {s1}/{s2}", {**base, "PREFETCH": 0, "STAGES": 3, "BLOCK_N": 32,
                                                                "num_warps": nw, "SPLIT_K": s1, "SPLIT_K2": s2})
                for nw in (2, 4) for s1, s2 in ((1, 1), (2, 2), (2, 1))]
    # several groups a K step (each row's GSTEP groups of words, GSTEP * 64 contiguous bytes, in one load)
    if w4 and base.get("PATH") == "gemv":
        out += [(f"gstep {gs} stages {st} bn {bn} warps {nw} split {s1}/{s2}",
                 {**base, "PREFETCH": 0, "STAGES": st, "GSTEP": gs, "BLOCK_N": bn, "num_warps": nw, "SPLIT_K": s1,
                  "SPLIT_K2": s2})
                for gs in (2, 4) for st in (2, 3, 4) for bn, nw in ((32, 2), (64, 4), (32, 4), (16, 2))
                for s1, s2 in ((1, 1), (2, 2))]
    # both GEMMs in one launch (ONE_LAUNCH; 2: GEMM 2's programs back off between polls of their pair's counter;
    # 3: they load their weight share before they wait, 4: both)
    # (32 rows a program, a thread a row; or 16, two threads a row: fewer registers, more programs a multiprocessor)
    if w4 and base.get("PATH") == "gemv":
        one_name = {1: "one launch", 2: "one launch sleep", 3: "one launch preload", 4: "one launch preload sleep"}
        combos = [(one, bn, st, s1, s2) for one in (1, 2) for bn in (32, 16) for st in (2, 3)
                  for s1, s2 in ((1, 1), (2, 2), (2, 1))]
        combos += [(one, bn, st, s1, s2) for one in (3, 4) for st in (2, 3) for s1 in (1, 2)
                   for bn, s2 in ((32, 3), (32, 4), (32, 6), (16, 2), (16, 3), (16, 4))]  # shares fitting registers
        out += [(f"{one_name[one]} gstep 2 stages {st}{'' if bn == 32 else f' bn {bn}'} split {s1}/{s2}",
                 {**base, "PREFETCH": 0, "STAGES": st, "GSTEP": 2, "BLOCK_N": bn, "num_warps": 2, "SPLIT_K": s1,
                  "SPLIT_K2": s2, "ONE_LAUNCH": one})
                for one, bn, st, s1, s2 in combos]
    # the tensor-core path (weights as the A operand, the tokens of a 16-row block as B): on the sorted list, and
    # on unsorted pairs (one a program, K split as the GEMV path's)
    if w4:
        # one group a K step, then two
        for gs, prefix, sorted_stages in ((1, "mma ", (2, 3, 4)), (2, "mma gstep 2 ", (2, 3))):
            out += [(f"{prefix}bn {bn} warps {nw} stages {st}", dict(PATH="mma", BLOCK_M=16, BLOCK_N=bn, GROUP_M=1,
                                                                      num_warps=nw, num_stages=st, GSTEP=gs))
                    for bn in (64, 128) for nw in (4, 8) for st in sorted_stages]
            out += [(f"{prefix.replace('mma ', 'mma pairs ')}bn {bn} warps {nw} stages {st} split {s1}/{s2}",
                     dict(PATH="mma", PAIRS=True, BLOCK_M=16, BLOCK_N=bn, GROUP_M=1, num_warps=nw, num_stages=st,
                          SPLIT_K=s1, SPLIT_K2=s2, GSTEP=gs))
                    for bn in (64, 128) for nw in (4, 8) for st in (2, 3) for s1, s2 in ((1, 1), (2, 2), (4, 2))]
    # prefill sizes (the launcher on the dot path): its tiles with eight dots of K = G/8 a group, or one of K = G
    # (WIDE 1; 2: places j and j + 4 from one LOP3 as 2^m + q)
    if w4 and base.get("PATH") == "dot":
        out += [(f"dot bm {bm} bn {bn} warps {nw} stages {st}{['', ' wide', ' wide pairs'][wide]}",
                 dict(PATH="dot", BLOCK_M=bm, BLOCK_N=bn, GROUP_M=8, num_warps=nw, num_stages=st, WIDE=wide))
                for bm, bn, nw in ((64, 128, 8), (64, 64, 4), (32, 64, 4), (128, 64, 8)) for st in (3, 4)
                for wide in (0, 1, 2)]
    return out


def run_format(name: str, call, ref_of, base_of, per_expert_bytes: float, bw: float, ms: list[int],
               w4: bool, log: Path | None = None, q6k: bool = False,
               only: set[str] | None = None, variants_of=None) -> tuple[list[dict], dict]:
    """Each M's variants timed; (rows, {M: fastest config}). Each row is also appended to log as it comes.
    variants_of(base, m): the variants, for another format than `variants` knows."""
    rows, best_cfgs = [], {}
    for m in ms:
        inputs = ref_of(m)
        ref = inputs["ref"]
        base = base_of(m)
        touched = int(inputs["ids"].unique().numel())
        nbytes = touched * per_expert_bytes + 2 * m * H * 2
        best = None
        for label, cfg in (variants_of(base, m) if variants_of else variants(base, w4, q6k)):
            if only and label not in only:
                continue
            if m * TOPK > 64 and cfg.get("PATH") == "rows":
                continue
            fn = lambda c=cfg: call(inputs, c)  # noqa: E731
            timing = checked_timing(fn, ref, 2e-2, timed, f"{name} M={m} {label}")
            if timing is None:
                continue
            err, t = timing
            row = {"format": name, "M": m, "variant": label, "config": cfg, "ms": round(t, 4),
                   "gbps": round(nbytes / t / 1e6, 1), "pct_bw": round(100 * nbytes / t / 1e6 / (bw * 1e3), 1),
                   "rel_err": err}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if log is not None:
                with open(log, "a") as f:
                    f.write(json.dumps(row) + "\n")
            if best is None or t < best[0]:
                best = (t, label, cfg)
        if best is None:
            continue
        best_cfgs[str(m)] = best[2]
        if m == 1:  # where the time goes: each launch alone
            for label, cfg in (("launcher", base), (best[1], best[2])):
                try:
                    ks = kernel_times(lambda c=cfg: call(inputs, c))
                except Exception as e:  # the profiler unavailable: the table stands without it
                    print(f"{name} M=1 {label}: no profile ({type(e).__name__}: {e})", flush=True)
                    continue
                rows.append({"format": name, "M": m, "variant": label, "kernels_us": ks})
                print(f"{name} M=1 {label} kernels (us): {ks}", flush=True)
    return rows, best_cfgs


def run_fp8(g: torch.Generator, device: str, bw: float, ms: list[int], log: Path | None,
            only: set[str] | None) -> tuple[list[dict], dict]:
    """Block-FP8 experts (random codes, block scales) through `run_format`: x quantized by the caller as a decode
    step's norm does, each entry passed to fused_moe_fp8 as `config`."""
    w13 = (torch.randn(E, 2 * I, H, device=device, generator=g) * 64).to(torch.float8_e4m3fn)
    w2 = (torch.randn(E, H, I, device=device, generator=g) * 64).to(torch.float8_e4m3fn)
    s13 = torch.rand(E, 2 * I // G, H // G, device=device, generator=g) * 1e-4 + 1e-4
    s2 = torch.rand(E, H // G, I // G, device=device, generator=g) * 1e-4 + 1e-4
    weights = (w13, s13, w2, s2)

    def ref_of(m: int) -> dict:
        x = torch.randn(m, H, device=device, dtype=torch.bfloat16, generator=g)
        tw, ids = torch.topk(torch.sigmoid(torch.randn(m, E, device=device, generator=g)), TOPK, dim=-1)
        tw = (tw / tw.sum(-1, keepdim=True)).contiguous()
        ref = fp8_moe.fused_moe_fp8_ref(x, *weights, tw, ids)
        return {"x": x, "xq": fp8_gemm.per_token_group_quant_fp8(x, G), "w": tw, "ids": ids, "ref": ref}

    def call(inp: dict, cfg: dict) -> torch.Tensor:
        return fp8_moe.fused_moe_fp8(inp["x"], *weights, inp["w"], inp["ids"], x_quant=inp["xq"], config=cfg)

    def base_of(m: int) -> dict:
        return fp8_moe.table_entry(fp8_moe.moe_config(torch.device(device), m, TOPK, E, I, H, "block"))

    per_expert = 3 * H * I + 4 * (2 * I // G * (H // G) + H // G * (I // G))  # codes and block scales
    return run_format("FP8", call, ref_of, base_of, per_expert, bw, ms, False, log, only=only,
                      variants_of=fp8_variants)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--write-configs", action="store_true")
    ap.add_argument("--formats", default="gguf,w4a16", help="which of gguf, w4a16, fp8 to run")
    ap.add_argument("--mixes", default=",".join(MIXES), help="which GGUF mixes to run")
    ap.add_argument("--only", default="", help="comma-separated variant labels to time (default: all)")
    args = ap.parse_args()
    ms = [int(v) for v in args.ms.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    bw = ceilings()["hbm_read_tbps"]
    device = fp8_gemm.device_key(torch.device("cuda"))
    print(f"{device}: HBM read {bw:.2f} TB/s", flush=True)
    rows, tables = [], {}

    formats = args.formats.split(",")
    experts = Experts(g) if "gguf" in formats else None
    log = args.out / "rows.jsonl"
    only = set(filter(None, args.only.split(",")))
    mixes = {k: v for k, v in MIXES.items() if k in args.mixes.split(",")}
    for name, mix in mixes.items() if "gguf" in formats else ():
        gate, up, down = experts.of(mix)

        def ref_of(m: int, mix=mix, gate=gate, up=up, down=down) -> dict:
            x, w, ids = gguf_routing(m, g)
            return {"x": x, "w": w, "ids": ids, "ref": gguf_moe.fused_moe_gguf_ref(x, gate, up, down, w, ids, mix)}

        def call(inp: dict, cfg: dict, mix=mix, gate=gate, up=up, down=down) -> torch.Tensor:
            return gguf_moe.fused_moe_gguf(inp["x"], gate, up, down, inp["w"], inp["ids"], mix, config=cfg)

        base_of = lambda m, mix=mix: gguf_moe.moe_config(torch.device("cuda"), m, TOPK, E, I, H, mix)  # noqa: E731
        r, best = run_format(name, call, ref_of, base_of, Experts.bytes_per_expert(mix), bw, ms, False, log,
                             "q6_k" in mix, only)
        rows += r
        tables[("gguf_moe.json", gguf_moe.moe_shape_key(E, I, H, mix))] = best
    experts = None
    torch.cuda.empty_cache()

    if "fp8" in formats:
        r, best = run_fp8(g, "cuda", bw, ms, log, only)
        rows += r
        tables[("fp8_moe.json", FP8_SHAPE)] = best
        torch.cuda.empty_cache()

    if "w4a16" not in formats:
        return finish(args, device, bw, rows, tables)
    w13 = kmajor_weights(E, 2 * I, H, g)
    w2 = kmajor_weights(E, H, I, g)

    def w4_ref_of(m: int) -> dict:
        x = torch.randn(m, H, device="cuda", dtype=torch.bfloat16, generator=g)
        tw, ids = w4_routing(m, g)
        return {"x": x, "w": tw, "ids": ids, "ref": w4a16_moe.fused_moe_w4a16_ref(x, *w13, *w2, tw, ids)}

    def w4_call(inp: dict, cfg: dict) -> torch.Tensor:
        return w4a16_moe.fused_moe_w4a16(inp["x"], *w13, *w2, inp["w"], inp["ids"], config=cfg)

    w4_base = lambda m: w4a16_moe.moe_config(torch.device("cuda"), m, TOPK, E, I, H, G)  # noqa: E731
    r, best = run_format("W4A16", w4_call, w4_ref_of, w4_base, moe_bytes(1, 0), bw, ms, True, log, only=only)
    rows += r
    tables[("w4a16_moe.json", f"E={E},I={I},H={H},G={G}")] = best
    finish(args, device, bw, rows, tables)


def finish(args, device: str, bw: float, rows: list[dict], tables: dict) -> None:
    print(f"\n{device}, HBM read {bw:.2f} TB/s, commit {commit_id()}\n")
    print("| format | M | variant | ms | GB/s | % BW |\n|---|---|---|---|---|---|")
    for r in rows:
        if "ms" in r:
            print(f"| {r['format']} | {r['M']} | {r['variant']} | {r['ms']:.4f} | {r['gbps']:.0f} "
                  f"| {r['pct_bw']:.1f} |")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    res = {"device": device, "hbm_read_tbps": bw, "commit": commit_id(), "date": stamp, "rows": rows,
           "best": {f"{k[0]} {k[1]}": v for k, v in tables.items()}}
    path = args.out / f"bench_decode_moe-{stamp}-{device.replace(' ', '_')}-{commit_id()}.json"
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {path}")
    if args.write_configs:
        for (table_name, shape), entries in tables.items():
            merge_table(table_name, shape, device, entries, default_buckets(table_name, shape), args.out)


def default_buckets(table_name: str, shape: str) -> dict:
    """What the launcher runs on this GPU at the buckets its tuner files, from the tables as this run read them
    (the tables are read once, so a table written earlier in the run does not count)."""
    dev = torch.device("cuda")
    if table_name == "gguf_moe.json":
        mix = next(m for m in MIXES.values() if gguf_moe.moe_shape_key(E, I, H, m) == shape)
        return {str(m): gguf_moe.moe_config(dev, m, TOPK, E, I, H, mix) for m in GGUF_BUCKETS}
    if table_name == "fp8_moe.json":
        return {str(m): fp8_moe.table_entry(fp8_moe.moe_config(dev, m, TOPK, E, I, H, "block")) for m in FP8_BUCKETS}
    return {str(m): w4a16_moe.moe_config(dev, m, TOPK, E, I, H, G) for m in W4A16_BUCKETS}


if __name__ == "__main__":
    main()
