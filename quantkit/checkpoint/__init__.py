"""Checkpoint I/O: the lazy sharded-safetensors reader and the atomic, resumable sharded writer."""

from quantkit.checkpoint.reader import CheckpointReader
from quantkit.checkpoint.writer import OutputFolder, OutTensor, Shard, plan_shards

__all__ = ["CheckpointReader", "OutputFolder", "OutTensor", "Shard", "plan_shards"]
