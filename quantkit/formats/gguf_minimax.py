"""llama.cpp's `minimax-m2` GGUF: tensor names and shapes, per-tensor types from a recipe, and the metadata.

    tensors = plan_tensors(cfg, recipe)              # [GGUFTensor]: GGUF name, shape, type, HF source tensors
    kvs = metadata(cfg, folder, recipe, name="MiniMax-M2")   # general.*, minimax-m2.*, tokenizer.* KVs, in order

Names follow gguf-py's MODEL_TENSORS[MINIMAXM2] and llama.cpp's loader: experts are stacked per layer into
ffn_{gate,up,down}_exps [n_expert, rows, cols] (w1 = gate, w3 = up, w2 = down), the routing correction bias
becomes `exp_probs_b.bias`. Tensors are listed in llama-quantize's order (names outside the blocks sorted, then
blk.N by N, names sorted within a block): attn_v's "more bits" rule counts attn_v tensors in that order.

Types come from the recipe's `options` (target gguf), carrying llama-quantize's rules for minimax-m2
(llama-quant.cpp llama_tensor_get_type): a default type for the quantized kinds, per-tensor overrides
(`tensor_types`, e.g. output: Q6_K), bumps on use_more_bits layers (`more_bits`, e.g. attn_v: Q6_K), and the
fallback for rows that are not a multiple of the type's block (`fallback`, e.g. Q4_K -> Q5_0; F16 after that).
Tensors of kinds the recipe does not quantize (norms, the router, its bias) are F32, as the converter writes them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGUFValueType

from quantkit.arch import MiniMaxM2Config
from quantkit.errors import QuantkitError
from quantkit.formats.gguf_writer import KV, TensorInfo, kv_array, kv_bool, kv_f32, kv_str, kv_u32, qtype_id
from quantkit.recipe import Recipe

ARCH = "minimax-m2"
PRE_TOKENIZER = "minimax-m2"
GATING_SIGMOID = 2  # llama.cpp LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION
EXPERT_GGUF = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}
ATTN_GGUF = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "q_norm": "attn_q_norm", "k_norm": "attn_k_norm"}
# gguf-py TokenType
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPECIAL_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "sep": "seperator_token_id",
                "pad": "padding_token_id", "cls": "cls_token_id", "mask": "mask_token_id"}


@dataclass(frozen=True)
class GGUFTensor:
    """One output tensor: its GGUF info, the arch kind it comes from, and its source tensors (one per expert for
    a stacked expert tensor, whose rows are the experts' rows one after the other)."""

    info: TensorInfo
    kind: str
    sources: tuple[str, ...]
    layer: int | None

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def short(self) -> str:
        """The name without blk.N. and the suffix: token_embd, attn_v, ffn_down_exps..."""
        return re.sub(r"^blk\.\d+\.", "", self.info.name).rsplit(".", 1)[0]


def gguf_name(hf: str) -> str:
    """The GGUF name of a (non-expert) Hugging Face tensor."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf)
    if not m:
        raise QuantkitError(f"{hf}: no GGUF name for this tensor")
    n, rest = m.groups()
    rest = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
        "block_sparse_moe.e_score_correction_bias": "exp_probs_b.bias",
    }.get(rest, rest)
    m2 = re.fullmatch(r"self_attn\.(\w+)\.weight", rest)
    if m2 and m2.group(1) in ATTN_GGUF:
        rest = ATTN_GGUF[m2.group(1)] + ".weight"
    if "." in rest.removesuffix(".weight").removesuffix(".bias"):
        raise QuantkitError(f"{hf}: no GGUF name for this tensor")
    return f"blk.{n}.{rest}"


def _sort_key(name: str) -> tuple[int, str]:
    m = re.match(r"blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def use_more_bits(i: int, n: int) -> bool:
    """llama-quant.cpp: the first and last eighth of the layers and every third one between get more bits."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _check_type(recipe: Recipe, qtype: str, where: str) -> str:
    if not isinstance(qtype, str):
        raise QuantkitError(f"recipe {recipe.name!r}: {where} must name a GGML type, not {qtype!r}")
    qtype_id(qtype)  # raises on unknown names
    return qtype


def tensor_type(recipe: Recipe, short: str, kind: str, layer: int | None, n_layer: int, i_v: int, n_v: int,
                ne0: int) -> str:
    """The GGML type of one tensor under the recipe's rules, fallback applied."""
    opts = recipe.options
    if kind not in recipe.quantize:
        return "F32"
    qtype = _check_type(recipe, opts.get("type", "BF16"), "options.type")
    if short in opts.get("tensor_types", {}):
        qtype = _check_type(recipe, opts["tensor_types"][short], f"options.tensor_types.{short}")
    bumps = opts.get("more_bits", {})
    if short in bumps:
        i, n = (i_v, n_v) if short == "attn_v" else (layer or 0, n_layer)
        if use_more_bits(i, n):
            qtype = _check_type(recipe, bumps[short], f"options.more_bits.{short}")
    fallback = opts.get("fallback", {})
    block = GGML_QUANT_SIZES[qtype_id(qtype)][0]
    if ne0 % block and qtype in fallback:
        qtype = _check_type(recipe, fallback[qtype], f"options.fallback.{qtype}")
        block = GGML_QUANT_SIZES[qtype_id(qtype)][0]
    if ne0 % block:
        qtype = "F16"
    return qtype


def plan_tensors(cfg: MiniMaxM2Config, recipe: Recipe) -> list[GGUFTensor]:
    """Every output tensor in writing order with its type. Shapes are in torch order ([n_expert, rows, cols])."""
    if recipe.target != "gguf":
        raise QuantkitError(f"recipe {recipe.name!r} is for --to {recipe.target}, not --to gguf")
    if cfg.tie_word_embeddings:
        raise QuantkitError("tied embeddings are not MiniMax-M2 (tie_word_embeddings must be false)")
    raw: list[tuple[str, tuple[int, ...], str, tuple[str, ...], int | None]] = []
    for unit in cfg.units():
        experts: dict[str, list[str]] = {}
        for spec in unit.tensors:
            if spec.kind == "expert":
                experts.setdefault(spec.name.rsplit(".", 2)[-2], []).append(spec.name)
                continue
            raw.append((gguf_name(spec.name), spec.shape, spec.kind, (spec.name,), unit.layer))
        for w, names in experts.items():
            rows, cols = (cfg.hidden_size, cfg.intermediate_size) if w == "w2" else (
                cfg.intermediate_size, cfg.hidden_size)
            raw.append((f"blk.{unit.layer}.{EXPERT_GGUF[w]}.weight", (len(names), rows, cols), "expert",
                        tuple(names), unit.layer))
    raw.sort(key=lambda r: _sort_key(r[0]))
    n_v = sum(1 for r in raw if r[0].endswith(".attn_v.weight"))
    out, i_v = [], 0
    for name, shape, kind, sources, layer in raw:
        short = re.sub(r"^blk\.\d+\.", "", name).rsplit(".", 1)[0]
        qtype = tensor_type(recipe, short, kind, layer, cfg.num_hidden_layers, i_v, n_v, shape[-1])
        if short == "attn_v":
            i_v += 1
        out.append(GGUFTensor(TensorInfo(name, shape, qtype), kind, sources, layer))
    return out


# ---- metadata ----------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QuantkitError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise QuantkitError(f"{path}: expected a JSON object")
    return data


def _looks_special(token: str) -> bool:
    return token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))


