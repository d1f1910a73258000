"""INT4 groups: AutoAWQ's quantizer convention, the AutoAWQ GEMM packing (checked against a literal transcription of
its order table) and compressed-tensors pack-quantized (checked against compressed-tensors' own pack, unpack and
decompress)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # compressed-tensors imports triton: in the mode the kernel tests need (tests/test_kernels_fp8.py), whichever
    # test module is collected first
    os.environ.setdefault("TRITON_INTERPRET", "1")

from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32  # noqa: E402
from compressed_tensors.config import CompressionFormat  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.quant_scheme import W4A16, W4A16_ASYM  # noqa: E402

from quantkit.errors import QuantkitError  # noqa: E402
from quantkit.formats.awq import (  # noqa: E402
    dequantize_groups,
    pack_autoawq,
    pack_compressed_tensors,
    packed_tensors,
    quantization_config_autoawq,
    quantization_config_compressed_tensors,
    quantize_groups,
    unpack_autoawq,
    unpack_compressed_tensors,
)


def weight(out_f: int, in_f: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen) * 0.02
    w[:, :128] = w[:, :128].abs() + 0.05  # a group that is all positive: its zero point is clamped to 0
    w[3, 128:256] = 0.0  # an all-zero group
    w[5, 7] = 0.4  # an outlier
    return w.to(torch.bfloat16)


def codes(out_f: int, in_f: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out_f, in_f), generator=gen, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (out_f, in_f // 128), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(out_f, in_f // 128, generator=gen) * 1e-2 + 1e-4).half().float()
    return q, scales, zeros


def test_asymmetric_quantizer_follows_autoawq():
    w = weight(64, 512)
    q, s, z = quantize_groups(w)
    assert q.dtype == torch.uint8 and s.dtype == torch.float32 and z.dtype == torch.uint8
    assert q.shape == (64, 512) and s.shape == z.shape == (64, 4)
    assert int(q.max()) <= 15 and int(z.max()) <= 15
    # the scale is (max - min) / 15, held at fp16 precision
    g = w.float().view(64, 4, 128)
    expect = ((g.amax(2) - g.amin(2)).clamp(min=1e-5) / 15).half().float()
    assert torch.equal(s, expect)
    assert torch.equal(z, (-torch.round(g.amin(2) / s)).clamp(0, 15).to(torch.uint8))
    assert torch.equal(z[:, 0], torch.zeros(64, dtype=torch.uint8))  # all-positive group
    # round to nearest: each weight within half a step, except where the zero point's rounding clamps the range
    # (groups that straddle zero); an all-positive group cannot reach below code 0 = 0.0, as in AutoAWQ
    err = (dequantize_groups(q, s, z) - w.float()).abs().view(64, 4, 128)[:, 1:]
    step = s[:, 1:, None]
    assert bool((err <= step * 0.5 + 1e-7).float().mean() > 0.99)
    assert bool((err <= step * 1.0 + 1e-7).all())
    assert float(dequantize_groups(q, s, z)[3, 128:256].abs().max()) == 0.0


def test_symmetric_quantizer_codes_are_signed_plus_eight():
    w = weight(32, 256)
    q, s, z = quantize_groups(w, zero_point=False)
    assert bool((z == 8).all())
    g = w.float().view(32, 2, 128)
    assert torch.equal(s, (g.abs().amax(2).clamp(min=1e-5) / 7).half().float())
    signed = q.to(torch.int16) - 8
    assert int(signed.min()) >= -8 and int(signed.max()) <= 7
    err = (dequantize_groups(q, s, z) - w.float()).abs().view(32, 2, 128)
    assert bool((err <= s[..., None] * 0.5 + 1e-7).all())


def test_scales_rounded_to_the_stored_dtype():
    w = weight(16, 128)
    _, s16, _ = quantize_groups(w)
    _, sbf, _ = quantize_groups(w, scale_dtype=torch.bfloat16)
    assert torch.equal(s16, s16.half().float()) and torch.equal(sbf, sbf.bfloat16().float())
    assert not torch.equal(s16, sbf)


def test_autoawq_round_trip():
    q, s, z = codes(64, 256)
    qweight, qzeros, scales = pack_autoawq(q, s, z)
    assert qweight.dtype == qzeros.dtype == torch.int32 and scales.dtype == torch.float16
    assert qweight.shape == (256, 8) and qzeros.shape == (2, 8) and scales.shape == (2, 64)
    q2, s2, z2 = unpack_autoawq(qweight, qzeros, scales)
    assert torch.equal(q2, q) and torch.equal(z2, z) and torch.equal(s2, s)


def test_autoawq_packing_matches_the_order_table():
    """A literal transcription of specs/formats.md §2a: nibble i (bits 4i..4i+3) of int32 column c holds output
    channel 8c + AWQ_ORDER[i], AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]; rows are input channels."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    q, s, z = codes(16, 128, seed=5)
    qweight, qzeros, _ = pack_autoawq(q, s, z)
    for k in (0, 1, 77, 127):
        for c in range(2):
            word = 0
            for i in range(8):
                word |= int(q[8 * c + order[i], k]) << (4 * i)
            assert int(qweight[k, c]) & 0xFFFFFFFF == word
    word = 0
    for i in range(8):
        word |= int(z[8 + order[i], 0]) << (4 * i)
    assert int(qzeros[0, 1]) & 0xFFFFFFFF == word
    # unpacking: shift by 4i, then reindex with AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]
    reverse = [0, 4, 1, 5, 2, 6, 3, 7]
    nib = [(int(qweight[9, 1]) >> (4 * i)) & 15 for i in range(8)]
    assert [nib[reverse[j]] for j in range(8)] == [int(q[8 + j, 9]) for j in range(8)]


