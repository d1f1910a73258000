"""llama.cpp importance matrices (imatrix): read the GGUF and legacy .dat files, write the GGUF one.

    im = ImatrixData.load("imatrix.gguf")                 # or a legacy "imatrix.dat"
    im.get("blk.3.ffn_gate_exps.weight")                  # float32 [n_expert, n_embd]: mean x^2 per expert, column
    im.get("blk.3.attn_q.weight")                         # float32 [n_embd] for a dense weight
    im.for_weight("blk.3.ffn_down_exps.weight", (256, 3072, 1536))   # checked against the weight: [256, 1536]
    im = ImatrixData.from_stats({"blk.0.ffn_up_exps.weight": (sum_sq, counts)}, chunk_count=100, chunk_size=512)
    im.save("out.imatrix.gguf")

What is stored (specs/gguf-kquants.md §5): per weight, the raw sums of squared inputs `<name>.in_sum2`
([n_mat, ne0]; n_mat = n_expert for stacked experts, 1 for a dense weight) and `<name>.counts` (tokens seen per
expert, as float). What quantization uses is the mean, in_sum2 / count, with 1.0 (uniform) for every column of an
expert no token reached: `get` returns exactly that, ready for gguf_quants.quantize(..., imatrix=).

The legacy .dat stores the mean times a call count per entry, without the expert split, so its entries come back
flat [n_mat * ne0]; `get(name, n=...)` or `for_weight` give them their rows.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from quantkit.errors import QuantkitError

GGUF_MAGIC = b"GGUF"
_ALIGN = 32  # what llama.cpp's imatrix tool writes (no general.alignment key)
_GGUF_U32, _GGUF_STRING, _GGUF_ARRAY = 4, 8, 9


@dataclass
class ImatrixEntry:
    in_sum2: torch.Tensor  # float32 [n_mat, ne0]: sum over tokens of x_j^2 (legacy files: [1, n_mat * ne0])
    counts: torch.Tensor  # float32 [n_mat]: tokens (per expert) that reached it
    flat: bool = False  # from a legacy .dat: the expert split is unknown


@dataclass
class ImatrixData:
    entries: dict[str, ImatrixEntry] = field(default_factory=dict)  # keyed by the GGUF weight name
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_stats(cls, stats: Mapping[str, tuple[torch.Tensor, torch.Tensor | int | float]], *,
                   chunk_count: int, chunk_size: int, datasets: Sequence[str] = ()) -> ImatrixData:
        """stats: GGUF weight name -> (sum of squares [n_expert, n] or [n], token counts [n_expert] or a number),
        as the calibration forward collects them (per expert, per input channel of the weight)."""
        out = cls(datasets=list(datasets), chunk_count=int(chunk_count), chunk_size=int(chunk_size))
        for name, (sum_sq, counts) in stats.items():
            out.add(name, sum_sq, counts)
        return out

    def add(self, name: str, sum_sq: torch.Tensor, counts: torch.Tensor | int | float) -> None:
        """Accumulate statistics for one weight (sums and counts add, as llama.cpp merges imatrix files)."""
        s = torch.as_tensor(sum_sq).detach().to("cpu", torch.float32)
        s = s.reshape(1, -1) if s.dim() == 1 else s
        c = torch.as_tensor(counts).detach().to("cpu", torch.float32).reshape(-1)
        if s.dim() != 2 or c.numel() != s.shape[0]:
            raise QuantkitError(f"imatrix {name}: sums of shape {list(s.shape)} and counts of shape "
                                f"{list(c.shape)} do not pair up (want [n_expert, n] and [n_expert])")
        if not (torch.isfinite(s).all() and torch.isfinite(c).all()) or (c < 0).any():
            raise QuantkitError(f"imatrix {name}: non-finite sums or negative counts")
        old = self.entries.get(name)
        if old is not None:
            if old.flat or old.in_sum2.shape != s.shape:
                raise QuantkitError(f"imatrix {name}: cannot add sums of shape {list(s.shape)} to "
                                    f"{list(old.in_sum2.shape)}")
            s, c = old.in_sum2 + s, old.counts + c
        self.entries[name] = ImatrixEntry(s.clone(), c.clone())

    # ---------------------------------------------------------------- use

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return sorted(self.entries, key=lambda n: n.encode())

    def get(self, name: str, n: int | None = None) -> torch.Tensor | None:
        """The importance weights as llama-quantize computes them: float32 [n_expert, n] for stacked experts,
        [n] for a dense weight; None if the file has no entry (llama.cpp then quantizes without one).
        For a legacy entry pass n (the weight's row length) to get the [n_expert, n] form."""
        e = self.entries.get(name)
        if e is None:
            return None
        counts = torch.floor(e.counts + 0.5)  # llama.cpp reads counts with lround (half away from zero; >= 0)
        mean = e.in_sum2 / counts[:, None]
        mean = torch.where(counts[:, None] > 0, mean, torch.ones_like(mean))  # unseen expert: uniform weights
        if e.flat and n is not None:
            if mean.numel() % n:
                raise QuantkitError(f"imatrix {name}: {mean.numel()} values do not split into rows of {n}")
            mean = mean.reshape(-1, n)
        return mean[0] if mean.shape[0] == 1 else mean

    def for_weight(self, name: str, shape: Sequence[int]) -> torch.Tensor | None:
        """The imatrix argument of gguf_quants.quantize for weight `name` of torch shape [rows, n] or
        [n_expert, rows, n]: [n] or [n_expert, n]; None if absent. A size that is not n * n_expert is refused,
        as llama-quantize refuses it."""
        shape = tuple(int(s) for s in shape)
        n = shape[-1]
        n_mat = shape[0] if len(shape) == 3 else 1
        im = self.get(name, n)
        if im is None:
            return None
        if im.numel() != n * n_mat:
            raise QuantkitError(f"imatrix {name}: {im.numel()} values for a weight of shape {list(shape)} "
                                f"(want {n * n_mat})")
        return im.reshape(n_mat, n) if len(shape) == 3 else im.reshape(n)

    # ---------------------------------------------------------------- files

    @classmethod
    def load(cls, path: str | os.PathLike) -> ImatrixData:
        path = Path(path)
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise QuantkitError(f"{path}: cannot read imatrix file ({e.strerror})") from None
        return cls._load_gguf(path) if magic == GGUF_MAGIC else cls._load_legacy(path)

    @classmethod
    def _load_gguf(cls, path: Path) -> ImatrixData:
        from gguf import GGUFReader

        try:
            reader = GGUFReader(path)
        except Exception as e:  # gguf-py raises ValueError/struct.error/... on truncation or corruption
            raise QuantkitError(f"{path}: corrupt GGUF imatrix ({type(e).__name__}: {e})") from None

        def field_value(key: str):
            fld = reader.get_field(key)
            if fld is None:
                raise QuantkitError(f"{path}: not an imatrix file (no {key} key)")
            return fld.contents()

        out = cls(datasets=list(field_value("imatrix.datasets")), chunk_count=int(field_value("imatrix.chunk_count")),
                  chunk_size=int(field_value("imatrix.chunk_size")))
        tensors = {t.name: t for t in reader.tensors}
        for tname, t in tensors.items():
            if tname.endswith(".in_sum"):
                continue  # newer writers may add plain sums; quantization does not use them
            if not tname.endswith(".in_sum2"):
                if not tname.endswith(".counts"):
                    raise QuantkitError(f"{path}: unexpected tensor {tname} in an imatrix file")
                continue
            name = tname[: -len(".in_sum2")]
            ct = tensors.get(name + ".counts")
            if ct is None:
                raise QuantkitError(f"{path}: {tname} has no {name}.counts")
            s = torch.from_numpy(np.array(t.data, dtype=np.float32))
            c = torch.from_numpy(np.array(ct.data, dtype=np.float32)).reshape(-1)
            s = s.reshape(c.numel(), -1)
            if not (torch.isfinite(s).all() and torch.isfinite(c).all()):
                raise QuantkitError(f"{path}: non-finite values in {name}")
            out.entries[name] = ImatrixEntry(s, c)
        for tname in tensors:
            if tname.endswith(".counts") and tname[: -len(".counts")] not in out.entries:
                raise QuantkitError(f"{path}: {tname} has no matching .in_sum2")
        return out

    @classmethod
    def _load_legacy(cls, path: Path) -> ImatrixData:
        data = path.read_bytes()
        pos = 0

        def take(fmt: str):
            nonlocal pos
            size = struct.calcsize(fmt)
            if pos + size > len(data):
                raise QuantkitError(f"{path}: truncated legacy imatrix file (at byte {pos})")
            vals = struct.unpack_from(fmt, data, pos)
            pos += size
            return vals

        (n_entries,) = take("<i")
        if n_entries < 1 or n_entries > 1_000_000:
            raise QuantkitError(f"{path}: not an imatrix file (GGUF or legacy .dat): bad entry count {n_entries}")
        out = cls()
        for _ in range(n_entries):
            (ln,) = take("<i")
            if not 0 < ln <= 4096:
                raise QuantkitError(f"{path}: corrupt legacy imatrix (name length {ln})")
            name = take(f"<{ln}s")[0].decode("utf-8", "replace")
            ncall, nval = take("<ii")
            if nval < 1:
                raise QuantkitError(f"{path}: corrupt legacy imatrix ({name}: {nval} values)")
            vals = np.frombuffer(data, dtype="<f4", count=nval, offset=pos) if pos + 4 * nval <= len(data) else None
            if vals is None:
                raise QuantkitError(f"{path}: truncated legacy imatrix file (in {name})")
            pos += 4 * nval
            s = torch.from_numpy(vals.astype(np.float32)).reshape(1, -1)
            if not torch.isfinite(s).all():
                raise QuantkitError(f"{path}: non-finite values in {name}")
            # stored: mean * ncall; so sums = stored, count = ncall gives the reader's value / ncall
            out.entries[name] = ImatrixEntry(s, torch.tensor([float(max(ncall, 1))]), flat=True)
            out.chunk_count = max(out.chunk_count, ncall)
        if pos + 8 <= len(data):  # optional trailer: chunk count and dataset name
            (out.chunk_count,) = take("<i")
            (ln,) = take("<i")
            if 0 < ln <= len(data) - pos:
                out.datasets = [take(f"<{ln}s")[0].decode("utf-8", "replace")]
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write llama.cpp's GGUF imatrix layout, atomically (temporary name, fsync, rename)."""
        path = Path(path)
        if any(e.flat for e in self.entries.values()):
            raise QuantkitError(f"{path}: entries read from a legacy .dat have no raw sums to write as GGUF")
        kvs = [
            ("general.type", _GGUF_STRING, "imatrix"),
            ("imatrix.datasets", _GGUF_ARRAY, list(self.datasets)),
            ("imatrix.chunk_count", _GGUF_U32, self.chunk_count),
            ("imatrix.chunk_size", _GGUF_U32, self.chunk_size),
        ]
        tensors: list[tuple[str, np.ndarray]] = []
        for name in self.names():  # byte-wise sorted, each as the pair in_sum2, counts
            e = self.entries[name]
            n_mat = e.in_sum2.shape[0]
            s = e.in_sum2.numpy().astype("<f4")
            c = e.counts.numpy().astype("<f4")
            if n_mat == 1:
                tensors += [(name + ".in_sum2", s.reshape(-1)), (name + ".counts", c.reshape(1))]
            else:
                tensors += [(name + ".in_sum2", s), (name + ".counts", c.reshape(n_mat, 1))]
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                _write_gguf(f, kvs, tensors)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise QuantkitError(f"{path}: cannot write imatrix ({e.strerror})") from None
        return path


def _gguf_str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _write_gguf(f, kvs: list[tuple[str, int, object]], tensors: list[tuple[str, np.ndarray]]) -> None:
    """A GGUF v3 file of F32 tensors, alignment 32, KVs and tensors in the order given."""
    f.write(GGUF_MAGIC + struct.pack("<IQQ", 3, len(tensors), len(kvs)))
    for key, vtype, value in kvs:
        f.write(_gguf_str(key) + struct.pack("<I", vtype))
        if vtype == _GGUF_STRING:
            f.write(_gguf_str(value))
        elif vtype == _GGUF_U32:
            f.write(struct.pack("<I", value))
        else:  # array of strings
            f.write(struct.pack("<IQ", _GGUF_STRING, len(value)) + b"".join(_gguf_str(v) for v in value))
    offset = 0
    for name, arr in tensors:
        ne = list(reversed(arr.shape))  # fastest dimension first
        while len(ne) > 1 and ne[-1] == 1:  # ggml_n_dims drops trailing ones
            ne.pop()
        f.write(_gguf_str(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne))
        f.write(struct.pack("<IQ", 0, offset))  # type F32, offset in the data section
        offset += _pad(arr.nbytes)
    f.write(b"\0" * (_pad(f.tell()) - f.tell()))
    for _, arr in tensors:
        f.write(arr.tobytes())
        f.write(b"\0" * (_pad(arr.nbytes) - arr.nbytes))


def _pad(n: int) -> int:
    return math.ceil(n / _ALIGN) * _ALIGN
