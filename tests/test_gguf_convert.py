"""`quantkit convert --to gguf`: llama.cpp's minimax-m2 GGUF, streamed, split, resumable, read back by gguf-py.

Every file is read with gguf-py's GGUFReader, every tensor's bytes are compared with gguf-py's reference quantizer
on the source weights (bit for bit for F32/F16/BF16/Q8_0) and decoded with gguf.quants.dequantize; names, shapes,
types and metadata are compared with what llama.cpp's loader asks for minimax-m2.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli
from gguf import GGMLQuantizationType, GGUFReader

from quantkit import synth
from quantkit.arch import MiniMaxM2Config
from quantkit.checkpoint import CheckpointReader
from quantkit.errors import QuantkitError
from quantkit.formats import gguf_minimax, gguf_quants
from quantkit.formats.gguf_writer import GGUFStreamWriter, TensorInfo, kv_str, kv_u32
from quantkit.gguf_convert import convert_gguf, load_imatrix, produce
from quantkit.recipe import Recipe

PER_LAYER = ("attn_k", "attn_k_norm", "attn_norm", "attn_output", "attn_q", "attn_q_norm", "attn_v", "exp_probs_b",
             "ffn_down_exps", "ffn_gate_exps", "ffn_gate_inp", "ffn_norm", "ffn_up_exps")
ARCH_KEYS = ("block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
             "attention.head_count_kv", "rope.freq_base", "attention.layer_norm_rms_epsilon", "expert_count",
             "expert_used_count", "attention.key_length", "attention.value_length", "expert_gating_func",
             "vocab_size", "expert_feed_forward_length", "rope.dimension_count")


def fields(r: GGUFReader) -> dict:
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def gguf_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.gguf"))


def source_f32(reader: CheckpointReader, t: gguf_minimax.GGUFTensor) -> np.ndarray:
    """The source weight of a GGUF tensor in float32, experts stacked: what the file must encode."""
    ws = [reader.weight(s, torch.float32) for s in t.sources]
    w = torch.stack(ws) if t.kind == "expert" else ws[0]
    return w.numpy()


def expected_names(n_layers: int) -> set[str]:
    names = {"token_embd.weight", "output_norm.weight", "output.weight"}
    for n in range(n_layers):
        names |= {f"blk.{n}.{s}.{'bias' if s == 'exp_probs_b' else 'weight'}" for s in PER_LAYER}
    return names


# ---- the plan: names, shapes and llama-quantize's type rules at MiniMax-M2's real size -------------------------


def real_config() -> MiniMaxM2Config:
    raw = synth.release_config("minimax-m2", None, False, {"bos_token_id": 200034, "eos_token_id": 200020})
    return MiniMaxM2Config.from_dict(raw)


def test_names_cover_llama_cpp_tensor_list():
    """The per-layer kinds are exactly gguf-py's MODEL_TENSORS[MINIMAXM2], with llama.cpp's ggml shapes."""
    cfg = real_config()
    plan = gguf_minimax.plan_tensors(cfg, Recipe.load("gguf-q4_k_m"))
    assert {t.name for t in plan} == expected_names(62)
    wanted = {gguf.TENSOR_NAMES[k].format(bid=0) for k in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.MINIMAXM2]}
    ours = {t.name.rsplit(".", 1)[0] for t in plan if t.layer in (None, 0)}
    assert ours == wanted
    ne = {t.name: t.info.ne for t in plan}
    assert ne["token_embd.weight"] == ne["output.weight"] == (3072, 200064)
    assert ne["blk.7.attn_q.weight"] == (3072, 6144) and ne["blk.7.attn_output.weight"] == (6144, 3072)
    assert ne["blk.7.attn_k.weight"] == ne["blk.7.attn_v.weight"] == (3072, 1024)
    assert ne["blk.7.attn_q_norm.weight"] == (6144,) and ne["blk.7.attn_k_norm.weight"] == (1024,)
    assert ne["blk.7.ffn_gate_inp.weight"] == (3072, 256) and ne["blk.7.exp_probs_b.bias"] == (256,)
    assert ne["blk.7.ffn_gate_exps.weight"] == ne["blk.7.ffn_up_exps.weight"] == (3072, 1536, 256)
    assert ne["blk.7.ffn_down_exps.weight"] == (1536, 3072, 256)
    # llama-quantize's order: names outside the blocks sorted, then blk.N by N, names sorted within a block
    names = [t.name for t in plan]
    assert names[:3] == ["output.weight", "output_norm.weight", "token_embd.weight"]
    assert names[3:16] == sorted(names[3:16]) and all(n.startswith("blk.0.") for n in names[3:16])
    assert names[16].startswith("blk.1.") and names[-1].startswith("blk.61.")


def test_q4_k_m_type_rules_for_minimax_m2():
    plan = gguf_minimax.plan_tensors(real_config(), Recipe.load("gguf-q4_k_m"))
    types = {t.name: t.info.qtype for t in plan}
    more = [n for n in range(62) if n < 7 or n >= 54 or (n - 7) % 3 == 2]
    assert len(more) == 30 and more[:9] == [0, 1, 2, 3, 4, 5, 6, 9, 12] and more[-8:] == list(range(54, 62))
    for n in range(62):
        bump = "Q6_K" if n in more else "Q4_K"
        assert types[f"blk.{n}.attn_v.weight"] == bump, n
        assert types[f"blk.{n}.ffn_down_exps.weight"] == bump, n
        for s in ("attn_q", "attn_k", "attn_output", "ffn_gate_exps", "ffn_up_exps"):
            assert types[f"blk.{n}.{s}.weight"] == "Q4_K"
        for s in ("attn_norm", "ffn_norm", "attn_q_norm", "attn_k_norm", "ffn_gate_inp"):
            assert types[f"blk.{n}.{s}.weight"] == "F32"
        assert types[f"blk.{n}.exp_probs_b.bias"] == "F32"
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    assert types["output_norm.weight"] == "F32"


@pytest.mark.parametrize("qtype, output, v_bump, base", [
    ("q5_k_m", "Q6_K", "Q6_K", "Q5_K"), ("q6_k", "Q6_K", "Q6_K", "Q6_K"), ("q8_0", "Q8_0", "Q8_0", "Q8_0"),
    ("q4_k", "Q4_K", "Q4_K", "Q4_K"), ("bf16", "BF16", "BF16", "BF16"), ("f16", "F16", "F16", "F16"),
])
def test_preset_type_rules(qtype, output, v_bump, base):
    plan = gguf_minimax.plan_tensors(real_config(), Recipe.load(f"gguf-{qtype}"))
    types = {t.name: t.info.qtype for t in plan}
    assert types["output.weight"] == output
    assert types["blk.0.attn_v.weight"] == types["blk.0.ffn_down_exps.weight"] == v_bump
    assert types["blk.7.attn_v.weight"] == types["blk.7.ffn_up_exps.weight"] == types["token_embd.weight"] == base
    assert types["blk.7.ffn_gate_inp.weight"] == types["blk.7.exp_probs_b.bias"] == "F32"


def test_fallback_for_rows_not_a_multiple_of_the_block():
    """llama-quantize's tensor_type_fallback: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, then F16 below 32."""
    raw = synth.release_config("tiny", 1, False, {"bos_token_id": 1, "eos_token_id": 2})
    raw.update(hidden_size=320, intermediate_size=48)  # 320: not k-quant-able, a multiple of 32; 48: neither
    cfg = MiniMaxM2Config.from_dict(raw)
    for preset, k, legacy in [("q4_k_m", "Q4_K", "Q5_0"), ("q5_k_m", "Q5_K", "Q5_1"), ("q6_k", "Q6_K", "Q8_0")]:
        types = {t.name: t.info.qtype for t in gguf_minimax.plan_tensors(cfg, Recipe.load(f"gguf-{preset}"))}
        assert types["blk.0.attn_q.weight"] == legacy  # ne0 = hidden 320
        assert types["blk.0.ffn_up_exps.weight"] == legacy
        assert types["blk.0.attn_output.weight"] == k  # ne0 = q width 256
        assert types["blk.0.ffn_down_exps.weight"] == "F16"  # ne0 = 48


