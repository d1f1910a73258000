"""AWQ for MiniMax-M2's mixture of experts (specs/formats.md §3), one decoder layer at a time.

    stream = LayerStream(reader, calibration_tokens(ckpt, None, 128, 512))
    for n in range(cfg.num_hidden_layers):
        res = awq_layer(stream, n, AWQConfig())      # searches, folds and clips layer n; advances the stream
        res.weights["model.layers.0.self_attn.q_proj.weight"]   # scaled and clipped, not yet quantized
        res.report                                   # chosen alphas, losses with and without the scales

Per layer, in this order (AutoAWQ's: every scale first, then clipping on the scaled weights):

1. input_layernorm -> q/k/v: one scale s [H] searched over the duo-scaling grid with the whole attention as the loss
   (QK-norm runs after the projections, so a scale can hurt: the "off" candidate, plain round-to-nearest, competes and
   the lower loss wins). Folded: input_layernorm /= s, q/k/v columns *= s.
2. v -> o: skipped under GQA (v is [kv, H], o is [H, q]: o's input channels are not v's output channels one for one).
3. post_attention_layernorm -> every expert's w1/w3: one scale s [H] shared by all experts, searched with the whole
   MoE block as the loss with routing active. The router reads the un-scaled input: it is computed from the
   original normalized states during the search, and after folding (post_attention_layernorm /= s) its fp32 gate
   columns are multiplied by s, so routing is unchanged up to rounding; the gate stays fp32 and unquantized.
4. w3 -> w2, per expert: s_e [I] from the expert's own routed inputs (an expert with fewer than `min_tokens` routed
   tokens is searched on a sample of all the layer's tokens: pooled, reported). Folded: w3 rows /= s_e, w2 columns
   *= s_e. All experts are searched at once (inputs padded to [E, n, I], batched matmuls).
5. Clipping: per output channel and group, the max |w| shrunk by up to 50% on a 20-point grid, chosen by the error of
   the grouped partial products on a token sample; q and k are skipped (their error passes through QK^T).

The pseudo-quantizer is `fake_quant`: the exact arithmetic of quantkit.formats.awq.quantize_groups (asymmetric,
scale rounded to its stored dtype) batched over experts on the device. Hidden states propagate through the original
layer, so each layer's search sees the inputs the unquantized model gives it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from quantkit.calibrate.engine import LayerStream, moe_forward, new_layer_stats
from quantkit.calibrate.stats import ExpertStats
from quantkit.errors import QuantkitError
from quantkit.runtime.model import rms_norm

QK_SKIP = ("q_proj", "k_proj")


@dataclass(frozen=True)
class AWQConfig:
    group: int = 128
    zero_point: bool = True
    scale_dtype: torch.dtype = torch.float16  # the dtype scales are stored in (AutoAWQ: fp16)
    n_grid: int = 20  # alpha in {0, 1/20, ..., 19/20}
    duo_scaling: bool = True  # s = x^a / w^(1-a); False: s = x^a (original llm-awq)
    qkv_scale: str = "off"  # off (QK-norm follows q/k: measured better); auto: keep it where it beats rounding; on
    attention: bool = True  # False: attention stays unquantized (no qkv search, no o/v clipping)
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int = 512  # token sample per weight for the clipping search
    expert_tokens: int = 1024  # routed tokens per expert (at most) for the w2 search
    min_tokens: int = 16  # below this an expert's w2 search uses pooled tokens
    expert_chunk: int = 32  # experts fake-quantized at once (bounds the fp32 temporaries)

    def __post_init__(self) -> None:
        if self.qkv_scale not in ("auto", "on", "off"):
            raise QuantkitError(f"AWQ qkv_scale {self.qkv_scale!r}: choose auto, on or off")
        if self.group < 8 or self.group % 8:
            raise QuantkitError(f"AWQ group size {self.group}: must be a positive multiple of 8")


@dataclass
class LayerResult:
    weights: dict[str, torch.Tensor]  # full-precision tensors, scaled and clipped; quantize the linear ones
    report: dict = field(default_factory=dict)


# ---- the pseudo-quantizer and the scale grid ---------------------------------------------------------------------


def fake_quant(w: torch.Tensor, group: int = 128, zero_point: bool = True,
               scale_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Quantize-dequantize w [..., out, in] per group of `group` input channels; fp32 out. Same arithmetic as
    quantkit.formats.awq.quantize_groups followed by dequantize_groups."""
    shape = w.shape
    x = w.float().reshape(*shape[:-1], shape[-1] // group, group)
    if zero_point:
        mx, mn = x.amax(-1, keepdim=True), x.amin(-1, keepdim=True)
        s = ((mx - mn).clamp(min=1e-5) / 15).to(scale_dtype).float()
        z = (-torch.round(mn / s)).clamp_(0, 15)
        q = (torch.round(x / s) + z).clamp_(0, 15)
        return ((q - z) * s).reshape(shape)
    s = (x.abs().amax(-1, keepdim=True).clamp(min=1e-5) / 7).to(scale_dtype).float()
    return (torch.round(x / s).clamp_(-8, 7) * s).reshape(shape)


def weight_mean(w: torch.Tensor, group: int) -> torch.Tensor:
    """w [..., rows, in] -> [..., in]: |w| normalized by its group's max |w|, averaged over the rows."""
    shape = w.shape
    g = w.float().abs().reshape(*shape[:-1], shape[-1] // group, group)
    g = g / g.amax(-1, keepdim=True).clamp(min=1e-12)
    return g.reshape(shape).mean(-2)


def grid_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, n_grid: int):
    """(alpha, s) for each grid point; x_mean and w_mean [..., C]; s normalized so that max*min = 1 per row."""
    x_mean = x_mean.float()
    for i in range(n_grid):
        a = i / n_grid
        if w_mean is not None:
            s = (x_mean.pow(a) / (w_mean.float().pow(1 - a) + 1e-4)).clamp(min=1e-4)
        else:
            s = x_mean.pow(a).clamp(min=1e-4)
        s = s / (s.amax(-1, keepdim=True) * s.amin(-1, keepdim=True)).sqrt()
        s = torch.where(torch.isfinite(s), s, torch.ones_like(s))
        yield a, s


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).pow(2).mean())


