"""GGUF files under tensor and expert parallelism on the CPU with gloo: two processes give the logits of one, each
reading only its slices of the mapped file; a column cut inside a quantization block is refused in one line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # the GGUF backend imports the kernels: Triton's interpreter on a CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conftest import run_cli  # noqa: E402
from test_parallel import prefill_then_decode, spawn  # noqa: E402
from test_runtime_gguf import MIX, T, write_gguf  # noqa: E402

from quantkit.convert import convert  # noqa: E402
from quantkit.errors import QuantkitError  # noqa: E402
from quantkit.runtime import load_model  # noqa: E402
from quantkit.runtime.gguf import GGUFExperts, GGUFLinear, GGUFModelFile  # noqa: E402
from quantkit.runtime.parallel import ParallelSpec, check_degrees, init_parallel  # noqa: E402


@pytest.fixture(scope="module")
def gguf_files(tiny_bf16, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("par-gguf")
    mix = d / "mix.gguf"  # Q8_0 projections and experts, a Q5_0 and an F16 projection, Q8_0 head and embeddings
    write_gguf(tiny_bf16, mix, MIX)
    convert(tiny_bf16, d / "q4k", target="gguf", progress=False, gguf={"qtype": "q4_k"})
    return {"mix": mix, "q4_k": next((d / "q4k").glob("*.gguf"))}


CASES = [("mix", 2, 1), ("mix", 1, 2), ("mix", 2, 2), ("q4_k", 1, 2)]  # k-quant rows of 256: experts whole


def _ranks(cases: list[tuple[str, int, int]], out: str) -> None:
    for path, tp, ep in cases:
        spec, _ = init_parallel(tp, ep)
        model = load_model(path, dtype=torch.float32)
        logits = prefill_then_decode(model)
        if spec.rank == 0:
            torch.save(logits, os.path.join(out, f"{Path(path).stem}-{tp}x{ep}.pt"))


@pytest.fixture(scope="module")
def gguf_parallel_logits(gguf_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("par-gguf-out")
    spawn(_ranks, 2, [(str(gguf_files[name]), tp, ep) for name, tp, ep in CASES], str(out))
    return out


@pytest.mark.parametrize("name,tp,ep", CASES)
def test_two_ranks_give_the_logits_of_one_process(gguf_files, gguf_parallel_logits, name, tp, ep):
    ref = prefill_then_decode(load_model(gguf_files[name], dtype=torch.float32))
    got = torch.load(gguf_parallel_logits / f"{gguf_files[name].stem}-{tp}x{ep}.pt")
    for r, g in zip(ref, got):
        assert g.shape == r.shape
        assert ((g - r).norm() / r.norm()).item() < 1e-5  # partial sums all-reduced: fp32 rounding only
        assert torch.equal(g.argmax(-1), r.argmax(-1))


def test_a_rank_holds_its_slices_in_gguf_blocks(gguf_files):
    """Rank 1 of TP2 x EP2 on the Q8_0 file: its heads' rows and o_proj columns, the second half of the experts
    (whole, EP = world), half the head's rows, all as GGUF bytes; the values are those rows and columns of the file."""
    from quantkit.runtime.gguf import load_gguf_sharded

    path = gguf_files["mix"]
    spec = ParallelSpec(tp=2, ep=2, rank=1, world=2)
    model = load_gguf_sharded(path, torch.float32, "cpu", spec)
    full = GGUFModelFile(path)
    att, ex = model.layers[0].self_attn, model.layers[0].moe.experts
    assert isinstance(att.q_proj, GGUFLinear) and isinstance(att.o_proj, GGUFLinear)
    assert isinstance(ex.inner, GGUFExperts) and (ex.lo, ex.n) == (8, 8)
    q_raw = full.raw("blk.0.attn_q.weight")
    assert torch.equal(att.q_proj.qweight, q_raw[128:256])  # heads 2, 3 of 4 (head_dim 64)
    o_dense = full.dense("blk.0.attn_output.weight", torch.float32)
    _, o_cols = full.part("blk.0.attn_output.weight", torch.float32, cols=(128, 256), dense=True)
    assert torch.equal(o_cols, o_dense[:, 128:256])
    assert torch.equal(ex.inner.gate, full.raw("blk.0.ffn_gate_exps.weight")[8:16])
    assert model.lm_head.proj.qweight.shape[0] == 1024  # of 2048 rows
    # a dense (F16) projection and a Q5_0 one (dequantized on load) are cut as values
    assert torch.equal(att.v_proj.weight, full.dense("blk.0.attn_v.weight", torch.float32)[64:128])
    assert torch.equal(att.k_proj.weight, full.dense("blk.0.attn_k.weight", torch.float32)[64:128])


def test_cuts_inside_a_block_are_refused(gguf_files):
    """Q4_K rows hold 256 values per block: the tiny model's o_proj (256 columns) cannot be split over two ranks,
    nor its experts' 256-wide intermediate; both are refused before any process starts, with one line."""
    path = gguf_files["q4_k"]
    assert GGUFModelFile(path).shard_format() == "gguf-kquant"
    with pytest.raises(QuantkitError, match="not a multiple of gguf-kquant's block of 256"):
        check_degrees(str(path), "auto", 2, 1)
    check_degrees(str(path), "auto", 1, 2)  # experts whole: fine
    with pytest.raises(QuantkitError, match="cannot be cut at columns \\[128, 256\\)"):
        GGUFModelFile(path).part("blk.0.attn_output.weight", torch.float32, cols=(128, 256))
    proc = run_cli("generate", str(path), "--prompt", "Hi", "--tp", "2", "--max-new-tokens", "2", "--device", "cpu")
    assert proc.returncode != 0 and "gguf-kquant" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_cli_generate_tp2_on_a_gguf_file(gguf_files):
    path = str(gguf_files["mix"])
    one = run_cli("generate", path, "--prompt", "Hello", "--max-new-tokens", "4", "--device", "cpu")
    two = run_cli("generate", path, "--prompt", "Hello", "--max-new-tokens", "4", "--device", "cpu", "--tp", "2")
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert two.stdout == one.stdout


def test_gguf_type_block_sizes(gguf_files):
    f = GGUFModelFile(gguf_files["mix"])
    assert (f.block_values("blk.0.attn_q.weight"), f.block_values("blk.0.attn_v.weight")) == (32, 1)
    assert f.shard_format() == "gguf-q8_0"
    assert T.Q5_0 in {f.tensor(n).tensor_type for n in f.tensors}
