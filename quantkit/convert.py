"""`quantkit convert`: stream a checkpoint, one tensor at a time, into a target format.

    summary = convert("MiniMax-M2", "MiniMax-M2-BF16", target="bf16")

The output plan (every tensor's name, dtype, shape and shard) is computed from the source headers and the
recipe before anything is read, so memory holds one tensor plus the writer's in-flight buffer whatever the
model's size. Targets register a planner here: it lists the output tensors, produces each one from the reader,
and rewrites config.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from quantkit import __version__
from quantkit.checkpoint import CheckpointReader, OutputFolder, OutTensor, plan_shards
from quantkit.checkpoint.reader import INDEX_NAME, PICKLE_SUFFIXES
from quantkit.checkpoint.safetensors_file import DTYPE_NAMES
from quantkit.checkpoint.writer import LOCK_NAME, MANIFEST_NAME
from quantkit.errors import QuantkitError
from quantkit.formats import fp8
from quantkit.hub import source as hub_source
from quantkit.recipe import Recipe

DEFAULT_MAX_SHARD = 5 * 10**9
AUX_LIMIT = 64 << 20  # small non-weight files (config, tokenizer, template) copied into the output


@dataclass
class ConvertSummary:
    output: Path
    shards: int
    shards_reused: int
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss: int
    errors: dict[str, float] = field(default_factory=dict)  # relative RMS quantization error per weight
    kinds: dict[str, str] = field(default_factory=dict)
    source_lines: list[str] = field(default_factory=list)  # a Hub source: what was downloaded, peak shards on disk

    def error_lines(self) -> list[str]:
        by_kind: dict[str, list[tuple[float, str]]] = {}
        for name, e in self.errors.items():
            stem = name.rpartition(".")[0] + ".weight"  # INT4 outputs: qweight / weight_packed stand for .weight
            by_kind.setdefault(self.kinds.get(name, self.kinds.get(stem, "other")), []).append((e, name))
        out = []
        for kind, errs in sorted(by_kind.items()):
            worst, name = max(errs)
            mean = sum(e for e, _ in errs) / len(errs)
            out.append(f"quantization error (relative RMS), {kind}: mean {mean:.4f}, max {worst:.4f} ({name}), "
                       f"{len(errs)} tensors")
        return out

    def lines(self) -> list[str]:
        s = max(self.seconds, 1e-9)
        return self.error_lines() + [
            f"wrote {self.output} ({self.shards} shards, {self.shards_reused} reused from an earlier run, "
            f"{self.tensors} tensors)",
            f"{self.bytes_written / 1e9:.3f} GB written, {self.bytes_read / 1e9:.3f} GB read in {self.seconds:.1f} s: "
            f"{self.bytes_read / 1e9 / s:.2f} GB/s in, {self.bytes_written / 1e9 / s:.2f} GB/s out",
            f"peak RSS {self.peak_rss / 2**30:.2f} GiB",
        ] + self.source_lines


@dataclass
class Plan:
    tensors: list[OutTensor]
    produce: Callable[[OutTensor], torch.Tensor]
    config: dict
    read_bytes: Callable[[OutTensor], int]
    errors: dict[str, float] = field(default_factory=dict)  # relative RMS quantization error per weight
    extra_files: Callable[[], dict[str, bytes]] | None = None  # reports written beside config.json at the end


def plan_bf16(reader: CheckpointReader, recipe: Recipe) -> Plan:
    """Every tensor in the recipe's dtype (FP8 dequantized exactly), router tensors as stored."""
    out_dtype = getattr(torch, recipe.dtype)
    tensors, keep = [], {}
    for unit in reader.config.units():
        for spec in unit.tensors:
            stored = reader.entry(spec.name).torch_dtype
            dtype = stored if spec.kind in recipe.keep_dtype else out_dtype
            keep[spec.name] = spec.kind in recipe.keep_dtype
            tensors.append(OutTensor(spec.name, DTYPE_NAMES[dtype], spec.shape, unit.name))

    def produce(t: OutTensor) -> torch.Tensor:
        return reader.tensor(t.name) if keep[t.name] else reader.weight(t.name, out_dtype)

    config = dict(reader.config.raw)
    config.pop("quantization_config", None)
    config["torch_dtype" if "dtype" not in config else "dtype"] = recipe.dtype
    return Plan(tensors, produce, config, lambda t: _source_bytes(reader, t.name))


