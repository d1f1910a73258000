"""Tensor and expert parallelism: one process per GPU (or CPU rank), each holding and reading only its slice.

    spec = init_parallel(tp=2, ep=2, device="cuda")      # under torchrun (or `quantkit ... --tp 2 --ep 2`)
    model = load_model(ckpt, backend="fp8")               # picks up the active spec: this rank's slice only
    logits = model(tokens, model.new_cache(1, 64))        # same logits on every rank, equal to one process's

World size is max(tp, ep) (arch.check_parallel holds the rules). Rank r holds:
  attention  query and KV heads [t*NH/tp, (t+1)*NH/tp), t = r % tp: q/k/v rows by head, o_proj columns; the
             per-layer QK-norm spans the whole projection width, so its sum of squares is all-reduced over the tp
             group before normalising; the o_proj partial sums are all-reduced over the same group.
  experts    group g = r // (world/ep) of the experts (E/ep each), and within it the slice j = r % (world/ep) of
             every expert's intermediate size; the router runs on every rank (it is small and replicated), each rank
             computes its experts on its slice and the MoE output is all-reduced over the world.
The lm_head is split by vocabulary rows over the world and its logits all-gathered; embeddings, norms and the
router are replicated. At world size 1 nothing here runs: load_model builds the plain model.

Backends slice through a ShardBackend (SHARD_BACKENDS): how to build one linear from a row/column range of a
checkpoint tensor, and one layer's experts from an expert range and an intermediate range. dense and fp8 are
here, and awq (INT4 groups); other formats register theirs with `register_shard_backend`. GGUF files, which hold
their own names and layouts, are cut by runtime.gguf.load_gguf_sharded to the same plan.

`quantkit generate/eval/bench --tp N --ep M` re-run themselves as world processes on this machine with the
environment torchrun gives (`launch`), or join the run an external `torchrun` started (WORLD_SIZE is set).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from quantkit.arch import MiniMaxM2Config, check_parallel
from quantkit.checkpoint import CheckpointReader
from quantkit.errors import QuantkitError
from quantkit.runtime.model import (
    Attention,
    DenseExperts,
    MiniMaxM2,
    attend,
    checkpoint_fp8_scheme,
    decode_attend,
    fuse_qkv,
    norm_rope,
)

Range = tuple[int, int]  # [lo, hi) along one dimension
READ_WINDOW = 512 << 20  # reopen a shard's mapping after this many bytes, as CheckpointReader does


@dataclass(frozen=True)
class ParallelSpec:
    """This rank's place: tp attention shards, ep expert groups, world = max(tp, ep) ranks."""

    tp: int = 1
    ep: int = 1
    rank: int = 0
    world: int = 1
    tp_group: Any = field(default=None, compare=False, repr=False)  # process group of this rank's tp peers

    def __post_init__(self) -> None:
        if self.world != max(self.tp, self.ep) or not 0 <= self.rank < self.world:
            raise QuantkitError(f"--tp {self.tp} --ep {self.ep}: needs world size {max(self.tp, self.ep)}, "
                                f"rank {self.rank} of {self.world} given")

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def inter_split(self) -> int:
        """Ranks that share one expert group, each holding a slice of every expert's intermediate size."""
        return self.world // self.ep

    def heads(self, n: int) -> Range:
        per = n // self.tp
        return self.tp_rank * per, (self.tp_rank + 1) * per

    def experts(self, n: int) -> Range:
        per, g = n // self.ep, self.rank // self.inter_split
        return g * per, (g + 1) * per

    def inter(self, n: int) -> Range:
        per, j = n // self.inter_split, self.rank % self.inter_split
        return j * per, (j + 1) * per

    def slices(self, cfg: MiniMaxM2Config) -> tuple[Range, Range, Range, Range]:
        """This rank's (q rows, k/v rows, experts, intermediate range) of the model: what every loader cuts."""
        D = cfg.head_dim
        (q0, q1), (k0, k1) = self.heads(cfg.num_attention_heads), self.heads(cfg.num_key_value_heads)
        return (q0 * D, q1 * D), (k0 * D, k1 * D), self.experts(cfg.num_local_experts), \
            self.inter(cfg.intermediate_size)


