"""AWQ / W4A16 backend: attention projections and experts kept as 4-bit groups, computed with 16-bit activations.

    model = load_model("ckpt-awq", backend="awq")       # AutoAWQ GEMM or compressed-tensors pack-quantized

Every packed linear is repacked once at load, from either on-disk layout (AutoAWQ GEMM or compressed-tensors), to
the K-major layout kernels/w4a16_moe.py reads (qweight int32 [out, in/8] with eight input codes per word, zeros uint8
and scales [out, in/g]; see that module for why it streams several times faster at decode sizes than AutoAWQ's
[in, out/8]). Attention projections run through its w4a16_kmajor_linear (q/k/v fused into one), experts through its
fused MoE, stacked per layer with w1 and w3 one above the other: w13 [E, 2I, H/8], w2 [E, H, I/8]. The repack is
torch ops on the load device (scripts/bench_w4a16.py measures it on a GPU: a few milliseconds per MoE layer); scales
keep their stored dtype.

On a GPU the Triton kernels run. On the CPU each forward dequantizes the weights it needs and computes exactly as
the dense model does (same ops, same layouts), so a checkpoint run here equals, bit for bit, the dense model built
from its dequantized weights: that is what the runtime tests check, and what evaluations on the CPU measure.
Linears the checkpoint stores dense (attention kept in BF16 by a recipe) stay nn.Linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.arch import MiniMaxM2Config
from quantkit.formats.awq import PACK, AwqCheckpointReader
from quantkit.kernels import w4a16_gemm, w4a16_moe


class AwqLinear(nn.Module):
    """y = x W^T with W [out, in] held K-major: qweight int32 [out, in/8], zeros uint8 [out, in/g], scales [out, in/g]
    (kernels/w4a16_gemm.py, `pack_kmajor`), repacked at load from either on-disk layout."""

    def __init__(self, in_features: int, out_features: int, group: int = 128,
                 scale_dtype: torch.dtype = torch.float16):
        super().__init__()
        self.in_features, self.out_features, self.group = in_features, out_features, group
        # buffers: the model's dtype cast leaves them be
        self.register_buffer("qweight", torch.empty(out_features, in_features // PACK, dtype=torch.int32))
        self.register_buffer("zeros", torch.empty(out_features, in_features // group, dtype=torch.uint8))
        self.register_buffer("scales", torch.empty(out_features, in_features // group, dtype=scale_dtype))

    @classmethod
    def cat(cls, mods: list[AwqLinear]) -> AwqLinear | None:
        """One AwqLinear of mods' outputs side by side (runtime.model.fuse_linears): K-major rows are outputs, so the
        tensors stack along their first dimension as they are."""
        first = mods[0]
        if any(m.in_features != first.in_features or m.group != first.group or m.scales.dtype != first.scales.dtype
               for m in mods):
            return None
        with torch.device("meta"):
            fused = cls(first.in_features, sum(m.out_features for m in mods), first.group, first.scales.dtype)
        for name in ("qweight", "zeros", "scales"):
            setattr(fused, name, torch.cat([getattr(m, name) for m in mods]))
        return fused

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W [out, in] in dtype, contiguous as nn.Linear holds it."""
        return w4a16_gemm.kmajor_dequantize_ref(self.qweight, self.zeros, self.scales).to(dtype)

    def load(self, reader: AwqCheckpointReader, name: str) -> None:
        for buf, t in zip((self.qweight, self.zeros, self.scales), _kmajor_tensors(reader, name, self.qweight.device)):
            buf.copy_(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return w4a16_moe.w4a16_kmajor_linear(x, self.qweight, self.zeros, self.scales)
        return F.linear(x, self.dense_weight(x.dtype))


def _kmajor_tensors(reader: AwqCheckpointReader, name: str,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qweight int32 [out, in/8], zeros uint8 [out, in/g], scales [out, in/g]) of a packed linear, K-major."""
    if reader.awq[0] == "autoawq":
        return w4a16_gemm.awq_to_kmajor(*reader.awq_tensors(name, device))
    q, _, z = reader.codes(name, device)  # codes and zero points; the scales as stored (no rounding through fp32)
    scales = reader.tensor(name[: -len("weight")] + "weight_scale").to(device)
    return w4a16_gemm.pack_kmajor(q, scales, z)


class AwqExperts(nn.Module):
    """All experts of a layer in the K-major layout the fused kernel reads: w13 = [w1; w3] along the output, then w2."""

    def __init__(self, num_experts: int, hidden: int, inter: int, group: int = 128,
                 scale_dtype: torch.dtype = torch.float16):
        super().__init__()
        self.inter = inter
        for prefix, n, k in (("w13_", 2 * inter, hidden), ("w2_", hidden, inter)):
            self.register_buffer(prefix + "qweight", torch.empty(num_experts, n, k // PACK, dtype=torch.int32))
            self.register_buffer(prefix + "zeros", torch.empty(num_experts, n, k // group, dtype=torch.uint8))
            self.register_buffer(prefix + "scales", torch.empty(num_experts, n, k // group, dtype=scale_dtype))

    def load_expert(self, reader: AwqCheckpointReader, e: int, prefix: str) -> None:
        """Expert e from `prefix` w1/w3/w2 (prefix = "model.layers.N.block_sparse_moe.experts.E."), repacked."""
        dev = self.w13_qweight.device
        self.set_expert(e, *(_kmajor_tensors(reader, prefix + w + ".weight", dev) for w in ("w1", "w3", "w2")))

    def set_expert(self, e: int, w1: tuple[torch.Tensor, ...], w3: tuple[torch.Tensor, ...],
                   w2: tuple[torch.Tensor, ...]) -> None:
        """Expert e from K-major triplets (qweight, zeros, scales) of w1, w3 [I, H/8..] and w2 [H, I/8..]; AutoAWQ
        triplets go through w4a16_gemm.awq_to_kmajor first."""
        for buf, a, b in zip((self.w13_qweight, self.w13_zeros, self.w13_scales), w1, w3):
            buf[e].copy_(torch.cat([a, b], dim=0))  # gate rows [0, I), up rows [I, 2I)
        for buf, t in zip((self.w2_qweight, self.w2_zeros, self.w2_scales), w2):
            buf[e].copy_(t)

    def forward(self, h: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """h [N, H], idx and w [N, K] -> [N, H]; ids < 0 route the slot nowhere."""
        if h.is_cuda:
            return w4a16_moe.fused_moe_w4a16(h, self.w13_qweight, self.w13_zeros, self.w13_scales, self.w2_qweight,
                                             self.w2_zeros, self.w2_scales, w, idx)
        # the dense model's loop (DenseExperts), on each touched expert's dequantized weights in its layouts
        i = self.inter
        out = torch.zeros_like(h)
        for e in idx.unique().tolist():
            if e < 0:
                continue
            rows, slot = (idx == e).nonzero(as_tuple=True)
            x = h[rows]
            w13 = w4a16_gemm.kmajor_dequantize_ref(self.w13_qweight[e], self.w13_zeros[e], self.w13_scales[e])
            w1 = w13[:i].to(h.dtype)  # [I, H]
            w3 = w13[i:].to(h.dtype)
            w2 = w4a16_gemm.kmajor_dequantize_ref(self.w2_qweight[e], self.w2_zeros[e], self.w2_scales[e])
            w2 = w2.to(h.dtype)  # [H, I]
            y = (F.silu(x @ w1.t()) * (x @ w3.t())) @ w2.t()
            out.index_add_(0, rows, y * w[rows, slot, None].to(y.dtype))
        return out


def install(model: nn.Module, reader: AwqCheckpointReader) -> None:
    """Swap in AwqLinear / AwqExperts (on the meta device, before the weights are loaded) wherever the checkpoint
    stores a layer's weights packed; what it stores dense keeps the dense modules."""
    cfg: MiniMaxM2Config = reader.config
    _, group, _ = reader.awq
    h, q, kv = cfg.hidden_size, cfg.q_width, cfg.kv_width

    def scale_dtype(name: str) -> torch.dtype:
        base = name[: -len("weight")]
        key = base + "scales" if base + "scales" in reader else base + "weight_scale"
        return reader.entry(key).torch_dtype

    for n, block in enumerate(model.layers):
        p = f"model.layers.{n}."
        att = block.self_attn
        for proj, (fin, fout) in {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}.items():
            name = f"{p}self_attn.{proj}.weight"
            if reader.is_packed(name):
                setattr(att, proj, AwqLinear(fin, fout, group, scale_dtype(name)))
        first = f"{p}block_sparse_moe.experts.0.w1.weight"
        if reader.is_packed(first):
            block.moe.experts = AwqExperts(cfg.num_local_experts, h, cfg.intermediate_size, group,
                                           scale_dtype(first))
