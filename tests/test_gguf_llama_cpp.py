"""llama.cpp itself loads quantkit's minimax-m2 GGUF, tokenizes as quantkit does, and computes the same logits.

Needs llama-cpp-python (`pip install llama-cpp-python`, which builds llama.cpp from source: 0.3.36 took 14.6 minutes
on two busy cores). It is looked for in this interpreter, or in the one QUANTKIT_LLAMA_PYTHON names (a separate virtual
environment keeps the build out of the project's); without either the tests skip, as GPU tests do without CUDA.
llama.cpp runs in a subprocess, so a crash inside it fails the test instead of killing pytest.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from quantkit.gguf_convert import convert_gguf
from quantkit.recipe import Recipe
from quantkit.runtime import load_model
from quantkit.tokenizer import load_tokenizer

PROMPT = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n# The quick brown fox"

RUN_LLAMA = r"""
import json, sys
import numpy as np
import llama_cpp

path, text = sys.argv[1], sys.argv[2]
llm = llama_cpp.Llama(model_path=path, n_ctx=256, n_batch=256, logits_all=True, n_threads=2, verbose=False)
ids = llm.tokenize(text.encode(), add_bos=False, special=False)
llm.eval(ids)
scores = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
meta = {k: llm.metadata[k] for k in ("general.architecture", "tokenizer.ggml.pre")}
print(json.dumps({"ids": ids, "logits": scores.tolist(), "n_vocab": llm.n_vocab(), "meta": meta}))
"""


def llama_python() -> str:
    env = os.environ.get("QUANTKIT_LLAMA_PYTHON")
    if env:
        return env
    if importlib.util.find_spec("llama_cpp") is not None:
        return sys.executable
    pytest.skip("llama-cpp-python is not installed (or set QUANTKIT_LLAMA_PYTHON to a python that has it)")


def run_llama(path: Path) -> dict:
    proc = subprocess.run([llama_python(), "-c", RUN_LLAMA, str(path), PROMPT], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"llama.cpp refused {path.name}:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def nmse(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised MSE of a against the reference b, per position, worst position."""
    return float((((a - b) ** 2).mean(-1) / (b**2).mean(-1)).max())


def runtime_logits(path: Path, ids: list[int]) -> np.ndarray:
    """quantkit's runtime on `path` (a checkpoint folder or a GGUF file), float32, logits [T, V]."""
    model = load_model(path, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        return model(torch.tensor([ids]), model.new_cache(1, len(ids)))[0].double().numpy()


def prompt_ids(ckpt: Path) -> list[int]:
    return load_tokenizer(ckpt).encode(PROMPT, add_special_tokens=False).ids


@pytest.mark.slow
# measured (llama-cpp-python 0.3.36, 56 tokens, worst position): bf16 1.5e-5, q8_0 1.7e-4, q4_k_m 3.4e-4,
# q5_k_m 3.1e-4, q6_k 3.0e-4; top-1 agreement 100, 100, 89, 93, 95% (a random tiny model has near-ties)
@pytest.mark.parametrize("qtype", ["bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"])
def test_llama_cpp_matches_quantkit_runtime_on_the_same_file(tiny_bf16, tmp_path, qtype):
    llama_python()  # skips before converting when llama.cpp is not there
    convert_gguf(tiny_bf16, tmp_path / "out", qtype=qtype, progress=False)
    path = next((tmp_path / "out").glob("*.gguf"))
    got = run_llama(path)
    assert got["meta"] == {"general.architecture": "minimax-m2", "tokenizer.ggml.pre": "minimax-m2"}
    ids = prompt_ids(tiny_bf16)
    assert got["ids"] == ids  # llama.cpp's minimax-m2 pre-tokenizer and our BPE merges split the text alike
    ref = runtime_logits(path, ids)
    logits = np.asarray(got["logits"])
    assert logits.shape == ref.shape
    err = nmse(logits, ref)
    assert err <= 1e-3, f"{qtype}: normalised MSE {err:.2e} between llama.cpp and quantkit on the same file"
    assert (logits.argmax(-1) == ref.argmax(-1)).mean() >= 0.85


@pytest.mark.slow
# measured: bf16 1.5e-5, f16 3.4e-7 (f16 holds these weights exactly; llama.cpp rounds activations to bf16 for
# bf16 weights); q8_0 3.6e-4 against the BF16 source, top-1 96%
@pytest.mark.parametrize("qtype, limit", [("bf16", 1e-4), ("f16", 1e-5), ("q8_0", 1e-3)])
def test_llama_cpp_matches_the_source_checkpoint(tiny_bf16, tmp_path, qtype, limit):
    llama_python()
    convert_gguf(tiny_bf16, tmp_path / "out", qtype=qtype, progress=False)
    got = run_llama(next((tmp_path / "out").glob("*.gguf")))
    ids = prompt_ids(tiny_bf16)
    assert got["ids"] == ids
    ref = runtime_logits(tiny_bf16, ids)
    logits = np.asarray(got["logits"])
    err = nmse(logits, ref)
    assert err <= limit, f"{qtype}: normalised MSE {err:.2e} against quantkit's runtime on the source"
    assert logits[-1].argmax() == ref[-1].argmax() and (logits.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


LLAMA_QUANTIZE = r"""
import ctypes, sys
import llama_cpp

params = llama_cpp.llama_model_quantize_default_params()
params.ftype = int(sys.argv[3])
params.nthread = 2
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["q8_0", "q4_k_m", "q5_k_m", "q6_k"])
def test_byte_identical_to_llama_quantize(tiny_bf16, tmp_path, qtype):
    """llama-quantize (llama.cpp's own, through llama_model_quantize) run on quantkit's BF16 GGUF writes the very
    file quantkit writes from the checkpoint: same metadata, order, types, rules, padding and block bytes."""
    py = llama_python()
    convert_gguf(tiny_bf16, tmp_path / "bf16", qtype="bf16", progress=False)
    theirs = tmp_path / "llama-quantize.gguf"
    ftype = Recipe.load(f"gguf-{qtype}").options["file_type"]
    proc = subprocess.run([py, "-c", LLAMA_QUANTIZE, str(next((tmp_path / "bf16").glob("*.gguf"))), str(theirs),
                           str(ftype)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    convert_gguf(tiny_bf16, tmp_path / "ours", qtype=qtype, progress=False)
    ours = next((tmp_path / "ours").glob("*.gguf"))
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.slow
def test_llama_cpp_loads_splits(tiny_bf16, tmp_path):
    """llama.cpp finds the other splits from the first one's name and split keys, and computes what it computes on
    the unsplit file."""
    llama_python()
    convert_gguf(tiny_bf16, tmp_path / "one", qtype="q8_0", progress=False)
    convert_gguf(tiny_bf16, tmp_path / "split", qtype="q8_0", split_max_bytes=1_000_000, progress=False)
    splits = sorted((tmp_path / "split").glob("*.gguf"))
    assert len(splits) >= 3 and splits[0].name.endswith(f"-00001-of-{len(splits):05d}.gguf")
    whole = run_llama(next((tmp_path / "one").glob("*.gguf")))
    split = run_llama(splits[0])
    assert split["ids"] == whole["ids"]
    assert np.array_equal(np.asarray(split["logits"]), np.asarray(whole["logits"]))
