"""The layer-streaming calibration forward: one decoder layer's weights on the device at a time.

    tokens = calibration_tokens(ckpt, None, n_samples=128, seq_len=512)          # [N, T]
    stats = calibrate(ckpt, tokens, experts="routed", min_tokens=8)              # CalibrationStats
    stats.save("stats.safetensors")

    stream = LayerStream(CheckpointReader(ckpt), tokens)                         # the building block AWQ uses
    for n in range(cfg.num_hidden_layers):
        stream.load(n)                                                           # layer n's weights -> stream.block
        ...                                                                      # search, fold, quantize
        stream.advance(stats_for_layer)                                          # hidden states through layer n

The hidden states of every calibration token stay on the device ([N, T, H] in the compute dtype: 0.4 GB for
128 x 512 tokens at MiniMax-M2's width), or in host memory when they would take more than `offload_bytes`, moved
over one micro-batch at a time. The layer runs through the runtime's own `Block` modules (attention and router are
called as they are; the experts loop is the runtime's `DenseExperts` arithmetic with statistics taken on the way),
so the calibration forward computes what `quantkit generate` computes. Hidden states propagate through the
unquantized layers: each layer is calibrated on the inputs the original model gives it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from quantkit.calibrate.stats import CalibrationStats, ExpertStats
from quantkit.checkpoint import CheckpointReader
from quantkit.errors import QuantkitError
from quantkit.runtime.model import Block, KVCache, MoE, rms_norm, rope_tables

EXPERT_MODES = ("routed", "all")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 as served on a GPU; fp32 on the CPU, where bf16 matmuls are slow and gain nothing
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def new_block(cfg, device: torch.device, dtype: torch.dtype) -> Block:
    """One empty decoder layer on the device: weights in dtype, the router gate and bias in fp32."""
    with torch.device("meta"):
        block = Block(cfg)
    block = block.to_empty(device=device)
    for p in block.parameters():
        p.data = p.data.to(dtype)
    block.moe.gate.data = block.moe.gate.data.float()
    block.moe.bias.data = block.moe.bias.data.float()
    return block.eval().requires_grad_(False)


@torch.no_grad()
def load_layer(block: Block, reader: CheckpointReader, n: int) -> None:
    """Copy layer n's weights from the checkpoint (BF16, or block FP8 dequantized exactly) into block."""
    dtype, device = block.input_layernorm.dtype, block.input_layernorm.device
    p, m = f"model.layers.{n}.", f"model.layers.{n}.block_sparse_moe."

    def get(name: str, dt: torch.dtype = dtype) -> torch.Tensor:
        return reader.weight(name, dt).to(device, non_blocking=True)

    block.input_layernorm.copy_(get(p + "input_layernorm.weight"))
    block.post_attention_layernorm.copy_(get(p + "post_attention_layernorm.weight"))
    att = block.self_attn
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(att, proj).weight.copy_(get(f"{p}self_attn.{proj}.weight"))
    att.q_norm.copy_(get(p + "self_attn.q_norm.weight"))
    att.k_norm.copy_(get(p + "self_attn.k_norm.weight"))
    block.moe.gate.copy_(get(m + "gate.weight", torch.float32))
    block.moe.bias.copy_(get(m + "e_score_correction_bias", torch.float32))
    ex = block.moe.experts
    for e in range(reader.config.num_local_experts):
        for w in ("w1", "w2", "w3"):
            getattr(ex, w)[e].copy_(get(f"{m}experts.{e}.{w}.weight"))


def chosen_mask(idx: torch.Tensor, experts: int) -> torch.Tensor:
    """idx [N, K] expert ids -> [N, E] bool, True where the token chose the expert."""
    return torch.zeros(idx.shape[0], experts, dtype=torch.bool, device=idx.device).scatter_(1, idx, True)


