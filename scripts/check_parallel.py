#!/usr/bin/env python
"""Tensor/expert-parallel logits against one process: NCCL on GPUs (gloo on the CPU), one table, one JSON.

    python scripts/check_parallel.py CKPT [CKPT@fp8 ...] --device cuda --degrees 2x1,1x2,2x2 --json out.json

For each checkpoint and backend (dense; fp8 as well for FP8 checkpoints; --backends to choose; INT4 checkpoints run
on the awq backend, GGUF files on the gguf backend), the logits of a left-padded prefill (2 x 24 tokens) and of one
decode step after it, computed by one process on the first device, are compared with those of world = max(tp, ep)
processes for each TPxEP degree (rank 0's copy; every rank holds the same). Reported: relative L2 error and top-1
agreement of the logits per degree, and the largest relative L2 error of any attention or MoE sublayer run
teacher-forced (fed the one process's input for that call: runtime.parallel.sublayer_io).

Pass/fail: the dense backend must match to fp32 rounding both ways. The fp8 backend is judged on the sublayers only:
its activations are re-quantized to FP8 in every layer and experts are chosen by top-k, so the fp32 rounding of a
changed summation order (o_proj, QK-norm and expert partials summed per rank) flips an FP8 rounding now and then,
that moves some later token's router past a near-tie, and the logits at that token change by O(1). At MiniMax-M2's
width (2 x 24 tokens, 256 experts) that alone takes the logits of a correct TP=2 run a few percent away and changes
top-1 at several positions, so end-to-end logits bound nothing there; sublayers fed the same input agree to rounding
(plus a rare FP8 flip in the o_proj input), while a slicing error still shows in full. Exit code 1 if any case fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from quantkit.checkpoint import CheckpointReader
from quantkit.formats.awq import open_awq_reader
from quantkit.runtime import load_model
from quantkit.runtime.gguf import find_gguf
from quantkit.runtime.model import checkpoint_fp8_scheme
from quantkit.runtime.parallel import init_parallel, spawn, sublayer_io

# relative L2: of the logits (None: reported, not judged) and of every teacher-forced sublayer (see the docstring)
# awq: weight-only INT4 with fp32 activations, so no re-quantization amplifies the rounding: judged as dense is, with
# room for the W4A16 kernel's different split of the K reduction per rank
# (gguf: weight-only too); fp8 sublayers: one flipped rounding in a 2-token decode is ~6e-4
TOLERANCE = {"dense": 1e-5, "fp8": None, "awq": 1e-4, "gguf": 1e-4}
SUBLAYER_TOLERANCE = {"dense": 1e-5, "fp8": 5e-3, "awq": 1e-4, "gguf": 1e-4}


def logits(model) -> tuple[torch.Tensor, torch.Tensor]:
    vocab = model.cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 24), generator=g).to(model.device)
    valid = torch.ones(2, 24, dtype=torch.bool, device=model.device)
    valid[1, :9] = False
    cache = model.new_cache(2, 32)
    first = model(ids, cache, valid).float().cpu()
    return first, model(ids[:, -1:], cache).float().cpu()


def run(model, feed=None) -> tuple[tuple[torch.Tensor, torch.Tensor], list]:
    """(logits, sublayer record): free-running logits, then the same steps with every sublayer recorded (and, with
    feed, run on the recorded inputs of the one process)."""
    free = logits(model)
    with sublayer_io(model, feed) as record:
        logits(model)
    return free, record


def sublayer_error(got: list, ref: list) -> tuple[float, str]:
    """The largest relative L2 error over the recorded sublayer outputs, and where it is."""
    worst, where = 0.0, "-"
    for (kind, layer, _, g), (_, _, _, r) in zip(got, ref):
        err = ((g.float() - r.float()).norm() / r.float().norm().clamp(min=1e-30)).item()
        if err >= worst:
            worst, where = err, f"{kind} {layer}"
    return worst, where


def ranks(cases: list[tuple[str, str]], degrees: list[tuple[int, int]], device: str, out: str) -> None:
    for i, (ckpt, backend) in enumerate(cases):
        for tp, ep in degrees:
            t0 = time.perf_counter()
            spec, dev = init_parallel(tp, ep, device)
            model = load_model(ckpt, dtype=torch.float32, device=dev, backend=backend)
            t1 = time.perf_counter()
            result = run(model, torch.load(os.path.join(out, f"{i}-ref.pt")))
            if spec.rank == 0:
                torch.save(result, os.path.join(out, f"{i}-{tp}x{ep}.pt"))
                print(f"rank 0, {tp}x{ep}: {ckpt} {backend}: load {t1 - t0:.1f} s, run "
                      f"{time.perf_counter() - t1:.1f} s", file=sys.stderr, flush=True)
            del model
            if dev.type == "cuda":
                torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ckpts", nargs="+")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--degrees", default="2x1,1x2,2x2", help="TPxEP pairs of one world size")
    ap.add_argument("--backends", default="dense,fp8", help="fp8 runs on FP8 checkpoints only")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--md", default=None, help="write the table here too")
    args = ap.parse_args()
    degrees = [tuple(int(x) for x in d.split("x")) for d in args.degrees.split(",")]
    worlds = {max(d) for d in degrees}
    if len(worlds) != 1:
        ap.error("--degrees: one world size per run")
    world = worlds.pop()
    cases = []
    for arg in args.ckpts:  # PATH, or PATH@fp8 to choose that checkpoint's backends
        ckpt, _, only = arg.partition("@")
        if find_gguf(ckpt) is not None:  # a GGUF file (or a folder holding one): its blocks as stored
            cases.append((ckpt, "gguf"))
            continue
        if open_awq_reader(ckpt) is not None:  # INT4: the awq backend only
            cases.append((ckpt, "awq"))
            continue
        fp8 = checkpoint_fp8_scheme(CheckpointReader(ckpt)) is not None
        backends = (only or args.backends).split(",")
        cases += [(ckpt, b) for b in backends if b == "dense" or (b == "fp8" and fp8)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        refs = {}
        for i, (ckpt, backend) in enumerate(cases):  # one process first, then freed before the ranks start
            t0 = time.perf_counter()
            model = load_model(ckpt, dtype=torch.float32, device=args.device, backend=backend)
            t1 = time.perf_counter()
            refs[ckpt, backend] = run(model)
            torch.save(refs[ckpt, backend][1], os.path.join(tmp, f"{i}-ref.pt"))  # the ranks' teacher
            del model
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            print(f"one process: {ckpt} {backend}: load {t1 - t0:.1f} s, run {time.perf_counter() - t1:.1f} s",
                  file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        spawn(ranks, world, cases, degrees, args.device, tmp)
        print(f"{world} ranks: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        for i, (ckpt, backend) in enumerate(cases):
            ref, ref_io = refs[ckpt, backend]
            for tp, ep in degrees:
                got, got_io = torch.load(os.path.join(tmp, f"{i}-{tp}x{ep}.pt"))
                rel = max(((g - r).norm() / r.norm()).item() for g, r in zip(got, ref))
                top1 = min((g.argmax(-1) == r.argmax(-1)).float().mean().item() for g, r in zip(got, ref))
                sub, where = sublayer_error(got_io, ref_io)
                tol, sub_tol = TOLERANCE[backend], SUBLAYER_TOLERANCE[backend]
                ok = len(got_io) == len(ref_io) and sub < sub_tol and (tol is None or rel < tol)
                rows.append({"checkpoint": ckpt, "backend": backend, "tp": tp, "ep": ep, "world": world,
                             "rel_l2": rel, "top1": top1, "tolerance": tol, "sublayer_rel_l2": sub,
                             "sublayer_worst": where, "sublayer_tolerance": sub_tol, "pass": ok})
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    comm = "NCCL" if args.device.startswith("cuda") else "gloo"
    lines = [f"| checkpoint | backend | TPxEP | logits rel L2 vs one process | top-1 agreement | worst sublayer rel L2 "
             f"(teacher-forced) | pass ({device}, {comm}) |", "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        bound = f"sublayers < {r['sublayer_tolerance']:g}"
        if r["tolerance"] is not None:
            bound += f", logits < {r['tolerance']:g}"
        lines.append(f"| {Path(r['checkpoint']).name} | {r['backend']} | {r['tp']}x{r['ep']} | {r['rel_l2']:.2e} "
                     f"| {r['top1']:.3f} | {r['sublayer_rel_l2']:.2e} ({r['sublayer_worst']}) "
                     f"| {'yes' if r['pass'] else 'NO'} ({bound}) |")
    print("\n".join(lines))
    if args.md:
        Path(args.md).write_text("\n".join(lines) + "\n")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": device, "comm": comm, "torch": torch.__version__,
                                               "rows": rows}, indent=2) + "\n")
    return 0 if all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
