"""The MiniMax-M2 architecture: config parsing, tensor names, units of work, and parallel-degree rules.

    cfg = MiniMaxM2Config.from_folder("MiniMax-M2")      # config.json (+ generation_config.json for token ids)
    for unit in cfg.units():                             # "embed", "layers.0" ... "layers.61", "head"
        for spec in unit.tensors: ...                    # TensorSpec(name, shape, kind)
    check_parallel(cfg, "fp8-block", tp=8, ep=1)         # raises: 1536/8 = 192 is not a multiple of 128

Every family member (M2, M2.1, M2.5, M2.7) shares one architecture; what differs (context length, token ids,
the transformers-5 `dtype` key, `rope_parameters`) is read, never assumed. This module imports nothing of
quantkit but the error type.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError

ARCHITECTURE = "MiniMaxM2ForCausalLM"
MODEL_TYPE = "minimax_m2"
EXPERT_WEIGHTS = ("w1", "w2", "w3")  # w1 = gate_proj, w3 = up_proj, w2 = down_proj

# The size a shard of the split dimension must be a multiple of, per target format, when experts are split by
# intermediate size or attention by heads. Block FP8 tiles 128x128, AWQ groups 128 input channels, GGUF k-quants
# pack 256 input values per super-block (Q8_0: 32).
SHARD_MULTIPLE = {
    "bf16": 1,
    "fp16": 1,
    "fp8-block": 128,
    "fp8-channel": 1,
    "awq": 128,
    "gguf-q8_0": 32,
    "gguf-kquant": 256,
}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the Hugging Face checkpoint as config.json says it must be."""

    name: str
    shape: tuple[int, ...]
    kind: str  # embed | head | norm | attn | qk_norm | router | router_bias | expert

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_linear(self) -> bool:
        """A 2-D matmul weight that quantized formats may convert (attention and expert projections)."""
        return self.kind in ("attn", "expert")


@dataclass(frozen=True)
class Unit:
    """A unit of work: one decoder layer, or the embeddings, or the final norm and head."""

    name: str
    layer: int | None
    tensors: tuple[TensorSpec, ...]

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)


