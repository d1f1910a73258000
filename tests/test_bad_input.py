"""Bad input through the CLI: one `error:` line naming the culprit, a non-zero exit, no traceback, nothing written.

The session fixtures (tiny_bf16, tiny_fp8) are never modified: every test that corrupts a checkpoint corrupts a
copy in tmp_path.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import struct
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from safetensors import safe_open
from safetensors.torch import save_file

from quantkit.checkpoint import CheckpointReader
from quantkit.checkpoint.safetensors_file import read_header
from quantkit.errors import QuantkitError

INDEX = "model.safetensors.index.json"
LOCK = ".quantkit.lock"


# ---- helpers ---------------------------------------------------------------------------------------------------


def copy_ckpt(src: Path, tmp_path: Path, name: str = "src") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*.safetensors"))


def read_index(folder: Path) -> dict:
    return json.loads((folder / INDEX).read_text())


def write_index(folder: Path, index: dict) -> None:
    (folder / INDEX).write_text(json.dumps(index, indent=2))


def shard_of(folder: Path, tensor: str) -> Path:
    return folder / read_index(folder)["weight_map"][tensor]


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def convert(src: Path, out: Path, *extra: str):
    return run_cli(*convert_args(src, out, *extra))


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under folder, the folder itself included: kind, size, mtime and content digest. Equal snapshots
    of a source folder: nothing was written there, not even a file created and removed again."""
    snap = {".": ("dir", folder.stat().st_mtime_ns)}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        st = p.lstat()
        if p.is_symlink():
            snap[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            snap[rel] = ("dir", st.st_mtime_ns)
        else:
            snap[rel] = ("file", st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return snap


def contents(folder: Path) -> dict[str, bytes]:
    """The files of an output folder and their bytes, the lock file aside (a refused run may create and drop it)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != LOCK}


def run_all(*commands: tuple) -> list:
    """Run several CLI commands at once: each spends about a second of CPU importing torch; use every core."""
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return list(pool.map(lambda args: run_cli(*args), commands))


def convert_args(src: Path, out: Path, *extra: str) -> tuple:
    return ("convert", src, "--to", "bf16", "-o", out, *extra)


# ---- 1-3: missing, truncated and corrupt shards ----------------------------------------------------------------


def test_missing_shard(tiny_bf16, tmp_path):
    src = copy_ckpt(tiny_bf16, tmp_path)
    assert len(shards(src)) > 2
    victim = shards(src)[1]
    victim.unlink()
    out = tmp_path / "out"
    for proc in run_all(convert_args(src, out), ("inspect", src)):
        line = assert_one_line_error(proc, victim.name, "missing")
        assert INDEX in line
    assert not out.exists()


def test_truncated_shard(tiny_bf16, tmp_path):
    src = copy_ckpt(tiny_bf16, tmp_path)
    victim = shards(src)[2]
    os.truncate(victim, victim.stat().st_size - 1000)
    out = tmp_path / "out"
    assert_one_line_error(convert(src, out), victim.name, "truncated")
    assert not out.exists()


def test_shard_with_trailing_bytes(tiny_bf16, tmp_path):
    """safetensors itself refuses a file its header does not cover exactly: refuse it up front, before any output
    shard is written, not halfway through the conversion."""
    src = copy_ckpt(tiny_bf16, tmp_path)
    victim = shards(src)[-1]
    with open(victim, "ab") as f:
        f.write(b"\0" * 4096)
    out = tmp_path / "out"
    assert_one_line_error(convert(src, out), victim.name, "4096 bytes after the last tensor")
    assert not out.exists()


def _garbage_json(data: bytearray) -> None:
    data[8 + 20:8 + 40] = b"\xff" * 20


def _unbalanced_json(data: bytearray) -> None:
    data[8] = ord("[")


def _deeply_nested_json(data: bytearray) -> None:
    n = 200_000
    data[:8 + n] = struct.pack("<Q", n) + b"[" * n


def _length_past_end(data: bytearray) -> None:
    data[:8] = struct.pack("<Q", len(data) + 1)


def _length_huge(data: bytearray) -> None:
    data[:8] = b"\xff" * 8


def _shorter_than_prefix(data: bytearray) -> None:
    del data[5:]


def _header_rewrite(edit):
    """A corruption that keeps the header valid JSON and its length (so the data stays in place), edited by
    edit(entries without __metadata__)."""

    def corrupt(data: bytearray) -> None:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        edit({k: v for k, v in header.items() if k != "__metadata__"})
        raw = json.dumps(header, separators=(",", ":")).encode()
        assert len(raw) <= n
        data[8:8 + n] = raw.ljust(n)

    return corrupt


def _first(edit):
    return _header_rewrite(lambda entries: edit(next(iter(entries.values()))))


def _overlap(entries: dict) -> None:
    """Point one tensor at the data of another of the same size: offsets consistent with the shape, but shared."""
    by_size: dict[int, list] = {}
    for e in entries.values():
        by_size.setdefault(e["data_offsets"][1] - e["data_offsets"][0], []).append(e)
    a, b = next(group for group in by_size.values() if len(group) > 1)[:2]
    a["data_offsets"] = list(b["data_offsets"])


CORRUPTIONS = {
    "garbage-bytes": _garbage_json,
    "unbalanced-json": _unbalanced_json,
    "deeply-nested-json": _deeply_nested_json,
    "length-past-end": _length_past_end,
    "length-huge": _length_huge,
    "shorter-than-prefix": _shorter_than_prefix,
    "dtype-not-a-string": _first(lambda e: e.update(dtype=[])),
    "dtype-unknown": _first(lambda e: e.update(dtype="Q4")),
    "shape-not-a-list": _first(lambda e: e.update(shape=7)),
    "offsets-three": _first(lambda e: e.update(data_offsets=[0, 1, 2])),
    "offsets-wrong-size": _first(lambda e: e.update(data_offsets=[0, 2])),
    "entry-not-an-object": _first(lambda e: (e.clear(), e.update(x=1))),
    "offsets-overlap": _header_rewrite(_overlap),
}


def corrupt_shard(path: Path, corruption: str) -> None:
    data = bytearray(path.read_bytes())
    CORRUPTIONS[corruption](data)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_header_is_a_quantkit_error(tiny_bf16, tmp_path, corruption):
    """Every corruption, in process (fast): a QuantkitError naming the file, never another exception."""
    victim = tmp_path / shards(tiny_bf16)[0].name
    shutil.copy(shards(tiny_bf16)[0], victim)
    corrupt_shard(victim, corruption)
    with pytest.raises(QuantkitError, match=victim.name):
        read_header(victim)


def test_corrupt_header(tiny_bf16, tmp_path):
    """Through the CLI: garbage in the JSON header, a header length past the end of the file, a wrongly typed field;
    and inspect as well as convert."""
    cases = ["garbage-bytes", "length-past-end", "dtype-not-a-string"]
    commands, victims = [], []
    for case in cases:
        src = copy_ckpt(tiny_bf16, tmp_path, case)
        victims.append(shards(src)[0])
        corrupt_shard(victims[-1], case)
        commands.append(convert_args(src, tmp_path / f"out-{case}"))
    commands.append(("inspect", victims[0].parent))
    for case, victim, proc in zip(cases + cases[:1], victims + victims[:1], run_all(*commands)):
        assert "header" in assert_one_line_error(proc, str(victim)), case
    assert not list(tmp_path.glob("out-*"))


def test_corrupt_index(tiny_bf16, tmp_path):
    src = copy_ckpt(tiny_bf16, tmp_path)
    (src / INDEX).write_text('{"weight_map": ["not", "an", "object"]}')
    assert_one_line_error(convert(src, tmp_path / "out"), INDEX)


# ---- 4: a tensor missing, or of the wrong shape ----------------------------------------------------------------

VICTIM = "model.layers.1.self_attn.k_proj.weight"


def drop_tensor(src: Path, name: str, from_index: bool) -> Path:
    """Remove a tensor from its shard (and from the index, or leave the index naming it); returns the shard."""
    path = shard_of(src, name)
    tensors = load_shard(path)
    del tensors[name]
    save_file(tensors, str(path), metadata={"format": "pt"})
    if from_index:
        index = read_index(src)
        del index["weight_map"][name]
        write_index(src, index)
    return path


def test_tensor_missing(tiny_bf16, tmp_path):
    src = copy_ckpt(tiny_bf16, tmp_path)
    drop_tensor(src, VICTIM, from_index=True)
    out = tmp_path / "out"
    assert_one_line_error(convert(src, out), VICTIM, "missing")
    assert not out.exists()


def test_tensor_listed_in_index_but_not_in_shard(tiny_bf16, tmp_path):
    src = copy_ckpt(tiny_bf16, tmp_path)
    path = drop_tensor(src, VICTIM, from_index=False)
    out = tmp_path / "out"
    assert_one_line_error(convert(src, out), VICTIM, path.name)
    assert not out.exists()


def test_fp8_scale_missing(tiny_fp8, tmp_path):
    src = copy_ckpt(tiny_fp8, tmp_path)
    scale = VICTIM + "_scale_inv"
    drop_tensor(src, scale, from_index=True)
    out = tmp_path / "out"
    assert_one_line_error(convert(src, out), scale, "missing")
    assert not out.exists()


def test_tensor_wrong_shape(tiny_bf16, tmp_path):
    src = copy_ckpt(tiny_bf16, tmp_path)
    path = shard_of(src, VICTIM)
    tensors = load_shard(path)
    tensors[VICTIM] = tensors[VICTIM].t().contiguous()
    assert tensors[VICTIM].shape[0] != tensors[VICTIM].shape[1]
    save_file(tensors, str(path), metadata={"format": "pt"})
    out = tmp_path / "out"
    assert_one_line_error(convert(src, out), VICTIM, "shape", path.name)
    assert not out.exists()


# ---- 5: unknown architecture -----------------------------------------------------------------------------------


def test_unknown_architecture(tiny_bf16, tmp_path):
    src = copy_ckpt(tiny_bf16, tmp_path)
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    config["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert_one_line_error(convert(src, out), "config.json", "LlamaForCausalLM")
    assert not out.exists()


def test_config_missing(tiny_bf16, tmp_path):
    src = copy_ckpt(tiny_bf16, tmp_path)
    (src / "config.json").unlink()
    assert_one_line_error(run_cli("inspect", src), "config.json")


# ---- 6: pickled weights are refused, never unpickled -----------------------------------------------------------


def evil_pickle(marker: Path) -> bytes:
    """Protocol-0 pickle opcodes, written by hand: GLOBAL builtins.open, MARK, two strings, TUPLE, REDUCE, STOP.
    Unpickling it calls open(marker, "w"), creating the marker file; no importable class is needed."""
    return b"cbuiltins\nopen\n(V" + str(marker).encode() + b"\nVw\ntR."


def evil_torch_file(path: Path, marker: Path) -> None:
    """A real torch.save archive whose data.pkl is replaced by the payload."""
    buf = io.BytesIO()
    torch.save({"model.embed_tokens.weight": torch.zeros(4)}, buf)
    buf.seek(0)
    with zipfile.ZipFile(buf) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        names = zin.namelist()
        assert any(n.endswith("/data.pkl") for n in names), names
        for name in names:
            data = evil_pickle(marker) if name.endswith("/data.pkl") else zin.read(name)
            zout.writestr(name, data)


def test_evil_payload_is_live(tmp_path):
    """The payload used below really does run code when loaded the unsafe way, so its absence proves something."""
    marker = tmp_path / "probe-marker"
    evil_torch_file(tmp_path / "probe.bin", marker)
    try:
        torch.load(tmp_path / "probe.bin", weights_only=False)
    except Exception:
        pass  # the payload returns a file object, not a state dict: what matters is that it ran
    assert marker.exists()


def test_pickled_weights_refused(tiny_bf16, tmp_path):
    """pytorch_model.bin, HF-style sharded .bin files, and a safetensors index pointing at a .bin: all refused as
    pickles (by convert, and by inspect for the first), and none of them unpickled."""
    marker = tmp_path / "PWNED"
    commands, culprits = [], []
    for layout in ("single", "sharded", "safetensors-index"):
        src = tmp_path / layout
        src.mkdir()
        shutil.copy(tiny_bf16 / "config.json", src / "config.json")
        if layout == "single":
            bad = src / "pytorch_model.bin"
        elif layout == "sharded":
            bad = src / "pytorch_model-00001-of-00001.bin"
            weight_map = {"model.embed_tokens.weight": bad.name}
            (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
        else:
            bad = src / "model-00001-of-00001.bin"
            write_index(src, {"weight_map": {"model.embed_tokens.weight": bad.name}})
        evil_torch_file(bad, marker)
        commands.append(convert_args(src, tmp_path / f"out-{layout}"))
        culprits.append(bad)
    commands.append(("inspect", culprits[0].parent))
    culprits.append(culprits[0])
    for bad, proc in zip(culprits, run_all(*commands)):
        assert_one_line_error(proc, str(bad), "pickled weights are refused")
    assert not marker.exists(), "a pickle was unpickled"
    assert not list(tmp_path.glob("out-*"))


# ---- 7: shard names that escape the folder ---------------------------------------------------------------------


def _point_first_shard_at(src: Path, name: str) -> None:
    first = shards(src)[0]
    shutil.copy(first, src.parent / "x.safetensors")  # a valid shard is there: the name alone must be refused
    index = read_index(src)
    index["weight_map"] = {k: (name if v == first.name else v) for k, v in index["weight_map"].items()}
    write_index(src, index)


ESCAPES = ["../x.safetensors", "/etc/passwd", "sub/../../x.safetensors", "..", "", "x\\..\\y.safetensors"]


@pytest.mark.parametrize("name", ESCAPES)
def test_index_shard_name_escapes_in_process(tiny_bf16, tmp_path, name):
    src = copy_ckpt(tiny_bf16, tmp_path)
    _point_first_shard_at(src, name)
    with pytest.raises(QuantkitError, match=f"{INDEX}: shard name"):
        CheckpointReader(src)


def test_index_shard_name_escapes(tiny_bf16, tmp_path):
    commands = []
    for i, name in enumerate(ESCAPES[:2]):
        src = copy_ckpt(tiny_bf16, tmp_path / f"case{i}")
        _point_first_shard_at(src, name)
        commands.append(convert_args(src, tmp_path / f"out{i}"))
    for name, proc in zip(ESCAPES, run_all(*commands)):
        assert_one_line_error(proc, repr(name), INDEX)
    assert not list(tmp_path.glob("out*"))


def test_symlink_shard_outside_folder(tiny_bf16, tmp_path):
    src = copy_ckpt(tiny_bf16, tmp_path)
    victim = shards(src)[1]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(victim, elsewhere / victim.name)
    victim.symlink_to(elsewhere / victim.name)
    out = tmp_path / "out"
    assert_one_line_error(convert(src, out), victim.name, "outside")
    assert not out.exists()


# ---- 8: the output folder must not be the source or inside it --------------------------------------------------


def test_output_in_source(tiny_bf16, tmp_path):
    """The source itself, a new or existing folder inside it, another name (a symlink) for it: refused, even with
    --force, and the source left exactly as it was."""
    commands, cases = [], []
    for where in ("same", "inside", "inside-existing", "alias"):
        src = copy_ckpt(tiny_bf16, tmp_path, where)
        if where == "same":
            out = src
        elif where == "inside":
            out = src / "converted"
        elif where == "inside-existing":
            out = src / "converted"
            out.mkdir()
        else:
            out = tmp_path / "alias-link"
            out.symlink_to(src)
        cases.append((where, src, out, snapshot(src)))
        commands.append(convert_args(src, out, "--force"))
    for (where, src, out, before), proc in zip(cases, run_all(*commands)):
        assert_one_line_error(proc, str(out), "source")
        assert snapshot(src) == before, where


# ---- 9: output folders that may not be written -----------------------------------------------------------------


def test_output_not_a_quantkit_run(tiny_bf16, tmp_path):
    outs = {}
    for case in ("plain", "resume", "force"):
        outs[case] = tmp_path / case
        outs[case].mkdir()
        (outs[case] / "notes.txt").write_text("mine")
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    plain, resume, force, file = run_all(convert_args(tiny_bf16, outs["plain"]),
                                         convert_args(tiny_bf16, outs["resume"], "--resume"),
                                         convert_args(tiny_bf16, outs["force"], "--force"),
                                         convert_args(tiny_bf16, a_file, "--force"))
    for case, proc in (("plain", plain), ("resume", resume)):
        assert_one_line_error(proc, str(outs[case]), "--force")
        assert contents(outs[case]) == {"notes.txt": b"mine"}
    assert_one_line_error(file, str(a_file))
    assert a_file.read_text() == "mine"
    assert force.returncode == 0, force.stderr
    assert (outs["force"] / INDEX).is_file()
    assert (outs["force"] / "notes.txt").read_text() == "mine"  # --force replaces checkpoint files, nothing else


def test_output_holds_other_job(converted_bf16, tiny_bf16, tiny_fp8, tmp_path):
    cases = {"other": (tiny_fp8,), "other-resume": (tiny_fp8, "--resume"), "same-finished": (tiny_bf16,)}
    outs = {case: tmp_path / case for case in cases}
    for out in outs.values():
        shutil.copytree(converted_bf16.out, out)
    before = contents(outs["other"])
    procs = run_all(*(convert_args(src, outs[case], *extra) for case, (src, *extra) in cases.items()))
    for (case, out), proc in zip(outs.items(), procs):
        needles = ("different job",) if case.startswith("other") else ("finished",)
        assert_one_line_error(proc, str(out), "--force", *needles)
        assert contents(out) == before, case


def test_output_locked(tiny_bf16, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert_one_line_error(convert(tiny_bf16, out), str(out), "another quantkit process")
        assert sorted(p.name for p in out.iterdir()) == [LOCK]  # nothing written, our lock file left alone
        assert os.fstat(fd).st_ino == (out / LOCK).stat().st_ino
    finally:
        os.close(fd)


# ---- 10: bad option values -------------------------------------------------------------------------------------


def test_bad_max_shard_size(tiny_bf16, tmp_path):
    sizes = ["banana", "0", "12XB", "-5GB"]
    procs = run_all(*(convert_args(tiny_bf16, tmp_path / f"out{i}", "--max-shard-size", size)
                      for i, size in enumerate(sizes)))
    for size, proc in zip(sizes, procs):
        assert_one_line_error(proc, "--max-shard-size", repr(size))
    assert not list(tmp_path.glob("out*"))


def test_make_checkpoint_zero_layers(tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(run_cli("make-checkpoint", "--layers", "0", "-o", out), "--layers")
    assert not out.exists()


# ---- the source is never written -------------------------------------------------------------------------------


class Converted(NamedTuple):
    out: Path
    source_before: dict


@pytest.fixture(scope="module")
def converted_bf16(tiny_bf16, tmp_path_factory) -> Converted:
    """tiny_bf16 converted once, with a snapshot of the source taken before."""
    before = snapshot(tiny_bf16)
    out = tmp_path_factory.mktemp("converted") / "out"
    proc = convert(tiny_bf16, out)
    assert proc.returncode == 0, proc.stderr
    return Converted(out, before)


def test_convert_never_writes_source(converted_bf16, tiny_bf16):
    assert (converted_bf16.out / INDEX).is_file()
    assert snapshot(tiny_bf16) == converted_bf16.source_before
