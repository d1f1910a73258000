"""Fused mixture-of-experts over GGUF block-quantized experts (Q8_0, Q4_K, Q5_K, Q6_K), in Triton.

    out[t] = sum over slots s of topk_weights[t, s] * D_e (silu(G_e x_t) * (U_e x_t)),  e = topk_ids[t, s]

with the experts as llama.cpp stacks them in a GGUF file, bytes read as stored:

Usage:
    from quantkit.kernels.gguf_moe import fused_moe_gguf

    out = fused_moe_gguf(x, gate, up, down, topk_weights, topk_ids, ("q4_k", "q4_k", "q6_k"))
    # x [M, H] bf16/fp16/fp32; gate, up uint8 [E, I, H/QK*size] (ffn_gate_exps, ffn_up_exps; ggml {H, I, E});
    # down uint8 [E, H, I/QK*size] (ffn_down_exps; ggml {I, H, E}); topk_weights fp32 [M, topk], topk_ids int [M, topk]
    # (ids outside [0, E) route the slot nowhere); qtypes: gate's, up's and down's (Q4_K_M mixes types)

The structure is kernels/fp8_moe.py's, with the activations kept in x's dtype instead of quantized: the (token, slot)
pairs sorted by expert and padded to BLOCK_M without a host sync (`_route`); GEMM 1, one launch for all experts,
each program dequantizing a gate tile and the matching up tile of its expert and writing silu(gate) * up
[M*topk, I] in x.dtype; GEMM 2 against down with the router weight in the epilogue [M*topk, H]; the atomic-free sum
over slots. Single-token steps (CUDA-core configs) skips the sort and the separate sum as
kernels/fp8_moe.py does. The dequantizing GEMM is kernels/gguf_gemm.py's. Capturable in a CUDA graph.

Decode sizes of the types kernels/gguf_gemm.py's GEMV kernel reads (Q4_K, Q5_K, Q6_K, Q8_0; gate and up of one type)
take that kernel instead ("PATH": "gemv", the default up to GEMV_PAIRS_MAX pairs on a GPU): x converted to fp32 with
its group sums once (PREP, one small launch), GEMM 1 on the pairs as they come writing silu(gate) * up in fp32 with
the sums over down's scale groups, GEMM 2 adding each token's slots (BLOCK_M = 1), or both GEMMs over the sorted
list, BLOCK_M tokens of an expert sharing each decoded weight. Three launches at one token. Tuned entries without a
"PATH" were chosen among tile configs only; where the default is the GEMV path, it stands over them. On the GEMV
path, "SPLIT_K" / "SPLIT_K2" split each GEMM's K over programs, and "ACT_Q8" (BLOCK_M 1, Q4_K, Q5_K, Q6_K or Q8_0
gate and up) runs GEMM 1 on activations quantized to 8 bits per 32 with integer dot products (kernels/gguf_gemv_q8.py,
as llama.cpp's CUDA kernels do), and GEMM 2 too where down is Q4_K, Q5_K or Q8_0, or Q6_K with "Q6_Q8" (a Q6_K down
stays on the fp32 GEMV without it, as the tables measured it): about 1% from the fp32 result on a
MiniMax-M2 layer, taken by the H100 and H200 tables at one to eight tokens, not by the defaults. "Q6_WORDS" reads
Q6_K rows of an even number of super-blocks as int32 words (the same bits; in the GEMV default). On 8-bit
activations, "Q8_PREFETCH" loads the next super-block's words during this one, "Q8_0_VEC16" reads Q8_0 super-blocks
in 16-byte loads and "Q6_LANES" (2, 4) gives each Q6_K row that many threads (kernels/gguf_gemv_q8.py; the same bits,
table choices).

`fused_moe_gguf_ref` loops over experts in PyTorch on weights dequantized by `gguf_gemm.dequantize_ref`, in fp32,
rounding where the kernel does (the intermediate, each slot's output, the sum). Block configurations:
`configs/gguf_moe.json`, shape key "E=..,I=..,H=..,<gate qtype>,<up qtype>,<down qtype>", by M bucket.
"""

from __future__ import annotations

import torch

from .fp8_gemm import INTERPRETED, device_key, load_config_table, split_divisor
from .fp8_moe import _route, moe_sum
from .gguf_gemm import (
    ACT_DTYPES,
    GEMV_QTYPES,
    SUPER,
    check_device,
    check_weight_bytes,
    dequantize_ref,
    gemv_prep,
    gemv_supported,
    launch_gguf_gemv,
    launch_gguf_matmul,
)
from .gguf_gemv_q8 import QK, launch_gguf_gemv_q8, q8_prep, q8_supported

