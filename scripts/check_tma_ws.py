#!/usr/bin/env python3
"""Whether Triton's warp specialization of the TMA block-FP8 GEMMs gives the unsplit loop's results, at MiniMax-M2's
widths on this GPU (fp8_gemm.ws_split decides which loops are split; rerun this after a Triton upgrade).

    python scripts/check_tma_ws.py      # on an H100/H200

For M = 1024 and 4096 tokens and 64- and 128-row blocks: x quantized in the sorted list's order against x's own
quantization; the MoE's GEMM 1 (gate + up, two dots) and GEMM 2 (one dot) on TMA descriptors, split and unsplit, the
unsplit GEMM 1 against torch on a sample of rows; the layer against fused_moe_fp8_ref with each GEMM split; then the
projections' TMA GEMM, split and unsplit, against its reference. Each line: NaN counts, the largest difference and
the rows and columns that differ beyond rtol 2e-2 / atol 1e-3.
"""
from __future__ import annotations

import torch
import triton
from bench_common import block_quant
from quantkit.kernels import fp8_gemm, fp8_moe

H, I, E, TOPK = 3072, 1536, 256, 8


class Forced:
    """A jitted kernel whose launches take WS as given, whatever the launcher asks."""

    def __init__(self, kernel, ws: bool):
        self.kernel, self.ws = kernel, ws

    def __getitem__(self, grid):
        return lambda *a, **kw: self.kernel[grid](*a, **{**kw, "WS": self.ws})


def report(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    a, b = a.float(), b.float()
    bad = ~torch.isclose(a, b, rtol=2e-2, atol=1e-3)
    rows = bad.any(-1).nonzero().flatten()
    cols = bad.any(0).nonzero().flatten()
    print(f"{name}: NaN {a.isnan().sum().item()} / {b.isnan().sum().item()}, largest difference "
          f"{(a - b).abs().nan_to_num(float('inf')).max().item():.4g}, rows off {rows.numel()} of {a.shape[0]} "
          f"(first {rows[:8].tolist()}), columns off from {cols[:8].tolist()}", flush=True)


def with_split(module, name: str, ws: bool, fn, *args, **kwargs):
    """fn(*args, **kwargs) with module's kernel `name` launched with WS = ws."""
    original = getattr(module, name)
    setattr(module, name, Forced(original, ws))
    try:
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return out
    finally:
        setattr(module, name, original)


def list_gemm(ws: bool, out: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """One of the MoE's TMA GEMMs into out, split or not."""
    with_split(fp8_moe, "_moe_fp8_ws", ws, fp8_moe._launch_ws_gemm, *args[:4], out, *args[4:], **kwargs)
    return out


def moe(g: torch.Generator) -> None:
    w13 = torch.empty(E, 2 * I, H, device="cuda", dtype=torch.float8_e4m3fn)
    w2 = torch.empty(E, H, I, device="cuda", dtype=torch.float8_e4m3fn)
    s13 = torch.empty(E, 2 * I // 128, H // 128, device="cuda")
    s2 = torch.empty(E, H // 128, I // 128, device="cuda")
    for e in range(E):
        w13[e], s13[e] = block_quant(torch.randn(2 * I, H, device="cuda", generator=g) * 0.02)
        w2[e], s2[e] = block_quant(torch.randn(H, I, device="cuda", generator=g) * 0.02)
    for m in (1024, 4096):
        x = torch.randn(m, H, device="cuda", dtype=torch.bfloat16, generator=g)
        tw, tid = torch.topk(torch.rand(m, E, device="cuda", generator=g), TOPK, dim=-1)
        tw = tw / tw.sum(-1, keepdim=True)
        ref = fp8_moe.fused_moe_fp8_ref(x, w13, s13, w2, s2, tw, tid)
        xq, xs = fp8_gemm.per_token_group_quant_fp8(x, 128)
        for bm in (64, 128):
            cfg = dict(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3)
            st, ex, tot = fp8_moe._route(tid, bm, E)
            total = int(tot.item())
            print(f"M = {m}, BLOCK_M = {bm}, list of {total} rows", flush=True)
            a1, a1s = fp8_gemm.per_token_group_quant_fp8_rows(x, 128, tot, st, TOPK)
            src = (st[:total].long() // TOPK).clamp(max=m - 1)
            report(" x in list order, codes", a1[:total], xq[src])
            report(" x in list order, scales", a1s[:total], xs[src])

            common = dict(num_valid=m * TOPK, list_m=bm, cfg=cfg)
            inter = {ws: list_gemm(ws, torch.full((a1.shape[0], I), float("nan"), device="cuda",
                                                  dtype=torch.bfloat16),
                                   a1, a1s, w13, s13, tw.view(-1), st, ex, tot, n=I, gated=True, sorted_out=True,
                                   **common) for ws in (False, True)}
            rows = (st[:total] < m * TOPK).nonzero().flatten()[:128]  # a sample of valid rows
            experts = ex.long().repeat_interleave(bm)[:total][rows]
            a = (a1[rows].float().view(-1, H // 128, 128) * a1s[rows][:, :, None]).view(-1, H)
            w = (w13[experts].float().view(-1, 2 * I // 128, 128, H // 128, 128)
                 * s13[experts][:, :, None, :, None]).view(-1, 2 * I, H)
            h = torch.einsum("rk,rnk->rn", a, w)
            report(" GEMM 1 unsplit vs torch", inter[False][rows], torch.nn.functional.silu(h[:, :I]) * h[:, I:])
            report(" GEMM 1 split vs unsplit", inter[True][:total], inter[False][:total])
            hq, hs = fp8_gemm.per_token_group_quant_fp8_rows(inter[False], 128, tot)

            y = {ws: list_gemm(ws, torch.zeros((m * TOPK, H), device="cuda", dtype=torch.bfloat16),
                               hq, hs, w2, s2, tw.view(-1), st, ex, tot, n=H, gated=False, sorted_out=False, **common)
                 for ws in (False, True)}
            report(" GEMM 2 split vs unsplit", y[True], y[False])
            layer = fp8_moe.fused_moe_fp8(x, w13, s13, w2, s2, tw, tid, config={**cfg, "WS": True})
            err = ((layer.float() - ref.float()).norm() / ref.float().norm()).item()
            print(f" layer as launched (fp8_gemm.ws_split): relative error {err:.3g}", flush=True)


def projections(g: torch.Generator) -> None:
    for m in (256, 1024):
        for n, k in ((6144, 3072), (3072, 6144)):
            w, w_s = block_quant(torch.randn(n, k, device="cuda", generator=g) * 0.02)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
            xq, xs = fp8_gemm.per_token_group_quant_fp8(x, 128)
            ref = fp8_gemm.w8a8_block_fp8_matmul_ref(xq, xs, w, w_s)
            for bm in (64, 128):
                cfg = dict(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3, WS=True)
                for ws in (False, True):
                    out = with_split(fp8_gemm, "_w8a8_ws", ws, fp8_gemm.w8a8_block_fp8_matmul, xq, xs, w, w_s,
                                     config=cfg)
                    report(f"projection M = {m}, N = {n}, K = {k}, BLOCK_M = {bm}, split {ws}", out, ref)


def main() -> None:
    triton.set_allocator(fp8_gemm.tma_scratch(torch.device("cuda")))
    g = torch.Generator(device="cuda").manual_seed(0)
    print(torch.cuda.get_device_name(), "triton", triton.__version__, flush=True)
    moe(g)
    projections(g)


if __name__ == "__main__":
    main()
