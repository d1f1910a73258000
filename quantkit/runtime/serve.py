"""Serving many sequences at once: a request queue over the slots of a preallocated KV cache.

    server = Server(model, slots=32, max_len=4096)
    server.submit(Request([1, 2, 3], max_new_tokens=64, sampling=Sampling(temperature=0.7), stop_ids=(eos,)))
    done = server.run()                      # -> [Completion(tokens, finish, ttft, tpot, ...)] in submission order

Each step admits waiting requests into free slots, runs one prefill forward over the next chunk of as many
prefilling requests as the token budget holds (long prompts take several steps: chunked prefill, interleaved with
decoding), then one decode forward for every slot that has a token to feed. Slots are rows of a SlotCache: each
holds one sequence from column 0 with its own length, so sequences join and leave without moving anyone's cache
(the model's KVCache shares one length across the batch and suits whole batches, not a queue). A decode step
runs over the first `bucket` slots (new requests take the lowest free slot); on a GPU each bucket's step is
captured once as a CUDA graph and replayed. Rows that have nothing to decode (free, or still prefilling) compute
a throw-away token at their own length; the column it lands in is rewritten before anything attends to it.

Every rank of a tensor-parallel run drives the same server over the same requests; the logits, sampling
(per-request seeded generators) and therefore the scheduling agree on all ranks.
"""

from __future__ import annotations

import time
import warnings
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.runtime.generate import Sampling, sample
from quantkit.runtime.model import DenseExperts, MiniMaxM2, _fused, attn_bias, final_norm, rope_tables, run_layers


@dataclass
class SlotCache:
    """KV cache with one row per slot: k, v per layer [S, NKV, C, D]; lengths [S] tokens held per slot."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    lengths: torch.Tensor  # [S] int64, on the model's device
    rows: slice | torch.Tensor = field(default_factory=lambda: slice(0, 0))  # slots of the step's batch rows
    positions: torch.Tensor | None = None  # [B, T] column of each token of the current step
    write_at: tuple[torch.Tensor, torch.Tensor] | None = None  # (slots, columns) [B, T] of the step's tokens

    @classmethod
    def allocate(cls, model: MiniMaxM2, slots: int, max_len: int) -> SlotCache:
        cfg = model.cfg
        kv = getattr(model, "kv_heads", cfg.num_key_value_heads)  # a tensor-parallel rank holds its heads only
        shape = (slots, kv, max_len, cfg.head_dim)
        n = cfg.num_hidden_layers
        return cls(k=[torch.zeros(shape, dtype=model.dtype, device=model.device) for _ in range(n)],
                   v=[torch.zeros(shape, dtype=model.dtype, device=model.device) for _ in range(n)],
                   lengths=torch.zeros(slots, dtype=torch.long, device=model.device))

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def targets(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots, columns) [B, T] int64 where the step's tokens go: the same for every layer of the step."""
        if self.write_at is None:
            rows = self.rows
            B, T = self.positions.shape
            if isinstance(rows, slice):
                idx = torch.arange(rows.start, rows.start + B, device=device)[:, None].expand(B, T)
            else:
                idx = rows[:, None].expand(B, T)
            # throw-away rows may sit at the end; contiguous once here, not copied again by every layer's write
            self.write_at = (idx.contiguous(), self.positions.clamp(max=self.capacity - 1).contiguous())
        return self.write_at

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, NKV, T, D] at the step's positions; return the batch rows' keys and values [B, NKV, C, D]
        (all C columns: the step's mask hides what a row does not hold)."""
        from quantkit.kernels import fused_ops

        idx, pos = self.targets(k.device)
        kc, vc = self.k[layer], self.v[layer]
        if _fused(k, v, kc) and kc.stride(-1) == k.stride(-1) == v.stride(-1) == 1:
            fused_ops.kv_write(kc, vc, k, v, idx, pos)  # one launch for keys and values
        else:
            fused_ops.kv_write_ref(kc, vc, k, v, idx, pos)
        return self.k[layer][self.rows], self.v[layer][self.rows]  # a view for a slice of slots, a gather for an index

    def decode_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                         qk_norm: tuple | None = None, quant_group: int = 0):
        """A step of one token per row on the GPU: the cache write and the attention over each row's own columns
        (0..its position: what the step's mask allows) in one launch, the cache read in place where update would
        hand SDPA all C columns (gathered, for an index of rows). q [B, NH, D], k, v [B, NKV, D] -> [B, NH, D];
        qk_norm = (wq, wk, cos [B, half], sin, eps): q and k as projected, normalised and rotated in the same
        launch (fused_ops.decode_attention; model.decode_attend); quant_group: with the output's block-FP8
        quantization, (out, (codes, scales)). None where it does not apply (the caller updates and attends)."""
        from quantkit.kernels import fused_ops

        kc, vc = self.k[layer], self.v[layer]
        gains = qk_norm[:2] if qk_norm is not None else ()
        if self.positions is None or self.positions.shape[1] != 1 or not _fused(q, k, v, kc, *gains) or \
                any(t.stride(-1) != 1 for t in (q, k, v, kc)):
            return None
        idx, pos = self.targets(k.device)
        return fused_ops.decode_attention(q, k, v, kc, vc, idx[:, 0], pos[:, 0], scale, qk_norm=qk_norm,
                                          quant_group=quant_group)


