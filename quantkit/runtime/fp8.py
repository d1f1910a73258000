"""FP8 backend: attention projections and experts kept in float8_e4m3fn, computed W8A8 as vLLM and SGLang do.

Activations are quantized per token (per 128-wide group for block scales) at run time. On a GPU the Triton
kernels run (`quantkit.kernels.fp8_gemm`, `quantkit.kernels.fp8_moe`); on the CPU their PyTorch references do,
with the same quantization arithmetic, so both backends compute the same function.
"""

from __future__ import annotations

import torch
from torch import nn

from quantkit.kernels import fp8_gemm, fp8_moe
from quantkit.runtime.model import fp8_input


class Fp8Linear(nn.Module):
    """y = x W^T with W fp8 [out, in] and block scales [ceil(out/128), ceil(in/128)] or channel scales [out, 1]."""

    def __init__(self, in_features: int, out_features: int, scheme: str = "block"):
        super().__init__()
        self.scheme = scheme
        self.in_features, self.out_features = in_features, out_features
        sshape = (-(-out_features // 128), -(-in_features // 128)) if scheme == "block" else (out_features, 1)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(sshape, dtype=torch.float32), requires_grad=False)

    @classmethod
    def cat(cls, mods: list[Fp8Linear]) -> Fp8Linear | None:
        """One Fp8Linear of mods' rows stacked (runtime.model.fuse_linears); None where a block of 128 rows would
        span two of them."""
        first = mods[0]
        if any(m.scheme != first.scheme or m.in_features != first.in_features for m in mods):
            return None
        if first.scheme == "block" and any(m.out_features % 128 for m in mods[:-1]):
            return None
        with torch.device("meta"):
            fused = cls(first.in_features, sum(m.out_features for m in mods), first.scheme)
        fused.weight = nn.Parameter(torch.cat([m.weight.detach() for m in mods]), requires_grad=False)
        fused.weight_scale = nn.Parameter(torch.cat([m.weight_scale.detach() for m in mods]), requires_grad=False)
        return fused

    @property
    def act_group(self) -> int:
        """Activations are quantized per token and 128 columns (block scheme): a norm may do it (model.FP8_INPUT)."""
        return 128 if self.scheme == "block" else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [M, K]
        if self.scheme == "block":
            act = fp8_input(x, 128)  # quantized by the norm that made x, or None
            if x2.is_cuda:
                if act is not None:
                    y = fp8_gemm.w8a8_block_fp8_matmul(*act, self.weight, self.weight_scale, out_dtype=x.dtype)
                else:
                    y = fp8_gemm.fp8_block_linear(x2, self.weight, self.weight_scale)
            else:
                xq, xs = act if act is not None else fp8_gemm.per_token_group_quant_fp8_ref(x2, 128)
                y = fp8_gemm.w8a8_block_fp8_matmul_ref(xq, xs, self.weight, self.weight_scale, (128, 128), x.dtype)
        else:
            if x2.is_cuda:
                y = fp8_gemm.fp8_channel_linear(x2, self.weight, self.weight_scale)
            else:
                xq, xs = fp8_gemm.per_token_quant_fp8_ref(x2)
                y = fp8_gemm.w8a8_channel_fp8_matmul_ref(xq, xs, self.weight, self.weight_scale, x.dtype)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)


class Fp8Experts(nn.Module):
    """All experts of a layer, stacked as the fused kernel reads them: w13 = [w1; w3] per expert, then w2."""

    def __init__(self, num_experts: int, hidden: int, inter: int, scheme: str = "block"):
        super().__init__()
        self.scheme = scheme
        if scheme == "block":
            s13, s2 = (num_experts, 2 * inter // 128, hidden // 128), (num_experts, hidden // 128, inter // 128)
        else:
            s13, s2 = (num_experts, 2 * inter, 1), (num_experts, hidden, 1)
        f8 = torch.float8_e4m3fn
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden, dtype=f8), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, inter, dtype=f8), requires_grad=False)
        self.w13_scale = nn.Parameter(torch.empty(s13, dtype=torch.float32), requires_grad=False)
        self.w2_scale = nn.Parameter(torch.empty(s2, dtype=torch.float32), requires_grad=False)

    @property
    def act_group(self) -> int:
        return 128 if self.scheme == "block" else 0

    def forward(self, h: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if h.is_cuda:
            act = fp8_input(h, 128) if self.scheme == "block" else None  # quantized by the norm that made h
            return fp8_moe.fused_moe_fp8(h, self.w13, self.w13_scale, self.w2, self.w2_scale, w, idx,
                                         scheme=self.scheme, x_quant=act)
        return fp8_moe.fused_moe_fp8_ref(h, self.w13, self.w13_scale, self.w2, self.w2_scale, w, idx,
                                         scheme=self.scheme)
