"""Recipes: what a conversion keeps, casts and quantizes, as YAML loaded into a frozen, validated dataclass.

    recipe = Recipe.load("bf16")                       # recipes/minimax-m2/bf16.yaml, shipped in the package
    recipe = Recipe.load("my-recipe.yaml")             # or a file of the user's

Tensor kinds are those of `quantkit.arch.TensorSpec.kind`: embed, head, norm, attn, qk_norm, router,
router_bias, expert. The recipe's digest goes into the output manifest's fingerprint, so that a resumed run
with a changed recipe is refused rather than mixed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from quantkit.errors import QuantkitError

KINDS = ("embed", "head", "norm", "attn", "qk_norm", "router", "router_bias", "expert")
TARGETS = ("bf16", "fp8", "awq", "gguf")
DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class Recipe:
    name: str
    family: str
    target: str
    dtype: str = "bfloat16"  # what unquantized tensors are written as
    keep_dtype: tuple[str, ...] = ()  # tensor kinds written in their stored dtype (the fp32 router, for example)
    quantize: tuple[str, ...] = ()  # tensor kinds the target format quantizes
    options: dict = field(default_factory=dict)  # format-specific settings (block sizes, groups, type mix)
    description: str = ""

    def __post_init__(self) -> None:
        where = f"recipe {self.name!r}"
        if self.target not in TARGETS:
            raise QuantkitError(f"{where}: target {self.target!r} is not one of {', '.join(TARGETS)}")
        if self.dtype not in DTYPES:
            raise QuantkitError(f"{where}: dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        for key in ("keep_dtype", "quantize"):
            bad = [k for k in getattr(self, key) if k not in KINDS]
            if bad:
                raise QuantkitError(f"{where}: {key} names unknown tensor kinds {bad} (known: {', '.join(KINDS)})")

    @classmethod
    def load(cls, name_or_path: str | Path, family: str = "minimax-m2") -> Recipe:
        path = Path(name_or_path)
        if path.suffix in (".yaml", ".yml") or path.is_file():
            if not path.is_file():
                raise QuantkitError(f"{path}: no such recipe file")
            text = path.read_text()
        else:
            res = resources.files("quantkit.recipes") / family / f"{name_or_path}.yaml"
            if not res.is_file():
                raise QuantkitError(f"no built-in recipe {name_or_path!r} for {family}")
            text = res.read_text()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise QuantkitError(f"{name_or_path}: not valid YAML ({str(e).splitlines()[0]})") from None
        return cls.from_dict(data, str(name_or_path))

    @classmethod
    def from_dict(cls, data: object, where: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise QuantkitError(f"{where}: a recipe is a YAML mapping")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise QuantkitError(f"{where}: unknown recipe keys {unknown}")
        missing = [k for k in ("name", "family", "target") if k not in data]
        if missing:
            raise QuantkitError(f"{where}: missing recipe keys {missing}")
        values = dict(data)
        for key in ("keep_dtype", "quantize"):
            values[key] = tuple(values.get(key) or ())
        values["options"] = dict(values.get("options") or {})
        return cls(**values)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["keep_dtype"], d["quantize"] = list(self.keep_dtype), list(self.quantize)
        return d

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()
