"""imatrix files: our GGUF writer round-trips and lays the file out as llama.cpp's imatrix tool does; files written
by gguf-py in that layout and legacy .dat files read back to llama-quantize's importance values."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.formats.gguf_quants import quantize
from quantkit.formats.imatrix import ImatrixData

EXPERTS = "blk.0.ffn_gate_exps.weight"
DENSE = "blk.0.attn_q.weight"


def stats(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sums = torch.rand(4, 64, generator=g) * 100  # [n_expert, n]
    counts = torch.tensor([10.0, 0.0, 3.0, 250.0])  # expert 1 saw no token
    return {EXPERTS: (sums, counts), DENSE: (torch.rand(32, generator=g) * 5, 17)}


def test_round_trip_and_importance_values(tmp_path):
    st = stats()
    im = ImatrixData.from_stats(st, chunk_count=12, chunk_size=512, datasets=["calib.txt"])
    path = im.save(tmp_path / "imatrix.gguf")
    assert not list(tmp_path.glob("*.tmp"))
    back = ImatrixData.load(path)
    assert back.datasets == ["calib.txt"] and back.chunk_count == 12 and back.chunk_size == 512
    assert back.names() == [DENSE, EXPERTS]
    sums, counts = st[EXPERTS]
    got = back.get(EXPERTS)
    assert got.shape == (4, 64)
    assert torch.equal(got[0], sums[0] / 10.0) and torch.equal(got[3], sums[3] / 250.0)
    assert torch.equal(got[1], torch.ones(64))  # unseen expert: uniform
    dense = back.get(DENSE)
    assert dense.shape == (32,) and torch.equal(dense, st[DENSE][0] / 17.0)
    assert back.get("blk.0.attn_k.weight") is None
    assert back.for_weight(EXPERTS, (4, 16, 64)).shape == (4, 64)
    assert back.for_weight(DENSE, (48, 32)).shape == (32,)
    with pytest.raises(QuantkitError, match="want 512"):
        back.for_weight(EXPERTS, (8, 16, 64))


def test_file_layout_is_llama_cpp_s(tmp_path):
    path = ImatrixData.from_stats(stats(), chunk_count=3, chunk_size=256).save(tmp_path / "x.gguf")
    r = gguf.GGUFReader(path)
    keys = [k for k in r.fields if not k.startswith("GGUF.")]
    assert keys == ["general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"]
    assert r.fields["general.type"].contents() == "imatrix"
    assert r.fields["imatrix.chunk_count"].types == [gguf.GGUFValueType.UINT32]
    names = [t.name for t in r.tensors]
    assert names == [DENSE + ".in_sum2", DENSE + ".counts", EXPERTS + ".in_sum2", EXPERTS + ".counts"]
    shapes = {t.name: t.shape.tolist() for t in r.tensors}  # ne, fastest first
    assert shapes == {DENSE + ".in_sum2": [32], DENSE + ".counts": [1], EXPERTS + ".in_sum2": [64, 4],
                      EXPERTS + ".counts": [1, 4]}
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in r.tensors)
    assert r.data_offset % 32 == 0 and all(t.data_offset % 32 == 0 for t in r.tensors)
    assert np.array_equal(r.tensors[3].data.reshape(-1), [10.0, 0.0, 3.0, 250.0])


def test_reads_a_file_written_by_gguf_py_in_llama_cpp_layout(tmp_path):
    path = tmp_path / "imatrix.gguf"
    w = gguf.GGUFWriter(path, arch="unused")
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", ["wiki.train.raw"])
    w.add_uint32("imatrix.chunk_count", 100)
    w.add_uint32("imatrix.chunk_size", 512)
    g = np.random.default_rng(0)
    sums = (g.random((8, 96)) * 40).astype(np.float32)  # numpy (n_expert, ne0) = ne [ne0, n_expert]
    counts = np.array([[5], [0], [1], [7], [2], [9], [4], [3]], dtype=np.float32)  # ne [1, n_expert]
    w.add_tensor("blk.1.ffn_down_exps.weight.in_sum2", sums)
    w.add_tensor("blk.1.ffn_down_exps.weight.counts", counts)
    w.add_tensor("output.weight.in_sum2", sums[0].copy())
    w.add_tensor("output.weight.counts", np.array([6.0], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    im = ImatrixData.load(path)
    assert im.datasets == ["wiki.train.raw"] and im.chunk_count == 100
    got = im.get("blk.1.ffn_down_exps.weight").numpy()
    want = np.where(counts > 0, sums / np.maximum(counts, 1), 1.0).astype(np.float32)
    assert np.array_equal(got, want)
    assert np.array_equal(im.get("output.weight").numpy(), sums[0] / np.float32(6.0))
    # and it is what quantize takes for a stacked expert weight [n_expert, rows, n]
    x = torch.randn(8, 4, 256)
    qw = im.for_weight("blk.1.ffn_down_exps.weight", (8, 4, 96))
    assert qw.shape == (8, 96)
    with pytest.raises(QuantkitError, match="want 2048"):
        im.for_weight("blk.1.ffn_down_exps.weight", x.shape)


def write_legacy(path, entries, trailer=True):
    """save_imatrix_legacy's layout: values are mean * ncall."""
    b = struct.pack("<i", len(entries))
    for name, ncall, values in entries:
        b += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, len(values))
        b += np.asarray(values, dtype="<f4").tobytes()
    if trailer:
        b += struct.pack("<ii", 42, len("calib.txt")) + b"calib.txt"
    path.write_bytes(b)


