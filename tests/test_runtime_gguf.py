"""The GGUF runtime backend (quantkit/runtime/gguf.py): llama.cpp `minimax-m2` files on quantkit's model.

GGUF files are built here with gguf-py's own GGUFWriter from the tiny checkpoint (names, shapes and metadata per
specs/minimax-m2.md section 5; Q8_0 and Q5_0 by gguf.quants.quantize), so the loader is checked against the
reference writer, independently of quantkit's. The model on those files must give the logits of the dense runtime
whose weights are the same values dequantized by gguf-py. The end-to-end test runs `quantkit convert --to gguf`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # kernels import triton; the CPU path runs the references

from conftest import run_cli  # noqa: E402

from quantkit.checkpoint import CheckpointReader  # noqa: E402
from quantkit.errors import QuantkitError  # noqa: E402
from quantkit.runtime import load_model  # noqa: E402
from quantkit.runtime.gguf import (  # noqa: E402
    GGUFExperts,
    GGUFLinear,
    find_gguf,
    gguf_storage,
    load_gguf_model,
    tokenizer_from_gguf,
)
from quantkit.tokenizer import load_tokenizer  # noqa: E402

CUDA = torch.cuda.is_available()
ATTN = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
EXPERTS = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}
# the mix of the main test: kernel types, a dense F16 projection, and a ggml type the kernels do not read (Q5_0,
# dequantized on load by gguf-py)
MIX = {"attn_q": T.Q8_0, "attn_k": T.Q5_0, "attn_v": T.F16, "attn_output": T.Q8_0, "ffn_gate_exps": T.Q8_0,
       "ffn_up_exps": T.Q8_0, "ffn_down_exps": T.Q8_0, "output": T.Q8_0, "token_embd": T.Q8_0}


def encode(values: np.ndarray, qtype: T) -> tuple[np.ndarray, np.ndarray]:
    """(what GGUFWriter stores, the values a reader gets back)."""
    if qtype == T.F32:
        return values, values
    if qtype == T.F16:
        data = values.astype(np.float16)
        return data, data.astype(np.float32)
    data = gguf.quants.quantize(values, qtype)
    return data, gguf.quants.dequantize(data, qtype)


def write_gguf(src: Path, path: Path, types: dict[str, T], split_max_tensors: int = 0,
               arch: str = "minimax-m2") -> dict[str, np.ndarray]:
    """The tiny checkpoint as llama.cpp's converter lays it out; returns each tensor's decoded values by GGUF name."""
    reader = CheckpointReader(src)
    cfg = reader.config
    w = gguf.GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.num_local_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_expert_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(cfg.rotary_dim)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    # the vocabulary as llama.cpp's converter stores a byte-level BPE one
    tj = json.loads((src / "tokenizer.json").read_text())
    tokens = [""] * cfg.vocab_size
    token_types = [gguf.TokenType.UNUSED] * cfg.vocab_size
    for t, i in tj["model"]["vocab"].items():
        tokens[i], token_types[i] = t, gguf.TokenType.NORMAL
    for a in tj["added_tokens"]:
        tokens[a["id"]] = a["content"]
        token_types[a["id"]] = gguf.TokenType.CONTROL if a["special"] else gguf.TokenType.USER_DEFINED
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t or f"[PAD{i}]" for i, t in enumerate(tokens)])
    w.add_token_types(token_types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    decoded = {}

    def add(name: str, values: torch.Tensor, kind: str | None = None) -> None:
        qtype = types.get(kind, T.F32) if kind else T.F32
        data, back = encode(values.float().numpy(), qtype)
        w.add_tensor(name, data, raw_dtype=qtype if qtype not in (T.F32, T.F16) else None)
        decoded[name] = back

    def hf(name: str) -> torch.Tensor:
        return reader.weight(name, torch.float32)

    add("token_embd.weight", hf("model.embed_tokens.weight"), "token_embd")
    add("output_norm.weight", hf("model.norm.weight"))
    add("output.weight", hf("lm_head.weight"), "output")
    for n in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{n}.", f"blk.{n}."
        add(b + "attn_norm.weight", hf(p + "input_layernorm.weight"))
        for proj, short in ATTN.items():
            add(b + short + ".weight", hf(f"{p}self_attn.{proj}.weight"), short)
        add(b + "attn_q_norm.weight", hf(p + "self_attn.q_norm.weight"))
        add(b + "attn_k_norm.weight", hf(p + "self_attn.k_norm.weight"))
        add(b + "ffn_norm.weight", hf(p + "post_attention_layernorm.weight"))
        m = p + "block_sparse_moe."
        add(b + "ffn_gate_inp.weight", hf(m + "gate.weight"))
        add(b + "exp_probs_b.bias", hf(m + "e_score_correction_bias"))
        for wname, short in EXPERTS.items():
            stacked = torch.stack([hf(f"{m}experts.{e}.{wname}.weight") for e in range(cfg.num_local_experts)])
            add(b + short + ".weight", stacked, short)
    reader.close()
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return decoded


def dense_twin(ckpt: Path, decoded: dict[str, np.ndarray]) -> torch.nn.Module:
    """The dense fp32 runtime with every weight replaced by the GGUF's decoded values."""
    model = load_model(ckpt, dtype=torch.float32, backend="dense")

    def v(name: str) -> torch.Tensor:
        return torch.from_numpy(decoded[name]).float()

    with torch.no_grad():
        model.embed_tokens.weight.copy_(v("token_embd.weight"))
        model.lm_head.weight.copy_(v("output.weight"))
        for n, block in enumerate(model.layers):
            for proj, short in ATTN.items():
                getattr(block.self_attn, proj).weight.copy_(v(f"blk.{n}.{short}.weight"))
            for wname, short in EXPERTS.items():
                getattr(block.moe.experts, wname).copy_(v(f"blk.{n}.{short}.weight"))
    return model


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    cache = model.new_cache(tokens.shape[0], tokens.shape[1] + 1)
    return model(tokens.to(model.device), cache).float().cpu()