# single-token steps (up to this many tokens) with a CUDA-core config (BLOCK_M < 16) take the pairs unsorted, one a
# row block, and GEMM 2 adds each token's slots: two launches instead of four (kernels/fp8_moe.py says why one token)
PAIRS_MAX_TOKENS = 1
# the GEMV path ("PATH": "gemv") with BLOCK_M = 1 takes up to this many (token, slot) pairs unsorted (M <= 8 at
# top-8), as kernels/w4a16_moe.py's GEMV path does; more take the sorted list, BLOCK_M tokens of an expert a program
GEMV_PAIRS_MAX = 64
MOE_CONFIG_KEYS = ("PATH", "PREP", "PREFETCH", "LANES", "BLOCK_M", "BLOCK_N", "GROUP_M", "num_warps", "num_stages",
                   "SPLIT_K", "SPLIT_K2", "ACT_Q8", "Q6_Q8", "EPI_Q8", "Q6_WORDS", "Q8_PREFETCH",
                   "Q8_0_VEC16", "Q6_LANES")
PATHS = ("tile", "gemv")


def _check_moe_args(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                    topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    qtypes: tuple[str, str, str]) -> tuple[int, int, int, int, int]:
    if x.dim() != 2 or x.dtype not in ACT_DTYPES:
        raise ValueError(f"x must be [M, H] in one of {ACT_DTYPES}, got {tuple(x.shape)} {x.dtype}")
    if len(qtypes) != 3:
        raise ValueError(f"qtypes must be (gate, up, down), got {qtypes!r}")
    m, h = x.shape
    if gate.dim() != 3 or up.dim() != 3 or down.dim() != 3:
        raise ValueError(f"gate, up and down must be 3-D [E, rows, bytes], got {tuple(gate.shape)}, "
                         f"{tuple(up.shape)}, {tuple(down.shape)}")
    e, i = gate.shape[0], gate.shape[1]
    if tuple(up.shape[:2]) != (e, i) or tuple(down.shape[:2]) != (e, h):
        raise ValueError(f"up must be [E={e}, I={i}, ..] and down [E={e}, H={h}, ..], got {tuple(up.shape)} and "
                         f"{tuple(down.shape)}")
    check_weight_bytes(gate, h, qtypes[0], "gate")
    check_weight_bytes(up, h, qtypes[1], "up")
    check_weight_bytes(down, i, qtypes[2], "down")
    if x.stride(1) != 1 and h > 1:
        raise ValueError("x must be contiguous along H")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != m or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_weights and topk_ids must both be [M={m}, topk], got {tuple(topk_weights.shape)} "
                         f"and {tuple(topk_ids.shape)}")
    if topk_ids.dtype.is_floating_point or topk_weights.dtype != torch.float32:
        raise ValueError(f"topk_ids must be integer and topk_weights float32, got {topk_ids.dtype} and "
                         f"{topk_weights.dtype}")
    return m, h, e, i, topk_ids.shape[1]


def gemv_types(qtypes: tuple[str, str, str]) -> bool:
    """Whether the GEMV path decodes this mix: Q4_K, Q5_K, Q6_K or Q8_0 everywhere, gate and up of one type."""
    return qtypes[0] == qtypes[1] and all(q in GEMV_QTYPES for q in qtypes)


