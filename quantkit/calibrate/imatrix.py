"""Calibration statistics as llama.cpp's importance matrix: the GGUF k-quants' per-column weights, per expert.

    imatrix = stats_to_imatrix(CalibrationStats.load("stats.safetensors"))
    imatrix.save("imatrix.gguf")         # llama.cpp's imatrix GGUF: llama-quantize --imatrix reads it, and so does
                                         # quantkit convert --to gguf --imatrix (which also takes stats.safetensors)

llama.cpp's imatrix holds, for each weight a matmul reads, the sum over tokens of x_j^2 per input column and the
number of tokens (per expert for the stacked expert weights: only the tokens routed to each expert). quantkit's
calibration collects the same sums at the same points, so the conversion is a renaming: the q/k/v input feeds
attn_q, attn_k and attn_v; the o_proj input attn_output; the router input ffn_gate_inp; each expert's w1/w3 input
ffn_gate_exps and ffn_up_exps; each expert's w2 input ffn_down_exps. Experts that fell back to pooled statistics
carry the pooled mean (with a count of at least 1), never 0/0.
"""

from __future__ import annotations

from quantkit.calibrate.stats import CalibrationStats
from quantkit.formats.imatrix import ImatrixData

# calibration point -> the GGUF weights whose input it is
GGUF_WEIGHTS = {
    "qkv": ("attn_q", "attn_k", "attn_v"),
    "o": ("attn_output",),
    "router": ("ffn_gate_inp",),
    "w13": ("ffn_gate_exps", "ffn_up_exps"),
    "w2": ("ffn_down_exps",),
}


def stats_to_imatrix(stats: CalibrationStats) -> ImatrixData:
    sums = {}
    for n, points in sorted(stats.layers.items()):
        for point, names in GGUF_WEIGHTS.items():
            if point not in points:
                continue
            sum_sq, counts = points[point].imatrix_sums()
            if sum_sq.shape[0] == 1:  # a dense input: one row, a plain token count
                sum_sq, counts = sum_sq[0], counts[0]
            for name in names:
                sums[f"blk.{n}.{name}.weight"] = (sum_sq, counts)
    calib = stats.meta.get("calib", "built-in")
    dataset = calib if isinstance(calib, str) else ",".join(calib)
    return ImatrixData.from_stats(sums, chunk_count=stats.meta.get("samples", 0),
                                  chunk_size=stats.meta.get("seq_len", 0), datasets=[f"quantkit:{dataset}"])
