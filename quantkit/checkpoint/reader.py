"""Lazy reader for sharded safetensors checkpoints of the MiniMax-M2 family.

    reader = CheckpointReader("MiniMax-M2")           # validates config, index, every shard header
    w = reader.weight("model.layers.0.self_attn.q_proj.weight")   # bf16, dequantized if stored as block FP8
    raw = reader.tensor("model.layers.0.self_attn.q_proj.weight") # as stored (float8_e4m3fn)

Everything the conversion will need is checked when the reader opens, before any output is written: shard names
that escape the folder, missing or truncated shards, corrupt headers, missing tensors and shapes that contradict
config.json, pickled `.bin` weights (refused, never unpickled). Tensors are then read one at a time through
`safe_open`. Its memory map keeps every page it has touched resident while the handle is open, so one handle is
open at a time and it is reopened after READ_WINDOW bytes: resident memory stays bounded whatever the shard size.

With `remote=` (quantkit.hub.source.HubSource) the shards need not be on disk yet: their headers come from the
remote store, and a shard is fetched the first time a tensor in it is read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from quantkit.arch import MiniMaxM2Config, TensorSpec, warn_extra_layers
from quantkit.checkpoint.fp8 import dequantize_block_fp8
from quantkit.checkpoint.safetensors_file import TensorEntry, read_header
from quantkit.errors import QuantkitError

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SCALE_SUFFIX = "_scale_inv"
CHANNEL_SCALE_SUFFIX = "_scale"  # compressed-tensors: weight_scale
READ_WINDOW = 512 << 20
PREFETCH = 256 << 20


def _is_channel_fp8(q: dict | None) -> bool:
    """A compressed-tensors float-quantized checkpoint with per-channel 8-bit float weights."""
    if not q or q.get("quant_method") != "compressed-tensors":
        return False
    for group in (q.get("config_groups") or {}).values():
        w = group.get("weights") or {}
        if w.get("type") == "float" and w.get("num_bits") == 8 and w.get("strategy") == "channel":
            return True
    return False


def _shard_path(folder: Path, name: object, where: str) -> Path:
    """Resolve a shard name from an index, refusing anything that would leave the checkpoint folder."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
        raise QuantkitError(f"{where}: shard name {name!r} is not a plain file name inside the checkpoint folder")
    path = folder / name
    real, root = os.path.realpath(path), os.path.realpath(folder)
    if os.path.dirname(real) != root:
        raise QuantkitError(f"{where}: shard {name!r} resolves outside the checkpoint folder ({real})")
    return path


def _pickle_error(path: Path) -> QuantkitError:
    return QuantkitError(
        f"{path}: pickled weights are refused (unpickling runs arbitrary code); convert them to safetensors first"
    )


