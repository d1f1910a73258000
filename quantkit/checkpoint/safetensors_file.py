"""The safetensors container: header parsing with validation, and the dtype table.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping tensor names to
{dtype, shape, data_offsets} (offsets relative to the end of the header), and the raw data. Parsing it here,
before any tensor is touched, is what turns a truncated download or a corrupt header into one clear line
instead of a crash deep inside a conversion.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from quantkit.errors import QuantkitError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 << 20  # the safetensors library's own limit
ALIGN = 8  # tensor data offsets kept 8-byte aligned, as the reference writer does


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    file: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def dtype_size(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and validate a safetensors header. Returns (entries by name, __metadata__)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise QuantkitError(f"{path}: corrupt safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise QuantkitError(f"{path}: corrupt safetensors header (header length {n} exceeds the file)")
            raw = f.read(n)
    except OSError as e:
        raise QuantkitError(f"{path}: cannot read ({e.strerror})") from None
    return parse_header(path, raw, size)


def parse_header(path: Path, raw: bytes, size: int) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Validate the JSON header `raw` of a safetensors file of `size` bytes. The file itself is not read, so a
    shard that is still on a remote store is checked from its first bytes alone (quantkit.hub.source)."""
    n = len(raw)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # RecursionError: absurdly nested JSON
        raise QuantkitError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise QuantkitError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    entries: dict[str, TensorEntry] = {}
    data_end = 0
    for name, info in header.items():
        try:
            dtype, shape, (lo, hi) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            lo, hi = int(lo), int(hi)
            if not isinstance(dtype, str):  # a list or object would make the DTYPES lookup below raise TypeError
                raise TypeError(dtype)
        except (KeyError, TypeError, ValueError):
            raise QuantkitError(f"{path}: corrupt safetensors header (bad entry for tensor {name!r})") from None
        if dtype not in DTYPES:
            raise QuantkitError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        if lo < 0 or hi < lo or hi - lo != math.prod(shape) * dtype_size(dtype):
            raise QuantkitError(f"{path}: corrupt safetensors header (tensor {name!r} offsets disagree with its shape)")
        entries[name] = TensorEntry(path, name, dtype, shape, base + lo, base + hi)
        data_end = max(data_end, hi)
    if base + data_end > size:
        raise QuantkitError(
            f"{path}: truncated shard ({size} bytes on disk, header needs {base + data_end}); re-download it"
        )
    # The safetensors library refuses data that overlaps, leaves gaps or does not end at the end of the file, but
    # only when a tensor is read, mid-conversion: apply its rule here, before any output is written.
    pos = base
    for e in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if e.start != pos:
            raise QuantkitError(
                f"{path}: corrupt safetensors header (tensor {e.name!r} data does not start where the previous "
                "tensor's ends)"
            )
        pos = e.end
    if pos != size:
        raise QuantkitError(f"{path}: corrupt safetensors file ({size - pos} bytes after the last tensor's data)")
    return entries, meta


def encode_header(tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise a header for tensors laid out back to back in the given order. Returns the bytes to write
    before the data (length prefix included), padded with spaces so the data starts 8-byte aligned."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * dtype_size(dtype)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGN)
    return struct.pack("<Q", len(raw)) + raw


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
