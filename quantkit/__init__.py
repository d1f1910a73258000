"""quantkit: streaming quantization and checkpoint conversion for the MiniMax-M2 family."""

import os

# Large CPU tensors on transparent huge pages: torch's allocator reads this once, as torch loads, so it is set before
# anything imports torch. A conversion allocates and frees tens of MB a tensor, and on 4 KB pages the first-touch
# page faults cost about as much as the arithmetic (BENCHMARKS.md: convert --to gguf q8_0 1.4-2x faster on a 2-core
# VM). THP_MEM_ALLOC_ENABLE=0 in the environment turns it off; where torch was imported first it has no effect.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
