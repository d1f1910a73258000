"""Target formats: quantize, dequantize, pack, and the quantization_config each writes."""

from __future__ import annotations

import torch


def first_nonfinite(t: torch.Tensor) -> list[int] | None:
    """The index of t's first NaN or inf, None when every value is finite. One sum decides the usual case (a NaN or
    inf anywhere makes it NaN or inf; a sum of finite values that overflows only sends t to the exact pass), a full
    isfinite pass costing the CPU several times as much."""
    if bool(torch.isfinite(t.sum())):
        return None
    bad = ~torch.isfinite(t)
    return bad.nonzero()[0].tolist() if bool(bad.any()) else None