def _moe_default_config(m: int, topk: int, num_experts: int, qtypes: tuple[str, str, str] | None = None) -> dict:
    if INTERPRETED:
        # the interpreter pays per program instance and per operation, not per element: few, large tiles
        return dict(PATH="tile", BLOCK_M=64, BLOCK_N=128, GROUP_M=1, num_warps=4, num_stages=1)
    # H100/H200. Decode sizes of the types the GEMV kernel decodes: that kernel, one pair a program, the activations
    # converted and summed once (PREP) (kernels/gguf_gemm.py: about 3.9 instructions a weight for Q4_K, 5.0 for
    # Q6_K in its loop, against 8 and 15 for the tiles' dequantization at one token)
    if qtypes is not None and gemv_types(qtypes) and m * topk <= GEMV_PAIRS_MAX:
        return _path_default("gemv")
    # BLOCK_M follows the expected pairs per expert, so decode pads little. At one or two pairs per expert
    # (MiniMax-M2 up to M = 64) the GEMV kernel on the sorted list, two pairs a program, for the k-quant mixes (on
    # an H100: Q4_K_M 0.80 ms at 16 tokens and 2.30 at 64, where the fp32 FMA tiles took about twice and 2.7x that,
    # BENCHMARKS.md), and for Q8_0 up to half a pair per expert (its tiles won at 64 tokens); else the fp32 FMA
    # path (BLOCK_M < 16, see kernels/gguf_gemm.py); tl.dot above
    per_expert = m * topk / max(num_experts, 1)
    if qtypes is not None and gemv_types(qtypes) and per_expert <= (0.5 if set(qtypes) == {"q8_0"} else 2):
        return {**_path_default("gemv"), "BLOCK_M": 2}
    if per_expert <= 2:
        return dict(PATH="tile", BLOCK_M=2, BLOCK_N=32, GROUP_M=1, num_warps=4, num_stages=2)
    if per_expert <= 16:
        return dict(PATH="tile", BLOCK_M=16, BLOCK_N=64, GROUP_M=1, num_warps=4, num_stages=3)
    if per_expert <= 32:
        return dict(PATH="tile", BLOCK_M=32, BLOCK_N=64, GROUP_M=4, num_warps=4, num_stages=3)
    return dict(PATH="tile", BLOCK_M=64, BLOCK_N=64, GROUP_M=8, num_warps=4, num_stages=3)


def moe_shape_key(num_experts: int, inter: int, hidden: int, qtypes: tuple[str, str, str]) -> str:
    return f"E={num_experts},I={inter},H={hidden},{','.join(qtypes)}"


def moe_config(device: torch.device, m: int, topk: int, num_experts: int, inter: int, hidden: int,
               qtypes: tuple[str, str, str]) -> dict:
    """Block configuration for both GEMMs (they share BLOCK_M): configs/gguf_moe.json, else the defaults. A tuned
    entry without "PATH" was chosen among tile configs only (before the GEMV path): where the default is the GEMV
    path, the default stands."""
    default = _moe_default_config(m, topk, num_experts, qtypes)
    buckets = load_config_table("gguf_moe.json").get(device_key(device), {}).get(
        moe_shape_key(num_experts, inter, hidden, qtypes))
    if not buckets:
        return default
    entry = buckets[min(buckets, key=lambda b: (abs(int(b) - m), int(b)))]
    path = entry.get("PATH", "tile")
    if "PATH" not in entry and default["PATH"] == "gemv":
        return default
    base = default if default["PATH"] == path else _path_default(path)
    return {**base, **{k: v for k, v in entry.items() if k in MOE_CONFIG_KEYS}}


def _path_default(path: str) -> dict:
    if path == "gemv":  # Q6_K rows as words where their length allows (the same bits; H100 and H200 both faster)
        return dict(PATH="gemv", PREP=True, PREFETCH=True, BLOCK_M=1, BLOCK_N=32, GROUP_M=1, num_warps=2,
                    num_stages=1, Q6_WORDS=True)
    return dict(PATH="tile", BLOCK_M=16, BLOCK_N=64, GROUP_M=1, num_warps=4, num_stages=3)