def test_compressed_tensors_packing_matches_its_own_pack():
    q, s, z = codes(24, 256, seed=2)  # 24 rows: 3 zero-point words per group
    packed, scale, zp, shape = pack_compressed_tensors(q, s, z, symmetric=False)
    signed = (q.to(torch.int16) - 8).to(torch.int8)  # compressed-tensors' quantizer emits signed int4 in int8
    assert torch.equal(packed, pack_to_int32(signed, 4))
    zs = (z.to(torch.int16) - 8).to(torch.int8)
    assert torch.equal(zp, pack_to_int32(zs, 4, packed_dim=0))
    assert zp.shape == (3, 2) and scale.dtype == torch.bfloat16 and shape.tolist() == [24, 256]
    assert torch.equal(unpack_from_int32(packed, 4, torch.Size([24, 256])), signed)
    q2, s2, z2 = unpack_compressed_tensors(packed, scale, zp, shape)
    assert torch.equal(q2, q) and torch.equal(z2, z) and torch.equal(s2, s.bfloat16().float())


def test_compressed_tensors_zero_point_padding():
    q, s, z = codes(20, 128, seed=3)  # 20 rows: the last zero-point word is half padding
    packed, scale, zp, shape = pack_compressed_tensors(q, s, z, symmetric=False)
    assert zp.shape == (3, 1)
    assert torch.equal(zp, pack_to_int32((z.to(torch.int16) - 8).to(torch.int8), 4, packed_dim=0))
    _, _, z2 = unpack_compressed_tensors(packed, scale, zp, shape)
    assert torch.equal(z2, z)


@pytest.mark.parametrize("symmetric", [True, False])
def test_compressed_tensors_decompress_equals_ours(symmetric):
    """compressed-tensors' own decompressor reads our tensors back to the weights we dequantize."""
    w = weight(32, 256, seed=4)
    q, s, z = quantize_groups(w, zero_point=not symmetric, scale_dtype=torch.bfloat16)
    packed, scale, zp, shape = pack_compressed_tensors(q, s, z, symmetric=symmetric)
    scheme = QuantizationScheme(targets=["Linear"], **(W4A16 if symmetric else W4A16_ASYM))
    state = {"weight_packed": packed, "weight_scale": scale, "weight_shape": shape}
    if zp is not None:
        state["weight_zero_point"] = zp
    out = PackedQuantizationCompressor.decompress(state, scheme)
    ours = dequantize_groups(q, s, z, dtype=torch.bfloat16)
    assert out["weight"].dtype == torch.bfloat16
    assert torch.equal(out["weight"], ours)