class CheckpointReader:
    def __init__(self, folder: str | Path, remote=None):
        self.folder = Path(folder)
        self.remote = remote  # shard_names(), has(name), header(path), ensure(path): shards fetched on demand
        if not self.folder.is_dir():
            raise QuantkitError(f"{self.folder}: no such checkpoint folder")
        self.config = MiniMaxM2Config.from_folder(self.folder)
        self.shards = self._find_shards()
        self.entries: dict[str, TensorEntry] = {}
        for shard in self.shards:
            entries, _ = self.remote.header(shard) if self.remote else read_header(shard)
            for name, entry in entries.items():
                if name in self.entries:
                    raise QuantkitError(f"{shard}: tensor {name!r} is also stored in {self.entries[name].file.name}")
                self.entries[name] = entry
        self._check_index()
        kept = set(warn_extra_layers(self.config, list(self.entries)))
        self.entries = {n: e for n, e in self.entries.items() if n in kept}
        self.block = self.config.weight_block_size if self.config.block_fp8 else None
        self.channel_fp8 = _is_channel_fp8(self.config.quantization_config)
        self._check_tensors()
        self._open: list | None = None  # [shard, safe_open handle, bytes read through it]
        self._ahead: tuple | None = None  # (fd, prefetched up to this offset, shard)

    # ---- discovery and validation --------------------------------------------------------------------------

    def _find_shards(self) -> list[Path]:
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                data = json.loads(index.read_text())
                weight_map = data["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError
            except (OSError, ValueError, KeyError, TypeError):
                raise QuantkitError(f"{index}: corrupt index (no weight_map object)") from None
            self._weight_map = weight_map
            shards = []
            for name in dict.fromkeys(weight_map.values()):
                path = _shard_path(self.folder, name, str(index))
                if path.suffix in PICKLE_SUFFIXES:  # else refused as a "corrupt safetensors header": misleading
                    raise _pickle_error(path)
                if not path.is_file() and not (self.remote and self.remote.has(path.name)):
                    raise QuantkitError(f"{path}: missing shard (listed in {INDEX_NAME})")
                shards.append(path)
            return shards
        self._weight_map = None
        if self.remote:
            singles = [self.folder / n for n in self.remote.shard_names()]
        else:
            singles = sorted(self.folder.glob("*.safetensors"))
        if singles:
            if len(singles) > 1:
                raise QuantkitError(f"{self.folder}: {len(singles)} safetensors files but no {INDEX_NAME}")
            return singles
        pickled = sorted(p.name for p in self.folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise _pickle_error(self.folder / pickled[0])
        raise QuantkitError(f"{self.folder}: no safetensors weights found")

    def _check_index(self) -> None:
        if self._weight_map is None:
            return
        for name, shard in self._weight_map.items():
            entry = self.entries.get(name)
            if entry is None:
                raise QuantkitError(f"{self.folder / shard}: tensor {name!r} listed in the index is not in the shard")
            if entry.file.name != shard:
                raise QuantkitError(f"{INDEX_NAME}: tensor {name!r} is listed in {shard}, stored in {entry.file.name}")

    def _check_tensors(self) -> None:
        for spec in self.config.expected_tensors().values():
            entry = self.entries.get(spec.name)
            if entry is None:
                raise QuantkitError(f"{self.folder}: tensor {spec.name!r} is missing from the checkpoint")
            if entry.shape != spec.shape:
                raise QuantkitError(
                    f"{entry.file}: tensor {spec.name!r} has shape {list(entry.shape)}, config.json implies "
                    f"{list(spec.shape)}"
                )
            if entry.dtype == "F8_E4M3" and self.channel_fp8 and spec.is_linear:
                scale = self.entries.get(spec.name + CHANNEL_SCALE_SUFFIX)
                if scale is None:
                    raise QuantkitError(f"{self.folder}: tensor {spec.name + CHANNEL_SCALE_SUFFIX!r} is missing")
                if scale.shape != (spec.shape[0], 1):
                    raise QuantkitError(
                        f"{scale.file}: tensor {scale.name!r} has shape {list(scale.shape)}, "
                        f"expected {[spec.shape[0], 1]}"
                    )
            elif entry.dtype == "F8_E4M3":
                if not (self.block and spec.is_linear):
                    raise QuantkitError(f"{entry.file}: tensor {spec.name!r} is FP8; config.json declares no block FP8")
                scale = self.entries.get(spec.name + SCALE_SUFFIX)
                want = tuple(-(-d // b) for d, b in zip(spec.shape, self.block))
                if scale is None:
                    raise QuantkitError(f"{self.folder}: tensor {spec.name + SCALE_SUFFIX!r} is missing")
                if scale.shape != want:
                    raise QuantkitError(
                        f"{scale.file}: tensor {scale.name!r} has shape {list(scale.shape)}, expected {list(want)}"
                    )

    # ---- reading -------------------------------------------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise QuantkitError(f"{self.folder}: tensor {name!r} is not in the checkpoint") from None

    def is_fp8(self, name: str) -> bool:
        return self.entry(name).dtype == "F8_E4M3"

    def _handle(self, entry: TensorEntry, nbytes: int):
        """The shard's safe_open handle, reopened once READ_WINDOW bytes have been read through it."""
        if self.remote:
            self.remote.ensure(entry.file)  # downloaded (and checksummed) the first time one of its tensors is read
        slot = self._open
        if slot is None or slot[0] != entry.file or slot[2] + nbytes > READ_WINDOW:
            self._open = None  # one mapping at a time: drop the old one before opening
            try:
                slot = [entry.file, safe_open(str(entry.file), framework="pt"), 0]
            except Exception as e:  # safetensors raises its own error types
                raise QuantkitError(f"{entry.file}: cannot open shard ({e})") from None
            self._open = slot
        slot[2] += nbytes
        self._prefetch(entry)
        return slot[1]

    def _prefetch(self, entry: TensorEntry) -> None:
        """Ask the kernel to read ahead of the tensor being read, so that the next tensors' page faults find the
        data in the page cache instead of waiting for the disk (reads are sequential within a shard)."""
        fd, upto = self._ahead[:2] if self._ahead and self._ahead[2] == entry.file else (None, 0)
        if fd is None:
            if self._ahead:
                os.close(self._ahead[0])
            fd = os.open(entry.file, os.O_RDONLY)
        if entry.end + PREFETCH // 2 > upto:
            start = max(upto, entry.start)
            os.posix_fadvise(fd, start, PREFETCH, os.POSIX_FADV_WILLNEED)
            upto = start + PREFETCH
        self._ahead = (fd, upto, entry.file)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor exactly as stored."""
        entry = self.entry(name)
        try:
            if entry.nbytes <= READ_WINDOW // 2 or len(entry.shape) < 1:
                # get_tensor maps the data lazily: clone so that the copy owns its memory and the mapping can go.
                return self._handle(entry, entry.nbytes).get_tensor(name).clone()
            # A large tensor (embeddings, lm_head: 1.2 GB) is copied in blocks of rows, with the mapping dropped
            # between blocks, so that it is never resident twice.
            out = torch.empty(entry.shape, dtype=entry.torch_dtype)
            row = entry.nbytes // max(1, entry.shape[0])
            step = max(1, (READ_WINDOW // 4) // max(1, row))
            for lo in range(0, entry.shape[0], step):
                hi = min(lo + step, entry.shape[0])
                out[lo:hi] = self._handle(entry, READ_WINDOW).get_slice(name)[lo:hi]
            return out
        except QuantkitError:
            raise
        except Exception as e:
            raise QuantkitError(f"{entry.file}: cannot read tensor {name!r} ({e})") from None

    def weight(self, name: str, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The tensor as a floating-point weight: block FP8 dequantized exactly, others cast to dtype."""
        entry = self.entry(name)
        if entry.dtype != "F8_E4M3":
            return self.tensor(name).to(dtype)
        if self.channel_fp8:
            q = self.tensor(name)
            if int((q.view(torch.uint8) & 0x7F).max()) == 0x7F:
                raise QuantkitError(f"{entry.file}: FP8 weight {name!r} holds NaN")
            return (q.float() * self.tensor(name + CHANNEL_SCALE_SUFFIX).float()).to(dtype)
        scale = self.tensor(name + SCALE_SUFFIX)
        try:
            # Dequantization writes a new tensor, so it reads the mapped data directly: no copy of the input.
            w = self._handle(entry, entry.nbytes).get_tensor(name)
        except Exception as e:
            raise QuantkitError(f"{entry.file}: cannot read tensor {name!r} ({e})") from None
        return dequantize_block_fp8(w, scale, self.block, dtype, name)

    def close(self) -> None:
        self._open = None
        if self._ahead:
            os.close(self._ahead[0])
            self._ahead = None

    # ---- description ---------------------------------------------------------------------------------------

    def specs(self) -> list[TensorSpec]:
        return [t for u in self.config.units() for t in u.tensors]

    def source_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def fingerprint(self) -> str:
        """A digest of what the checkpoint holds: config.json and every header entry (name, dtype, shape, place).

        Cheap (no tensor data is read) and stable when the folder is copied or moved.
        """
        h = hashlib.sha256()
        h.update((self.folder / "config.json").read_bytes())
        for name in sorted(self.entries):
            e = self.entries[name]
            h.update(f"{name}|{e.file.name}|{e.dtype}|{e.shape}|{e.start}|{e.end}\n".encode())
        return h.hexdigest()
