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


def parse_size(text: str, option: str = "--max-shard-size") -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else None
    if not m or unit not in SIZE_UNITS:
        raise QuantkitError(f"{option} {text!r}: expected a size such as 5GB, 500MB or 2GiB")
    n = int(float(m.group(1)) * SIZE_UNITS[unit])
    if n < 1:
        raise QuantkitError(f"{option} {text!r}: must be positive")
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
@click.option("--to", "target", required=True, type=click.Choice(["bf16", "fp8", "gguf", "awq"]),
              help="Target format.")
@click.option("--scheme", type=click.Choice(["block", "channel"]), default=None,
              help="FP8 scales: per 128x128 block (official layout, default) or per channel (compressed-tensors).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output folder.")
@click.option("--recipe", default=None, help="Recipe name or YAML file (default: the target's built-in recipe).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run of the same job in OUTPUT.")
@click.option("--force", is_flag=True, help="Overwrite the checkpoint files of a different job in OUTPUT.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--keep-source", is_flag=True,
              help="Hub source: keep the downloaded shards instead of deleting each once consumed.")
@click.option("--download-dir", type=click.Path(), default=None,
              help="Hub source: where shards are downloaded (default: OUTPUT.hub-download beside OUTPUT).")
@click.option("--type", "gguf_type", default=None, help="--to gguf: bf16, f16, q8_0, q4_k, q5_k, q6_k, q4_k_m "
              "or q5_k_m (the _m presets: llama.cpp's per-tensor mix).")
@click.option("--imatrix", default=None, type=click.Path(), help="--to gguf: llama.cpp imatrix (GGUF or .dat).")
@click.option("--split-max-size", default="45GB", show_default=True, help="--to gguf: largest GGUF split.")
@click.option("--name", "gguf_name", default=None, help="--to gguf: general.name and file prefix (default: CKPT's).")
@click.option("--device", "gguf_device", default="cpu", show_default=True,
              help="--to gguf: where the k-quants are computed (cpu or cuda).")
@click.option("--awq-format", type=click.Choice(["autoawq", "compressed-tensors"]), default=None,
              help="--to awq: AutoAWQ GEMM (default) or compressed-tensors pack-quantized.")
@click.option("--calib", "calib", multiple=True, help="--to awq: calibration .txt/.jsonl/.parquet file or Hub dataset "
              "(repeat; default: the built-in set).")
@click.option("--n-samples", type=int, default=None, help="--to awq: calibration windows (default 128).")
@click.option("--seq-len", type=int, default=None, help="--to awq: tokens per window (default 512).")
@click.option("--chat", is_flag=True, default=None, help="--to awq: render calibration text with the chat template.")
@click.option("--stats", "stats_file", type=click.Path(), default=None,
              help="--to awq: activation means from a `quantkit calibrate` statistics file.")
def convert(ckpt: str, target: str, scheme: str | None, output: str, recipe: str | None, resume: bool, force: bool,
            max_shard_size: str, no_progress: bool, keep_source: bool, download_dir: str | None,
            gguf_type: str | None, imatrix: str | None, split_max_size: str, gguf_name: str | None, gguf_device: str,
            awq_format: str | None, calib: tuple[str, ...], n_samples: int | None, seq_len: int | None,
            chat: bool | None, stats_file: str | None) -> None:
    """Convert CKPT (a folder, or a Hub repo NAMESPACE/NAME[@REVISION]) into OUTPUT, one tensor at a time."""
    from quantkit.convert import convert as run

    gguf = None
    if target == "gguf":  # OUTPUT is a folder: NAME-TYPE.gguf, or its splits NAME-TYPE-00001-of-0000N.gguf
        if gguf_type is None:
            raise QuantkitError("--to gguf needs --type (bf16, f16, q8_0, q4_k, q5_k, q6_k, q4_k_m or q5_k_m)")
        gguf = {"qtype": gguf_type, "imatrix": imatrix, "name": gguf_name, "device": gguf_device,
                "split_max_bytes": parse_size(split_max_size, "--split-max-size")}
    elif gguf_type or imatrix or gguf_name or gguf_device != "cpu":
        raise QuantkitError("--type, --imatrix, --name and --device apply to --to gguf only")
    awq = {"format": awq_format, "calib": list(calib) or None, "n_samples": n_samples, "seq_len": seq_len,
           "chat": chat, "stats": stats_file}
    if target != "awq" and any(v is not None for v in awq.values()):
        raise QuantkitError("--awq-format, --calib, --n-samples, --seq-len, --chat and --stats apply to --to awq only")
    summary = run(ckpt, output, target=target, recipe=recipe, resume=resume, force=force,
                  max_shard_bytes=parse_size(max_shard_size), progress=not no_progress, scheme=scheme,
                  keep_source=keep_source, download_dir=download_dir, gguf=gguf, awq=awq if target == "awq" else None)
    for line in summary.lines():
        click.echo(line)


