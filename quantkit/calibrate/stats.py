"""Per-channel activation statistics of every linear input, per expert: what AWQ and the GGUF imatrix read.

    stats = CalibrationStats.load("stats.safetensors")     # + stats.json beside it
    s = stats.get(3, "w13")                                # ExpertStats of layer 3's expert w1/w3 input
    s.count                                                # [E] routed tokens per expert (int64)
    s.mean_abs(), s.mean_sq()                              # [E, C], starved experts filled from the pooled rows

Points per layer L (`POINTS`): `qkv` (the input of q/k/v), `o` (the input of o_proj), `router` (the gate's input),
`w13` (each expert's w1/w3 input: the tokens routed to it), `w2` (each expert's w2 input), and `routed` (counts
only: the tokens the router sent to each expert, which `--experts all` does not change). Dense points have one
row (E = 1). Sums are float64: a layer sees millions of token-rows and fp32 sums of squares would lose digits.

File: safetensors with `model.layers.L.<point>.count|sum_abs|sum_sq|fallback`, and a JSON file beside it
(`stats.json` for `stats.safetensors`) holding the options, token totals and which experts fell back. An expert
with fewer than `min_tokens` tokens falls back: its statistics are the pooled ones (all tokens of the layer at that
point), reported and never NaN.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quantkit.errors import QuantkitError

POINTS = ("qkv", "o", "router", "w13", "w2", "routed")
EXPERT_POINTS = ("w13", "w2")
FORMAT = 1


@dataclass
class ExpertStats:
    """Sums over tokens of one linear input: count [E], sum |x| [E, C], sum x^2 [E, C] (E = 1 for dense inputs)."""

    count: torch.Tensor
    sum_abs: torch.Tensor
    sum_sq: torch.Tensor
    fallback: torch.Tensor = field(default=None)  # type: ignore[assignment]  # [E] bool

    @classmethod
    def zeros(cls, experts: int, channels: int, device: torch.device | str = "cpu") -> ExpertStats:
        return cls(torch.zeros(experts, dtype=torch.int64, device=device),
                   torch.zeros(experts, channels, dtype=torch.float64, device=device),
                   torch.zeros(experts, channels, dtype=torch.float64, device=device),
                   torch.zeros(experts, dtype=torch.bool, device=device))

    def __post_init__(self) -> None:
        if self.fallback is None:
            self.fallback = torch.zeros(self.count.shape, dtype=torch.bool, device=self.count.device)

    @property
    def experts(self) -> int:
        return self.count.shape[0]

    def add(self, x: torch.Tensor, expert: int = 0) -> None:
        """Accumulate the rows of x [..., C] into one expert's sums."""
        x = x.reshape(-1, x.shape[-1]).double()
        self.count[expert] += x.shape[0]
        self.sum_abs[expert] += x.abs().sum(0)
        self.sum_sq[expert] += x.square().sum(0)

    def add_routed(self, x: torch.Tensor, chosen: torch.Tensor) -> None:
        """Accumulate rows of x [N, C] into every expert that chose them; chosen [N, E] bool. One matmul each."""
        onehot = chosen.t().double()  # [E, N]
        xd = x.double()
        self.count += chosen.sum(0).to(torch.int64)
        self.sum_abs += onehot @ xd.abs()
        self.sum_sq += onehot @ xd.square()

    def pooled(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(tokens, sum |x|, sum x^2) over all experts' rows."""
        return int(self.count.sum()), self.sum_abs.sum(0), self.sum_sq.sum(0)

    def mark_fallback(self, min_tokens: int) -> list[int]:
        """Flag experts with fewer than min_tokens rows (at least those with none); return their ids."""
        self.fallback = self.count < max(1, min_tokens)
        return self.fallback.nonzero().flatten().tolist()

    def _mean(self, sums: torch.Tensor) -> torch.Tensor:
        n, pooled_abs, pooled_sq = self.pooled()
        pooled = (pooled_abs if sums is self.sum_abs else pooled_sq) / max(n, 1)
        own = sums / self.count.clamp(min=1)[:, None]
        return torch.where(self.fallback[:, None] | (self.count == 0)[:, None], pooled[None], own)

    def mean_abs(self) -> torch.Tensor:
        """[E, C] mean |x| per channel; experts that fell back (or saw nothing) get the pooled mean."""
        return self._mean(self.sum_abs)

    def mean_sq(self) -> torch.Tensor:
        """[E, C] mean x^2 per channel, with the same fallback."""
        return self._mean(self.sum_sq)

    def imatrix_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum x^2 [E, C], counts [E]) for an importance matrix: experts that fell back carry the pooled mean
        with a count of max(count, 1), so sum/count is always the statistic used and never 0/0."""
        counts = torch.where(self.fallback, self.count.clamp(min=1), self.count)
        return self.mean_sq() * counts[:, None].double(), counts

    def to(self, device: torch.device | str) -> ExpertStats:
        return ExpertStats(self.count.to(device), self.sum_abs.to(device), self.sum_sq.to(device),
                           self.fallback.to(device))


class CalibrationStats:
    """Statistics of every layer, with the options and data that produced them."""

    def __init__(self, layers: dict[int, dict[str, ExpertStats]] | None = None, meta: dict | None = None):
        self.layers = layers or {}
        self.meta = meta or {}

    def get(self, layer: int, point: str) -> ExpertStats:
        try:
            return self.layers[layer][point]
        except KeyError:
            raise QuantkitError(f"calibration statistics hold no {point!r} input for layer {layer}") from None

    def fallbacks(self) -> dict[str, list[int]]:
        """'layer.point' -> experts that fell back to pooled statistics."""
        out = {}
        for n, points in sorted(self.layers.items()):
            for p in EXPERT_POINTS:
                if p in points:
                    ids = points[p].fallback.nonzero().flatten().tolist()
                    if ids:
                        out[f"{n}.{p}"] = ids
        return out

    def token_counts(self) -> torch.Tensor:
        """[layers, E] tokens the router sent to each expert."""
        return torch.stack([self.layers[n]["routed"].count.cpu() for n in sorted(self.layers)])

    # ---- file ------------------------------------------------------------------------------------------------

    @staticmethod
    def meta_path(path: Path) -> Path:
        return path.with_suffix(".json")

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tensors = {}
        for n, points in self.layers.items():
            for p, s in points.items():
                key = f"model.layers.{n}.{p}."
                tensors[key + "count"] = s.count.cpu()
                tensors[key + "sum_abs"] = s.sum_abs.cpu()
                tensors[key + "sum_sq"] = s.sum_sq.cpu()
                tensors[key + "fallback"] = s.fallback.cpu().to(torch.uint8)
        meta = {**self.meta, "format": FORMAT, "fallback": self.fallbacks()}
        tmp = path.with_name(f".{path.name}.partial")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp), metadata={"quantkit": "calibration-stats"})
            tmp.replace(path)
            meta_tmp = self.meta_path(tmp)
            meta_tmp.write_text(json.dumps(meta, indent=1) + "\n")
            meta_tmp.replace(self.meta_path(path))
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise QuantkitError(f"{path}: cannot write statistics ({e.strerror})") from None

    @classmethod
    def load(cls, path: str | Path) -> CalibrationStats:
        path = Path(path)
        if not path.is_file():
            raise QuantkitError(f"{path}: no such statistics file")
        meta_path = cls.meta_path(path)
        try:
            meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("quantkit") != "calibration-stats":
                    raise QuantkitError(f"{path}: not a quantkit calibration statistics file")
                data = {k: f.get_tensor(k) for k in f.keys()}
        except QuantkitError:
            raise
        except Exception as e:
            raise QuantkitError(f"{path}: cannot read statistics ({e})") from None
        layers: dict[int, dict[str, ExpertStats]] = {}
        for key in data:
            if not key.endswith(".count"):
                continue
            base = key.removesuffix("count")
            parts = base.split(".")
            layer, point = int(parts[2]), parts[3]
            try:
                layers.setdefault(layer, {})[point] = ExpertStats(
                    data[base + "count"], data[base + "sum_abs"], data[base + "sum_sq"],
                    data[base + "fallback"].bool())
            except KeyError as e:
                raise QuantkitError(f"{path}: statistics tensor {e.args[0]!r} is missing") from None
        return cls(layers, meta)

    def check_matches(self, cfg, where: str) -> None:
        """Refuse statistics of another architecture (layer count, widths or expert count differ)."""
        want = {"qkv": (1, cfg.hidden_size), "o": (1, cfg.q_width), "router": (1, cfg.hidden_size),
                "w13": (cfg.num_local_experts, cfg.hidden_size), "w2": (cfg.num_local_experts, cfg.intermediate_size)}
        for n in range(cfg.num_hidden_layers):
            for p, shape in want.items():
                s = self.layers.get(n, {}).get(p)
                if s is None or tuple(s.sum_abs.shape) != shape:
                    got = None if s is None else list(s.sum_abs.shape)
                    raise QuantkitError(f"{where}: statistics for layer {n} {p} are {got}, the checkpoint needs "
                                        f"{list(shape)}")
