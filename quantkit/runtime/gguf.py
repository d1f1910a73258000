"""GGUF backend: run a llama.cpp `minimax-m2` GGUF file (single or split) on quantkit's MiniMax-M2 model.

    model = load_gguf_model("MiniMax-M2-Q4_K_M-00001-of-00003.gguf", dtype=torch.bfloat16, device="cuda")
    model = load_model("m2.gguf")                        # the same, through quantkit.runtime.load_model

The file is read with gguf-py's GGUFReader (memory-mapped; split files found from the first one's name and
`split.count`), the config from its `minimax-m2.*` metadata, one tensor at a time. Q8_0, Q4_K, Q5_K and Q6_K
projections and experts keep their GGUF bytes as stored (`GGUFLinear`, `GGUFExperts`) and run the dequantizing
Triton kernels on a GPU (kernels/gguf_gemm.py, kernels/gguf_moe.py) or their PyTorch references on the CPU; F32,
F16 and BF16 tensors, and any other ggml type (such as the Q5_0/Q8_0 fallbacks llama-quantize picks for rows that
are not a multiple of 256), are loaded dense, dequantized by gguf-py. The embedding table is always dense.

Layouts. ggml lists dimensions fastest first: a weight {K, N} is PyTorch [N, K], the stacked experts {H, I, E} are
[E, I, H]; quantized rows are K/QK blocks of bytes, so the data is [N, K/QK*size] as the kernels read it. llama.cpp's
MiniMaxM2Model converter derives from TextModel, not LlamaModel, and writes q/k unpermuted (the model uses NeoX
rotary, which needs no permutation), so attn_q/attn_k load as they are.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from quantkit.arch import MiniMaxM2Config
from quantkit.errors import QuantkitError

ARCH = "minimax-m2"
GATING_SIGMOID = 2  # llama.cpp LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID
KERNEL_QTYPES = {8: "q8_0", 12: "q4_k", 13: "q5_k", 14: "q6_k"}  # ggml type id -> the kernels' qtype
DENSE_TYPES = {0: np.float32, 1: np.float16}  # F32, F16 (BF16 = 30 comes as bytes)
BF16 = 30
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4  # gguf-py TokenType
SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")


class GGUFLinear(nn.Module):
    """y = x W^T with W [out, in] kept as GGUF blocks uint8 [out, in/QK*size]."""

    def __init__(self, in_features: int, out_features: int, qtype: str):
        super().__init__()
        from quantkit.kernels.gguf_gemm import row_bytes

        self.in_features, self.out_features, self.qtype = in_features, out_features, qtype
        self.register_buffer("qweight", torch.empty(out_features, row_bytes(in_features, qtype), dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from quantkit.kernels import gguf_gemm

        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [M, K]
        fn = gguf_gemm.gguf_linear if x2.is_cuda else gguf_gemm.gguf_linear_ref
        return fn(x2, self.qweight, self.qtype).view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}"


class GGUFExperts(nn.Module):
    """All experts of a layer as llama.cpp stacks them: gate, up [E, I, H bytes], down [E, H, I bytes]."""

    def __init__(self, num_experts: int, hidden: int, inter: int, qtypes: tuple[str, str, str]):
        super().__init__()
        from quantkit.kernels.gguf_gemm import row_bytes

        self.qtypes = qtypes
        g, u, d = qtypes
        self.register_buffer("gate", torch.empty(num_experts, inter, row_bytes(hidden, g), dtype=torch.uint8))
        self.register_buffer("up", torch.empty(num_experts, inter, row_bytes(hidden, u), dtype=torch.uint8))
        self.register_buffer("down", torch.empty(num_experts, hidden, row_bytes(inter, d), dtype=torch.uint8))

    def forward(self, h: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """h [N, H], idx and w [N, K] -> [N, H]"""
        from quantkit.kernels import gguf_moe

        fn = gguf_moe.fused_moe_gguf if h.is_cuda else gguf_moe.fused_moe_gguf_ref
        return fn(h, self.gate, self.up, self.down, w.float(), idx, self.qtypes)

    def extra_repr(self) -> str:
        return f"qtypes={self.qtypes}"


# --------------------------------------------------------------------------------------------------------------------
# the file


def split_paths(path: Path) -> list[Path]:
    """The files of a model: [path], or NAME-00001-of-0000N.gguf .. NAME-0000N-of-0000N.gguf from any one of them."""
    m = SPLIT_RE.match(path.name)
    if not m:
        return [path]
    n = int(m["n"])
    paths = [path.with_name(f"{m['stem']}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise QuantkitError(f"{path}: split file {missing[0]} is missing ({len(missing)} of {n} missing)")
    return paths


def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file to load for `path`: path itself when it ends in .gguf; for a folder without config.json that
    holds GGUF files (what `quantkit convert --to gguf` writes), its one model (the first split of a split one);
    else None (not a GGUF model)."""
    p = Path(path)
    if p.suffix == ".gguf":
        return p
    if not p.is_dir() or (p / "config.json").exists():
        return None
    models = sorted(q for q in p.glob("*.gguf") if not SPLIT_RE.match(q.name) or SPLIT_RE.match(q.name)["i"] == "00001")
    if len(models) > 1:
        raise QuantkitError(f"{p}: holds several GGUF models ({', '.join(q.name for q in models)}); name the file")
    return models[0] if models else None


