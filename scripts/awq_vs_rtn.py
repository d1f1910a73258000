#!/usr/bin/env python
"""AWQ against round-to-nearest INT4 (same bits: asymmetric, group 128) on any checkpoint, against its BF16 self.

    .venv/bin/python scripts/awq_vs_rtn.py evals/assets/reference --calib /usr/lib/python3.11/json \\
        --json evals/results/awq_vs_rtn-reference.json

Both quantized models are the dense twins of the INT4 checkpoints (every quantized weight replaced by its
quantize-dequantize), so the comparison isolates the algorithm from the kernels. Calibration runs AWQ layer by layer
(quantkit.calibrate.awq); the evaluation text is quantkit's held-out text (`quantkit eval`'s default: quantkit's own
Python modules, then corpus text of another seed), which no model was trained or calibrated on. Printed: mean and
p99 KLD against the original, top-1 agreement, perplexity, and the relative error of each layer's hidden state; the
same goes to --json. The whole model is held in memory three times: for small models (the reference model, the
tiny test checkpoints); a real-width run goes through `quantkit convert --to awq` and `quantkit eval`.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("--calib", nargs="*", default=None, help="calibration files or folders (default: built-in set)")
    ap.add_argument("--chat", action="store_true")
    ap.add_argument("--n-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--window", type=int, default=256, help="evaluation window (tokens)")
    ap.add_argument("--max-windows", type=int, default=32)
    ap.add_argument("--no-clip", action="store_true")
    ap.add_argument("--qkv-scale", choices=["auto", "on", "off"], default="off")
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args()

    from quantkit.evals.fidelity import fidelity, token_windows
    from quantkit.evals.report import held_out_text

    from quantkit import tokenizer as tok
    from quantkit.calibrate.awq import AWQConfig, awq_all_layers, fake_quantize_model, set_layer_weights
    from quantkit.calibrate.data import calibration_tokens
    from quantkit.calibrate.engine import LayerStream
    from quantkit.checkpoint import CheckpointReader
    from quantkit.runtime import load_model

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = AWQConfig(clip=not args.no_clip, qkv_scale=args.qkv_scale)
    t0 = time.perf_counter()
    tokens = calibration_tokens(args.ckpt, args.calib, args.n_samples, args.seq_len, args.chat)
    stream = LayerStream(CheckpointReader(args.ckpt), tokens, device, torch.float32)
    weights, reports = awq_all_layers(stream, cfg, progress=True)
    awq_seconds = time.perf_counter() - t0

    ids = tok.load_tokenizer(args.ckpt).encode(held_out_text(), add_special_tokens=False).ids
    windows = token_windows(ids, args.window, args.max_windows)
    ref = load_model(args.ckpt, dtype=torch.float32, device=device)
    results = {}
    for method in ("rtn", "awq"):
        model = load_model(args.ckpt, dtype=torch.float32, device=device)
        if method == "awq":
            set_layer_weights(model, weights)
        fake_quantize_model(model, cfg)
        results[method] = fidelity(model, ref, windows).to_dict()
        del model

    r, a = results["rtn"], results["awq"]
    print(f"\n{args.ckpt}: {r['tokens']} held-out positions, calibration {tokens.shape[0]} x {tokens.shape[1]} tokens, "
          f"AWQ search {awq_seconds:.1f} s on {device}")
    print("| method | mean KLD | p99 KLD | top-1 | perplexity | reference perplexity |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, f in (("RTN INT4 g128", r), ("AWQ INT4 g128", a)):
        print(f"| {name} | {f['kld_mean']:.5f} | {f['kld_p99']:.5f} | {f['top1_agreement']:.4f} | "
              f"{f['ppl_quant']:.3f} | {f['ppl_reference']:.3f} |")
    print("\n| layer | RTN hidden-state error | AWQ hidden-state error | qkv scale | w13 loss AWQ/RTN "
          "| w2 loss AWQ/RTN |")
    print("|---:|---:|---:|---|---:|---:|")
    for n, (er, ea) in enumerate(zip(r["layer_rel_error"], a["layer_rel_error"])):
        rep = reports[n]
        qkv = rep.get("qkv", {})
        qkv_s = f"alpha {qkv['alpha']}" if qkv.get("applied") else "off (RTN won)" if qkv else "n/a"
        w13 = rep["w13"]["loss_scaled"] / max(rep["w13"]["loss_rtn"], 1e-30)
        w2 = rep["w2"]["loss_scaled"] / max(rep["w2"]["loss_rtn"], 1e-30)
        print(f"| {n} | {er:.5f} | {ea:.5f} | {qkv_s} | {w13:.3f} | {w2:.3f} |")
    if args.json_out:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip()
        except OSError:
            commit = None
        out = {"checkpoint": str(args.ckpt), "commit": commit, "device": str(device), "host": platform.node(),
               "calibration": {"sources": args.calib or "built-in", "samples": tokens.shape[0],
                               "seq_len": tokens.shape[1]},
               "awq_config": {k: str(v) for k, v in vars(cfg).items()}, "awq_seconds": awq_seconds,
               "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
               "results": results, "layers": reports}
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(out, indent=1) + "\n")
        print(f"\nwrote {args.json_out}", file=sys.stderr)


if __name__ == "__main__":
    main()