# ---- clipping ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, cfg: AWQConfig, oc_chunk: int = 128) -> torch.Tensor:
    """Best max |w| per output channel and group: w [B, out, in], x [B, n, in] (zero rows allowed: padding).
    Returns [B, out, in/g]. Error: squared error of the per-group partial products x_g . w_g over the tokens."""
    B, out_f, in_f = w.shape
    g = cfg.group
    G = in_f // g
    xg = x.float().reshape(B, -1, G, g).permute(0, 2, 1, 3)  # [B, G, n, g]
    best_max = torch.empty(B, out_f, G, device=w.device)
    steps = int(cfg.max_shrink * cfg.clip_grid)
    for lo in range(0, out_f, oc_chunk):
        wc = w[:, lo:lo + oc_chunk].float()  # [B, oc, in]
        oc = wc.shape[1]
        wgroups = wc.reshape(B, oc, G, g)
        org_max = wgroups.abs().amax(-1, keepdim=True)  # [B, oc, G, 1]
        ref = xg @ wgroups.permute(0, 2, 3, 1)  # [B, G, n, oc]
        best_err = torch.full((B, G, oc), float("inf"), device=w.device)
        best = org_max.squeeze(-1).clone()  # [B, oc, G]
        for i in range(steps):
            mv = org_max * (1 - i / cfg.clip_grid)
            q = fake_quant(wgroups.clamp(-mv, mv).reshape(B, oc, in_f), g, cfg.zero_point, cfg.scale_dtype)
            err = (xg @ q.reshape(B, oc, G, g).permute(0, 2, 3, 1) - ref).pow(2).mean(2)  # [B, G, oc]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better.transpose(1, 2), mv.squeeze(-1), best)
        best_max[:, lo:lo + oc] = best
    return best_max


