#!/usr/bin/env python
"""How fast can a kernel with a decode GEMV's grid and access pattern read HBM, doing nothing else?

    python scripts/bench_stream_rows.py --out evals/results/stream_rows.json    # on an H100/H200, about 30 s
    TRITON_INTERPRET=1 python scripts/bench_stream_rows.py --smoke               # CPU: checks the checksums only

The GGUF and W4A16 MoE GEMV kernels at one token read 18-49% of HBM bandwidth while their loops issue 4-6
instructions a weight, too few to bound them. This separates the grid and the load pattern from the decode: each
variant reads the weight rows of one token's 8 experts (Q4_K gate + up: 8 x 3072 rows of 1728 bytes; W4A16: 8 x 3072
rows of 1536 bytes, the nibbles only), a step of the GEMV's bytes a row at a time (144 and 128) in a loop that is not
unrolled, and keeps an XOR checksum a row, nothing more.

- `thread-row`: a thread a row, 16 bytes a load ([ROWS, 4] int32 tiles, the GEMV kernels' pattern): a warp's load
  touches 32 rows 1.5-1.7 KB apart;
- `coalesced`: the same rows and grid, 4 threads a row reading 64 contiguous bytes a load ([ROWS, 16] tiles);
- `thread-row, split K` 2 and 4: the thread-row pattern with each row's bytes shared by 2 or 4 programs (more
  programs and warps, fewer steps each).

For each: programs, warps a program, GB/s and the fraction of the HBM read bandwidth measured in the same run (a
torch sum over 2 GiB). If `thread-row` stays near the GEMV kernels' figures while `coalesced` or the split reach
the HBM figure, the grid or the pattern bounds the GEMV, not its arithmetic.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
import triton
import triton.language as tl
from bench_common import commit_id
from quantkit.kernels.fp8_gemm import triton_kernel


def _stream_rows_kernel(w_ptr, out_ptr, row_words, steps, ROWS: tl.constexpr, WIDTH: tl.constexpr,
                        UNROLL: tl.constexpr):
    """Program (tile, part): rows [tile * ROWS, +ROWS), `steps` steps of UNROLL loads of WIDTH int32 words of each
    row, from word part * steps * UNROLL * WIDTH on (a loop the compiler does not unroll, as the GEMV kernels' loop
    over super-blocks); out[part, row] = XOR of the words read."""
    tile = tl.program_id(0)
    part = tl.program_id(1)
    r = tile * ROWS + tl.arange(0, ROWS)
    c = tl.arange(0, WIDTH)
    ptrs = w_ptr + r.to(tl.int64)[:, None] * row_words + (part * steps * UNROLL * WIDTH + c)[None, :]
    acc = tl.zeros((ROWS, WIDTH), dtype=w_ptr.dtype.element_ty)
    for s in range(steps):
        for u in tl.static_range(UNROLL):
            acc = acc ^ tl.load(ptrs + (s * UNROLL + u) * WIDTH)
    tl.store(out_ptr + part * tl.num_programs(0) * ROWS + r, tl.xor_sum(acc, axis=1))


_stream_rows = triton_kernel(_stream_rows_kernel)


def stream_rows(w: torch.Tensor, rows_per_program: int, width: int, unroll: int, split: int,
                num_warps: int) -> torch.Tensor:
    """w int32 or int16 [R, row_words] -> XOR checksums [split, R] (int32) of each row's split-th share of words."""
    r, row_words = w.shape
    step = width * unroll
    if r % rows_per_program or row_words % (step * split):
        raise ValueError(f"{r} rows of {row_words} words do not tile by {rows_per_program} x {step} x {split}")
    out = torch.empty(split, r, dtype=torch.int32, device=w.device)
    _stream_rows[(r // rows_per_program, split)](w, out, row_words, row_words // step // split,
                                                 ROWS=rows_per_program, WIDTH=width, UNROLL=unroll,
                                                 num_warps=num_warps, num_stages=1)
    return out


def reference(w: torch.Tensor, width: int, split: int) -> torch.Tensor:
    r, row_words = w.shape
    parts = w.view(r, split, row_words // split // width, width)
    out = parts[:, :, 0].clone()
    for s in range(1, parts.shape[2]):
        out ^= parts[:, :, s]
    x = out[..., 0].clone()
    for j in range(1, width):
        x ^= out[..., j]
    return x.t().contiguous().to(torch.int32)  # [split, R]


# name, rows a program, words a load, loads a step (per shape: the GEMV's bytes a row a step; a shape not named
# skips the variant), split, warps, word type
VARIANTS = [
    ("thread-row", 64, 4, {"q4_k": 9, "w4a16": 8}, 1, 2, torch.int32),
    ("thread-row", 128, 4, {"q4_k": 9, "w4a16": 8}, 1, 4, torch.int32),
    ("coalesced", 64, 16, {"q4_k": 3, "w4a16": 2}, 1, 2, torch.int32),
    ("coalesced", 128, 16, {"q4_k": 3, "w4a16": 2}, 1, 4, torch.int32),
    ("thread-row, split K 2", 64, 4, {"q4_k": 9, "w4a16": 8}, 2, 2, torch.int32),
    ("thread-row, split K 4", 64, 4, {"q4_k": 9, "w4a16": 8}, 4, 2, torch.int32),
    # Q6_K's 210-byte super-blocks keep 2-byte alignment: the GEMV kernel reads them 2 bytes a load (105 a
    # super-block); two super-blocks (420 bytes) keep 4
    ("thread-row, 2-byte loads", 64, 1, {"q6_k": 105}, 1, 2, torch.int16),
    ("thread-row, 2-byte loads, split K 2", 64, 1, {"q6_k": 105}, 2, 2, torch.int16),
    ("thread-row, 4-byte loads", 64, 1, {"q6_k": 105}, 1, 2, torch.int32),
    ("thread-row, 4-byte loads, split K 3", 64, 1, {"q6_k": 105}, 3, 2, torch.int32),
]
# rows of one token's 8 experts, gate + up: Q4_K's 1728 bytes a row (144 a super-block of 256), W4A16's 1536 (the
# nibbles, 64 bytes a group of 128); down in Q6_K (Q4_K_M's): 3072 rows a token of 1260 bytes (6 x 210)
SHAPES = {"q4_k": (8 * 3072, 1728 // 4), "w4a16": (8 * 3072, 1536 // 4), "q6_k": (8 * 3072, 1260 // 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="small rows on the CPU interpreter: checksums only")
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    g = torch.Generator().manual_seed(0)
    shapes = {"q4_k": (256, 432), "w4a16": (128, 384), "q6_k": (128, 315)} if args.smoke else SHAPES
    hbm = None
    if not args.smoke:
        x = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)
        hbm = 2 * (1 << 30) / triton.testing.do_bench(lambda: x.sum(dtype=torch.float32), rep=200,
                                                      return_mode="median") / 1e9
        del x
    rows = []
    for shape, (r, words) in shapes.items():
        w32 = torch.randint(-2**31, 2**31 - 1, (r, words), generator=g, dtype=torch.int32).to(device)
        for name, per, width, unrolls, split, warps, word in VARIANTS:
            if shape not in unrolls:
                continue
            unroll = unrolls[shape]
            w = w32.view(word)
            got = stream_rows(w, per, width, unroll, split, warps)
            assert torch.equal(got.cpu(), reference(w.cpu(), width, split)), (shape, name)
            row = {"shape": shape, "variant": name, "programs": r // per * split, "warps": warps,
                   "bytes_a_row_a_step": w.element_size() * width * unroll, "bytes": w32.numel() * 4}
            if not args.smoke:
                ms = triton.testing.do_bench_cudagraph(lambda: stream_rows(w, per, width, unroll, split, warps),
                                                       rep=100, return_mode="median")
                row.update(ms=ms, tbps=row["bytes"] / ms / 1e9, frac_hbm=row["bytes"] / ms / 1e9 / hbm)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.smoke:
        print(f"smoke: {len(rows)} variants, checksums equal")
        return
    print(f"\n{torch.cuda.get_device_name()}, HBM read {hbm:.2f} TB/s\n")
    print("| rows | variant | programs | warps | bytes a row a step | MB | ms | TB/s | % HBM |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for x in rows:
        print(f"| {x['shape']} | {x['variant']} | {x['programs']} | {x['warps']} | {x['bytes_a_row_a_step']} "
              f"| {x['bytes'] / 1e6:.1f} "
              f"| {x['ms']:.4f} | {x['tbps']:.2f} | {100 * x['frac_hbm']:.0f} |")
    if args.out:
        result = {"benchmark": "row streaming at decode GEMV geometry", "date": datetime.date.today().isoformat(),
                  "commit": commit_id(), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                  "triton": triton.__version__, "hbm_read_tbps": hbm, "rows": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
