"""W4A16 GEMM and fused-MoE Triton kernels (kernels/w4a16_gemm.py, kernels/w4a16_moe.py) against their references.

Devices as in tests/test_kernels_fp8.py: `cpu` runs the kernels in Triton's interpreter (TRITON_INTERPRET=1 set by
tests/kernel_devices.py where no CUDA device is present, before triton's first import), `cuda` the compiled kernels
(marked gpu).

Three comparisons:
  the reference's dequantization vs quantkit.formats.awq (an independent unpacking of the same AutoAWQ tensors):
      bit for bit;
  kernel vs *_ref: the same dequantized weights and roundings, so they differ by fp32 summation order only (the
      kernel sums each K block's q - z products, then scales them): about one unit in the last place (TOL);
  *_ref vs a plain fp32 loop over experts on the dequantized weights: the reference itself.
Shapes are small with large blocks on the CPU and cover the masked edges: M not a multiple of BLOCK_M, N not a
multiple of BLOCK_N, unrouted slots (id -1), experts that receive no token; the GPU cases run MiniMax-M2's shapes.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from kernel_devices import CUDA, DEVICES, IGNORE_EXP_OVERFLOW, INTERPRETED, gpu_only  # sets TRITON_INTERPRET first
from quantkit.kernels import fp8_gemm
from quantkit.kernels import w4a16_gemm as w4a16_gemm_mod
from quantkit.kernels import w4a16_moe as w4a16_moe_mod
from quantkit.kernels.w4a16_gemm import (
    awq_dequantize_ref,
    awq_to_kmajor,
    kmajor_dequantize_ref,
    pack_kmajor,
    w4a16_gemm,
    w4a16_gemm_ref,
    w4a16_linear,
    w4a16_linear_ref,
)
from quantkit.kernels.w4a16_moe import (
    fused_moe_w4a16,
    fused_moe_w4a16_ref,
    w4a16_kmajor_linear,
    w4a16_kmajor_linear_ref,
)

from quantkit.formats.awq import dequantize_groups, pack_autoawq, quantize_groups

pytestmark = IGNORE_EXP_OVERFLOW

# kernel vs *_ref: output dtype -> (rtol, atol as a fraction of max |ref|); one bf16 ulp is 2^-8 relative
TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2**-7, 2**-9), torch.float16: (2**-10, 2**-12)}
GPU_ACC = 2e-3  # tensor cores sum bf16 products in an order (and precision) of their own inside each tl.dot


def gen_for(*case) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    rtol, atol_frac = TOL[dtype]
    assert out.shape == ref.shape and out.dtype == ref.dtype == dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    if out.is_cuda:
        atol_frac = max(atol_frac, GPU_ACC)
    atol = atol_frac * max(ref.float().abs().max().item(), 1e-30)
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol)


def awq_weight(n: int, k: int, group: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A [N, K] weight quantized and packed as AutoAWQ stores it: qweight [K, N/8], qzeros, scales [K/G, N]."""
    w = torch.randn(n, k, generator=gen) * 0.05 + torch.randn(n, 1, generator=gen) * 0.02  # groups off zero
    return pack_autoawq(*quantize_groups(w, group=group))


def stacked(e: int, n: int, k: int, group: int, gen: torch.Generator) -> list[torch.Tensor]:
    """e experts' [N, K] weights in the K-major layout the fused MoE reads, repacked from AutoAWQ as at load."""
    parts = [awq_weight(n, k, group, gen) for _ in range(e)]
    return list(awq_to_kmajor(*(torch.stack([p[j] for p in parts]) for j in range(3))))


def test_cpu_machines_interpret():
    if CUDA:
        pytest.skip("a CUDA device is present: kernels compile")
    assert INTERPRETED, "no CUDA device, yet triton was imported without TRITON_INTERPRET=1"


def test_reference_dequantization_matches_the_format_module():
    gen = gen_for("deq")
    w = torch.randn(48, 256, generator=gen)
    q, s, z = quantize_groups(w, group=64)
    ref = awq_dequantize_ref(*pack_autoawq(q, s, z))  # [K, N]
    assert ref.shape == (256, 48)
    assert torch.equal(ref, dequantize_groups(q, s, z).t())


def test_kmajor_repack_is_exact_and_sequential():
    gen = gen_for("kmajor")
    w = torch.randn(2, 24, 256, generator=gen)  # two experts' [N, K] weights
    trip = [quantize_groups(w[e], group=64) for e in range(2)]
    awq = [torch.stack([pack_autoawq(*t)[j] for t in trip]) for j in range(3)]
    qweight, zeros, scales = awq_to_kmajor(*awq)
    assert qweight.shape == (2, 24, 32) and qweight.dtype == torch.int32
    assert zeros.shape == scales.shape == (2, 24, 4) and zeros.dtype == torch.uint8 and scales.dtype == torch.float16
    # within a group of 64 codes (8 words), nibble j of word c holds code 8j + c: word 11 is word 3 of group 1
    q = torch.stack([t[0] for t in trip]).to(torch.int32)  # [2, N, K]
    assert torch.equal((qweight[1, 5, 11] >> 4 * 6) & 0xF, q[1, 5, 64 + 6 * 8 + 3])
    assert torch.equal(zeros, torch.stack([t[2] for t in trip]).to(torch.uint8))
    deq = kmajor_dequantize_ref(qweight, zeros, scales)  # [2, N, K]
    assert torch.equal(deq, awq_dequantize_ref(*awq).transpose(-1, -2))
    assert torch.equal(deq[0], dequantize_groups(*quantize_groups(w[0], group=64)))
    # packing the codes directly gives the same words as repacking the AutoAWQ tensors
    direct = pack_kmajor(q, scales, zeros)
    assert all(torch.equal(a, b) for a, b in zip(direct, (qweight, zeros, scales)))


