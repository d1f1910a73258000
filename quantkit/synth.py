"""`quantkit make-checkpoint`: complete, seeded MiniMax-M2 checkpoints for tests and benchmarks.

    make_checkpoint("tiny-ckpt", preset="tiny")                                   # 2 layers, a few MB
    make_checkpoint("m2-slice", preset="minimax-m2", layers=2, dtype="fp8")       # real widths, official FP8 layout
    make_checkpoint("m2-int4", preset="minimax-m2", layers=2, dtype="awq")        # INT4 W4A16, AutoAWQ layout

The folder is what a Hugging Face release holds: config.json and generation_config.json in the release's
layout, a byte-level BPE tokenizer, sharded safetensors and the index. Every tensor is drawn from a generator
seeded by (seed, tensor name), so a tensor does not depend on which others were generated, and the writer
streams them: a real-width layer is never in memory at once.

In `fp8` checkpoints each 128x128 tile holds an element at +-448 and its scale has four significant bits, so
W = fp8 x scale is exact in BF16 and re-quantizing the BF16 weights with scale = amax / 448 gives back the same
bytes: conversions through BF16 can then be checked bit for bit. `awq` checkpoints hold the round-to-nearest INT4
(groups of 128, asymmetric, AutoAWQ GEMM layout) of the bf16 checkpoint of the same seed for every attention and
expert projection; router gates and the head stay as they are.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from quantkit import tokenizer as tok
from quantkit.arch import MiniMaxM2Config
from quantkit.checkpoint import OutputFolder, OutTensor, plan_shards
from quantkit.checkpoint.safetensors_file import DTYPE_NAMES
from quantkit.errors import QuantkitError
from quantkit.formats.awq import GROUP as AWQ_GROUP

PRESETS = {
    "tiny": dict(hidden_size=256, intermediate_size=256, num_local_experts=16, num_experts_per_tok=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64, rotary_dim=32, num_hidden_layers=2,
                 vocab_size=2048, max_position_embeddings=4096, tokenizer_vocab=2048),
    "minimax-m2": dict(hidden_size=3072, intermediate_size=1536, num_local_experts=256, num_experts_per_tok=8,
                       num_attention_heads=48, num_key_value_heads=8, head_dim=128, rotary_dim=64,
                       num_hidden_layers=62, vocab_size=200064, max_position_embeddings=196608, tokenizer_vocab=4096),
}
FP8_BLOCK = (128, 128)
FP8_MAX = 448.0


@dataclass(frozen=True)
class Init:
    std: float = 0.02
    norm_jitter: float = 0.1  # norm gains 1 + N(0, jitter): a test that swaps or drops a norm must fail
    bias_std: float = 0.5  # routing correction bias large enough to change which experts are picked


# Each preset's initialization. At real width a gate of std 0.02 gives router logits of std ~1.1 (sigmoid scores
# spread ~0.2), so a correction bias of std 0.5 would outweigh them and send every token to the same few dozen of 256
# experts whatever the batch; a trained MiniMax-M2's bias balances the load instead. With std 0.05 the bias still
# changes picks, and 128 tokens reach ~210 experts (~250 without it) as a load-balanced router's would: the
# serving benchmark's MoE then reads what a real model's reads at each concurrency.
PRESET_INIT = {"minimax-m2": Init(bias_std=0.05)}


def release_config(preset: str, layers: int | None, fp8: bool, special_ids: dict) -> dict:
    p = dict(PRESETS[preset])
    p.pop("tokenizer_vocab")
    if layers is not None:
        p["num_hidden_layers"] = layers
    n = p["num_hidden_layers"]
    cfg = {
        "architectures": ["MiniMaxM2ForCausalLM"],
        "model_type": "minimax_m2",
        "attn_type_list": [1] * n,
        "hidden_act": "silu",
        **p,
        "rope_theta": 5000000,
        "rms_norm_eps": 1e-06,
        "use_qk_norm": True,
        "qk_norm_type": "per_layer",
        "scoring_func": "sigmoid",
        "use_routing_bias": True,
        "shared_intermediate_size": 0,
        "use_mtp": True,
        "num_mtp_modules": 3,
        "mtp_transformer_layers": 1,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": special_ids["bos_token_id"],
        "eos_token_id": special_ids["eos_token_id"],
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.1",
    }
    if fp8:
        cfg["quantization_config"] = {
            "activation_scheme": "dynamic",
            "fmt": "float8_e4m3fn",
            "quant_method": "fp8",
            "weight_block_size": list(FP8_BLOCK),
            "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"],
        }
    return cfg


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _float_tensor(kind: str, shape: tuple[int, ...], g: torch.Generator, init: Init,
                  dtype: torch.dtype) -> torch.Tensor:
    """Gaussian values drawn in fp32 blocks of rows and stored in dtype, so a 200064-row embedding never
    exists in fp32 in full."""
    out = torch.empty(shape, dtype=dtype)
    rows = out.view(shape[0], -1)
    step = max(1, (16 << 20) // max(1, rows.shape[1]))
    for lo in range(0, shape[0], step):
        block = torch.randn(rows[lo:lo + step].shape, generator=g)
        if kind in ("norm", "qk_norm"):
            block = 1.0 + init.norm_jitter * block
        elif kind == "router_bias":
            block = init.bias_std * block
        else:
            block = init.std * block
        rows[lo:lo + step] = block
    return out


def _four_bit(x: torch.Tensor) -> torch.Tensor:
    """Round positive values to four significant bits."""
    m, e = torch.frexp(x)
    return torch.ldexp(torch.round(m * 16) / 16, e)


def fp8_weight(shape: tuple[int, int], g: torch.Generator, std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A block-FP8 weight [out, in] and its weight_scale_inv, in the official layout (see the module docstring)."""
    rows, cols = shape
    rb, cb = -(-rows // FP8_BLOCK[0]), -(-cols // FP8_BLOCK[1])
    q = torch.randn(rb * FP8_BLOCK[0], cb * FP8_BLOCK[1], generator=g).mul_(FP8_MAX / 4).clamp_(-FP8_MAX, FP8_MAX)
    tiles = q.view(rb, FP8_BLOCK[0], cb, FP8_BLOCK[1])
    sign = torch.where(torch.rand(rb, cb, generator=g) < 0.5, -1.0, 1.0)
    tiles[:, 0, :, 0] = FP8_MAX * sign
    scale = _four_bit(std / (FP8_MAX / 4) * torch.exp(0.25 * torch.randn(rb, cb, generator=g)))
    return q[:rows, :cols].to(torch.float8_e4m3fn).contiguous(), scale


def make_checkpoint(out: str | Path, preset: str = "tiny", layers: int | None = None, dtype: str = "bf16",
                    seed: int = 0, max_shard_bytes: int = 2 * 10**9, force: bool = False,
                    init: Init | None = None, progress: bool = False, workers: int | None = None) -> MiniMaxM2Config:
    """Write the checkpoint; `workers` threads (default: one per core, at most 16) draw the tensors ahead of the
    writer. The bytes do not depend on `workers`. `init` defaults to the preset's (PRESET_INIT, else Init())."""
    if preset not in PRESETS:
        raise QuantkitError(f"--preset {preset!r}: known presets are {', '.join(PRESETS)}")
    init = init if init is not None else PRESET_INIT.get(preset, Init())
    if dtype not in ("bf16", "fp8", "awq"):
        raise QuantkitError(f"--dtype {dtype!r}: choose bf16, fp8 or awq")
    if layers is not None and layers < 1:
        raise QuantkitError(f"--layers {layers}: at least one layer")
    fp8 = dtype == "fp8"
    out = Path(out)
    workers = workers if workers is not None else min(16, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        special = tok.write_tokenizer(tmp, PRESETS[preset]["tokenizer_vocab"])
        aux = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
    raw = release_config(preset, layers, fp8, special)
    cfg = MiniMaxM2Config.from_dict(raw)
    awq = dtype == "awq"
    if awq:  # round-to-nearest INT4 of the bf16 checkpoint of the same seed, in AutoAWQ's GEMM layout
        from quantkit.formats.awq import quantization_config_autoawq

        keep = ["lm_head"] + [s.name.removesuffix(".weight") for u in cfg.units() for s in u.tensors
                              if s.kind == "router"]
        raw["quantization_config"] = quantization_config_autoawq(keep)
    generation = {"bos_token_id": special["bos_token_id"], "eos_token_id": special["eos_token_id"],
                  "do_sample": True, "temperature": 1.0, "top_p": 0.95, "top_k": 40}
    aux["config.json"] = (json.dumps(raw, indent=2) + "\n").encode()
    aux["generation_config.json"] = (json.dumps(generation, indent=2) + "\n").encode()

    # every output tensor, in file order, and the group it is drawn with: a weight's scales come from its generator
    tensors: list[OutTensor] = []
    order: list[OutTensor] = []  # the first tensor of each group
    lead: dict[str, OutTensor] = {}  # tensor name -> the first of its group
    kinds: dict[str, str] = {}

    def group(*members: OutTensor) -> None:
        tensors.extend(members)
        order.append(members[0])
        lead.update((m.name, members[0]) for m in members)

    for unit in cfg.units():
        for spec in unit.tensors:
            kinds[spec.name] = spec.kind
            if fp8 and spec.is_linear:
                sshape = tuple(math.ceil(d / b) for d, b in zip(spec.shape, FP8_BLOCK))
                group(OutTensor(spec.name, "F8_E4M3", spec.shape, unit.name),
                      OutTensor(spec.name + "_scale_inv", "F32", sshape, unit.name))
            elif awq and spec.is_linear:
                n_out, n_in = spec.shape
                base = spec.name.removesuffix("weight")
                kinds[base + "qweight"] = spec.kind
                group(OutTensor(base + "qweight", "I32", (n_in, n_out // 8), unit.name),
                      OutTensor(base + "qzeros", "I32", (n_in // AWQ_GROUP, n_out // 8), unit.name),
                      OutTensor(base + "scales", "F16", (n_in // AWQ_GROUP, n_out), unit.name))
            else:
                keep32 = fp8 and spec.kind in ("router", "router_bias")
                group(OutTensor(spec.name, "F32" if keep32 else "BF16", spec.shape, unit.name))

    def compute(t: OutTensor) -> dict[str, torch.Tensor]:
        """Every output tensor drawn from t's generator: t alone, or a weight with its scales."""
        if t.name.endswith(".qweight"):
            from quantkit.formats.awq import packed_tensors, quantize_groups

            name = t.name.removesuffix("qweight") + "weight"
            w = _float_tensor(kinds[t.name], (t.shape[1] * 8, t.shape[0]), _generator(seed, name), init, torch.bfloat16)
            return packed_tensors(name.removesuffix("weight"), *quantize_groups(w, name=name), "autoawq")
        g = _generator(seed, t.name)
        if t.dtype == "F8_E4M3":
            q, s = fp8_weight(t.shape, g, init.std)
            return {t.name: q, t.name + "_scale_inv": s}
        dt = {v: k for k, v in DTYPE_NAMES.items()}[t.dtype]
        return {t.name: _float_tensor(kinds[t.name], t.shape, g, init, dt)}

    job = {"make-checkpoint": preset, "layers": cfg.num_hidden_layers, "dtype": dtype, "seed": seed,
           "init": [init.std, init.norm_jitter, init.bias_std]}
    shards = plan_shards(tensors, max_shard_bytes)
    with Prefetcher(compute, order, workers=workers) as ahead, \
            OutputFolder.open(out, job, force=force) as folder, \
            tqdm(total=sum(t.nbytes for t in tensors), unit="B", unit_scale=True, desc="make-checkpoint",
                 disable=not progress) as bar:
        for shard in shards:
            folder.write_shard(shard, lambda t: ahead.take(lead[t.name], t.name),
                               on_tensor=lambda t: bar.update(t.nbytes))
        folder.finish(shards, aux)
    return cfg


class Prefetcher:
    """Groups of tensors computed ahead, in a fixed order, by a pool of threads (torch releases the GIL while it
    draws and quantizes), at most `depth` groups beyond the one being consumed. take(lead, name) returns one tensor
    of lead's group and forgets the group once all of it was taken; groups the consumer skipped (a resumed run)
    are dropped."""

    def __init__(self, compute: Callable[[OutTensor], dict[str, torch.Tensor]], order: list[OutTensor],
                 workers: int, depth: int | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.compute, self.order = compute, order
        self.index = {t.name: i for i, t in enumerate(order)}
        self.depth = depth if depth is not None else 2 * workers
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="make-checkpoint")
        self.futures: dict[int, object] = {}
        self.ready: dict[int, dict[str, torch.Tensor]] = {}

    def take(self, lead: OutTensor, name: str) -> torch.Tensor:
        i = self.index[lead.name]
        for j in [j for j in self.futures if j < i]:  # skipped by the consumer
            self.futures.pop(j).cancel()
        for j in [j for j in self.ready if j < i]:
            del self.ready[j]
        for j in range(i, min(len(self.order), i + 1 + self.depth)):
            if j not in self.futures and j not in self.ready:
                self.futures[j] = self.pool.submit(self.compute, self.order[j])
        if i not in self.ready:
            self.ready[i] = self.futures.pop(i).result()
        group = self.ready[i]
        out = group.pop(name)
        if not group:
            del self.ready[i]
        return out

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        for f in self.futures.values():
            f.cancel()
        self.pool.shutdown(wait=True)


