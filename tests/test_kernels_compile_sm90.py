"""Every variant of the W4A16, FP8 and GGUF MoE, router and decode attention kernels the launchers can pick compiles
for an H100/H200 (sm_90), on any machine: triton.compile for the CUDA target needs no GPU (ptxas ships with the
triton wheel). The CPU tests run the same kernels under Triton's interpreter, which accepts code the compiler
refuses (a static_assert on a value that is not a compile-time constant, a name one branch defines and a loop
re-types), so this is the check that such code fails here rather than on the first GPU it meets. One subprocess
without TRITON_INTERPRET compiles them all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

W4 = {"a_ptr": "*bf16", "b_ptr": "*i32", "z_ptr": "*u8", "s_ptr": "*fp16", "c_ptr": "*bf16",
      "topk_weights_ptr": "*fp32", "sorted_token_ids_ptr": "*i32", "expert_ids_ptr": "*i32",
      "num_tokens_post_padded_ptr": "*i32", "part_ptr": "*fp32", "count_ptr": "*i32"}
FP8 = {"a_ptr": "*fp8e4nv", "as_ptr": "*fp32", "b_ptr": "*fp8e4nv", "bs_ptr": "*fp32", "c_ptr": "*bf16",
       "topk_weights_ptr": "*fp32", "sorted_token_ids_ptr": "*i32", "expert_ids_ptr": "*i32",
       "num_tokens_post_padded_ptr": "*i32", "part_ptr": "*fp32", "count_ptr": "*i32", "cs_ptr": "*fp32",
       "q_eps": "fp32"}
GGUF = {"x_ptr": "*bf16", "w_ptr": "*u8", "u_ptr": "*u8", "c_ptr": "*bf16", "topk_weights_ptr": "*fp32",
        "sorted_token_ids_ptr": "*i32", "expert_ids_ptr": "*i64", "num_tokens_post_padded_ptr": "*i32",
        "part_ptr": "*fp32", "count_ptr": "*i32"}
W4_ONE = {"x_ptr": "*bf16", "b1_ptr": "*i32", "z1_ptr": "*u8", "s1_ptr": "*fp16", "b2_ptr": "*i32", "z2_ptr": "*u8",
          "s2_ptr": "*fp16", "inter_ptr": "*bf16", "out_ptr": "*bf16", "topk_weights_ptr": "*fp32", "ids_ptr": "*i64",
          "part1_ptr": "*fp32", "count1_ptr": "*i32", "part2_ptr": "*fp32", "count2_ptr": "*i32", "ready_ptr": "*i32"}
ROUTER = {"h_ptr": "*bf16", "gate_ptr": "*fp32", "bias_ptr": "*fp32", "logits_ptr": "*fp32", "idx_ptr": "*i64",
          "w_ptr": "*fp32", "count_ptr": "*i32"}


def w4_variants() -> list[tuple]:
    out = []
    for gated, dense, split in ((True, False, 1), (False, False, 1), (False, True, 1), (False, True, 4)):
        base = dict(K=3072, GROUP=128, A_ROW_DIV=8 if gated else 1, GATED=gated, MUL_ROUTED_WEIGHT=not (gated or dense),
                    OUT_MANT=0, DENSE=dense, SPLIT_K=split)
        for pf in (1, 2):
            for exact in (False, True):
                out.append(("_moe_gemv", {**base, "BLOCK_M": 2, "BLOCK_N": 16, "PREFETCH": pf, "EXACT": exact}, 2))
            out.append(("_moe_mma", {**base, "BLOCK_M": 16, "BLOCK_N": 64, "MAGIC": 0x4300, "UPCAST": False,
                                     "PREFETCH": 1 if gated else pf}, 4))
        out.append(("_moe_dot", {**base, "BLOCK_M": 32, "BLOCK_N": 64, "GROUP_M": 8, "UPCAST": False,
                                 "F32_DOT": False}, 4))
        # one dot of K = G a group (the nibble places joined), on two warp groups
        out.append(("_moe_dot", {**base, "BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8, "UPCAST": False,
                                 "F32_DOT": False, "WIDE": 1}, 8))
        out.append(("_moe_dot", {**base, "BLOCK_M": 32, "BLOCK_N": 64, "GROUP_M": 8, "UPCAST": False,
                                 "F32_DOT": False, "WIDE": 2, "MAGIC": 0x4300}, 4))
    for gated in (True, False):  # decode's unsorted pairs, GEMM 2 adding the slots
        base = dict(K=3072, GROUP=128, A_ROW_DIV=8 if gated else 1, GATED=gated, MUL_ROUTED_WEIGHT=not gated,
                    OUT_MANT=0, PAIRS=True, SLOT_SUM=0 if gated else 8, NUM_EXPERTS=256)
        out.append(("_moe_gemv", {**base, "BLOCK_M": 1, "BLOCK_N": 16, "PREFETCH": 2, "EXACT": False}, 2))
        # the tensor cores on the pairs, K split, two groups an iteration
        out.append(("_moe_mma", {**base, "BLOCK_M": 16, "BLOCK_N": 128, "MAGIC": 0x4300, "UPCAST": False,
                                 "PREFETCH": 1, "SPLIT_K": 2, "GSTEP": 2}, 4))
    return out


SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from sass_loop import compile_for
from quantkit.kernels import fp8_gemm, fp8_gluon, fp8_moe, fused_ops, gguf_gemm, gguf_gemv_q8, w4a16_moe
jobs = json.loads(sys.argv[2])
for module, kernel, consts, types, warps in jobs:
    fn = getattr({"w4a16_moe": w4a16_moe, "fused_ops": fused_ops, "fp8_moe": fp8_moe, "gguf_gemm": gguf_gemm,
                  "fp8_gemm": fp8_gemm, "gguf_gemv_q8": gguf_gemv_q8, "fp8_gluon": fp8_gluon}[module], kernel)
    try:
        k = compile_for(fn, consts, types, {"N", "stride_am", "stride_bn", "stride_cm", "stride_xm", "stride_we",
                                            "stride_ue", "stride_asm", "stride_b1n", "stride_b2n", "stride_im",
                                            "stride_om"} & set(fn.arg_names),
                        num_warps=warps)
        # the warp-specialized regions the compiler made (a K loop asked for one that it could not split gets none)
        # programmatic dependent launch: the waits, the L2 prefetches and the global loads issued before the wait
        ptx = k.asm["ptx"]
        wait = ptx.find("griddepcontrol.wait")
        pdl = (ptx.count("griddepcontrol.wait"), ptx.count("prefetch.global.L2"),
               ptx[:wait].count("ld.global") if wait >= 0 else -1, ptx.count("griddepcontrol.launch_dependents"))
        # loads software-pipelined through shared memory (asynchronous copies)
        copies = ptx.count("cp.async.cg.shared") + ptx.count("cp.async.ca.shared")
        print("ok", kernel, json.dumps(consts), "pdl=%d,%d,%d,%d" % pdl, "async=%d" % copies,
              "v4=%d" % (ptx.count("ld.global.v4") + ptx.count("ld.global.nc.v4")),
              "wgmma=%d,%d,%d" % (ptx.count("wgmma.mma_async"), ptx.count("wgmma.wait_group.sync.aligned 1;"),
                                  ptx.count("wgmma.wait_group.sync.aligned 0;")),
              k.asm["ttgir"].count("ttg.warp_specialize("), flush=True)
    except Exception as e:
        print("FAILED", kernel, json.dumps(consts), type(e).__name__, str(e).splitlines()[-1][:200], flush=True)
"""