# --------------------------------------------------------------------------------------------------------------------
# GEMM


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,n,k,group,dtype,config", [
    (5, 192, 256, 128, torch.bfloat16, None),  # N = 1.5 column blocks, M = 5 of a 64-row block
    (70, 64, 256, 64, torch.float32, None),  # two row blocks, the second almost empty
    (3, 128, 512, 128, torch.bfloat16, {"SPLIT_K": 2}),  # K split over two programs
    (4, 200, 1024, 128, torch.float32, {"SPLIT_K": 8, "BLOCK_N": 32, "BLOCK_M": 16}),  # eight, partial column tile
    (17, 136, 128, 32, torch.float16, {"BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_M": 16}),  # several K blocks per 128
])
def test_w4a16_gemm_matches_reference(device, m, n, k, group, dtype, config):
    gen = gen_for("gemm", m, n, k, group, dtype)
    qweight, qzeros, scales = (t.to(device) for t in awq_weight(n, k, group, gen))
    x = (torch.randn(m, k, generator=gen) * torch.exp(torch.randn(m, 1, generator=gen))).to(dtype).to(device)
    if m > 3:
        x[1] = 0.0
    out = w4a16_gemm(x, qweight, qzeros, scales, config=config)
    ref = w4a16_gemm_ref(x, qweight, qzeros, scales)
    assert_close(out, ref, dtype)
    if m > 3:
        assert float(out[1].abs().max()) == 0.0
    if config and config.get("SPLIT_K", 1) > 1:  # the partial sums added in a fixed order; counters left at zero
        assert torch.equal(w4a16_gemm(x, qweight, qzeros, scales, config=config), out)
        assert not any(c.any() for c in fp8_gemm._COUNTERS.values())


@pytest.mark.parametrize("device", DEVICES)
def test_w4a16_linear_leading_dims(device):
    gen = gen_for("linear")
    qweight, qzeros, scales = (t.to(device) for t in awq_weight(64, 128, 128, gen))
    x = torch.randn(2, 3, 128, generator=gen).to(torch.bfloat16).to(device)
    out = w4a16_linear(x, qweight, qzeros, scales)
    assert out.shape == (2, 3, 64)
    assert_close(out, w4a16_linear_ref(x, qweight, qzeros, scales), torch.bfloat16)


def test_tuned_table_lookup_keeps_split_k():
    table = {"dev": {"N=64,K=256,G=128": {"1": {"SPLIT_K": 2, "BLOCK_N": 32, "junk": 1}, "64": {"BLOCK_M": 64}}}}
    default = {"BLOCK_M": 16, "BLOCK_N": 64, "SPLIT_K": 1}
    assert w4a16_gemm_mod.select_config(table, "dev", "N=64,K=256,G=128", 3, default) == \
        {"BLOCK_M": 16, "BLOCK_N": 32, "SPLIT_K": 2}
    assert w4a16_gemm_mod.select_config(table, "dev", "N=64,K=256,G=128", 40, default)["BLOCK_M"] == 64
    assert w4a16_gemm_mod.select_config(table, "other", "N=64,K=256,G=128", 3, default) == default


@pytest.mark.parametrize("name", ["w4a16_moe.json", "w4a16_linear.json"])
def test_shipped_kmajor_tables_are_valid(name):
    """configs/w4a16_moe.json and w4a16_linear.json: every entry names the launcher's keys only and passes its
    validation (paths, tile sizes, GSTEP, STAGES, ONE_LAUNCH), and a linear's split divides its groups."""
    moe = name == "w4a16_moe.json"
    keys = w4a16_moe_mod.MOE_CONFIG_KEYS if moe else w4a16_moe_mod.LINEAR_CONFIG_KEYS
    paths = w4a16_moe_mod.MOE_PATHS if moe else w4a16_moe_mod.LINEAR_PATHS
    table = fp8_gemm.load_config_table(name)
    assert table
    for device, shapes in table.items():
        for shape, buckets in shapes.items():
            dims = dict(part.split("=") for part in shape.split(","))
            g = int(dims["G"])
            for bucket, cfg in buckets.items():
                assert int(bucket) > 0 and set(cfg) <= set(keys), (device, shape, bucket, cfg)
                checked = w4a16_moe_mod._overridden(dict(cfg), None, g, keys, paths)
                if not moe:
                    assert int(dims["K"]) // g % checked.get("SPLIT_K", 1) == 0, (device, shape, bucket)


def test_gemm_refuses_bad_operands():
    gen = gen_for("bad")
    qweight, qzeros, scales = awq_weight(64, 256, 128, gen)
    x = torch.randn(4, 256).bfloat16()
    with pytest.raises(ValueError, match="does not fit qweight"):
        w4a16_gemm(torch.randn(4, 128).bfloat16(), qweight, qzeros, scales)
    with pytest.raises(ValueError, match="qweight and qzeros must be int32"):
        w4a16_gemm(x, qweight.float(), qzeros, scales)
    with pytest.raises(ValueError, match="qzeros must be"):
        w4a16_gemm(x, qweight, qzeros[:1], scales)
    with pytest.raises(ValueError, match="scales must be float"):
        w4a16_gemm(x, qweight, qzeros, scales[:, :8])
    with pytest.raises(ValueError, match="does not fit"):
        w4a16_gemm(x, qweight, qzeros, scales, config={"BLOCK_K": 256})


# --------------------------------------------------------------------------------------------------------------------
# fused MoE


def moe_loop_fp32(x, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """The MoE on dequantized weights in plain fp32, no intermediate rounding."""
    i = w13[0].shape[-2] // 2
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for s in range(topk_ids.shape[1]):
            e = int(topk_ids[t, s])
            if not 0 <= e < w13[0].shape[0]:
                continue
            gu = x[t].float().cpu() @ kmajor_dequantize_ref(*(w[e].cpu() for w in w13)).t()
            h = torch.nn.functional.silu(gu[:i]) * gu[i:]
            out[t] += float(topk_weights[t, s]) * (h @ kmajor_dequantize_ref(*(w[e].cpu() for w in w2)).t())
    return out


def routing(m: int, e: int, topk: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.stack([torch.randperm(e - 1, generator=gen)[:topk] for _ in range(m)])  # expert e-1: no token
    w = torch.rand(m, topk, generator=gen) + 0.1
    w = w / w.sum(-1, keepdim=True)
    ids[0, -1] = -1  # a slot routed nowhere
    return w, ids


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,dtype", [(5, torch.bfloat16), (37, torch.float32)])
def test_fused_moe_matches_reference(device, m, dtype):
    """The launcher's own choice: the GEMV path at 2 pairs per expert (m = 5), the tl.dot path at 15 (m = 37)."""
    e, h, i, topk, group = 5, 256, 384, 2, 128  # I = 3 column blocks of 128, H = 2
    gen = gen_for("moe", m, dtype)
    w13 = [t.to(device) for t in stacked(e, 2 * i, h, group, gen)]
    w2 = [t.to(device) for t in stacked(e, h, i, group, gen)]
    x = torch.randn(m, h, generator=gen).to(dtype).to(device)
    tw, ids = (t.to(device) for t in routing(m, e, topk, gen))
    out = fused_moe_w4a16(x, *w13, *w2, tw, ids)
    ref = fused_moe_w4a16_ref(x, *w13, *w2, tw, ids)
    assert_close(out, ref, dtype)
    if dtype == torch.float32:  # the reference is the MoE: fp32 loop on the dequantized weights
        torch.testing.assert_close(ref.cpu(), moe_loop_fp32(x, w13, w2, tw, ids), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,dtype,h,i,group,config", [
    # one pair per program; I = 96 leaves the second 64-row tile of GEMM 1 half full
    (3, torch.float32, 192, 96, 32, {"PATH": "gemv", "BLOCK_M": 1, "BLOCK_N": 64}),
    # two groups of words loaded ahead (past the last group: masked off); two pairs per program
    (4, torch.bfloat16, 192, 96, 32, {"PATH": "gemv", "BLOCK_M": 2, "BLOCK_N": 64, "PREFETCH": 2}),
    # four pairs per program (experts with fewer leave rows of their block padded); H = 192 = 1.5 tiles of 128
    (6, torch.bfloat16, 192, 96, 32, {"PATH": "gemv", "BLOCK_M": 4, "BLOCK_N": 128}),
    # the tensor-core path on the same layout (group 128: K steps of 16); 384 = 1.5 tiles of 256 in both GEMMs
    (6, torch.float16, 384, 384, 128, {"PATH": "dot", "BLOCK_M": 16, "BLOCK_N": 256}),
    # one dot of K = 128 a group (the eight nibble places side by side); fp32 activations; I = 256: 2 tiles of 128
    (9, torch.bfloat16, 384, 384, 128, {"PATH": "dot", "BLOCK_M": 32, "BLOCK_N": 64, "WIDE": 1}),
    (5, torch.float32, 384, 256, 128, {"PATH": "dot", "BLOCK_M": 16, "BLOCK_N": 128, "WIDE": 1}),
    # and with places j, j + 4 as 2^m + q from one LOP3 (2^m + z off after the dot): bf16, fp16 operand bits
    (9, torch.bfloat16, 384, 384, 128, {"PATH": "dot", "BLOCK_M": 32, "BLOCK_N": 64, "WIDE": 2}),
    (7, torch.float16, 384, 256, 128, {"PATH": "dot", "BLOCK_M": 16, "BLOCK_N": 128, "WIDE": 2}),
    # weights as the A operand: bf16 and fp16 operand bits; 384 = 1.5 tiles of 256, and 3 tiles of 128 rows
    (5, torch.bfloat16, 384, 384, 128, {"PATH": "mma", "BLOCK_M": 16, "BLOCK_N": 256}),
    (7, torch.float16, 384, 256, 128, {"PATH": "mma", "BLOCK_M": 16, "BLOCK_N": 128}),
])
def test_fused_moe_paths_and_masked_edges(device, m, dtype, h, i, group, config):
    e, topk = 4, 2
    gen = gen_for("moe-paths", m, dtype)
    w13 = [t.to(device) for t in stacked(e, 2 * i, h, group, gen)]
    w2 = [t.to(device) for t in stacked(e, h, i, group, gen)]
    x = (torch.randn(m, h, generator=gen) * torch.exp(torch.randn(m, 1, generator=gen))).to(dtype).to(device)
    tw, ids = (t.to(device) for t in routing(m, e, topk, gen))
    out = fused_moe_w4a16(x, *w13, *w2, tw, ids, config=config)
    assert_close(out, fused_moe_w4a16_ref(x, *w13, *w2, tw, ids), dtype)


def decode_case(device: str, gen: torch.Generator, e: int = 6, h: int = 192, i: int = 96, topk: int = 4,
                group: int = 32, m: int = 3):
    """A small decode-sized MoE: stacked K-major experts on the device, fp32 x [m, h] there, and the routing
    (weights, ids) on the CPU for the test to edit."""
    w13 = [t.to(device) for t in stacked(e, 2 * i, h, group, gen)]
    w2 = [t.to(device) for t in stacked(e, h, i, group, gen)]
    x = torch.randn(m, h, generator=gen).float().to(device)
    tw, ids = routing(m, e, topk, gen)
    return w13, w2, x, tw, ids


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_pipelined_loop_same_bits(device, dtype):
    """STAGES > 1 has Triton software-pipeline the GEMV's K loop (PREFETCH 0: each group's words loaded in the
    iteration that uses them, issued early through shared memory; or on top of the register prefetch): the same
    products in the same order, so the same bits as the register prefetch alone, on unsorted pairs with K split in
    both GEMMs and on the sorted list (two pairs a program)."""
    w13, w2, x, tw, ids = decode_case(device, gen_for("moe-stages", str(dtype)))
    x, tw, ids = x.to(dtype), tw.to(device), ids.to(device)
    for base in ({"PATH": "gemv", "BLOCK_M": 1, "BLOCK_N": 64, "SPLIT_K": 2, "SPLIT_K2": 3},
                 {"PATH": "gemv", "BLOCK_M": 2, "BLOCK_N": 32}):
        ref = fused_moe_w4a16(x, *w13, *w2, tw, ids, config={**base, "PREFETCH": 2})
        for prefetch, stages in ((0, 3), (1, 2)):
            out = fused_moe_w4a16(x, *w13, *w2, tw, ids, config={**base, "PREFETCH": prefetch, "STAGES": stages})
            assert torch.equal(out, ref), (base, prefetch, stages)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("base", [
    # unsorted pairs, K split: GEMM 1's 8 groups 4 a program (GSTEP 4 -> 4), GEMM 2's 4 groups 2 a program (-> 2)
    {"PATH": "gemv", "BLOCK_M": 1, "BLOCK_N": 32, "SPLIT_K": 2, "SPLIT_K2": 2},
    # the sorted list, one pair a program (padding rows read as zeros), pipelined
    {"PATH": "gemv", "BLOCK_M": 1, "BLOCK_N": 16, "STAGES": 3},
])
def test_gemv_groups_a_step(device, base, monkeypatch):
    """GSTEP groups a K step (each row's GSTEP groups of words in one load): the one-group loop's products summed
    in another order, so its result to fp32 rounding; a GSTEP that does not divide a program's groups falls to
    the largest power of two that does."""
    w13, w2, x, tw, ids = decode_case(device, gen_for("moe-gstep", str(base)), h=256, i=128)
    if "STAGES" in base:
        monkeypatch.setattr(w4a16_moe_mod, "PAIRS_MAX", 0)
    x, tw, ids = x.bfloat16(), tw.to(device), ids.to(device)
    ref = fused_moe_w4a16(x, *w13, *w2, tw, ids, config={**base, "PREFETCH": 0})
    for gstep in (2, 4, 8):
        out = fused_moe_w4a16(x, *w13, *w2, tw, ids, config={**base, "PREFETCH": 0, "GSTEP": gstep})
        torch.testing.assert_close(out, ref, rtol=2**-7, atol=2**-8 * float(ref.abs().max()))
    with pytest.raises(ValueError, match="GSTEP"):
        fused_moe_w4a16(x, *w13, *w2, tw, ids, config={**base, "PREFETCH": 2, "GSTEP": 2})
    # the dense linear on the same loop
    w = [t[0] for t in w13]
    lin_ref = w4a16_kmajor_linear(x[:1], *w, config={"PATH": "gemv", "BLOCK_M": 1, "BLOCK_N": 32, "PREFETCH": 0})
    lin = w4a16_kmajor_linear(x[:1], *w, config={"PATH": "gemv", "BLOCK_M": 1, "BLOCK_N": 32, "PREFETCH": 0,
                                                 "GSTEP": 4})
    torch.testing.assert_close(lin, lin_ref, rtol=2**-7, atol=2**-8 * float(lin_ref.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("base", [
    # K split in both GEMMs (GEMM 2's slots and shares added by its tiles' last programs), two groups a step,
    # pipelined; the GPU case at MiniMax-M2's width
    {"PATH": "gemv", "BLOCK_M": 1, "BLOCK_N": 32, "SPLIT_K": 2, "SPLIT_K2": 3, "GSTEP": 2, "STAGES": 2},
    {"PATH": "gemv", "BLOCK_M": 1, "BLOCK_N": 16},
])
def test_one_launch_same_bits(device, base):
    """ONE_LAUNCH: the decode layer's two GEMMs in one launch, GEMM 2's programs waiting on their pair's counter:
    the same products, the same epilogues, so the same bits as the two launches, with slots routed nowhere (-1 and
    E) adding nothing; every counter is back at zero afterwards (a second call gives the same bits), with and
    without the back-off; fp32 activations keep two launches; configs it cannot take are refused."""
    gpu = device == "cuda"
    case = dict(e=16, h=3072, i=1536, topk=8, group=128, m=4) if gpu else {}
    w13, w2, x, tw, ids = decode_case(device, gen_for("moe-one-launch", str(base)), **case)
    ids[1, 2] = -1
    ids[2, 0] = w13[0].shape[0]
    x, tw, ids = x.bfloat16(), tw.to(device), ids.to(device)
    base = {**base, "PREFETCH": 0}
    ref = fused_moe_w4a16(x, *w13, *w2, tw, ids, config=base)
    for one in (1, 2, 3, 4):
        for _ in range(2 if gpu else 1):
            out = fused_moe_w4a16(x, *w13, *w2, tw, ids, config={**base, "ONE_LAUNCH": one})
            if one < 3:
                assert torch.equal(out, ref), (base, one)
            else:  # GEMM 2's groups summed in one reduction: another fp32 order, then the 16-bit rounding
                torch.testing.assert_close(out, ref, rtol=2**-7, atol=2**-8 * float(ref.abs().max()))
                assert (out != ref).float().mean() < 0.05, (base, one)
            assert not fp8_gemm.arrival_counters(x.device, 1).any()
    if gpu:  # one token, as a decode step at concurrency 1 runs it
        ref1 = fused_moe_w4a16(x[:1], *w13, *w2, tw[:1], ids[:1], config=base)
        assert torch.equal(fused_moe_w4a16(x[:1], *w13, *w2, tw[:1], ids[:1], config={**base, "ONE_LAUNCH": 1}), ref1)
        torch.testing.assert_close(fused_moe_w4a16(x[:1], *w13, *w2, tw[:1], ids[:1], config={**base, "ONE_LAUNCH": 3}),
                                   ref1, rtol=2**-7, atol=2**-8 * float(ref1.abs().max()))
    if "SPLIT_K" not in base:
        xf = x.float()
        assert torch.equal(fused_moe_w4a16(xf, *w13, *w2, tw, ids, config={**base, "ONE_LAUNCH": 1}),
                           fused_moe_w4a16(xf, *w13, *w2, tw, ids, config=base))
    for bad in ({"PREFETCH": 2}, {"PATH": "mma", "BLOCK_M": 16, "PAIRS": True}, {"ONE_LAUNCH": 5}):
        with pytest.raises(ValueError, match="ONE_LAUNCH"):
            fused_moe_w4a16(x, *w13, *w2, tw, ids, config={**base, "ONE_LAUNCH": 1, **bad})


@pytest.mark.parametrize("device", DEVICES)
def test_mma_groups_a_step_same_bits(device, monkeypatch):
    """GSTEP on the mma path: each group's dots and correction as before, in the same order, GSTEP of them an
    iteration: the same bits, on unsorted pairs (K split), for the linear and on the sorted list; a GSTEP that does
    not divide a program's groups falls back."""
    w13, w2, x, tw, ids = decode_case(device, gen_for("moe-mma-gstep"), h=512, i=256, group=128)
    x, tw, ids = x.bfloat16(), tw.to(device), ids.to(device)
    for base in ({"PATH": "mma", "BLOCK_M": 16, "BLOCK_N": 32, "PAIRS": True, "SPLIT_K": 2},
                 {"PATH": "mma", "BLOCK_M": 16, "BLOCK_N": 64, "PREFETCH": 2}):
        ref = fused_moe_w4a16(x, *w13, *w2, tw, ids, config=base)
        for gstep in (2, 4):
            out = fused_moe_w4a16(x, *w13, *w2, tw, ids, config={**base, "GSTEP": gstep})
            assert torch.equal(out, ref), (base, gstep)
    w = [t[0] for t in w13]  # the linear on the same kernel, K split
    lin = {"PATH": "mma", "BLOCK_M": 16, "BLOCK_N": 32, "SPLIT_K": 2}
    assert torch.equal(w4a16_kmajor_linear(x, *w, config={**lin, "GSTEP": 2}), w4a16_kmajor_linear(x, *w, config=lin))
    monkeypatch.setattr(w4a16_moe_mod, "PAIRS_MAX", 0)
    cfg = {"PATH": "mma", "BLOCK_M": 16, "BLOCK_N": 32}
    assert torch.equal(fused_moe_w4a16(x, *w13, *w2, tw, ids, config={**cfg, "GSTEP": 2}),
                       fused_moe_w4a16(x, *w13, *w2, tw, ids, config=cfg))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
def test_fused_moe_unsorted_pairs_match_the_sorted_list(device, ids_dtype, monkeypatch):
    """Decode's two launches (GEMV on unsorted pairs, GEMM 2 adding the slots itself) against the sorted-list path
    with its separate slot sum, and the reference: ids outside [0, E) (-1 and E) add nothing."""
    e = 6
    w13, w2, x, tw, ids = decode_case(device, gen_for("moe-pairs", str(ids_dtype)), e)
    ids[2, 1] = e  # out of range above as well
    tw, ids = tw.to(device), ids.to(ids_dtype).to(device)
    cfg = {"PATH": "gemv", "BLOCK_M": 1, "BLOCK_N": 32, "PREFETCH": 2}
    out = fused_moe_w4a16(x, *w13, *w2, tw, ids, config=cfg)
    torch.testing.assert_close(out.cpu(), moe_loop_fp32(x, w13, w2, tw, ids), rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(w4a16_moe_mod, "PAIRS_MAX", 0)  # the sorted list, the same config
    sorted_out = fused_moe_w4a16(x, *w13, *w2, tw, ids, config=cfg)
    torch.testing.assert_close(out, sorted_out, rtol=1e-5, atol=1e-6 * float(sorted_out.abs().max()))
    xb = x.bfloat16()
    assert_close(fused_moe_w4a16(xb, *w13, *w2, tw, ids, config=cfg), fused_moe_w4a16_ref(xb, *w13, *w2, tw, ids),
                 torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", [
    # GEMM 1 [N = 256] on 32-row tiles, GEMM 2 [N = 384] on 256-row ones (the second half-filled), unsplit
    {"PATH": "mma", "BLOCK_M": 16, "BLOCK_N": 32},
    # K split: GEMM 1's 3 groups over 3 programs (the raw gate and up sums added before the gating), GEMM 2's 2
    # groups a slot over 2
    {"PATH": "mma", "BLOCK_M": 16, "BLOCK_N": 64, "SPLIT_K": 3, "SPLIT_K2": 2},
])
def test_fused_moe_mma_unsorted_pairs(device, cfg, monkeypatch):
    """The tensor-core path on unsorted pairs (PAIRS: one pair a program in the B operand's first column, the GEMV
    path's epilogue): the GEMV path's result on the same pairs and the fp32 MoE to the mma path's rounding, ids
    outside [0, E) adding nothing, the same bits on a second run, every arrival counter back at zero; past
    PAIRS_MAX the sorted list, its GEMMs unsplit."""
    w13, w2, x, tw, ids = decode_case(device, gen_for("moe-mma-pairs", str(cfg)), h=384, i=256, group=128)
    ids[2, 1] = 6  # out of range above as well
    x, tw, ids = x.bfloat16(), tw.to(device), ids.to(device)
    cfg = {**cfg, "PAIRS": True}
    out = fused_moe_w4a16(x, *w13, *w2, tw, ids, config=cfg)
    gemv = fused_moe_w4a16(x, *w13, *w2, tw, ids, config={"PATH": "gemv", "BLOCK_M": 1, "BLOCK_N": 32})
    torch.testing.assert_close(out, gemv, rtol=2**-7, atol=2**-7 * float(gemv.abs().max()))
    ref = moe_loop_fp32(x, w13, w2, tw, ids)
    assert float((out.cpu().float() - ref).norm() / ref.norm()) < 4e-3  # the intermediate and output in bf16
    assert torch.equal(fused_moe_w4a16(x, *w13, *w2, tw, ids, config=cfg), out)
    assert not any(c.any() for c in fp8_gemm._COUNTERS.values())
    monkeypatch.setattr(w4a16_moe_mod, "PAIRS_MAX", 0)
    assert_close(fused_moe_w4a16(x, *w13, *w2, tw, ids, config=cfg), fused_moe_w4a16_ref(x, *w13, *w2, tw, ids),
                 torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group,i,block_n", [(32, 96, 32), (64, 192, 32), (128, 256, 128)])
def test_fused_moe_rows_path(device, group, i, block_n):
    """The "rows" path (a thread a weight row, fp32 activations with their group sums made once): 1, 2 and 4 loads
    a row and group; GEMM 1 writing the intermediate's group sums itself (BLOCK_N a multiple of the group) or not;
    ids outside [0, E) adding nothing; the fp32 MoE to rounding (the 128 carried per product costs ~7 bits)."""
    e, h, topk, m = 6, 256, 4, 3
    gen = gen_for("moe-rows", group, i)
    w13 = [t.to(device) for t in stacked(e, 2 * i, h, group, gen)]
    w2 = [t.to(device) for t in stacked(e, h, i, group, gen)]
    x = torch.randn(m, h, generator=gen).float().to(device)
    tw, ids = routing(m, e, topk, gen)
    ids[2, 1] = e
    tw, ids = tw.to(device), ids.to(device)
    cfg = {"PATH": "rows", "BLOCK_M": 1, "BLOCK_N": block_n, "num_warps": 2}
    out = fused_moe_w4a16(x, *w13, *w2, tw, ids, config=cfg)
    ref = moe_loop_fp32(x, w13, w2, tw, ids)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=5e-5 * float(ref.abs().max()))
    assert float((out.cpu() - ref).norm() / ref.norm()) < 2e-5
    # bf16 x: the intermediate stays fp32 (the reference rounds it to bf16), so against the fp32 loop on the same x
    xb = x.bfloat16()
    ref_b = moe_loop_fp32(xb, w13, w2, tw, ids)
    out_b = fused_moe_w4a16(xb, *w13, *w2, tw, ids, config=cfg)
    assert out_b.dtype == torch.bfloat16
    torch.testing.assert_close(out_b.cpu().float(), ref_b, rtol=2**-7, atol=2**-8 * float(ref_b.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", [
    # unsorted pairs: GEMM 1's 6 groups over 2 programs (gate and up added before the gating), I = 96 half-filling
    # its second 64-row tile; GEMM 2 adds its slots, each slot's 3 groups over 3 programs
    {"PATH": "gemv", "BLOCK_M": 1, "BLOCK_N": 64, "SPLIT_K": 2, "SPLIT_K2": 3},
    # the sorted list, 2 pairs a program: 4 falls to 3 in both GEMMs (6 and 3 groups)
    {"PATH": "gemv", "BLOCK_M": 2, "BLOCK_N": 32, "PREFETCH": 2, "SPLIT_K": 4, "SPLIT_K2": 4},
    # the rows path: GEMM 1 split 3 ways, writing its group sums from the added partials; GEMM 2 unsplit
    {"PATH": "rows", "BLOCK_M": 1, "BLOCK_N": 32, "num_warps": 2, "SPLIT_K": 3},
    {"PATH": "rows", "BLOCK_M": 1, "BLOCK_N": 32, "num_warps": 2, "SPLIT_K2": 3},
])
def test_fused_moe_split_k(device, cfg):
    """SPLIT_K on the CUDA-core paths: each GEMM's groups over several programs, the last adding the fp32 partials
    in split order (the gated GEMM before its gating): the fp32 MoE to rounding, the same bits on a second run,
    every arrival counter back at zero."""
    w13, w2, x, tw, ids = decode_case(device, gen_for("moe-split", str(cfg)))
    ids[1, 2] = -1
    tw, ids = tw.to(device), ids.to(device)
    out = fused_moe_w4a16(x, *w13, *w2, tw, ids, config=cfg)
    ref = moe_loop_fp32(x, w13, w2, tw, ids)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=5e-5 * float(ref.abs().max()))
    assert float((out.cpu() - ref).norm() / ref.norm()) < 2e-5
    assert torch.equal(fused_moe_w4a16(x, *w13, *w2, tw, ids, config=cfg), out)
    assert not any(c.any() for c in fp8_gemm._COUNTERS.values())


def test_fused_moe_split_k_paths_only():
    """The MoE splits K on the CUDA-core paths and the unsorted mma path only (the tensor-core kernels' gated
    epilogue on the sorted list adds no partials); PAIRS is the mma path's."""
    for path, key in (("dot", "SPLIT_K"), ("mma", "SPLIT_K2")):
        with pytest.raises(ValueError, match="splits K on the gemv and rows paths and unsorted mma only"):
            w4a16_moe_mod.moe_config(torch.device("cpu"), 1, 8, 8, 64, 64, 64, {"PATH": path, key: 2})
    cfg = w4a16_moe_mod.moe_config(torch.device("cpu"), 1, 8, 8, 64, 64, 64, {"PATH": "mma", "PAIRS": True,
                                                                              "SPLIT_K2": 2})
    assert cfg["SPLIT_K2"] == 2
    with pytest.raises(ValueError, match="PAIRS is an mma path key"):
        w4a16_moe_mod.moe_config(torch.device("cpu"), 1, 8, 8, 64, 64, 64, {"PATH": "dot", "PAIRS": True})
    assert w4a16_moe_mod.moe_config(torch.device("cpu"), 1, 8, 8, 64, 64, 64, {"PATH": "gemv"})["SPLIT_K"] == 1


def test_gemv_nibbles_are_exact():
    """Every code 0..15 at every nibble place, zero points 0 and 15, one token: the GEMV path's 2^23-mantissa
    dequantization must give (q - z) * s * x with nothing lost (fp32, powers of two: exact sums)."""
    h, i = 128, 128  # one group of 128 along K in both GEMMs
    q13 = (torch.arange(2 * i * h).view(2 * i, h) * 7 % 16).to(torch.uint8)[None]  # [1, 2I, H]
    q2 = (torch.arange(h * i).view(h, i) * 5 % 16).to(torch.uint8)[None]  # [1, H, I]
    z13 = torch.tensor([0, 15] * i, dtype=torch.uint8).view(1, 2 * i, 1)
    z2 = torch.tensor([15, 0] * (h // 2), dtype=torch.uint8).view(1, h, 1)
    w13 = pack_kmajor(q13, torch.full((1, 2 * i, 1), 2.0**-6, dtype=torch.float16), z13)
    w2 = pack_kmajor(q2, torch.full((1, h, 1), 2.0**-5, dtype=torch.float16), z2)
    x = (2.0 ** -torch.randint(0, 4, (1, h), generator=gen_for("exact"))).float()
    tw, ids = torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int64)
    out = fused_moe_w4a16(x, *w13, *w2, tw, ids, config={"PATH": "gemv", "BLOCK_M": 1, "BLOCK_N": 64, "PREFETCH": 2})
    gate_up = x @ kmajor_dequantize_ref(*w13)[0].t()
    assert torch.equal(gate_up, x.double().matmul(kmajor_dequantize_ref(*w13)[0].t().double()).float())
    ref = fused_moe_w4a16_ref(x, *w13, *w2, tw, ids)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
def test_fused_moe_int64_ids_and_small_blocks(device):
    e, h, i, group = 3, 128, 128, 128
    gen = gen_for("moe-small")
    w13 = [t.to(device) for t in stacked(e, 2 * i, h, group, gen)]
    w2 = [t.to(device) for t in stacked(e, h, i, group, gen)]
    x = torch.randn(40, h, generator=gen).to(torch.bfloat16).to(device)
    ids = torch.tensor([[0, 1, 2]] * 40, device=device)  # int64; 40 pairs per expert: three 16-row blocks each
    tw = torch.full((40, 3), 1 / 3, device=device)
    cfg = {"PATH": "dot", "BLOCK_M": 16, "BLOCK_N": 64}
    out = fused_moe_w4a16(x, *w13, *w2, tw, ids, config=cfg)
    assert_close(out, fused_moe_w4a16_ref(x, *w13, *w2, tw, ids), torch.bfloat16)


def test_moe_config_path_is_data():
    table = {"dev": {"E=8,I=64,H=64,G=64": {"1": {"PATH": "gemv", "BLOCK_N": 32, "junk": 1},
                                              "64": {"PATH": "dot", "BLOCK_M": 32}}}}
    default = {"PATH": "dot", "BLOCK_M": 64, "BLOCK_N": 128}
    pick = w4a16_moe_mod.select_moe_config
    assert pick(table, "dev", "E=8,I=64,H=64,G=64", 2, default) == {"PATH": "gemv", "BLOCK_M": 64, "BLOCK_N": 32}
    assert pick(table, "dev", "E=8,I=64,H=64,G=64", 40, default)["PATH"] == "dot"
    assert pick(table, "other", "E=8,I=64,H=64,G=64", 2, default) == default
    with pytest.raises(ValueError, match="PATH must be one of"):
        w4a16_moe_mod.moe_config(torch.device("cpu"), 1, 8, 8, 64, 64, 64, {"PATH": "wgmma"})
    with pytest.raises(ValueError, match="PREFETCH must be 0, 1 or 2"):
        w4a16_moe_mod.moe_config(torch.device("cpu"), 1, 8, 8, 64, 64, 64, {"PATH": "gemv", "PREFETCH": 3})
    with pytest.raises(ValueError, match="STAGES"):
        w4a16_moe_mod.moe_config(torch.device("cpu"), 1, 8, 8, 64, 64, 64, {"PATH": "mma", "STAGES": 3})


def test_moe_default_takes_tensor_cores_from_a_quarter_pair_per_expert(monkeypatch):
    """On a GPU without a table entry, MiniMax-M2's MoE (top-8 of 256) takes the GEMV path up to 8 tokens and the
    tensor-core paths from 16 (a GEMV program per pair re-reads a shared expert's rows); a group below 128 keeps the
    GEMV path, whose tl.dot-free loop has no K minimum."""
    monkeypatch.setattr(w4a16_moe_mod, "INTERPRETED", False)
    default = w4a16_moe_mod._moe_default_config
    assert [default(m, 8, 256, 128)["PATH"] for m in (1, 8, 16, 32, 256, 1024, 4096)] == \
        ["gemv", "gemv", "mma", "mma", "mma", "dot", "dot"]
    assert default(32, 8, 256, 64)["PATH"] == "gemv"
    assert default(16, 8, 256, 128)["BLOCK_M"] == 16
    # from 1024 tokens (32 pairs an expert) each group one dot of K = 128 on 64 x 64 tiles; 512 keeps eight dots
    assert [default(m, 8, 256, 128).get("WIDE", 0) for m in (512, 1024, 4096)] == [0, 1, 1]


def test_fused_moe_refuses_mismatched_experts():
    gen = gen_for("moe-bad")
    w13 = stacked(2, 256, 128, 64, gen)
    w2 = stacked(2, 128, 128, 128, gen)  # another group size
    x = torch.randn(2, 128).bfloat16()
    tw, ids = torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="one group size"):
        fused_moe_w4a16(x, *w13, *w2, tw, ids)
    with pytest.raises(ValueError, match="topk_ids must be integer"):
        fused_moe_w4a16(x, *w13, *stacked(2, 128, 128, 64, gen), tw, ids.float())
    with pytest.raises(ValueError, match="zeros uint8"):  # an AutoAWQ tensor where the K-major layout is expected
        fused_moe_w4a16(x, *w13[:1], w13[1].to(torch.int32), *w13[2:], *stacked(2, 128, 128, 64, gen), tw, ids)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,n,k,group,dtype,config", [
    (1, 96, 256, 32, torch.float32, None),  # the launcher's choice; N = 96: half of the second 64-row tile
    # K split over 4 programs per tile (8 groups of 32): the last to arrive sums the partials
    (3, 160, 256, 32, torch.bfloat16, {"PATH": "gemv", "BLOCK_M": 2, "BLOCK_N": 32, "PREFETCH": 2, "SPLIT_K": 4}),
    (2, 64, 512, 128, torch.float16, {"PATH": "gemv", "BLOCK_M": 1, "BLOCK_N": 16, "SPLIT_K": 2}),
    (19, 384, 512, 128, torch.bfloat16, {"PATH": "mma", "BLOCK_M": 16, "BLOCK_N": 256, "SPLIT_K": 2}),
    (21, 128, 256, 128, torch.float16, {"PATH": "mma", "BLOCK_M": 16, "BLOCK_N": 64, "PREFETCH": 2}),
    (9, 128, 512, 128, torch.bfloat16, {"PATH": "mma", "BLOCK_M": 16, "BLOCK_N": 64, "PREFETCH": 2, "SPLIT_K": 2}),
    # dequantized to x.dtype by a kernel, then torch.matmul
    (40, 96, 512, 128, torch.bfloat16, {"PATH": "dequant"}),
    (12, 64, 256, 32, torch.float32, {"PATH": "dequant"}),
    (70, 192, 512, 128, torch.bfloat16, {"PATH": "dot", "BLOCK_M": 64, "BLOCK_N": 128, "SPLIT_K": 4}),
    (33, 128, 256, 128, torch.float32, {"PATH": "dot", "BLOCK_M": 32, "BLOCK_N": 64}),
    (70, 192, 512, 128, torch.bfloat16, {"PATH": "dot", "BLOCK_M": 64, "BLOCK_N": 64, "SPLIT_K": 2, "WIDE": 1}),
    (33, 128, 256, 128, torch.float32, {"PATH": "dot", "BLOCK_M": 32, "BLOCK_N": 64, "WIDE": 2}),
    (40, 96, 512, 128, torch.float16, {"PATH": "dot", "BLOCK_M": 64, "BLOCK_N": 32, "WIDE": 2}),
    # a thread a weight row on x converted to fp32 with its group sums; N = 80: a half-full last tile of 32
    (3, 80, 256, 64, torch.bfloat16, {"PATH": "rows", "BLOCK_N": 32, "num_warps": 1, "SPLIT_K": 2}),
    (1, 80, 512, 128, torch.bfloat16, {"PATH": "rows", "BLOCK_N": 32, "num_warps": 1, "SPLIT_K": 4}),
])
def test_kmajor_linear_matches_reference(device, m, n, k, group, dtype, config):
    """Attention projections on the MoE kernels (one expert, rows in order), every path, with and without split K;
    the leading dimensions of x kept; twice the same call gives the same bits (the split sum's fixed order)."""
    gen = gen_for("kmajor-linear", m, n, k, dtype)
    w = [t.to(device) for t in awq_to_kmajor(*awq_weight(n, k, group, gen))]
    x = (torch.randn(m, k, generator=gen) * torch.exp(torch.randn(m, 1, generator=gen))).to(dtype).to(device)
    out = w4a16_kmajor_linear(x, *w, config=config)
    ref = w4a16_kmajor_linear_ref(x, *w)
    if config and config["PATH"] == "dequant":  # the products of x with the weight rounded to x.dtype
        ref = (x.float() @ kmajor_dequantize_ref(*w).to(dtype).float().t()).to(dtype)
    assert_close(out, ref, dtype)
    if dtype == torch.float32:  # the reference is the linear: the AutoAWQ weight dequantized, in fp32
        awq = awq_weight(n, k, group, gen_for("kmajor-linear", m, n, k, dtype))
        torch.testing.assert_close(ref.cpu(), x.cpu() @ awq_dequantize_ref(*awq), rtol=1e-4, atol=1e-5)
    assert torch.equal(w4a16_kmajor_linear(x.view(1, m, k), *w, config=config), out.view(1, m, n))


def test_kmajor_dequantize_rounds_the_reference_once():
    gen = gen_for("kmajor-dequant")
    w = awq_to_kmajor(*awq_weight(96, 384, 128, gen))
    ref = kmajor_dequantize_ref(*w)
    assert torch.equal(w4a16_moe_mod.kmajor_dequantize(*w, torch.float32), ref)
    assert torch.equal(w4a16_moe_mod.kmajor_dequantize(*w, torch.bfloat16), ref.bfloat16())


def test_kmajor_linear_config_and_refusals():
    dev = torch.device("cpu")
    cfg = w4a16_moe_mod.linear_config(dev, 1, 256, 1024, 128, {"SPLIT_K": 4})
    assert cfg["PATH"] == "gemv" and cfg["SPLIT_K"] == 4
    with pytest.raises(ValueError, match="SPLIT_K must divide the 8 groups"):
        w4a16_moe_mod.linear_config(dev, 1, 256, 1024, 128, {"SPLIT_K": 3})
    gen = gen_for("kmajor-bad")
    w = awq_to_kmajor(*awq_weight(64, 256, 128, gen))
    with pytest.raises(ValueError, match="does not fit qweight"):
        w4a16_kmajor_linear(torch.randn(2, 128).bfloat16(), *w)
    with pytest.raises(ValueError, match=r"qweight must be K-major \[N, K/8\]"):
        w4a16_kmajor_linear(torch.randn(2, 256).bfloat16(), w[0][None], *w[1:])
    assert w4a16_kmajor_linear(torch.randn(0, 256).bfloat16(), *w).shape == (0, 64)