@cli.command()
@click.argument("ckpt", type=click.Path())
@click.option("--calib", "calib", multiple=True, help="Calibration .txt/.jsonl/.parquet file or Hub dataset name "
              "(repeat; default: the built-in set).")
@click.option("--n-samples", type=int, default=128, show_default=True, help="Calibration windows.")
@click.option("--seq-len", type=int, default=512, show_default=True, help="Tokens per window.")
@click.option("--chat", is_flag=True, help="Render calibration text with the checkpoint's chat template.")
@click.option("--experts", type=click.Choice(["routed", "all"]), default="routed", show_default=True,
              help="all: every token through every expert, for the statistics only (routing unchanged).")
@click.option("--min-tokens", type=int, default=16, show_default=True,
              help="Experts with fewer routed tokens fall back to pooled statistics (reported).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Statistics file (.safetensors; + .json, .png).")
@click.option("--imatrix", "imatrix_out", type=click.Path(), default=None,
              help="Also write the statistics as llama.cpp's imatrix GGUF (for llama-quantize --imatrix).")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def calibrate(ckpt: str, calib: tuple[str, ...], n_samples: int, seq_len: int, chat: bool, experts: str,
              min_tokens: int, output: str, imatrix_out: str | None, device: str | None, no_progress: bool) -> None:
    """Per-expert activation statistics of every linear input of CKPT (for AWQ and the GGUF imatrix)."""
    import resource
    from pathlib import Path

    from quantkit.calibrate.data import calibration_tokens
    from quantkit.calibrate.engine import calibrate as run
    from quantkit.calibrate.engine import plot_token_counts, token_count_table

    out = Path(output)
    if out.suffix != ".safetensors":
        raise QuantkitError(f"-o {output}: the statistics file must end in .safetensors")
    tokens = calibration_tokens(ckpt, list(calib) or None, n_samples, seq_len, chat)
    stats = run(ckpt, tokens, device=device, experts=experts, min_tokens=min_tokens, progress=not no_progress,
                meta={"calib": list(calib) or "built-in", "chat": chat})
    stats.save(out)
    plot_token_counts(stats, out.with_suffix(".png"))
    click.echo(token_count_table(stats))
    fb = stats.fallbacks()
    n_fb = sum(len(v) for k, v in fb.items() if k.endswith(".w13"))
    click.echo(f"{stats.meta['tokens']} tokens, {len(stats.layers)} layers in {stats.meta['seconds']:.1f} s; "
               f"{n_fb} layer-experts below --min-tokens {min_tokens} fell back to pooled statistics")
    if imatrix_out:
        from quantkit.calibrate.imatrix import stats_to_imatrix

        click.echo(f"wrote {stats_to_imatrix(stats).save(imatrix_out)} (llama.cpp imatrix)")
    click.echo(f"wrote {out}, {out.with_suffix('.json')}, {out.with_suffix('.png')} "
               f"(peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB)")


@cli.command("make-checkpoint")
@click.option("--preset", type=click.Choice(["tiny", "minimax-m2"]), default="tiny", show_default=True)
@click.option("--layers", type=int, default=None, help="Decoder layers (default: the preset's).")
@click.option("--dtype", type=click.Choice(["bf16", "fp8", "awq"]), default="bf16", show_default=True,
              help="awq: INT4 round-to-nearest of the bf16 checkpoint, AutoAWQ layout.")
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
@click.option("--backend", type=click.Choice(["auto", "dense", "fp8", "awq", "gguf"]), default="auto",
              show_default=True,
              help="fp8: keep FP8 weights and run W8A8 (kernels on a GPU); awq: keep INT4 groups and run W4A16; "
                   "gguf: run a .gguf file's blocks as stored; dense: dequantize to --dtype.")
@click.option("--tokenizer", "tokenizer_dir", default=None, type=click.Path(),
              help="Folder with tokenizer.json and the chat template (default: CKPT; a GGUF file's own vocabulary, "
                   "and for --chat its source checkpoint).")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--tp", type=int, default=1, show_default=True, help="Tensor parallel: attention heads over N ranks.")