def test_use_more_bits_matches_llama_quantize_on_two_layers():
    # llama-quantize --dry-run on a 2-layer model bumps layer 1 only (specs/gguf-kquants.md §4)
    assert [gguf_minimax.use_more_bits(i, 2) for i in range(2)] == [False, True]


# ---- end to end on the tiny checkpoints --------------------------------------------------------------------


@pytest.mark.parametrize("ckpt", ["tiny_bf16", "tiny_fp8"])
@pytest.mark.parametrize("qtype", ["bf16", "f16", "q8_0"])
def test_tensors_equal_reference_quantizer(request, tmp_path, ckpt, qtype):
    src = request.getfixturevalue(ckpt)
    out = tmp_path / "out"
    summary = convert_gguf(src, out, qtype=qtype, progress=False)
    files = gguf_files(out)
    assert [f.name for f in files] == [f"{src.name}-{qtype.upper()}.gguf"] and summary.shards == 1
    r = GGUFReader(files[0])
    reader = CheckpointReader(src)
    plan = {t.name: t for t in gguf_minimax.plan_tensors(reader.config, Recipe.load(f"gguf-{qtype}"))}
    assert [t.name for t in r.tensors] == list(plan)
    for t in r.tensors:
        p = plan[t.name]
        assert t.tensor_type.name == p.info.qtype
        assert tuple(int(d) for d in t.shape) == p.info.ne
        x = source_f32(reader, p)
        ref = gguf.quants.quantize(x, t.tensor_type)
        got = np.asarray(t.data)
        assert got.tobytes() == ref.tobytes(), f"{t.name}: bytes differ from gguf-py's {t.tensor_type.name}"
        back = gguf.quants.dequantize(got, t.tensor_type).reshape(x.shape)
        tol = {"F32": 0, "BF16": 2**-8, "F16": 2**-11, "Q8_0": 0.01}[p.info.qtype]
        scale = np.abs(x).max(axis=-1, keepdims=True)
        assert (np.abs(back - x) <= tol * scale + 1e-12).all(), t.name
    reader.close()