_ACTIVE: ParallelSpec | None = None


def active_spec() -> ParallelSpec | None:
    """The spec init_parallel set up in this process (None in a single-process run)."""
    return _ACTIVE


def is_main() -> bool:
    return _ACTIVE is None or _ACTIVE.rank == 0


def all_reduce(t: torch.Tensor, size: int, group: Any = None) -> torch.Tensor:
    """Sum t in place over the group; a no-op for a group of one."""
    if size > 1:
        dist.all_reduce(t, group=group)
    return t


def init_parallel(tp: int, ep: int, device: str | torch.device = "cpu") -> tuple[ParallelSpec | None, torch.device]:
    """Join the process group torchrun (or `launch`) set up; returns (spec, this rank's device).

    NCCL on GPUs, gloo on the CPU. Returns (None, device) when tp = ep = 1 in a single process.
    """
    global _ACTIVE
    world = max(tp, ep)
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if env_world != world:
        raise QuantkitError(f"--tp {tp} --ep {ep} runs as {world} processes; this launch has WORLD_SIZE={env_world}")
    dev = torch.device(device)
    if world == 1:
        return None, dev
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    if dev.type == "cuda":
        if torch.cuda.device_count() <= local:
            raise QuantkitError(f"rank {rank} needs GPU {local}; this machine has {torch.cuda.device_count()}")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
        atexit.register(_shutdown)
    group = None  # the whole world when tp == world
    if 1 < tp < world:
        for start in range(0, world, tp):  # every rank creates every group, in the same order
            g = dist.new_group(list(range(start, start + tp)))
            if start <= rank < start + tp:
                group = g
    _ACTIVE = ParallelSpec(tp, ep, rank, world, group)
    return _ACTIVE, dev


def _shutdown() -> None:
    """Leave the group together: a gloo rank tearing down while its peer still talks to it can abort the peer."""
    if dist.is_initialized():
        try:
            dist.barrier()
        except Exception:  # a peer already gone: nothing to wait for
            pass
        dist.destroy_process_group()


# ---- reading slices ------------------------------------------------------------------------------------------


class SliceReader:
    """Row/column ranges of checkpoint tensors read straight from the shards (safetensors slices): a rank never
    reads the parts of a tensor that other ranks hold. One mapping open at a time, reopened every READ_WINDOW."""

    def __init__(self, reader: CheckpointReader):
        self.reader = reader
        self.block = reader.block
        self._open: list | None = None  # [file, handle, bytes read]

    def stored(self, name: str, rows: Range | None = None, cols: Range | None = None) -> torch.Tensor:
        """The slice exactly as stored."""
        entry = self.reader.entry(name)
        if self._open is None or self._open[0] != entry.file or self._open[2] > READ_WINDOW:
            self._open = None
            try:
                self._open = [entry.file, safe_open(str(entry.file), framework="pt"), 0]
            except Exception as e:  # safetensors raises its own error types
                raise QuantkitError(f"{entry.file}: cannot open shard ({e})") from None
        r = slice(*rows) if rows else slice(None)
        try:
            sl = self._open[1].get_slice(name)
            t = sl[r] if len(entry.shape) == 1 else sl[r, slice(*cols) if cols else slice(None)]
        except Exception as e:
            raise QuantkitError(f"{entry.file}: cannot read tensor {name!r} ({e})") from None
        self._open[2] += t.numel() * t.element_size()
        return t

    def weight(self, name: str, dtype: torch.dtype, rows: Range | None = None,
               cols: Range | None = None) -> torch.Tensor:
        """The slice as a floating-point weight: FP8 dequantized with the scales of its own rows and columns."""
        if name not in self.reader.entries:  # stored under other names (packed INT4): the reader's whole weight, cut
            w = self.reader.weight(name, dtype)
            return w[slice(*rows) if rows else slice(None)][:, slice(*cols) if cols else slice(None)]
        w = self.stored(name, rows, cols)
        if w.dtype != torch.float8_e4m3fn:
            return w.to(dtype)
        if torch.isnan(w.float()).any():
            raise QuantkitError(f"{self.reader.entry(name).file}: FP8 weight {name!r} holds NaN")
        if self.reader.channel_fp8:
            return (w.float() * self.stored(name + "_scale", rows).float()).to(dtype)
        s = self.stored(name + "_scale_inv").float()
        (r0, r1), (c0, c1) = rows or (0, w.shape[0]), cols or (0, w.shape[1])
        bo, bi = self.block
        s = s[r0 // bo:-(-r1 // bo)].repeat_interleave(bo, 0)[r0 % bo:r0 % bo + (r1 - r0)]
        s = s[:, c0 // bi:-(-c1 // bi)].repeat_interleave(bi, 1)[:, c0 % bi:c0 % bi + (c1 - c0)]
        return (w.float() * s).to(dtype)

    def block_scale(self, name: str, rows: Range | None, cols: Range | None) -> torch.Tensor:
        """The weight_scale_inv tiles of a slice kept in FP8: the slice must start on a tile edge (or lie in one
        tile), so that its own 128x128 tiles are the checkpoint's."""
        shape = self.reader.entry(name).shape
        out = []
        for dim, rng, b in ((0, rows, self.block[0]), (1, cols, self.block[1])):
            lo, hi = rng or (0, shape[dim])
            if lo % b and lo // b != (hi - 1) // b:
                raise QuantkitError(f"{name}: a shard [{lo}, {hi}) of dimension {dim} cuts a {b}-wide FP8 scale "
                                    f"block; choose degrees whose shards are multiples of {b}")
            out.append((lo // b, -(-hi // b) if lo % b == 0 else lo // b + 1))
        return self.stored(name + "_scale_inv", out[0], out[1]).float()


# ---- per-backend slicing ---------------------------------------------------------------------------------------


def _param(t: torch.Tensor, device: torch.device | str) -> nn.Parameter:
    return nn.Parameter(t.to(device), requires_grad=False)


class ShardBackend:
    """How one format builds sliced modules. Subclasses: `linear` and `experts`; `format` names the key of
    arch.SHARD_MULTIPLE whose block size the slices must respect."""

    def __init__(self, src: SliceReader, cfg: MiniMaxM2Config, dtype: torch.dtype, device: torch.device | str,
                 scheme: str | None):
        self.src, self.cfg, self.dtype, self.device, self.scheme = src, cfg, dtype, device, scheme

    @staticmethod
    def format(scheme: str | None) -> str:
        return "bf16"

    def linear(self, name: str, rows: Range | None, cols: Range | None) -> nn.Module:
        raise NotImplementedError

    def experts(self, prefix: str, experts: Range, inter: Range) -> nn.Module:
        """prefix 'model.layers.N.block_sparse_moe.'; returns a module called as experts(h, idx, w) with local ids."""
        raise NotImplementedError


class DenseShards(ShardBackend):
    def linear(self, name: str, rows: Range | None, cols: Range | None) -> nn.Module:
        w = self.src.weight(name, self.dtype, rows, cols)  # [out, in]
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        lin.weight = _param(w, self.device)
        return lin

    def experts(self, prefix: str, experts: Range, inter: Range) -> nn.Module:
        n, i = experts[1] - experts[0], inter[1] - inter[0]
        with torch.device("meta"):
            mod = DenseExperts(dataclasses.replace(self.cfg, num_local_experts=n, intermediate_size=i))
        h = self.cfg.hidden_size
        mod.w1 = _param(torch.empty(n, i, h, dtype=self.dtype, device=self.device), self.device)
        mod.w3 = _param(torch.empty(n, i, h, dtype=self.dtype, device=self.device), self.device)
        mod.w2 = _param(torch.empty(n, h, i, dtype=self.dtype, device=self.device), self.device)
        for k, e in enumerate(range(*experts)):
            p = f"{prefix}experts.{e}."
            mod.w1[k].copy_(self.src.weight(p + "w1.weight", self.dtype, rows=inter))
            mod.w3[k].copy_(self.src.weight(p + "w3.weight", self.dtype, rows=inter))
            mod.w2[k].copy_(self.src.weight(p + "w2.weight", self.dtype, cols=inter))
        return mod


class Fp8Shards(ShardBackend):
    @staticmethod
    def format(scheme: str | None) -> str:
        return "fp8-block" if scheme == "block" else "fp8-channel"

    def _scale(self, name: str, rows: Range | None, cols: Range | None) -> torch.Tensor:
        if self.scheme == "block":
            return self.src.block_scale(name, rows, cols)
        return self.src.stored(name + "_scale", rows).float()  # one scale per output row: columns keep it

    def linear(self, name: str, rows: Range | None, cols: Range | None) -> nn.Module:
        from quantkit.runtime.fp8 import Fp8Linear

        w = self.src.stored(name, rows, cols)
        with torch.device("meta"):
            lin = Fp8Linear(w.shape[1], w.shape[0], self.scheme)
        lin.weight = _param(w, self.device)
        lin.weight_scale = _param(self._scale(name, rows, cols), self.device)
        return lin

    def experts(self, prefix: str, experts: Range, inter: Range) -> nn.Module:
        from quantkit.runtime.fp8 import Fp8Experts

        n, i, h = experts[1] - experts[0], inter[1] - inter[0], self.cfg.hidden_size
        with torch.device("meta"):
            mod = Fp8Experts(n, h, i, self.scheme)
        for pname in ("w13", "w2", "w13_scale", "w2_scale"):
            meta = getattr(mod, pname)
            setattr(mod, pname, _param(torch.empty(meta.shape, dtype=meta.dtype, device=self.device), self.device))
        for k, e in enumerate(range(*experts)):
            p = f"{prefix}experts.{e}."
            w1, w3 = p + "w1.weight", p + "w3.weight"
            mod.w13[k].copy_(torch.cat([self.src.stored(w1, inter), self.src.stored(w3, inter)]))
            mod.w13_scale[k].copy_(torch.cat([self._scale(w1, inter, None), self._scale(w3, inter, None)]))
            mod.w2[k].copy_(self.src.stored(p + "w2.weight", cols=inter))
            mod.w2_scale[k].copy_(self._scale(p + "w2.weight", None, inter))
        return mod


class AwqShards(DenseShards):
    """INT4 groups. Each packed linear's codes, scales and zero points ([out, in], [out, in/g], [out, in/g], the
    reader's `codes`) are cut to the rank's rows and columns (whole groups along the input) and packed into the
    layouts the W4A16 modules hold. Packed tensors are read whole (the reader unpacks them) and cut; linears stored
    dense are sliced as the dense backend slices them."""

    @staticmethod
    def format(scheme: str | None) -> str:
        return "awq"

    def _codes(self, name: str, rows: Range | None, cols: Range | None) -> tuple[torch.Tensor, ...]:
        reader, group = self.src.reader, self.src.reader.awq[1]
        q, scales, zeros = reader.codes(name)  # [out, in], [out, in/g], [out, in/g]
        base = name[: -len("weight")]
        stored = reader.entry(base + "scales" if base + "scales" in reader else base + "weight_scale").torch_dtype
        if rows:
            q, scales, zeros = q[slice(*rows)], scales[slice(*rows)], zeros[slice(*rows)]
        if cols:
            lo, hi = cols
            if lo % group or hi % group:
                raise QuantkitError(f"{name}: input columns [{lo}, {hi}) cut a group of {group}")
            q, scales, zeros = q[:, lo:hi], scales[:, lo // group:hi // group], zeros[:, lo // group:hi // group]
        return q, scales.to(stored), zeros  # scales exact in their stored 16-bit dtype

    def linear(self, name: str, rows: Range | None, cols: Range | None) -> nn.Module:
        from quantkit.kernels.w4a16_gemm import pack_kmajor
        from quantkit.runtime.awq import AwqLinear

        if not self.src.reader.is_packed(name):  # a recipe may keep attention dense
            return super().linear(name, rows, cols)
        q, scales, zeros = self._codes(name, rows, cols)
        with torch.device("meta"):
            lin = AwqLinear(q.shape[1], q.shape[0], self.src.reader.awq[1], scales.dtype)
        lin.qweight, lin.zeros, lin.scales = (t.to(self.device) for t in pack_kmajor(q, scales, zeros))  # buffers
        return lin

    def experts(self, prefix: str, experts: Range, inter: Range) -> nn.Module:
        from quantkit.kernels.w4a16_gemm import pack_kmajor
        from quantkit.runtime.awq import AwqExperts

        if not self.src.reader.is_packed(prefix + "experts.0.w1.weight"):
            return super().experts(prefix, experts, inter)
        n, i, h = experts[1] - experts[0], inter[1] - inter[0], self.cfg.hidden_size
        mod = None
        for k, e in enumerate(range(*experts)):
            p = f"{prefix}experts.{e}."
            w1, w3 = self._codes(p + "w1.weight", inter, None), self._codes(p + "w3.weight", inter, None)
            w2 = self._codes(p + "w2.weight", None, inter)
            if mod is None:
                with torch.device("meta"):
                    mod = AwqExperts(n, h, i, self.src.reader.awq[1], w1[1].dtype)
                for name, meta in list(mod.named_buffers()):
                    setattr(mod, name, torch.empty(meta.shape, dtype=meta.dtype, device=self.device))
            mod.set_expert(k, *(tuple(t.to(self.device) for t in pack_kmajor(*w)) for w in (w1, w3, w2)))
        return mod


SHARD_BACKENDS: dict[str, type[ShardBackend]] = {"dense": DenseShards, "fp8": Fp8Shards, "awq": AwqShards}


def register_shard_backend(name: str, cls: type[ShardBackend]) -> None:
    SHARD_BACKENDS[name] = cls


def shard_format(reader: CheckpointReader, backend: str) -> tuple[str, str, str | None]:
    """(resolved backend, arch.SHARD_MULTIPLE key, FP8 scheme or None) for a checkpoint run on a backend."""
    if getattr(reader, "awq", None) is not None:  # an INT4 checkpoint: load_model's "auto" picks awq
        backend = "awq" if backend == "auto" else backend
    scheme = checkpoint_fp8_scheme(reader) if backend != "awq" else None
    if backend == "auto":
        backend = "fp8" if scheme else "dense"
    if backend not in SHARD_BACKENDS:
        raise QuantkitError(f"backend {backend!r} cannot be split over ranks yet (known: {', '.join(SHARD_BACKENDS)})")
    return backend, SHARD_BACKENDS[backend].format(scheme), scheme


# ---- the sharded model -----------------------------------------------------------------------------------------


def tp_rstds(xs: list[torch.Tensor], widths: list[int], eps: float, spec: ParallelSpec) -> list[torch.Tensor]:
    """1/rms [..., 1] fp32 of tensors whose last dimension is split across the tp group (x [..., width/tp] holds
    this rank's part): the sums of squares of all of them in one all-reduce, each over its full width."""
    ss = all_reduce(torch.cat([x.float().pow(2).sum(-1, keepdim=True) for x in xs], -1), spec.tp, spec.tp_group)
    return [torch.rsqrt(ss[..., i:i + 1] / n + eps) for i, n in enumerate(widths)]


class ShardedAttention(nn.Module):
    """Attention over this rank's heads; q/k/v/o projections and the QK-norm gains are set by the loader."""

    def __init__(self, cfg: MiniMaxM2Config, spec: ParallelSpec):
        super().__init__()
        self.cfg, self.spec = cfg, spec
        self.heads, self.kv_heads = cfg.num_attention_heads // spec.tp, cfg.num_key_value_heads // spec.tp
        self.q_proj = self.k_proj = self.v_proj = self.o_proj = None
        self.qkv_proj: nn.Module | None = None  # set by fuse_qkv in place of the three

    qkv = Attention.qkv

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache, layer: int,
                mask: torch.Tensor) -> torch.Tensor:
        cfg, spec, D = self.cfg, self.spec, self.cfg.head_dim
        B, T, _ = x.shape
        q, k, v = self.qkv(x)  # [B, T, NH/tp*D], [B, T, NKV/tp*D] x 2
        rq, rk = tp_rstds([q, k], [cfg.q_width, cfg.kv_width], cfg.rms_norm_eps, spec)
        out = decode_attend(cache, layer, q, k, v, self.heads, self.kv_heads,
                            (self.q_norm, self.k_norm, cos[:, 0], sin[:, 0], cfg.rms_norm_eps, rq, rk), self.o_proj)
        if out is not None:  # QK-norm (1/rms over all ranks), rotary, cache write, attention: one launch
            return all_reduce(self.o_proj(out), spec.tp, spec.tp_group)
        q = norm_rope(q, self.q_norm, cos, sin, self.heads, cfg.rms_norm_eps, rq)  # [B, NH/tp, T, D]
        k = norm_rope(k, self.k_norm, cos, sin, self.kv_heads, cfg.rms_norm_eps, rk)
        v = v.view(B, T, self.kv_heads, D).transpose(1, 2)
        out = attend(q, *cache.update(layer, k, v), mask, D ** -0.5)
        y = self.o_proj(out.transpose(1, 2).reshape(B, T, self.heads * D))  # partial sum over this rank's heads
        return all_reduce(y, spec.tp, spec.tp_group)


class ExpertShard(nn.Module):
    """This rank's experts (ids [lo, lo + n)) on its intermediate slice; the MoE output summed over the world."""

    def __init__(self, inner: nn.Module, lo: int, n: int, spec: ParallelSpec):
        super().__init__()
        self.inner, self.lo, self.n, self.spec = inner, lo, n, spec

    @property
    def act_group(self) -> int:  # the inner experts' (model.act_group): h reaches them as it came
        return getattr(self.inner, "act_group", 0)

    def forward(self, h: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.spec.ep > 1:  # other ranks' experts route nowhere here (-1)
            local = idx - self.lo
            idx = torch.where((local >= 0) & (local < self.n), local, -1)
        return all_reduce(self.inner(h, idx, w), self.spec.world)


class VocabShardHead(nn.Module):
    """lm_head rows [r*V/world, (r+1)*V/world) on rank r; the logits all-gathered over the world. Each rank then
    reads 1/world of the head's weights per step instead of all of them."""

    def __init__(self, weight: nn.Parameter | None, vocab: int, spec: ParallelSpec, proj: nn.Module | None = None):
        super().__init__()
        self.weight, self.vocab, self.spec = weight, vocab, spec
        self.proj = proj  # the rows as a module of another format (a GGUF head), in place of weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = (self.proj(x) if self.proj is not None else F.linear(x, self.weight)).contiguous()  # [..., V/world]
        parts = [torch.empty_like(local) for _ in range(self.spec.world)]
        dist.all_gather(parts, local)
        return torch.cat(parts, dim=-1)  # [..., V]


class ShardedMiniMaxM2(MiniMaxM2):
    """MiniMaxM2 whose attention and experts hold one rank's slice; the cache holds this rank's KV heads."""

    def __init__(self, cfg: MiniMaxM2Config, spec: ParallelSpec):
        super().__init__(cfg)
        self.spec = spec
        self.kv_heads = cfg.num_key_value_heads // spec.tp

    def new_cache(self, batch: int, max_len: int):
        from quantkit.runtime.model import KVCache

        shape = (batch, self.kv_heads, max_len, self.cfg.head_dim)
        n = self.cfg.num_hidden_layers
        return KVCache(k=[torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n)],
                       v=[torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n)],
                       valid=torch.zeros(batch, max_len, dtype=torch.bool, device=self.device))


SublayerIO = list[tuple[str, int, torch.Tensor, torch.Tensor]]  # (attn | moe, layer, input, output), call order


@contextlib.contextmanager
def sublayer_io(model: MiniMaxM2, feed: SublayerIO | None = None):
    """Record every attention and MoE call of a model (plain or sharded) as (kind, layer, input, output) on the CPU,
    in call order. With `feed` (another model's record of the same calls), each sublayer is run on the input the
    other model gave that call instead of its own: teacher forcing, so that sublayers are compared one at a time.

    Why: with W8A8 activations and top-k routing the model is discontinuous. A sharded run sums the o_proj, QK-norm
    and expert partials in another order than one process does (fp32 rounding, ~1e-7); that flips an FP8 rounding
    of some activation now and then, the flip moves a later token's router past a near-tie, and the logits at that
    token change by O(1). End-to-end logits therefore bound nothing at real widths; sublayers fed the same input
    agree to rounding (a rare FP8 flip of the o_proj input at most), and a slicing error still shows in full.

        with sublayer_io(ref_model) as ref: ref_model(tokens, cache)
        with sublayer_io(rank_model, feed=ref) as got: rank_model(tokens, cache)   # got[i] against ref[i]
    """
    record: SublayerIO = []
    handles = []

    def pre(kind: str, layer: int):
        def hook(mod: nn.Module, args: tuple) -> tuple | None:
            if feed is None:
                return None
            k, n, x, _ = feed[len(record)]
            if (k, n) != (kind, layer) or x.shape != args[0].shape:
                raise QuantkitError(f"teacher forcing: call {len(record)} is {kind} {layer} {tuple(args[0].shape)}, "
                                    f"the feed has {k} {n} {tuple(x.shape)}")
            return (x.to(args[0].device, args[0].dtype), *args[1:])
        return hook

    def post(kind: str, layer: int):
        def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
            record.append((kind, layer, args[0].detach().cpu().clone(), out.detach().cpu().clone()))
        return hook

    for n, block in enumerate(model.layers):
        for kind, mod in (("attn", block.self_attn), ("moe", block.moe)):
            handles += [mod.register_forward_pre_hook(pre(kind, n)), mod.register_forward_hook(post(kind, n))]
    try:
        yield record
    finally:
        for h in handles:
            h.remove()


def load_sharded(reader: CheckpointReader, dtype: torch.dtype, device: str | torch.device, backend: str,
                 spec: ParallelSpec) -> ShardedMiniMaxM2:
    """Build this rank's model, reading only its slices (load_model calls this when the world is larger than 1)."""
    cfg = reader.config
    backend, fmt, scheme = shard_format(reader, backend)
    check_parallel(cfg, fmt, spec.tp, spec.ep)
    src = SliceReader(reader)
    shards = SHARD_BACKENDS[backend](src, cfg, dtype, device, scheme)
    with torch.device("meta"):
        model = ShardedMiniMaxM2(cfg, spec)

    def get(name: str, dt: torch.dtype = dtype, rows: Range | None = None) -> nn.Parameter:
        return _param(src.weight(name, dt, rows), device)

    qrows, kvrows, experts, inter = spec.slices(cfg)
    model.embed_tokens.weight = get("model.embed_tokens.weight")
    model.norm = get("model.norm.weight")
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    if cfg.vocab_size % spec.world == 0:
        per = cfg.vocab_size // spec.world
        model.lm_head = VocabShardHead(get(head, rows=(spec.rank * per, (spec.rank + 1) * per)), cfg.vocab_size, spec)
    else:  # a vocabulary the world does not divide: every rank holds the whole head
        model.lm_head.weight = get(head)
    for n, block in enumerate(model.layers):
        p, m = f"model.layers.{n}.", f"model.layers.{n}.block_sparse_moe."
        block.input_layernorm = get(p + "input_layernorm.weight")
        block.post_attention_layernorm = get(p + "post_attention_layernorm.weight")
        att = ShardedAttention(cfg, spec)
        att.q_proj = shards.linear(p + "self_attn.q_proj.weight", qrows, None)
        att.k_proj = shards.linear(p + "self_attn.k_proj.weight", kvrows, None)
        att.v_proj = shards.linear(p + "self_attn.v_proj.weight", kvrows, None)
        att.o_proj = shards.linear(p + "self_attn.o_proj.weight", None, qrows)
        att.q_norm = get(p + "self_attn.q_norm.weight", rows=qrows)
        att.k_norm = get(p + "self_attn.k_norm.weight", rows=kvrows)
        block.self_attn = att
        block.moe.gate = get(m + "gate.weight", torch.float32)  # the router stays fp32, replicated
        block.moe.bias = get(m + "e_score_correction_bias", torch.float32)
        block.moe.experts = ExpertShard(shards.experts(m, experts, inter), experts[0], experts[1] - experts[0], spec)
    reader.close()
    if torch.device(device).type == "cuda":
        fuse_qkv(model)
    return model.eval().requires_grad_(False)


# ---- launching --------------------------------------------------------------------------------------------------


def check_degrees(ckpt: str, backend: str, tp: int, ep: int) -> None:
    """The up-front check of --tp/--ep against the checkpoint and backend: one QuantkitError line, before any
    process starts."""
    from quantkit.runtime.gguf import GGUFModelFile, config_from_gguf, find_gguf

    path = find_gguf(ckpt)
    if path is not None:
        f = GGUFModelFile(path)
        check_parallel(config_from_gguf(f), f.shard_format(), tp, ep)
        return
    from quantkit.formats.awq import open_awq_reader

    reader = open_awq_reader(ckpt) or CheckpointReader(ckpt)  # as load_model opens it
    _, fmt, _ = shard_format(reader, backend)
    check_parallel(reader.config, fmt, tp, ep)


def rank_threads(world: int) -> int:
    """CPU threads per local rank: OMP_NUM_THREADS where set, else the cores shared out over the ranks. Every rank
    running one thread per core makes the OpenMP pools of the ranks spin against each other (torchrun sets 1 for
    the same reason); a share keeps gloo runs on the CPU fast."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else max(1, (os.cpu_count() or 1) // world)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, argv: list[str]) -> int:
    """Run `python -m quantkit.cli ARGV` as `world` local processes with torchrun's environment (RANK, LOCAL_RANK,
    WORLD_SIZE, MASTER_ADDR/PORT). Rank 0 talks to the terminal; the others' stderr is shown only if they fail.
    When one rank fails the others are stopped (they would wait on a collective forever). Returns the exit code."""
    port = _free_port()
    procs, logs = [], []
    for r in range(world):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": str(rank_threads(world))}
        log = None if r == 0 else tempfile.TemporaryFile(mode="w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, "-m", "quantkit.cli", *argv], env=env,
                                      stdout=None if r == 0 else subprocess.DEVNULL, stderr=log))
    rc = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed:
                rc = failed[0].returncode
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        rc = 130
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    rc = rc or next((p.returncode for p in procs if p.returncode), 0)
    if procs[0].returncode in (0, None, -15) and rc:  # rank 0 said nothing: show the rank that failed
        for p, log in zip(procs[1:], logs[1:]):
            if p.returncode not in (0, -15):
                log.seek(0)
                lines = [ln for ln in log.read().splitlines() if ln.strip()]
                sys.stderr.write("\n".join(lines[-20:]) + "\n")
                break
    for log in logs[1:]:
        log.close()
    return rc if rc > 0 else 1 if rc else 0


def spawn(fn, world: int, *args: Any) -> None:
    """Run fn(*args) in `world` local processes, each with torchrun's environment, so that fn can call
    init_parallel (tests and check scripts). Raises if any process fails."""
    torch.multiprocessing.spawn(_spawned, args=(world, _free_port(), fn, args), nprocs=world, join=True)


def _spawned(rank: int, world: int, port: int, fn, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(rank_threads(world))
    fn(*args)
    _shutdown()


def cli_parallel(ckpt: str, backend: str, tp: int, ep: int, device: str) -> tuple[ParallelSpec | None, str]:
    """For the CLI: (spec, device) of this process. Outside a launcher with tp or ep above 1, checks the degrees,
    re-runs the command as world processes and exits with their code; under one, joins its process group."""
    if tp < 1 or ep < 1:
        raise QuantkitError(f"--tp {tp} --ep {ep}: degrees must be positive")
    world = max(tp, ep)
    if "WORLD_SIZE" not in os.environ:
        if world == 1:
            return None, device
        check_degrees(ckpt, backend, tp, ep)
        if device.startswith("cuda") and torch.cuda.device_count() < world:
            raise QuantkitError(f"--tp {tp} --ep {ep} needs {world} GPUs; {torch.cuda.device_count()} visible")
        sys.exit(launch(world, sys.argv[1:]))
    env_world = int(os.environ["WORLD_SIZE"])
    if world == 1 and env_world > 1:  # under an external torchrun without degrees: split the heads
        tp = env_world
    spec, dev = init_parallel(tp, ep, device)
    return spec, str(dev)
