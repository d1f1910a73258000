"""What the GPU kernel benchmarks share (scripts/bench_kernels.py, bench_w4a16.py, bench_gguf_kernels.py,
tune_fp8.py, check_tma_ws.py, bench_pdl_chain.py): the error measure every kernel is checked by, the bf16 MoE
baseline it is timed against, and the FP8 quantization of their random weights on the device."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of a against b."""
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def checked_timing(fn, ref: torch.Tensor, tol: float, timer, tag: str) -> tuple[float, float] | None:
    """(relative error against ref, timer(fn)) of a candidate kernel call, or None, saying why under `tag`, when its
    result is off by tol or more or it fails (a config the GPU cannot compile)."""
    try:
        err = rel_err(fn(), ref)
        if not err < tol:
            print(f"{tag}: wrong result ({err:.2e}), dropped", flush=True)
            return None
        return err, timer(fn)
    except Exception as e:
        print(f"{tag}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
        return None


def merge_table(table_name: str, shape: str, device: str, entries: dict, defaults: dict, out: Path,
                comment: str = "") -> None:
    """entries {bucket: config} into kernels/configs/<table_name> under device and shape (a new table starts with
    `comment`), copied to out. The tuners' buckets the device lacks are first given what the launcher ran there
    before this run (`defaults`), so that other M keep their config rather than taking the nearest new bucket."""
    path = Path(__file__).resolve().parents[1] / "kernels" / "configs" / table_name
    table = json.loads(path.read_text()) if path.exists() else {"_comment": comment}
    buckets = table.setdefault(device, {}).setdefault(shape, {})
    for bucket, cfg in defaults.items():
        buckets.setdefault(bucket, cfg)
    buckets.update(entries)
    table[device][shape] = dict(sorted(buckets.items(), key=lambda kv: int(kv[0])))
    path.write_text(json.dumps(table, indent=1) + "\n")
    (out / table_name).write_text(path.read_text())
    print(f"wrote {path} and {out / table_name}", flush=True)


def block_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] (multiples of 128) -> fp8 codes and fp32 [N/128, K/128] scales (amax / 448 a tile), on w's device."""
    n, k = w.shape
    tiles = w.float().view(n // 128, 128, k // 128, 128)
    s = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448
    q = (tiles / s[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn).view(n, k)
    return q, s


def channel_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> fp8 codes and fp32 [N, 1] scales (amax / 448 a row), on w's device."""
    s = w.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 448
    return (w.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn), s


def bf16_moe_loop(x, w1, w3, w2, topk_w, topk_ids):
    """The MoE layer as a user runs it without fused kernels: a PyTorch loop over the experts the batch touches."""
    out = torch.zeros_like(x)
    for e in topk_ids.unique().tolist():
        rows, slot = (topk_ids == e).nonzero(as_tuple=True)
        h = x[rows]
        y = (torch.nn.functional.silu(h @ w1[e].t()) * (h @ w3[e].t())) @ w2[e].t()
        out.index_add_(0, rows, y * topk_w[rows, slot, None].to(y.dtype))
    return out


def commit_id() -> str:
    """The commit measured: QUANTKIT_COMMIT when the caller names it (a copied work tree's git HEAD may lag), else
    the repository's short HEAD, else "unknown"."""
    named = os.environ.get("QUANTKIT_COMMIT")
    if named:
        return named
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True).stdout.strip()
    return head or "unknown"