TOKENS = torch.tensor([[5, 17, 300, 1024, 7, 7, 99, 2000, 42, 1], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])


@pytest.fixture(scope="module")
def mixed_gguf(tiny_bf16, tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-mix.gguf"
    return path, write_gguf(tiny_bf16, path, MIX)


def test_gguf_logits_match_dense_runtime_on_the_same_weights(tiny_bf16, mixed_gguf):
    path, decoded = mixed_gguf
    model = load_model(path, dtype=torch.float32, backend="gguf")
    att = model.layers[0].self_attn
    assert isinstance(att.q_proj, GGUFLinear) and att.q_proj.qtype == "q8_0"
    assert isinstance(att.o_proj, GGUFLinear) and isinstance(model.lm_head, GGUFLinear)
    assert not isinstance(att.k_proj, GGUFLinear) and not isinstance(att.v_proj, GGUFLinear)  # Q5_0, F16: dense
    assert isinstance(model.layers[1].moe.experts, GGUFExperts)
    assert model.layers[0].moe.gate.dtype == torch.float32
    got = logits(model, TOKENS)
    want = logits(dense_twin(tiny_bf16, decoded), TOKENS)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_gguf_config_comes_from_the_metadata(tiny_bf16, mixed_gguf):
    model = load_gguf_model(mixed_gguf[0], dtype=torch.float32)
    want = CheckpointReader(tiny_bf16).config
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "intermediate_size", "num_local_experts", "num_experts_per_tok", "vocab_size", "rotary_dim",
                  "rope_theta", "rms_norm_eps", "max_position_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(model.cfg, field) == getattr(want, field), field
    assert not model.cfg.tie_word_embeddings


def test_split_gguf_and_its_folder_load_the_same(tiny_bf16, mixed_gguf, tmp_path):
    decoded = write_gguf(tiny_bf16, tmp_path / "tiny.gguf", MIX, split_max_tensors=12)
    splits = sorted(tmp_path.glob("*.gguf"))
    assert len(splits) > 2 and splits[0].name.startswith("tiny-00001-of-")
    assert find_gguf(tmp_path) == splits[0]
    single = logits(load_model(mixed_gguf[0], dtype=torch.float32, backend="auto"), TOKENS)
    assert all(np.array_equal(decoded[k], v) for k, v in mixed_gguf[1].items())
    for path in (splits[0], splits[-1], tmp_path):  # any split names the model, and so does its folder
        torch.testing.assert_close(logits(load_model(path, dtype=torch.float32, backend="gguf"), TOKENS), single,
                                   rtol=0, atol=0)
    splits[1].unlink()
    with pytest.raises(QuantkitError, match="split file .* is missing"):
        load_model(splits[0])


def test_gguf_storage_counts_stored_bytes(mixed_gguf):
    total, bpw = gguf_storage(mixed_gguf[0])
    reader = gguf.GGUFReader(mixed_gguf[0])
    assert total == sum(int(t.n_bytes) for t in reader.tensors) < mixed_gguf[0].stat().st_size
    # Q8_0 is 8.5 bits a weight; attn_k in Q5_0 (5.5) and attn_v in F16 (16) pull the mix a little
    assert 8.0 < bpw < 9.0, bpw


def test_dense_backend_dequantizes_a_gguf(mixed_gguf):
    model = load_model(mixed_gguf[0], dtype=torch.float32, backend="dense")
    assert not any(isinstance(m, (GGUFLinear, GGUFExperts)) for m in model.modules())
    quant = load_model(mixed_gguf[0], dtype=torch.float32, backend="gguf")
    torch.testing.assert_close(logits(model, TOKENS), logits(quant, TOKENS), rtol=1e-4, atol=1e-3)


def test_gguf_bad_input_is_one_clear_error(tiny_bf16, mixed_gguf, tmp_path):
    with pytest.raises(QuantkitError, match="general.architecture is 'llama'"):
        write_gguf(tiny_bf16, tmp_path / "llama.gguf", MIX, arch="llama")
        load_model(tmp_path / "llama.gguf")
    with pytest.raises(QuantkitError, match="not 'fp8'"):
        load_model(mixed_gguf[0], backend="fp8")
    with pytest.raises(QuantkitError, match="gguf backend needs a GGUF file"):
        load_model(tiny_bf16, backend="gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    with pytest.raises(QuantkitError, match="junk.gguf: not a readable GGUF file"):
        load_model(tmp_path / "junk.gguf")
    proc = run_cli("generate", tmp_path / "missing.gguf", "--prompt", "hi", "--tokenizer", tiny_bf16,
                   "--device", "cpu")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "missing.gguf: no such GGUF file" in proc.stderr


def test_tokenizer_from_gguf_encodes_as_the_checkpoints(tiny_bf16, mixed_gguf):
    ours, want = tokenizer_from_gguf(mixed_gguf[0]), load_tokenizer(tiny_bf16)
    text = ("def parse_size(text: str) -> int:\n    return 42  # naïve, ÿ 日本\n"
            "<minimax:tool_call>x</minimax:tool_call> ]~b]user\nhello[e~[\n  The pass key is 31415.")
    ids = want.encode(text, add_special_tokens=False).ids
    assert ours.encode(text, add_special_tokens=False).ids == ids
    assert ours.decode(ids, skip_special_tokens=False) == want.decode(ids, skip_special_tokens=False)


def test_generate_runs_a_gguf_file(tiny_bf16, mixed_gguf):
    """With the checkpoint's tokenizer folder, and with the vocabulary the GGUF carries: the same tokens."""
    outs = []
    for extra in (("--tokenizer", str(tiny_bf16)), ()):
        proc = run_cli("generate", mixed_gguf[0], "--prompt", "def main():", "--max-new-tokens", "4", "--backend",
                       "gguf", "--dtype", "fp32", "--device", "cpu", *extra, check=True)
        assert "--- 'def main():'" in proc.stdout and "4 tokens in" in proc.stderr
        outs.append(proc.stdout)
    assert outs[0] == outs[1]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_gguf_model_on_the_gpu_matches_the_cpu(mixed_gguf):
    cpu = logits(load_model(mixed_gguf[0], dtype=torch.float32, backend="gguf"), TOKENS)
    gpu = logits(load_model(mixed_gguf[0], dtype=torch.bfloat16, device="cuda", backend="gguf"), TOKENS)
    assert (gpu.argmax(-1) == cpu.argmax(-1)).float().mean() > 0.9
    assert ((gpu - cpu).norm() / cpu.norm()).item() < 0.05


@pytest.mark.slow  # the conversion: Q4_K/Q6_K quantization of the tiny model on two cores
def test_convert_to_gguf_q4_k_m_runs_on_the_gguf_backend(tiny_bf16, tmp_path):
    out = tmp_path / "q4km"
    run_cli("convert", tiny_bf16, "--to", "gguf", "--type", "q4_k_m", "-o", out, check=True)
    path = find_gguf(out)
    assert path is not None
    model = load_model(out, dtype=torch.float32, backend="auto")
    kinds = {m.qtype for m in model.modules() if isinstance(m, GGUFLinear)}
    kinds |= {q for m in model.modules() if isinstance(m, GGUFExperts) for q in m.qtypes}
    assert {"q4_k", "q6_k"} <= kinds, kinds
    # the same file decoded by gguf-py, through the dense runtime
    reader = gguf.GGUFReader(path)
    decoded = {t.name: gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(
        tuple(reversed(t.shape.tolist()))) for t in reader.tensors}
    got = logits(model, TOKENS)
    torch.testing.assert_close(got, logits(dense_twin(tiny_bf16, decoded), TOKENS), rtol=1e-4,
                               atol=1e-4 * got.abs().max().item())
    # the vocabulary quantkit's writer stores tokenizes as the checkpoint's tokenizer.json does
    text = "def main():\n    print('naïve 日本')  # <minimax:tool_call>x</minimax:tool_call>"
    want = load_tokenizer(tiny_bf16).encode(text, add_special_tokens=False).ids
    assert tokenizer_from_gguf(out).encode(text, add_special_tokens=False).ids == want
    # and close to the BF16 model it came from: Q4_K_M keeps the argmax of most positions
    ref = logits(load_model(tiny_bf16, dtype=torch.float32), TOKENS)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.7
