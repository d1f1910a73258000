"""Block-FP8 W8A8 GEMM in Gluon for Hopper: the K loop with one tensor-core product always in flight.

out[m, n] = sum over K blocks kb of (xq[m, kb] . w[n, kb]) * xs[m, kb] * ws[n // 128, kb], as
`fp8_gemm.w8a8_block_fp8_matmul` computes it (fp32 accumulation, each 128-deep product scaled by its two scales).

Why a second kernel: in the Triton kernel each K block's `tl.dot` must finish before its scaled sum, and the compiler
waits on every dot right after issuing it (`warp_group_dot_wait pendings = 0`), so the tensor cores idle while a
thread's 64 FMAs of the sum run. Here the loop is written at the level of the warp-group MMA: K block kb's product
is issued asynchronously into one of two register tiles, then the product of kb - 1 (the other tile) is waited for
with one MMA left outstanding, scaled and added while kb's runs, and its shared-memory stage is refilled by TMA.
Two product tiles and the accumulator are 3 x BLOCK_N / 2 registers a thread at BLOCK_M = 64 (one warp group a
program, two or three programs a multiprocessor taking turns on its tensor cores).

Operands through TMA descriptors made in the kernel (`triton.set_allocator`), rows past M or N read as zeros. The
number of K blocks must be even (the loop takes two a step, one for each product tile); the launcher falls back
otherwise. Gluon has no interpreter: on the CPU `w8a8_block_fp8_matmul_gluon` raises, and the tests compile the
kernel for sm_90 there and compare it with the Triton kernel on the GPU.
"""
from __future__ import annotations

import torch
import triton

try:  # Gluon ships with triton >= 3.5 as triton.experimental.gluon
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    HAVE_GLUON = True
    # TMA's global-to-shared copy: async_load from triton 3.7 on, async_copy_global_to_shared before
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    # a barrier of the program's warps: barrier from triton 3.7 on, thread_barrier before
    _cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
except ImportError:  # pragma: no cover - older triton
    HAVE_GLUON = False

from . import fp8_gemm

GROUP_K = 128  # the activations' group and the weights' scale block along K: one MMA K step's scales


def available(device: torch.device) -> bool:
    """Whether the Gluon kernel runs on device: compiled mode, Gluon importable, a CUDA GPU of compute capability
    9.0 (the warp-group MMA is Hopper's)."""
    return (HAVE_GLUON and not fp8_gemm.INTERPRETED and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] == 9)


