"""Nothing is lost: a killed or disk-full conversion resumes to a result byte-identical to an uninterrupted run.

A kill is simulated with QUANTKIT_CRASH_AFTER_SHARDS=N (os._exit(137) after N shards), a full disk with
RLIMIT_FSIZE (Python ignores SIGXFSZ, so the write fails with EFBIG). The manifest records no timings, so it is
compared byte for byte along with everything else.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest
from conftest import assert_one_line_error, run_cli

INDEX = "model.safetensors.index.json"
MANIFEST = "quantkit-manifest.json"
LOCK = ".quantkit.lock"
SHARD_SIZE = "2MB"  # tiny_fp8 converted to bf16 is about 15 MB: eight shards
CRASH_AFTER = 2


def convert_args(src: Path, out: Path, *extra: str) -> tuple:
    return ("convert", src, "--to", "bf16", "-o", out, "--max-shard-size", SHARD_SIZE, *extra)


def run_all(*commands: tuple, env: dict | None = None) -> list:
    """Run several CLI commands at once: each spends about a second of CPU importing torch; use every core."""
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return list(pool.map(lambda args: run_cli(*args, env=env), commands))


def shard_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("model-*.safetensors"))


def manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def check_shard(path: Path, rec: dict) -> None:
    """The shard is complete and every tensor hashes to the digest the manifest recorded (offsets from the header)."""
    data = path.read_bytes()
    assert len(data) == rec["bytes"], path.name
    (n,) = struct.unpack("<Q", data[:8])
    assert hashlib.sha256(data[:8 + n]).hexdigest() == rec["header"], path.name
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    assert set(header) == set(rec["tensors"]), path.name
    end = 0
    for name, entry in header.items():
        lo, hi = entry["data_offsets"]
        assert f"{zlib.crc32(data[8 + n + lo:8 + n + hi]):08x}" == rec["tensors"][name], (path.name, name)
        end = max(end, hi)
    assert 8 + n + end == len(data), path.name


def assert_same_files(expected: Path, got: Path) -> None:
    """Every file of got is byte-identical to expected's, and none is missing or extra (the lock file aside)."""
    want = sorted(p.name for p in expected.iterdir() if p.name != LOCK)
    have = sorted(p.name for p in got.iterdir() if p.name != LOCK)
    assert have == want
    differ = [name for name in want if (expected / name).read_bytes() != (got / name).read_bytes()]
    assert not differ, f"files differ from the uninterrupted run: {differ}"


def reused(proc) -> int:
    """How many shards the run kept from an earlier one, from its summary line."""
    m = re.search(r"\((\d+) shards, (\d+) reused", proc.stdout)
    assert m, proc.stdout + proc.stderr
    return int(m.group(2))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial"))


class Runs(NamedTuple):
    reference: Path  # uninterrupted conversion
    crashed: Path  # killed after CRASH_AFTER shards; tests copy it before touching it
    crash: object  # the killed run's CompletedProcess


@pytest.fixture(scope="module")
def runs(tiny_fp8, tmp_path_factory) -> Runs:
    base = tmp_path_factory.mktemp("resume")
    ref, crashed = base / "A", base / "B"
    with ThreadPoolExecutor(2) as pool:
        ref_run = pool.submit(run_cli, *convert_args(tiny_fp8, ref))
        crash_run = pool.submit(run_cli, *convert_args(tiny_fp8, crashed),
                                env={"QUANTKIT_CRASH_AFTER_SHARDS": str(CRASH_AFTER)})
        assert ref_run.result().returncode == 0, ref_run.result().stderr
        crash = crash_run.result()
    assert len(shard_names(ref)) >= 6
    return Runs(ref, crashed, crash)


def copy_crashed(runs: Runs, tmp_path: Path, name: str = "B") -> Path:
    out = tmp_path / name
    shutil.copytree(runs.crashed, out)
    return out


# ---- a kill, then --resume -------------------------------------------------------------------------------------


def test_crash_leaves_only_finished_shards(runs):
    assert runs.crash.returncode == 137, runs.crash.stderr
    b = runs.crashed
    assert not (b / INDEX).exists()
    m = manifest(b)
    assert m["complete"] is False
    finished = shard_names(runs.reference)[:CRASH_AFTER]
    assert sorted(m["shards"]) == finished
    assert shard_names(b) == finished  # no later shard, not even a partial one
    assert leftovers(b) == []
    for name in finished:
        check_shard(b / name, m["shards"][name])
        assert (b / name).read_bytes() == (runs.reference / name).read_bytes()


