"""`quantkit convert`: stream a checkpoint, one tensor at a time, into a target format.

    summary = convert("MiniMax-M2", "MiniMax-M2-BF16", target="bf16")

The output plan (every tensor's name, dtype, shape and shard) is computed from the source headers and the
recipe before anything is read, so memory holds one tensor plus the writer's in-flight buffer whatever the
model's size. Targets register a planner here: it lists the output tensors, produces each one from the reader,
and rewrites config.json.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from quantkit import __version__
from quantkit.checkpoint import CheckpointReader, OutputFolder, OutTensor, plan_shards
from quantkit.checkpoint.reader import INDEX_NAME, PICKLE_SUFFIXES
from quantkit.checkpoint.safetensors_file import DTYPE_NAMES
from quantkit.checkpoint.writer import LOCK_NAME, MANIFEST_NAME
from quantkit.errors import QuantkitError
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

    def lines(self) -> list[str]:
        s = max(self.seconds, 1e-9)
        return [
            f"wrote {self.output} ({self.shards} shards, {self.shards_reused} reused from an earlier run, "
            f"{self.tensors} tensors)",
            f"{self.bytes_written / 1e9:.3f} GB written, {self.bytes_read / 1e9:.3f} GB read in {self.seconds:.1f} s: "
            f"{self.bytes_read / 1e9 / s:.2f} GB/s in, {self.bytes_written / 1e9 / s:.2f} GB/s out",
            f"peak RSS {self.peak_rss / 2**30:.2f} GiB",
        ]


@dataclass
class Plan:
    tensors: list[OutTensor]
    produce: Callable[[OutTensor], torch.Tensor]
    config: dict
    read_bytes: Callable[[OutTensor], int]


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

    def read_bytes(t: OutTensor) -> int:
        scale = t.name + "_scale_inv"
        return reader.entry(t.name).nbytes + (reader.entry(scale).nbytes if scale in reader else 0)

    config = dict(reader.config.raw)
    config.pop("quantization_config", None)
    config["torch_dtype" if "dtype" not in config else "dtype"] = recipe.dtype
    return Plan(tensors, produce, config, read_bytes)


PLANNERS: dict[str, Callable[[CheckpointReader, Recipe], Plan]] = {"bf16": plan_bf16}


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


def convert(source: str | Path, output: str | Path, target: str = "bf16", recipe: str | Path | None = None,
            resume: bool = False, force: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD,
            progress: bool = True) -> ConvertSummary:
    source, output = Path(source), Path(output)
    if target not in PLANNERS:
        raise QuantkitError(f"--to {target}: not available (available: {', '.join(PLANNERS)})")
    check_paths(source, output)
    reader = CheckpointReader(source)
    rec = Recipe.load(recipe or target)
    if rec.target != target:
        raise QuantkitError(f"recipe {rec.name!r} is for --to {rec.target}, not --to {target}")
    plan = PLANNERS[target](reader, rec)
    shards = plan_shards(plan.tensors, max_shard_bytes)
    job = {
        "quantkit": __version__,
        "source": reader.fingerprint(),
        "recipe": rec.digest(),
        "target": target,
        "max_shard_bytes": max_shard_bytes,
    }
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
            for shard in shards:
                if folder.verified(shard):
                    reused += 1
                    for t in shard.tensors:
                        on_tensor(t)
                    continue
                folder.write_shard(shard, plan.produce, on_tensor)
                read += sum(plan.read_bytes(t) for t in shard.tensors)
                written += 1
                if crash_after and written >= crash_after:
                    os._exit(137)
        finally:
            # Also on an error (disk full, unreadable tensor): an open bar leaves the cursor mid-line, and the
            # CLI's one-line error must start a line of its own.
            if bar is not None:
                bar.close()
            bar_units.close()
        aux = aux_files(source, plan.config)
        folder.finish(shards, aux)
        total_written = folder.written_bytes + sum(len(d) for d in aux.values())
    reader.close()
    return ConvertSummary(
        output=output,
        shards=len(shards),
        shards_reused=reused,
        tensors=len(plan.tensors),
        bytes_read=read,
        bytes_written=total_written,
        seconds=time.perf_counter() - start,
        peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )
