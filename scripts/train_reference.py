#!/usr/bin/env python
"""Train the small MiniMax-M2-architecture reference model that quantkit's evaluations and demo run on.

    python scripts/train_reference.py --out evals/assets/reference --steps 4000 --passkey-share 0.5 \
        --device cuda --seed 0

Exactly the MiniMax-M2 block structure (QK-norm over the full projection width, NeoX partial RoPE, sigmoid routing
with a correction bias used only for selection, renormalised top-k weights, SiLU experts, untied head), at widths
that are multiples of 256 so every quantized format applies, under 20 MiB in BF16. Training text: the Python
standard library's source on the machine that trains (its version is recorded), mixed with passkey prompts built by
`quantkit.evals.needle.build_prompt`, the very prompts `quantkit eval --needle` asks (a five-digit number hidden at a
random depth of filler, asked for at the end), each followed by its answer. The correction bias is trained the
loss-free way: after each step it moves against each expert's load imbalance, so experts end up used unevenly but
all used.

Written out with quantkit's own writer (config.json in the release layout, generation_config.json, tokenizer,
safetensors, manifest) plus metrics.json: held-out perplexity, per-expert token shares, passkey accuracy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from quantkit.evals import needle

from quantkit import tokenizer as tok
from quantkit.arch import MiniMaxM2Config
from quantkit.checkpoint import OutputFolder, OutTensor, plan_shards
from quantkit.checkpoint.safetensors_file import DTYPE_NAMES
from quantkit.runtime.model import apply_rope, rms_norm, rope_tables
from quantkit.synth import release_config

DIMS = dict(hidden_size=256, intermediate_size=256, num_local_experts=16, num_experts_per_tok=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=128, rotary_dim=64, num_hidden_layers=2,
            vocab_size=4096, max_position_embeddings=512)


def corpus_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
    return [p for p in files if p.stat().st_size < 200_000]


def passkey_prompt(tokenizer, filler_ids: list[int], rng: random.Random, max_len: int) -> tuple[list[int], str]:
    """A passkey prompt built exactly as `quantkit eval --needle` builds its cases, and its answer digits."""
    case = needle.NeedleCase(rng.randrange(48, max_len + 1), rng.random(), str(rng.randrange(10000, 100000)))
    return needle.build_prompt(tokenizer, filler_ids, case), case.key


class Batches:
    """Random windows of `seq` tokens from a token stream mixing stdlib source and passkey documents."""

    def __init__(self, tokenizer, files: list[Path], seq: int, seed: int, passkey_share: float):
        rng = random.Random(seed)
        rng.shuffle(files)
        n_held = max(4, len(files) // 50)
        self.held_out_files, train_files = files[:n_held], files[n_held:]
        ids: list[int] = []
        for p in train_files:
            ids += tokenizer.encode(p.read_text(errors="replace"), add_special_tokens=False).ids + [0]
        self.code = torch.tensor(ids, dtype=torch.long)
        self.tokenizer, self.seq, self.rng, self.share = tokenizer, seq, rng, passkey_share
        self.gen = torch.Generator().manual_seed(seed)
        self.filler_ids = tokenizer.encode(needle.FILLER, add_special_tokens=False).ids

    def passkey(self) -> list[int]:
        prompt, key = passkey_prompt(self.tokenizer, self.filler_ids, self.rng, self.seq + 1 - 8)
        ids = (prompt + self.tokenizer.encode(f" {key}.", add_special_tokens=False).ids)[-(self.seq + 1):]
        pad = self.code[: self.seq + 1 - len(ids)].tolist()  # code before the document: left context
        return pad + ids

    def batch(self, n: int) -> torch.Tensor:
        rows = []
        for _ in range(n):
            if self.rng.random() < self.share:
                rows.append(torch.tensor(self.passkey()))
            else:
                i = int(torch.randint(0, len(self.code) - self.seq - 1, (1,), generator=self.gen))
                rows.append(self.code[i:i + self.seq + 1])
        return torch.stack(rows)  # [n, seq+1]


def init_params(cfg: MiniMaxM2Config, device: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = {}
    for unit in cfg.units():
        for spec in unit.tensors:
            if spec.kind in ("norm", "qk_norm"):
                t = torch.ones(spec.shape)
            elif spec.kind == "router_bias":
                t = torch.zeros(spec.shape)
            else:
                t = torch.randn(spec.shape, generator=g) * (0.02 if spec.kind != "expert" else 0.02 / math.sqrt(2))
            params[spec.name] = t.to(device).requires_grad_(spec.kind != "router_bias")
    return params


def forward(p: dict, cfg: MiniMaxM2Config, tokens: torch.Tensor, loads: list | None = None) -> torch.Tensor:
    """Differentiable MiniMax-M2 forward (no cache): tokens [B, T] -> logits [B, T, V]."""
    B, T = tokens.shape
    eps, nh, nkv, d = cfg.rms_norm_eps, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    pos = torch.arange(T, device=tokens.device).expand(B, T)
    cos, sin = rope_tables(pos, cfg.rotary_dim, cfg.rope_theta)
    x = p["model.embed_tokens.weight"][tokens]
    for n in range(cfg.num_hidden_layers):
        pre = f"model.layers.{n}."
        h = rms_norm(x, p[pre + "input_layernorm.weight"], eps)
        q = rms_norm(h @ p[pre + "self_attn.q_proj.weight"].t(), p[pre + "self_attn.q_norm.weight"], eps)
        k = rms_norm(h @ p[pre + "self_attn.k_proj.weight"].t(), p[pre + "self_attn.k_norm.weight"], eps)
        v = h @ p[pre + "self_attn.v_proj.weight"].t()
        q = apply_rope(q.view(B, T, nh, d).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(B, T, nkv, d).transpose(1, 2), cos, sin)
        v = v.view(B, T, nkv, d).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + a.transpose(1, 2).reshape(B, T, nh * d) @ p[pre + "self_attn.o_proj.weight"].t()
        h = rms_norm(x, p[pre + "post_attention_layernorm.weight"], eps).reshape(B * T, -1)
        moe = pre + "block_sparse_moe."
        scores = torch.sigmoid(h.float() @ p[moe + "gate.weight"].float().t())  # [N, E]
        idx = torch.topk(scores + p[moe + "e_score_correction_bias"], cfg.num_experts_per_tok, dim=-1).indices
        w = scores.gather(-1, idx)
        w = w / w.sum(-1, keepdim=True)
        if loads is not None:
            loads.append(torch.bincount(idx.flatten(), minlength=cfg.num_local_experts))
        y = torch.zeros_like(h)
        for e in range(cfg.num_local_experts):
            rows, slot = (idx == e).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            xe = h[rows]
            he = F.silu(xe @ p[f"{moe}experts.{e}.w1.weight"].t()) * (xe @ p[f"{moe}experts.{e}.w3.weight"].t())
            y = y.index_add(0, rows, (he @ p[f"{moe}experts.{e}.w2.weight"].t()) * w[rows, slot, None])
        x = x + y.view(B, T, -1)
    return rms_norm(x, p["model.norm.weight"], eps) @ p["lm_head.weight"].t()


@torch.no_grad()
def measure(p, cfg, batches: Batches, tokenizer, device: str, n_passkey: int = 100) -> dict:
    # held-out perplexity on stdlib files never trained on
    ids: list[int] = []
    for f in batches.held_out_files:
        ids += tokenizer.encode(f.read_text(errors="replace"), add_special_tokens=False).ids
    seq = batches.seq
    windows = [ids[i:i + seq + 1] for i in range(0, len(ids) - seq - 1, seq)][:64]
    nll, n = 0.0, 0
    loads: list = []
    for lo in range(0, len(windows), 16):
        t = torch.tensor(windows[lo:lo + 16], device=device)
        logits = forward(p, cfg, t[:, :-1], loads)
        nll += float(F.cross_entropy(logits.float().flatten(0, 1), t[:, 1:].flatten(), reduction="sum"))
        n += t[:, 1:].numel()
    per_layer = []
    for layer in range(cfg.num_hidden_layers):
        counts = sum(loads[layer::cfg.num_hidden_layers]).float()
        per_layer.append([float(c) for c in counts / counts.sum()])
    # passkey retrieval within the trained context, greedy
    rng = random.Random(12345)
    correct = 0
    for _ in range(n_passkey):  # within the trained context, built as the needle evaluation builds them
        prompt, key = passkey_prompt(tokenizer, batches.filler_ids, rng, seq - 8)
        out = prompt[:]
        for _ in range(needle.ANSWER_TOKENS):
            logits = forward(p, cfg, torch.tensor([out], device=device))
            out.append(int(logits[0, -1].argmax()))
        correct += needle.score(tokenizer.decode(out[len(prompt):]), key)
    return {"heldout_tokens": n, "heldout_perplexity": math.exp(nll / n), "vocab_size": cfg.vocab_size,
            "expert_share_per_layer": per_layer, "experts_unused": sum(s == 0 for row in per_layer for s in row),
            "passkey_accuracy": correct / n_passkey, "passkey_cases": n_passkey}


def save(p, cfg_raw: dict, tokenizer_dir: Path, out: Path, metrics: dict) -> None:
    cfg = MiniMaxM2Config.from_dict(cfg_raw)
    tensors = [OutTensor(s.name, "F32" if s.kind in ("router", "router_bias") else "BF16", s.shape, u.name)
               for u in cfg.units() for s in u.tensors]
    dtypes = {v: k for k, v in DTYPE_NAMES.items()}

    def produce(t: OutTensor) -> torch.Tensor:
        return p[t.name].detach().to("cpu", dtypes[t.dtype]).contiguous()

    aux = {f.name: f.read_bytes() for f in sorted(tokenizer_dir.iterdir()) if f.is_file()}
    aux["config.json"] = (json.dumps(cfg_raw, indent=2) + "\n").encode()
    aux["generation_config.json"] = (json.dumps({"bos_token_id": cfg_raw["bos_token_id"],
                                                  "eos_token_id": cfg_raw["eos_token_id"], "do_sample": False},
                                                 indent=2) + "\n").encode()
    aux["metrics.json"] = (json.dumps(metrics, indent=2) + "\n").encode()
    shards = plan_shards(tensors, 8 * 10**6)  # small files: a repository and a transfer both like them
    with OutputFolder.open(out, {"train_reference": metrics["command"]}, force=True) as folder:
        for shard in shards:
            folder.write_shard(shard, produce)
        folder.finish(shards, aux)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("evals/assets/reference"))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--passkey-share", type=float, default=0.25)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--passkey-cases", type=int, default=100)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        ids = tok.write_tokenizer(tmp, DIMS["vocab_size"])
        tokenizer = tok.load_tokenizer(tmp)
        cfg_raw = release_config("tiny", None, fp8=False, special_ids=ids)
        cfg_raw.update(DIMS)
        cfg_raw["attn_type_list"] = [1] * DIMS["num_hidden_layers"]
        cfg = MiniMaxM2Config.from_dict(cfg_raw)
        files = corpus_files()
        t0 = time.perf_counter()
        batches = Batches(tokenizer, files, args.seq, args.seed, args.passkey_share)
        print(f"corpus: {len(files)} stdlib files, {len(batches.code):,} training tokens "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
        p = init_params(cfg, args.device, args.seed)
        trainable = [t for t in p.values() if t.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
        t0 = time.perf_counter()
        for step in range(args.steps):
            batch = batches.batch(args.batch).to(args.device)
            loads: list = []
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
                logits = forward(p, cfg, batch[:, :-1], loads)
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():  # loss-free balancing: push each layer's bias against its load imbalance
                for n, counts in enumerate(loads):
                    bias = p[f"model.layers.{n}.block_sparse_moe.e_score_correction_bias"]
                    bias += 1e-3 * torch.sign(counts.float().mean() - counts.float())
            if step % 100 == 0 or step == args.steps - 1:
                print(f"step {step}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        metrics = measure(p, cfg, batches, tokenizer, args.device, args.passkey_cases)
        metrics.update(command=" ".join(sys.argv), python=sys.version.split()[0], torch=torch.__version__,
                       steps=args.steps, batch=args.batch, seq=args.seq, seed=args.seed,
                       train_seconds=time.perf_counter() - t0, corpus_files=len(files),
                       corpus_sha256=hashlib.sha256(batches.code.numpy().tobytes()).hexdigest()[:16],
                       device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu")
        print(json.dumps({k: v for k, v in metrics.items() if k != "expert_share_per_layer"}, indent=1))
        save(p, cfg_raw, Path(tmp), args.out, metrics)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