def test_resume_is_byte_identical(runs, tiny_fp8, tmp_path):
    b = copy_crashed(runs, tmp_path)
    proc = run_cli(*convert_args(tiny_fp8, b, "--resume"))
    assert proc.returncode == 0, proc.stderr
    assert reused(proc) == CRASH_AFTER
    assert_same_files(runs.reference, b)
    assert not (b / LOCK).exists()


def test_crashed_folder_needs_resume_of_the_same_job(runs, tiny_fp8, tiny_bf16, tmp_path):
    """Without --resume, or with --resume for another job (other shard size, other source): refused, untouched."""
    cases = {
        "no-resume": convert_args(tiny_fp8, tmp_path / "no-resume"),
        "other-shard-size": ("convert", tiny_fp8, "--to", "bf16", "-o", tmp_path / "other-shard-size",
                             "--max-shard-size", "3MB", "--resume"),
        "other-source": convert_args(tiny_bf16, tmp_path / "other-source", "--resume"),
    }
    for name in cases:
        copy_crashed(runs, tmp_path, name)
    for (name, _), proc in zip(cases.items(), run_all(*cases.values())):
        needles = ("--resume",) if name == "no-resume" else ("different job", "--force")
        assert_one_line_error(proc, str(tmp_path / name), *needles)
        assert_same_files(runs.crashed, tmp_path / name)


def _flip_data_byte(b: Path, names: list[str]) -> None:
    path = b / names[0]
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # inside the last tensor's data: only the checksum can tell
    path.write_bytes(bytes(data))


def _flip_header_byte(b: Path, names: list[str]) -> None:
    path = b / names[1]
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    i = data.index(b'"shape":[') + len(b'"shape":[')
    assert i < 8 + n
    data[i] = ord("9") if data[i] != ord("9") else ord("8")  # still valid JSON, same length, wrong shape
    path.write_bytes(bytes(data))


def _truncate(b: Path, names: list[str]) -> None:
    path = b / names[1]
    os.truncate(path, path.stat().st_size - 1)


def _delete(b: Path, names: list[str]) -> None:
    (b / names[0]).unlink()


def _stale_partial(b: Path, names: list[str]) -> None:
    """A kill in the middle of the next shard leaves its .partial file behind."""
    (b / f".{names[CRASH_AFTER]}.partial").write_bytes(b"\0" * 12345)


DAMAGE = {  # name: (damage, shards the resume may keep)
    "flipped-data-byte": (_flip_data_byte, CRASH_AFTER - 1),
    "flipped-header-byte": (_flip_header_byte, CRASH_AFTER - 1),
    "truncated": (_truncate, CRASH_AFTER - 1),
    "deleted": (_delete, CRASH_AFTER - 1),
    "stale-partial": (_stale_partial, CRASH_AFTER),
}


def test_resume_after_damage(runs, tiny_fp8, tmp_path):
    """A finished shard damaged on disk after the kill is detected by its checksum and rewritten; the others are
    kept; the result equals the uninterrupted run."""
    names = shard_names(runs.reference)
    commands = []
    for case, (damage, _) in DAMAGE.items():
        b = copy_crashed(runs, tmp_path, case)
        damage(b, names)
        commands.append(convert_args(tiny_fp8, b, "--resume", "--no-progress"))
    for (case, (_, kept)), proc in zip(DAMAGE.items(), run_all(*commands)):
        assert proc.returncode == 0, (case, proc.stderr)
        assert reused(proc) == kept, case
        assert_same_files(runs.reference, tmp_path / case)


def _manifest_edit(edit):
    def damage(b: Path, names: list[str]) -> None:
        m = manifest(b)
        (b / MANIFEST).write_text(json.dumps(edit(m, names[0])))

    return damage


def _truncate_manifest(b: Path, names: list[str]) -> None:
    os.truncate(b / MANIFEST, 100)


MANIFEST_DAMAGE = {  # name: (damage, shards the resume may keep, or None when the folder must be refused)
    "not-json": (_truncate_manifest, None),
    "a-list": (_manifest_edit(lambda m, first: [m]), None),
    "shards-a-list": (_manifest_edit(lambda m, first: {**m, "shards": list(m["shards"])}), None),
    "record-a-string": (_manifest_edit(lambda m, first: {**m, "shards": {**m["shards"], first: "done"}}),
                        CRASH_AFTER - 1),
    "record-without-tensors": (_manifest_edit(lambda m, first: {**m, "shards": {**m["shards"], first: {}}}),
                               CRASH_AFTER - 1),
}


