"""FP8 (float8_e4m3fn) weights: the official block layout and compressed-tensors per-channel.

    q, scale_inv = quantize_block(w)           # [out, in] -> fp8 [out, in], fp32 [ceil(out/128), ceil(in/128)]
    q, scale = quantize_channel(w)             # -> fp8 [out, in], fp32 [out, 1]

Scale = amax / 448 per tile or row, computed in fp32 from the weight as given; q = round-to-nearest-even(w / scale)
by true division, so that a weight that is exactly fp8 x scale (a block-FP8 checkpoint dequantized to BF16) comes
back to the same bytes. A tile or row that is all zeros gets scale 1: any scale decodes zeros exactly, and 1 keeps
activations' scale products finite. NaN or inf in a weight is refused, naming the tensor.
"""

from __future__ import annotations

import torch

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


def quantize_block(w: torch.Tensor, block: tuple[int, int] = BLOCK, name: str = "tensor"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Block FP8 as the official release stores it: fp8 weight and fp32 weight_scale_inv (a multiplier)."""
    if w.dim() != 2:
        raise QuantkitError(f"{name}: block FP8 needs a 2-D weight, found shape {list(w.shape)}")
    check_finite(w, name)
    out_f, in_f = w.shape
    bo, bi = block
    rb, cb = -(-out_f // bo), -(-in_f // bi)
    q = torch.empty(out_f, in_f, dtype=torch.float8_e4m3fn)
    scale = torch.empty(rb, cb, dtype=torch.float32)
    pad_in = cb * bi - in_f
    for r in range(rb):
        rows = w[r * bo:(r + 1) * bo].to(torch.float32, copy=True)  # [<=bo, in], divided in place below
        n = rows.shape[0]
        if pad_in:
            rows = torch.nn.functional.pad(rows, (0, pad_in))
        tiles = rows.view(n, cb, bi)
        amax = tiles.abs().amax(dim=(0, 2))  # [cb]
        s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        scale[r] = s
        q[r * bo:r * bo + n] = _to_fp8(tiles.div_(s[None, :, None])).view(n, cb * bi)[:, :in_f]
    return q, scale


def quantize_channel(w: torch.Tensor, name: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel FP8: fp8 weight and fp32 weight_scale [out, 1] (compressed-tensors `channel`)."""
    if w.dim() != 2:
        raise QuantkitError(f"{name}: channel FP8 needs a 2-D weight, found shape {list(w.shape)}")
    check_finite(w, name)
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    scale = torch.empty(w.shape[0], 1, dtype=torch.float32)
    for lo in range(0, w.shape[0], ROWS):
        rows = w[lo:lo + ROWS].to(torch.float32, copy=True)
        amax = rows.abs().amax(dim=1, keepdim=True)
        s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        scale[lo:lo + ROWS] = s
        q[lo:lo + ROWS] = _to_fp8(rows.div_(s))
    return q, scale


def dequantize_channel(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return (q.float() * scale.float()).to(dtype)


def relative_rms(w: torch.Tensor, approx: torch.Tensor) -> float:
    """||w - approx|| / ||w|| (the error alone for an all-zero weight). fp32 norms: torch sums them in blocks, so
    the result is good to ~1e-6 relative, ample for a report, at a third of the cost of float64."""
    wf = w.float()
    num = float(torch.linalg.vector_norm(wf - approx.float()))
    den = float(torch.linalg.vector_norm(wf))
    return num / den if den > 0 else num


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