if HAVE_GLUON:
    @gluon.jit
    def _load_tile(a_desc, b_desc, bar, a_buf, b_buf, off_m, off_n, k, pred):
        """K block at column k of A's row block and B's column block into one stage, counted on its barrier."""
        mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes, pred=pred)
        _tma_load(a_desc, [off_m, k], bar, a_buf, pred=pred)
        _tma_load(b_desc, [off_n, k], bar, b_buf, pred=pred)

    @gluon.jit
    def _step(a_desc, b_desc, bars, a_bufs, b_bufs, t_new, t_prev, sa_prev, acc, as_ptrs, bs_ptr, m_mask, kb, k_tiles,
              off_m, off_n, stride_ask, stride_bsk, STAGES: gl.constexpr, WARP_GROUPS: gl.constexpr):
        """K block kb's product issued into t_new's registers (read: its last value was summed), its scales loaded;
        then the product in flight before it (t_prev, K block kb - 1) waited for with kb's left outstanding, scaled
        and added to acc, and the stage it read refilled with K block kb - 1 + STAGES. Returns kb's product (in
        flight), its rows' scales, acc and the summed product's registers (free for the next issue)."""
        s = kb % STAGES
        mbarrier.wait(bars.index(s), (kb // STAGES) & 1)
        t_new = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), t_new, use_acc=False, is_async=True)
        # the tile's columns lie in one weight scale block: one scale a row (A's times B's) scales the product
        sa = gl.load(as_ptrs + kb * stride_ask, mask=m_mask, other=0.0) * gl.load(bs_ptr + kb * stride_bsk)
        t_prev = warpgroup_mma_wait(num_outstanding=1, deps=(t_prev, ))
        acc += t_prev * sa_prev[:, None]
        nxt = kb - 1 + STAGES
        if WARP_GROUPS > 1:  # every warp group past its wait before the stage is overwritten
            _cta_barrier()
        _load_tile(a_desc, b_desc, bars.index(nxt % STAGES), a_bufs.index(nxt % STAGES), b_bufs.index(nxt % STAGES),
                   off_m, off_n, nxt * 128, nxt < k_tiles)
        return t_new, sa, acc, t_prev

    @gluon.jit
    def _w8a8_block_gluon_kernel(
        a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr,  # A [M, K] fp8, A scales [M, K/128], B [N, K] fp8, B scales, C [M, N]
        M, N, K,
        stride_am, stride_asm, stride_ask, stride_bn, stride_bsn, stride_bsk, stride_cm,
        GROUP_N: gl.constexpr,  # the weight's scale block along N
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        BLOCK_K: gl.constexpr = 128
        pid = gl.program_id(0)
        num_pid_m = gl.cdiv(M, BLOCK_M)
        num_pid_n = gl.cdiv(N, BLOCK_N)
        width = GROUP_M * num_pid_n  # GROUP_M row blocks share each column sweep (their B tiles stay in L2)
        first_m = (pid // width) * GROUP_M
        size_m = gl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N

        smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
        a_desc = tma.make_tensor_descriptor(a_ptr, [M, K], [stride_am, 1], [BLOCK_M, BLOCK_K], smem)
        b_desc = tma.make_tensor_descriptor(b_ptr, [N, K], [stride_bn, 1], [BLOCK_N, BLOCK_K], smem)
        a_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_M, BLOCK_K], smem)
        b_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_N, BLOCK_K], smem)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(bars.index(s), count=1)

        # one warp group along M per 64 rows, instruction N the whole tile (fp8: K 32 an instruction)
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK_N, 32])
        rows: gl.constexpr = gl.SliceLayout(1, mma)
        cols: gl.constexpr = gl.SliceLayout(0, mma)
        offs_m = off_m + gl.arange(0, BLOCK_M, layout=rows)
        offs_n = off_n + gl.arange(0, BLOCK_N, layout=cols)
        m_mask = offs_m < M
        n_mask = offs_n < N
        as_ptrs = as_ptr + offs_m.to(gl.int64) * stride_asm  # [BLOCK_M]
        bs_ptr += (off_n // GROUP_N) * stride_bsn  # the column tile's scale block (GROUP_N % BLOCK_N == 0)

        k_tiles = gl.cdiv(K, BLOCK_K)  # even (the launcher checks)
        for s in gl.static_range(STAGES):  # every stage filled; each refilled once the product reading it is done
            _load_tile(a_desc, b_desc, bars.index(s), a_bufs.index(s), b_bufs.index(s), off_m, off_n, s * BLOCK_K,
                       s < k_tiles)

        WG: gl.constexpr = num_warps // 4  # warp groups, 64 rows each
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma)
        t0 = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma)
        # K block 0's product issued ahead of the loop: t1 is the product in flight at each step's start
        mbarrier.wait(bars.index(0), 0)
        t1 = warpgroup_mma(a_bufs.index(0), b_bufs.index(0).permute((1, 0)), t0, use_acc=False, is_async=True)
        sa1 = gl.load(as_ptrs, mask=m_mask, other=0.0) * gl.load(bs_ptr)
        for kk in range(1, k_tiles - 1, 2):
            # K block kk into t0 while kk - 1 (t1) is scaled and summed, then kk + 1 into t1 while kk (t0) is
            t0, sa0, acc, t1 = _step(a_desc, b_desc, bars, a_bufs, b_bufs, t0, t1, sa1, acc, as_ptrs, bs_ptr, m_mask,
                                     kk, k_tiles, off_m, off_n, stride_ask, stride_bsk, STAGES, WG)
            t1, sa1, acc, t0 = _step(a_desc, b_desc, bars, a_bufs, b_bufs, t1, t0, sa0, acc, as_ptrs, bs_ptr, m_mask,
                                     kk + 1, k_tiles, off_m, off_n, stride_ask, stride_bsk, STAGES, WG)
        # the last K block into t0; then nothing left to issue
        t0, sa0, acc, t1 = _step(a_desc, b_desc, bars, a_bufs, b_bufs, t0, t1, sa1, acc, as_ptrs, bs_ptr, m_mask,
                                 k_tiles - 1, k_tiles, off_m, off_n, stride_ask, stride_bsk, STAGES, WG)
        t0 = warpgroup_mma_wait(num_outstanding=0, deps=(t0, ))
        acc += t0 * sa0[:, None]
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(s))

        c_ptrs = c_ptr + offs_m.to(gl.int64)[:, None] * stride_cm + offs_n[None, :]
        gl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    @gluon.jit
    def _moe_load(a_desc, b_desc, bar, a_buf, g_buf, u_buf, row0, g_row, u_row, k, pred, GATED: gl.constexpr):
        """A K block of the list's row block and of the expert's gate (or only) rows, and up rows when gated, into one
        stage, counted on its barrier."""
        nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes * (2 if GATED else 1)
        mbarrier.expect(bar, nbytes, pred=pred)
        _tma_load(a_desc, [row0, k], bar, a_buf, pred=pred)
        _tma_load(b_desc, [g_row, k], bar, g_buf, pred=pred)
        if GATED:
            _tma_load(b_desc, [u_row, k], bar, u_buf, pred=pred)

    @gluon.jit
    def _moe_step(a_desc, b_desc, bars, a_bufs, g_bufs, u_bufs, tg, tu, pg, pu, sg_prev, su_prev, acc, acc_up,
                  as_ptrs, bsg_ptr, bsu_ptr, kb, k_steps, row0, g_row, u_row, STAGES: gl.constexpr,
                  GATED: gl.constexpr, WG: gl.constexpr):
        """_step of the GEMM for the MoE's list: K block kb's products (gate, and up when gated) issued into tg
        (tu), then the block before's (pg, pu) waited for with kb's left outstanding, scaled and summed, and its
        stage refilled with block kb - 1 + STAGES."""
        s = kb % STAGES
        mbarrier.wait(bars.index(s), (kb // STAGES) & 1)
        a = a_bufs.index(s)
        tg = warpgroup_mma(a, g_bufs.index(s).permute((1, 0)), tg, use_acc=False, is_async=True)
        sa = gl.load(as_ptrs + kb)
        sg = sa * gl.load(bsg_ptr + kb)
        if GATED:
            tu = warpgroup_mma(a, u_bufs.index(s).permute((1, 0)), tu, use_acc=False, is_async=True)
            su = sa * gl.load(bsu_ptr + kb)
            pg, pu = warpgroup_mma_wait(num_outstanding=2, deps=(pg, pu))
            acc += pg * sg_prev[:, None]
            acc_up += pu * su_prev[:, None]
        else:
            su = sg
            pg = warpgroup_mma_wait(num_outstanding=1, deps=(pg, ))
            acc += pg * sg_prev[:, None]
        nxt = kb - 1 + STAGES
        if WG > 1:
            _cta_barrier()
        _moe_load(a_desc, b_desc, bars.index(nxt % STAGES), a_bufs.index(nxt % STAGES), g_bufs.index(nxt % STAGES),
                  u_bufs.index(nxt % STAGES), row0, g_row, u_row, nxt * 128, nxt < k_steps, GATED)
        return tg, tu, sg, su, acc, acc_up, pg, pu

    @gluon.jit
    def _moe_fp8_gluon_kernel(
        a_ptr, as_ptr,  # A fp8 [P, K] in the padded list's order (row p: pair sorted_token_ids[p]); scales [P, K/128]
        b_ptr, bs_ptr,  # B fp8 [E * NB, K] (each expert's NB rows: 2N gated, else N); scales [E, NB/128, K/128]
        c_ptr,  # SORTED_OUT: [P, N], rows in list order (padding rows included); else [M*topk, N], rows of pairs
        topk_weights_ptr,  # fp32 [M*topk]
        sorted_token_ids_ptr, expert_ids_ptr,  # int32 [P], [P / LIST_M]
        num_tokens_post_padded_ptr,  # int32 [1]: the list's length
        N, NB, num_valid_tokens, num_pid_m, P, B_ROWS,
        stride_am, stride_asm, stride_bn, stride_bse, stride_bsn, stride_cm,
        K: gl.constexpr, GATED: gl.constexpr, MUL_ROUTED_WEIGHT: gl.constexpr, SORTED_OUT: gl.constexpr,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
        LIST_M: gl.constexpr,  # the list's row block (BLOCK_M divides it): a block's expert is its list block's
        num_warps: gl.constexpr,
    ):
        """`fp8_moe._moe_fp8_ws_kernel`'s GEMM (the same operands, list, epilogue and result to rounding) on the
        loop of `_w8a8_block_gluon_kernel`: gated, the gate and up products of a K block both in flight. Row blocks
        past the list's end, or of padding only, return at once."""
        BLOCK_K: gl.constexpr = 128
        pid = gl.program_id(0)
        num_pid_n = gl.cdiv(N, BLOCK_N)
        width = GROUP_M * num_pid_n
        first_m = (pid // width) * GROUP_M
        size_m = gl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m
        row0 = pid_m * BLOCK_M
        total = gl.load(num_tokens_post_padded_ptr)  # a multiple of LIST_M
        if row0 >= total:
            return
        if gl.load(sorted_token_ids_ptr + row0) >= num_valid_tokens:  # padding closes each run: padding only
            return
        expert = gl.load(expert_ids_ptr + row0 // LIST_M)
        g_row = expert * NB + pid_n * BLOCK_N
        u_row = g_row + N

        smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
        a_desc = tma.make_tensor_descriptor(a_ptr, [P, K], [stride_am, 1], [BLOCK_M, BLOCK_K], smem)
        b_desc = tma.make_tensor_descriptor(b_ptr, [B_ROWS, K], [stride_bn, 1], [BLOCK_N, BLOCK_K], smem)
        a_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_M, BLOCK_K], smem)
        g_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_N, BLOCK_K], smem)
        if GATED:
            u_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_N, BLOCK_K], smem)
        else:
            u_bufs = g_bufs  # not read
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(bars.index(s), count=1)

        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK_N, 32])
        rows: gl.constexpr = gl.SliceLayout(1, mma)
        cols: gl.constexpr = gl.SliceLayout(0, mma)
        offs_r = row0 + gl.arange(0, BLOCK_M, layout=rows)  # [BLOCK_M] list positions
        as_ptrs = as_ptr + offs_r.to(gl.int64) * stride_asm
        bs_row = bs_ptr + expert.to(gl.int64) * stride_bse
        bsg_ptr = bs_row + (pid_n * BLOCK_N // BLOCK_K) * stride_bsn  # the tile's one scale a K block
        bsu_ptr = bs_row + ((pid_n * BLOCK_N + N) // BLOCK_K) * stride_bsn

        k_steps: gl.constexpr = K // BLOCK_K  # even (the launcher checks)
        for s in gl.static_range(STAGES):
            _moe_load(a_desc, b_desc, bars.index(s), a_bufs.index(s), g_bufs.index(s), u_bufs.index(s), row0, g_row,
                      u_row, s * BLOCK_K, s < k_steps, GATED)

        WG: gl.constexpr = num_warps // 4
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma)
        acc_up = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma)  # gated only
        g0 = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma)
        u0 = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma)
        # K block 0's products issued ahead of the loop (g1, u1: those in flight at each step's start)
        mbarrier.wait(bars.index(0), 0)
        g1 = warpgroup_mma(a_bufs.index(0), g_bufs.index(0).permute((1, 0)), g0, use_acc=False, is_async=True)
        sa = gl.load(as_ptrs)
        sg1 = sa * gl.load(bsg_ptr)
        if GATED:
            u1 = warpgroup_mma(a_bufs.index(0), u_bufs.index(0).permute((1, 0)), u0, use_acc=False, is_async=True)
            su1 = sa * gl.load(bsu_ptr)
        else:
            u1 = u0
            su1 = sg1
        for kk in range(1, k_steps - 1, 2):
            g0, u0, sg0, su0, acc, acc_up, g1, u1 = _moe_step(
                a_desc, b_desc, bars, a_bufs, g_bufs, u_bufs, g0, u0, g1, u1, sg1, su1, acc, acc_up, as_ptrs,
                bsg_ptr, bsu_ptr, kk, k_steps, row0, g_row, u_row, STAGES, GATED, WG)
            g1, u1, sg1, su1, acc, acc_up, g0, u0 = _moe_step(
                a_desc, b_desc, bars, a_bufs, g_bufs, u_bufs, g1, u1, g0, u0, sg0, su0, acc, acc_up, as_ptrs,
                bsg_ptr, bsu_ptr, kk + 1, k_steps, row0, g_row, u_row, STAGES, GATED, WG)
        g0, u0, sg0, su0, acc, acc_up, g1, u1 = _moe_step(
            a_desc, b_desc, bars, a_bufs, g_bufs, u_bufs, g0, u0, g1, u1, sg1, su1, acc, acc_up, as_ptrs, bsg_ptr,
            bsu_ptr, k_steps - 1, k_steps, row0, g_row, u_row, STAGES, GATED, WG)
        if GATED:
            g0, u0 = warpgroup_mma_wait(num_outstanding=0, deps=(g0, u0))
            acc += g0 * sg0[:, None]
            acc_up += u0 * su0[:, None]
            acc = acc / (1.0 + gl.exp(-acc)) * acc_up  # silu(gate) * up, in fp32
        else:
            g0 = warpgroup_mma_wait(num_outstanding=0, deps=(g0, ))
            acc += g0 * sg0[:, None]
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(s))

        offs_tok = gl.load(sorted_token_ids_ptr + offs_r)  # [BLOCK_M] pair indices; padding: num_valid_tokens
        tok_mask = offs_tok < num_valid_tokens
        offs_tok64 = offs_tok.to(gl.int64)
        offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=cols)
        if MUL_ROUTED_WEIGHT:
            acc = acc * gl.load(topk_weights_ptr + offs_tok64, mask=tok_mask, other=0.0)[:, None]
        if SORTED_OUT:  # every row of the block, so GEMM 2's quantization reads no uninitialized row
            c_ptrs = c_ptr + offs_r.to(gl.int64)[:, None] * stride_cm + offs_n[None, :]
            c_mask = (offs_r < P)[:, None] & (offs_n < N)[None, :]
        else:
            c_ptrs = c_ptr + offs_tok64[:, None] * stride_cm + offs_n[None, :]
            c_mask = tok_mask[:, None] & (offs_n < N)[None, :]
        gl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


