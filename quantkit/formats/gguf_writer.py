"""GGUF files written as a stream: everything but the tensor data is known up front, the data follows in order.

    infos = [TensorInfo("token_embd.weight", (2048, 256), "Q8_0"), ...]      # torch order: ne0 is the LAST dim
    splits = plan_splits(infos, max_bytes=45 * 10**9)                          # tensors never cross a split
    for no, part in enumerate(splits):
        kv = metadata if no == 0 else []                                      # only the first split holds metadata
        w = GGUFStreamWriter(folder / split_name("model-Q4_K_M", no, len(splits)), kv + split_kv(no, ...), part)
        w.open()                                                              # header, KV, tensor infos, padding
        for t in part:
            w.begin_tensor(t.name)
            for chunk in produce(t):                                          # e.g. one expert's rows at a time
                w.write(chunk)
            w.end_tensor()                                                    # checks the size, pads to alignment
        digest = w.close()                                                    # fsync, rename .partial -> final

The writer is an explicit state machine (new -> header written -> in a tensor -> between tensors -> closed) that
fails fast: a tensor out of order, a byte too many or too few, or closing early raises at once, before a wrong file
can be renamed into place. The file is written to `.NAME.partial` and renamed only when complete, so a crash never
leaves a file that looks finished. A sha256 of every byte written is kept as it goes (for the resume manifest).

Layout (GGUF v3, little-endian; gguf.cpp): "GGUF", u32 version, u64 n_tensors, u64 n_kv; each KV as a string key,
u32 value type and value (arrays: u32 element type, u64 count, elements); each tensor info as name, u32 n_dims,
u64 ne[n_dims] (fastest first, trailing 1s dropped), u32 ggml type, u64 offset relative to the data section; zero
padding to the alignment; the data, each tensor padded to the alignment. The alignment is general.alignment when
present, else 32. Splits follow llama.cpp's gguf-split: `PREFIX-%05d-of-%05d.gguf`, the first holds all metadata,
each holds split.no (u16), split.tensors.count (i32, total) and split.count (u16), in that order, after the rest.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from quantkit.checkpoint.safetensors_file import fsync_dir
from quantkit.errors import QuantkitError

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
DEFAULT_ALIGNMENT = 32
SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS = "split.no", "split.count", "split.tensors.count"

_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


def qtype_id(qtype: str) -> GGMLQuantizationType:
    try:
        return GGMLQuantizationType[qtype]
    except KeyError:
        raise QuantkitError(f"unknown GGML type {qtype!r}") from None


def row_bytes(qtype: str, n: int) -> int:
    """Bytes of one row of n values in qtype; n must be a multiple of the type's block."""
    block, size = GGML_QUANT_SIZES[qtype_id(qtype)]
    if n % block:
        raise QuantkitError(f"a row of {n} values is not a multiple of {qtype}'s block of {block}")
    return n // block * size


def pad(n: int, alignment: int) -> int:
    return -n % alignment


@dataclass(frozen=True)
class KV:
    """One metadata entry. For arrays, vtype is ARRAY and item the element type."""

    key: str
    vtype: GGUFValueType
    value: Any
    item: GGUFValueType | None = None


def kv_u32(key: str, v: int) -> KV:
    return KV(key, GGUFValueType.UINT32, int(v))


def kv_f32(key: str, v: float) -> KV:
    return KV(key, GGUFValueType.FLOAT32, float(v))


def kv_str(key: str, v: str) -> KV:
    return KV(key, GGUFValueType.STRING, str(v))


def kv_bool(key: str, v: bool) -> KV:
    return KV(key, GGUFValueType.BOOL, bool(v))


def kv_array(key: str, item: GGUFValueType, values: Sequence) -> KV:
    return KV(key, GGUFValueType.ARRAY, list(values), item)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file: name, shape in torch order (the last dimension is GGUF's ne0), GGML type."""

    name: str
    shape: tuple[int, ...]
    qtype: str

    @property
    def ne(self) -> tuple[int, ...]:
        """GGUF dimensions, fastest first, with trailing 1s dropped as ggml_n_dims does (at least one)."""
        ne = list(reversed(self.shape))
        while len(ne) > 1 and ne[-1] == 1:
            ne.pop()
        return tuple(ne)

    @property
    def nbytes(self) -> int:
        rows = math.prod(self.shape[:-1])
        return rows * row_bytes(self.qtype, self.shape[-1])


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value(vtype: GGUFValueType, value: Any) -> bytes:
    if vtype == GGUFValueType.STRING:
        return _string(value)
    return struct.pack(_SCALAR[vtype], value)


def encode_kv(kv: KV) -> bytes:
    out = [_string(kv.key), struct.pack("<I", int(kv.vtype))]
    if kv.vtype == GGUFValueType.ARRAY:
        assert kv.item is not None, kv.key
        out.append(struct.pack("<IQ", int(kv.item), len(kv.value)))
        if kv.item == GGUFValueType.STRING:
            out.extend(_string(v) for v in kv.value)
        elif kv.value:
            # numeric arrays (token types: 200064 entries) packed at once, not one struct call per element
            dt = np.dtype(_SCALAR[kv.item])
            out.append(np.asarray(kv.value, dtype=dt).tobytes())
    else:
        out.append(_value(kv.vtype, kv.value))
    return b"".join(out)


def alignment_of(kvs: Sequence[KV]) -> int:
    for kv in kvs:
        if kv.key == "general.alignment":
            a = int(kv.value)
            if a <= 0 or a & (a - 1) or kv.vtype != GGUFValueType.UINT32:
                raise QuantkitError(f"general.alignment {a}: must be a u32 power of two")
            return a
    return DEFAULT_ALIGNMENT


def encode_header(kvs: Sequence[KV], tensors: Sequence[TensorInfo]) -> tuple[bytes, list[int]]:
    """Everything before the data section (padding included), and each tensor's offset within the data."""
    keys = [kv.key for kv in kvs]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise QuantkitError(f"GGUF metadata: duplicate keys {dup}")
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise QuantkitError("GGUF tensors: duplicate names")
    alignment = alignment_of(kvs)
    parts = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(kvs))]
    parts += [encode_kv(kv) for kv in kvs]
    offsets, off = [], 0
    for t in tensors:
        ne = t.ne
        parts.append(_string(t.name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, int(qtype_id(t.qtype)), off))
        offsets.append(off)
        off += t.nbytes + pad(t.nbytes, alignment)
    head = b"".join(parts)
    return head + bytes(pad(len(head), alignment)), offsets