def tokenizer_kvs(folder: Path, cfg: MiniMaxM2Config) -> list[KV]:
    """tokenizer.* as llama.cpp's converter writes a GPT-2-style BPE vocabulary (_set_vocab_gpt2, SpecialVocab)."""
    tj_path = folder / "tokenizer.json"
    if not tj_path.is_file():
        raise QuantkitError(f"{folder}: no tokenizer.json (GGUF files carry the tokenizer)")
    tj = _read_json(tj_path)
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise QuantkitError(f"{tj_path}: not a byte-level BPE tokenizer (model.type {model.get('type')!r})")
    tc_path = folder / "tokenizer_config.json"
    tc = _read_json(tc_path) if tc_path.is_file() else {}
    n_vocab = cfg.vocab_size
    tokens: list[str | None] = [None] * n_vocab
    types = [UNUSED] * n_vocab
    for tok, i in model["vocab"].items():
        if 0 <= i < n_vocab:
            tokens[i], types[i] = tok, NORMAL
    added = {}
    for a in tj.get("added_tokens") or []:
        i, content = a.get("id"), a.get("content")
        if not isinstance(i, int) or not isinstance(content, str):
            raise QuantkitError(f"{tj_path}: malformed added_tokens entry {a!r}")
        added[content] = i
        if 0 <= i < n_vocab:
            special = bool(a.get("special")) or _looks_special(content)
            tokens[i] = content if special else content.replace("\u2581", " ")
            types[i] = CONTROL if special else USER_DEFINED
    if any(0 > i or i >= n_vocab for i in [*model["vocab"].values(), *added.values()]):
        raise QuantkitError(f"{tj_path}: token ids reach beyond config.json's vocab_size {n_vocab}")
    words = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]

    merges = []
    for m in model.get("merges") or []:
        if isinstance(m, str):
            merges.append(m)
        elif isinstance(m, list) and len(m) == 2:
            merges.append(" ".join("".join("\u0120" if c == " " else c for c in part) for part in m))
        else:
            raise QuantkitError(f"{tj_path}: malformed merge {m!r}")

    kvs = [kv_str("tokenizer.ggml.model", "gpt2"), kv_str("tokenizer.ggml.pre", PRE_TOKENIZER),
           kv_array("tokenizer.ggml.tokens", GGUFValueType.STRING, words),
           kv_array("tokenizer.ggml.token_type", GGUFValueType.INT32, types)]
    if merges:
        kvs.append(kv_array("tokenizer.ggml.merges", GGUFValueType.STRING, merges))
    raw = cfg.raw
    for typ, key in SPECIAL_KEYS.items():
        entry = tc.get(f"{typ}_token")
        content = entry.get("content") if isinstance(entry, dict) else entry
        tid = added.get(content) if isinstance(content, str) else None
        if tid is None:
            # config.json as the converter reads it; bos/eos through arch's parse (generation_config wins there)
            tid = {"bos": cfg.bos_token_id, "eos": cfg.eos_token_id, "pad": cfg.pad_token_id}.get(typ)
            tid = raw.get(f"{typ}_token_id") if tid is None else tid
        if isinstance(tid, list):
            tid = tid[0] if tid else None
        if isinstance(tid, int) and 0 <= tid < n_vocab:
            kvs.append(kv_u32(f"tokenizer.ggml.{key}", tid))
    for typ in ("bos", "eos"):
        if isinstance(tc.get(f"add_{typ}_token"), bool):
            kvs.append(kv_bool(f"tokenizer.ggml.add_{typ}_token", tc[f"add_{typ}_token"]))
    template = tc.get("chat_template")
    if not isinstance(template, str) and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, str):
        kvs.append(kv_str("tokenizer.chat_template", template))
    return kvs


