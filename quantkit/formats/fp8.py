"""FP8 (float8_e4m3fn) weights: the official block layout and compressed-tensors per-channel.

    q, scale_inv = quantize_block(w)           # [out, in] -> fp8 [out, in], fp32 [ceil(out/128), ceil(in/128)]
    q, scale = quantize_channel(w)             # -> fp8 [out, in], fp32 [out, 1]
    q, scale_inv, err = quantize_block(w, with_error=True)   # and relative_rms(w, q * scale), measured on the way

Scale = amax / 448 per tile or row, computed in fp32 from the weight as given; q = round-to-nearest-even(w / scale)
by true division, so that a weight that is exactly fp8 x scale (a block-FP8 checkpoint dequantized to BF16) comes
back to the same bytes. A tile or row that is all zeros gets scale 1: any scale decodes zeros exactly, and 1 keeps
activations' scale products finite. NaN or inf in a weight is refused, naming the tensor.
"""

from __future__ import annotations

import math

import torch

from quantkit.checkpoint.fp8 import _BIAS_FIX, fp8_as_bf16
from quantkit.errors import QuantkitError
from quantkit.formats import first_nonfinite

FP8_MAX = 448.0
BLOCK = (128, 128)
ROWS = 128  # rows per step: temporaries stay in cache (the weight may be a 1.2 GB embedding in other formats)


def check_finite(w: torch.Tensor, name: str) -> None:
    bad = first_nonfinite(w)
    if bad is not None:
        raise QuantkitError(f"{name}: NaN or inf in the weight (first at {bad}); refusing to quantize it")


