"""The MiniMax-M2 forward pass in PyTorch, exactly as specs/minimax-m2.md section 3 gives it.

    model = load_model("ckpt", dtype=torch.float32)       # BF16 or block-FP8 checkpoints (FP8 dequantized on load)
    cache = model.new_cache(batch=2, max_len=256)
    logits = model(tokens, cache)                        # tokens [B, T]; appends to the cache; logits [B, T, V]

Per layer: pre-norm attention with QK-norm over the full projection width (before the head split and RoPE),
NeoX rotary on the first rotary_dim dims of each head, GQA; then a pre-norm MoE whose router runs in fp32:
sigmoid scores, top-k chosen on score + correction bias, the chosen unbiased scores renormalised.
Batches are left-padded: the cache keeps a validity mask over its columns and positions count valid tokens only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.arch import MiniMaxM2Config
from quantkit.checkpoint import CheckpointReader
from quantkit.errors import QuantkitError

if TYPE_CHECKING:
    from quantkit.runtime.parallel import ParallelSpec


def _fused(*ts: torch.Tensor) -> bool:
    """Whether the fused Triton kernels (kernels/fused_ops.py) run this step: CUDA tensors of one dtype. Elsewhere
    their PyTorch references run, which compute the same roundings. The kernels have no backward: where autograd
    records (training), the references run."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        return False
    return ts[0].is_cuda and all(t.dtype == ts[0].dtype for t in ts) and ts[0].dtype in (
        torch.bfloat16, torch.float16, torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / rms(x)) with the cast to x's dtype before the gain, as transformers does."""
    from quantkit.kernels import fused_ops

    return (fused_ops.rms_norm if _fused(x, weight) else fused_ops.rms_norm_ref)(x, weight, eps)