def moe_forward(moe: MoE, h: torch.Tensor, stats: dict[str, ExpertStats] | None = None,
                experts_mode: str = "routed", chunk: int = 4096) -> torch.Tensor:
    """The runtime MoE (fp32 router, DenseExperts arithmetic) on h [N, H], collecting router/w13/w2 statistics.

    experts_mode "all" also passes every token through every expert for the w13/w2 statistics; the output still
    uses the routed experts only."""
    idx, w = moe.route(h)
    ex = moe.experts
    E = ex.w1.shape[0]
    out = torch.zeros_like(h)
    routed_stats = stats is not None and experts_mode == "routed"
    if stats is not None:
        stats["router"].add(h)
        chosen = chosen_mask(idx, E)
        stats["routed"].count += chosen.sum(0)
        if experts_mode == "routed":
            stats["w13"].add_routed(h, chosen)
        else:
            hd = h.double()
            stats["w13"].count += h.shape[0]
            stats["w13"].sum_abs += hd.abs().sum(0)[None]
            stats["w13"].sum_sq += hd.square().sum(0)[None]
    for e in idx.unique().tolist():
        rows, slot = (idx == e).nonzero(as_tuple=True)
        x = h[rows]
        a = F.silu(x @ ex.w1[e].t()) * (x @ ex.w3[e].t())  # [n_e, I]: the w2 input
        if routed_stats:
            stats["w2"].add(a, e)
        y = a @ ex.w2[e].t()
        out.index_add_(0, rows, y * w[rows, slot, None].to(y.dtype))
    if stats is not None and experts_mode == "all":
        for e in range(E):
            for lo in range(0, h.shape[0], chunk):
                x = h[lo:lo + chunk]
                stats["w2"].add(F.silu(x @ ex.w1[e].t()) * (x @ ex.w3[e].t()), e)
    return out


def new_layer_stats(cfg, device: torch.device) -> dict[str, ExpertStats]:
    E, H, Q, Inter = cfg.num_local_experts, cfg.hidden_size, cfg.q_width, cfg.intermediate_size
    return {"qkv": ExpertStats.zeros(1, H, device), "o": ExpertStats.zeros(1, Q, device),
            "router": ExpertStats.zeros(1, H, device), "w13": ExpertStats.zeros(E, H, device),
            "w2": ExpertStats.zeros(E, Inter, device), "routed": ExpertStats.zeros(E, 0, device)}


class LayerStream:
    """The calibration tokens' hidden states, advanced one decoder layer at a time."""

    def __init__(self, reader: CheckpointReader, tokens: torch.Tensor, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, micro_batch: int = 8, offload_bytes: int | None = None):
        self.reader, self.cfg = reader, reader.config
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype or default_dtype(self.device)
        if tokens.dim() != 2:
            raise QuantkitError(f"calibration tokens must be [samples, seq_len], got {list(tokens.shape)}")
        self.tokens = tokens
        self.micro_batch = max(1, micro_batch)
        N, T = tokens.shape
        nbytes = N * T * self.cfg.hidden_size * torch.tensor([], dtype=self.dtype).element_size()
        if offload_bytes is None:
            offload_bytes = torch.cuda.mem_get_info(self.device)[0] // 8 if self.device.type == "cuda" else 1 << 62
        self.store = self.device if nbytes <= offload_bytes else torch.device("cpu")
        self.block = new_block(self.cfg, self.device, self.dtype)
        self.loaded: int | None = None
        self.layer = 0  # self.x holds the input of this layer
        pos = torch.arange(T, device=self.device)[None]  # every window is full: positions 0..T-1
        self.cos, self.sin = rope_tables(pos, self.cfg.rotary_dim, self.cfg.rope_theta)
        causal = torch.ones(T, T, dtype=torch.bool, device=self.device).tril()
        self.mask = causal[None, None]  # [1, 1, T, T]
        emb = reader.weight("model.embed_tokens.weight", self.dtype)
        if int(tokens.max()) >= emb.shape[0] or int(tokens.min()) < 0:
            raise QuantkitError(f"calibration token ids must be below the vocabulary size {emb.shape[0]}")
        self.x = emb[tokens].to(self.store)  # [N, T, H]
        del emb

    def load(self, n: int) -> Block:
        if self.loaded != n:
            load_layer(self.block, self.reader, n)
            self.loaded = n
        return self.block

    def batches(self):
        """(slice, x on the device [b, T, H]) per micro-batch of samples."""
        N = self.x.shape[0]
        for lo in range(0, N, self.micro_batch):
            sl = slice(lo, min(lo + self.micro_batch, N))
            yield sl, self.x[sl].to(self.device, non_blocking=True)

    def attention(self, block: Block, xn: torch.Tensor) -> torch.Tensor:
        """The block's attention on normalized input xn [b, T, H] (a fresh one-layer cache)."""
        cfg = self.cfg
        b, T, _ = xn.shape
        shape = (b, cfg.num_key_value_heads, T, cfg.head_dim)
        cache = KVCache([torch.empty(shape, dtype=xn.dtype, device=xn.device)],
                        [torch.empty(shape, dtype=xn.dtype, device=xn.device)],
                        torch.ones(b, T, dtype=torch.bool, device=xn.device))
        return block.self_attn(xn, self.cos, self.sin, cache, 0, self.mask)

    @torch.no_grad()
    def advance(self, stats: dict[str, ExpertStats] | None = None, experts_mode: str = "routed") -> None:
        """Run the loaded layer over every calibration token (collecting statistics when given)."""
        if self.loaded != self.layer:
            raise RuntimeError(f"layer {self.layer} must be loaded before advancing (loaded: {self.loaded})")
        block = self.block
        hook = None
        if stats is not None:
            hook = block.self_attn.o_proj.register_forward_pre_hook(lambda _m, args: stats["o"].add(args[0]))
        try:
            for sl, x in self.batches():
                xn = rms_norm(x, block.input_layernorm, block.eps)
                if stats is not None:
                    stats["qkv"].add(xn)
                x = x + self.attention(block, xn)
                h = rms_norm(x, block.post_attention_layernorm, block.eps)
                y = moe_forward(block.moe, h.reshape(-1, h.shape[-1]), stats, experts_mode)
                self.x[sl] = (x + y.view_as(x)).to(self.store)
        finally:
            if hook is not None:
                hook.remove()
        self.layer += 1

    def skip_to(self, n: int) -> None:
        """Advance (no statistics) until self.x is the input of layer n."""
        while self.layer < n:
            self.load(self.layer)
            self.advance()


