"""Tensor and expert parallelism on the CPU with gloo: two processes give the logits of one, for TP=2, EP=2 and
TP=2 x EP=2, on the dense, FP8 and AWQ backends; invalid degrees are refused up front with one line."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # the fp8 and awq backends import the kernels: Triton's interpreter on a CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conftest import assert_one_line_error, run_cli  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from quantkit.checkpoint import CheckpointReader  # noqa: E402
from quantkit.errors import QuantkitError  # noqa: E402
from quantkit.formats.awq import (  # noqa: E402
    packed_tensors,
    quantization_config_autoawq,
    quantization_config_compressed_tensors,
    quantize_groups,
)
from quantkit.runtime import load_model  # noqa: E402
from quantkit.runtime.model import fuse_qkv  # noqa: E402
from quantkit.runtime.parallel import ParallelSpec, SliceReader, init_parallel  # noqa: E402
from quantkit.runtime.parallel import spawn as spawn_once  # noqa: E402

DEGREES = [(2, 1), (1, 2), (2, 2)]  # world 2 each: heads split / experts split / both on the same two ranks
CASES = [("tiny_bf16", "dense"), ("tiny_fp8", "fp8"), ("tiny_fp8", "dense"), ("tiny_awq", "awq"),
         ("tiny_awq_ct", "awq")]



def spawn(fn, world: int, *args) -> None:
    """spawn, once more if a rank died of SIGABRT: on a loaded two-core machine gloo now and then aborts a process
    at exit (about one run in fifteen of this file); a wrong result raises an assertion, never a signal."""
    from torch.multiprocessing.spawn import ProcessExitedException

    try:
        spawn_once(fn, world, *args)
    except ProcessExitedException as e:
        if e.signal_name != "SIGABRT":
            raise
        warnings.warn(f"a gloo rank aborted ({e}); running the ranks again", stacklevel=2)
        spawn_once(fn, world, *args)

def write_int4(src: Path, out: Path, layout: str, attention: bool) -> Path:
    """src with its expert (and, with attention, attention) linears as INT4 groups of 128 in `layout`."""
    reader = CheckpointReader(src)
    tensors, ignore = {}, ["lm_head"]
    for name in reader.entries:
        w = reader.tensor(name)
        is_attn = ".self_attn." in name and name.endswith("_proj.weight")
        if not ((".experts." in name and name.endswith(".weight")) or (is_attn and attention)):
            tensors[name] = w
            if name.endswith("gate.weight") or is_attn:
                ignore.append(name[: -len(".weight")])
            continue
        asym = layout == "autoawq"
        q, sc, z = quantize_groups(w, zero_point=asym, scale_dtype=torch.float16 if asym else torch.bfloat16,
                                   name=name)
        tensors.update(packed_tensors(name[: -len("weight")], q, sc, z, layout, symmetric=not asym))
    reader.close()
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = (quantization_config_autoawq(ignore) if layout == "autoawq"
                                  else quantization_config_compressed_tensors(ignore, attention=attention))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


@pytest.fixture(scope="module")
def tiny_awq(tiny_bf16, tmp_path_factory) -> Path:
    return write_int4(tiny_bf16, tmp_path_factory.mktemp("par-awq") / "autoawq", "autoawq", attention=True)


@pytest.fixture(scope="module")
def tiny_awq_ct(tiny_bf16, tmp_path_factory) -> Path:  # compressed-tensors, attention kept dense
    return write_int4(tiny_bf16, tmp_path_factory.mktemp("par-awq") / "ct", "compressed-tensors", attention=False)


def prefill_then_decode(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a left-padded 2 x 12 prefill and of one decode step after it."""
    ids = torch.randint(0, 2000, (2, 12), generator=torch.Generator().manual_seed(3))
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :4] = False  # the second prompt is 8 tokens, left-padded
    cache = model.new_cache(2, 16)
    first = model(ids, cache, valid)
    return first, model(ids[:, -1:], cache)


def _ranks(cases: list[tuple[str, str]], out: str) -> None:
    for i, (ckpt, backend) in enumerate(cases):
        for tp, ep in DEGREES:
            spec, _ = init_parallel(tp, ep)
            model = load_model(ckpt, dtype=torch.float32, backend=backend)
            logits = prefill_then_decode(model)
            fuse_qkv(model)  # as a GPU load does: q/k/v of this rank's heads as one projection
            fused = prefill_then_decode(model)
            if spec.rank == 0:
                torch.save(logits, os.path.join(out, f"{CASES[i][0]}-{backend}-{tp}x{ep}.pt"))
                torch.save(fused, os.path.join(out, f"{CASES[i][0]}-{backend}-{tp}x{ep}-fused.pt"))


