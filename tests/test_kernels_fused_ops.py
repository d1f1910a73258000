"""The fused decoder-layer steps (kernels/fused_ops.py) against their PyTorch references and the model's own code,
on the CPU under Triton's interpreter and on the GPU compiled (tests/kernel_devices.py).

The kernels and the references make the same roundings to the model's dtype in the same places; only the fp32 sums
(the mean square, the weights' sum) run in another order, so a bf16 output may sit one unit in the last place away
where the fp32 value lies near a rounding boundary: at most one ulp anywhere, and almost every element exact."""

from __future__ import annotations

import pytest
import torch
from kernel_devices import DEVICES, IGNORE_EXP_OVERFLOW  # sets TRITON_INTERPRET first
from quantkit.kernels import fused_ops

from quantkit.runtime import model as M


def within_one_ulp(got: torch.Tensor, ref: torch.Tensor, exact_share: float = 0.99) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype
    g, r = got.float().cpu(), ref.float().cpu()
    if ref.dtype == torch.float32:
        torch.testing.assert_close(g, r, rtol=2e-6, atol=1e-6)
        return
    ulp = 2.0 ** (torch.frexp(r.abs().clamp(min=1e-30)).exponent - 1 - (7 if ref.dtype == torch.bfloat16 else 10))
    assert ((g - r).abs() <= ulp + 1e-30).all(), float(((g - r).abs() / ulp).max())
    assert (g == r).float().mean() >= exact_share


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [256, 3072, 100])
def test_rms_norm(device, dtype, n):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(5, 3, n, generator=g) * 3).to(dtype).to(device)
    r = torch.randn(5, 3, n, generator=g).to(dtype).to(device)
    w = (1 + torch.randn(n, generator=g) / 4).to(dtype).to(device)
    within_one_ulp(fused_ops.rms_norm(x, w, 1e-6), fused_ops.rms_norm_ref(x, w, 1e-6))
    within_one_ulp(fused_ops.rms_norm(x, w, 1e-6), M.rms_norm(x.cpu(), w.cpu(), 1e-6))  # the model's CPU path
    s, y = fused_ops.add_rms_norm(x, r, w, 1e-6)
    s_ref, y_ref = fused_ops.add_rms_norm_ref(x, r, w, 1e-6)
    assert torch.equal(s.cpu(), s_ref.cpu())  # one rounding of one fp32 sum: exact
    within_one_ulp(y, y_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,group", [(384, 128), (3072, 128), (96, 32)])
def test_rms_norm_fp8(device, dtype, n, group):
    """The norm's output quantized in the same launch: the bits per_token_group_quant_fp8 gives for that output,
    rows of very different sizes, and a zero row (scale at its floor, codes zero)."""
    from quantkit.kernels.fp8_gemm import per_token_group_quant_fp8_ref

    g = torch.Generator().manual_seed(n + group)
    x = (torch.randn(4, 3, n, generator=g) * torch.exp(torch.randn(4, 3, 1, generator=g) * 2)).to(dtype)
    x[1, 2] = 0.0
    r = torch.randn(4, 3, n, generator=g).to(dtype)
    r[1, 2] = 0.0
    w = (1 + torch.randn(n, generator=g) / 4).to(dtype)
    x, r, w = x.to(device), r.to(device), w.to(device)
    y, yq, ys = fused_ops.rms_norm_fp8(x, w, 1e-6, group)
    assert torch.equal(y, fused_ops.rms_norm(x, w, 1e-6))
    want_q, want_s = per_token_group_quant_fp8_ref(y.reshape(-1, n).cpu(), group)
    assert yq.shape == (12, n) and ys.shape == (12, n // group)
    assert torch.equal(yq.cpu().view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(ys.cpu(), want_s)
    assert not yq.view(torch.uint8)[5].any()  # the zero row
    s, y2, yq2, ys2 = fused_ops.add_rms_norm_fp8(x, r, w, 1e-6, group)
    s_ref, y_ref = fused_ops.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(s, s_ref) and torch.equal(y2, y_ref)
    want_q, want_s = per_token_group_quant_fp8_ref(y2.reshape(-1, n).cpu(), group)
    assert torch.equal(yq2.cpu().view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(ys2.cpu(), want_s)
    ref = fused_ops.add_rms_norm_fp8_ref(x.cpu(), r.cpu(), w.cpu(), 1e-6, group)
    within_one_ulp(y2, ref[1])


def test_rms_norm_fp8_refuses_groups_that_do_not_divide():
    x = torch.zeros(2, 96)
    with pytest.raises(ValueError, match="FP8 groups of 64 for rows of 96"):
        fused_ops.rms_norm_fp8(x, torch.ones(96), 1e-6, 64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads,dim,rotary", [(4, 64, 32), (6, 128, 64), (3, 48, 48), (2, 32, 8)])
@pytest.mark.parametrize("given_rstd", [False, True])
def test_qk_norm_rope(device, dtype, heads, dim, rotary, given_rstd):
    g = torch.Generator().manual_seed(heads * dim + rotary)
    B, T, W = 2, 5, heads * dim
    y = (torch.randn(B, T, W, generator=g) * 2).to(dtype).to(device)
    w = (1 + torch.randn(W, generator=g) / 4).to(dtype).to(device)
    pos = torch.randint(0, 4096, (B, T), generator=g)
    cos, sin = (t.to(device) for t in M.rope_tables(pos, rotary, 5e6))
    rstd = None
    if given_rstd:  # as a tensor-parallel rank passes it: 1/rms over a width other than the local one
        rstd = torch.rsqrt(y.float().pow(2).sum(-1, keepdim=True) / (3 * W) + 1e-6)
    got = fused_ops.qk_norm_rope(y, w, cos, sin, heads, 1e-6, rstd)
    ref = fused_ops.qk_norm_rope_ref(y, w, cos, sin, heads, 1e-6, rstd)
    within_one_ulp(got, ref, exact_share=0.97)
    if not given_rstd:  # the reference is the model's own sequence of steps
        model = M.apply_rope(M.rms_norm(y, w, 1e-6).view(B, T, heads, dim).transpose(1, 2), cos, sin).transpose(1, 2)
        within_one_ulp(ref.cpu(), model.cpu(), exact_share=1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("q_heads,k_heads,dim,rotary", [(6, 2, 64, 32), (4, 4, 48, 48), (3, 1, 128, 64)])
def test_qk_norm_rope_pair_is_two_single_launches(device, dtype, q_heads, k_heads, dim, rotary):
    """q and k in one launch (axis 1 picks the projection), read from views of one q/k/v output as the model passes
    them: the bits of one launch each under the interpreter; on a GPU, where the smaller projection's norm is summed
    in the larger one's block shape, within one unit in the last place."""
    g = torch.Generator().manual_seed(q_heads * 100 + k_heads * 10 + dim)
    B, T = 2, 3
    qkv = (torch.randn(B, T, (q_heads + 2 * k_heads) * dim, generator=g) * 2).to(dtype).to(device)
    q, k, _ = qkv.split([q_heads * dim, k_heads * dim, k_heads * dim], -1)
    wq = (1 + torch.randn(q_heads * dim, generator=g) / 4).to(dtype).to(device)
    wk = (1 + torch.randn(k_heads * dim, generator=g) / 4).to(dtype).to(device)
    cos, sin = (t.to(device) for t in M.rope_tables(torch.randint(0, 4096, (B, T), generator=g), rotary, 5e6))
    qo, ko = fused_ops.qk_norm_rope_pair(q, k, wq, wk, cos, sin, q_heads, k_heads, 1e-6)
    for got, single in ((qo, fused_ops.qk_norm_rope(q, wq, cos, sin, q_heads, 1e-6)),
                        (ko, fused_ops.qk_norm_rope(k, wk, cos, sin, k_heads, 1e-6))):
        if device == "cpu":
            assert torch.equal(got, single)
        else:
            within_one_ulp(got, single, exact_share=0.9)
    with pytest.raises(ValueError, match="qk_norm_rope_pair"):
        fused_ops.qk_norm_rope_pair(q, k, wq, wk, cos, sin, q_heads, 2 * k_heads, 1e-6)  # another head dim
    # one table for every row of the batch (the calibration forward's): the rows' own tables' results
    c1, s1 = cos[:1].expand(B, T, -1), sin[:1].expand(B, T, -1)
    q1, k1 = fused_ops.qk_norm_rope_pair(q, k, wq, wk, cos[:1], sin[:1], q_heads, k_heads, 1e-6)
    q2, k2 = fused_ops.qk_norm_rope_pair(q, k, wq, wk, c1.contiguous(), s1.contiguous(), q_heads, k_heads, 1e-6)
    assert torch.equal(q1, q2) and torch.equal(k1, k2)
    assert torch.equal(fused_ops.qk_norm_rope(q, wq, cos[:1], sin[:1], q_heads, 1e-6),
                       fused_ops.qk_norm_rope(q, wq, c1.contiguous(), s1.contiguous(), q_heads, 1e-6))


@IGNORE_EXP_OVERFLOW
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("experts,k,rows,ties", [(256, 8, 7, False), (16, 4, 33, False), (12, 3, 1, False),
                                                   (256, 8, 5, True)])
def test_route_topk(device, experts, k, rows, ties):
    """ties: logits on a coarse grid and a bias of -1 or 0, so that choices repeat and most are negative (the
    kernel orders them as integers): the lowest id first among equals, as torch.topk."""
    g = torch.Generator().manual_seed(experts + k)
    logits = (torch.randn(rows, experts, generator=g) * 3).to(device)
    bias = (torch.randn(experts, generator=g) / 10).to(device)
    if ties:
        logits = (logits.cpu() * 2).round().clamp(-3, 3).to(device)
        bias = -(torch.arange(experts) % 2).float().to(device)
    ids, w = fused_ops.route_topk(logits, bias, k)
    ids_ref, w_ref = fused_ops.route_topk_ref(logits, bias, k)
    assert ids.dtype == torch.int64
    if ties:  # torch.topk leaves the order among equals open: the same choices in the same order, ids rising in ties
        choice = (torch.sigmoid(logits) + bias).cpu()
        assert torch.equal(choice.gather(1, ids.cpu()), choice.gather(1, ids_ref.cpu()))
        same = choice.gather(1, ids.cpu()).diff(dim=1) == 0
        assert (ids.cpu().diff(dim=1) > 0)[same].all() and same.any()
    else:
        assert torch.equal(ids.cpu(), ids_ref.cpu())  # the same experts, in the same order
    torch.testing.assert_close(w.cpu(), w_ref.cpu(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w.sum(-1).cpu(), torch.ones(rows), rtol=1e-6, atol=0)


@IGNORE_EXP_OVERFLOW
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows,hidden,experts,k,dtype", [
    (1, 3072, 256, 8, torch.bfloat16),  # MiniMax-M2's router at decode (the GEMV variant, rows <= 4)
    (3, 320, 40, 8, torch.float16),  # GEMV: H and E not powers of two, a padding row
    (37, 384, 40, 8, torch.bfloat16),  # three row blocks, experts not a multiple of the block
    (5, 256, 16, 4, torch.float32),
])
def test_router(device, rows, hidden, experts, k, dtype):
    """The router in one launch (fp32 logits by blocks of experts, the top-k by the row block's last program): the
    reference's experts in its order and its weights; the arrival counters left at zero for the next launch."""
    from quantkit.kernels import fp8_gemm

    g = torch.Generator().manual_seed(rows + hidden + experts)
    h = torch.randn(rows, hidden, generator=g).to(dtype).to(device)
    gate = (torch.randn(experts, hidden, generator=g) / hidden ** 0.5).to(device)
    bias = (torch.randn(experts, generator=g) / 10).to(device)
    ids, w = fused_ops.router(h, gate, bias, k)
    ids_ref, w_ref = fused_ops.router_ref(h, gate, bias, k)
    assert ids.dtype == torch.int64 and torch.equal(ids.cpu(), ids_ref.cpu())
    torch.testing.assert_close(w.cpu(), w_ref.cpu(), rtol=1e-5, atol=1e-6)
    assert not any(c.any() for c in fp8_gemm._COUNTERS.values())
    with pytest.raises(ValueError, match="router: h"):
        fused_ops.router(h, gate.to(torch.bfloat16), bias, k)  # the gate stays fp32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hidden,experts,k,group,dtype", [
    (256, 16, 4, 32, torch.bfloat16),  # FP8 groups for the experts; 8 groups over 8 programs
    (384, 10, 3, 0, torch.bfloat16),  # no quantization; 3 chunks of 128 over 5 programs
    (512, 6, 2, 64, torch.float16),  # 8 groups over 3 programs, in turn
])
def test_add_rms_norm_router(device, hidden, experts, k, group, dtype):
    """A token's post-attention norm and routing in one launch: the sum, the normalized row and its FP8 groups as
    add_rms_norm(_fp8) makes them, the experts and weights router picks from that row; within one ulp of each
    where the GPU's reductions run in another order (the interpreter's do not: the same bits there)."""
    g = torch.Generator().manual_seed(hidden + experts)
    x = torch.randn(1, hidden, generator=g).to(dtype).to(device)
    r = torch.randn(1, hidden, generator=g).to(dtype).to(device)
    nw = (1 + torch.randn(hidden, generator=g) / 4).to(dtype).to(device)
    gate = (torch.randn(experts, hidden, generator=g) / hidden ** 0.5).to(device)
    bias = (torch.randn(experts, generator=g) / 10).to(device)
    s, y, q, qs, ids, w = fused_ops.add_rms_norm_router(x, r, nw, 1e-6, gate, bias, k, group)
    if group:
        s_ref, y_ref, q_ref, qs_ref = fused_ops.add_rms_norm_fp8(x, r, nw, 1e-6, group)
    else:
        (s_ref, y_ref), q_ref, qs_ref = fused_ops.add_rms_norm(x, r, nw, 1e-6), None, None
    ids_ref, w_ref = fused_ops.router(y_ref, gate, bias, k)
    assert torch.equal(s, s_ref)
    if device == "cpu":
        assert torch.equal(y, y_ref) and torch.equal(ids, ids_ref) and torch.equal(w, w_ref)
        if group:
            assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(qs, qs_ref)
    else:
        within_one_ulp(y.cpu(), y_ref.cpu())
        assert torch.equal(ids.cpu(), ids_ref.cpu())
        torch.testing.assert_close(w.cpu(), w_ref.cpu(), rtol=1e-5, atol=1e-6)
    s2, y2 = fused_ops.add_rms_norm_ref(x.cpu(), r.cpu(), nw.cpu(), 1e-6)
    torch.testing.assert_close(y.cpu().float(), y2.float(), rtol=2 ** -7, atol=1e-6)
    assert q is None if not group else (q.shape == (1, hidden) and qs.shape == (1, hidden // group))
    with pytest.raises(ValueError, match="add_rms_norm_router"):
        fused_ops.add_rms_norm_router(torch.cat([x, x]), torch.cat([r, r]), nw, 1e-6, gate, bias, k, group)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_shapes_one_line(device):
    x = torch.randn(2, 8, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match="weight"):
        fused_ops.rms_norm(x, torch.ones(8, device=device), 1e-6)  # fp32 gain on bf16 rows
    with pytest.raises(ValueError, match="heads"):
        fused_ops.qk_norm_rope(x[None], torch.ones(8, dtype=torch.bfloat16, device=device),
                               torch.zeros(1, 2, 1, device=device), torch.zeros(1, 2, 1, device=device), 3, 1e-6)
    with pytest.raises(ValueError, match="k 9"):
        fused_ops.route_topk(torch.randn(2, 8, device=device), torch.zeros(8, device=device), 9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,T,nkv,dim", [(3, 1, 2, 64), (2, 5, 8, 128), (1, 7, 3, 48)])
def test_kv_write(device, B, T, nkv, dim):
    g = torch.Generator().manual_seed(B * T * nkv)
    S, C = 5, 16
    kc = torch.randn(S, nkv, C, dim, generator=g).to(torch.bfloat16).to(device)
    vc = torch.randn(S, nkv, C, dim, generator=g).to(torch.bfloat16).to(device)
    # the step's keys as the model makes them: [B, T, NKV, D] contiguous, seen as [B, NKV, T, D]
    k = torch.randn(B, T, nkv, dim, generator=g).to(torch.bfloat16).to(device).transpose(1, 2)
    v = torch.randn(B, T, nkv, dim, generator=g).to(torch.bfloat16).to(device).transpose(1, 2)
    slots = torch.randperm(S, generator=g)[:B, None].expand(B, T).to(device)
    cols = (torch.randperm(C - T, generator=g)[:B, None] + torch.arange(T)).to(device)
    ref_k, ref_v = kc.clone(), vc.clone()
    fused_ops.kv_write_ref(ref_k, ref_v, k, v, slots, cols)
    fused_ops.kv_write(kc, vc, k, v, slots, cols)
    assert torch.equal(kc.cpu(), ref_k.cpu()) and torch.equal(vc.cpu(), ref_v.cpu())
    b, t = B - 1, T - 1  # and the last token is where it belongs
    assert torch.equal(kc[slots[b, t], :, cols[b, t]].cpu(), k[b, :, t].cpu())
    assert torch.equal(vc[slots[b, t], :, cols[b, t]].cpu(), v[b, :, t].cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,NH,NKV,D,C,cols,dtype", [
    (3, 6, 2, 32, 200, [0, 77, 199], torch.float32),  # splits over the columns: the new token first, mid, last
    (2, 48, 8, 128, 192, [130, 5], torch.bfloat16),  # MiniMax-M2's heads at the decode benchmark's capacity
    (2, 4, 1, 64, 1000, [999, 600], torch.float16),  # eight splits on the CPU, most of one row's empty
])
def test_decode_attention(device, B, NH, NKV, D, C, cols, dtype):
    """One new token per row: the cache written as kv_write writes it and the attention over columns 0..col of the
    row's slot as the reference (and SDPA under the step's mask) computes it, whatever the split over programs."""
    g = torch.Generator().manual_seed(B + NH + C)
    S = 4
    q = torch.randn(B, NH, D, generator=g).to(dtype).to(device)
    k = torch.randn(B, NKV, D, generator=g).to(dtype).to(device)
    v = torch.randn(B, NKV, D, generator=g).to(dtype).to(device)
    kc = torch.randn(S, NKV, C, D, generator=g).to(dtype).to(device)
    vc = torch.randn(S, NKV, C, D, generator=g).to(dtype).to(device)
    slots = torch.randperm(S, generator=g)[:B].to(device)
    cols_t = torch.tensor(cols).to(device)
    ref_k, ref_v = kc.clone(), vc.clone()
    ref = fused_ops.decode_attention_ref(q, k, v, ref_k, ref_v, slots, cols_t, D ** -0.5)
    out = fused_ops.decode_attention(q, k, v, kc, vc, slots, cols_t, D ** -0.5)
    assert torch.equal(kc.cpu(), ref_k.cpu()) and torch.equal(vc.cpu(), ref_v.cpu())
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), rtol=tol, atol=tol)
    # the reference is what the runtime computed before: SDPA over all C columns of the rows' slots under the mask
    mask = (torch.arange(C)[None, :] <= torch.tensor(cols)[:, None])[:, None, None].to(device)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.float()[:, :, None], ref_k[slots].float(), ref_v[slots].float(), attn_mask=mask, scale=D ** -0.5,
        enable_gqa=True)[:, :, 0]
    torch.testing.assert_close(ref.float().cpu(), sdpa.cpu(), rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="decode_attention"):
        fused_ops.decode_attention(q, k[:, :1] if NKV > 1 else k.expand(B, 2, D), v, kc, vc, slots, cols_t, 1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C,cols,dtype", [
    (192, [130, 5], torch.bfloat16),  # MiniMax-M2's heads; splits merged by the last program
    (64, [3, 63], torch.float16),  # one split a row
])
def test_decode_attention_quantizes_its_output(device, C, cols, dtype):
    """quant_group = head_dim: the launch also writes its output's block-FP8 codes and scales, bit for bit
    per_token_group_quant_fp8 of the output it returns (a head a group), for a block-FP8 o_proj; the output is the
    one without quantization."""
    from quantkit.kernels import fp8_gemm

    B, NH, NKV, D, S = 2, 48, 8, 128, 3
    g = torch.Generator().manual_seed(C + len(cols))
    q, k, v = ((torch.randn(B, n, D, generator=g) * 3).to(dtype).to(device) for n in (NH, NKV, NKV))
    kc = torch.randn(S, NKV, C, D, generator=g).to(dtype).to(device)
    vc = (torch.randn(S, NKV, C, D, generator=g) * torch.rand(S, NKV, C, 1, generator=g) * 8).to(dtype).to(device)
    slots = torch.tensor([2, 0]).to(device)
    cols_t = torch.tensor(cols).to(device)
    plain = fused_ops.decode_attention(q, k, v, kc.clone(), vc.clone(), slots, cols_t, D ** -0.5)
    out, (oq, os_) = fused_ops.decode_attention(q, k, v, kc, vc, slots, cols_t, D ** -0.5, quant_group=D)
    assert oq.shape == (B, NH * D) and oq.dtype == fp8_gemm.FP8_DTYPE and os_.shape == (B, NH)
    rq, rs = fp8_gemm.per_token_group_quant_fp8_ref(out.reshape(B, NH * D).cpu(), D)
    assert torch.equal(oq.cpu().view(torch.uint8), rq.view(torch.uint8)) and torch.equal(os_.cpu(), rs)
    assert torch.equal(out, plain)
    for bad, t in ((64, q), (D, q.float())):
        with pytest.raises(ValueError, match="quantizing the output"):
            fused_ops.decode_attention(t, k.to(t.dtype), v.to(t.dtype), kc.to(t.dtype), vc.to(t.dtype), slots,
                                       cols_t, 1.0, quant_group=bad)


class _OneLaunchCache:
    """The slot cache's one-launch decode path over given caches, rows and columns (SlotCache.decode_attention)."""

    def __init__(self, kc, vc, slots, cols):
        self.kc, self.vc, self.slots, self.cols, self.groups = kc, vc, slots, cols, []

    def decode_attention(self, layer, q, k, v, scale, qk_norm=None, quant_group=0):
        self.groups.append(quant_group)
        return fused_ops.decode_attention(q, k, v, self.kc, self.vc, self.slots, self.cols, scale, qk_norm=qk_norm,
                                          quant_group=quant_group)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_attend_hands_o_proj_its_quantization(device):
    """model.decode_attend asks the launch for its output's quantization where o_proj is a block-FP8 linear whose
    activation group is a head, and the output carries it (FP8_INPUT): o_proj's result is the one it makes
    quantizing the output itself. Another consumer, or heads of another width, get the plain launch."""
    from quantkit.kernels import fp8_gemm

    from quantkit.runtime.fp8 import Fp8Linear

    g = torch.Generator().manual_seed(7)
    B, NH, NKV, S, C = 2, 4, 2, 2, 64
    for D, consumer_kind, want in ((128, "fp8", 128), (128, "bf16", 0), (64, "fp8", 0)):
        q, k, v = ((torch.randn(B, 1, n * D, generator=g) * 2).bfloat16().to(device) for n in (NH, NKV, NKV))
        kc, vc = (torch.randn(S, NKV, C, D, generator=g).bfloat16().to(device) for _ in range(2))
        cache = _OneLaunchCache(kc, vc, torch.tensor([1, 0]).to(device), torch.tensor([9, 40]).to(device))
        if consumer_kind == "fp8":
            o_proj = Fp8Linear(NH * D, 256, "block")
            w, ws = fp8_gemm.per_token_group_quant_fp8_ref(torch.randn(256, NH * D, generator=g), 128)
            o_proj.weight.data, o_proj.weight_scale.data = w, torch.rand(2, NH * D // 128, generator=g) * 1e-2
            o_proj = o_proj.to(device)
        else:
            o_proj = torch.nn.Linear(NH * D, 256, bias=False).bfloat16().to(device)
        out = M.decode_attend(cache, 0, q, k, v, NH, NKV, None, o_proj)
        assert cache.groups == [want] and out.shape == (B, 1, NH * D)
        carried = getattr(out, M.FP8_INPUT, None)
        assert (carried is not None) == bool(want)
        if want:
            assert M.fp8_input(out, 128) is carried
            assert torch.equal(o_proj(out), o_proj(out.clone()))  # the clone carries nothing: quantized by o_proj


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,NH,NKV,D,rotary,C,cols,dtype,rstd", [
    (2, 48, 8, 128, 64, 192, [130, 5], torch.bfloat16, False),  # MiniMax-M2: rotary on half of each head
    (2, 24, 4, 128, 64, 192, [130, 5], torch.bfloat16, True),  # a tensor-parallel rank's half, 1/rms given
    (3, 6, 2, 32, 32, 200, [0, 77, 199], torch.float32, False),
])
def test_decode_attention_with_qk_norm(device, B, NH, NKV, D, rotary, C, cols, dtype, rstd):
    """q and k as projected: the QK-norm and rotary inside the launch give what qk_norm_rope_ref and then the
    attention give, and the cache holds the normalised, rotated key (within one ulp of the separate kernel's)."""
    from quantkit.runtime import model as M

    g = torch.Generator().manual_seed(B + NH + C + 1)
    S = 4
    q = (torch.randn(B, NH * D, generator=g) * 2).to(dtype).to(device)
    k = (torch.randn(B, NKV * D, generator=g) * 2).to(dtype).to(device)
    v = torch.randn(B, NKV, D, generator=g).to(dtype).to(device)
    wq = (1 + torch.randn(NH * D, generator=g) / 4).to(dtype).to(device)
    wk = (1 + torch.randn(NKV * D, generator=g) / 4).to(dtype).to(device)
    kc = torch.randn(S, NKV, C, D, generator=g).to(dtype).to(device)
    vc = torch.randn(S, NKV, C, D, generator=g).to(dtype).to(device)
    slots = torch.randperm(S, generator=g)[:B].to(device)
    cols_t = torch.tensor(cols).to(device)
    cos, sin = (t.to(device) for t in M.rope_tables(torch.tensor(cols)[:, None], rotary, 5e6))  # [B, 1, half]
    # given: as if the other rank's heads made the mean squares (any positive 1/rms per row)
    rq, rk = ((torch.rand(B, 1, 1, generator=g) + 0.2).to(device) for _ in range(2)) if rstd else (None, None)
    qn = fused_ops.qk_norm_rope_ref(q[:, None], wq, cos, sin, NH, 1e-6, rq)[:, 0]  # [B, NH, D]
    kn = fused_ops.qk_norm_rope_ref(k[:, None], wk, cos, sin, NKV, 1e-6, rk)[:, 0]
    ref_k, ref_v = kc.clone(), vc.clone()
    ref = fused_ops.decode_attention_ref(qn, kn, v, ref_k, ref_v, slots, cols_t, D ** -0.5)
    out = fused_ops.decode_attention(q.view(B, NH, D), k.view(B, NKV, D), v, kc, vc, slots, cols_t, D ** -0.5,
                                     qk_norm=(wq, wk, cos[:, 0], sin[:, 0], 1e-6) + ((rq, rk) if rstd else ()))
    within_one_ulp(kc, ref_k, exact_share=0.999)
    assert torch.equal(vc.cpu(), ref_v.cpu())
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="QK-norm"):
        fused_ops.decode_attention(q.view(B, NH, D), k.view(B, NKV, D), v, kc, vc, slots, cols_t, 1.0,
                                   qk_norm=(wk, wk, cos[:, 0], sin[:, 0], 1e-6))