# ---- splits --------------------------------------------------------------------------------------------------


def plan_splits(tensors: Sequence[TensorInfo], max_bytes: int, alignment: int = DEFAULT_ALIGNMENT
                ) -> list[list[TensorInfo]]:
    """Tensors, in order, into splits of at most max_bytes of padded tensor data (gguf-split counts the same way;
    a tensor larger than max_bytes goes alone). Metadata is not counted: it is a few MB against tens of GB."""
    splits: list[list[TensorInfo]] = [[]]
    size = 0
    for t in tensors:
        n = t.nbytes + pad(t.nbytes, alignment)
        if splits[-1] and size + n > max_bytes:
            splits.append([])
            size = 0
        splits[-1].append(t)
        size += n
    return splits


def split_name(prefix: str, no: int, count: int) -> str:
    """llama.cpp's llama_split_path: PREFIX-00001-of-00003.gguf; a single file is PREFIX.gguf."""
    return f"{prefix}.gguf" if count == 1 else f"{prefix}-{no + 1:05d}-of-{count:05d}.gguf"


def split_kv(no: int, count: int, n_tensors: int) -> list[KV]:
    """The keys gguf-split appends to every split, in its order. None for an unsplit file."""
    if count == 1:
        return []
    return [KV(SPLIT_NO, GGUFValueType.UINT16, no), KV(SPLIT_TENSORS, GGUFValueType.INT32, n_tensors),
            KV(SPLIT_COUNT, GGUFValueType.UINT16, count)]


# ---- the writer ----------------------------------------------------------------------------------------------


class GGUFStreamWriter:
    """One GGUF file, its header planned at construction, its tensors written in plan order."""

    def __init__(self, path: str | Path, kvs: Sequence[KV], tensors: Sequence[TensorInfo]):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.partial")
        self.tensors = list(tensors)
        self.alignment = alignment_of(kvs)
        self.header, self.offsets = encode_header(kvs, self.tensors)
        last = self.tensors[-1].nbytes + pad(self.tensors[-1].nbytes, self.alignment) if self.tensors else 0
        self.nbytes = len(self.header) + (self.offsets[-1] + last if self.tensors else 0)
        self.state = "new"
        self._f = None
        self._hash = hashlib.sha256()
        self._index = 0  # the next tensor to write
        self._left = 0  # bytes still due for the current tensor

    def _expect(self, *states: str) -> None:
        if self.state not in states:
            raise RuntimeError(f"{self.path.name}: GGUF writer is {self.state}, expected {' or '.join(states)}")

    def _put(self, data) -> None:
        mv = memoryview(data).cast("B")
        self._hash.update(mv)
        while mv:
            mv = mv[self._f.write(mv):]

    def open(self) -> None:
        self._expect("new")
        self._f = open(self.tmp, "wb", buffering=0)
        self._put(self.header)
        self.state = "between"

    def begin_tensor(self, name: str) -> TensorInfo:
        self._expect("between")
        if self._index >= len(self.tensors):
            raise RuntimeError(f"{self.path.name}: tensor {name!r} is beyond the planned {len(self.tensors)}")
        t = self.tensors[self._index]
        if t.name != name:
            raise RuntimeError(f"{self.path.name}: tensor {name!r} written where {t.name!r} is planned")
        self._left = t.nbytes
        self.state = "tensor"
        return t

    def write(self, data) -> None:
        """Append bytes (bytes, a memoryview, or a contiguous uint8 numpy array) to the current tensor."""
        self._expect("tensor")
        n = memoryview(data).nbytes
        if n > self._left:
            t = self.tensors[self._index]
            raise RuntimeError(f"{self.path.name}: tensor {t.name!r} got more than its {t.nbytes} bytes")
        self._put(data)
        self._left -= n

    def end_tensor(self) -> None:
        self._expect("tensor")
        t = self.tensors[self._index]
        if self._left:
            raise RuntimeError(f"{self.path.name}: tensor {t.name!r} ended {self._left} bytes short")
        self._put(bytes(pad(t.nbytes, self.alignment)))
        self._index += 1
        self.state = "between"

    def close(self) -> str:
        """Flush, fsync and rename into place; the sha256 of the file."""
        self._expect("between")
        if self._index != len(self.tensors):
            raise RuntimeError(f"{self.path.name}: closed after {self._index} of {len(self.tensors)} tensors")
        os.fsync(self._f.fileno())
        self._f.close()
        self._f = None
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        self.state = "closed"
        return self._hash.hexdigest()

    def abort(self) -> None:
        """Drop the partial file (on any error): nothing half-written is left under a final name."""
        if self._f is not None:
            self._f.close()
            self._f = None
        self.tmp.unlink(missing_ok=True)
        self.state = "closed"


def file_sha256(path: Path, chunk: int = 64 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