def _to_fp8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def _fp8_times(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """float(q) * s in fp32 (one rounding, as dequantize_block_fp8), q's values taken from its bits."""
    return fp8_as_bf16(q).float().mul_(_BIAS_FIX).mul_(s)


def _sq_norm(x: torch.Tensor) -> float:
    """||x||^2 to ~1e-7 relative: fp32 norms of 4096-value pieces summed in float64 (one fp32 norm of millions of
    values is off by ~1e-4, a float64 one costs ten times as much on the CPU)."""
    x = x.reshape(-1)
    whole = x.numel() // 4096 * 4096
    sq = torch.linalg.vector_norm(x[:whole].view(-1, 4096), dim=1).double().square().sum() if whole else 0.0
    return float(sq) + float(torch.linalg.vector_norm(x[whole:])) ** 2


class _ErrorSums:
    """||w - q * scale||^2 and ||w||^2 summed block by block as a quantizer goes: the relative RMS error without a
    dequantized copy of the whole weight (a fresh 19 MB tensor for one expert costs the CPU more in page faults than
    the arithmetic)."""

    def __init__(self) -> None:
        self.num = self.den = 0.0

    def add(self, w: torch.Tensor, deq: torch.Tensor) -> None:
        self.den += _sq_norm(w)
        self.num += _sq_norm(deq.sub_(w))

    def result(self) -> float:
        return math.sqrt(self.num / self.den) if self.den > 0 else math.sqrt(self.num)


def quantize_block(w: torch.Tensor, block: tuple[int, int] = BLOCK, name: str = "tensor", with_error: bool = False
                   ) -> tuple[torch.Tensor, ...]:
    """Block FP8 as the official release stores it: fp8 weight and fp32 weight_scale_inv (a multiplier); with_error
    adds relative_rms(w, q * scale_inv) as a float."""
    if w.dim() != 2:
        raise QuantkitError(f"{name}: block FP8 needs a 2-D weight, found shape {list(w.shape)}")
    check_finite(w, name)
    out_f, in_f = w.shape
    bo, bi = block
    rb, cb = -(-out_f // bo), -(-in_f // bi)
    q = torch.empty(out_f, in_f, dtype=torch.float8_e4m3fn)
    scale = torch.empty(rb, cb, dtype=torch.float32)
    pad_in = cb * bi - in_f
    err = _ErrorSums() if with_error else None
    for r in range(rb):
        rows = w[r * bo:(r + 1) * bo].to(torch.float32, copy=True)  # [<=bo, in], divided in place below
        n = rows.shape[0]
        if pad_in:
            rows = torch.nn.functional.pad(rows, (0, pad_in))
        tiles = rows.view(n, cb, bi)
        amax = tiles.abs().amax(dim=(0, 2))  # [cb]
        s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        scale[r] = s
        qb = _to_fp8(tiles.div_(s[None, :, None]))  # [n, cb, bi]
        q[r * bo:r * bo + n] = qb.view(n, cb * bi)[:, :in_f]
        if err is not None:
            deq = _fp8_times(qb, s[None, :, None]).view(n, cb * bi)[:, :in_f]
            err.add(w[r * bo:r * bo + n].float(), deq)
    return (q, scale, err.result()) if err is not None else (q, scale)


def quantize_channel(w: torch.Tensor, name: str = "tensor", with_error: bool = False) -> tuple[torch.Tensor, ...]:
    """Per-output-channel FP8: fp8 weight and fp32 weight_scale [out, 1] (compressed-tensors `channel`); with_error
    adds relative_rms(w, q * scale) as a float."""
    if w.dim() != 2:
        raise QuantkitError(f"{name}: channel FP8 needs a 2-D weight, found shape {list(w.shape)}")
    check_finite(w, name)
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    scale = torch.empty(w.shape[0], 1, dtype=torch.float32)
    err = _ErrorSums() if with_error else None
    for lo in range(0, w.shape[0], ROWS):
        rows = w[lo:lo + ROWS].to(torch.float32, copy=True)
        amax = rows.abs().amax(dim=1, keepdim=True)
        s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        scale[lo:lo + ROWS] = s
        qb = _to_fp8(rows.div_(s))
        q[lo:lo + ROWS] = qb
        if err is not None:
            err.add(w[lo:lo + ROWS].float(), _fp8_times(qb, s))
    return (q, scale, err.result()) if err is not None else (q, scale)


def dequantize_channel(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return (q.float() * scale.float()).to(dtype)


def relative_rms(w: torch.Tensor, approx: torch.Tensor) -> float:
    """||w - approx|| / ||w|| (the error alone for an all-zero weight), to ~1e-7 relative (`_sq_norm`)."""
    wf = w.float()
    num, den = _sq_norm(wf - approx.float()), _sq_norm(wf)
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def block_quantization_config(ignore: list[str], block: tuple[int, int] = BLOCK) -> dict:
    """config.json `quantization_config` of the official MiniMax-M2 FP8 release."""
    return {
        "activation_scheme": "dynamic",
        "fmt": "float8_e4m3fn",
        "quant_method": "fp8",
        "weight_block_size": list(block),
        "modules_to_not_convert": list(ignore),
    }


# compressed-tensors targets: experts are named both as on disk (w1/w2/w3) and as engines rename them
# (gate_proj/up_proj/down_proj), since vLLM resolves MoE schemes by the renamed projections.
CHANNEL_TARGETS = [
    "re:.*self_attn\\.(q|k|v|o)_proj$",
    "re:.*block_sparse_moe\\.experts\\.\\d+\\.(w1|w2|w3)$",
    "re:.*experts.*(gate_up|gate|up|down)_proj$",
]


def channel_quantization_config(ignore: list[str]) -> dict:
    """compressed-tensors `float-quantized` config: per-channel fp8 weights, dynamic per-token fp8 activations."""
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": list(CHANNEL_TARGETS),
                "weights": {
                    "num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "dynamic": False,
                    "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax",
                    "observer_kwargs": {},
                },
                "input_activations": {
                    "num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True,
                    "group_size": None, "block_structure": None, "actorder": None, "observer": None,
                    "observer_kwargs": {},
                },
                "output_activations": None,
                "format": "float-quantized",
            }
        },
        "ignore": list(ignore),
        "kv_cache_scheme": None,
    }