def calibrate(ckpt: str | Path | CheckpointReader, tokens: torch.Tensor, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None, experts: str = "routed", min_tokens: int = 1, micro_batch: int = 8,
              progress: bool = True, meta: dict | None = None) -> CalibrationStats:
    """Statistics of every linear input of every layer, from one streaming pass."""
    if experts not in EXPERT_MODES:
        raise QuantkitError(f"--experts {experts!r}: choose routed or all")
    if min_tokens < 0:
        raise QuantkitError(f"--min-tokens {min_tokens}: must be 0 or more")
    reader = ckpt if isinstance(ckpt, CheckpointReader) else CheckpointReader(ckpt)
    t0 = time.perf_counter()
    stream = LayerStream(reader, tokens, device, dtype, micro_batch)
    layers = {}
    for n in tqdm(range(reader.config.num_hidden_layers), desc="calibrate", unit="layer", disable=not progress):
        stream.load(n)
        st = new_layer_stats(reader.config, stream.device)
        stream.advance(st, experts)
        for p in ("w13", "w2"):
            st[p].mark_fallback(min_tokens)
        layers[n] = {k: v.to("cpu") for k, v in st.items()}
    info = {"samples": int(tokens.shape[0]), "seq_len": int(tokens.shape[1]), "tokens": int(tokens.numel()),
            "experts": experts, "min_tokens": min_tokens, "source": reader.fingerprint(),
            "device": str(stream.device), "dtype": str(stream.dtype).removeprefix("torch."),
            "seconds": round(time.perf_counter() - t0, 3), **(meta or {})}
    reader.close()
    return CalibrationStats(layers, info)


def token_count_table(stats: CalibrationStats, width: int = 16) -> str:
    """Per-layer table of tokens routed per expert: min, median, max, experts below the threshold, and the counts
    themselves (wrapped at `width` experts per line)."""
    counts = stats.token_counts()
    fb = stats.fallbacks()
    lines = [f"{'layer':>5} {'min':>8} {'median':>8} {'max':>8} {'fallback':>8}  tokens per expert"]
    for n in range(counts.shape[0]):
        c = counts[n]
        nfb = len(fb.get(f"{n}.w13", []))
        row = " ".join(f"{int(v)}" for v in c.tolist())
        wrapped = [row] if c.numel() <= width else [" ".join(str(int(v)) for v in c[i:i + width].tolist())
                                                   for i in range(0, c.numel(), width)]
        lines.append(f"{n:>5} {int(c.min()):>8} {int(c.median()):>8} {int(c.max()):>8} {nfb:>8}  {wrapped[0]}")
        lines += [" " * 42 + w for w in wrapped[1:]]
    return "\n".join(lines)


def plot_token_counts(stats: CalibrationStats, path: str | Path) -> None:
    """PNG heat map of tokens routed per layer x expert; starved experts are marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = stats.token_counts().double()
    L, E = counts.shape
    fig, ax = plt.subplots(figsize=(min(20, 4 + E / 12), min(14, 2 + L / 4)))
    im = ax.imshow(counts.log1p().numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    for key, ids in stats.fallbacks().items():
        n, point = key.split(".")
        if point == "w13":
            ax.scatter(ids, [int(n)] * len(ids), marker="x", color="red", s=12)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(L))
    ax.set_title(f"calibration tokens routed per expert ({stats.meta.get('tokens', '?')} tokens)\n"
                 "x: fell back to pooled statistics", fontsize=9)
    fig.colorbar(im, ax=ax, label="log(1 + tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