DEFAULT_CONFIG = dict(BLOCK_M=64, BLOCK_N=128, GROUP_M=8, STAGES=4, num_warps=4)


def applies(cfg: dict, k: int, device: torch.device) -> bool:
    """Whether a block config can run on the Gluon loop (a table entry's "WS": "gluon"): a Hopper GPU, 64 rows a
    warp group on 4 or 8 warps, K blocks of 128 and an even number of them."""
    return (available(device) and cfg.get("num_warps") in (4, 8) and cfg.get("BLOCK_M") == 16 * cfg["num_warps"]
            and cfg.get("BLOCK_K", GROUP_K) == GROUP_K and k % GROUP_K == 0 and (k // GROUP_K) % 2 == 0)


def w8a8_block_fp8_matmul_gluon(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
                                block_size: tuple[int, int] = (128, 128), out_dtype: torch.dtype = torch.bfloat16,
                                config: dict | None = None) -> torch.Tensor:
    """`fp8_gemm.w8a8_block_fp8_matmul` on the Gluon kernel (same arguments and result, to fp32 rounding: each K
    block's product is summed in the same order). config: BLOCK_N, GROUP_M, STAGES (BLOCK_M 64 and
    num_warps 4: one warp group a program)."""
    bn, bk = block_size
    m, n, k = fp8_gemm._check_fp8_operands(xq, w)
    if bk != GROUP_K or k % bk:
        raise ValueError(f"the Gluon GEMM takes K blocks of {GROUP_K} (K={k}, block {bk})")
    fp8_gemm._check_scale(xs, (m, k // bk), "xs")
    fp8_gemm._check_scale(ws, (triton.cdiv(n, bn), k // bk), "ws")
    device = fp8_gemm.check_device(xq, xs, w, ws, min_capability=(9, 0), need="the Gluon GEMM")
    if not available(device):
        raise ValueError(f"the Gluon GEMM needs a Hopper GPU in compiled mode, not {device}")
    if (k // bk) % 2:
        raise ValueError(f"the Gluon GEMM takes an even number of K blocks, got {k // bk}")
    if any(t.data_ptr() % 16 or t.stride(0) % 16 for t in (xq, w)):
        raise ValueError("the Gluon GEMM's operands need 16-byte aligned rows (TMA)")
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    if cfg["BLOCK_M"] != 16 * cfg["num_warps"] or cfg["num_warps"] not in (4, 8):
        raise ValueError(f"the Gluon GEMM runs 64 rows a warp group (4 or 8 warps), got {cfg}")
    out = torch.empty((m, n), dtype=out_dtype, device=device)
    if m == 0 or n == 0:
        return out
    triton.set_allocator(fp8_gemm.tma_scratch(device))
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _w8a8_block_gluon_kernel[grid](
        xq, xs, w, ws, out, m, n, k, xq.stride(0), xs.stride(0), xs.stride(1), w.stride(0), ws.stride(0),
        ws.stride(1), out.stride(0), GROUP_N=bn, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        GROUP_M=cfg["GROUP_M"], STAGES=cfg["STAGES"], num_warps=cfg["num_warps"])
    return out