@click.option("--ep", type=int, default=1, show_default=True, help="Expert parallel: experts over M ranks.")
def generate(ckpt: str, prompts: tuple[str, ...], chat: bool, max_new_tokens: int, temperature: float, top_p: float,
             top_k: int, seed: int, dtype: str, backend: str, tokenizer_dir: str | None, device: str | None, tp: int,
             ep: int) -> None:
    """Generate text from CKPT on the quantkit runtime."""
    import time

    import torch

    from quantkit import tokenizer as tok
    from quantkit.runtime import Sampling, load_model
    from quantkit.runtime import generate as run

    if max_new_tokens < 1:
        raise QuantkitError("--max-new-tokens must be at least 1")
    from quantkit.runtime.gguf import find_gguf, tokenizer_from_gguf
    from quantkit.runtime.parallel import cli_parallel, is_main

    gguf_file = None if tokenizer_dir else find_gguf(ckpt)  # a GGUF carries its vocabulary (not its template)
    if gguf_file is not None and chat:
        raise QuantkitError(f"--chat with {ckpt}: pass --tokenizer FOLDER holding chat_template.jinja")
    tokenizer_dir = tokenizer_dir or ckpt
    tokenizer = tokenizer_from_gguf(gguf_file) if gguf_file is not None else tok.load_tokenizer(tokenizer_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    _, device = cli_parallel(ckpt, backend, tp, ep, device)  # --tp/--ep: re-runs as max(tp, ep) processes
    model = load_model(ckpt, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32, device=device,
                       backend=backend)
    texts = [tok.apply_chat_template(tokenizer_dir, [{"role": "user", "content": p}]) if chat else p for p in prompts]
    ids = [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    if any(not i for i in ids):
        raise QuantkitError("--prompt: empty prompt")
    eos = model.cfg.eos_token_id
    stop = tuple(eos) if isinstance(eos, list) else (eos,) if eos is not None else ()
    t0 = time.perf_counter()
    outs = run(model, ids, max_new_tokens, Sampling(temperature, top_p, top_k), stop_ids=stop, seed=seed)
    dt = time.perf_counter() - t0
    if not is_main():  # every rank computed the same tokens; rank 0 prints them
        return
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
@click.option("--backend", type=click.Choice(["auto", "dense", "fp8", "awq", "gguf"]), default="auto",
              show_default=True)
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--tp", type=int, default=1, show_default=True, help="Tensor parallel: attention heads over N ranks.")
@click.option("--ep", type=int, default=1, show_default=True, help="Expert parallel: experts over M ranks.")
def eval_cmd(ckpt: str, reference: str, output: str, fidelity: bool, text_file: str | None, window: int,
             max_windows: int, do_needle: bool, needle_lengths: str | None, needle_depths: str | None,
             tasks: str | None, limit: int | None, backend: str, device: str | None, tp: int, ep: int) -> None:
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
    from quantkit.runtime.parallel import cli_parallel, is_main

    _, device = cli_parallel(ckpt, backend, tp, ep, device)  # --tp/--ep: re-runs as max(tp, ep) processes
    if not is_main():  # every rank computes the same results; rank 0 writes them
        import tempfile

        output = tempfile.mkdtemp(prefix="quantkit-eval-rank")
    res = run_eval(ckpt, reference, output, text_file=text_file, window=window, max_windows=max_windows,
                   backend=backend, device=device, do_fidelity=fidelity, do_needle=do_needle,
                   needle_lengths=numbers(needle_lengths, int, "--needle-lengths"),
                   needle_depths=numbers(needle_depths, float, "--needle-depths"),
                   tasks=[t.strip() for t in tasks.split(",") if t.strip()] if tasks else None, limit=limit)
    if not is_main():
        import shutil

        shutil.rmtree(output, ignore_errors=True)
        return
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
@click.option("--jobs", type=int, default=1, show_default=True,
              help="Checkpoints evaluated at once, each in its own process.")
def compare(reference: str, quants: tuple[str, ...], output: str, device: str | None, window: int,
            max_windows: int, jobs: int) -> None:
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
    if jobs < 1:
        raise QuantkitError(f"--jobs {jobs}: expected at least 1")
    rows = run(reference, named, output, device=device, window=window, max_windows=max_windows, jobs=jobs,
               log=lambda line: click.echo(line, err=True))
    click.echo(format_table(rows, device), nl=False)
    click.echo(f"wrote {output}/comparison.md, comparison.json, comparison.png")


@cli.command()
@click.argument("folder", type=click.Path())
@click.option("--repo", "repo_id", required=True, help="Hub repository NAMESPACE/NAME (created if absent).")
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.option("--revision", default=None, help="Branch to commit to (created from main if absent).")
@click.option("--dry-run", is_flag=True, help="Write README.md and print the upload plan; upload nothing.")
@click.option("--eval", "eval_dirs", multiple=True, type=click.Path(),
              help="Folder with results.json / comparison.json for the card (repeat; FOLDER itself is searched too).")
@click.option("--base-model", default=None, help="Base model repo id for the card (default: the Hub source).")
@click.option("--commit-size", default="50GB", show_default=True, help="Largest batch of weight files per commit.")
def publish(folder: str, repo_id: str, private: bool, revision: str | None, dry_run: bool,
            eval_dirs: tuple[str, ...], base_model: str | None, commit_size: str) -> None:
    """Write FOLDER's model card and upload FOLDER to the Hugging Face Hub (token: HF_TOKEN or hf auth login)."""
    from quantkit.hub.publish import publish as run

    run(folder, repo_id, private=private, revision=revision, dry_run=dry_run, eval_dirs=list(eval_dirs),
        base_model=base_model, commit_bytes=parse_size(commit_size, "--commit-size"), echo=click.echo)


@cli.command()
@click.argument("ckpt", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Folder for bench.md, bench.json, bench.png.")
@click.option("--concurrency", default="1,4,32,128", show_default=True, help="Comma-separated concurrency levels.")
@click.option("--input-len", type=int, default=128, show_default=True, help="Prompt tokens per request.")
@click.option("--output-len", type=int, default=512, show_default=True, help="Generated tokens per request.")
@click.option("--per-layer", is_flag=True, help="Also time decode per layer against the HBM roofline (real-width "
              "slices), projected to 62 layers.")
@click.option("--serving/--no-serving", default=True, show_default=True, help="Run the serving sweep.")
@click.option("--cuda-graphs/--no-cuda-graphs", default=True, show_default=True,
              help="Replay decode steps from CUDA graphs on the GPU (where the backend allows).")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True)
@click.option("--backend", type=click.Choice(["auto", "dense", "fp8", "awq", "gguf"]), default="auto",
              show_default=True)
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--tp", type=int, default=1, show_default=True, help="Tensor parallel: attention heads over N ranks.")
@click.option("--ep", type=int, default=1, show_default=True, help="Expert parallel: experts over M ranks.")
def bench(ckpt: str, output: str, concurrency: str, input_len: int, output_len: int, per_layer: bool, serving: bool,
          cuda_graphs: bool, dtype: str, backend: str, device: str | None, tp: int, ep: int) -> None:
    """Serving throughput, TTFT and TPOT at each concurrency (and decode per layer against the roofline)."""
    import torch

    from quantkit.evals import bench as run
    from quantkit.runtime import load_model
    from quantkit.runtime.parallel import cli_parallel, is_main

    try:
        levels = [int(c) for c in concurrency.split(",") if c.strip()]
    except ValueError:
        raise QuantkitError(f"--concurrency {concurrency!r}: expected comma-separated integers") from None
    if not levels or min(levels) < 1 or input_len < 1 or output_len < 1:
        raise QuantkitError("--concurrency, --input-len and --output-len must be positive")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    spec, device = cli_parallel(ckpt, backend, tp, ep, device)
    model = load_model(ckpt, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32, device=device,
                       backend=backend)
    world = spec.world if spec else 1
    meta = run.metadata(ckpt, model, spec, backend, dtype)

    def show(row: dict) -> None:
        if is_main():
            click.echo(f"concurrency {row['concurrency']}: {row['output_tok_s']:.1f} output tok/s, TPOT "
                       f"{row['tpot_ms']['mean']:.2f} ms, TTFT {row['ttft_ms']['mean']:.1f} ms", err=True)

    graphs = None if cuda_graphs else False  # None: wherever the backend can be captured
    rows = run.serving_sweep(model, levels, input_len, output_len, world, show, graphs) if serving else []
    layers = []
    if per_layer:
        layers, bw = run.per_layer_sweep(model, levels, context=input_len, graphs=cuda_graphs)
        meta["bandwidth_gb_s"] = bw / 1e9
    if is_main():
        run.write_report(output, meta, rows, layers)
        click.echo((run.format_serving(rows, meta) if rows else "") + (run.format_layers(layers, meta)
                                                                        if layers else ""), nl=False)
        click.echo(f"wrote {output}/bench.md, bench.json, bench.png")


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
