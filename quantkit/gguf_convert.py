"""`quantkit convert --to gguf`: a checkpoint (BF16 or the official block FP8) streamed into llama.cpp GGUF files.

    summary = convert_gguf("MiniMax-M2", "out/", qtype="q4_k_m", imatrix="imatrix.gguf", split_max_bytes=45 * 10**9)
    # out/MiniMax-M2-Q4_K_M-00001-of-00003.gguf ... (or out/MiniMax-M2-Q4_K_M.gguf when it fits in one split)

The output is a folder, like every other target: it holds the GGUF file (or its splits, named as llama.cpp's
gguf-split names them), the resume manifest and, while running, the lock. The file prefix is the source folder's
name and the type (`--name` replaces the first part). Every split's header (metadata, tensor infos, offsets) is
computed from config.json, the tokenizer and the recipe before any weight is read; the data then streams tensor by
tensor, and a stacked expert tensor expert by expert: each expert's weight is read (FP8 dequantized exactly),
quantized with its own imatrix slice and written, so memory holds one expert, never a layer's stack, and the disk
holds the output once. Each split is written to `.NAME.partial`, fsynced and renamed, then recorded in the manifest
with its sha256; `--resume` keeps the splits that still hash to their record and redoes the rest, byte-identical.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

from quantkit import __version__
from quantkit.checkpoint import CheckpointReader, OutputFolder
from quantkit.errors import QuantkitError
from quantkit.formats import gguf_quants
from quantkit.formats.gguf_minimax import GGUFTensor, metadata, plan_tensors
from quantkit.formats.gguf_writer import (
    GGUFStreamWriter,
    alignment_of,
    encode_header,
    file_sha256,
    plan_splits,
    split_kv,
    split_name,
)
from quantkit.formats.imatrix import ImatrixData
from quantkit.recipe import Recipe

TYPES = ("bf16", "f16", "q8_0", "q4_k", "q5_k", "q6_k", "q4_k_m", "q5_k_m")
DEFAULT_SPLIT = 45 * 10**9  # below the Hugging Face Hub's 50 GB per-file limit
CHUNK_BYTES = 64 << 20  # float32 rows quantized at once for 2-D tensors (embeddings: 200064 rows)


# ---- quantizers: the one call site -----------------------------------------------------------------------------


def quantize_rows(x: torch.Tensor, qtype: str, imatrix: np.ndarray | None = None, name: str | None = None,
                  device: str = "cpu") -> np.ndarray:
    """float32 rows [rows, n] -> the GGML bytes of qtype [rows, row_bytes], as a uint8 numpy array.

    F32/F16/BF16 are casts (round to nearest even, as gguf-py's and ggml's conversions). Every block type (Q8_0,
    the k-quants, the legacy fallback types) comes from quantkit.formats.gguf_quants, byte-identical to ggml's
    ggml_quantize_chunk. The imatrix (one weight per column) matters to the k-quants and the fallback types.
    device: where the block types are computed (the k-quant search is ~100x faster on a GPU); bytes come back.
    """
    x = x.detach().to(torch.float32).contiguous().cpu()
    if qtype == "F32":
        return x.numpy().view(np.uint8).reshape(x.shape[0], -1)
    if qtype == "F16":
        return x.to(torch.float16).view(torch.int16).numpy().view(np.uint8).reshape(x.shape[0], -1)
    if qtype == "BF16":
        return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8).reshape(x.shape[0], -1)
    im = None if imatrix is None else torch.from_numpy(np.ascontiguousarray(imatrix, dtype=np.float32)).to(device)
    out = gguf_quants.quantize(x.to(device), qtype, imatrix=im, name=name)
    return out.cpu().numpy().reshape(x.shape[0], -1)


def dequantize_rows(data: np.ndarray, qtype: str, shape: tuple[int, ...], device: str = "cpu") -> torch.Tensor:
    """GGML bytes -> float32 [rows, n] (bit-identical to ggml's dequantize_row_* and gguf.quants.dequantize)."""
    return gguf_quants.dequantize(torch.from_numpy(np.ascontiguousarray(data)).to(device), qtype, shape)


class ErrorTally:
    """Relative RMS quantization error per tensor, summed over the chunks it is produced in."""

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = {}

    def add(self, name: str, x: torch.Tensor, data: np.ndarray, qtype: str, device: str = "cpu") -> None:
        if qtype == "F32":
            return
        x = x.to(device)
        diff = dequantize_rows(data, qtype, tuple(x.shape), device).sub_(x)
        acc = self.sums.setdefault(name, [0.0, 0.0])
        acc[0] += float(torch.dot(diff.view(-1), diff.view(-1)))
        acc[1] += float(torch.dot(x.reshape(-1), x.reshape(-1)))

    def rel_rms(self, name: str) -> float | None:
        acc = self.sums.get(name)
        return None if acc is None else (acc[0] / acc[1]) ** 0.5 if acc[1] > 0 else 0.0


# ---- imatrix -------------------------------------------------------------------------------------------------


def load_imatrix(path: Path, plan: list[GGUFTensor]) -> tuple[dict[str, np.ndarray], dict]:
    """llama.cpp's imatrix (GGUF or legacy .dat, read by quantkit.formats.imatrix) per planned tensor: the mean
    squared input per column, [n_expert, ne0] for stacked experts (1.0 for an expert no token reached) or [1, ne0];
    refuses a file made for another model. Also what llama-quantize records of it in the metadata."""
    if not path.is_file():
        raise QuantkitError(f"--imatrix {path}: no such file")
    if path.suffix == ".safetensors":  # statistics from `quantkit calibrate`, per expert
        from quantkit.calibrate.imatrix import stats_to_imatrix
        from quantkit.calibrate.stats import CalibrationStats

        data = stats_to_imatrix(CalibrationStats.load(path))
    else:
        data = ImatrixData.load(path)
    by_name = {t.name: t for t in plan}
    foreign = [n for n in data.names() if n not in by_name]
    if foreign:
        raise QuantkitError(f"--imatrix {path}: names tensors this model does not have ({', '.join(foreign[:3])}"
                            f"{', ...' if len(foreign) > 3 else ''}): made for another model?")
    out = {}
    for name in data.names():
        t = by_name[name]
        try:
            im = data.for_weight(name, t.info.shape)
        except QuantkitError as e:
            raise QuantkitError(f"--imatrix {path}: {e}: made for another model?") from None
        if im is not None:
            out[name] = im.reshape(-1, t.info.shape[-1]).numpy()
    info = {"file": path.name, "entries": len(out), "chunks": data.chunk_count or None,
            "dataset": data.datasets[0] if data.datasets else None}
    return out, info


# ---- producing one tensor's bytes ----------------------------------------------------------------------------


def _weight(reader: CheckpointReader, name: str) -> torch.Tensor:
    """FP8 weights dequantized exactly to float32; others as stored (cast per chunk, so an embedding is never held
    in float32 in full)."""
    return reader.weight(name, torch.float32) if reader.is_fp8(name) else reader.tensor(name)


def produce(reader: CheckpointReader, t: GGUFTensor, imatrix: np.ndarray | None,
            errors: ErrorTally | None = None, device: str = "cpu") -> Iterator[np.ndarray]:
    """The tensor's GGML bytes in order, one block of rows (or one expert) at a time."""
    qtype = t.info.qtype

    def piece(x: torch.Tensor, im: np.ndarray | None) -> np.ndarray:
        data = quantize_rows(x, qtype, im, t.name, device)
        if errors is not None:
            errors.add(t.name, x, data, qtype, device)
        return data

    if t.kind == "expert":
        for e, src in enumerate(t.sources):  # expert by expert: rows of expert e follow those of expert e-1
            w = _weight(reader, src).float()
            yield piece(w, None if imatrix is None else imatrix[e])
            del w
        return
    w = _weight(reader, t.sources[0])
    if w.dim() == 1:
        yield piece(w.float().reshape(1, -1), None)
        return
    step = max(1, CHUNK_BYTES // (4 * w.shape[-1]))
    for lo in range(0, w.shape[0], step):
        yield piece(w[lo:lo + step].float(), None if imatrix is None else imatrix[0])


# ---- the conversion ------------------------------------------------------------------------------------------


def _verified(folder: OutputFolder, file: str, header: bytes, nbytes: int) -> bool:
    rec = folder.manifest["shards"].get(file)
    path = folder.path / file
    if not (isinstance(rec, dict) and path.is_file() and path.stat().st_size == nbytes):
        return False
    if rec.get("header") != hashlib.sha256(header).hexdigest():
        return False
    return rec.get("sha256") == file_sha256(path)


def convert_gguf(source: str | Path, output: str | Path, qtype: str = "q8_0", recipe: str | Path | None = None,
                 imatrix: str | Path | None = None, split_max_bytes: int = DEFAULT_SPLIT, resume: bool = False,
                 force: bool = False, progress: bool = True, name: str | None = None, device: str = "cpu",
                 hub=None):
    """`hub` (quantkit.hub.source.HubSource, whose folder is `source`): shards are fetched as the first tensor in
    them is read and deleted once no later GGUF tensor needs them, so the disk holds a few source shards at once."""
    from quantkit.convert import ConvertSummary, check_paths

    source, output = Path(source), Path(output)
    qtype = qtype.lower()  # Q4_K_M as llama.cpp spells it, or q4_k_m
    if qtype not in TYPES:
        raise QuantkitError(f"--type {qtype}: not a GGUF type quantkit writes (choose from {', '.join(TYPES)})")
    if device != "cpu" and not (device.startswith("cuda") and torch.cuda.is_available()):
        raise QuantkitError(f"--device {device}: not available here (cpu, or cuda on a machine with a GPU)")
    if split_max_bytes < 1:
        raise QuantkitError("--split-max-size must be positive")
    if name is not None and (not name or "/" in name or "\\" in name or name.startswith(".")):
        raise QuantkitError(f"--name {name!r}: must be a plain file name prefix (no slashes, no leading dot)")
    check_paths(source, output)
    reader = CheckpointReader(source, remote=hub)
    stem = hub.repo_id.split("/")[-1] if hub is not None else source.resolve().name  # not the download folder's
    rec = Recipe.load(recipe or f"gguf-{qtype}")
    if rec.target != "gguf":
        raise QuantkitError(f"recipe {rec.name!r} is for --to {rec.target}, not --to gguf")
    plan = plan_tensors(reader.config, rec)
    imat, imat_info, imat_digest = {}, None, None
    if imatrix is not None:
        path = Path(imatrix)
        imat, imat_info = load_imatrix(path, plan)
        imat_digest = file_sha256(path)
    kvs = metadata(reader.config, source, rec, name=name, imatrix=imat_info, stem=stem)
    alignment = alignment_of(kvs)
    infos = [t.info for t in plan]
    groups = plan_splits(infos, split_max_bytes, alignment)
    by_name = {t.name: t for t in plan}
    prefix = f"{name or stem}-{rec.options.get('type_name', qtype.upper())}"
    files = []
    for no, group in enumerate(groups):
        split_meta = [kv for kv in kvs if no == 0 or kv.key == "general.alignment"]
        files.append((split_name(prefix, no, len(groups)), split_meta + split_kv(no, len(groups), len(infos)), group))
    job = {"quantkit": __version__, "source": reader.fingerprint(), "recipe": rec.digest(), "target": "gguf",
           "type": qtype, "imatrix": imat_digest, "split_max_bytes": split_max_bytes, "name": prefix}
    if hub is not None:
        job["hub_source"] = hub.spec  # repo@commit, as the safetensors targets record it
        # Release granularity is one GGUF tensor (a split can be most of the model): each releases what no later
        # tensor reads. A GGUF tensor reads its HF sources (all experts of a layer, for stacked ones) and their
        # FP8 scales, which plan_release adds by name.
        hub.plan_release(reader, [SimpleNamespace(tensors=[SimpleNamespace(name=s, unit=None) for s in t.sources])
                                  for g in groups for t in (by_name[i.name] for i in g)])
    last_of: list[int] = list(itertools.accumulate(len(g) for g in groups))  # tensor count through each split
    crash_after = int(os.environ.get("QUANTKIT_CRASH_AFTER_SHARDS", "0"))  # fault injection for resume tests
    start = time.perf_counter()
    read = reused = written = bytes_out = 0
    tally = ErrorTally()
    total = sum(len(encode_header(k, g)[0]) + sum(t.nbytes for t in g) for _, k, g in files)
    with OutputFolder.open(output, job, resume=resume, force=force) as folder:
        if force and not folder.manifest["shards"]:
            for p in folder.path.glob("*.gguf"):  # another job's files: --force said they may go
                p.unlink()
        folder._save_manifest()  # the job is on record before the first byte: a crash in split 1 is resumable
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="gguf", disable=not progress)
        try:
            for no, (file, split_meta, group) in enumerate(files):
                writer = GGUFStreamWriter(folder.path / file, split_meta, group)
                if _verified(folder, file, writer.header, writer.nbytes):
                    reused += 1
                    bar.update(writer.nbytes)
                    if hub is not None:  # a finished split reads nothing: what only it needed can go
                        hub.shard_done(last_of[no] - 1, reader)
                    continue
                folder.manifest["shards"].pop(file, None)
                try:
                    writer.open()
                    bar.update(len(writer.header))
                    for k, info in enumerate(group):
                        t = by_name[info.name]
                        writer.begin_tensor(t.name)
                        for chunk in produce(reader, t, imat.get(t.name), tally, device):
                            writer.write(chunk)
                            bar.update(chunk.nbytes)
                        writer.end_tensor()
                        read += sum(reader.entry(s).nbytes for s in t.sources)
                        if hub is not None:
                            hub.shard_done(last_of[no] - len(group) + k, reader)
                    digest = writer.close()
                except OSError as e:
                    writer.abort()
                    raise QuantkitError(f"{folder.path / file}: write failed ({e.strerror}); free space and rerun "
                                        "with --resume") from None
                except BaseException:
                    writer.abort()
                    raise
                rel = {t.name: tally.rel_rms(t.name) for t in group if tally.rel_rms(t.name) is not None}
                folder.manifest["shards"][file] = {"bytes": writer.nbytes, "sha256": digest, "rel_rms": rel,
                                                   "header": hashlib.sha256(writer.header).hexdigest()}
                folder._save_manifest()
                written += 1
                bytes_out += writer.nbytes
                if crash_after and written >= crash_after:
                    os._exit(137)
        finally:
            bar.close()
        folder.manifest["complete"] = True
        folder._save_manifest()
        errors = {n: e for r in folder.manifest["shards"].values() for n, e in r.get("rel_rms", {}).items()}
    reader.close()
    if hub is not None:
        hub.finish()
    return ConvertSummary(
        output=output,
        shards=len(files),
        shards_reused=reused,
        tensors=len(plan),
        bytes_read=read,
        bytes_written=bytes_out,
        seconds=time.perf_counter() - start,
        peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        errors=errors,
        kinds={t.name: t.kind for t in plan},
        source_lines=hub.lines() if hub is not None else [],
    )
