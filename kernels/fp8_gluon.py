"""Block-FP8 W8A8 GEMM in Gluon for Hopper: the K loop with one tensor-core product always in flight.

out[m, n] = sum over K blocks kb of (xq[m, kb] . w[n, kb]) * xs[m, kb] * ws[n // 128, kb], as
`fp8_gemm.w8a8_block_fp8_matmul` computes it (fp32 accumulation, each 128-deep product scaled by its two scales).

Why a second kernel: in the Triton kernel each K block's `tl.dot` must finish before its scaled sum, and the compiler
waits on every dot right after issuing it (`warp_group_dot_wait pendings = 0`), so the tensor cores idle while a
thread's 64 FMAs of the sum run. Here the loop is written at the level of the warp-group MMA (`_k_loop`): K block
kb's product is issued asynchronously into one of two register tiles, then the product of kb - 1 (the other tile) is
waited for with kb's left outstanding, scaled and added while kb's runs, and its shared-memory stage refilled by TMA.
UNROLL blocks a loop step (2, 4 or 6, dividing the K blocks): the step's last product is waited for in full, since
ptxas serializes every MMA of a loop that copies an accumulator in flight across its back edge (C7515), so
(UNROLL - 1) / UNROLL of the sums overlap an MMA. Two product tiles and the accumulator (and, for the MoE's gate and
up, twice that) are held a thread: 3 x BLOCK_N / 2 registers at 64 rows a warp group.

`_w8a8_block_ws_kernel` (config SPECIALIZE) is the other structure, DeepGEMM's: 128-row tiles, a producer warp
issuing the TMA loads and two consumer warp groups (Gluon's `warp_specialize`), each with one product tile that it
waits for in full before scaling and summing, while the other consumer's MMA runs; stages handed over through
ready / empty barriers. 64 + 64 registers a thread at 128 columns.

Operands through TMA descriptors made in the kernel (`triton.set_allocator`), rows past M or N read as zeros. The
number of K blocks must be even. Gluon has no interpreter: on the CPU `w8a8_block_fp8_matmul_gluon` raises, and the
tests compile the kernels for sm_90 there and compare them with the Triton kernels on the GPU.
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
            and fp8_gemm._cuda_device_info(fp8_gemm._cuda_index(device))[1][0] == 9)  # (cached a device)


if HAVE_GLUON:
    @gluon.jit
    def _load(a_desc, b_desc, bars, a_bufs, g_bufs, u_bufs, kb, k_steps, row0, g_row, u_row,
              STAGES: gl.constexpr, GATED: gl.constexpr):
        """K block kb of A's row block and of B's gate (or only) rows, and up rows when gated, into stage
        kb % STAGES, counted on its barrier (nothing past the last block)."""
        s = kb % STAGES
        bar = bars.index(s)
        pred = kb < k_steps
        nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes * (2 if GATED else 1)
        mbarrier.expect(bar, nbytes, pred=pred)
        _tma_load(a_desc, [row0, kb * 128], bar, a_bufs.index(s), pred=pred)
        _tma_load(b_desc, [g_row, kb * 128], bar, g_bufs.index(s), pred=pred)
        if GATED:
            _tma_load(b_desc, [u_row, kb * 128], bar, u_bufs.index(s), pred=pred)

    @gluon.jit
    def _issue(bars, a_bufs, g_bufs, u_bufs, tg, tu, kb, STAGES: gl.constexpr, GATED: gl.constexpr):
        """K block kb's products (gate, and up when gated) issued asynchronously into tg's (tu's) registers, whose
        last values were summed: use_acc=False overwrites them."""
        s = kb % STAGES
        mbarrier.wait(bars.index(s), (kb // STAGES) & 1)
        a = a_bufs.index(s)
        tg = warpgroup_mma(a, g_bufs.index(s).permute((1, 0)), tg, use_acc=False, is_async=True)
        if GATED:
            tu = warpgroup_mma(a, u_bufs.index(s).permute((1, 0)), tu, use_acc=False, is_async=True)
        return tg, tu

    @gluon.jit
    def _scales(as_ptrs, a_mask, bsg_ptr, bsu_ptr, kb, stride_ask, stride_bsk, GATED: gl.constexpr):
        """K block kb's scale a row: A's row scale times the column tile's one weight scale (gate's, up's)."""
        sa = gl.load(as_ptrs + kb * stride_ask, mask=a_mask, other=0.0)
        sg = sa * gl.load(bsg_ptr + kb * stride_bsk)
        if GATED:
            su = sa * gl.load(bsu_ptr + kb * stride_bsk)
        else:
            su = sg
        return sg, su

    @gluon.jit
    def _retire(tg, tu, sg, su, acc, acc_up, PENDING: gl.constexpr, GATED: gl.constexpr):
        """The products issued before the last PENDING issues waited for, scaled and added."""
        if GATED:
            tg, tu = warpgroup_mma_wait(num_outstanding=2 * PENDING, deps=(tg, tu))
            acc += tg * sg[:, None]
            acc_up += tu * su[:, None]
        else:
            tg = warpgroup_mma_wait(num_outstanding=PENDING, deps=(tg, ))
            acc += tg * sg[:, None]
        return tg, tu, acc, acc_up

    @gluon.jit
    def _k_loop(a_desc, b_desc, as_ptrs, a_mask, bsg_ptr, bsu_ptr, stride_ask, stride_bsk, k_steps, row0, g_row,
                u_row, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, UNROLL: gl.constexpr,
                GATED: gl.constexpr, num_warps: gl.constexpr):
        """sum over K blocks of A's rows . B's rows, each block's product scaled by its row scales (gate; and up
        when gated), in fp32 in the warp-group MMA's layout. UNROLL blocks a loop step (dividing k_steps), their
        products alternating between two register tiles: each issued while the one before it is still running,
        which is then waited for (one issue left outstanding), scaled and summed, and its stage refilled. The
        step's last product is waited for in full, so no MMA is in flight across the loop's back edge (a register
        copy of an accumulator in flight there makes ptxas serialize every MMA of the loop)."""
        smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
        a_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_M, 128], smem)
        g_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_N, 128], smem)
        if GATED:
            u_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_N, 128], smem)
        else:
            u_bufs = g_bufs  # not read
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(bars.index(s), count=1)
        for s in gl.static_range(STAGES):  # every stage filled; each refilled once the products reading it are done
            _load(a_desc, b_desc, bars, a_bufs, g_bufs, u_bufs, s, k_steps, row0, g_row, u_row, STAGES, GATED)

        # one warp group along M per 64 rows, the instruction N the whole tile (fp8: K 32 an instruction)
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK_N, 32])
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma)
        acc_up = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma)  # gated only
        g0 = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma)
        u0 = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma)
        g1 = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma)
        u1 = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma)
        for kk in range(0, k_steps, UNROLL):
            g0, u0 = _issue(bars, a_bufs, g_bufs, u_bufs, g0, u0, kk, STAGES, GATED)
            sg0, su0 = _scales(as_ptrs, a_mask, bsg_ptr, bsu_ptr, kk, stride_ask, stride_bsk, GATED)
            for j in gl.static_range(1, UNROLL):
                if j % 2 == 1:
                    g1, u1 = _issue(bars, a_bufs, g_bufs, u_bufs, g1, u1, kk + j, STAGES, GATED)
                    sg1, su1 = _scales(as_ptrs, a_mask, bsg_ptr, bsu_ptr, kk + j, stride_ask, stride_bsk, GATED)
                    g0, u0, acc, acc_up = _retire(g0, u0, sg0, su0, acc, acc_up, 1, GATED)
                else:
                    g0, u0 = _issue(bars, a_bufs, g_bufs, u_bufs, g0, u0, kk + j, STAGES, GATED)
                    sg0, su0 = _scales(as_ptrs, a_mask, bsg_ptr, bsu_ptr, kk + j, stride_ask, stride_bsk, GATED)
                    g1, u1, acc, acc_up = _retire(g1, u1, sg1, su1, acc, acc_up, 1, GATED)
                if num_warps > 4:  # every warp group past its wait before the stage is overwritten
                    _cta_barrier()
                _load(a_desc, b_desc, bars, a_bufs, g_bufs, u_bufs, kk + j - 1 + STAGES, k_steps, row0, g_row, u_row,
                      STAGES, GATED)
            g1, u1, acc, acc_up = _retire(g1, u1, sg1, su1, acc, acc_up, 0, GATED)  # UNROLL even: the last in g1
            if num_warps > 4:
                _cta_barrier()
            _load(a_desc, b_desc, bars, a_bufs, g_bufs, u_bufs, kk + UNROLL - 1 + STAGES, k_steps, row0, g_row,
                  u_row, STAGES, GATED)
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(s))
        return acc, acc_up

    @gluon.jit
    def _tile_pid(pid, num_pid_m, num_pid_n, GROUP_M: gl.constexpr):
        """(row block, column block) of program pid: GROUP_M row blocks share each column sweep (their B tiles stay
        in L2)."""
        width = GROUP_M * num_pid_n
        first_m = (pid // width) * GROUP_M
        size_m = gl.minimum(num_pid_m - first_m, GROUP_M)
        return first_m + (pid % width) % size_m, (pid % width) // size_m

    @gluon.jit
    def _w8a8_block_gluon_kernel(
        a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr,  # A [M, K] fp8, A scales [M, K/128], B [N, K] fp8, B scales, C [M, N]
        M, N, K,
        stride_am, stride_asm, stride_ask, stride_bn, stride_bsn, stride_bsk, stride_cm,
        GROUP_N: gl.constexpr,  # the weight's scale block along N (BLOCK_N divides it)
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
        UNROLL: gl.constexpr, num_warps: gl.constexpr,
    ):
        pid_m, pid_n = _tile_pid(gl.program_id(0), gl.cdiv(M, BLOCK_M), gl.cdiv(N, BLOCK_N), GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
        a_desc = tma.make_tensor_descriptor(a_ptr, [M, K], [stride_am, 1], [BLOCK_M, 128], smem)
        b_desc = tma.make_tensor_descriptor(b_ptr, [N, K], [stride_bn, 1], [BLOCK_N, 128], smem)
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK_N, 32])
        offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma))
        offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
        m_mask = offs_m < M
        bs_tile = bs_ptr + (off_n // GROUP_N) * stride_bsn  # the column tile's scale block
        acc, acc_up = _k_loop(a_desc, b_desc, as_ptr + offs_m.to(gl.int64) * stride_asm, m_mask, bs_tile, bs_tile,
                              stride_ask, stride_bsk, gl.cdiv(K, 128), off_m, off_n, off_n, BLOCK_M, BLOCK_N, STAGES,
                              UNROLL, False, num_warps)
        c_ptrs = c_ptr + offs_m.to(gl.int64)[:, None] * stride_cm + offs_n[None, :]
        gl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & (offs_n < N)[None, :])

    @gluon.jit
    def _moe_fp8_gluon_kernel(
        a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, topk_weights_ptr,  # as fp8_moe._moe_fp8_ws_kernel's (K blocks of 128)
        sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,  # expert_ids: one a block of LIST_M rows
        N, NB, num_valid_tokens, num_pid_m, P, B_ROWS,
        stride_am, stride_asm, stride_bn, stride_bse, stride_bsn, stride_cm,
        K: gl.constexpr, GATED: gl.constexpr, MUL_ROUTED_WEIGHT: gl.constexpr, SORTED_OUT: gl.constexpr,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
        UNROLL: gl.constexpr,
        LIST_M: gl.constexpr,  # the list's row block (BLOCK_M divides it): a block's expert is its list block's
        num_warps: gl.constexpr,
    ):
        """`fp8_moe._moe_fp8_ws_kernel`'s GEMM (the same operands, list, epilogue and result to rounding) on
        `_k_loop`: gated, the gate and up products of a K block in flight together. Row blocks past the list's end,
        or of padding only, return at once."""
        pid_m, pid_n = _tile_pid(gl.program_id(0), num_pid_m, gl.cdiv(N, BLOCK_N), GROUP_M)
        row0 = pid_m * BLOCK_M
        if row0 >= gl.load(num_tokens_post_padded_ptr):  # the list's length, a multiple of LIST_M
            return
        if gl.load(sorted_token_ids_ptr + row0) >= num_valid_tokens:  # padding closes each run: padding only
            return
        expert = gl.load(expert_ids_ptr + row0 // LIST_M)
        g_row = expert * NB + pid_n * BLOCK_N
        smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
        a_desc = tma.make_tensor_descriptor(a_ptr, [P, K], [stride_am, 1], [BLOCK_M, 128], smem)
        b_desc = tma.make_tensor_descriptor(b_ptr, [B_ROWS, K], [stride_bn, 1], [BLOCK_N, 128], smem)
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK_N, 32])
        offs_r = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma))  # [BLOCK_M] list positions
        bs_row = bs_ptr + expert.to(gl.int64) * stride_bse
        acc, acc_up = _k_loop(a_desc, b_desc, as_ptr + offs_r.to(gl.int64) * stride_asm, offs_r < P,
                              bs_row + (pid_n * BLOCK_N // 128) * stride_bsn,
                              bs_row + ((pid_n * BLOCK_N + N) // 128) * stride_bsn, 1, 1, K // 128, row0, g_row,
                              g_row + N, BLOCK_M, BLOCK_N, STAGES, UNROLL, GATED, num_warps)
        if GATED:
            acc = acc / (1.0 + gl.exp(-acc)) * acc_up  # silu(gate) * up, in fp32

        offs_tok = gl.load(sorted_token_ids_ptr + offs_r)  # [BLOCK_M] pair indices; padding: num_valid_tokens
        tok_mask = offs_tok < num_valid_tokens
        offs_tok64 = offs_tok.to(gl.int64)
        offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
        if MUL_ROUTED_WEIGHT:
            acc = acc * gl.load(topk_weights_ptr + offs_tok64, mask=tok_mask, other=0.0)[:, None]
        if SORTED_OUT:  # every row of the block, so GEMM 2's quantization reads no uninitialized row
            c_ptrs = c_ptr + offs_r.to(gl.int64)[:, None] * stride_cm + offs_n[None, :]
            c_mask = (offs_r < P)[:, None] & (offs_n < N)[None, :]
        else:
            c_ptrs = c_ptr + offs_tok64[:, None] * stride_cm + offs_n[None, :]
            c_mask = tok_mask[:, None] & (offs_n < N)[None, :]
        gl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)

    @gluon.jit
    def _ws_producer(a_desc, b_desc, ready, empty, a_bufs, b_bufs, off_m, off_n, k_steps, STAGES: gl.constexpr):
        """The producer warp: K block kb's two 64-row A boxes and B tile into stage kb % STAGES once both consumers
        have released it (empty), counted on ready."""
        for kb in range(k_steps):
            s = kb % STAGES
            mbarrier.wait(empty.index(s), ((kb // STAGES) & 1) ^ 1)  # a fresh barrier passes phase 1 at once
            bar = ready.index(s)
            mbarrier.expect(bar, 2 * a_desc.block_type.nbytes + b_desc.block_type.nbytes)
            _tma_load(a_desc, [off_m, kb * 128], bar, a_bufs.index(2 * s))
            _tma_load(a_desc, [off_m + 64, kb * 128], bar, a_bufs.index(2 * s + 1))
            _tma_load(b_desc, [off_n, kb * 128], bar, b_bufs.index(s))

    @gluon.jit
    def _ws_consumer(ready, empty, a_bufs, b_bufs, as_ptr, bs_tile, c_ptr, M, N, off_m, off_n, k_steps, stride_asm,
                     stride_ask, stride_bsk, stride_cm, C: gl.constexpr, BLOCK_N: gl.constexpr,
                     STAGES: gl.constexpr):
        """Consumer warp group C (4 warps): rows off_m + 64 C .. + 63 of the tile. Each K block's product waited for
        in full, the stage released, then scaled and summed: the other consumer's MMA runs meanwhile."""
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, BLOCK_N, 32])
        offs_m = off_m + 64 * C + gl.arange(0, 64, layout=gl.SliceLayout(1, mma))
        m_mask = offs_m < M
        as_ptrs = as_ptr + offs_m.to(gl.int64) * stride_asm
        acc = gl.zeros([64, BLOCK_N], gl.float32, mma)
        t = gl.zeros([64, BLOCK_N], gl.float32, mma)
        for kb in range(k_steps):
            s = kb % STAGES
            sa = gl.load(as_ptrs + kb * stride_ask, mask=m_mask, other=0.0) * gl.load(bs_tile + kb * stride_bsk)
            mbarrier.wait(ready.index(s), (kb // STAGES) & 1)
            t = warpgroup_mma(a_bufs.index(2 * s + C), b_bufs.index(s).permute((1, 0)), t, use_acc=False,
                              is_async=True)
            t = warpgroup_mma_wait(num_outstanding=0, deps=(t, ))
            mbarrier.arrive(empty.index(s), count=1)
            acc += t * sa[:, None]
        offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
        c_ptrs = c_ptr + offs_m.to(gl.int64)[:, None] * stride_cm + offs_n[None, :]
        gl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & (offs_n < N)[None, :])

    @gluon.jit
    def _w8a8_block_ws_kernel(
        a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K,
        stride_am, stride_asm, stride_ask, stride_bn, stride_bsn, stride_bsk, stride_cm,
        GROUP_N: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        """The same GEMM as _w8a8_block_gluon_kernel on 128-row tiles, warp-specialized as DeepGEMM runs block FP8:
        a producer warp issues the TMA loads, two consumer warp groups of 64 rows each take one product tile a K
        block (acc and product: BLOCK_N registers a thread) and wait for it in full, so that while one scales and
        sums, the other's MMA has the tensor cores. Stages are released through `empty` barriers (both consumers)
        and filled through `ready` ones. The default partition (num_warps = 4) is consumer 0."""
        pid_m, pid_n = _tile_pid(gl.program_id(0), gl.cdiv(M, 128), gl.cdiv(N, BLOCK_N), GROUP_M)
        off_m = pid_m * 128
        off_n = pid_n * BLOCK_N
        smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
        a_desc = tma.make_tensor_descriptor(a_ptr, [M, K], [stride_am, 1], [64, 128], smem)
        b_desc = tma.make_tensor_descriptor(b_ptr, [N, K], [stride_bn, 1], [BLOCK_N, 128], smem)
        a_bufs = gl.allocate_shared_memory(gl.float8e4nv, [2 * STAGES, 64, 128], smem)
        b_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_N, 128], smem)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=2)  # one arrival a consumer
        k_steps = gl.cdiv(K, 128)
        bs_tile = bs_ptr + (off_n // GROUP_N) * stride_bsn  # the column tile's scale block
        gl.warp_specialize([(_ws_consumer, (ready, empty, a_bufs, b_bufs, as_ptr, bs_tile, c_ptr, M, N, off_m, off_n,
                                            k_steps, stride_asm, stride_ask, stride_bsk, stride_cm, 0, BLOCK_N,
                                            STAGES)),
                            (_ws_consumer, (ready, empty, a_bufs, b_bufs, as_ptr, bs_tile, c_ptr, M, N, off_m, off_n,
                                            k_steps, stride_asm, stride_ask, stride_bsk, stride_cm, 1, BLOCK_N,
                                            STAGES)),
                            (_ws_producer, (a_desc, b_desc, ready, empty, a_bufs, b_bufs, off_m, off_n, k_steps,
                                            STAGES))],
                           [4, 1], [232, 24])


DEFAULT_CONFIG = dict(BLOCK_M=64, BLOCK_N=128, GROUP_M=8, STAGES=4, num_warps=4)


def unroll(k_steps: int, asked: int | None = None) -> int:
    """K blocks a loop step: the asked number where it divides k_steps (even), else the largest of 6, 4, 2 that
    does."""
    if asked and k_steps % asked == 0 and asked % 2 == 0:
        return asked
    return next(u for u in (6, 4, 2) if k_steps % u == 0)


def applies(cfg: dict, k: int, device: torch.device) -> bool:
    """Whether a block config can run on the Gluon loop (a table entry's "WS": "gluon"): a Hopper GPU, 64 rows a
    warp group on 4 or 8 warps, K blocks of 128 and an even number of them."""
    return (available(device) and cfg.get("num_warps") in (4, 8) and cfg.get("BLOCK_M") == 16 * cfg["num_warps"]
            and cfg.get("BLOCK_K", GROUP_K) == GROUP_K and k % GROUP_K == 0 and (k // GROUP_K) % 2 == 0)


def w8a8_block_fp8_matmul_gluon(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
                                block_size: tuple[int, int] = (128, 128), out_dtype: torch.dtype = torch.bfloat16,
                                config: dict | None = None) -> torch.Tensor:
    """`fp8_gemm.w8a8_block_fp8_matmul` on the Gluon kernel (same arguments and result, to fp32 rounding: each K
    block's product is summed in the same order). config: BLOCK_M (64 a warp group) and num_warps (4 or 8),
    BLOCK_N, GROUP_M, STAGES, UNROLL; or SPECIALIZE (the warp-specialized kernel on 128-row tiles) with BLOCK_N,
    GROUP_M, STAGES."""
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
    if cfg.get("SPECIALIZE"):  # warp-specialized: 128-row tiles, a producer warp and two consumer warp groups
        cfg.update(BLOCK_M=128, num_warps=4)
        if bn % cfg["BLOCK_N"]:
            raise ValueError(f"BLOCK_N={cfg['BLOCK_N']} must divide the weight's scale block {bn}")
    elif cfg["BLOCK_M"] != 16 * cfg["num_warps"] or cfg["num_warps"] not in (4, 8):
        raise ValueError(f"the Gluon GEMM runs 64 rows a warp group (4 or 8 warps), got {cfg}")
    out = torch.empty((m, n), dtype=out_dtype, device=device)
    if m == 0 or n == 0:
        return out
    triton.set_allocator(fp8_gemm.tma_scratch(device))
    if cfg.get("SPECIALIZE"):
        _w8a8_block_ws_kernel[(triton.cdiv(m, 128) * triton.cdiv(n, cfg["BLOCK_N"]),)](
            xq, xs, w, ws, out, m, n, k, xq.stride(0), xs.stride(0), xs.stride(1), w.stride(0), ws.stride(0),
            ws.stride(1), out.stride(0), GROUP_N=bn, BLOCK_N=cfg["BLOCK_N"], GROUP_M=cfg["GROUP_M"],
            STAGES=cfg["STAGES"], num_warps=4)
        return out
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _w8a8_block_gluon_kernel[grid](
        xq, xs, w, ws, out, m, n, k, xq.stride(0), xs.stride(0), xs.stride(1), w.stride(0), ws.stride(0),
        ws.stride(1), out.stride(0), GROUP_N=bn, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        GROUP_M=cfg["GROUP_M"], STAGES=cfg["STAGES"], UNROLL=unroll(k // bk, cfg.get("UNROLL")),
        num_warps=cfg["num_warps"])
    return out