def base_model(folder: Path, cfg: MiniMaxM2Config, stem: str | None = None) -> tuple[str, str | None]:
    """(name, organization) of the model converted: config.json's _name_or_path when it names a Hub repo."""
    ref = cfg.raw.get("_name_or_path")
    if isinstance(ref, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", ref):
        org, name = ref.split("/")
        return name, org
    return stem or folder.resolve().name, None


def metadata(cfg: MiniMaxM2Config, folder: Path, recipe: Recipe, name: str | None = None,
             imatrix: dict | None = None, stem: str | None = None) -> list[KV]:
    """All KV metadata of the first split, in the converter's order then llama-quantize's additions."""
    opts = recipe.options
    if "file_type" not in opts:
        raise QuantkitError(f"recipe {recipe.name!r}: options.file_type (llama_ftype) is missing")
    base, org = base_model(folder, cfg, stem)  # stem: the model's own name when `folder` is a download folder
    a = ARCH
    kvs = [kv_str("general.architecture", a), kv_str("general.type", "model"),
           kv_str("general.name", name or base), kv_str("general.quantized_by", "quantkit"),
           kv_u32("general.base_model.count", 1), kv_str("general.base_model.0.name", base)]
    if org:
        kvs += [kv_str("general.base_model.0.organization", org),
                kv_str("general.base_model.0.repo_url", f"https://huggingface.co/{org}/{base}")]
    if "alignment" in opts:
        kvs.append(kv_u32("general.alignment", int(opts["alignment"])))
    kvs += [
        kv_u32(f"{a}.block_count", cfg.num_hidden_layers),
        kv_u32(f"{a}.context_length", cfg.max_position_embeddings),
        kv_u32(f"{a}.embedding_length", cfg.hidden_size),
        kv_u32(f"{a}.feed_forward_length", cfg.intermediate_size),
        kv_u32(f"{a}.attention.head_count", cfg.num_attention_heads),
        kv_u32(f"{a}.attention.head_count_kv", cfg.num_key_value_heads),
        kv_f32(f"{a}.rope.freq_base", cfg.rope_theta),
        kv_f32(f"{a}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps),
        kv_u32(f"{a}.expert_count", cfg.num_local_experts),
        kv_u32(f"{a}.expert_used_count", cfg.num_experts_per_tok),
        kv_u32(f"{a}.attention.key_length", cfg.head_dim),
        kv_u32(f"{a}.attention.value_length", cfg.head_dim),
        kv_u32(f"{a}.expert_gating_func", GATING_SIGMOID),
        kv_u32(f"{a}.vocab_size", cfg.vocab_size),
        kv_u32(f"{a}.expert_feed_forward_length", cfg.intermediate_size),
        kv_u32(f"{a}.rope.dimension_count", cfg.rotary_dim),
    ]
    kvs += tokenizer_kvs(folder, cfg)
    kvs += [kv_u32("general.quantization_version", QUANTIZATION_VERSION),
            kv_u32("general.file_type", int(opts["file_type"]))]
    if imatrix:
        kvs.append(kv_str("quantize.imatrix.file", str(imatrix["file"])[:127]))
        if imatrix.get("dataset"):
            kvs.append(kv_str("quantize.imatrix.dataset", imatrix["dataset"]))
        kvs.append(kv_u32("quantize.imatrix.entries_count", imatrix["entries"]))
        if imatrix.get("chunks") is not None:
            kvs.append(kv_u32("quantize.imatrix.chunks_count", imatrix["chunks"]))
    return kvs
