"""Generation: batched prefill, then one token per step for every sequence, with per-request sampling.

    out = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=32, sampling=Sampling(temperature=0))

Prompts are left-padded into one batch; finished sequences keep stepping (their tokens are discarded) until
every sequence has stopped, which keeps the step shapes fixed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.runtime.model import MiniMaxM2


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]."""
    if s.temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already cover top_p; the first token always stays
        drop = probs.cumsum(-1) - probs >= s.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(model: MiniMaxM2, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
             stop_ids: tuple[int, ...] = (), seed: int = 0) -> list[list[int]]:
    """Return the new tokens of each prompt (stop token included when one was produced)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    B, T = len(prompts), max(len(p) for p in prompts)
    device = model.device
    tokens = torch.zeros(B, T, dtype=torch.long)
    valid = torch.zeros(B, T, dtype=torch.bool)
    for b, p in enumerate(prompts):
        tokens[b, T - len(p):] = torch.tensor(p)
        valid[b, T - len(p):] = True
    cache = model.new_cache(B, T + max_new_tokens)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    logits = model(tokens.to(device), cache, valid.to(device))[:, -1]
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    stop = set(stop_ids)
    for step in range(max_new_tokens):
        nxt = sample(logits.cpu(), sampling, gen)
        for b in range(B):
            if not done[b]:
                out[b].append(int(nxt[b]))
                done[b] = int(nxt[b]) in stop
        if all(done) or step == max_new_tokens - 1:
            break
        logits = model(nxt[:, None].to(device), cache)[:, -1]
    return out