@pytest.fixture(scope="module")
def parallel_logits(tiny_bf16, tiny_fp8, tiny_awq, tiny_awq_ct, tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    folders = {"tiny_bf16": tiny_bf16, "tiny_fp8": tiny_fp8, "tiny_awq": tiny_awq, "tiny_awq_ct": tiny_awq_ct}
    spawn(_ranks, 2, [(str(folders[c]), b) for c, b in CASES], str(out))  # one pair of processes for every case
    return out, folders


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("tp,ep", DEGREES)
@pytest.mark.parametrize("ckpt,backend", CASES)
def test_two_ranks_give_the_logits_of_one_process(parallel_logits, ckpt, backend, tp, ep, fused):
    out, folders = parallel_logits
    model = load_model(folders[ckpt], dtype=torch.float32, backend=backend)
    ref = prefill_then_decode(model)
    got = torch.load(out / f"{ckpt}-{backend}-{tp}x{ep}{'-fused' if fused else ''}.pt")
    for r, g in zip(ref, got):
        assert g.shape == r.shape
        # only the summation order differs (partial sums over heads or experts, all-reduced): fp32 rounding
        assert ((g - r).norm() / r.norm()).item() < 1e-5
        assert torch.equal(g.argmax(-1), r.argmax(-1))


@pytest.mark.parametrize("ckpt,backend", CASES)
def test_fused_qkv_keeps_the_logits_and_the_bytes(ckpt, backend, request):
    """One process: q/k/v fused into one projection (what a GPU load does) computes what the three did, from the
    same weights held once."""
    model = load_model(request.getfixturevalue(ckpt), dtype=torch.float32, backend=backend)
    ref = prefill_then_decode(model)
    before = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    kinds = {type(model.layers[0].self_attn.q_proj)}
    assert fuse_qkv(model) == len(model.layers)
    att = model.layers[0].self_attn
    assert att.q_proj is None and type(att.qkv_proj) in kinds
    assert sum(t.numel() * t.element_size() for t in model.state_dict().values()) == before
    for r, g in zip(ref, prefill_then_decode(model)):
        assert ((g - r).norm() / r.norm()).item() < 1e-6 and torch.equal(g.argmax(-1), r.argmax(-1))


def test_each_rank_holds_only_its_slice(tiny_fp8):
    cfg = CheckpointReader(tiny_fp8).config
    spec = ParallelSpec(tp=2, ep=2, rank=1, world=2)
    assert spec.heads(cfg.num_attention_heads) == (2, 4)
    assert spec.experts(cfg.num_local_experts) == (8, 16)
    assert spec.inter(cfg.intermediate_size) == (0, cfg.intermediate_size)  # experts split by expert, not width
    spec = ParallelSpec(tp=2, ep=1, rank=1, world=2)
    assert spec.experts(cfg.num_local_experts) == (0, 16)
    assert spec.inter(cfg.intermediate_size) == (128, 256)
    # 4 ranks, ep 2: ranks 0-1 hold experts 0-7 and 2-3 experts 8-15, each pair splitting the intermediate size
    got = [(s.heads(8), s.experts(16), s.inter(256)) for s in (ParallelSpec(4, 2, r, 4) for r in range(4))]
    assert got == [((0, 2), (0, 8), (0, 128)), ((2, 4), (0, 8), (128, 256)), ((4, 6), (8, 16), (0, 128)),
                   ((6, 8), (8, 16), (128, 256))]
    with pytest.raises(QuantkitError, match="world size 2"):
        ParallelSpec(tp=2, ep=1, rank=0, world=4)


def test_fp8_slices_keep_the_checkpoint_scale_tiles(tiny_fp8):
    src = SliceReader(CheckpointReader(tiny_fp8))
    name = "model.layers.0.self_attn.o_proj.weight"  # [256, 256]: 2 x 2 tiles
    full = src.weight(name, torch.float32)
    assert torch.equal(src.weight(name, torch.float32, cols=(128, 256)), full[:, 128:])
    assert torch.equal(src.weight(name, torch.float32, rows=(64, 192)), full[64:192])  # dense: any cut
    assert src.block_scale(name, None, (128, 256)).shape == (2, 1)
    assert src.block_scale(name, (64, 128), None).shape == (1, 2)  # inside one tile: that tile's scale
    with pytest.raises(QuantkitError, match="cuts a 128-wide FP8 scale block"):
        src.block_scale(name, (64, 192), None)


@pytest.mark.slow  # three processes start torch
def test_cli_generate_tp2_matches_one_process(tiny_fp8):
    args = ["generate", tiny_fp8, "--prompt", "Hello there", "--prompt", "a b", "--max-new-tokens", "6",
            "--device", "cpu", "--dtype", "fp32"]
    one = run_cli(*args, check=True)
    two = run_cli(*args, "--tp", "2", "--ep", "2", check=True)
    assert two.stdout == one.stdout and two.stdout.count("---") == 2  # rank 0 alone prints


@pytest.mark.slow  # three processes start torch
def test_external_torchrun(tiny_bf16):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    args = ["generate", str(tiny_bf16), "--prompt", "Hello", "--max-new-tokens", "4", "--device", "cpu", "--dtype",
            "fp32"]
    one = run_cli(*args, check=True)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                           "quantkit.cli", *args, "--ep", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == one.stdout


@pytest.mark.parametrize("degrees,needle", [
    (["--tp", "4"], "must divide num_key_value_heads"),
    (["--tp", "2", "--ep", "3"], "smaller degree must divide"),
    (["--ep", "3"], "must divide num_local_experts"),
    (["--tp", "0"], "must be positive"),
])
def test_invalid_degrees_one_line(tiny_fp8, degrees, needle):
    proc = run_cli("generate", tiny_fp8, "--prompt", "Hi", "--device", "cpu", *degrees)
    assert_one_line_error(proc, needle)


def test_local_ranks_share_the_cores(monkeypatch):
    from quantkit.runtime.parallel import rank_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert [rank_threads(w) for w in (1, 2, 4, 8, 128)] == [64, 32, 16, 8, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice stands
    assert rank_threads(4) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "many")  # not a count: the share
    assert rank_threads(4) == 16


def test_world_size_must_match_the_degrees(tiny_bf16, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(QuantkitError, match="runs as 2 processes"):
        init_parallel(2, 1)


@pytest.mark.slow  # three processes start torch
def test_cli_eval_tp2_matches_one_process(tiny_fp8, tiny_bf16, tmp_path):
    args = ["eval", tiny_fp8, "--reference", tiny_bf16, "--window", "32", "--max-windows", "2", "--device", "cpu"]
    one = run_cli(*args, "-o", tmp_path / "one", check=True)
    two = run_cli(*args, "-o", tmp_path / "two", "--tp", "2", check=True)
    # KLD, top-1, perplexities: the same to the last printed digit, give or take one (two ranks sum the logits'
    # contributions in another order)
    nums = [re.findall(r"\d+\.?\d*", out.stdout.splitlines()[0]) for out in (one, two)]
    assert len(nums[0]) == len(nums[1]) >= 5
    for a, b in zip(*nums):
        decimals = len(a.partition(".")[2])
        assert abs(float(a) - float(b)) <= 1.01 * 10.0**-decimals, (one.stdout.splitlines()[0], two.stdout)
    assert (tmp_path / "two" / "results.json").is_file()


# ---- sublayers, teacher-forced -------------------------------------------------------------------------------
# The fp8 backend re-quantizes activations in every layer and routes by top-k, so at real widths a correct TP run's
# logits drift from one process's (an fp32-rounding difference flips an FP8 rounding, which flips a later router
# choice); sublayers fed the same input must still agree to rounding. runtime.parallel.sublayer_io feeds them.

TF_DEGREES = [(2, 1), (1, 2), (2, 2)]


def _wrong_kv_heads(self, n: int):  # the other rank's KV heads: a slicing error the comparison must catch
    per = n // self.tp
    t = self.tp_rank if n != 2 else self.tp - 1 - self.tp_rank  # tiny has 2 KV heads, 4 query heads
    return t * per, (t + 1) * per


def _teacher_forced_ranks(ckpt: str, backend: str, out: str) -> None:
    from quantkit.runtime.parallel import ParallelSpec, sublayer_io

    feed = torch.load(os.path.join(out, "ref.pt"))
    for tp, ep, tag in [*((tp, ep, "") for tp, ep in TF_DEGREES), (2, 1, "-broken")]:
        if tag:
            ParallelSpec.heads = _wrong_kv_heads  # this process only (spawned)
        spec, _ = init_parallel(tp, ep)
        model = load_model(ckpt, dtype=torch.float32, backend=backend)
        with sublayer_io(model, feed) as got:
            prefill_then_decode(model)
        if spec.rank == 0:
            torch.save(got, os.path.join(out, f"{tp}x{ep}{tag}.pt"))


def _sublayer_errors(got, ref) -> list[float]:
    assert [(k, n, x.shape) for k, n, x, _ in got] == [(k, n, x.shape) for k, n, x, _ in ref]
    return [((g - r).norm() / r.norm()).item() for (_, _, _, g), (_, _, _, r) in zip(got, ref)]


@pytest.mark.parametrize("ckpt,backend", [("tiny_fp8", "fp8"), ("tiny_bf16", "dense")])
def test_teacher_forced_sublayers_match_one_process(ckpt, backend, request, tmp_path):
    from quantkit.runtime.parallel import sublayer_io

    folder = str(request.getfixturevalue(ckpt))
    model = load_model(folder, dtype=torch.float32, backend=backend)
    with sublayer_io(model) as ref:
        prefill_then_decode(model)
    assert [(k, n) for k, n, _, _ in ref] == [("attn", 0), ("moe", 0), ("attn", 1), ("moe", 1)] * 2
    torch.save(ref, tmp_path / "ref.pt")
    spawn(_teacher_forced_ranks, 2, folder, backend, str(tmp_path))
    for tp, ep in TF_DEGREES:
        errs = _sublayer_errors(torch.load(tmp_path / f"{tp}x{ep}.pt"), ref)
        assert max(errs) < 1e-5, (tp, ep, errs)  # fed the same input: only the summation order differs
    errs = _sublayer_errors(torch.load(tmp_path / "2x1-broken.pt"), ref)
    assert min(errs[0::2]) > 1e-2  # every attention call with the wrong KV heads is off by far more than rounding
