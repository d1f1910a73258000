"""Fidelity of a quantized checkpoint against its reference, on quantkit's runtime.

    ref, quant = load_model(REF), load_model(QUANT, backend="auto")
    result = fidelity(quant, ref, token_windows(tokenizer, text, window=512))

Per next-token position: KL(reference || quant) of the two distributions, whether their top-1 tokens agree, and the
log-likelihood each assigns to the actual next token (perplexity). Per layer: the relative error of the quant's
hidden state against the reference's, both fed the same tokens, so an error that one layer introduces shows
where it enters. All reductions in fp32/fp64, whatever the models' dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch

from quantkit.errors import QuantkitError
from quantkit.runtime.model import MiniMaxM2

# architecture fields two checkpoints must share for their logits to be compared position by position
SAME_SHAPE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "intermediate_size", "num_local_experts", "num_experts_per_tok", "rotary_dim")


@dataclass
class FidelityResult:
    tokens: int
    kld_mean: float
    kld_p99: float
    kld_max: float
    top1_agreement: float
    ppl_quant: float
    ppl_reference: float
    layer_rel_error: list[float] = field(default_factory=list)  # per layer: ||h_q - h_ref|| / ||h_ref||

    def to_dict(self) -> dict:
        return asdict(self)


def check_comparable(quant: MiniMaxM2, ref: MiniMaxM2) -> None:
    for key in SAME_SHAPE:
        a, b = getattr(quant.cfg, key), getattr(ref.cfg, key)
        if a != b:
            raise QuantkitError(f"--reference: {key} is {b} in the reference but {a} in the model under test; "
                                "fidelity compares checkpoints of one architecture and vocabulary")


def token_windows(ids: list[int], window: int, max_windows: int | None = None) -> list[list[int]]:
    """Consecutive non-overlapping windows of `window` tokens (the last partial one dropped)."""
    if window < 2:
        raise QuantkitError("--window must be at least 2 tokens")
    out = [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)]
    if not out:
        raise QuantkitError(f"evaluation text has {len(ids)} tokens, fewer than one window of {window}")
    return out[:max_windows] if max_windows else out


@torch.inference_mode()
def fidelity(quant: MiniMaxM2, ref: MiniMaxM2, windows: Iterable[list[int]], batch: int = 4) -> FidelityResult:
    check_comparable(quant, ref)
    windows = list(windows)
    klds: list[torch.Tensor] = []
    agree = n = 0
    nll_q = nll_r = 0.0
    layer_num = torch.zeros(quant.cfg.num_hidden_layers, dtype=torch.float64)
    layer_den = torch.zeros_like(layer_num)
    for lo in range(0, len(windows), batch):
        chunk = windows[lo:lo + batch]
        width = len(chunk[0])
        if any(len(w) != width for w in chunk):
            raise ValueError("windows of one batch must have the same length")
        tokens = torch.tensor(chunk, dtype=torch.long)
        hq: list[torch.Tensor] = []
        hr: list[torch.Tensor] = []
        lq = quant(tokens.to(quant.device), quant.new_cache(len(chunk), width), hidden=hq).float().cpu()
        lr = ref(tokens.to(ref.device), ref.new_cache(len(chunk), width), hidden=hr).float().cpu()
        for i, (a, b) in enumerate(zip(hq, hr)):
            layer_num[i] += (a.double().cpu() - b.double().cpu()).pow(2).sum()
            layer_den[i] += b.double().cpu().pow(2).sum()
        logp_q = torch.log_softmax(lq[:, :-1], dim=-1)  # [B, T-1, V] predicting tokens 1..T-1
        logp_r = torch.log_softmax(lr[:, :-1], dim=-1)
        klds.append((logp_r.exp() * (logp_r - logp_q)).sum(-1).flatten().clamp(min=0))
        agree += int((logp_q.argmax(-1) == logp_r.argmax(-1)).sum())
        target = tokens[:, 1:, None]
        nll_q -= float(logp_q.gather(-1, target).double().sum())
        nll_r -= float(logp_r.gather(-1, target).double().sum())
        n += target.numel()
    kld = torch.cat(klds).double()
    return FidelityResult(
        tokens=n,
        kld_mean=float(kld.mean()),
        kld_p99=float(torch.quantile(kld, 0.99)),
        kld_max=float(kld.max()),
        top1_agreement=agree / n,
        ppl_quant=math.exp(nll_q / n),
        ppl_reference=math.exp(nll_r / n),
        layer_rel_error=[float(x) for x in (layer_num / layer_den.clamp(min=1e-300)).sqrt()],
    )


def format_markdown(name: str, r: FidelityResult) -> str:
    lines = [
        f"## Fidelity: {name}",
        "",
        f"{r.tokens} next-token positions.",
        "",
        "| mean KLD | p99 KLD | max KLD | top-1 agreement | perplexity | reference perplexity |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {r.kld_mean:.5f} | {r.kld_p99:.5f} | {r.kld_max:.5f} | {r.top1_agreement:.4f} | {r.ppl_quant:.3f} "
        f"| {r.ppl_reference:.3f} |",
        "",
        "| layer | relative error of the hidden state |",
        "|---:|---:|",
    ]
    lines += [f"| {i} | {e:.5f} |" for i, e in enumerate(r.layer_rel_error)]
    return "\n".join(lines) + "\n"
