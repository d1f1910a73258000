"""The device parameters every kernel test module shares (see tests/test_kernels_fp8.py's docstring).

Import this before anything that imports triton: where no CUDA device is present it sets TRITON_INTERPRET=1 first,
so that `cpu` cases run the kernels in Triton's interpreter; `cuda` cases run the compiled kernels and are marked
gpu. `gpu_only` marks a case that needs the compiled kernels on a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import

from quantkit.kernels import fp8_gemm  # noqa: E402

CUDA = torch.cuda.is_available()
INTERPRETED = fp8_gemm.INTERPRETED

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETED, reason="Triton compiles in this process; CPU "
                                                 "tensors need TRITON_INTERPRET=1 before triton's first import")),
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not CUDA, reason="no CUDA device"),
                                pytest.mark.skipif(INTERPRETED, reason="TRITON_INTERPRET=1: the cpu cases cover "
                                                   "the interpreter")]),
]
gpu_only = [pytest.mark.gpu, pytest.mark.skipif(not CUDA or INTERPRETED, reason="needs a CUDA device, compiled")]
# the interpreter computes tl.sigmoid as 1 / (1 + exp(-x)) in numpy, which warns where exp overflows to inf
IGNORE_EXP_OVERFLOW = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