def test_dequantize_matches_definition():
    q, s, z = codes(8, 256, seed=6)
    deq = dequantize_groups(q, s, z)
    r, k = 5, 200
    assert float(deq[r, k]) == (int(q[r, k]) - int(z[r, k // 128])) * float(s[r, k // 128])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_refused_naming_the_tensor(bad):
    w = weight(16, 128)
    w[2, 3] = bad
    with pytest.raises(QuantkitError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight.*NaN or inf"):
        quantize_groups(w, name="model.layers.0.self_attn.q_proj.weight")


def test_bad_shapes_refused():
    with pytest.raises(QuantkitError, match="w2: input size 200 is not a multiple of the group size 128"):
        quantize_groups(torch.zeros(8, 200), name="w2")
    with pytest.raises(QuantkitError, match="2-D"):
        quantize_groups(torch.zeros(8), name="w")
    with pytest.raises(QuantkitError, match="only 4-bit"):
        quantize_groups(torch.zeros(8, 128), bits=8)
    q, s, z = codes(12, 128)
    with pytest.raises(QuantkitError, match="output size 12 is not a multiple of 8"):
        pack_autoawq(q, s, z)
    with pytest.raises(QuantkitError, match="zero point 8"):
        pack_compressed_tensors(q, s, z, symmetric=True)


def test_fp16_scale_overflow_refused():
    w = torch.zeros(8, 128)
    w[0, 0], w[0, 1] = -1e6, 1e6
    with pytest.raises(QuantkitError, match="big: a group's range overflows"):
        quantize_groups(w, name="big")


def test_quantization_configs():
    awq = quantization_config_autoawq(["lm_head", "model.layers.0.block_sparse_moe.gate"])
    assert awq == {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm",
                   "modules_to_not_convert": ["lm_head", "model.layers.0.block_sparse_moe.gate"]}
    ct = quantization_config_compressed_tensors(["lm_head"], symmetric=False)
    parsed = QuantizationConfig.model_validate(ct)  # compressed-tensors' own schema accepts it
    assert parsed.format == CompressionFormat.pack_quantized.value
    group = parsed.config_groups["group_0"]
    assert group.weights.num_bits == 4 and group.weights.group_size == 128 and group.weights.symmetric is False
    targets = " ".join(group.targets)
    assert "(w1|w2|w3)" in targets and "(gate_up|gate|up|down)_proj" in targets and "q|k|v|o" in targets
    no_attn = quantization_config_compressed_tensors([], attention=False)
    assert not any("self_attn" in t for t in no_attn["config_groups"]["group_0"]["targets"])


def test_packed_tensor_names():
    q, s, z = codes(16, 256)
    base = "model.layers.3.block_sparse_moe.experts.7.w2."
    awq = packed_tensors(base, q, s, z, "autoawq")
    assert {k: tuple(v.shape) for k, v in awq.items()} == {base + "qweight": (256, 2), base + "qzeros": (2, 2),
                                                          base + "scales": (2, 16)}
    ct = packed_tensors(base, q, s, z, "compressed-tensors")
    names = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
    assert sorted(ct) == sorted(base + n for n in names)
    sym = packed_tensors(base, q, s, torch.full_like(z, 8), "compressed-tensors", symmetric=True)
    assert base + "weight_zero_point" not in sym
    with pytest.raises(QuantkitError, match="INT4 layout 'gptq'"):
        packed_tensors(base, q, s, z, "gptq")


def test_make_checkpoint_awq_is_rtn_of_the_bf16_checkpoint(tmp_path):
    """make-checkpoint --dtype awq: every attention and expert projection is the AutoAWQ packing of the round-to-
    nearest INT4 of the bf16 checkpoint of the same seed; everything else is that checkpoint's own tensor."""
    import json

    from quantkit.checkpoint import CheckpointReader
    from quantkit.formats.awq import open_awq_reader
    from quantkit.synth import make_checkpoint

    make_checkpoint(tmp_path / "bf16", preset="tiny", seed=3)
    make_checkpoint(tmp_path / "awq", preset="tiny", seed=3, dtype="awq")
    from safetensors.torch import load_file

    bf16 = CheckpointReader(tmp_path / "bf16")
    awq = {k: v for f in sorted((tmp_path / "awq").glob("*.safetensors")) for k, v in load_file(f).items()}
    qc = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "awq" and qc["group_size"] == 128 and "lm_head" in qc["modules_to_not_convert"]
    assert "model.layers.1.block_sparse_moe.gate" in qc["modules_to_not_convert"]
    packed = 0
    for name in bf16.entries:
        w = bf16.tensor(name)
        base = name.removesuffix("weight")
        if base + "qweight" in awq:
            want = packed_tensors(base, *quantize_groups(w, name=name), "autoawq")
            for k, v in want.items():
                assert torch.equal(awq.pop(k), v), k
            assert name not in awq
            packed += 1
        else:
            assert torch.equal(awq.pop(name), w), name
    assert not awq  # nothing else
    assert packed == 2 * (4 + 3 * 16)  # two layers: q/k/v/o and w1/w2/w3 of 16 experts
    assert open_awq_reader(tmp_path / "awq") is not None
