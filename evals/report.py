"""`quantkit eval`: run the requested evaluations of a checkpoint against a reference and write the report.

    run_eval("MiniMax-M2-FP8", reference="MiniMax-M2-BF16", out="eval-fp8")   # report.md, results.json, PNGs

The text defaults to a held-out passage of the project's own (`held_out_text`: Python source, then prose), so an
evaluation runs offline; `--text FILE` takes any UTF-8 file instead.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

import torch
from quantkit.evals import needle
from quantkit.evals.fidelity import fidelity, format_markdown, token_windows

from quantkit import tokenizer as tok
from quantkit.errors import QuantkitError
from quantkit.runtime import load_model

HELD_OUT_SEED = 7_000_001  # not the seed the tokenizers are trained on
CODE_MODULES = ("arch.py", "recipe.py", "convert.py", "info.py", "synth.py")


def held_out_text(chunks: int = 60, code: bool = True) -> str:
    """Python source first (quantkit's own modules, which no model was trained on; the reference model learned
    Python, so this is in its distribution), then prose, code, chat and tool-call text of the same kinds as the
    tokenizer's corpus, drawn with another seed. Evaluations read windows from the start, so a default run scores
    the Python part; the text is fixed for a given quantkit version (recorded in results.json)."""
    parts = []
    if code:
        root = resources.files("quantkit")
        for name in CODE_MODULES:
            parts.append((root / name).read_text())
    parts += tok.build_corpus(seed=HELD_OUT_SEED, n_chunks=chunks, n_nonsense=0)
    return "\n".join(parts)


def plot_layer_error(errors: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
    ax.plot(range(len(errors)), errors, marker="o")
    ax.set_xlabel("layer")
    ax.set_ylabel("relative error of hidden state")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_eval(model_path: str | Path, reference: str | Path, out: str | Path, text_file: str | Path | None = None,
             window: int = 256, max_windows: int | None = 16, backend: str = "auto", device: str = "cpu",
             dtype: torch.dtype = torch.float32, do_fidelity: bool = True, needle_lengths: list[int] | None = None,
             needle_depths: list[float] | None = None, do_needle: bool = False, tasks: list[str] | None = None,
             limit: int | None = None) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if text_file is not None:
        try:
            text = Path(text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise QuantkitError(f"--text {text_file}: cannot read it as UTF-8 ({e})") from None
    else:
        text = held_out_text()
    if not (do_fidelity or do_needle or tasks):
        raise QuantkitError("nothing to do: select --fidelity, --needle or --tasks")
    tokenizer = tok.load_tokenizer(reference)
    name = Path(model_path).name
    source = str(text_file) if text_file else "built-in held-out text"
    results: dict = {"model": str(model_path), "reference": str(reference), "backend": backend, "device": device,
                     "dtype": str(dtype).removeprefix("torch."), "text": source}
    report = f"# Evaluation of {name}\n\nReference: `{reference}`; backend {backend} on {device}.\n\n"
    t0 = time.perf_counter()
    quant = load_model(model_path, dtype=dtype, device=device, backend=backend)
    if do_fidelity:
        windows = token_windows(tokenizer.encode(text, add_special_tokens=False).ids, window, max_windows)
        ref = load_model(reference, dtype=dtype, device=device, backend="dense")
        result = fidelity(quant, ref, windows)
        del ref
        results.update(window=window, windows=len(windows), fidelity=result.to_dict())
        plot_layer_error(result.layer_rel_error, out / "layer_error.png", f"{name} vs {Path(reference).name}")
        report += (f"{len(windows)} windows of {window} tokens from the {source}.\n\n" + format_markdown(name, result)
                   + "\n![per-layer error](layer_error.png)\n\n")
    if do_needle:
        cases = needle.needle_grid(quant.cfg.max_position_embeddings, needle_lengths or needle.DEFAULT_LENGTHS,
                                   needle_depths or needle.DEFAULT_DEPTHS)
        outcomes = needle.run_needle(quant, tokenizer, cases)
        results["needle"] = needle.summary(outcomes)
        needle.plot_heatmap(outcomes, out / "needle.png", f"{name}: passkey retrieval")
        report += (f"## Needle in a haystack\n\n{len(outcomes)} cases, exact match "
                   f"{results['needle']['score']:.1%}.\n\n![needle heatmap](needle.png)\n")
    if tasks:
        from quantkit.evals.lm_eval_adapter import run_lm_eval

        del quant  # lm-eval loads its own copy of the model
        results["lm_eval"] = run_lm_eval(model_path, tasks, backend=backend, device=device, limit=limit)
        report += "## lm-eval\n\n| task | metric | value |\n|---|---|---:|\n"
        for task, metrics in sorted(results["lm_eval"]["results"].items()):
            for key, value in metrics.items():
                if isinstance(value, float) and "stderr" not in key:
                    report += f"| {task} | {key.split(',')[0]} | {value:.4f} |\n"
    results["seconds"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "report.md").write_text(report)
    return results