def add_rms_norm(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + r, rms_norm(x + r)): the residual add and the next norm, one kernel on a GPU."""
    from quantkit.kernels import fused_ops

    fused = _fused(x, r, weight) and x.shape == r.shape
    return (fused_ops.add_rms_norm if fused else fused_ops.add_rms_norm_ref)(x, r, weight, eps)


# The attribute under which a norm's output carries its own block-FP8 quantization ((fp8 [M, K], fp32 scales
# [M, K/group]) of its rows), made in the norm's launch when the tensor's consumer is a block-FP8 GEMM on a GPU
# (Fp8Linear, Fp8Experts): one quantization launch fewer per consumer. A tensor without it (another path, or a
# sublayer fed another input, as parallel.sublayer_io does) is quantized by its consumer as before.
FP8_INPUT = "quantkit_fp8_input"


def fp8_input(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The quantization x carries (see FP8_INPUT) if it is one of x's rows in `group`-column groups, else None."""
    act = getattr(x, FP8_INPUT, None)
    if act is None or x.dim() == 0:
        return None
    q, s = act
    k = x.shape[-1]
    if q.dim() != 2 or q.shape[1] != k or q.shape[0] * k != x.numel() or tuple(s.shape) != (q.shape[0], k // group):
        return None
    return act


def act_group(consumer: nn.Module | None) -> int:
    """The activation group of a block-FP8 consumer (0 for any other): what a norm may quantize its output for."""
    return int(getattr(consumer, "act_group", 0) or 0)


def norm_rope(y: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, eps: float,
              rstd: torch.Tensor | None = None) -> torch.Tensor:
    """The QK-norm and rotary embedding of one projection: y [B, T, heads*D] -> [B, heads, T, D]. The norm spans
    the whole width (all heads at once); rstd [B, T, 1] (fp32) replaces the width's own 1/rms where the width is
    split over tensor-parallel ranks."""
    from quantkit.kernels import fused_ops

    run = fused_ops.qk_norm_rope if _fused(y, weight) else fused_ops.qk_norm_rope_ref
    return run(y, weight, cos, sin, heads, eps, rstd).transpose(1, 2)


def norm_rope_qk(q: torch.Tensor, k: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, q_heads: int, k_heads: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """norm_rope of q and of k: one kernel for both on a GPU, the same bits."""
    from quantkit.kernels import fused_ops

    if _fused(q, k, wq, wk):
        q, k = fused_ops.qk_norm_rope_pair(q, k, wq, wk, cos, sin, q_heads, k_heads, eps)
        return q.transpose(1, 2), k.transpose(1, 2)
    return norm_rope(q, wq, cos, sin, q_heads, eps), norm_rope(k, wk, cos, sin, k_heads, eps)


def attn_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask (True: attend) as the additive one scaled_dot_product_attention makes of it on every
    call (0 and -inf in dtype), made once per step instead of once per layer: three kernels fewer per layer."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def rope_tables(positions: torch.Tensor, rotary_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, T, rotary_dim/2] for integer positions [B, T]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=positions.device)
                               / rotary_dim)
    ang = positions.to(torch.float64)[..., None] * inv_freq
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX (rotate-half) rotary on the first 2*cos.shape[-1] dims of every head. x [B, heads, T, D]."""
    half = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, half]
    a, b, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    af, bf = a.float(), b.float()
    ra = (af * cos - bf * sin).to(x.dtype)
    rb = (bf * cos + af * sin).to(x.dtype)
    return torch.cat([ra, rb, rest], dim=-1)


@dataclass
class KVCache:
    k: list[torch.Tensor]  # per layer [B, NKV, S, D]
    v: list[torch.Tensor]
    valid: torch.Tensor  # [B, S] bool: column holds a real (not padding) token
    length: int = 0  # columns filled

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v [B, NKV, T, D] at column `length`; return the layer's keys and values so far.
        The cache owns where a step's keys go, so other layouts (the serving loop's per-slot cache) plug in here."""
        s0, t = self.length, k.shape[2]
        self.k[layer][:, :, s0:s0 + t] = k
        self.v[layer][:, :, s0:s0 + t] = v
        return self.k[layer][:, :, :s0 + t], self.v[layer][:, :, :s0 + t]


# QUANTKIT_ATTN_QUANT=0: the single-token attention launch leaves its output unquantized and a block-FP8 o_proj
# quantizes it (in its GEMM at one token, in a launch of its own from two): the path before decode_attend handed o_proj
# the launch's own quantization, kept for comparing the two on a GPU
ATTN_QUANT = os.environ.get("QUANTKIT_ATTN_QUANT", "1") != "0"


def decode_attend(cache, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, kv_heads: int,
                  qk_norm: tuple, consumer: nn.Module | None = None) -> torch.Tensor | None:
    """A single-token step's attention in one launch where the cache has that path (SlotCache.decode_attention):
    q [B, 1, heads*D], k, v [B, 1, kv_heads*D] as projected, the QK-norm and rotary (qk_norm = (wq, wk, cos [B, half],
    sin, eps[, rq, rk])) done inside -> [B, 1, heads*D]; None where it does not apply (the caller attends itself).
    Where the output's consumer (o_proj) is a block-FP8 GEMM whose activation group is a head (act_group = D) and q
    is 16-bit, the launch also quantizes the output, which it then carries (FP8_INPUT)."""
    one = getattr(cache, "decode_attention", None)
    B, T, W = q.shape
    if one is None or T != 1:
        return None
    D = W // heads
    group = D if ATTN_QUANT and act_group(consumer) == D and q.dtype in (torch.bfloat16, torch.float16) else 0
    out = one(layer, q.view(B, heads, D), k.view(B, kv_heads, D), v.view(B, kv_heads, D), D ** -0.5,
              qk_norm=qk_norm, quant_group=group)
    if out is None:
        return None
    out, act = out if group else (out, None)
    out = out.view(B, T, W)
    if act is not None:
        setattr(out, FP8_INPUT, act)  # [B, heads * D] codes, [B, heads] scales: out's rows
    return out


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
           scale: float) -> torch.Tensor:
    """SDPA of q [B, NH, T, D] over the cache's keys and values [B, NKV, C, D] under the step's mask."""
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)