def fused_moe_gguf(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                   topk_weights: torch.Tensor, topk_ids: torch.Tensor, qtypes: tuple[str, str, str],
                   config: dict | None = None) -> torch.Tensor:
    """MoE layer with GGUF experts: x [M, H] -> [M, H] in x.dtype. Shapes and layout: module docstring.

    config overrides the block configuration (the tuning script's candidates)."""
    m, h, e, i, topk = _check_moe_args(x, gate, up, down, topk_weights, topk_ids, qtypes)
    device = check_device(x, gate, up, down, topk_weights, topk_ids)
    if m == 0:
        return torch.empty_like(x)
    cfg = config or moe_config(device, m, topk, e, i, h, qtypes)
    if cfg.get("PATH", "tile") not in PATHS:
        raise ValueError(f"config PATH must be one of {PATHS}, got {cfg['PATH']!r}")
    weights = topk_weights.contiguous().view(-1)  # [M*topk]
    # rows of pairs routed to no expert are never written (nor read by GEMM 2, nor summed); zeroed in the interpreter
    # only, where garbage could make numpy warn
    alloc = torch.zeros if INTERPRETED else torch.empty
    if cfg.get("PATH") == "gemv":
        if not (gemv_types(qtypes) and gemv_supported((gate, qtypes[0]), (up, qtypes[1]), (down, qtypes[2]))):
            if config is not None:
                raise ValueError(f"the GEMV path reads Q4_K, Q5_K, Q6_K and Q8_0 experts (gate and up of one type) "
                                 f"with contiguous, aligned rows; got {qtypes}")
            cfg = _path_default("tile")
        else:
            return _moe_gemv(x, gate, up, down, weights, topk_ids, qtypes, cfg, alloc)
    if m <= PAIRS_MAX_TOKENS and cfg["BLOCK_M"] < 16:  # decode: no sort, no separate slot sum
        ids = topk_ids.contiguous().view(-1)  # [M*topk]
        routing = (weights, ids, ids, ids)
        one = {**cfg, "BLOCK_M": 1}  # a pair a row block: the CUDA-core path computes no padding rows
        inter = alloc((m * topk, i), dtype=x.dtype, device=device)  # [M*topk, I] silu(gate) * up
        launch_gguf_matmul(x, gate, qtypes[0], inter, i, h, one, u=up, qtype_up=qtypes[1], routing=routing,
                           a_row_div=topk, pairs=e)
        out = torch.empty_like(x)  # [M, H]
        launch_gguf_matmul(inter, down, qtypes[2], out, h, i, one, routing=routing, a_row_div=1,
                           mul_routed_weight=True, pairs=e, slot_sum=topk)
        return out
    sorted_token_ids, expert_ids, num_tokens_post_padded = _route(topk_ids, cfg["BLOCK_M"], e)  # no host sync
    routing = (weights, sorted_token_ids, expert_ids, num_tokens_post_padded)

    inter = alloc((m * topk, i), dtype=x.dtype, device=device)  # [M*topk, I] silu(gate) * up
    launch_gguf_matmul(x, gate, qtypes[0], inter, i, h, cfg, u=up, qtype_up=qtypes[1], routing=routing,
                       a_row_div=topk)
    y = alloc((m * topk, h), dtype=x.dtype, device=device)  # [M*topk, H] each slot's weighted expert output
    launch_gguf_matmul(inter, down, qtypes[2], y, h, i, cfg, routing=routing, a_row_div=1, mul_routed_weight=True)

    return moe_sum(y, topk_ids, x, e)


