"""quantkit: streaming quantization and checkpoint conversion for the MiniMax-M2 family."""

__version__ = "0.1.0"