class Attention(nn.Module):
    def __init__(self, cfg: MiniMaxM2Config):
        super().__init__()
        self.cfg = cfg
        h, q, kv = cfg.hidden_size, cfg.q_width, cfg.kv_width
        self.q_proj = nn.Linear(h, q, bias=False)
        self.k_proj = nn.Linear(h, kv, bias=False)
        self.v_proj = nn.Linear(h, kv, bias=False)
        self.o_proj = nn.Linear(q, h, bias=False)
        self.q_norm = nn.Parameter(torch.ones(q))
        self.k_norm = nn.Parameter(torch.ones(kv))
        self.qkv_proj: nn.Module | None = None  # set by fuse_qkv in place of the three

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv_proj is not None:
            return self.qkv_proj(x).split(self.qkv_widths, -1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, layer: int,
                mask: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        NH, NKV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        out = decode_attend(cache, layer, q, k, v, NH, NKV,
                            (self.q_norm, self.k_norm, cos[:, 0], sin[:, 0], cfg.rms_norm_eps), self.o_proj)
        if out is not None:  # QK-norm, rotary, cache write and attention in one launch
            return self.o_proj(out)
        # [B, NH, T, D]: the QK-norm spans all heads at once, then rotary per head
        q, k = norm_rope_qk(q, k, self.q_norm, self.k_norm, cos, sin, NH, NKV, cfg.rms_norm_eps)
        v = v.view(B, T, NKV, D).transpose(1, 2)
        out = attend(q, *cache.update(layer, k, v), mask, D ** -0.5)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, cfg.q_width))


def fuse_linears(mods: list[nn.Module]) -> nn.Module | None:
    """One module whose output is mods' outputs side by side for the same input: one GEMM (and, for FP8, one
    activation quantization) instead of several. Built by concatenating their weights, which the caller then drops,
    so no weight is held twice. None where it cannot be: mixed types, a bias, or a format without `cat` (GGUF)."""
    kind = type(mods[0])
    if any(type(m) is not kind for m in mods):
        return None
    if kind is nn.Linear:
        if any(m.bias is not None for m in mods) or len({m.in_features for m in mods}) != 1:
            return None
        w = torch.cat([m.weight.detach() for m in mods])
        with torch.device("meta"):
            fused = nn.Linear(w.shape[1], w.shape[0], bias=False)
        fused.weight = nn.Parameter(w, requires_grad=False)
        return fused
    cat = getattr(kind, "cat", None)  # Fp8Linear.cat, AwqLinear.cat
    return cat(mods) if cat is not None else None


def fuse_qkv(model: nn.Module) -> int:
    """Each layer's q/k/v projections as one (Attention.qkv), where fuse_linears can; returns how many layers."""
    done = 0
    for block in model.layers:
        att = block.self_attn
        if att.qkv_proj is not None:
            continue
        parts = [att.q_proj, att.k_proj, att.v_proj]
        fused = fuse_linears(parts)
        if fused is not None:
            att.qkv_widths = [m.out_features for m in parts]
            att.qkv_proj = fused
            att.q_proj = att.k_proj = att.v_proj = None
            done += 1
    return done


