"""`quantkit inspect`: what a checkpoint holds, what it would become, and how it can be split across GPUs.

Output sizes are estimates from the parameter counts and each format's bytes per weight (block scales,
group scales and zero points included); norms, the router and its bias are counted as the format keeps them.
"""

from __future__ import annotations

import math
from collections import defaultdict

from quantkit.arch import SHARD_MULTIPLE, valid_degrees
from quantkit.checkpoint import CheckpointReader

# bytes per weight of a quantized [out, in] matrix, as a function of (out, in)
QUANTIZED_BYTES = {
    "fp8-block": lambda o, i: o * i + 4 * math.ceil(o / 128) * math.ceil(i / 128),
    "fp8-channel": lambda o, i: o * i + 4 * o,
    "awq-w4a16-g128": lambda o, i: o * i // 2 + math.ceil(i / 128) * o * (2 + 0.5),  # fp16 scales, int4 zeros
    "gguf-q8_0": lambda o, i: o * i * 34 / 32,
    "gguf-q6_k": lambda o, i: o * i * 210 / 256,
    "gguf-q5_k": lambda o, i: o * i * 176 / 256,
    "gguf-q4_k": lambda o, i: o * i * 144 / 256,
}
PARALLEL_FORMATS = ("bf16", "fp8-block", "awq", "gguf-kquant")


def estimate_sizes(reader: CheckpointReader) -> dict[str, int]:
    """Estimated output bytes per target format."""
    out: dict[str, float] = {"bf16": 0.0, **{k: 0.0 for k in QUANTIZED_BYTES}}
    for spec in reader.specs():
        n = spec.numel
        out["bf16"] += 4 * n if spec.kind in ("router", "router_bias") else 2 * n
        for fmt, size in QUANTIZED_BYTES.items():
            if spec.is_linear:
                out[fmt] += size(*spec.shape)
            elif spec.kind in ("embed", "head") and fmt.startswith("gguf"):
                out[fmt] += size(*spec.shape)  # llama.cpp quantizes the embeddings and output too
            else:
                out[fmt] += (4 if spec.kind in ("router", "router_bias") or fmt.startswith("gguf") else 2) * n
    return {k: int(v) for k, v in out.items()}


def describe(reader: CheckpointReader) -> dict:
    cfg = reader.config
    total, active = cfg.parameter_count()
    kinds = {s.name: s.kind for s in reader.specs()}
    by_dtype: dict[str, int] = defaultdict(int)
    by_kind: dict[str, int] = defaultdict(int)
    for name, e in reader.entries.items():
        by_dtype[e.dtype] += e.nbytes
        kind = kinds.get(name, "scale" if name.endswith("_scale_inv") else "other")
        by_kind[kind] += e.nbytes
    return {
        "path": str(reader.folder),
        "architecture": {
            "model_type": "minimax_m2",
            "layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size,
            "attention_heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim,
            "rotary_dim": cfg.rotary_dim,
            "rope_theta": cfg.rope_theta,
            "experts": cfg.num_local_experts,
            "experts_per_token": cfg.num_experts_per_tok,
            "expert_intermediate_size": cfg.intermediate_size,
            "vocab_size": cfg.vocab_size,
            "context_length": cfg.max_position_embeddings,
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id,
            "quantization": "block-fp8" if cfg.block_fp8 else None,
        },
        "parameters": {"total": total, "active_per_token": active},
        "bytes": {"total": reader.source_bytes(), "by_dtype": dict(by_dtype), "by_kind": dict(by_kind)},
        "shards": [{"file": p.name, "bytes": p.stat().st_size} for p in reader.shards],
        "estimated_output_bytes": estimate_sizes(reader),
        "parallel": {
            fmt: {"multiple": SHARD_MULTIPLE[fmt], "valid_tp_ep": [list(d) for d in valid_degrees(cfg, fmt)]}
            for fmt in PARALLEL_FORMATS
        },
    }


def _gb(n: float) -> str:
    return f"{n / 1e9:,.3f} GB" if n >= 1e7 else f"{n / 1e6:,.3f} MB"


def format_text(d: dict) -> str:
    a, p = d["architecture"], d["parameters"]
    lines = [
        f"{d['path']}: MiniMax-M2 ({a['quantization'] or 'unquantized'})",
        f"  layers {a['layers']}, hidden {a['hidden_size']}, heads {a['attention_heads']}/{a['kv_heads']} x "
        f"{a['head_dim']} (rotary {a['rotary_dim']}, theta {a['rope_theta']:g}), experts {a['experts']} "
        f"top-{a['experts_per_token']} x {a['expert_intermediate_size']}, vocab {a['vocab_size']}, "
        f"context {a['context_length']}",
        f"  parameters: {p['total']:,} total, {p['active_per_token']:,} active per token",
        f"  stored: {_gb(d['bytes']['total'])} in {len(d['shards'])} shard(s)",
        "  by dtype: " + ", ".join(f"{k} {_gb(v)}" for k, v in sorted(d["bytes"]["by_dtype"].items())),
        "  by kind:  " + ", ".join(f"{k} {_gb(v)}" for k, v in sorted(d["bytes"]["by_kind"].items())),
        "  estimated output size:",
    ]
    lines += [f"    {k:<16} {_gb(v)}" for k, v in d["estimated_output_bytes"].items()]
    lines.append("  valid (tp, ep) up to 8 GPUs (experts split by ep, their intermediate size by the rest):")
    for fmt, info in d["parallel"].items():
        pairs = " ".join(f"{tp}/{ep}" for tp, ep in info["valid_tp_ep"])
        lines.append(f"    {fmt:<12} (multiple of {info['multiple']}): {pairs}")
    return "\n".join(lines)
