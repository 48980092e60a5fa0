"""Which implementation of a kernel runs: AGENT_KERNELS=auto (default: Triton on CUDA tensors,
the torch reference elsewhere), triton (forced; CPU tensors need TRITON_INTERPRET=1), or torch.

Under `auto`, a kernel that failed the load-time self-check on this device (kernels/selfcheck.py)
runs its torch reference for the rest of the process: `fall_back` records it and why."""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # e.g. macOS: only the torch references are available
    triton = tl = None

# Every kernel the engine runs; each has a Triton version beside its torch reference.
KERNELS = ("decode_attention", "rms_norm", "silu_gate", "embedding", "sampling", "int8_gemm")

_fallbacks: dict[str, str] = {}  # kernel -> why it runs its reference in this process


def require_triton() -> None:
    """For the Triton entry points: a clear error where Triton is missing."""
    if triton is None:
        raise RuntimeError("triton is not installed; use AGENT_KERNELS=torch")


def kernel_backend() -> str:
    mode = os.environ.get("AGENT_KERNELS", "auto").strip().lower() or "auto"
    if mode not in ("auto", "triton", "torch"):
        raise ValueError(f"AGENT_KERNELS={mode!r}: expected triton, torch or auto")
    return mode


def triton_by_default(device: torch.device) -> bool:
    """`auto`'s rule before any self-check: Triton where it compiles (CUDA)."""
    return device.type == "cuda" and triton is not None


def runs_triton(device: torch.device, kernel: str) -> bool:
    """Whether `kernel` runs its Triton version on `device`: AGENT_KERNELS forces one or the
    other; under `auto`, Triton by default (`triton_by_default`) unless the kernel fell back."""
    mode = kernel_backend()
    if mode != "auto":
        return mode == "triton"
    return kernel not in _fallbacks and triton_by_default(device)


def use_triton(x: torch.Tensor, kernel: str) -> bool:
    """Whether `kernel` runs its Triton version on `x`'s device."""
    return runs_triton(x.device, kernel)


def fall_back(kernel: str, why: str) -> None:
    """Run `kernel`'s torch reference from now on in this process (under AGENT_KERNELS=auto)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}")
    _fallbacks[kernel] = why


def forget_fallbacks() -> None:
    """Back to the rule alone (tests: each engine's self-check starts afresh)."""
    _fallbacks.clear()


def kernel_paths(device: torch.device, kernels=KERNELS) -> dict[str, dict[str, str]]:
    """What runs for each kernel on `device`: {"path": "triton" | "torch"}, plus "why" for a
    kernel that fell back to its reference."""
    mode = kernel_backend()
    paths = {}
    for kernel in kernels:
        paths[kernel] = {"path": "triton" if runs_triton(device, kernel) else "torch"}
        if mode == "auto" and kernel in _fallbacks:
            paths[kernel]["why"] = _fallbacks[kernel]
    return paths