@pytest.mark.parametrize("ckpt", ["tiny_bf16", "tiny_fp8"])
def test_q4_k_m_with_imatrix_end_to_end(request, tmp_path, ckpt):
    """Q4_K_M: llama.cpp's mix (2 layers: layer 1 is a more-bits layer), each tensor's bytes those of the k-quant
    quantizer on the source with its imatrix slice (per expert for stacked experts), decoded identically by gguf-py
    and quantkit, and within the type's error."""
    src = request.getfixturevalue(ckpt)
    reader = CheckpointReader(src)
    plan = {t.name: t for t in gguf_minimax.plan_tensors(reader.config, Recipe.load("gguf-q4_k_m"))}
    rng = np.random.default_rng(1)
    sums = {n: rng.uniform(0.1, 4, (t.info.shape[0] if t.kind == "expert" else 1, t.info.shape[-1]))
            for n, t in plan.items() if t.kind in ("attn", "expert")}
    counts = {n: rng.integers(1, 50, v.shape[0]).astype(np.float32) for n, v in sums.items()}
    path = write_imatrix(tmp_path / "im.gguf", sums, counts)
    convert_gguf(src, tmp_path / "out", qtype="q4_k_m", imatrix=path, progress=False)
    r = GGUFReader(gguf_files(tmp_path / "out")[0])
    assert fields(r)["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_K_M
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.1.attn_v.weight"] == types["blk.1.ffn_down_exps.weight"] == types["output.weight"] == "Q6_K"
    assert types["blk.0.attn_v.weight"] == types["blk.0.ffn_down_exps.weight"] == types["token_embd.weight"] == "Q4_K"
    tol = {"Q4_K": 0.1, "Q6_K": 0.03, "F32": 0.0}
    for t in r.tensors:
        p = plan[t.name]
        x = torch.from_numpy(source_f32(reader, p))
        im = sums.get(t.name)
        # llama.cpp's reader: in_sum2 / count in float32, as stored
        im = None if im is None else torch.from_numpy(im.astype(np.float32) / counts[t.name][:, None])
        got = np.asarray(t.data)
        if p.info.qtype != "F32":
            if im is not None and p.kind != "expert":
                im = im[0]
            want = gguf_quants.quantize(x, p.info.qtype, imatrix=im, name=t.name).numpy()
            assert got.tobytes() == want.tobytes(), t.name
            ours = gguf_quants.dequantize(torch.from_numpy(got.copy().reshape(-1)), p.info.qtype, x.shape).numpy()
            theirs = gguf.quants.dequantize(got, t.tensor_type).reshape(x.shape)
            assert np.array_equal(ours, theirs), t.name
        else:
            theirs = got.reshape(x.shape)
        rel = float(np.sqrt(((theirs - x.numpy()) ** 2).sum() / (x.numpy() ** 2).sum()))
        assert rel <= tol[p.info.qtype], (t.name, rel)
    meta = fields(r)
    assert meta["quantize.imatrix.entries_count"] == len(sums)
    reader.close()


def test_metadata_is_llama_cpp_minimax_m2(tiny_bf16, tmp_path):
    convert_gguf(tiny_bf16, tmp_path / "out", qtype="q8_0", progress=False)
    meta = fields(GGUFReader(gguf_files(tmp_path / "out")[0]))
    cfg = MiniMaxM2Config.from_folder(tiny_bf16)
    tj = json.loads((tiny_bf16 / "tokenizer.json").read_text())
    tc = json.loads((tiny_bf16 / "tokenizer_config.json").read_text())
    assert meta["general.architecture"] == "minimax-m2" and meta["general.quantized_by"] == "quantkit"
    assert meta["general.name"] == meta["general.base_model.0.name"] == tiny_bf16.name
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0 and meta["general.quantization_version"] == 2
    a = "minimax-m2."
    want = {"block_count": 2, "context_length": cfg.max_position_embeddings, "embedding_length": 256,
            "feed_forward_length": 256, "attention.head_count": 4, "attention.head_count_kv": 2,
            "expert_count": 16, "expert_used_count": 4, "attention.key_length": 64, "attention.value_length": 64,
            "expert_gating_func": 2, "vocab_size": 2048, "expert_feed_forward_length": 256,
            "rope.dimension_count": 32}
    assert set(k for k in meta if k.startswith(a)) == {a + k for k in ARCH_KEYS}
    for k, v in want.items():
        assert meta[a + k] == v, k
    assert meta[a + "rope.freq_base"] == pytest.approx(5e6)
    assert meta[a + "attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "minimax-m2"
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == cfg.vocab_size
    for tok, i in tj["model"]["vocab"].items():
        assert tokens[i] == tok and types[i] == 1
    for added in tj["added_tokens"]:
        assert tokens[added["id"]] == added["content"]
        assert types[added["id"]] == (3 if added["special"] else 4)
    assert len(meta["tokenizer.ggml.merges"]) == len(tj["model"]["merges"])
    assert meta["tokenizer.ggml.merges"][0] == " ".join(tj["model"]["merges"][0]).replace("\u0020\u0020", " ")
    ids = {a["content"]: a["id"] for a in tj["added_tokens"]}
    assert meta["tokenizer.ggml.bos_token_id"] == ids[tc["bos_token"]] == cfg.bos_token_id
    assert meta["tokenizer.ggml.eos_token_id"] == ids[tc["eos_token"]] == cfg.eos_token_id
    assert meta["tokenizer.ggml.padding_token_id"] == ids[tc["pad_token"]]
    assert meta["tokenizer.chat_template"] == tc["chat_template"]
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert not any(k.startswith("split.") for k in meta)  # an unsplit file carries no split keys


def test_router_and_correction_bias_are_f32_copies(tiny_fp8, tmp_path):
    convert_gguf(tiny_fp8, tmp_path / "out", qtype="bf16", progress=False)
    r = GGUFReader(gguf_files(tmp_path / "out")[0])
    reader = CheckpointReader(tiny_fp8)
    t = {x.name: x for x in r.tensors}
    bias = reader.tensor("model.layers.1.block_sparse_moe.e_score_correction_bias").float().numpy()
    gate = reader.tensor("model.layers.1.block_sparse_moe.gate.weight").float().numpy()
    assert t["blk.1.exp_probs_b.bias"].tensor_type == GGMLQuantizationType.F32
    assert np.array_equal(np.asarray(t["blk.1.exp_probs_b.bias"].data), bias)
    assert np.array_equal(np.asarray(t["blk.1.ffn_gate_inp.weight"].data), gate)
    # experts stacked in expert order, w1 -> gate, w3 -> up, w2 -> down
    up = np.asarray(t["blk.1.ffn_up_exps.weight"].data)
    w3 = reader.weight("model.layers.1.block_sparse_moe.experts.5.w3.weight", torch.float32)
    assert up[5].tobytes() == w3.bfloat16().view(torch.int16).numpy().tobytes()  # the reader gives BF16 as bytes
    reader.close()


def test_splits_named_and_keyed_as_gguf_split(tiny_bf16, tmp_path):
    convert_gguf(tiny_bf16, tmp_path / "one", qtype="q8_0", progress=False)
    whole = GGUFReader(gguf_files(tmp_path / "one")[0])
    convert_gguf(tiny_bf16, tmp_path / "split", qtype="q8_0", split_max_bytes=1_000_000, progress=False)
    files = gguf_files(tmp_path / "split")
    n = len(files)
    assert n >= 3
    assert [f.name for f in files] == [f"{tiny_bf16.name}-Q8_0-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    seen = {}
    for no, f in enumerate(files):
        r = GGUFReader(f)
        meta = fields(r)
        assert list(meta)[-3:] == ["split.no", "split.tensors.count", "split.count"]
        assert meta["split.no"] == no and meta["split.count"] == n
        assert meta["split.tensors.count"] == len(whole.tensors)
        if no == 0:
            assert {k: v for k, v in meta.items() if not k.startswith("split.")} == fields(whole)
        else:
            assert set(meta) == {"split.no", "split.count", "split.tensors.count"}
        data = sum(int(t.n_bytes) + (-int(t.n_bytes) % 32) for t in r.tensors)
        assert data <= 1_000_000 or len(r.tensors) == 1
        for t in r.tensors:
            seen[t.name] = np.asarray(t.data).tobytes()
    assert list(seen) == [t.name for t in whole.tensors]
    for t in whole.tensors:
        assert seen[t.name] == np.asarray(t.data).tobytes()


def _crash_free(args, out):
    return run_cli("convert", *args, "-o", out, "--no-progress")


def test_resume_after_crash_is_byte_identical(tiny_fp8, tmp_path):
    args = [tiny_fp8, "--to", "gguf", "--type", "q8_0", "--split-max-size", "1MB"]
    _crash_free(args, tmp_path / "ref")
    crashed = run_cli("convert", *args, "-o", tmp_path / "run", "--no-progress",
                      env={"QUANTKIT_CRASH_AFTER_SHARDS": "2"})
    assert crashed.returncode == 137
    done = gguf_files(tmp_path / "run")
    assert len(done) == 2  # the rest never appeared under a final name
    assert_one_line_error(_crash_free(args, tmp_path / "run"), "--resume")
    # a finished split damaged on disk is not trusted: rewritten on resume
    with open(done[1], "r+b") as f:
        f.seek(-40, 2)
        f.write(b"\xff" * 8)
    proc = run_cli("convert", *args, "-o", tmp_path / "run", "--no-progress", "--resume", check=True)
    assert "1 reused" in proc.stdout
    ref, run = gguf_files(tmp_path / "ref"), gguf_files(tmp_path / "run")
    assert [f.name for f in ref] == [f.name for f in run]
    for a, b in zip(ref, run):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert not list((tmp_path / "run").glob(".*.partial"))


def test_interrupted_split_leaves_only_a_partial(tiny_bf16, tmp_path):
    """Killed mid-split (SIGKILL from inside produce), nothing is left under a final name."""
    import os

    out = tmp_path / "out"
    code = (
        "import os, quantkit.gguf_convert as g\n"
        "orig, n = g.quantize_rows, [0]\n"
        "def q(*a, **k):\n"
        "    n[0] += 1\n"
        "    if n[0] == 12: os.kill(os.getpid(), 9)\n"
        "    return orig(*a, **k)\n"
        "g.quantize_rows = q\n"
        f"g.convert_gguf({str(tiny_bf16)!r}, {str(out)!r}, qtype='q8_0', progress=False)\n"
    )
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, env={**os.environ})
    assert proc.returncode == -signal.SIGKILL
    assert not gguf_files(out) and list(out.glob(".*.gguf.partial"))
    convert_gguf(tiny_bf16, out, qtype="q8_0", resume=True, progress=False)
    convert_gguf(tiny_bf16, tmp_path / "ref", qtype="q8_0", progress=False)
    assert gguf_files(out)[0].read_bytes() == gguf_files(tmp_path / "ref")[0].read_bytes()
    assert not list(out.glob(".*.partial"))


def test_fallback_end_to_end(tmp_path, monkeypatch):
    """A checkpoint whose rows are not a multiple of 32: those tensors fall back to F16, the rest stay Q8_0."""
    monkeypatch.setitem(synth.PRESETS, "odd", dict(
        hidden_size=80, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, rotary_dim=16, num_hidden_layers=1, vocab_size=512,
        max_position_embeddings=1024, tokenizer_vocab=512))
    synth.make_checkpoint(tmp_path / "odd", preset="odd")
    convert_gguf(tmp_path / "odd", tmp_path / "out", qtype="q8_0", progress=False)
    r = GGUFReader(gguf_files(tmp_path / "out")[0])
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.0.ffn_up_exps.weight"] == types["output.weight"] == "F16"
    assert types["blk.0.attn_output.weight"] == types["blk.0.ffn_down_exps.weight"] == "Q8_0"  # ne0 64, 96
    reader = CheckpointReader(tmp_path / "odd")
    w = reader.weight("model.layers.0.self_attn.q_proj.weight", torch.float32)
    got = np.asarray({t.name: t for t in r.tensors}["blk.0.attn_q.weight"].data)
    assert np.array_equal(got, w.numpy().astype(np.float16))


def test_stacked_experts_stream_expert_by_expert(tiny_bf16):
    """Memory: a stacked expert tensor is produced one expert at a time, never as the whole stack."""
    reader = CheckpointReader(tiny_bf16)
    plan = gguf_minimax.plan_tensors(reader.config, Recipe.load("gguf-bf16"))
    t = next(p for p in plan if p.name == "blk.0.ffn_down_exps.weight")
    chunks = list(produce(reader, t, None))
    assert len(chunks) == reader.config.num_local_experts
    assert all(c.nbytes == t.info.nbytes // len(chunks) for c in chunks)
    reader.close()


# ---- imatrix -------------------------------------------------------------------------------------------------


def write_imatrix(path: Path, entries: dict[str, np.ndarray], counts: dict[str, np.ndarray]) -> Path:
    w = gguf.GGUFWriter(path, "minimax-m2")
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", ["calib.txt"])
    w.add_uint32("imatrix.chunk_count", 7)
    w.add_uint32("imatrix.chunk_size", 512)
    for name in sorted(entries):
        w.add_tensor(name + ".in_sum2", entries[name].astype(np.float32))
        w.add_tensor(name + ".counts", counts[name].astype(np.float32).reshape(-1, 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_imatrix_slices_reach_the_quantizer_per_expert(tiny_bf16, tmp_path, monkeypatch):
    import quantkit.gguf_convert as g

    rng = np.random.default_rng(0)
    up = rng.uniform(1, 2, (16, 256)).astype(np.float32)
    q = rng.uniform(1, 2, (1, 256)).astype(np.float32)
    cnt_up = np.arange(16, dtype=np.float32)  # expert 0 saw no token: llama.cpp then weighs it uniformly
    path = write_imatrix(tmp_path / "imatrix.gguf", {"blk.1.ffn_up_exps.weight": up, "blk.0.attn_q.weight": q},
                         {"blk.1.ffn_up_exps.weight": cnt_up, "blk.0.attn_q.weight": np.array([4.0])})
    reader = CheckpointReader(tiny_bf16)
    entries, info = load_imatrix(path, gguf_minimax.plan_tensors(reader.config, Recipe.load("gguf-q8_0")))
    reader.close()
    assert sorted(entries) == ["blk.0.attn_q.weight", "blk.1.ffn_up_exps.weight"]
    assert info["entries"] == 2 and info["chunks"] == 7 and info["dataset"] == "calib.txt"
    seen: dict[str, list] = {}
    orig = g.quantize_rows

    def spy(x, qtype, imatrix=None, name=None, device="cpu"):
        seen.setdefault(name, []).append(None if imatrix is None else np.array(imatrix))
        return orig(x, qtype, imatrix, name, device)

    monkeypatch.setattr(g, "quantize_rows", spy)
    convert_gguf(tiny_bf16, tmp_path / "out", qtype="q8_0", imatrix=path, progress=False)
    got = seen["blk.1.ffn_up_exps.weight"]
    assert len(got) == 16
    assert np.array_equal(got[0], np.ones(256, np.float32))
    for e in range(1, 16):
        assert np.allclose(got[e], up[e] / e), e
    assert all(np.allclose(v, q[0] / 4) for v in seen["blk.0.attn_q.weight"])
    assert all(v is None for v in seen["blk.0.ffn_up_exps.weight"])  # no entry: quantized without
    meta = fields(GGUFReader(gguf_files(tmp_path / "out")[0]))
    assert meta["quantize.imatrix.file"] == "imatrix.gguf" and meta["quantize.imatrix.entries_count"] == 2
    assert meta["quantize.imatrix.dataset"] == "calib.txt" and meta["quantize.imatrix.chunks_count"] == 7


# ---- bad input: one line each ----------------------------------------------------------------------------------


def test_bad_input_one_line_errors(tiny_bf16, tmp_path):
    base = [tiny_bf16, "--to", "gguf", "--no-progress"]
    assert_one_line_error(run_cli("convert", *base, "--type", "q3_k", "-o", tmp_path / "a"), "--type q3_k")
    assert_one_line_error(run_cli("convert", *base, "-o", tmp_path / "b"), "--type")
    assert_one_line_error(run_cli("convert", *base, "--type", "q8_0", "--split-max-size", "lots",
                                  "-o", tmp_path / "c"), "--split-max-size")
    assert_one_line_error(run_cli("convert", tiny_bf16, "--to", "bf16", "--type", "q8_0", "-o", tmp_path / "d"),
                          "--to gguf only")
    other = write_imatrix(tmp_path / "other.gguf", {"blk.0.ffn_up_exps.weight": np.ones((16, 3072))},
                          {"blk.0.ffn_up_exps.weight": np.ones(16)})
    line = assert_one_line_error(run_cli("convert", *base, "--type", "q8_0", "--imatrix", other,
                                         "-o", tmp_path / "e"), "other.gguf", "another model")
    assert "blk.0.ffn_up_exps.weight" in line
    deeper = write_imatrix(tmp_path / "deeper.gguf", {"blk.40.attn_q.weight": np.ones((1, 256))},
                           {"blk.40.attn_q.weight": np.ones(1)})
    assert_one_line_error(run_cli("convert", *base, "--type", "q8_0", "--imatrix", deeper, "-o", tmp_path / "f"),
                          "blk.40.attn_q.weight", "another model")
    assert_one_line_error(run_cli("convert", *base, "--type", "q8_0", "--name", "../up", "-o", tmp_path / "h"),
                          "--name")
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"\x00" * 7)
    assert_one_line_error(run_cli("convert", *base, "--type", "q8_0", "--imatrix", junk, "-o", tmp_path / "g"),
                          "junk.dat")
    assert not any((tmp_path / d).glob("*.gguf") for d in "abcdefgh" if (tmp_path / d).exists())


def test_wrong_recipe_target_refused(tiny_bf16, tmp_path):
    with pytest.raises(QuantkitError, match="not --to gguf"):
        convert_gguf(tiny_bf16, tmp_path / "out", qtype="q8_0", recipe="bf16", progress=False)


# ---- the writer's state machine --------------------------------------------------------------------------------


def test_stream_writer_fails_fast(tmp_path):
    infos = [TensorInfo("a.weight", (2, 32), "Q8_0"), TensorInfo("b.weight", (3,), "F32")]
    kvs = [kv_str("general.architecture", "minimax-m2"), kv_u32("general.alignment", 64)]
    w = GGUFStreamWriter(tmp_path / "x.gguf", kvs, infos)
    with pytest.raises(RuntimeError, match="expected"):
        w.begin_tensor("a.weight")  # not opened
    w.open()
    with pytest.raises(RuntimeError, match="planned"):
        w.begin_tensor("b.weight")  # out of order
    w.begin_tensor("a.weight")
    with pytest.raises(RuntimeError, match="more than"):
        w.write(bytes(69))
    w.write(bytes(34))
    with pytest.raises(RuntimeError, match="short"):
        w.end_tensor()
    w.write(bytes(34))
    w.end_tensor()
    with pytest.raises(RuntimeError, match="closed after 1 of 2"):
        w.close()
    w.abort()
    assert not list(tmp_path.iterdir())  # nothing under the final name, no partial left

    w = GGUFStreamWriter(tmp_path / "x.gguf", kvs, infos)
    w.open()
    for t, data in zip(infos, [np.arange(68, dtype=np.uint8), np.array([1.5, 2.5, -3], np.float32)]):
        w.begin_tensor(t.name)
        w.write(data)
        w.end_tensor()
    w.close()
    r = GGUFReader(tmp_path / "x.gguf")
    assert r.alignment == 64 and [int(t.data_offset) % 64 for t in r.tensors] == [0, 0]
    assert np.array_equal(np.asarray(r.tensors[1].data), np.array([1.5, 2.5, -3], np.float32))
    assert (tmp_path / "x.gguf").stat().st_size == w.nbytes
    assert re.fullmatch(r"[0-9a-f]{64}", w._hash.hexdigest())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("qtype", ["q4_k_m", "q6_k", "q8_0"])
def test_cuda_quantization_writes_the_same_file(tiny_bf16, tmp_path, qtype):
    """--device cuda computes the k-quant search on the GPU: the file is byte-identical to the CPU one."""
    cpu = convert_gguf(tiny_bf16, tmp_path / "cpu", qtype=qtype, progress=False)
    gpu = convert_gguf(tiny_bf16, tmp_path / "gpu", qtype=qtype, progress=False, device="cuda")
    assert gpu.tensors == cpu.tensors
    assert gguf_files(tmp_path / "gpu")[0].read_bytes() == gguf_files(tmp_path / "cpu")[0].read_bytes()


def test_legacy_dat_imatrix_is_sliced_per_expert(tiny_bf16, tmp_path, monkeypatch):
    """llama.cpp's older imatrix.dat (mean x ncall, experts flattened) gives the same per-expert slices."""
    import struct

    import quantkit.gguf_convert as g

    mean = np.random.default_rng(2).uniform(0.5, 2, (16, 256)).astype(np.float32)
    name = b"blk.0.ffn_gate_exps.weight"
    body = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 3, mean.size)
    path = tmp_path / "imatrix.dat"
    path.write_bytes(body + (mean * 3).astype("<f4").tobytes() + struct.pack("<i", 10) + struct.pack("<i", 4) + b"wiki")
    seen = []
    orig = g.quantize_rows

    def spy(x, qtype, imatrix=None, name=None, device="cpu"):
        if name == "blk.0.ffn_gate_exps.weight":
            seen.append(np.array(imatrix))
        return orig(x, qtype, imatrix, name, device)

    monkeypatch.setattr(g, "quantize_rows", spy)
    convert_gguf(tiny_bf16, tmp_path / "out", qtype="q8_0", imatrix=path, progress=False)
    assert len(seen) == 16 and all(np.allclose(seen[e], mean[e], rtol=1e-6) for e in range(16))
    meta = fields(GGUFReader(gguf_files(tmp_path / "out")[0]))
    assert meta["quantize.imatrix.dataset"] == "wiki" and meta["quantize.imatrix.chunks_count"] == 10