def apply_clip(w: torch.Tensor, max_val: torch.Tensor, group: int) -> None:
    """Clamp w [B, out, in] in place to +-max_val [B, out, in/g] per group."""
    B, out_f, in_f = w.shape
    v = w.view(B, out_f, in_f // group, group)
    m = max_val.to(w.dtype)[..., None]
    torch.maximum(torch.minimum(v, m), -m, out=v)


def _token_sample(x: torch.Tensor, n: int) -> torch.Tensor:
    """At most n rows of x [M, C], evenly spread (deterministic)."""
    if x.shape[0] <= n:
        return x
    idx = torch.linspace(0, x.shape[0] - 1, n, device=x.device).round().long()
    return x[idx]


# ---- experts -----------------------------------------------------------------------------------------------------


class Routing:
    """The routed rows of each expert, computed once per layer from the fp32 router."""

    def __init__(self, idx: torch.Tensor, w: torch.Tensor, experts: int):
        self.idx, self.w, self.experts = idx, w, experts
        self.groups = []
        for e in idx.unique().tolist():
            rows, slot = (idx == e).nonzero(as_tuple=True)
            self.groups.append((e, rows, w[rows, slot, None]))
        self.count = torch.bincount(idx.flatten(), minlength=experts)


def experts_forward(h: torch.Tensor, routing: Routing, w1: torch.Tensor, w3: torch.Tensor,
                    w2: torch.Tensor) -> torch.Tensor:
    """Routed experts on h [M, H] with the given stacked weights ([E, I, H], [E, I, H], [E, H, I])."""
    out = torch.zeros_like(h)
    for e, rows, wt in routing.groups:
        x = h[rows]
        y = (F.silu(x @ w1[e].t()) * (x @ w3[e].t())) @ w2[e].t()
        out.index_add_(0, rows, y * wt.to(y.dtype))
    return out


def _fq_stack(w: torch.Tensor, s: torch.Tensor, cfg: AWQConfig, dtype: torch.dtype) -> torch.Tensor:
    """Q(w * s) / s for stacked w [E, out, in], s [in] or [E, in]; chunked over experts; result in dtype."""
    out = torch.empty(w.shape, dtype=dtype, device=w.device)
    s3 = s.float().reshape(-1 if s.dim() == 2 else 1, 1, w.shape[-1])
    for lo in range(0, w.shape[0], cfg.expert_chunk):
        sc = s3[lo:lo + cfg.expert_chunk] if s3.shape[0] > 1 else s3
        out[lo:lo + cfg.expert_chunk] = fake_quant(w[lo:lo + cfg.expert_chunk].float() * sc, cfg.group,
                                                   cfg.zero_point, cfg.scale_dtype) / sc
    return out


def _padded_inputs(h: torch.Tensor, routing: Routing, cap: int, min_tokens: int
                   ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Per expert at most `cap` of its routed rows of h [M, H], zero-padded: [E, cap, H], the rows used [E], and the
    experts that fell back to the pooled sample (fewer than min_tokens routed rows)."""
    E = routing.experts
    n = min(cap, h.shape[0])
    out = torch.zeros(E, n, h.shape[1], dtype=h.dtype, device=h.device)
    used = torch.zeros(E, dtype=torch.long)
    pooled = _token_sample(h, n)
    fallback = []
    have = {e: rows for e, rows, _ in routing.groups}
    for e in range(E):
        rows = have.get(e)
        if rows is None or rows.numel() < max(1, min_tokens):
            out[e, :pooled.shape[0]] = pooled
            used[e] = pooled.shape[0]
            fallback.append(e)
        else:
            r = _token_sample(h[rows], n)
            out[e, :r.shape[0]] = r
            used[e] = r.shape[0]
    return out, used, fallback


# ---- one layer -------------------------------------------------------------------------------------------------


@torch.no_grad()
def awq_layer(stream: LayerStream, n: int, cfg: AWQConfig = AWQConfig(),
              x_means: dict[str, ExpertStats] | None = None) -> LayerResult:
    """Search, fold and clip layer n (stream.x must hold its input); advance the stream through the original layer.

    x_means: statistics to take the activation means from (a saved statistics file); by default they are measured
    on the calibration tokens here."""
    if stream.layer != n:
        stream.skip_to(n)
    block = stream.load(n)
    mcfg = stream.cfg
    E, H = mcfg.num_local_experts, mcfg.hidden_size
    dtype = stream.dtype
    att, moe, ex = block.self_attn, block.moe, block.moe.experts
    report: dict = {"layer": n}

    # Pass 1, original weights: attention outputs (the qkv loss reference), the MoE input of every token, and the
    # next layer's input.
    stats = new_layer_stats(mcfg, stream.device)
    o_inputs: list[torch.Tensor] = []
    hook = att.o_proj.register_forward_pre_hook(lambda _m, a: o_inputs.append(a[0].reshape(-1, a[0].shape[-1])))
    attn_ref, x1_all, v_samples = [], [], []
    per_batch = -(-cfg.clip_tokens // -(-stream.x.shape[0] // stream.micro_batch))
    try:
        for _, x in stream.batches():
            xn = rms_norm(x, block.input_layernorm, block.eps)
            stats["qkv"].add(xn)
            v_samples.append(_token_sample(xn.reshape(-1, H), per_batch))
            a = stream.attention(block, xn)
            attn_ref.append(a.to(stream.store))
            x1_all.append((x + a).to(stream.store))
    finally:
        hook.remove()
    v_sample = torch.cat(v_samples)
    o_in = torch.cat(o_inputs)
    stats["o"].add(o_in)
    o_sample = _token_sample(o_in, cfg.clip_tokens)
    o_inputs, o_in = [], None  # the hook's list: emptied, not deleted
    x1 = torch.cat(x1_all)
    del x1_all
    h = rms_norm(x1.to(stream.device), block.post_attention_layernorm, block.eps).reshape(-1, H)  # [M, H]
    moe_ref = moe_forward(moe, h, stats)  # statistics for the means, and the MoE loss reference
    stream.x = (x1.to(stream.device).reshape(-1, H) + moe_ref).view_as(x1).to(stream.store)
    del x1
    means = x_means or stats
    idx, wts = moe.route(h)
    routing = Routing(idx, wts, E)

    # 1. input_layernorm -> q/k/v
    qkv = (att.q_proj, att.k_proj, att.v_proj)
    s_attn = None
    if cfg.attention and cfg.qkv_scale != "off":
        orig = [m.weight.clone() for m in qkv]
        x_mean = means["qkv"].mean_abs()[0].to(stream.device)
        w_mean = weight_mean(torch.cat(orig), cfg.group) if cfg.duo_scaling else None

        def attn_loss(s: torch.Tensor | None) -> float:
            for m, w0 in zip(qkv, orig):
                if s is None:
                    m.weight.copy_(fake_quant(w0, cfg.group, cfg.zero_point, cfg.scale_dtype))
                else:
                    m.weight.copy_(fake_quant(w0.float() * s, cfg.group, cfg.zero_point, cfg.scale_dtype) / s)
            total = 0.0
            for (_, x), ref in zip(stream.batches(), attn_ref):
                a = stream.attention(block, rms_norm(x, block.input_layernorm, block.eps))
                total += float((a.float() - ref.to(a.device).float()).pow(2).sum())
            return total / (sum(r.numel() for r in attn_ref))

        loss_off = attn_loss(None)
        best = (float("inf"), None, None)
        for a, s in grid_scales(x_mean, w_mean, cfg.n_grid):
            loss = attn_loss(s)
            if loss < best[0]:
                best = (loss, a, s)
        for m, w0 in zip(qkv, orig):
            m.weight.copy_(w0)
        use = cfg.qkv_scale == "on" or best[0] < loss_off
        report["qkv"] = {"alpha": best[1], "loss_scaled": best[0], "loss_rtn": loss_off, "applied": use}
        if use:
            s_attn = best[2]
            block.input_layernorm.copy_((block.input_layernorm.float() / s_attn).to(dtype))
            for m in qkv:
                m.weight.copy_((m.weight.float() * s_attn).to(dtype))
        del orig
    attn_ref = []
    report["v_o"] = "skipped: GQA (v_proj's outputs are not o_proj's inputs one for one)"

    # 3. post_attention_layernorm -> all experts' w1/w3, the whole MoE as the loss, routing fixed by the fp32 router
    x_mean = means["w13"].pooled()[1].to(stream.device) / max(means["w13"].pooled()[0], 1)
    w_mean = None
    if cfg.duo_scaling:
        w_mean = (weight_mean(ex.w1, cfg.group).sum(0) + weight_mean(ex.w3, cfg.group).sum(0)) / (2 * E)
    w1q = torch.empty_like(ex.w1)
    w3q = torch.empty_like(ex.w3)

    def moe_loss(s: torch.Tensor | None) -> float:
        one = torch.ones(H, device=stream.device)
        w1q.copy_(_fq_stack(ex.w1, one if s is None else s, cfg, dtype))
        w3q.copy_(_fq_stack(ex.w3, one if s is None else s, cfg, dtype))
        return _mse(experts_forward(h, routing, w1q, w3q, ex.w2), moe_ref)

    loss_rtn = moe_loss(None)
    best = (loss_rtn, None, None)
    for a, s in grid_scales(x_mean, w_mean, cfg.n_grid):
        loss = moe_loss(s)
        if loss < best[0]:
            best = (loss, a, s)
    w1q = w3q = None  # noqa: F841  # freed before the w2 search
    report["w13"] = {"alpha": best[1], "loss_scaled": best[0], "loss_rtn": loss_rtn, "applied": best[2] is not None}
    s13 = best[2]
    if s13 is not None:
        block.post_attention_layernorm.copy_((block.post_attention_layernorm.float() / s13).to(dtype))
        moe.gate.mul_(s13[None].to(moe.gate.dtype))  # fp32 router: h/s . (gate*s) = h . gate
        for w in (ex.w1, ex.w3):
            for lo in range(0, E, cfg.expert_chunk):
                w[lo:lo + cfg.expert_chunk] = (w[lo:lo + cfg.expert_chunk].float() * s13).to(dtype)

    # 4. w3 -> w2 per expert, all experts at once on padded routed inputs
    h_e, used, fallback = _padded_inputs(h, routing, cfg.expert_tokens, cfg.min_tokens)  # [E, n, H] original scale
    A = torch.empty(E, h_e.shape[1], mcfg.intermediate_size, dtype=dtype, device=stream.device)
    hs = h_e if s13 is None else (h_e.float() / s13).to(dtype)
    for lo in range(0, E, cfg.expert_chunk):
        sl = slice(lo, lo + cfg.expert_chunk)
        A[sl] = F.silu(hs[sl] @ ex.w1[sl].transpose(1, 2)) * (hs[sl] @ ex.w3[sl].transpose(1, 2))  # [c, n, I]
    ref2 = torch.bmm(A, ex.w2.transpose(1, 2))  # [E, n, H]
    denom = (used.to(stream.device).clamp(min=1) * H).double()
    stats["w2"].mark_fallback(cfg.min_tokens)  # starved experts: pooled means, as their search uses pooled tokens
    x_mean2 = means["w2"].mean_abs().to(stream.device)  # [E, I]
    w_mean2 = weight_mean(ex.w2, cfg.group) if cfg.duo_scaling else None
    best_loss = torch.full((E,), float("inf"), dtype=torch.float64, device=stream.device)
    best_s = torch.ones(E, mcfg.intermediate_size, device=stream.device)
    best_a = torch.full((E,), -1.0)

    def w2_losses(s: torch.Tensor) -> torch.Tensor:
        """Per-expert MSE of w2's output with Q(w2 s)/s; a chunk of experts at a time (bounded temporaries)."""
        out = torch.empty(E, dtype=torch.float64, device=stream.device)
        for lo in range(0, E, cfg.expert_chunk):
            sl = slice(lo, lo + cfg.expert_chunk)
            w2q = _fq_stack(ex.w2[sl], s[sl], cfg, dtype)
            err = torch.bmm(A[sl], w2q.transpose(1, 2)).float().sub_(ref2[sl].float())
            out[sl] = err.square_().sum((1, 2)).double()
        return out / denom

    rtn2 = w2_losses(torch.ones(E, mcfg.intermediate_size, device=stream.device))
    best_loss.copy_(rtn2)
    for a, s in grid_scales(x_mean2, w_mean2, cfg.n_grid):
        loss = w2_losses(s)
        better = loss < best_loss
        best_loss = torch.where(better, loss, best_loss)
        best_s[better] = s[better]
        best_a[better.cpu()] = a
    ref2 = None  # noqa: F841
    report["w2"] = {"alpha": best_a.tolist(), "loss_scaled": float(best_loss.mean()), "loss_rtn": float(rtn2.mean()),
                    "fallback": fallback, "tokens": used.tolist()}
    for lo in range(0, E, cfg.expert_chunk):
        sl = slice(lo, lo + cfg.expert_chunk)
        ex.w3[sl] = (ex.w3[sl].float() / best_s[sl, :, None]).to(dtype)
        ex.w2[sl] = (ex.w2[sl].float() * best_s[sl, None, :]).to(dtype)
    A = (A.float() / best_s[:, None, :]).to(dtype)  # the w2 inputs in the folded model

    # 5. clipping on the scaled weights (q and k skipped)
    if cfg.clip:
        clip_report = {}
        hs = _token_sample(h, cfg.clip_tokens)
        if cfg.attention:
            xv = v_sample if s_attn is None else (v_sample.float() / s_attn).to(dtype)
            clip_inputs = {"v_proj": xv, "o_proj": o_sample}
            for name, xin in clip_inputs.items():
                m = getattr(att, name)
                mv = search_clip(m.weight[None], xin[None], cfg)
                apply_clip(m.weight.data[None], mv, cfg.group)
            clip_report["attention"] = ["v_proj", "o_proj"]
        n_tok = min(cfg.clip_tokens, h_e.shape[1])
        he = (h_e[:, :n_tok].float() / (s13 if s13 is not None else 1.0)).to(dtype)
        ae = A[:, :n_tok]
        for lo in range(0, E, cfg.expert_chunk):
            sl = slice(lo, lo + cfg.expert_chunk)
            for w, xin in ((ex.w1, he), (ex.w3, he), (ex.w2, ae)):
                mv = search_clip(w[sl], xin[sl], cfg)
                apply_clip(w.data[sl], mv, cfg.group)
        clip_report["experts"] = ["w1", "w3", "w2"]
        report["clip"] = clip_report
    return LayerResult(layer_weights(block, n, mcfg.num_local_experts), report)


def layer_weights(block, n: int, experts: int) -> dict[str, torch.Tensor]:
    """The block's tensors under their checkpoint names (experts as views of the stacked weights)."""
    p, m = f"model.layers.{n}.", f"model.layers.{n}.block_sparse_moe."
    att = block.self_attn
    out = {
        p + "input_layernorm.weight": block.input_layernorm,
        p + "post_attention_layernorm.weight": block.post_attention_layernorm,
        p + "self_attn.q_norm.weight": att.q_norm,
        p + "self_attn.k_norm.weight": att.k_norm,
        m + "gate.weight": block.moe.gate,
        m + "e_score_correction_bias": block.moe.bias,
    }
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        out[f"{p}self_attn.{proj}.weight"] = getattr(att, proj).weight
    ex = block.moe.experts
    for e in range(experts):
        for w in ("w1", "w2", "w3"):
            out[f"{m}experts.{e}.{w}.weight"] = getattr(ex, w)[e]
    return {k: v.detach() for k, v in out.items()}


def rtn_layer(stream: LayerStream, n: int) -> LayerResult:
    """The baseline: layer n's weights as they are (round-to-nearest happens at quantization); advances the stream."""
    if stream.layer != n:
        stream.skip_to(n)
    block = stream.load(n)
    stream.advance()
    return LayerResult(layer_weights(block, n, stream.cfg.num_local_experts), {"layer": n, "method": "rtn"})


def relative_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    den = float(b.float().norm())
    return float((a.float() - b.float()).norm()) / den if den > 0 else math.nan


# ---- whole models in memory (evidence and comparison scripts; a real conversion streams through plan.py) --------


def quantized_linear_names(cfg, attention: bool = True) -> list[str]:
    names = []
    for n in range(cfg.num_hidden_layers):
        if attention:
            names += [f"model.layers.{n}.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [f"model.layers.{n}.block_sparse_moe.experts.{e}.{w}.weight"
                  for e in range(cfg.num_local_experts) for w in ("w1", "w2", "w3")]
    return names


@torch.no_grad()
def set_layer_weights(model, weights: dict[str, torch.Tensor]) -> None:
    """Copy checkpoint-named layer tensors (as awq_layer returns them) into a runtime MiniMaxM2."""
    for name, t in weights.items():
        parts = name.split(".")
        n, block = int(parts[2]), model.layers[int(parts[2])]
        rest = ".".join(parts[3:])
        if rest == "input_layernorm.weight":
            dst = block.input_layernorm
        elif rest == "post_attention_layernorm.weight":
            dst = block.post_attention_layernorm
        elif rest in ("self_attn.q_norm.weight", "self_attn.k_norm.weight"):
            dst = getattr(block.self_attn, parts[4])
        elif rest.startswith("self_attn."):
            dst = getattr(block.self_attn, parts[4]).weight
        elif rest == "block_sparse_moe.gate.weight":
            dst = block.moe.gate
        elif rest == "block_sparse_moe.e_score_correction_bias":
            dst = block.moe.bias
        else:  # block_sparse_moe.experts.E.wX.weight
            dst = getattr(block.moe.experts, parts[6])[int(parts[5])]
        if tuple(dst.shape) != tuple(t.shape):
            raise ValueError(f"{name}: shape {list(t.shape)} does not fit layer {n}'s {list(dst.shape)}")
        dst.copy_(t.to(dst.dtype))


@torch.no_grad()
def fake_quantize_model(model, cfg: AWQConfig) -> None:
    """Replace every linear weight AWQ quantizes by its quantize-dequantize (the dense twin of the INT4 model)."""
    for block in model.layers:
        mods = [block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj,
                block.self_attn.o_proj] if cfg.attention else []
        for m in mods:
            m.weight.copy_(fake_quant(m.weight, cfg.group, cfg.zero_point, cfg.scale_dtype).to(m.weight.dtype))
        ex = block.moe.experts
        for w in (ex.w1, ex.w2, ex.w3):
            for e in range(w.shape[0]):
                w[e] = fake_quant(w[e], cfg.group, cfg.zero_point, cfg.scale_dtype).to(w.dtype)


def awq_all_layers(stream: LayerStream, cfg: AWQConfig = AWQConfig(), progress: bool = False
                   ) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """AWQ on every layer, the folded and clipped tensors copied to the CPU (a whole model: small models only)."""
    from tqdm import tqdm

    weights: dict[str, torch.Tensor] = {}
    reports = []
    for n in tqdm(range(stream.cfg.num_hidden_layers), desc="awq", unit="layer", disable=not progress):
        res = awq_layer(stream, n, cfg)
        weights.update({k: v.to("cpu", copy=True) for k, v in res.weights.items()})
        reports.append(res.report)
    return weights, reports