# --------------------------------------------------------------------------------------------------------------------
# MiniMax-M2 shapes on the GPU


@pytest.mark.parametrize("m", [1, 16, 300])
@pytest.mark.parametrize("n,k", [(6144, 3072), (1024, 3072), (3072, 6144)])
@pytest.mark.parametrize("mark", [pytest.param(0, marks=gpu_only)])
def test_gemm_minimax_shapes_gpu(m, n, k, mark):
    gen = gen_for("gpu-gemm", m, n, k)
    qweight, qzeros, scales = (t.cuda() for t in awq_weight(n, k, 128, gen))
    x = torch.randn(m, k, generator=gen).bfloat16().cuda()
    assert_close(w4a16_gemm(x, qweight, qzeros, scales), w4a16_gemm_ref(x, qweight, qzeros, scales), torch.bfloat16)


@pytest.mark.parametrize("m", [1, 4, 16, 64, 300])
@pytest.mark.parametrize("n,k", [(8192, 3072), (3072, 6144)])
@pytest.mark.parametrize("path", [None, "gemv", "mma", "dequant", "rows"])
@pytest.mark.parametrize("mark", [pytest.param(0, marks=gpu_only)])
def test_kmajor_linear_minimax_shapes_gpu(m, n, k, path, mark):
    """q/k/v fused (8192 x 3072) and o_proj (3072 x 6144) on random codes, the launcher's split K included."""
    gen = torch.Generator(device="cuda").manual_seed(m + n)
    w = [torch.randint(-2**31, 2**31 - 1, (n, k // 8), generator=gen, device="cuda", dtype=torch.int32),
         torch.randint(0, 16, (n, k // 128), generator=gen, device="cuda", dtype=torch.uint8),
         (torch.rand(n, k // 128, generator=gen, device="cuda") * 2e-3).half()]
    x = torch.randn(m, k, generator=gen, device="cuda").bfloat16()
    # the register prefetch over the table's entry: a gemv entry's shared-memory stages and K steps of two groups
    # (the H100's at one row) are keys of the plain loop, so the override names the plain loop's
    plain = {"GSTEP": 1, "STAGES": 1} if path == "gemv" else {}
    cfg = {"PATH": path, "SPLIT_K": 2, "PREFETCH": 2, **plain} if path in ("gemv", "mma", "rows") else \
        {"PATH": path} if path else None
    out = w4a16_kmajor_linear(x, *w, config=cfg)
    if w4a16_moe_mod.linear_config(x.device, m, n, k, 128, cfg)["PATH"] == "dequant":
        ref = (x.float() @ kmajor_dequantize_ref(*w).bfloat16().float().t()).bfloat16()
    else:
        ref = w4a16_kmajor_linear_ref(x, *w)
    assert_close(out, ref, torch.bfloat16)


@pytest.mark.parametrize("m", [1, 4, 16, 256])
@pytest.mark.parametrize("path", [None, "gemv", "dot", "mma", "mma pairs"])
@pytest.mark.parametrize("mark", [pytest.param(0, marks=gpu_only)])
def test_fused_moe_minimax_shapes_gpu(m, path, mark):
    e, h, i, topk = 256, 3072, 1536, 8
    gen = torch.Generator(device="cuda").manual_seed(m)
    # random codes stand in for a quantized weight: the kernels read any code, zero point and scale

    def kmajor(n: int, k: int) -> list[torch.Tensor]:
        return [torch.randint(-2**31, 2**31 - 1, (e, n, k // 8), generator=gen, device="cuda", dtype=torch.int32),
                torch.randint(0, 16, (e, n, k // 128), generator=gen, device="cuda", dtype=torch.uint8),
                (torch.rand(e, n, k // 128, generator=gen, device="cuda") * 2e-3).half()]

    w13, w2 = kmajor(2 * i, h), kmajor(h, i)
    x = torch.randn(m, h, generator=gen, device="cuda").bfloat16()
    scores = torch.sigmoid(torch.randn(m, e, generator=gen, device="cuda"))
    tw, ids = torch.topk(scores, topk, dim=-1)
    tw = tw / tw.sum(-1, keepdim=True)
    # "mma pairs": unsorted up to 8 tokens, K split in both GEMMs (the sorted list beyond, unsplit)
    cfg = {"PATH": "mma", "PAIRS": True, "BLOCK_N": 128, "SPLIT_K": 2, "SPLIT_K2": 2} if path == "mma pairs" else \
        {"PATH": path} if path else None
    out = fused_moe_w4a16(x, *w13, *w2, tw, ids, config=cfg)
    assert_close(out, fused_moe_w4a16_ref(x, *w13, *w2, tw, ids), torch.bfloat16)