def test_resume_with_damaged_manifest(runs, tiny_fp8, tmp_path):
    """A manifest that is not one is refused in one line (--force to start over); a damaged shard record only
    costs that shard, which is rewritten. Never a traceback."""
    names = shard_names(runs.reference)
    commands = []
    for case, (damage, _) in MANIFEST_DAMAGE.items():
        damage(copy_crashed(runs, tmp_path, case), names)
        commands.append(convert_args(tiny_fp8, tmp_path / case, "--resume", "--no-progress"))
    for (case, (_, kept)), proc in zip(MANIFEST_DAMAGE.items(), run_all(*commands)):
        if kept is None:
            assert_one_line_error(proc, str(tmp_path / case), "--force")
            assert shard_names(tmp_path / case) == names[:CRASH_AFTER], case
        else:
            assert proc.returncode == 0, (case, proc.stderr)
            assert reused(proc) == kept, case
            assert_same_files(runs.reference, tmp_path / case)


def test_crash_during_resume_then_resume(runs, tiny_fp8, tmp_path):
    b = copy_crashed(runs, tmp_path)
    crash = run_cli(*convert_args(tiny_fp8, b, "--resume"), env={"QUANTKIT_CRASH_AFTER_SHARDS": str(CRASH_AFTER)})
    assert crash.returncode == 137, crash.stderr
    assert sorted(manifest(b)["shards"]) == shard_names(runs.reference)[:2 * CRASH_AFTER]
    proc = run_cli(*convert_args(tiny_fp8, b, "--resume"))
    assert proc.returncode == 0, proc.stderr
    assert reused(proc) == 2 * CRASH_AFTER
    assert_same_files(runs.reference, b)


def test_resume_of_a_finished_run(runs, tiny_fp8, tmp_path):
    """--resume on a finished folder rewrites nothing that matters: every shard reused, the same bytes."""
    a = tmp_path / "A"
    shutil.copytree(runs.reference, a)
    proc = run_cli(*convert_args(tiny_fp8, a, "--resume", "--no-progress"))
    assert proc.returncode == 0, proc.stderr
    n = len(shard_names(runs.reference))
    assert reused(proc) == n
    assert_same_files(runs.reference, a)


# ---- a full disk -----------------------------------------------------------------------------------------------


def test_disk_full_then_resume(runs, tiny_fp8, tmp_path):
    """RLIMIT_FSIZE caps every file at the size of the largest early shard: the shards up to it finish, a later,
    larger one fails with EFBIG. One line, no .partial left, the finished shards intact; --resume completes."""
    names = shard_names(runs.reference)
    sizes = [(runs.reference / n).stat().st_size for n in names]
    fail = next((j for j in range(1, len(sizes)) if sizes[j] > max(sizes[:j])), None)
    assert fail is not None, f"no shard larger than all before it: {sizes}"
    limit = max(sizes[:fail])

    def cap_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    b = tmp_path / "B"
    proc = run_cli(*convert_args(tiny_fp8, b), preexec_fn=cap_file_size)  # progress bars on, as a user sees it
    assert_one_line_error(proc, "disk full", names[fail], "--resume")
    assert proc.returncode != 137
    assert leftovers(b) == []
    assert not (b / INDEX).exists()
    m = manifest(b)
    assert m["complete"] is False
    assert sorted(m["shards"]) == names[:fail]
    assert shard_names(b) == names[:fail]
    for name in names[:fail]:
        check_shard(b / name, m["shards"][name])

    proc = run_cli(*convert_args(tiny_fp8, b, "--resume", "--no-progress"))
    assert proc.returncode == 0, proc.stderr
    assert reused(proc) == fail
    assert_same_files(runs.reference, b)


# ---- the manifest of a finished run ----------------------------------------------------------------------------


def test_manifest_of_a_finished_run(runs):
    a = runs.reference
    m = manifest(a)
    assert m["complete"] is True
    assert set(m["units"]) == {"embed", "layers.0", "layers.1", "head"}
    for digest in m["units"].values():
        assert len(digest) == 64 and int(digest, 16) >= 0
    assert sorted(m["shards"]) == shard_names(a)
    for name, rec in m["shards"].items():
        check_shard(a / name, rec)
    index = json.loads((a / INDEX).read_text())
    assert sorted(set(index["weight_map"].values())) == shard_names(a)
    assert {t for rec in m["shards"].values() for t in rec["tensors"]} == set(index["weight_map"])
    for name, digest in m["files"].items():
        assert hashlib.sha256((a / name).read_bytes()).hexdigest() == digest, name
    assert not (a / LOCK).exists()
    assert leftovers(a) == []