@dataclass(frozen=True)
class MiniMaxM2Config:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    num_local_experts: int
    num_experts_per_tok: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rotary_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool = False
    use_routing_bias: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    quantization_config: dict | None = None
    torch_dtype: str = "bfloat16"
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    # ---- parsing -------------------------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, folder: str | Path) -> MiniMaxM2Config:
        folder = Path(folder)
        path = folder / "config.json"
        if not path.is_file():
            raise QuantkitError(f"{path}: no config.json in the checkpoint folder")
        raw = _read_json(path)
        gen_path = folder / "generation_config.json"
        gen = _read_json(gen_path) if gen_path.is_file() else {}
        return cls.from_dict(raw, gen, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, generation: dict | None = None, source: str = "config.json") -> MiniMaxM2Config:
        archs = raw.get("architectures") or []
        if raw.get("model_type") != MODEL_TYPE and ARCHITECTURE not in archs:
            found = ", ".join(archs) or raw.get("model_type") or "none given"
            raise QuantkitError(f"{source}: unknown architecture ({found}); quantkit supports {ARCHITECTURE}")
        if any(a != 1 for a in raw.get("attn_type_list", [])):
            raise QuantkitError(f"{source}: attn_type_list has non-softmax layers; MiniMax-M2 uses full attention only")
        if raw.get("shared_intermediate_size", 0):
            raise QuantkitError(f"{source}: shared experts (shared_intermediate_size > 0) are not MiniMax-M2")
        if raw.get("use_qk_norm", True) and raw.get("qk_norm_type", "per_layer") != "per_layer":
            raise QuantkitError(f"{source}: qk_norm_type {raw.get('qk_norm_type')!r} is not supported (per_layer only)")
        if raw.get("scoring_func", "sigmoid") != "sigmoid":
            raise QuantkitError(f"{source}: scoring_func {raw.get('scoring_func')!r} is not supported (sigmoid only)")

        def need(key: str) -> Any:
            if key not in raw:
                raise QuantkitError(f"{source}: missing key {key!r}")
            return raw[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        head_dim = int(raw.get("head_dim") or hidden // heads)
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        theta = raw.get("rope_theta", rope.get("rope_theta", 5e6))
        if raw.get("rotary_dim") is not None:
            rotary = int(raw["rotary_dim"])
        else:
            factor = raw.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
            rotary = int(head_dim * float(factor))
        if rotary % 2 or not 0 < rotary <= head_dim:
            raise QuantkitError(f"{source}: rotary width {rotary} must be even and within head_dim {head_dim}")
        gen = generation or {}

        def token(key: str, default: Any) -> Any:
            # generation_config.json wins: M2.7's config.json carries placeholder ids (bos 1, eos 2).
            return gen.get(key, raw.get(key, default))

        cfg = cls(
            hidden_size=hidden,
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(need("num_key_value_heads")),
            head_dim=head_dim,
            intermediate_size=int(need("intermediate_size")),
            num_local_experts=int(raw.get("num_local_experts", raw.get("num_experts", 0)) or need("num_local_experts")),
            num_experts_per_tok=int(need("num_experts_per_tok")),
            vocab_size=int(need("vocab_size")),
            max_position_embeddings=int(raw.get("max_position_embeddings", 196608)),
            rope_theta=float(theta),
            rotary_dim=rotary,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            use_routing_bias=bool(raw.get("use_routing_bias", True)),
            bos_token_id=token("bos_token_id", 200034),
            eos_token_id=token("eos_token_id", 200020),
            pad_token_id=token("pad_token_id", None),
            quantization_config=raw.get("quantization_config"),
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
            raw=raw,
        )
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise QuantkitError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads")
        if not 0 < cfg.num_experts_per_tok <= cfg.num_local_experts:
            raise QuantkitError(f"{source}: num_experts_per_tok must be within 1..num_local_experts")
        return cfg

    # ---- derived sizes -------------------------------------------------------------------------------------

    @property
    def q_width(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def block_fp8(self) -> bool:
        """True when the checkpoint is the official block-FP8 layout (weights plus weight_scale_inv)."""
        q = self.quantization_config or {}
        return q.get("quant_method") == "fp8" and bool(q.get("weight_block_size"))

    @property
    def weight_block_size(self) -> tuple[int, int]:
        return tuple((self.quantization_config or {}).get("weight_block_size", (128, 128)))  # type: ignore[return-value]

    def parameter_count(self) -> tuple[int, int]:
        """(total, active per token): the active count takes top-k of the experts, everything else in full."""
        total = sum(u.numel for u in self.units())
        expert = 3 * self.intermediate_size * self.hidden_size
        inactive = self.num_hidden_layers * (self.num_local_experts - self.num_experts_per_tok) * expert
        return total, total - inactive

    # ---- names and units -----------------------------------------------------------------------------------

    def layer_tensors(self, layer: int) -> tuple[TensorSpec, ...]:
        h, p = self.hidden_size, f"model.layers.{layer}."
        i, moe = self.intermediate_size, f"model.layers.{layer}.block_sparse_moe."
        specs = [
            TensorSpec(p + "input_layernorm.weight", (h,), "norm"),
            TensorSpec(p + "self_attn.q_proj.weight", (self.q_width, h), "attn"),
            TensorSpec(p + "self_attn.k_proj.weight", (self.kv_width, h), "attn"),
            TensorSpec(p + "self_attn.v_proj.weight", (self.kv_width, h), "attn"),
            TensorSpec(p + "self_attn.o_proj.weight", (h, self.q_width), "attn"),
            TensorSpec(p + "self_attn.q_norm.weight", (self.q_width,), "qk_norm"),
            TensorSpec(p + "self_attn.k_norm.weight", (self.kv_width,), "qk_norm"),
            TensorSpec(p + "post_attention_layernorm.weight", (h,), "norm"),
            TensorSpec(moe + "gate.weight", (self.num_local_experts, h), "router"),
            TensorSpec(moe + "e_score_correction_bias", (self.num_local_experts,), "router_bias"),
        ]
        for e in range(self.num_local_experts):
            for w in EXPERT_WEIGHTS:
                shape = (h, i) if w == "w2" else (i, h)
                specs.append(TensorSpec(f"{moe}experts.{e}.{w}.weight", shape, "expert"))
        return tuple(specs)

    def units(self) -> list[Unit]:
        h, v = self.hidden_size, self.vocab_size
        units = [Unit("embed", None, (TensorSpec("model.embed_tokens.weight", (v, h), "embed"),))]
        units += [Unit(f"layers.{n}", n, self.layer_tensors(n)) for n in range(self.num_hidden_layers)]
        head = [TensorSpec("model.norm.weight", (h,), "norm")]
        if not self.tie_word_embeddings:
            head.append(TensorSpec("lm_head.weight", (v, h), "head"))
        units.append(Unit("head", None, tuple(head)))
        return units

    def expected_tensors(self) -> dict[str, TensorSpec]:
        return {t.name: t for u in self.units() for t in u.tensors}

    def is_extra_layer(self, name: str) -> bool:
        """Tensors of layers at or beyond num_hidden_layers: the advertised MTP modules, which engines skip."""
        parts = name.split(".")
        if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
            return int(parts[2]) >= self.num_hidden_layers
        return False

    def to_dict(self) -> dict:
        return dict(self.raw)


def warn_extra_layers(cfg: MiniMaxM2Config, names: list[str]) -> list[str]:
    """Drop MTP-layer tensors (layer index >= num_hidden_layers) from names, with one warning."""
    extra = [n for n in names if cfg.is_extra_layer(n)]
    if extra:
        layers = sorted({int(n.split(".")[2]) for n in extra})
        warnings.warn(
            f"skipping {len(extra)} tensors of layers {layers} (at or beyond num_hidden_layers="
            f"{cfg.num_hidden_layers}: MTP modules, which inference engines ignore)",
            stacklevel=2,
        )
    return [n for n in names if not cfg.is_extra_layer(n)]


# ---- tensor and expert parallelism ------------------------------------------------------------------------


def check_parallel(cfg: MiniMaxM2Config, fmt: str, tp: int = 1, ep: int = 1) -> None:
    """Raise QuantkitError unless the degrees are valid for the format.

    World size is max(tp, ep) and the smaller must divide it. Attention heads are split over tp ranks (query and
    KV heads both, so tp divides num_key_value_heads). Experts are split over ep ranks by expert, and the
    remaining world/ep factor splits each expert's intermediate size, which must stay a multiple of the
    format's block or group size.
    """
    if fmt not in SHARD_MULTIPLE:
        raise QuantkitError(f"unknown format {fmt!r} (known: {', '.join(SHARD_MULTIPLE)})")
    if tp < 1 or ep < 1:
        raise QuantkitError(f"--tp {tp} --ep {ep}: degrees must be positive")
    world = max(tp, ep)
    if world % tp or world % ep:
        raise QuantkitError(f"--tp {tp} --ep {ep}: the smaller degree must divide the larger")
    if cfg.num_key_value_heads % tp or cfg.num_attention_heads % tp:
        raise QuantkitError(
            f"--tp {tp}: must divide num_key_value_heads ({cfg.num_key_value_heads}) and num_attention_heads "
            f"({cfg.num_attention_heads})"
        )
    if cfg.num_local_experts % ep:
        raise QuantkitError(f"--ep {ep}: must divide num_local_experts ({cfg.num_local_experts})")
    split = world // ep
    mult = SHARD_MULTIPLE[fmt]
    shard = cfg.intermediate_size / split
    if split > 1 and (cfg.intermediate_size % split or shard % mult):
        raise QuantkitError(
            f"--tp {tp} --ep {ep}: each rank would hold {cfg.intermediate_size}/{split} = {shard:g} of every "
            f"expert's intermediate size, not a multiple of {fmt}'s block of {mult}; use expert parallelism "
            f"(--ep {world}) for the experts"
        )


def valid_degrees(cfg: MiniMaxM2Config, fmt: str, max_world: int = 8) -> list[tuple[int, int]]:
    """All (tp, ep) pairs up to max_world GPUs that check_parallel accepts."""
    out = []
    for tp in range(1, max_world + 1):
        for ep in range(1, max_world + 1):
            try:
                check_parallel(cfg, fmt, tp, ep)
            except QuantkitError:
                continue
            out.append((tp, ep))
    return out


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QuantkitError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise QuantkitError(f"{path}: expected a JSON object")
    return data