def forward_slots(model: MiniMaxM2, tokens: torch.Tensor, cache: SlotCache, rows: slice | torch.Tensor,
                  positions: torch.Tensor, last: torch.Tensor | None = None, layers: slice = slice(None)
                  ) -> torch.Tensor:
    """tokens [B, T] of the slots `rows` at columns positions [B, T] -> logits [B, V] at index `last` [B] of each
    row (default T - 1). `layers` runs a subset of the decoder layers (the benchmark's per-layer timing)."""
    cfg = model.cfg
    B, T = tokens.shape
    cos, sin = rope_tables(positions, cfg.rotary_dim, cfg.rope_theta)
    cols = torch.arange(cache.capacity, device=tokens.device)
    mask = (cols[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, T, C] causal within the slot
    cache.rows, cache.positions, cache.write_at = rows, positions, None
    x = model.embed_tokens(tokens)  # [B, T, H]
    mask = attn_bias(mask, x.dtype)
    x, res = run_layers(model.layers, x, cos, sin, cache, mask, range(len(model.layers))[layers])
    if last is None:
        x, res = x[:, -1], (None if res is None else res[:, -1])
    else:
        pick = torch.arange(B, device=x.device), last
        x, res = x[pick], (None if res is None else res[pick])  # [B, H]
    return model.lm_head(final_norm(x, res, model.norm, cfg.rms_norm_eps))  # [B, V]


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int = 128
    sampling: Sampling = Sampling()
    stop_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings (the server needs a detokenize function)
    seed: int = 0


@dataclass
class Completion:
    request: Request
    tokens: list[int]
    finish: str  # "stop" (a stop id or string), "length"
    text: str | None  # detokenized, cut before the stop string, when the server has a detokenizer
    t_submit: float
    t_first: float
    t_done: float

    @property
    def ttft(self) -> float:
        return self.t_first - self.t_submit

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first."""
        return (self.t_done - self.t_first) / max(1, len(self.tokens) - 1)


@dataclass
class _Live:
    n: int  # submission number
    req: Request
    t_submit: float
    gen: torch.Generator
    fed: int = 0  # prompt tokens in the cache
    out: list[int] = field(default_factory=list)
    t_first: float = 0.0


def buckets_for(slots: int) -> list[int]:
    """Decode batch sizes that get their own graph: powers of two, and the slot count."""
    b = [1 << i for i in range(slots.bit_length()) if 1 << i < slots]
    return b + [slots]


class Server:
    def __init__(self, model: MiniMaxM2, slots: int, max_len: int, prefill_chunk: int = 512,
                 prefill_budget: int = 4096, cuda_graphs: bool | None = None, detokenize=None):
        if slots < 1 or max_len < 2 or prefill_chunk < 1:
            raise QuantkitError("serving needs at least one slot, two positions and a positive prefill chunk")
        self.model, self.slots, self.max_len = model, slots, max_len
        self.prefill_chunk, self.prefill_budget = prefill_chunk, max(prefill_budget, prefill_chunk)
        self.detokenize = detokenize
        self.cache = SlotCache.allocate(model, slots, max_len)
        self.device = model.device
        if cuda_graphs is None:  # the dense experts loop over experts on the host: not capturable
            cuda_graphs = self.device.type == "cuda" and not any(isinstance(m, DenseExperts) for m in model.modules())
        self.cuda_graphs = cuda_graphs
        self.buckets = buckets_for(slots)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.waiting: deque[_Live] = deque()
        self.live: list[_Live | None] = [None] * slots
        self.done: list[tuple[int, Completion]] = []  # (submission number, completion)
        self._submitted = 0
        self.steps = {"prefill": 0, "decode": 0}

    # ---- requests --------------------------------------------------------------------------------------------

    def submit(self, req: Request, t_submit: float | None = None) -> int:
        if not req.prompt:
            raise QuantkitError("request: the prompt needs at least one token")
        if req.max_new_tokens < 1:
            raise QuantkitError("request: max_new_tokens must be at least 1")
        if len(req.prompt) + req.max_new_tokens > self.max_len:
            raise QuantkitError(f"request: {len(req.prompt)} prompt + {req.max_new_tokens} new tokens exceed the "
                                f"{self.max_len} positions of a slot")
        if req.stop and self.detokenize is None:
            raise QuantkitError("request: stop strings need a server with a detokenizer")
        gen = torch.Generator(device="cpu").manual_seed(req.seed)
        self.waiting.append(_Live(self._submitted, req, time.perf_counter() if t_submit is None else t_submit, gen))
        self._submitted += 1
        return self._submitted - 1

    def run(self) -> list[Completion]:
        """Step until every submitted request is done; completions in submission order."""
        while self.waiting or any(self.live):
            self.step()
        done, self.done = sorted(self.done, key=lambda c: c[0]), []
        return [c for _, c in done]

    # ---- one step ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        for s in range(self.slots):  # admit into the lowest free slots: keeps decode buckets small
            if self.live[s] is None and self.waiting:
                self.live[s] = self.waiting.popleft()
                self.cache.lengths[s] = 0
        prefilling = [s for s, lv in enumerate(self.live) if lv is not None and lv.fed < len(lv.req.prompt)]
        decoding = [s for s, lv in enumerate(self.live) if lv is not None and lv.fed == len(lv.req.prompt)]
        if prefilling:
            self._prefill(prefilling)
        if decoding:
            self._decode(decoding)

    def _prefill(self, slots: list[int]) -> None:
        chunks = []
        for s in slots:
            lv = self.live[s]
            chunk = lv.req.prompt[lv.fed:lv.fed + self.prefill_chunk]
            width = max([len(c) for _, c in chunks] + [len(chunk)])
            if chunks and width * (len(chunks) + 1) > self.prefill_budget:
                break
            chunks.append((s, chunk))
        B, T = len(chunks), max(len(c) for _, c in chunks)
        tokens = torch.zeros(B, T, dtype=torch.long)
        for b, (_, c) in enumerate(chunks):
            tokens[b, :len(c)] = torch.tensor(c)  # right-padded: pads sit past the row's tokens, seen by none
        rows = torch.tensor([s for s, _ in chunks], device=self.device)
        positions = self.cache.lengths[rows][:, None] + torch.arange(T, device=self.device)  # [B, T]
        last = torch.tensor([len(c) - 1 for _, c in chunks], device=self.device)
        logits = forward_slots(self.model, tokens.to(self.device), self.cache, rows, positions, last)
        self.steps["prefill"] += 1
        self.cache.lengths[rows] += last + 1
        greedy = logits.argmax(-1).cpu()
        for b, (s, c) in enumerate(chunks):
            lv = self.live[s]
            lv.fed += len(c)
            if lv.fed == len(lv.req.prompt):  # the prompt's last logits give the first token
                hot = lv.req.sampling.temperature > 0
                self._emit(s, self._sample(lv, logits[b:b + 1]) if hot else int(greedy[b]))

    def _decode(self, slots: list[int]) -> None:
        n = max(slots) + 1
        bucket = next(b for b in self.buckets if b >= n)
        tokens = torch.zeros(bucket, 1, dtype=torch.long)
        for s in slots:
            tokens[s, 0] = self.live[s].out[-1]
        tokens = tokens.to(self.device)
        positions = self.cache.lengths[:bucket, None]  # [bucket, 1]
        logits = self._replay(bucket, tokens, positions) if self.cuda_graphs else None
        if logits is None:
            logits = forward_slots(self.model, tokens, self.cache, slice(0, bucket), positions.clone())
        self.steps["decode"] += 1
        fed = torch.zeros(bucket, dtype=torch.long)
        fed[slots] = 1
        self.cache.lengths[:bucket] += fed.to(self.device)
        greedy = logits.argmax(-1).cpu()  # one transfer of [bucket] ids; full rows only for sampled requests
        for s in slots:
            lv = self.live[s]
            self._emit(s, int(greedy[s]) if lv.req.sampling.temperature <= 0 else self._sample(lv, logits[s:s + 1]))

    def _replay(self, bucket: int, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """The bucket's graph replayed on these inputs; None (and eager from then on) if it cannot be captured."""
        if bucket not in self._graphs and not self._try_capture(bucket):
            return None
        graph, tok, pos, out = self._graphs[bucket]
        tok.copy_(tokens)
        pos.copy_(positions)
        graph.replay()
        return out

    def _capture(self, bucket: int) -> None:
        tok = torch.zeros(bucket, 1, dtype=torch.long, device=self.device)
        pos = self.cache.lengths[:bucket, None].clone()  # throw-away columns, rewritten before use (see top)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up outside the graph: kernels compile, allocator settles
            for _ in range(2):
                forward_slots(self.model, tok, self.cache, slice(0, bucket), pos)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = forward_slots(self.model, tok, self.cache, slice(0, bucket), pos)
        self._graphs[bucket] = (graph, tok, pos, out)

    def _try_capture(self, bucket: int) -> bool:
        try:
            self._capture(bucket)
            return True
        except RuntimeError as e:  # a backend that syncs with the host inside its forward cannot be captured
            warnings.warn(f"decode runs eagerly: CUDA-graph capture failed ({str(e).strip().splitlines()[0]})",
                          stacklevel=2)
            torch.cuda.synchronize()
            self.cuda_graphs = False
            self._graphs.clear()
            return False

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every bucket's decode graph up front (benchmarks: keep capture out of the timed run)."""
        for b in self.buckets:
            if not self.cuda_graphs or (b not in self._graphs and not self._try_capture(b)):
                return

    # ---- sampling and stopping -------------------------------------------------------------------------------

    @staticmethod
    def _sample(lv: _Live, logits: torch.Tensor) -> int:
        return int(sample(logits.float().cpu(), lv.req.sampling, lv.gen)[0])

    def _emit(self, s: int, tok: int) -> None:
        lv = self.live[s]
        now = time.perf_counter()
        if not lv.out:
            lv.t_first = now
        lv.out.append(tok)
        finish, text = None, None
        if tok in lv.req.stop_ids:
            finish = "stop"
        if self.detokenize is not None:
            text = self.detokenize(lv.out)
            cut = [text.find(x) for x in lv.req.stop if x and x in text]
            if cut:
                finish, text = "stop", text[:min(cut)]
        if finish is None and len(lv.out) == lv.req.max_new_tokens:
            finish = "length"
        if finish is not None:
            self.done.append((lv.n, Completion(lv.req, lv.out, finish, text, lv.t_submit, lv.t_first, now)))
            self.live[s] = None


def serve(model: nn.Module, requests: list[Request], slots: int | None = None, max_len: int | None = None,
          **kwargs) -> list[Completion]:
    """Run a list of requests to completion on a fresh server (slots default to one per request)."""
    slots = slots or len(requests)
    max_len = max_len or max(len(r.prompt) + r.max_new_tokens for r in requests)
    server = Server(model, slots, max_len, **kwargs)
    for r in requests:
        server.submit(r)
    return server.run()
