"""Shared fixtures: tiny synthetic checkpoints, made once per test session, never written by tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quantkit.synth import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_bf16(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "tiny-bf16"
    make_checkpoint(out, preset="tiny", dtype="bf16", seed=0, max_shard_bytes=3 * 10**6)
    return out


@pytest.fixture(scope="session")
def tiny_fp8(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "tiny-fp8"
    make_checkpoint(out, preset="tiny", dtype="fp8", seed=1, max_shard_bytes=3 * 10**6)
    return out


def run_cli(*args: str, env: dict | None = None, preexec_fn=None, check: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m quantkit.cli ARGS` in a fresh process, as a user would."""
    full_env = {**os.environ, "PYTHONWARNINGS": "default", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "quantkit.cli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, preexec_fn=preexec_fn, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"quantkit {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The command failed with a single 'error: ...' line naming what is wrong, and no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def edited_copy(src: Path, dest: Path, name: str, edit: Callable[[torch.Tensor], None]) -> Path:
    """A copy of checkpoint src in dest with tensor `name` changed in place by edit(), its shard rewritten."""
    shutil.copytree(src, dest)
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    shard = dest / index["weight_map"][name]
    with safe_open(str(shard), framework="pt") as f:
        data = {k: f.get_tensor(k) for k in f.keys()}
    edit(data[name])
    save_file(data, str(shard), metadata={"format": "pt"})
    return dest