def compile_all(jobs: list[tuple]) -> list[str]:
    """SCRIPT's line for each job, every one compiled ("ok ...")."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT / "scripts"), json.dumps(jobs)],
                          capture_output=True, text=True, env=env, timeout=1200)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == len(jobs) and all(line.startswith("ok ") for line in lines), \
        (lines, proc.stderr[-3000:])
    return lines


@pytest.mark.slow  # a few seconds per variant
def test_w4a16_and_router_kernels_compile_for_sm90():
    jobs = [("w4a16_moe", k, c, W4, w) for k, c, w in w4_variants()]
    for split, gstep, sleep in ((2, 2, True), (1, 1, False)):  # decode's two GEMMs in one launch
        jobs.append(("w4a16_moe", "_moe_gemv_one_launch", dict(H=3072, I=1536, GROUP=128, TOPK=8, NUM_EXPERTS=256,
                                                               BLOCK_N1=32, BLOCK_N2=64, SPLIT1=split, SPLIT2=split,
                                                               GSTEP1=gstep, GSTEP2=gstep, STAGES=2, OUT_MANT=0,
                                                               READY_STRIDE=32, SLEEP=sleep), W4_ONE, 2))
    jobs.append(("w4a16_moe", "_moe_gemv_one_launch", dict(H=3072, I=1536, GROUP=128, TOPK=8, NUM_EXPERTS=256,
                                                           BLOCK_N1=16, BLOCK_N2=32, SPLIT1=1, SPLIT2=3, GSTEP1=2,
                                                           GSTEP2=2, STAGES=3, OUT_MANT=0, READY_STRIDE=32,
                                                           SLEEP=False, PRELOAD=True), W4_ONE, 2))  # GEMM 2 preloads
    jobs.append(("w4a16_moe", "_kmajor_dequant", dict(GROUP=128, BLOCK_N=32, OUT_MANT=0),
                 {"b_ptr": "*i32", "z_ptr": "*u8", "s_ptr": "*fp16", "out_ptr": "*bf16"}, 4))
    for gemv in (True, False):
        blocks = dict(BLOCK_N=1, BLOCK_EG=2, BLOCK_H=4096) if gemv else dict(BLOCK_N=16, BLOCK_EG=16, BLOCK_H=128)
        jobs.append(("fused_ops", "_router", dict(H=3072, TOP_K=8, BLOCK_E=256, BLOCK_K=8, IEEE=True, GEMV=gemv,
                                                  **blocks), ROUTER, 4))
    for quant in (True, False):  # the post-attention add + RMSNorm inside the single-token router
        jobs.append(("fused_ops", "_router", dict(H=3072, TOP_K=8, BLOCK_E=256, BLOCK_K=8, IEEE=True, GEMV=True,
                                                  BLOCK_N=1, BLOCK_EG=2, BLOCK_H=4096, NORM=True, QUANT=quant,
                                                  GROUP=128, OUT_MANT=7, UPCAST=False),
                     {**ROUTER, "r_ptr": "*bf16", "nw_ptr": "*bf16", "s_ptr": "*bf16", "y_ptr": "*bf16",
                      "q_ptr": "*fp8e4nv", "qs_ptr": "*fp32", "eps": "fp32", "q_eps": "fp32"}, 8))
    for gated, pairs in ((True, False), (False, False), (True, True), (False, True)):  # FP8 MoE, block scales
        consts = dict(K=3072, A_ROW_DIV=8 if gated else 1, GATED=gated, MUL_ROUTED_WEIGHT=not gated,
                      BLOCK_SCALED=True, GROUP_N=128, GROUP_K=128, EVEN_K=True, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128,
                      GROUP_M=1, UPCAST=False, OUT_MANT=0, B_SCALE_TILE=True)
        if pairs:
            consts.update(PAIRS=True, SLOT_SUM=0 if gated else 8, NUM_EXPERTS=256, QUANT_A=not gated)
        a_type = "*bf16" if pairs and not gated else "*fp8e4nv"  # QUANT_A: the 16-bit intermediate
        jobs.append(("fp8_moe", "_fused_moe_fp8", consts, {**FP8, "a_ptr": a_type}, 4))
        if pairs:  # and K split over programs
            jobs.append(("fp8_moe", "_fused_moe_fp8", {**consts, "SPLIT_K": 3}, {**FP8, "a_ptr": a_type}, 4))
    one = {"x_ptr": "*fp8e4nv", "xs_ptr": "*fp32", "b1_ptr": "*fp8e4nv", "b1s_ptr": "*fp32", "b2_ptr": "*fp8e4nv",
           "b2s_ptr": "*fp32", "inter_ptr": "*bf16", "out_ptr": "*bf16", "topk_weights_ptr": "*fp32",
           "ids_ptr": "*i64", "part1_ptr": "*fp32", "count1_ptr": "*i32", "part2_ptr": "*fp32", "count2_ptr": "*i32",
           "ready_ptr": "*i32", "q_eps": "fp32"}
    for split, sleep in ((1, False), (2, True)):  # FP8 decode's two GEMMs in one launch
        jobs.append(("fp8_moe", "_moe_fp8_one_launch", dict(H=3072, I=1536, TOPK=8, NUM_EXPERTS=256, BLOCK_M=16,
                                                            BLOCK_N1=64, BLOCK_N2=64, SPLIT1=split, SPLIT2=split,
                                                            UPCAST=False, OUT_MANT=0, READY_STRIDE=32, SLEEP=sleep,
                                                            ASM=True), one, 4))
    for block_n, tile_scale in ((128, True), (256, False)):  # large M: a scale a tile, or a scale a column
        consts = dict(K=3072, A_ROW_DIV=8, GATED=True, MUL_ROUTED_WEIGHT=False, BLOCK_SCALED=True, GROUP_N=128,
                      GROUP_K=128, EVEN_K=True, BLOCK_M=64, BLOCK_N=block_n, BLOCK_K=128, GROUP_M=8, UPCAST=False,
                      OUT_MANT=0, B_SCALE_TILE=tile_scale)
        jobs.append(("fp8_moe", "_fused_moe_fp8", consts, FP8, 8))
        if tile_scale:  # and writing GEMM 2's FP8 A itself
            jobs.append(("fp8_moe", "_fused_moe_fp8", {**consts, "QUANT_OUT": True},
                         {**FP8, "c_ptr": "*fp8e4nv", "cs_ptr": "*fp32"}, 8))
    # the TMA GEMMs of the sorted list as launched: warp-specialized where fp8_gemm.ws_split allows it (one dot,
    # 64-row blocks), plain pipelined loops on the descriptors otherwise
    for gated in (True, False):
        for block_m in (128, 64):
            consts = dict(K=3072 if gated else 1536, GATED=gated, MUL_ROUTED_WEIGHT=not gated, SORTED_OUT=gated,
                          GROUP_N=128, GROUP_K=128, BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=128, GROUP_M=8,
                          UPCAST=False, OUT_MANT=0, WS=not gated and block_m == 64)
            jobs.append(("fp8_moe", "_moe_fp8_ws", consts, FP8, 4))
            if not gated and block_m == 64:  # GEMM 2 in 64-row halves of GEMM 1's 128-row list
                jobs.append(("fp8_moe", "_moe_fp8_ws", {**consts, "LIST_M": 128}, FP8, 4))
    align = {"ids_ptr": "*i64", "counts_ptr": "*i32", "shift_ptr": "*i32", "sorted_token_ids_ptr": "*i32",
             "expert_ids_ptr": "*i32", "total_ptr": "*i32"}  # the MoE alignment over chunks of pairs
    jobs += [("fp8_moe", "_align_count", dict(CHUNK=256, E_PAD=512, FILL=256), align, 4),
             ("fp8_moe", "_align_offsets", dict(BLOCK_M=64, E_PAD=512, CG=16, NB_PAD=1024), align, 4),
             ("fp8_moe", "_align_place", dict(CHUNK=256, E_PAD=512), align, 4)]
    qk = {"y_ptr": "*bf16", "w_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "rstd_ptr": "*bf16",
          "out_ptr": "*bf16", "y2_ptr": "*bf16", "w2_ptr": "*bf16", "out2_ptr": "*bf16", "eps": "fp32"}
    for pair in (False, True):  # QK-norm + rotary, q and k in one launch or one each
        jobs.append(("fused_ops", "_qk_norm_rope", dict(HAS_RSTD=False, BLOCK_H=64, BLOCK_D=128, OUT_MANT=0,
                                                        PAIR=pair), qk, 8))
    att = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "kc_ptr": "*bf16", "vc_ptr": "*bf16",
           "slots_ptr": "*i64", "cols_ptr": "*i64", "o_ptr": "*bf16", "part_ptr": "*fp32", "ml_ptr": "*fp32",
           "count_ptr": "*i32", "qk_scale": "fp32", "wq_ptr": "*bf16", "wk_ptr": "*bf16", "cos_ptr": "*fp32",
           "sin_ptr": "*fp32", "eps": "fp32", "rq_ptr": "*fp32", "rk_ptr": "*fp32", "oq_ptr": "*fp8e4nv",
           "os_ptr": "*fp32", "q_eps": "fp32"}
    for splits, norm, rstd in ((1, False, False), (3, False, False), (3, True, False), (2, True, True)):
        # decode attention: one split or merged by the last to arrive; the QK-norm and rotary inside, the 1/rms given
        jobs.append(("fused_ops", "_decode_attention", dict(D=128, CHUNK=64, SPLITS=splits, BLOCK_G=16, BLOCK_C=64,
                                                            IEEE=False, NORM=norm, BLOCK_HQ=64, BLOCK_HK=8,
                                                            OUT_MANT=7 if norm else 0, HAS_RSTD=rstd), att, 4))
    for splits in (1, 3):  # and the output quantized for a block-FP8 o_proj
        jobs.append(("fused_ops", "_decode_attention", dict(D=128, CHUNK=64, SPLITS=splits, BLOCK_G=16, BLOCK_C=64,
                                                            IEEE=False, NORM=True, BLOCK_HQ=64, BLOCK_HK=8,
                                                            OUT_MANT=7, QUANT=True, UPCAST=False), att, 4))
    for quant_a in (False, True):  # the block-FP8 linear, split K, one token quantized in the GEMM
        consts = dict(K=6144, BLOCK_SCALED=True, GROUP_N=128, GROUP_K=128, EVEN_K=True, BLOCK_M=16, BLOCK_N=64,
                      BLOCK_K=128, GROUP_M=1, UPCAST=False, OUT_MANT=0, SPLIT_K=4, QUANT_A=quant_a,
                      Q_EPS=1e-10 if quant_a else 0.0, B_SCALE_TILE=True)
        types = {"a_ptr": "*bf16" if quant_a else "*fp8e4nv", "as_ptr": "*fp32", "b_ptr": "*fp8e4nv",
                 "bs_ptr": "*fp32", "c_ptr": "*bf16", "part_ptr": "*fp32", "count_ptr": "*i32"}
        jobs.append(("fp8_gemm", "_w8a8_fp8_matmul", consts, types, 4))
        # and the CUDA-core GEMV (PATH "gemv"), its loop pipelined in 2 stages
        jobs.append(("fp8_gemm", "_w8a8_fp8_gemv", dict(K=6144, GROUP_N=128, GROUP_K=128, BLOCK_N=64, UPCAST=False,
                                                        OUT_MANT=7, SPLIT_K=4, STAGES=2, QUANT_A=quant_a,
                                                        Q_EPS=1e-10 if quant_a else 0.0), types, 8))
    large = dict(K=3072, BLOCK_SCALED=True, GROUP_N=128, GROUP_K=128, EVEN_K=True, BLOCK_M=128, BLOCK_N=128,
                 BLOCK_K=128, GROUP_M=8, UPCAST=False, OUT_MANT=0, B_SCALE_TILE=True)  # large M: a scale a tile
    jobs.append(("fp8_gemm", "_w8a8_fp8_matmul", large, {**types, "a_ptr": "*fp8e4nv"}, 8))
    for block_m in (128, 64):  # the TMA GEMM, warp-specialized on 64-row blocks
        jobs.append(("fp8_gemm", "_w8a8_ws", dict(K=3072, GROUP_N=128, GROUP_K=128, BLOCK_M=block_m, BLOCK_N=128,
                                                  BLOCK_K=128, GROUP_M=8, UPCAST=False, OUT_MANT=0, WS=block_m == 64),
                     {**types, "a_ptr": "*fp8e4nv"}, 4))
    for gated, pairs in ((True, False), (False, False), (True, True), (False, True)):  # GGUF MoE, CUDA-core path
        consts = dict(K=3072 if gated else 1536, QTYPE=12, QTYPE_UP=12 if gated else 14, ROUTED=True,
                      A_ROW_DIV=8 if gated else 1, GATED=gated, MUL_ROUTED_WEIGHT=not gated, EVEN_K=True,
                      BLOCK_M=1 if pairs else 2, BLOCK_N=32, GROUP_M=1, FMA=True, DOT_F32=False, X_F32=True,
                      OUT_MANT=0)  # Q4_K gate and up, Q6_K down
        if pairs:
            consts.update(PAIRS=True, SLOT_SUM=0 if gated else 8, NUM_EXPERTS=256)
        jobs.append(("gguf_gemm", "_gguf_matmul", consts, GGUF, 4))
    gemv = {**GGUF, "xsum_ptr": "*fp32", "csum_ptr": "*fp32", "w_ptr": "*i32", "u_ptr": "*i32"}
    for qtype, word in ((12, "*i32"), (13, "*i32"), (14, "*i16"), (8, "*i32")):  # the GGUF GEMV kernel
        types = {**gemv, "w_ptr": word, "u_ptr": word}
        for gated, pairs, x_sums, block_m in ((True, True, True, 1), (False, True, True, 1), (True, False, False, 2),
                                              (False, False, True, 4)):
            consts = dict(K=3072 if gated else 1536, QTYPE=qtype, A_ROW_DIV=8 if gated else 1, GATED=gated,
                          MUL_ROUTED_WEIGHT=not gated, BLOCK_M=block_m, BLOCK_N=32 if gated else 64, OUT_MANT=0,
                          X_SUMS=x_sums, SUMS_OUT=16 if gated else 0, PREFETCH=qtype == 12 and block_m != 2,
                          LANES=2 if qtype == 12 and not pairs else 1)
            if pairs:
                consts.update(PAIRS=True, SLOT_SUM=0 if gated else 8, NUM_EXPERTS=256)
            jobs.append(("gguf_gemm", "_gguf_gemv", consts, {**types, "x_ptr": "*fp32" if x_sums else "*bf16"}, 2))
        jobs.append(("gguf_gemm", "_gguf_gemv", dict(K=3072, QTYPE=qtype, A_ROW_DIV=1, GATED=False,
                                                     MUL_ROUTED_WEIGHT=False, BLOCK_M=1, BLOCK_N=32, OUT_MANT=0,
                                                     X_SUMS=True, DENSE=True, SPLIT_K=2, PREFETCH=qtype == 12),
                     {**types, "x_ptr": "*fp32"}, 1))
    jobs.append(("gguf_gemm", "_gguf_gemv", dict(K=3072, QTYPE=12, A_ROW_DIV=8, GATED=True, MUL_ROUTED_WEIGHT=False,
                                                 BLOCK_M=8, BLOCK_N=32, OUT_MANT=0, X_SUMS=True, SUMS_OUT=16,
                                                 PREFETCH=True), {**gemv, "x_ptr": "*fp32"}, 2))  # 8 tokens a block
    rows = {**W4, "a_ptr": "*fp32", "asum_ptr": "*fp32", "csum_ptr": "*fp32", "expert_ids_ptr": "*i64"}
    for gated in (True, False):  # the W4A16 MoE's rows path, both GEMMs as the launcher runs them
        jobs.append(("w4a16_moe", "_moe_rows", dict(K=3072 if gated else 1536, GROUP=128, A_ROW_DIV=8 if gated else 1,
                                                    GATED=gated, BLOCK_N=128 if gated else 256, OUT_MANT=0,
                                                    SLOT_SUM=0 if gated else 8, NUM_EXPERTS=256, SUMS_OUT=gated),
                     {**rows, "c_ptr": "*fp32" if gated else "*bf16"}, 8))
    jobs.append(("w4a16_moe", "_moe_rows", dict(K=3072, GROUP=128, A_ROW_DIV=1, GATED=False, BLOCK_N=32, OUT_MANT=0,
                                                SLOT_SUM=0, NUM_EXPERTS=0, DENSE=True, SPLIT_K=2),
                 {**rows, "c_ptr": "*bf16"}, 1))  # the rows path of w4a16_kmajor_linear
    jobs.append(("fp8_gemm", "_per_token_group_quant", dict(GROUP=128, BLOCK_M=16, UPCAST=False, ROW_DIV=8, LIMIT=True),
                 {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "idx_ptr": "*i32", "limit_ptr": "*i32",
                  "eps": "fp32"}, 4))  # x quantized in the MoE's list order
    jobs.append(("fp8_gemm", "_gemv_prep", dict(GROUP=32, BLOCK=1024), {"x_ptr": "*bf16", "y_ptr": "*fp32",
                                                                        "s_ptr": "*fp32"}, 4))
    lines = compile_all(jobs)
    ws = [line for line in lines if line.startswith(("ok _moe_fp8_ws ", "ok _w8a8_ws "))]
    assert len(ws) == 7 and sum('"WS": true' in line for line in ws) == 3, ws
    # the K loops asked for it are split into a producer and consumers; the others are not
    assert all(line.endswith(" 1") == ('"WS": true' in line) for line in ws), ws


@pytest.mark.slow
@pytest.mark.parametrize("mode", [1, 7])
def test_pdl_variants_compile_for_sm90(mode):
    """The decode path's kernels with programmatic dependent launch: each waits once for the kernels before it
    (griddepcontrol.wait, then launch_dependents); the dense GEMVs prefetch their weights into L2 before it and the
    single-token router loads its gate rows before it, every other load coming after. Mode 7 (fp8_gemm.pdl_mode:
    PDL_LATE | PDL_NO_PREFETCH): the wait alone."""
    pdl = dict(PDL=mode)
    jobs = [
        ("fp8_gemm", "_w8a8_fp8_matmul", dict(K=3072, BLOCK_SCALED=True, GROUP_N=128, GROUP_K=128, EVEN_K=True,
                                              BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, UPCAST=False,
                                              OUT_MANT=0, SPLIT_K=3, QUANT_A=True, Q_EPS=1e-10, B_SCALE_TILE=True,
                                              **pdl),
         {"a_ptr": "*bf16", "as_ptr": "*fp32", "b_ptr": "*fp8e4nv", "bs_ptr": "*fp32", "c_ptr": "*bf16",
          "part_ptr": "*fp32", "count_ptr": "*i32"}, 4),
        ("fp8_moe", "_fused_moe_fp8", dict(K=3072, A_ROW_DIV=8, GATED=True, MUL_ROUTED_WEIGHT=False, BLOCK_SCALED=True,
                                           GROUP_N=128, GROUP_K=128, EVEN_K=True, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128,
                                           GROUP_M=1, UPCAST=False, OUT_MANT=0, B_SCALE_TILE=True, PAIRS=True,
                                           NUM_EXPERTS=256, **pdl), FP8, 4),
        ("fp8_moe", "_fused_moe_fp8", dict(K=1536, A_ROW_DIV=1, GATED=False, MUL_ROUTED_WEIGHT=True,
                                           BLOCK_SCALED=True, GROUP_N=128, GROUP_K=128, EVEN_K=True, BLOCK_M=16,
                                           BLOCK_N=64, BLOCK_K=128, GROUP_M=1, UPCAST=False, OUT_MANT=0,
                                           B_SCALE_TILE=True, PAIRS=True, SLOT_SUM=8, NUM_EXPERTS=256, QUANT_A=True,
                                           SPLIT_K=3, **pdl), {**FP8, "a_ptr": "*bf16"}, 4),
        ("fused_ops", "_router", dict(H=3072, TOP_K=8, BLOCK_E=256, BLOCK_K=8, IEEE=True, GEMV=True, BLOCK_N=1,
                                      BLOCK_EG=2, BLOCK_H=4096, **pdl), ROUTER, 4),
        ("fused_ops", "_rms_norm", dict(HAS_RES=True, BLOCK=4096, OUT_MANT=0, **pdl),
         {"x_ptr": "*bf16", "r_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "sum_ptr": "*bf16",
          "q_ptr": "*bf16", "qs_ptr": "*bf16", "eps": "fp32", "q_eps": "fp32"}, 8),
        ("fused_ops", "_decode_attention", dict(D=128, CHUNK=64, SPLITS=3, BLOCK_G=16, BLOCK_C=64, IEEE=False,
                                                NORM=True, BLOCK_HQ=64, BLOCK_HK=8, OUT_MANT=0, HAS_RSTD=False, **pdl),
         {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "kc_ptr": "*bf16", "vc_ptr": "*bf16",
          "slots_ptr": "*i64", "cols_ptr": "*i64", "o_ptr": "*bf16", "part_ptr": "*fp32", "ml_ptr": "*fp32",
          "count_ptr": "*i32", "qk_scale": "fp32", "wq_ptr": "*bf16", "wk_ptr": "*bf16", "cos_ptr": "*fp32",
          "sin_ptr": "*fp32", "eps": "fp32", "rq_ptr": "*fp32", "rk_ptr": "*fp32"}, 4),
        ("w4a16_moe", "_moe_gemv", dict(K=3072, GROUP=128, A_ROW_DIV=1, GATED=False, MUL_ROUTED_WEIGHT=False,
                                        OUT_MANT=0, DENSE=True, SPLIT_K=4, BLOCK_M=1, BLOCK_N=16, PREFETCH=2,
                                        EXACT=False, **pdl), W4, 2),
        ("w4a16_moe", "_moe_gemv", dict(K=3072, GROUP=128, A_ROW_DIV=8, GATED=True, MUL_ROUTED_WEIGHT=False,
                                        OUT_MANT=0, PAIRS=True, NUM_EXPERTS=256, BLOCK_M=1, BLOCK_N=16, PREFETCH=2,
                                        EXACT=False, **pdl), W4, 2),
        ("w4a16_moe", "_moe_gemv", dict(K=1536, GROUP=128, A_ROW_DIV=1, GATED=False, MUL_ROUTED_WEIGHT=True,
                                        OUT_MANT=0, PAIRS=True, SLOT_SUM=8, NUM_EXPERTS=256, SPLIT_K=2, BLOCK_M=1,
                                        BLOCK_N=32, PREFETCH=2, EXACT=False, **pdl), W4, 2),
        # GGUF: the activations' preparation and the GEMVs that read it
        ("fp8_gemm", "_gemv_prep", dict(GROUP=32, BLOCK=1024, **pdl), {"x_ptr": "*bf16", "y_ptr": "*fp32",
                                                                       "s_ptr": "*fp32"}, 4),
        ("gguf_gemm", "_gguf_gemv", dict(K=3072, QTYPE=12, A_ROW_DIV=8, GATED=True, MUL_ROUTED_WEIGHT=False,
                                         BLOCK_M=1, BLOCK_N=32, OUT_MANT=0, X_SUMS=True, SUMS_OUT=16, PREFETCH=True,
                                         PAIRS=True, NUM_EXPERTS=256, **pdl),
         {**GGUF, "x_ptr": "*fp32", "xsum_ptr": "*fp32", "csum_ptr": "*fp32", "w_ptr": "*i32", "u_ptr": "*i32"}, 2),
        ("gguf_gemv_q8", "_q8_prep", dict(BLOCK=1024, **pdl), {"x_ptr": "*bf16", "q_ptr": "*i8", "d_ptr": "*fp32",
                                                               "s_ptr": "*fp32"}, 4),
        ("gguf_gemv_q8", "_gguf_gemv_q8", dict(K=3072, QTYPE=12, A_ROW_DIV=8, GATED=True, MUL_ROUTED_WEIGHT=False,
                                               BLOCK_N=32, OUT_MANT=0, EMULATE=False, PAIRS=True, NUM_EXPERTS=256,
                                               **pdl),
         {"xq_ptr": "*i32", "xd_ptr": "*fp32", "xs_ptr": "*fp32", "w_ptr": "*i32", "u_ptr": "*i32", "c_ptr": "*bf16",
          "csum_ptr": "*fp32", "topk_weights_ptr": "*fp32", "sorted_token_ids_ptr": "*i32",
          "expert_ids_ptr": "*i64", "num_tokens_post_padded_ptr": "*i32", "part_ptr": "*fp32",
          "count_ptr": "*i32"}, 2),
    ]
    lines = compile_all(jobs)
    counts = {}
    for line, (_, kernel, consts, _, _) in zip(lines, jobs):
        wait, prefetch, before, trigger = (int(v) for v in line.split(" pdl=")[1].split()[0].split(","))
        kind = "dense" if consts.get("DENSE") else "gemm2" if consts.get("SLOT_SUM") else ""
        counts[(kernel, kind)] = (wait, prefetch, before, trigger)
    assert len(counts) == len(jobs) and all(c[0] == 1 for c in counts.values()), counts  # one wait each
    if mode == 7:  # no launch_dependents, no prefetch, nothing read before the wait but the router's gate rows
        assert all(c[1] == c[3] == 0 for c in counts.values()), counts
        assert all(c[2] == 0 for k, c in counts.items() if k != ("_router", "")), counts
        return
    assert all(c[3] == 1 for c in counts.values()), counts
    # weights toward L2 before the wait: the dense GEMVs and the decode MoEs' GEMM 2
    assert {k for k, c in counts.items() if c[1]} == {("_w8a8_fp8_matmul", ""), ("_moe_gemv", "dense"),
                                                       ("_fused_moe_fp8", "gemm2"), ("_moe_gemv", "gemm2")}, counts
    # read before the wait: the single-token router's gate rows, GEMM 2's expert ids (one a program); nothing else
    early = {("_router", ""), ("_fused_moe_fp8", "gemm2"), ("_moe_gemv", "gemm2")}
    assert counts[("_router", "")][2] > 0 and counts[("_fused_moe_fp8", "gemm2")][2] == 1, counts
    assert counts[("_moe_gemv", "gemm2")][2] == 1, counts
    assert all(c[2] == 0 for k, c in counts.items() if k not in early), counts


@pytest.mark.slow  # a few seconds per variant
def test_gguf_q8_gemv_variants_compile_for_sm90():
    """The 8-bit-activation GGUF GEMV's variants: the next super-block prefetched (Q4_K, Q5_K gate and up; Q6_K
    down), Q6_K rows on 2 and 4 threads, Q8_0 in 16-byte loads (with the prefetch too)."""
    types = {"xq_ptr": "*i32", "xd_ptr": "*fp32", "xs_ptr": "*fp32", "w_ptr": "*i32", "u_ptr": "*i32",
             "c_ptr": "*bf16", "csum_ptr": "*fp32", "topk_weights_ptr": "*fp32", "sorted_token_ids_ptr": "*i32",
             "expert_ids_ptr": "*i64", "num_tokens_post_padded_ptr": "*i32", "part_ptr": "*fp32",
             "count_ptr": "*i32"}
    gate = dict(K=3072, A_ROW_DIV=8, GATED=True, MUL_ROUTED_WEIGHT=False, BLOCK_N=32, OUT_MANT=0, EMULATE=False,
                PAIRS=True, NUM_EXPERTS=256, SPLIT_K=2)
    down = dict(K=1536, QTYPE=14, A_ROW_DIV=1, GATED=False, MUL_ROUTED_WEIGHT=True, BLOCK_N=64, OUT_MANT=7,
                EMULATE=False, PAIRS=True, NUM_EXPERTS=256, SLOT_SUM=8, SPLIT_K=2)
    jobs = [("gguf_gemv_q8", "_gguf_gemv_q8", {**gate, "QTYPE": 12, "PREFETCH": True}, types, 2),
            ("gguf_gemv_q8", "_gguf_gemv_q8", {**gate, "QTYPE": 13, "PREFETCH": True}, types, 2),
            ("gguf_gemv_q8", "_gguf_gemv_q8", {**down, "PREFETCH": True}, types, 2),
            ("gguf_gemv_q8", "_gguf_gemv_q8", {**down, "Q6_LANES": 2}, types, 4),
            ("gguf_gemv_q8", "_gguf_gemv_q8", {**down, "Q6_LANES": 4}, types, 8),
            ("gguf_gemv_q8", "_gguf_gemv_q8", {**gate, "QTYPE": 8}, types, 2),
            ("gguf_gemv_q8", "_gguf_gemv_q8", {**gate, "QTYPE": 8, "VEC16": True}, types, 2),
            ("gguf_gemv_q8", "_gguf_gemv_q8", {**gate, "QTYPE": 8, "VEC16": True, "PREFETCH": True}, types, 2)]
    lines = compile_all(jobs)
    v4 = [int(line.split(" v4=")[1].split()[0]) for line in lines[5:]]
    # the plain loop's 16-byte loads are the activations'; VEC16 adds a super-block's 17 (the prefetch: twice, the
    # first super-block's before the loop)
    assert v4[1] - v4[0] == 17 and v4[2] - v4[0] == 34, v4


@pytest.mark.slow
def test_pipelined_gemv_loops_compile_for_sm90():
    """STAGES > 1 on the W4A16 GEMV (PREFETCH 0: no register prefetch): Triton software-pipelines the K loop, the
    weight words becoming asynchronous copies into shared memory, one group a step or two (GSTEP); STAGES = 1 keeps
    the plain loop (no copies)."""
    jobs = []
    # GEMM 1 (gate + up), GEMM 2 adding slots
    for stages, gated, gstep in ((1, True, 1), (1, False, 1), (3, True, 1), (3, False, 1), (2, True, 2),
                                 (2, False, 2)):
        jobs.append(("w4a16_moe", "_moe_gemv", dict(K=3072 if gated else 1536, GROUP=128, A_ROW_DIV=8 if gated else 1,
                                                    GATED=gated, MUL_ROUTED_WEIGHT=not gated, OUT_MANT=0, PAIRS=True,
                                                    SLOT_SUM=0 if gated else 8, NUM_EXPERTS=256, BLOCK_M=1,
                                                    BLOCK_N=32, PREFETCH=0, EXACT=False, SPLIT_K=2, STAGES=stages,
                                                    GSTEP=gstep),
                     W4, 2))
    lines = compile_all(jobs)
    copies = [int(line.split(" async=")[1].split()[0]) for line in lines]
    assert copies[:2] == [0, 0] and min(copies[2:]) > 0, copies


@pytest.mark.slow
def test_fp8_gluon_gemm_compiles_for_sm90():
    """The Gluon block-FP8 GEMM (no interpreter runs Gluon): its K loop issues each K block's warp-group MMAs
    asynchronously and waits with one left outstanding (the previous block's product summed while this one runs),
    waiting for none only after the last; 64- and 128-column tiles, 3 and 4 stages."""
    types = {"a_ptr": "*fp8e4nv", "as_ptr": "*fp32", "b_ptr": "*fp8e4nv", "bs_ptr": "*fp32", "c_ptr": "*bf16"}
    jobs = [("fp8_gluon", "_w8a8_block_gluon_kernel",
             dict(GROUP_N=128, BLOCK_M=64, BLOCK_N=bn, GROUP_M=8, STAGES=st, UNROLL=4, num_warps=4), types, 4)
            for bn, st in ((64, 4), (128, 3))]
    jobs.append(("fp8_gluon", "_w8a8_block_gluon_kernel",  # two warp groups, a barrier before each refill
                 dict(GROUP_N=128, BLOCK_M=128, BLOCK_N=64, GROUP_M=8, STAGES=4, UNROLL=4, num_warps=8), types, 8))
    moe = {**types, "topk_weights_ptr": "*fp32", "sorted_token_ids_ptr": "*i32", "expert_ids_ptr": "*i32",
           "num_tokens_post_padded_ptr": "*i32"}
    for gated in (True, False):  # the MoE's GEMMs on the sorted list (gate and up: two products a K block)
        jobs.append(("fp8_gluon", "_moe_fp8_gluon_kernel",
                     dict(K=3072 if gated else 1536, GATED=gated, MUL_ROUTED_WEIGHT=not gated, SORTED_OUT=gated,
                          BLOCK_M=64, BLOCK_N=64 if gated else 128, GROUP_M=8, STAGES=4, UNROLL=4, LIST_M=64,
                          num_warps=4),
                     moe, 4))
    # warp-specialized: two consumer warp groups (the default partition's and a worker's copy of one function),
    # each waiting for its K block's product in full
    jobs.append(("fp8_gluon", "_w8a8_block_ws_kernel",
                 dict(GROUP_N=128, BLOCK_N=128, GROUP_M=8, STAGES=4, num_warps=4), types, 4))
    lines = compile_all(jobs)
    mma, wait1, wait0 = (int(v) for v in lines.pop().split(" wgmma=")[1].split()[0].split(","))
    assert (mma, wait1, wait0) == (8, 0, 2)
    for line in lines:
        mma, wait1, wait0 = (int(v) for v in line.split(" wgmma=")[1].split()[0].split(","))
        # four K = 32 instructions a 128-deep block, four blocks a loop step; every issue but the step's first
        # followed by a wait leaving one outstanding, then one wait for all (gated: the gate and up products, twice
        # the instructions, and two left outstanding, which the count here omits)
        assert (mma, wait1, wait0) == ((32, 0, 1) if '"GATED": true' in line else (16, 3, 1)), line
