#!/usr/bin/env python
"""Write evals/tasks/data/quantkit_passkey.jsonl: the lm-eval passkey-retrieval task shipped with quantkit.

    python scripts/make_passkey_task.py            # seeded: rerunning writes the same file

Each document is the needle evaluation's haystack as text (FILLER repeated, the NEEDLE sentence at a seeded depth,
QUESTION at the end) with the passkey as the target: the same task `quantkit eval --needle` runs on token ids, here
through lm-eval's generate_until path and the model's own tokenizer. Contexts stay within 512 tokens of the
reference model's tokenizer (its trained context).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from quantkit.evals.needle import FILLER, NEEDLE, QUESTION

OUT = Path(__file__).resolve().parents[1] / "evals" / "tasks" / "data" / "quantkit_passkey.jsonl"


def main(n: int = 40, seed: int = 20261122) -> None:
    rng = random.Random(seed)
    sentences = [s.strip() + "." for s in FILLER.split(".") if s.strip()]
    rows = []
    for _ in range(n):
        key = str(rng.randrange(10000, 100000))
        filler = [sentences[i % len(sentences)] for i in range(rng.randrange(10, 80))]
        filler.insert(round(rng.random() * len(filler)), NEEDLE.format(key=key))
        rows.append({"context": " ".join(filler) + QUESTION, "answer": key})
    OUT.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {OUT} ({n} documents)")


if __name__ == "__main__":
    main()