def _source_bytes(reader: CheckpointReader, name: str) -> int:
    scale = name + "_scale_inv"
    return reader.entry(name).nbytes + (reader.entry(scale).nbytes if scale in reader else 0)


def plan_fp8(reader: CheckpointReader, recipe: Recipe) -> Plan:
    """Block FP8 in the official layout (weight + weight_scale_inv), or compressed-tensors per-channel FP8
    (weight + weight_scale [out, 1]). Source weights already in the same block layout are copied as they are."""
    scheme = recipe.options.get("scheme", "block")
    if scheme not in ("block", "channel"):
        raise QuantkitError(f"recipe {recipe.name!r}: options.scheme must be block or channel, not {scheme!r}")
    block = tuple(recipe.options.get("weight_block_size", fp8.BLOCK))
    out_dtype = getattr(torch, recipe.dtype)
    suffix = "_scale_inv" if scheme == "block" else "_scale"
    tensors: list[OutTensor] = []
    role: dict[str, str] = {}  # output name -> quantized | scale | keep | cast
    for unit in reader.config.units():
        for spec in unit.tensors:
            if spec.kind in recipe.quantize and spec.is_linear:
                role[spec.name] = "quantized"
                tensors.append(OutTensor(spec.name, "F8_E4M3", spec.shape, unit.name))
                sshape = tuple(-(-d // b) for d, b in zip(spec.shape, block)) if scheme == "block" else (
                    spec.shape[0], 1)
                role[spec.name + suffix] = "scale"
                tensors.append(OutTensor(spec.name + suffix, "F32", sshape, unit.name))
            else:
                keep = spec.kind in recipe.keep_dtype
                role[spec.name] = "keep" if keep else "cast"
                dtype = reader.entry(spec.name).torch_dtype if keep else out_dtype
                tensors.append(OutTensor(spec.name, DTYPE_NAMES[dtype], spec.shape, unit.name))
    pending: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    passthrough = scheme == "block" and reader.block == block

    def quantize(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if passthrough and reader.is_fp8(name):
            errors[name] = 0.0  # already in the target layout: the stored bytes are the result
            return reader.tensor(name), reader.tensor(name + "_scale_inv")
        w = reader.weight(name, torch.float32)  # exact for BF16 and block-FP8 sources alike
        if scheme == "block":
            q, s, errors[name] = fp8.quantize_block(w, block, name, with_error=True)
        else:
            q, s, errors[name] = fp8.quantize_channel(w, name, with_error=True)
        return q, s

    def produce(t: OutTensor) -> torch.Tensor:
        r = role[t.name]
        if r == "quantized":
            q, pending[t.name + suffix] = quantize(t.name)
            return q
        if r == "scale":
            if t.name in pending:
                return pending.pop(t.name)
            return quantize(t.name.removesuffix(suffix))[1]  # its weight sits in a shard kept from an earlier run
        return reader.tensor(t.name) if r == "keep" else reader.weight(t.name, out_dtype)

    config = dict(reader.config.raw)
    config["torch_dtype" if "dtype" not in config else "dtype"] = recipe.dtype
    ignore = list(recipe.options.get("ignore", []))
    if scheme == "block":
        config["quantization_config"] = fp8.block_quantization_config(ignore, block)
    else:
        config["quantization_config"] = fp8.channel_quantization_config(ignore)
    return Plan(tensors, produce, config, lambda t: _source_bytes(reader, t.name) if role[t.name] != "scale" else 0,
                errors)


def plan_awq(reader: CheckpointReader, recipe: Recipe) -> Plan:
    """INT4 AWQ (calibration and search per layer as the writer reaches it): quantkit.calibrate.plan."""
    from quantkit.calibrate.plan import plan_awq as plan

    return plan(reader, recipe)


PLANNERS: dict[str, Callable[[CheckpointReader, Recipe], Plan]] = {"bf16": plan_bf16, "fp8": plan_fp8,
                                                                    "awq": plan_awq}


def shard_errors(plan: Plan, shard) -> dict:
    errs = {t.name: plan.errors[t.name] for t in shard.tensors if t.name in plan.errors}
    return {"rel_rms": errs} if errs else {}


def check_paths(source: Path, output: Path) -> None:
    src, out = os.path.realpath(source), os.path.realpath(output)
    if out == src or out.startswith(src + os.sep):
        raise QuantkitError(f"{output}: the output folder must not be the source folder or inside it")


def aux_files(source: Path, config: dict) -> dict[str, bytes]:
    """config.json rewritten for the target, and every other small non-weight file copied as it is."""
    files = {"config.json": (json.dumps(config, indent=2) + "\n").encode()}
    skip = {INDEX_NAME, MANIFEST_NAME, LOCK_NAME, "config.json"}
    for p in sorted(source.iterdir()):
        if not p.is_file() or p.name in skip or p.name.startswith("."):
            continue
        if p.suffix == ".safetensors" or p.suffix in PICKLE_SUFFIXES or p.stat().st_size > AUX_LIMIT:
            continue
        files[p.name] = p.read_bytes()
    return files


def default_recipe(target: str, scheme: str | None) -> str:
    if target == "fp8":
        return f"fp8-{scheme or 'block'}"
    if target == "awq" and not scheme:
        return "awq-w4a16"
    if scheme:
        raise QuantkitError(f"--scheme {scheme}: --to {target} has no schemes")
    return target


def convert(source: str | Path, output: str | Path, target: str = "bf16", recipe: str | Path | None = None,
            resume: bool = False, force: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD,
            progress: bool = True, scheme: str | None = None, keep_source: bool = False,
            download_dir: str | Path | None = None, gguf: dict | None = None,
            awq: dict | None = None) -> ConvertSummary:
    """Convert `source` (a folder, or a Hub repo id `NAMESPACE/NAME[@REVISION]`) into `output`."""
    if target not in PLANNERS and target != "gguf":
        raise QuantkitError(f"--to {target}: not available (available: {', '.join(PLANNERS)})")
    hub = None
    repo = hub_source.parse_repo_arg(str(source))
    if repo is not None:  # shards are downloaded as the conversion reaches them, and deleted once consumed
        folder = Path(download_dir) if download_dir else hub_source.default_download_dir(Path(output))
        out_real, dl_real = os.path.realpath(output), os.path.realpath(folder)
        if dl_real == out_real or out_real.startswith(dl_real + os.sep) or dl_real.startswith(out_real + os.sep):
            raise QuantkitError(f"--download-dir {folder}: must not be the output folder {output}, hold it, or lie "
                                "inside it")
        hub = hub_source.HubSource.open(*repo, folder, keep=keep_source, progress=progress)
        source = hub.folder
    if target == "gguf":  # GGUF is not safetensors shards: its own planner and writer (quantkit.gguf_convert)
        from quantkit.gguf_convert import convert_gguf

        return convert_gguf(source, output, recipe=recipe, resume=resume, force=force, progress=progress, hub=hub,
                            **(gguf or {}))
    source, output = Path(source), Path(output)
    check_paths(source, output)
    reader = CheckpointReader(source, remote=hub)
    rec = Recipe.load(recipe or default_recipe(target, scheme))
    if scheme and rec.options.get("scheme", scheme) != scheme:
        raise QuantkitError(f"recipe {rec.name!r} is for --scheme {rec.options['scheme']}, not --scheme {scheme}")
    if rec.target != target:
        raise QuantkitError(f"recipe {rec.name!r} is for --to {rec.target}, not --to {target}")
    if awq:  # --awq-format, --calib ...: recipe options, so that they enter the job fingerprint
        rec = dataclasses.replace(rec, options={**rec.options, **{k: v for k, v in awq.items() if v is not None}})
    plan = PLANNERS[target](reader, rec)
    shards = plan_shards(plan.tensors, max_shard_bytes)
    job = {
        "quantkit": __version__,
        "source": reader.fingerprint(),
        "recipe": rec.digest(),
        "target": target,
        "max_shard_bytes": max_shard_bytes,
    }
    if hub is not None:
        job["hub_source"] = hub.spec  # repo@commit: what the model card names as the base model
        hub.plan_release(reader, shards)
    crash_after = int(os.environ.get("QUANTKIT_CRASH_AFTER_SHARDS", "0"))  # fault injection for resume tests
    start = time.perf_counter()
    read = reused = 0
    units = [u.name for u in reader.config.units()]
    per_unit = {u: 0 for u in units}
    for t in plan.tensors:
        per_unit[t.unit] += 1
    with OutputFolder.open(output, job, resume=resume, force=force) as folder:
        bar_units = tqdm(total=len(units), desc="units", unit="unit", disable=not progress, position=0)
        bar = None
        bar_unit = None  # tracked here: a disabled tqdm (--no-progress) has no .desc to compare against
        seen = {u: 0 for u in units}

        def on_tensor(t: OutTensor) -> None:
            nonlocal bar, bar_unit
            if bar is None or bar_unit != t.unit:
                if bar is not None:
                    bar.close()
                bar_unit = t.unit
                bar = tqdm(total=per_unit[t.unit], desc=t.unit, unit="tensor", leave=False, disable=not progress,
                           position=1)
            bar.update(1)
            seen[t.unit] += 1
            if seen[t.unit] == per_unit[t.unit]:
                bar_units.update(1)

        written = 0
        try:
            for i, shard in enumerate(shards):
                if folder.verified(shard):
                    reused += 1
                    for t in shard.tensors:
                        on_tensor(t)
                else:
                    folder.write_shard(shard, plan.produce, on_tensor, record=lambda s=shard: shard_errors(plan, s))
                    read += sum(plan.read_bytes(t) for t in shard.tensors)
                    written += 1
                if hub is not None:
                    hub.shard_done(i, reader)  # source shards no later output shard needs are deleted
                if crash_after and written >= crash_after:
                    os._exit(137)
        finally:
            # Also on an error (disk full, unreadable tensor): an open bar leaves the cursor mid-line, and the
            # CLI's one-line error must start a line of its own.
            if bar is not None:
                bar.close()
            bar_units.close()
        aux = aux_files(source, plan.config)
        if hub is not None:  # the repo's files only: --download-dir may hold other things
            aux = {n: d for n, d in aux.items() if n == "config.json" or hub.has(n)}
        if plan.extra_files is not None:
            aux.update(plan.extra_files())
        folder.finish(shards, aux)
        total_written = folder.written_bytes + sum(len(d) for d in aux.values())
        errors = {n: e for rec_ in folder.manifest["shards"].values() for n, e in rec_.get("rel_rms", {}).items()}
    reader.close()
    if hub is not None:
        hub.finish()
    return ConvertSummary(
        output=output,
        shards=len(shards),
        shards_reused=reused,
        tensors=len(plan.tensors),
        bytes_read=read,
        bytes_written=total_written,
        seconds=time.perf_counter() - start,
        peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        errors=errors,
        kinds={s.name: s.kind for s in reader.specs()},
        source_lines=hub.lines() if hub is not None else [],
    )
