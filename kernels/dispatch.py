"""Which implementation of a kernel runs: AGENT_KERNELS=auto (default: Triton on CUDA tensors,
the torch reference elsewhere), triton (forced; CPU tensors need TRITON_INTERPRET=1), or torch."""
from __future__ import annotations

import os

import torch

try:
    import triton
except ImportError:  # e.g. macOS: only the torch references are available
    triton = None


def kernel_backend() -> str:
    mode = os.environ.get("AGENT_KERNELS", "auto").strip().lower() or "auto"
    if mode not in ("auto", "triton", "torch"):
        raise ValueError(f"AGENT_KERNELS={mode!r}: expected triton, torch or auto")
    return mode


def use_triton(x: torch.Tensor) -> bool:
    mode = kernel_backend()
    return mode == "triton" or (mode == "auto" and x.is_cuda and triton is not None)
