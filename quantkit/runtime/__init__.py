"""The MiniMax-M2 runtime: model, KV cache, generation."""

from quantkit.runtime.generate import Sampling, generate
from quantkit.runtime.model import MiniMaxM2, load_model

__all__ = ["MiniMaxM2", "Sampling", "generate", "load_model"]
