"""Needle in a haystack: a passkey hidden at a given depth of a long filler context, asked for at the end.

    cases = needle_grid(max_context=model.cfg.max_position_embeddings)
    result = run_needle(model, tokenizer, cases)          # exact-match score per (context length, depth)

The context is filler text (FILLER by default, repeated as needed) cut to the case's length in tokens,
with the needle sentence inserted at the case's depth (0 = the start, 1 = just before the question). The model
reads it through chunked prefill (the KV cache grows chunk by chunk, so activations stay bounded by the chunk,
not the context) and answers greedily; the case scores 1 when the digits of the passkey are the first digits it
writes. Passkeys come from a seeded generator, so runs are reproducible.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from quantkit.errors import QuantkitError
from quantkit.runtime.model import MiniMaxM2

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
# The haystack: plain filler sentences, the classic passkey-retrieval setting; the reference model is trained on
# documents of this exact shape (scripts/train_reference.py imports these strings).
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\nWhat is the pass key? The pass key is"
ANSWER_TOKENS = 12


@dataclass(frozen=True)
class NeedleCase:
    length: int  # context tokens, question included
    depth: float
    key: str


@dataclass
class NeedleOutcome:
    length: int
    depth: float
    key: str
    answer: str
    correct: bool


def needle_grid(max_context: int, lengths=DEFAULT_LENGTHS, depths=DEFAULT_DEPTHS, seed: int = 0) -> list[NeedleCase]:
    """The lengths x depths grid, lengths clipped to the model's context (less the answer's tokens)."""
    rng = random.Random(seed)
    usable = [n for n in lengths if n + ANSWER_TOKENS <= max_context]
    if not usable and tuple(lengths) == DEFAULT_LENGTHS:
        # A model whose whole context is under the grid's first length (the small reference model): the same
        # grid shape over its own context, from an eighth of it to all of it.
        top = max_context - ANSWER_TOKENS
        usable = sorted({max(64, top * f // 8) for f in (1, 2, 4, 6, 8)})
    if not usable:
        raise QuantkitError(f"needle: no context length in {list(lengths)} fits the model's {max_context} positions")
    return [NeedleCase(n, d, str(rng.randrange(10000, 100000))) for n in usable for d in depths]


def score(answer: str, key: str) -> bool:
    """Exact match: the first run of digits in the answer is the key."""
    m = re.search(r"\d+", answer)
    return m is not None and m.group(0) == key


def build_prompt(tokenizer, filler_ids: list[int], case: NeedleCase) -> list[int]:
    needle = tokenizer.encode(" " + NEEDLE.format(key=case.key) + " ", add_special_tokens=False).ids
    question = tokenizer.encode(QUESTION, add_special_tokens=False).ids
    room = case.length - len(needle) - len(question)
    if room < 1:
        raise QuantkitError(f"needle: context length {case.length} is too short for the needle and the question")
    if not filler_ids:
        raise QuantkitError("needle: the filler text is empty")
    reps = -(-room // len(filler_ids))
    filler = (filler_ids * reps)[:room]
    at = round(case.depth * room)
    return filler[:at] + needle + filler[at:] + question


@torch.inference_mode()
def answer(model: MiniMaxM2, prompt: list[int], chunk: int = 2048, max_new: int = ANSWER_TOKENS) -> list[int]:
    """Greedy answer after a chunked prefill of the prompt."""
    cache = model.new_cache(1, len(prompt) + max_new)
    tokens = torch.tensor([prompt], dtype=torch.long, device=model.device)
    for lo in range(0, len(prompt), chunk):
        logits = model(tokens[:, lo:lo + chunk], cache)[:, -1]
    out: list[int] = []
    for _ in range(max_new):
        nxt = logits.argmax(-1)  # [1]
        out.append(int(nxt[0]))
        logits = model(nxt[:, None], cache)[:, -1]
    return out


def run_needle(model: MiniMaxM2, tokenizer, cases: list[NeedleCase], filler: str = FILLER, chunk: int = 2048
               ) -> list[NeedleOutcome]:
    filler_ids = tokenizer.encode(filler, add_special_tokens=False).ids
    outcomes = []
    for case in cases:
        ids = answer(model, build_prompt(tokenizer, filler_ids, case), chunk)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        outcomes.append(NeedleOutcome(case.length, case.depth, case.key, text, score(text, case.key)))
    return outcomes


def summary(outcomes: list[NeedleOutcome]) -> dict:
    return {
        "cases": len(outcomes),
        "score": sum(o.correct for o in outcomes) / max(1, len(outcomes)),
        "outcomes": [asdict(o) for o in outcomes],
    }


def plot_heatmap(outcomes: list[NeedleOutcome], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({o.length for o in outcomes})
    depths = sorted({o.depth for o in outcomes})
    grid = torch.full((len(depths), len(lengths)), float("nan"))
    for o in outcomes:
        grid[depths.index(o.depth), lengths.index(o.length)] = float(o.correct)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(lengths), 1.0 + 0.5 * len(depths)), dpi=120)
    im = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="exact match")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
