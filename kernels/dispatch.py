"""Which implementation of a kernel runs: AGENT_KERNELS=auto (default: Triton on CUDA tensors,
the torch reference elsewhere), triton (forced; CPU tensors need TRITON_INTERPRET=1), or torch."""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # e.g. macOS: only the torch references are available
    triton = tl = None


def require_triton() -> None:
    """For the Triton entry points: a clear error where Triton is missing."""
    if triton is None:
        raise RuntimeError("triton is not installed; use AGENT_KERNELS=torch")


def kernel_backend() -> str:
    mode = os.environ.get("AGENT_KERNELS", "auto").strip().lower() or "auto"
    if mode not in ("auto", "triton", "torch"):
        raise ValueError(f"AGENT_KERNELS={mode!r}: expected triton, torch or auto")
    return mode


def use_triton(x: torch.Tensor) -> bool:
    mode = kernel_backend()
    return mode == "triton" or (mode == "auto" and x.is_cuda and triton is not None)