class DenseExperts(nn.Module):
    """Experts in a floating-point dtype, computed expert by expert over the tokens routed to each."""

    def __init__(self, cfg: MiniMaxM2Config):
        super().__init__()
        e, h, i = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        self.w1 = nn.Parameter(torch.zeros(e, i, h))  # gate_proj
        self.w3 = nn.Parameter(torch.zeros(e, i, h))  # up_proj
        self.w2 = nn.Parameter(torch.zeros(e, h, i))  # down_proj

    def forward(self, h: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """h [N, H], idx and w [N, K] -> [N, H]; ids < 0 route the slot nowhere (experts held by another rank)"""
        out = torch.zeros_like(h)
        for e in idx.unique().tolist():
            if e < 0:
                continue
            rows, slot = (idx == e).nonzero(as_tuple=True)
            x = h[rows]
            y = (F.silu(x @ self.w1[e].t()) * (x @ self.w3[e].t())) @ self.w2[e].t()
            out.index_add_(0, rows, y * w[rows, slot, None].to(y.dtype))
        return out


# tokens up to which a GPU routes with fused_ops.router: one token (an H200: 6.9 us against 9.9 for the three
# kernels it replaces); at 4 tokens its CUDA-core variant took 19 us against 17, at 32 its tensor-core one 125 against
# 19 (evals/results/w4a16_linear-2026-12-05-NVIDIA_H200/)
ROUTER_ONE_LAUNCH_ROWS = 1
# QUANTKIT_NORM_IN_ROUTER=1: a single-token step's post-attention add + RMSNorm runs inside that router launch
# (fused_ops.add_rms_norm_router), one launch a layer fewer. Off by default: on an H100 a 4-layer FP8 decode chain took
# 94.95 us a layer with it and 94.7 without (two runs each, scripts/bench_pdl_chain.py; BENCHMARKS.md)
NORM_IN_ROUTER = os.environ.get("QUANTKIT_NORM_IN_ROUTER", "0") == "1"


class MoE(nn.Module):
    """Sigmoid routing in fp32, then the experts (dense reference, or a quantized backend)."""

    def __init__(self, cfg: MiniMaxM2Config):
        super().__init__()
        self.cfg = cfg
        e, h = cfg.num_local_experts, cfg.hidden_size
        self.gate = nn.Parameter(torch.zeros(e, h, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(e, dtype=torch.float32))
        self.experts: nn.Module = DenseExperts(cfg)

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [N, H] -> (expert ids [N, K], weights [N, K] fp32)."""
        from quantkit.kernels import fused_ops

        k = self.cfg.num_experts_per_tok
        if h.shape[0] <= ROUTER_ONE_LAUNCH_ROWS and _fused(h) and _fused(self.gate, self.bias) \
                and self.gate.dtype == torch.float32:
            # decode: the fp32 logits and the top-k in one launch instead of a cast, a GEMV and the top-k
            return fused_ops.router(h, self.gate, self.bias, k)
        logits = h.float() @ self.gate.float().t()  # [N, E], fp32 as vLLM and SGLang compute it
        # sigmoid, bias, top-k and the renormalisation: one kernel on a GPU
        run = fused_ops.route_topk if _fused(logits) else fused_ops.route_topk_ref
        return run(logits, self.bias, k)

    def forward(self, h: torch.Tensor, routing: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """h [..., H] -> [..., H]; routing: (ids, weights) of h's rows made already (the norm-and-router launch)."""
        shape = h.shape
        act = getattr(h, FP8_INPUT, None)
        h = h.reshape(-1, shape[-1])
        if act is not None:
            setattr(h, FP8_INPUT, act)  # the same rows
        idx, w = self.route(h) if routing is None else routing
        return self.experts(h, idx, w).view(shape)

    def norm_in_router(self, x: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, group: int) -> bool:
        """Whether fused_ops.add_rms_norm_router serves this step's post-attention norm and routing: one token on
        a GPU, the gate fp32, a row it takes, and no hooks on this module (teacher forcing feeds its input)."""
        h = x.shape[-1]
        return NORM_IN_ROUTER and x.numel() == h and a.shape == x.shape and h % 128 == 0 and h <= 8192 \
            and (not group or h % group == 0) and _fused(x, a, weight) and _fused(self.gate, self.bias) \
            and self.gate.dtype == torch.float32 and not (self._forward_pre_hooks or self._forward_hooks)


class Block(nn.Module):
    def __init__(self, cfg: MiniMaxM2Config):
        super().__init__()
        self.input_layernorm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.post_attention_layernorm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.self_attn = Attention(cfg)
        self.moe = MoE(cfg)
        self.eps = cfg.rms_norm_eps

    def forward(self, x, cos, sin, cache, layer, mask, residual=None, defer=False):
        """x -> x + attention + MoE. residual: the previous layer's MoE output not yet added to x (its add is done by
        this layer's input norm, in the same launch); defer: return (x + attention, MoE output) and leave that add
        to the next norm. The same bits either way: the add rounds to x's dtype before the norm reads it."""
        from quantkit.kernels import fused_ops

        group = act_group(getattr(self.self_attn, "qkv_proj", None))
        ins = (x,) if residual is None else (x, residual)
        if group and x.shape[-1] % group == 0 and all(t.shape == x.shape for t in ins) and \
                _fused(*ins, self.input_layernorm):
            if residual is None:
                y, yq, ys = fused_ops.rms_norm_fp8(x, self.input_layernorm, self.eps, group)
            else:
                x, y, yq, ys = fused_ops.add_rms_norm_fp8(x, residual, self.input_layernorm, self.eps, group)
            setattr(y, FP8_INPUT, (yq, ys))
        elif residual is None:
            y = rms_norm(x, self.input_layernorm, self.eps)
        else:
            x, y = add_rms_norm(x, residual, self.input_layernorm, self.eps)
        a = self.self_attn(y, cos, sin, cache, layer, mask)
        group = act_group(self.moe.experts)
        routing = None
        if self.moe.norm_in_router(x, a, self.post_attention_layernorm, group):
            x, h, hq, hs, *routing = fused_ops.add_rms_norm_router(x, a, self.post_attention_layernorm, self.eps,
                                                                  self.moe.gate, self.moe.bias,
                                                                  self.moe.cfg.num_experts_per_tok, group)
            if hq is not None:
                setattr(h, FP8_INPUT, (hq, hs))
        elif group and _fused(x, a, self.post_attention_layernorm) and x.shape == a.shape and \
                x.shape[-1] % group == 0:
            x, h, hq, hs = fused_ops.add_rms_norm_fp8(x, a, self.post_attention_layernorm, self.eps, group)
            setattr(h, FP8_INPUT, (hq, hs))
        else:
            x, h = add_rms_norm(x, a, self.post_attention_layernorm, self.eps)
        out = self.moe(h, routing)
        return (x, out) if defer else x + out


def run_layers(layers, x, cos, sin, cache, mask, indices, hidden: list | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The decoder layers `indices` over x; the last one's residual add is left to the caller's final norm
    (returns (x, pending MoE output or None)). hidden, when given, receives each layer's output (adds not deferred)."""
    res = None
    for i in indices:
        if hidden is not None:
            x = layers[i](x, cos, sin, cache, i, mask)
            hidden.append(x)
        else:
            x, res = layers[i](x, cos, sin, cache, i, mask, residual=res, defer=True)
    return x, res


def final_norm(x: torch.Tensor, res: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm(x + res) (res None: of x), the pending residual add in the norm's launch."""
    return rms_norm(x, weight, eps) if res is None else add_rms_norm(x, res, weight, eps)[1]


class MiniMaxM2(nn.Module):
    def __init__(self, cfg: MiniMaxM2Config):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        cfg = self.cfg
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        n = cfg.num_hidden_layers
        return KVCache(
            k=[torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n)],
            v=[torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n)],
            valid=torch.zeros(batch, max_len, dtype=torch.bool, device=self.device),
        )

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache, valid: torch.Tensor | None = None,
                hidden: list[torch.Tensor] | None = None) -> torch.Tensor:
        """tokens [B, T] appended to the cache; valid [B, T] marks real tokens (False for left padding).
        hidden, when given, receives each layer's output [B, T, H]."""
        B, T = tokens.shape
        s0 = cache.length
        if s0 + T > cache.capacity:
            raise ValueError(f"KV cache holds {cache.capacity} positions; {s0 + T} needed")
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=tokens.device)
        cache.valid[:, s0:s0 + T] = valid
        positions = (cache.valid[:, :s0 + T].long().cumsum(-1) - 1).clamp(min=0)[:, s0:]  # [B, T]
        cos, sin = rope_tables(positions, self.cfg.rotary_dim, self.cfg.rope_theta)
        cos, sin = cos.to(tokens.device), sin.to(tokens.device)
        cols = torch.arange(s0 + T, device=tokens.device)
        causal = cols[None, :] <= (s0 + torch.arange(T, device=tokens.device))[:, None]  # [T, S]
        mask = causal[None] & cache.valid[:, None, :s0 + T]
        mask |= cols[None, None, :] == (s0 + torch.arange(T, device=tokens.device))[None, :, None]  # pads see self
        x = self.embed_tokens(tokens)
        mask = attn_bias(mask[:, None], x.dtype)  # [B, 1, T, S]
        x, res = run_layers(self.layers, x, cos, sin, cache, mask, range(len(self.layers)), hidden)
        cache.length = s0 + T
        return self.lm_head(final_norm(x, res, self.norm, self.cfg.rms_norm_eps))


