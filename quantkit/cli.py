"""The `quantkit` command line. Thin: parse, call the library, print.

User errors (QuantkitError) print as one line on stderr with exit code 2 and no traceback.
"""

from __future__ import annotations

import json
import re
import sys
import warnings

import click

from quantkit.errors import QuantkitError

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else None
    if not m or unit not in SIZE_UNITS:
        raise QuantkitError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or 2GiB")
    n = int(float(m.group(1)) * SIZE_UNITS[unit])
    if n < 1:
        raise QuantkitError(f"--max-shard-size {text!r}: must be positive")
    return n


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="quantkit")
def cli() -> None:
    """Quantize and convert MiniMax-M2 family checkpoints, streaming, in bounded memory."""


@cli.command()
@click.argument("ckpt", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect(ckpt: str, as_json: bool) -> None:
    """Architecture, parameters, bytes by dtype and kind, shards, output sizes, valid TP/EP degrees."""
    from quantkit.checkpoint import CheckpointReader
    from quantkit.info import describe, format_text

    d = describe(CheckpointReader(ckpt))
    click.echo(json.dumps(d, indent=2) if as_json else format_text(d))


@cli.command()
@click.argument("ckpt", type=click.Path())
@click.option("--to", "target", required=True, type=click.Choice(["bf16", "fp8"]), help="Target format.")
@click.option("--scheme", type=click.Choice(["block", "channel"]), default=None,
              help="FP8 scales: per 128x128 block (official layout, default) or per channel (compressed-tensors).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output folder.")
@click.option("--recipe", default=None, help="Recipe name or YAML file (default: the target's built-in recipe).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run of the same job in OUTPUT.")
@click.option("--force", is_flag=True, help="Overwrite the checkpoint files of a different job in OUTPUT.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def convert(ckpt: str, target: str, scheme: str | None, output: str, recipe: str | None, resume: bool, force: bool,
            max_shard_size: str, no_progress: bool) -> None:
    """Convert CKPT into OUTPUT, one tensor at a time."""
    from quantkit.convert import convert as run

    summary = run(ckpt, output, target=target, recipe=recipe, resume=resume, force=force,
                  max_shard_bytes=parse_size(max_shard_size), progress=not no_progress, scheme=scheme)
    for line in summary.lines():
        click.echo(line)


@cli.command("make-checkpoint")
@click.option("--preset", type=click.Choice(["tiny", "minimax-m2"]), default="tiny", show_default=True)
@click.option("--layers", type=int, default=None, help="Decoder layers (default: the preset's).")
@click.option("--dtype", type=click.Choice(["bf16", "fp8"]), default="bf16", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--output", required=True, type=click.Path())
@click.option("--max-shard-size", default="2GB", show_default=True)
@click.option("--force", is_flag=True, help="Overwrite checkpoint files already in OUTPUT.")
def make_checkpoint(preset: str, layers: int | None, dtype: str, seed: int, output: str, max_shard_size: str,
                    force: bool) -> None:
    """Write a seeded synthetic MiniMax-M2 checkpoint (config, tokenizer, sharded safetensors)."""
    from quantkit.synth import make_checkpoint as run

    cfg = run(output, preset=preset, layers=layers, dtype=dtype, seed=seed,
              max_shard_bytes=parse_size(max_shard_size), force=force, progress=preset != "tiny")
    total, active = cfg.parameter_count()
    click.echo(f"wrote {output}: {preset} preset, {cfg.num_hidden_layers} layers, {dtype}, "
               f"{total:,} parameters ({active:,} active)")


@cli.command()
@click.argument("ckpt", type=click.Path())
@click.option("--prompt", "prompts", multiple=True, required=True, help="Prompt text (repeat for a batch).")
@click.option("--chat", is_flag=True, help="Wrap each prompt as a user turn with the chat template.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True)
@click.option("--backend", type=click.Choice(["auto", "dense", "fp8"]), default="auto", show_default=True,
              help="fp8: keep FP8 weights and run W8A8 (kernels on a GPU); dense: dequantize to --dtype.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
def generate(ckpt: str, prompts: tuple[str, ...], chat: bool, max_new_tokens: int, temperature: float, top_p: float,
             top_k: int, seed: int, dtype: str, backend: str, device: str | None) -> None:
    """Generate text from CKPT on the quantkit runtime."""
    import time

    import torch

    from quantkit import tokenizer as tok
    from quantkit.runtime import Sampling, load_model
    from quantkit.runtime import generate as run

    if max_new_tokens < 1:
        raise QuantkitError("--max-new-tokens must be at least 1")
    tokenizer = tok.load_tokenizer(ckpt)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(ckpt, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32, device=device,
                       backend=backend)
    texts = [tok.apply_chat_template(ckpt, [{"role": "user", "content": p}]) if chat else p for p in prompts]
    ids = [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    if any(not i for i in ids):
        raise QuantkitError("--prompt: empty prompt")
    eos = model.cfg.eos_token_id
    stop = tuple(eos) if isinstance(eos, list) else (eos,) if eos is not None else ()
    t0 = time.perf_counter()
    outs = run(model, ids, max_new_tokens, Sampling(temperature, top_p, top_k), stop_ids=stop, seed=seed)
    dt = time.perf_counter() - t0
    for text, out in zip(prompts, outs):
        click.echo(f"--- {text!r}")
        click.echo(tokenizer.decode(out, skip_special_tokens=False))
    n = sum(len(o) for o in outs)
    click.echo(f"{n} tokens in {dt:.2f} s ({n / max(dt, 1e-9):.1f} tokens/s, batch {len(ids)})", err=True)


@cli.command("eval")
@click.argument("ckpt", type=click.Path())
@click.option("--reference", required=True, type=click.Path(), help="The checkpoint to compare against (BF16).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Folder for report.md, results.json, PNGs.")
@click.option("--fidelity/--no-fidelity", default=True, show_default=True,
              help="KL divergence, top-1 agreement, perplexity, per-layer error.")
@click.option("--text", "text_file", type=click.Path(), default=None, help="UTF-8 text (default: built-in).")
@click.option("--window", type=int, default=256, show_default=True, help="Tokens per evaluated window.")
@click.option("--max-windows", type=int, default=16, show_default=True)
@click.option("--needle", "do_needle", is_flag=True, help="Passkey retrieval over context lengths x depths.")
@click.option("--needle-lengths", default=None, help="Comma-separated context lengths (default 1K..128K, clipped).")
@click.option("--needle-depths", default=None, help="Comma-separated depths in [0, 1] (default 0,.25,.5,.75,1).")
@click.option("--tasks", default=None,
              help="Comma-separated lm-eval tasks: quantkit_mc, quantkit_gen, quantkit_ppl (offline) or any standard "
                   "task whose data is cached.")
@click.option("--limit", type=int, default=None, help="At most this many documents per lm-eval task.")
@click.option("--backend", type=click.Choice(["auto", "dense", "fp8"]), default="auto", show_default=True)
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
def eval_cmd(ckpt: str, reference: str, output: str, fidelity: bool, text_file: str | None, window: int,
             max_windows: int, do_needle: bool, needle_lengths: str | None, needle_depths: str | None,
             tasks: str | None, limit: int | None, backend: str, device: str | None) -> None:
    """Evaluate CKPT against a reference on quantkit's runtime."""
    import torch

    from quantkit.evals.report import run_eval

    def numbers(text: str | None, kind: type, option: str) -> list | None:
        if text is None:
            return None
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise QuantkitError(f"{option} {text!r}: expected comma-separated numbers") from None

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    res = run_eval(ckpt, reference, output, text_file=text_file, window=window, max_windows=max_windows,
                   backend=backend, device=device, do_fidelity=fidelity, do_needle=do_needle,
                   needle_lengths=numbers(needle_lengths, int, "--needle-lengths"),
                   needle_depths=numbers(needle_depths, float, "--needle-depths"),
                   tasks=[t.strip() for t in tasks.split(",") if t.strip()] if tasks else None, limit=limit)
    if "fidelity" in res:
        f = res["fidelity"]
        click.echo(f"{f['tokens']} positions: mean KLD {f['kld_mean']:.5f}, p99 {f['kld_p99']:.5f}, top-1 "
                   f"{f['top1_agreement']:.4f}, perplexity {f['ppl_quant']:.3f} (reference {f['ppl_reference']:.3f})")
    if "needle" in res:
        click.echo(f"needle: {res['needle']['cases']} cases, exact match {res['needle']['score']:.1%}")
    for task, metrics in sorted(res.get("lm_eval", {}).get("results", {}).items()):
        shown = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items()
                          if isinstance(v, float) and "stderr" not in k)
        click.echo(f"lm-eval {task}: {shown}")
    click.echo(f"wrote {output}/report.md and results.json")


@cli.command()
@click.argument("reference", type=click.Path())
@click.option("--quant", "quants", multiple=True, required=True, help="NAME=PATH of a converted checkpoint (repeat).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Folder for comparison.md/.json/.png.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--window", type=int, default=256, show_default=True)
@click.option("--max-windows", type=int, default=8, show_default=True)
def compare(reference: str, quants: tuple[str, ...], output: str, device: str | None, window: int,
            max_windows: int) -> None:
    """One table of size, bits/weight, KLD, top-1, perplexity, needle score and tokens/s per checkpoint."""
    import torch

    from quantkit.evals.compare import compare as run
    from quantkit.evals.compare import format_table

    named = {}
    for q in quants:
        name, sep, path = q.partition("=")
        if not sep or not name or not path:
            raise QuantkitError(f"--quant {q!r}: expected NAME=PATH")
        named[name] = path
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = run(reference, named, output, device=device, window=window, max_windows=max_windows)
    click.echo(format_table(rows, device), nl=False)
    click.echo(f"wrote {output}/comparison.md, comparison.json, comparison.png")


def _warn(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {message}", err=True)


def main() -> None:
    warnings.showwarning = _warn
    try:
        cli.main(standalone_mode=False)
    except QuantkitError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