def _moe_gemv(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor,
              topk_ids: torch.Tensor, qtypes: tuple[str, str, str], cfg: dict, alloc) -> torch.Tensor:
    """The GEMV path: GEMM 1 writes silu(gate) * up in fp32 with its sums over down's scale groups, which GEMM 2
    takes as its activations and their sums; with PREP, x is converted and summed once too (one small launch).
    ACT_Q8: GEMM 1 on x quantized to 8 bits (kernels/gguf_gemv_q8.py), and GEMM 2 too where down is Q4_K, Q5_K or Q8_0,
    or Q6_K with Q6_Q8 (the intermediate quantized by one more launch, or with EPI_Q8 in GEMM 1's epilogue)."""
    m, h = x.shape
    e, i = gate.shape[0], gate.shape[1]
    topk = topk_ids.shape[1]
    g_in, g_dn = GEMV_QTYPES[qtypes[0]][1], GEMV_QTYPES[qtypes[2]][1]
    if cfg["BLOCK_N"] % g_dn:
        raise ValueError(f"the GEMV path's BLOCK_N must be a multiple of {g_dn} ({qtypes[2]}), got {cfg['BLOCK_N']}")
    act_q8 = bool(cfg.get("ACT_Q8", False))
    if act_q8 and not (cfg["BLOCK_M"] == 1 and q8_supported((gate, qtypes[0]), (up, qtypes[1]))):
        raise ValueError(f"ACT_Q8 takes BLOCK_M 1 and Q4_K, Q5_K, Q6_K or Q8_0 gate and up, got {cfg['BLOCK_M']} and "
                         f"{qtypes}")
    # GEMM 2 on 8-bit activations where down is Q4_K, Q5_K or Q8_0, and Q6_K with Q6_Q8
    down_q8 = act_q8 and q8_supported((down, qtypes[2])) and (qtypes[2] != "q6_k" or bool(cfg.get("Q6_Q8", False)))
    # EPI_Q8: GEMM 1 quantizes its output for GEMM 2 itself (the same bits as q8_prep of the fp32 output, one launch
    # fewer; where BLOCK_N is a multiple of the activations' block of 32)
    epi_q8 = down_q8 and bool(cfg.get("EPI_Q8", False)) and cfg["BLOCK_N"] % QK == 0
    if epi_q8:
        inter = alloc((m * topk, i), dtype=torch.int8, device=x.device)  # codes of silu(gate) * up
        inter_q8 = alloc((2, m * topk, i // QK), dtype=torch.float32, device=x.device)  # their scales, scaled sums
    else:
        inter = alloc((m * topk, i), dtype=torch.float32, device=x.device)  # [M*topk, I] silu(gate) * up
        inter_q8 = None
    inter_sums = None if down_q8 else alloc((m * topk, i // g_dn), dtype=torch.float32, device=x.device)
    # SPLIT_K and SPLIT_K2: GEMM 1's and GEMM 2's super-blocks of K over that many programs a tile (a slot, adding
    # slots), each falling to the largest divisor of its count not above it
    cfg = {**cfg, "SPLIT_K": split_divisor(cfg.get("SPLIT_K", 1), h // SUPER)}
    # as many weight rows a program as GEMM 1's gate + up
    cfg2 = {**cfg, "BLOCK_N": 2 * cfg["BLOCK_N"], "SPLIT_K": split_divisor(cfg.get("SPLIT_K2", 1), i // SUPER)}
    pairs = cfg["BLOCK_M"] == 1 and m * topk <= GEMV_PAIRS_MAX  # no sort, GEMM 2 adds each token's slots
    if pairs:
        ids = topk_ids.contiguous().view(-1)  # [M*topk]
        routing = (weights, ids, ids, ids)
        extra1, extra2 = dict(pairs=e), dict(pairs=e, slot_sum=topk)
    else:
        sorted_token_ids, expert_ids, num_tokens_post_padded = _route(topk_ids, cfg["BLOCK_M"], e)  # no host sync
        routing = (weights, sorted_token_ids, expert_ids, num_tokens_post_padded)
        extra1 = extra2 = {}
    if act_q8:
        launch_gguf_gemv_q8(q8_prep(x), gate, qtypes[0], inter, i, h, cfg, u=up, routing=routing, a_row_div=topk,
                            c_sums=inter_sums, c_q8=inter_q8, **extra1)
    else:
        x_in, x_sums = gemv_prep(x, g_in) if cfg.get("PREP", True) else (x, None)
        launch_gguf_gemv(x_in, gate, qtypes[0], inter, i, h, cfg, u=up, routing=routing, a_row_div=topk,
                         x_sums=x_sums, c_sums=inter_sums, **extra1)
    # unsorted pairs: GEMM 2 writes the tokens' sums over their slots; sorted: each slot's output, summed after
    out = torch.empty_like(x) if pairs else alloc((m * topk, h), dtype=x.dtype, device=x.device)
    if down_q8:
        xq2 = (inter, inter_q8[0], inter_q8[1]) if epi_q8 else q8_prep(inter)
        launch_gguf_gemv_q8(xq2, down, qtypes[2], out, h, i, cfg2, routing=routing, a_row_div=1,
                            mul_routed_weight=True, **extra2)
    else:
        launch_gguf_gemv(inter, down, qtypes[2], out, h, i, cfg2, routing=routing, a_row_div=1,
                         mul_routed_weight=True, x_sums=inter_sums, **extra2)
    return out if pairs else moe_sum(out, topk_ids, x, e)


def fused_moe_gguf_ref(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                       topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                       qtypes: tuple[str, str, str]) -> torch.Tensor:
    """Reference of fused_moe_gguf: a loop over the routed experts in PyTorch, fp32 math on dequantized weights,
    rounded to x.dtype where the kernel rounds (the intermediate, each slot's output, the sum)."""
    m, h, e, i, topk = _check_moe_args(x, gate, up, down, topk_weights, topk_ids, qtypes)
    xf = x.float()
    slots = torch.zeros((m, topk, h), dtype=torch.float32, device=x.device)  # [M, topk, H]
    for ex in range(e):
        tok, slot = (topk_ids == ex).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        g = xf[tok] @ dequantize_ref(gate[ex], qtypes[0]).t()  # [n, I]
        u = xf[tok] @ dequantize_ref(up[ex], qtypes[1]).t()
        inter = (g * torch.sigmoid(g) * u).to(x.dtype).float()  # [n, I]
        y = (inter @ dequantize_ref(down[ex], qtypes[2]).t()) * topk_weights[tok, slot][:, None]  # [n, H]
        slots[tok, slot] = y.to(x.dtype).float()
    return slots.sum(dim=1).to(x.dtype)