def checkpoint_fp8_scheme(reader: CheckpointReader) -> str | None:
    return "block" if reader.block else "channel" if reader.channel_fp8 else None


def load_model(folder: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
               reader: CheckpointReader | None = None, backend: str = "dense",
               parallel: ParallelSpec | None = None) -> MiniMaxM2:
    """Build the model and fill it from a checkpoint through the reader.

    backend "dense": every weight in `dtype` (FP8 dequantized on read). "fp8": attention projections and experts
    stay in FP8 as stored and run W8A8 (an FP8 checkpoint is required). "awq": packed INT4 weights (AutoAWQ or
    compressed-tensors pack-quantized) stay packed and run W4A16 (quantkit/runtime/awq.py). "auto": fp8 for FP8
    checkpoints, awq for INT4 ones.
    parallel: this rank's place in a tensor/expert-parallel run (default: the one set up in this process, if any);
    the rank then reads only its slice (quantkit/runtime/parallel.py). At world size 1 it changes nothing.
    A .gguf file (any split of one, or a folder holding one) loads through quantkit/runtime/gguf.py: backend "gguf"
    or "auto" keeps its Q8_0/Q4_K/Q5_K/Q6_K blocks as stored, "dense" dequantizes them.
    """
    from quantkit.runtime.gguf import find_gguf

    gguf_path = find_gguf(folder) if reader is None else None  # a .gguf file, or a folder holding one GGUF model
    if gguf_path is not None or backend == "gguf":
        from quantkit.runtime.gguf import load_gguf_model

        if gguf_path is None:
            raise QuantkitError(f"{folder}: the gguf backend needs a GGUF file (a .gguf path, or a folder holding one)")
        if backend not in ("auto", "gguf", "dense"):
            raise QuantkitError(f"{gguf_path}: a GGUF file runs on the gguf backend (or dense), not {backend!r}")
        from quantkit.runtime import parallel as par

        spec = parallel or par.active_spec()
        if spec is not None and spec.world > 1:
            from quantkit.runtime.gguf import load_gguf_sharded

            return load_gguf_sharded(gguf_path, dtype, device, spec, dense=backend == "dense")
        return load_gguf_model(gguf_path, dtype=dtype, device=device, dense=backend == "dense")
    from quantkit.formats.awq import open_awq_reader  # INT4 checkpoints store packed tensors where others hold .weight

    reader = reader or open_awq_reader(folder) or CheckpointReader(folder)
    cfg = reader.config
    scheme = checkpoint_fp8_scheme(reader)
    int4 = getattr(reader, "awq", None) is not None
    if backend == "auto":
        backend = "fp8" if scheme else "awq" if int4 else "dense"
    if backend == "fp8" and scheme is None:
        raise QuantkitError(f"{reader.folder}: the fp8 backend needs an FP8 checkpoint (block or channel scales)")
    if backend == "awq" and not int4:
        raise QuantkitError(f"{reader.folder}: the awq backend needs an AWQ checkpoint (AutoAWQ or compressed-tensors "
                            f"pack-quantized INT4)")
    if backend not in ("dense", "fp8", "awq"):
        raise QuantkitError(f"backend {backend!r}: choose dense, fp8, awq or auto")
    from quantkit.runtime import parallel as par

    parallel = parallel or par.active_spec()
    if parallel is not None and parallel.world > 1:
        return par.load_sharded(reader, dtype, device, backend, parallel)
    with torch.device("meta"):
        model = MiniMaxM2(cfg)
        if backend == "fp8":
            from quantkit.runtime.fp8 import Fp8Experts, Fp8Linear

            h, q, kv = cfg.hidden_size, cfg.q_width, cfg.kv_width
            for block in model.layers:
                att = block.self_attn
                att.q_proj, att.k_proj = Fp8Linear(h, q, scheme), Fp8Linear(h, kv, scheme)
                att.v_proj, att.o_proj = Fp8Linear(h, kv, scheme), Fp8Linear(q, h, scheme)
                block.moe.experts = Fp8Experts(cfg.num_local_experts, h, cfg.intermediate_size, scheme)
        elif backend == "awq":
            from quantkit.runtime.awq import install

            install(model, reader)  # AwqLinear / AwqExperts where the checkpoint stores packed weights
    model = model.to_empty(device=device)
    for p in model.parameters():  # floating-point weights in dtype; FP8 weights and all scales as they are
        if p.dtype == torch.float32:
            p.data = p.data.to(dtype)
    for block in model.layers:  # the router, and FP8 scales, stay fp32 whatever the model dtype
        block.moe.gate.data = block.moe.gate.data.float()
        block.moe.bias.data = block.moe.bias.data.float()
        for mod in block.modules():
            for pname in ("weight_scale", "w13_scale", "w2_scale"):
                if hasattr(mod, pname):
                    getattr(mod, pname).data = getattr(mod, pname).data.float()

    def get(name: str, dt: torch.dtype = dtype) -> torch.Tensor:
        return reader.weight(name, dt).to(device)

    suffix = "_scale_inv" if scheme == "block" else "_scale"

    def raw(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return reader.tensor(name).to(device), reader.tensor(name + suffix).float().to(device)

    with torch.no_grad():
        model.embed_tokens.weight.copy_(get("model.embed_tokens.weight"))
        model.norm.copy_(get("model.norm.weight"))
        head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        model.lm_head.weight.copy_(get(head))
        for n, block in enumerate(model.layers):
            p = f"model.layers.{n}."
            block.input_layernorm.copy_(get(p + "input_layernorm.weight"))
            block.post_attention_layernorm.copy_(get(p + "post_attention_layernorm.weight"))
            att = block.self_attn
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                mod, name = getattr(att, proj), f"{p}self_attn.{proj}.weight"
                if backend == "fp8":
                    w, s = raw(name)
                    mod.weight.copy_(w)
                    mod.weight_scale.copy_(s)
                elif hasattr(mod, "load"):  # AwqLinear
                    mod.load(reader, name)
                else:
                    mod.weight.copy_(get(name))
            att.q_norm.copy_(get(p + "self_attn.q_norm.weight"))
            att.k_norm.copy_(get(p + "self_attn.k_norm.weight"))
            moe = block.moe
            m = p + "block_sparse_moe."
            moe.gate.copy_(get(m + "gate.weight", torch.float32))
            moe.bias.copy_(get(m + "e_score_correction_bias", torch.float32))
            ex = moe.experts
            for e in range(cfg.num_local_experts):
                if backend == "fp8":
                    w1, s1 = raw(f"{m}experts.{e}.w1.weight")
                    w3, s3 = raw(f"{m}experts.{e}.w3.weight")
                    w2, s2 = raw(f"{m}experts.{e}.w2.weight")
                    ex.w13[e].copy_(torch.cat([w1, w3]))
                    ex.w13_scale[e].copy_(torch.cat([s1, s3]))
                    ex.w2[e].copy_(w2)
                    ex.w2_scale[e].copy_(s2)
                elif hasattr(ex, "load_expert"):  # AwqExperts
                    ex.load_expert(reader, e, f"{m}experts.{e}.")
                else:
                    for w in ("w1", "w2", "w3"):
                        getattr(ex, w)[e].copy_(get(f"{m}experts.{e}.{w}.weight"))
    reader.close()
    if torch.device(device).type == "cuda":  # fewer launches per decode step; the CPU keeps the checkpoint's modules
        fuse_qkv(model)
    return model.eval().requires_grad_(False)
