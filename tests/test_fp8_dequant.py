"""Block-FP8 dequantization on read: the fast path equals the definition bit for bit, on every fp8 value."""

from __future__ import annotations

import pytest
import torch

from quantkit.checkpoint.fp8 import dequantize_block_fp8, dequantize_block_fp8_reference
from quantkit.errors import QuantkitError


def random_fp8(shape, gen) -> torch.Tensor:
    """Every byte value except the two NaNs, uniformly: subnormals, zeros of both signs, +-448 all appear."""
    b = torch.randint(0, 256, shape, generator=gen, dtype=torch.int32)
    b = torch.where((b & 0x7F) == 0x7F, b - 1, b)
    return b.to(torch.uint8).view(torch.float8_e4m3fn)


@pytest.mark.parametrize("shape", [(256, 384), (128, 128), (1024, 256)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_fast_path_is_bit_exact(shape, dtype):
    gen = torch.Generator().manual_seed(shape[0] * 7 + shape[1] + dtype.itemsize)
    w = random_fp8(shape, gen)
    s = torch.exp(torch.randn(shape[0] // 128, shape[1] // 128, generator=gen) * 3) * 1e-3
    fast = dequantize_block_fp8(w, s, dtype=dtype)
    ref = dequantize_block_fp8_reference(w, s, dtype=dtype)
    assert fast.dtype == dtype
    assert torch.equal(fast.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       ref.view(torch.int16 if dtype != torch.float32 else torch.int32))
    # and the definition itself: each element times its tile's scale
    r = shape[0] - 1
    assert float(fast[r, 5].float()) == float((w[r, 5].float() * s[r // 128, 0]).to(dtype))


def test_every_fp8_value_decodes_exactly():
    w = torch.arange(256, dtype=torch.int32)
    w = w[(w & 0x7F) != 0x7F].to(torch.uint8)
    w = w.repeat(128 * 128 // w.numel() + 1)[: 128 * 128].view(128, 128).view(torch.float8_e4m3fn)
    out = dequantize_block_fp8(w, torch.ones(1, 1), dtype=torch.float32)
    assert torch.equal(out, w.float())


def test_scales_too_large_for_the_bit_trick_decode_exactly():
    """A scale above 2^8 times the 2^120 of the bit assembly overflows fp32: such weights take the definition."""
    gen = torch.Generator().manual_seed(5)
    w = random_fp8((256, 256), gen)
    s = torch.tensor([[1e3, 1.0], [2.0**100, 1e-3]])
    out = dequantize_block_fp8(w, s, dtype=torch.float32)
    assert torch.isfinite(out).all()
    assert torch.equal(out, dequantize_block_fp8_reference(w, s, dtype=torch.float32))


def test_ragged_shapes_use_partial_tiles():
    gen = torch.Generator().manual_seed(3)
    w = random_fp8((200, 300), gen)
    s = torch.rand(2, 3, generator=gen) + 0.5
    out = dequantize_block_fp8(w, s, dtype=torch.float32)
    assert out[199, 299] == w[199, 299].float() * s[1, 2]
    assert out[0, 0] == w[0, 0].float() * s[0, 0]


def test_nan_and_bad_scales_are_refused_with_the_tensor_name():
    w = torch.zeros(128, 256, dtype=torch.uint8)
    w[5, 7] = 0x7F
    with pytest.raises(QuantkitError, match="layers.3.w1.*NaN"):
        dequantize_block_fp8(w.view(torch.float8_e4m3fn), torch.ones(1, 2), name="layers.3.w1")
    w[5, 7] = 0
    with pytest.raises(QuantkitError, match="weight_scale_inv has shape"):
        dequantize_block_fp8(w.view(torch.float8_e4m3fn), torch.ones(2, 2), name="x")
    with pytest.raises(QuantkitError, match="NaN or inf"):
        dequantize_block_fp8(w.view(torch.float8_e4m3fn), torch.tensor([[1.0, float("inf")]]), name="x")