def test_reads_legacy_dat(tmp_path):
    g = np.random.default_rng(1)
    mean = (g.random(3 * 64) * 3).astype(np.float32)
    path = tmp_path / "imatrix.dat"
    write_legacy(path, [(EXPERTS, 5, mean * np.float32(5)), (DENSE, 2, np.full(32, 2.0, np.float32))])
    im = ImatrixData.load(path)
    assert im.chunk_count == 42 and im.datasets == ["calib.txt"]
    got = im.get(EXPERTS, n=64)
    assert got.shape == (3, 64)
    assert np.allclose(got.numpy().reshape(-1), mean, rtol=1e-6)
    assert im.for_weight(EXPERTS, (3, 10, 64)).shape == (3, 64)
    assert torch.equal(im.get(DENSE), torch.ones(32))
    with pytest.raises(QuantkitError, match="legacy"):
        im.save(tmp_path / "x.gguf")
    write_legacy(path, [(DENSE, 1, np.ones(32))], trailer=False)
    assert ImatrixData.load(path).get(DENSE).shape == (32,)


def test_add_accumulates_like_a_merge():
    st = stats()
    im = ImatrixData.from_stats(st, chunk_count=1, chunk_size=8)
    im.add(EXPERTS, *st[EXPERTS])
    assert torch.equal(im.entries[EXPERTS].counts, st[EXPERTS][1] * 2)
    assert torch.equal(im.get(EXPERTS)[0], (st[EXPERTS][0][0] * 2) / 20.0)
    with pytest.raises(QuantkitError, match="do not pair up"):
        im.add("x", torch.ones(4, 8), torch.ones(3))
    with pytest.raises(QuantkitError, match="non-finite"):
        im.add("y", torch.full((8,), float("nan")), 1)


def test_bad_files_get_one_clear_error(tmp_path):
    good = ImatrixData.from_stats(stats(), chunk_count=3, chunk_size=256).save(tmp_path / "good.gguf")
    data = good.read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(QuantkitError, match="trunc.gguf"):
        ImatrixData.load(tmp_path / "trunc.gguf")
    w = gguf.GGUFWriter(tmp_path / "model.gguf", arch="llama")  # a GGUF, but not an imatrix
    w.add_tensor("x", np.ones(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(QuantkitError, match="not an imatrix file"):
        ImatrixData.load(tmp_path / "model.gguf")
    (tmp_path / "junk.dat").write_bytes(b"\xff\xff\xff\xffhello")
    with pytest.raises(QuantkitError, match="junk.dat"):
        ImatrixData.load(tmp_path / "junk.dat")
    write_legacy(tmp_path / "short.dat", [(DENSE, 1, np.ones(32))], trailer=False)
    (tmp_path / "short.dat").write_bytes((tmp_path / "short.dat").read_bytes()[:-8])
    with pytest.raises(QuantkitError, match="truncated"):
        ImatrixData.load(tmp_path / "short.dat")
    with pytest.raises(QuantkitError, match="cannot read"):
        ImatrixData.load(tmp_path / "missing.gguf")


def test_quantize_with_loaded_imatrix_uses_each_expert_slice(tmp_path):
    st = {"blk.0.ffn_up_exps.weight": (torch.rand(2, 256) * 9, torch.tensor([4.0, 0.0]))}
    im = ImatrixData.load(ImatrixData.from_stats(st, chunk_count=1, chunk_size=8).save(tmp_path / "i.gguf"))
    x = torch.randn(2, 3, 256)
    qw = im.for_weight("blk.0.ffn_up_exps.weight", x.shape)
    q = quantize(x, "q4_k", qw)
    assert torch.equal(q[0], quantize(x[0], "q4_k", st["blk.0.ffn_up_exps.weight"][0][0] / 4.0))
    assert torch.equal(q[1], quantize(x[1], "q4_k", torch.ones(256)))