class GGUFModelFile:
    """The tensors and metadata of one model over its split files, memory-mapped."""

    def __init__(self, path: str | Path):
        from gguf import GGUFReader

        self.path = Path(path)
        if not self.path.is_file():
            raise QuantkitError(f"{self.path}: no such GGUF file")
        self.readers = []
        for p in split_paths(self.path):
            try:
                self.readers.append(GGUFReader(p))
            except Exception as e:  # gguf-py raises ValueError, struct.error, ... on a bad file
                raise QuantkitError(f"{p}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        first = self.readers[0]
        count = self.meta("split.count", None)
        if count is not None and int(count) != len(self.readers):
            raise QuantkitError(f"{self.path}: split.count says {count} files, found {len(self.readers)}")
        self.fields = first.fields
        self.tensors = {}
        for r in self.readers:
            for t in r.tensors:
                self.tensors[t.name] = t

    def meta(self, key: str, default=KeyError):
        field = self.readers[0].fields.get(key)
        if field is None:
            if default is KeyError:
                raise QuantkitError(f"{self.path}: metadata key {key!r} is missing")
            return default
        return field.contents()

    def has(self, name: str) -> bool:
        return name in self.tensors

    def tensor(self, name: str):
        if name not in self.tensors:
            raise QuantkitError(f"{self.path}: tensor {name!r} is missing")
        return self.tensors[name]

    def torch_shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self.tensor(name).shape.tolist()))

    def check_shape(self, name: str, want: tuple[int, ...]) -> None:
        got = self.torch_shape(name)
        if got != tuple(want):
            raise QuantkitError(f"{self.path}: tensor {name!r} has shape {list(got)} (PyTorch order), the metadata "
                                f"says {list(want)}")

    def kernel_qtype(self, name: str) -> str | None:
        """The kernels' name of the tensor's type when they read it ('q4_k'...), else None (loaded dense)."""
        return KERNEL_QTYPES.get(int(self.tensor(name).tensor_type))

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes as stored, uint8 [..., rows, row bytes] (a view of the mapped file)."""
        t = self.tensor(name)
        with warnings.catch_warnings():  # the map is read-only; the bytes are only ever copied out
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(np.asarray(t.data))

    def dense(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The tensor as values in PyTorch order and `dtype`, whatever its ggml type."""
        t = self.tensor(name)
        kind = int(t.tensor_type)
        shape = self.torch_shape(name)
        if kind in DENSE_TYPES:
            out = torch.from_numpy(np.array(t.data, dtype=DENSE_TYPES[kind])).reshape(shape)
        elif kind == BF16:
            out = torch.from_numpy(np.array(t.data, dtype=np.uint8)).view(torch.bfloat16).reshape(shape)
        elif kind in KERNEL_QTYPES:
            from quantkit.kernels.gguf_gemm import dequantize_ref

            # row chunks: the decoder's int32 temporaries of a whole 200k-row embedding would take many GB
            raw = self.raw(name)
            raw = raw.reshape(-1, raw.shape[-1])  # [rows, row bytes]
            out = torch.empty((raw.shape[0], shape[-1]), dtype=dtype)
            for r in range(0, raw.shape[0], 4096):
                out[r:r + 4096] = dequantize_ref(raw[r:r + 4096], KERNEL_QTYPES[kind])
            out = out.reshape(shape)
        else:
            from gguf import quants

            try:
                out = torch.from_numpy(quants.dequantize(np.asarray(t.data), t.tensor_type)).reshape(shape)
            except NotImplementedError:
                raise QuantkitError(f"{self.path}: tensor {name!r} has ggml type {t.tensor_type.name}, which "
                                    f"gguf-py cannot dequantize") from None
        return out.to(dtype)


    def block_values(self, name: str) -> int:
        """Values per block along a row of the tensor's type: 1 for F32/F16/BF16, 32 for Q8_0, 256 for k-quants."""
        from gguf.constants import GGML_QUANT_SIZES

        return int(GGML_QUANT_SIZES[self.tensor(name).tensor_type][0])

    def part(self, name: str, dtype: torch.dtype, lead: tuple[int, int] | None = None,
             rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None, dense: bool = False
             ) -> tuple[str | None, torch.Tensor]:
        """A slice [lead][rows, cols] of a 2-D tensor (or a stacked 3-D one, `lead` ranging over its first dimension),
        read from the mapped file without the rest: (kernel qtype, its GGUF bytes uint8 [.., rows, bytes]) where the
        kernels read the type and not `dense`, else (None, its values in dtype). A column range must start and end
        on the type's blocks."""
        t = self.tensor(name)
        kind = int(t.tensor_type)
        shape = self.torch_shape(name)
        qk = self.block_values(name)
        if cols is not None and (cols[0] % qk or cols[1] % qk):
            raise QuantkitError(f"{self.path}: tensor {name!r} ({t.tensor_type.name}) cannot be cut at columns "
                                f"[{cols[0]}, {cols[1]}): its blocks hold {qk} values; choose degrees whose shards "
                                f"are multiples of {qk}")
        with warnings.catch_warnings():  # the map is read-only; only the slice is ever copied out
            warnings.simplefilter("ignore", UserWarning)
            data = np.asarray(t.data)
        if len(shape) == 3:
            data = data[slice(*lead) if lead else slice(None)]
        elif lead is not None:
            raise QuantkitError(f"{self.path}: tensor {name!r} is not stacked")
        if len(shape) == 1:  # a vector (norms, biases): `rows` ranges over its values
            cols, rows = rows, None
        else:
            data = data[..., slice(*rows) if rows else slice(None), :]
        if cols is not None:  # a column range as bytes of its blocks (or as values for float types)
            per = data.shape[-1] // (shape[-1] // qk)  # bytes (or values) per block
            data = data[..., cols[0] // qk * per:cols[1] // qk * per]
        data = np.ascontiguousarray(data)
        n_cols = (cols[1] - cols[0]) if cols else shape[-1]
        if kind in KERNEL_QTYPES and not dense:
            return KERNEL_QTYPES[kind], torch.from_numpy(data)
        if kind in DENSE_TYPES:
            out = torch.from_numpy(data.astype(DENSE_TYPES[kind], copy=False))
        elif kind == BF16:
            out = torch.from_numpy(data.view(np.uint8)).view(torch.bfloat16)
        elif kind in KERNEL_QTYPES:
            from quantkit.kernels.gguf_gemm import dequantize_ref

            out = dequantize_ref(torch.from_numpy(data), KERNEL_QTYPES[kind])
        else:
            from gguf import quants

            try:
                out = torch.from_numpy(quants.dequantize(data, t.tensor_type))
            except NotImplementedError:
                raise QuantkitError(f"{self.path}: tensor {name!r} has ggml type {t.tensor_type.name}, which "
                                    f"gguf-py cannot dequantize") from None
        return None, out.reshape(*data.shape[:-1], n_cols).to(dtype)

    def shard_format(self) -> str:
        """The key of arch.SHARD_MULTIPLE whose block the slices of this file's projections must respect."""
        names = [n for n in self.tensors if any(f".{p}." in n for p in PROJECTIONS)]
        qk = max((self.block_values(n) for n in names), default=1)
        return "gguf-kquant" if qk > 32 else "gguf-q8_0" if qk > 1 else "bf16"


PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


def gguf_storage(path: str | Path) -> tuple[int, float]:
    """(bytes of all tensors, bits per weight of the attention and expert projections) of a GGUF model (a file, any
    of its splits, or the folder holding it): what evals/compare.py's `storage` gives for safetensors folders."""
    found = find_gguf(path)
    if found is None:
        raise QuantkitError(f"{path}: not a GGUF file, nor a folder holding one")
    f = GGUFModelFile(found)
    total = sum(int(t.n_bytes) for t in f.tensors.values())
    proj = [t for name, t in f.tensors.items() if name.startswith("blk.") and name.split(".")[2] in PROJECTIONS]
    return total, 8 * sum(int(t.n_bytes) for t in proj) / max(1, sum(int(t.n_elements) for t in proj))


def tokenizer_from_gguf(path: str | Path):
    """The file's byte-level BPE vocabulary (tokenizer.ggml.*, model gpt2) as a `tokenizers.Tokenizer`: ordinary
    tokens and merges as the BPE model, control and user-defined tokens as added tokens, MiniMax-M2's o200k-style
    pre-tokenizer split (the one llama.cpp's `minimax-m2` pre type uses)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    from quantkit.tokenizer import PRE_TOKENIZER_PATTERN

    found = find_gguf(path)
    f = GGUFModelFile(found if found is not None else path)
    if f.meta("tokenizer.ggml.model", None) != "gpt2":
        raise QuantkitError(f"{f.path}: no byte-level BPE tokenizer in the file (tokenizer.ggml.model "
                            f"{f.meta('tokenizer.ggml.model', None)!r}); pass --tokenizer FOLDER")
    tokens = f.meta("tokenizer.ggml.tokens")
    types = f.meta("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in f.meta("tokenizer.ggml.merges", [])]
    normal, added = {}, []
    for i, (t, kind) in enumerate(zip(tokens, types)):
        if kind == TOKEN_NORMAL:
            normal[t] = i
        elif kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED):
            added.append((i, t, kind == TOKEN_CONTROL))
    tokenizer = Tokenizer(models.BPE(vocab=normal, merges=merges, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKENIZER_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    for i, content, special in sorted(added):  # in id order: each lands at the next id, which must be its own
        token = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        (tokenizer.add_special_tokens if special else tokenizer.add_tokens)([token])
        if tokenizer.token_to_id(content) != i:
            raise QuantkitError(f"{f.path}: token {content!r} (id {i}) does not follow the ordinary vocabulary; "
                                f"pass --tokenizer FOLDER")
    return tokenizer


def config_from_gguf(f: GGUFModelFile) -> MiniMaxM2Config:
    """The MiniMax-M2 config from the file's metadata (minimax-m2.* keys as llama.cpp's converter writes them)."""
    arch = f.meta("general.architecture")
    if arch != ARCH:
        raise QuantkitError(f"{f.path}: general.architecture is {arch!r}; quantkit runs {ARCH!r} GGUF files")
    gating = f.meta(f"{ARCH}.expert_gating_func", GATING_SIGMOID)
    if int(gating) != GATING_SIGMOID:
        raise QuantkitError(f"{f.path}: {ARCH}.expert_gating_func is {gating}; MiniMax-M2 routes with sigmoid (2)")

    def key(name: str, default=KeyError):
        return f.meta(f"{ARCH}.{name}", default)

    def f32(name: str, default: float) -> float:
        # stored as float32: the shortest decimal that rounds to it (1e-06, not 9.99999997e-07), as config.json has it
        return float(str(np.float32(key(name, default))))

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    vocab = f.torch_shape("token_embd.weight")[0]
    raw = {
        "architectures": ["MiniMaxM2ForCausalLM"],
        "model_type": "minimax_m2",
        "hidden_size": hidden,
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv")),
        "head_dim": int(key("attention.key_length", hidden // heads)),
        "intermediate_size": int(key("expert_feed_forward_length", None) or key("feed_forward_length")),
        "num_local_experts": int(key("expert_count")),
        "num_experts_per_tok": int(key("expert_used_count")),
        "vocab_size": int(key("vocab_size", vocab)),
        "max_position_embeddings": int(key("context_length", 196608)),
        "rope_theta": f32("rope.freq_base", 5e6),
        "rotary_dim": int(key("rope.dimension_count")),
        "rms_norm_eps": f32("attention.layer_norm_rms_epsilon", 1e-6),
        "tie_word_embeddings": not f.has("output.weight"),
        "scoring_func": "sigmoid",
    }
    gen = {}
    for name, hf in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        v = f.meta(f"tokenizer.ggml.{name}_token_id", None)
        if v is not None:
            gen[hf] = int(v)
    return MiniMaxM2Config.from_dict(raw, gen, source=str(f.path))


def check_shapes(f: GGUFModelFile, cfg: MiniMaxM2Config) -> None:
    """Every tensor's shape against the file's own metadata: a contradiction fails before anything is allocated."""
    h, q, kv, e, i = cfg.hidden_size, cfg.q_width, cfg.kv_width, cfg.num_local_experts, cfg.intermediate_size
    attn = {"q_proj": ("attn_q", h, q), "k_proj": ("attn_k", h, kv), "v_proj": ("attn_v", h, kv),
            "o_proj": ("attn_output", q, h)}
    head = "token_embd.weight" if cfg.tie_word_embeddings else "output.weight"
    f.check_shape("token_embd.weight", (cfg.vocab_size, h))
    f.check_shape(head, (cfg.vocab_size, h))
    for n in range(cfg.num_hidden_layers):
        b = f"blk.{n}."
        for name, k_in, n_out in attn.values():
            f.check_shape(b + name + ".weight", (n_out, k_in))
        for name, want in (("ffn_gate_exps", (e, i, h)), ("ffn_up_exps", (e, i, h)), ("ffn_down_exps", (e, h, i)),
                           ("ffn_gate_inp", (e, h)), ("attn_q_norm", (q,)), ("attn_k_norm", (kv,)),
                           ("attn_norm", (h,)), ("ffn_norm", (h,))):
            f.check_shape(b + name + ".weight", want)
        f.check_shape(b + "exp_probs_b.bias", (e,))


def load_gguf_model(path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                    dense: bool = False) -> nn.Module:
    """Build quantkit's MiniMaxM2 from a GGUF file: quantized projections and experts as GGUF bytes (kernel types),
    the rest dense in `dtype` (router and its bias in fp32). dense: every weight dequantized to `dtype` instead."""
    from quantkit.runtime.model import DenseExperts, MiniMaxM2

    f = GGUFModelFile(path)
    cfg = config_from_gguf(f)
    kernel_qtype = (lambda name: None) if dense else f.kernel_qtype
    h, q, kv, e, i = cfg.hidden_size, cfg.q_width, cfg.kv_width, cfg.num_local_experts, cfg.intermediate_size
    attn = {"q_proj": ("attn_q", h, q), "k_proj": ("attn_k", h, kv), "v_proj": ("attn_v", h, kv),
            "o_proj": ("attn_output", q, h)}
    exps = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
    head = "token_embd.weight" if cfg.tie_word_embeddings else "output.weight"

    check_shapes(f, cfg)

    with torch.device("meta"):
        model = MiniMaxM2(cfg)
        for n, block in enumerate(model.layers):
            b = f"blk.{n}."
            for proj, (name, k_in, n_out) in attn.items():
                qt = kernel_qtype(b + name + ".weight")
                if qt is not None:
                    setattr(block.self_attn, proj, GGUFLinear(k_in, n_out, qt))
            qts = tuple(kernel_qtype(b + x + ".weight") for x in exps)
            if all(qts):
                block.moe.experts = GGUFExperts(e, h, i, qts)  # type: ignore[arg-type]
        qt = kernel_qtype(head)
        if qt is not None:
            model.lm_head = GGUFLinear(h, cfg.vocab_size, qt)
    model = model.to_empty(device=device)
    for p in model.parameters():  # dense weights in dtype; the router stays fp32
        p.data = p.data.to(dtype)
    for block in model.layers:
        block.moe.gate.data = block.moe.gate.data.float()
        block.moe.bias.data = block.moe.bias.data.float()

    def put(dest: torch.Tensor, name: str) -> None:
        dest.copy_(f.dense(name, dest.dtype))

    def put_linear(mod: nn.Module, name: str) -> None:
        if isinstance(mod, GGUFLinear):
            mod.qweight.copy_(f.raw(name))
        else:
            put(mod.weight, name)

    with torch.no_grad():
        put(model.embed_tokens.weight, "token_embd.weight")
        put(model.norm, "output_norm.weight")
        put_linear(model.lm_head, head)
        for n, block in enumerate(model.layers):
            b = f"blk.{n}."
            put(block.input_layernorm, b + "attn_norm.weight")
            put(block.post_attention_layernorm, b + "ffn_norm.weight")
            att = block.self_attn
            for proj, (name, _, _) in attn.items():
                put_linear(getattr(att, proj), b + name + ".weight")
            put(att.q_norm, b + "attn_q_norm.weight")
            put(att.k_norm, b + "attn_k_norm.weight")
            moe = block.moe
            put(moe.gate, b + "ffn_gate_inp.weight")
            put(moe.bias, b + "exp_probs_b.bias")
            ex = moe.experts
            if isinstance(ex, GGUFExperts):
                for buf, name in zip((ex.gate, ex.up, ex.down), exps):
                    buf.copy_(f.raw(b + name + ".weight"))
            else:
                assert isinstance(ex, DenseExperts)
                for w, name in zip((ex.w1, ex.w3, ex.w2), exps):
                    put(w, b + name + ".weight")
    return model.eval().requires_grad_(False)


def load_gguf_sharded(path: str | Path, dtype: torch.dtype, device: str | torch.device, spec, dense: bool = False
                      ) -> nn.Module:
    """This rank's part of a GGUF model under tensor/expert parallelism (spec: runtime.parallel.ParallelSpec), as
    runtime.parallel.load_sharded builds it from safetensors: q/k/v rows and o_proj columns of the rank's heads, the
    experts of its group on its slice of the intermediate size, the head's rows of its part of the vocabulary; norms,
    router and embeddings whole. Only those slices are read from the mapped file. Quantized slices keep their
    blocks as stored, so a column cut must fall on a block edge (arch.SHARD_MULTIPLE, "gguf-q8_0"/"gguf-kquant")."""
    from quantkit.arch import check_parallel
    from quantkit.runtime.model import DenseExperts
    from quantkit.runtime.parallel import ExpertShard, ShardedAttention, ShardedMiniMaxM2, VocabShardHead

    f = GGUFModelFile(path)
    cfg = config_from_gguf(f)
    check_parallel(cfg, f.shard_format(), spec.tp, spec.ep)
    check_shapes(f, cfg)
    qrows, kvrows, experts, inter = spec.slices(cfg)
    n_exp, n_inter = experts[1] - experts[0], inter[1] - inter[0]

    def param(t: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(t.to(device), requires_grad=False)

    def values(name: str, dt: torch.dtype = dtype, rows: tuple[int, int] | None = None) -> nn.Parameter:
        return param(f.part(name, dt, rows=rows, dense=True)[1])

    def linear(name: str, rows: tuple[int, int] | None, cols: tuple[int, int] | None) -> nn.Module:
        qt, t = f.part(name, dtype, rows=rows, cols=cols, dense=dense)
        n_out, k_in = t.shape[0], (cols[1] - cols[0]) if cols else f.torch_shape(name)[1]
        if qt is not None:
            with torch.device("meta"):
                mod = GGUFLinear(k_in, n_out, qt)
            mod.qweight = t.to(device)
            return mod
        with torch.device("meta"):
            mod = nn.Linear(k_in, n_out, bias=False)
        mod.weight = param(t)
        return mod

    def expert_part(b: str) -> nn.Module:
        names = [b + "ffn_gate_exps.weight", b + "ffn_up_exps.weight", b + "ffn_down_exps.weight"]
        cuts = [{"rows": inter}, {"rows": inter}, {"cols": inter}]  # gate, up [E, I, H]; down [E, H, I]
        parts = [f.part(nm, dtype, lead=experts, dense=dense, **cut) for nm, cut in zip(names, cuts)]
        if all(qt is not None for qt, _ in parts):
            with torch.device("meta"):
                ex = GGUFExperts(n_exp, cfg.hidden_size, n_inter, tuple(qt for qt, _ in parts))
            ex.gate, ex.up, ex.down = (t.to(device) for _, t in parts)
            return ex
        # as the one-process loader: experts of mixed types run dense
        got = [t if qt is None else f.part(nm, dtype, lead=experts, dense=True, **cut)[1]
               for (qt, t), nm, cut in zip(parts, names, cuts)]
        with torch.device("meta"):
            ex = DenseExperts(replace(cfg, num_local_experts=n_exp, intermediate_size=n_inter))
        ex.w1, ex.w3, ex.w2 = (param(t) for t in got)
        return ex

    with torch.device("meta"):
        model = ShardedMiniMaxM2(cfg, spec)
    head = "token_embd.weight" if cfg.tie_word_embeddings else "output.weight"
    model.embed_tokens.weight = values("token_embd.weight")
    model.norm = values("output_norm.weight")
    if cfg.vocab_size % spec.world == 0:
        per = cfg.vocab_size // spec.world
        model.lm_head = VocabShardHead(None, cfg.vocab_size, spec,
                                       proj=linear(head, (spec.rank * per, (spec.rank + 1) * per), None))
    else:  # a vocabulary the world does not divide: every rank holds the whole head
        model.lm_head = linear(head, None, None)
    for n, block in enumerate(model.layers):
        b = f"blk.{n}."
        block.input_layernorm = values(b + "attn_norm.weight")
        block.post_attention_layernorm = values(b + "ffn_norm.weight")
        att = ShardedAttention(cfg, spec)
        att.q_proj = linear(b + "attn_q.weight", qrows, None)
        att.k_proj = linear(b + "attn_k.weight", kvrows, None)
        att.v_proj = linear(b + "attn_v.weight", kvrows, None)
        att.o_proj = linear(b + "attn_output.weight", None, qrows)
        att.q_norm = values(b + "attn_q_norm.weight", rows=qrows)
        att.k_norm = values(b + "attn_k_norm.weight", rows=kvrows)
        block.self_attn = att
        block.moe.gate = values(b + "ffn_gate_inp.weight", torch.float32)  # the router stays fp32, replicated
        block.moe.bias = values(b + "exp_probs_b.bias", torch.float32)
        block.moe.experts = ExpertShard(expert_part(b), experts[0], n_exp, spec)
    return model.eval().requires_grad_(False)
