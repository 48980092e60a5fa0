"""SiLU gating of the feed-forward layers, one launch: gate_up [B, 2H] -> silu(gate) * up [B, H].

Contract (`silu_gate_ref`): the first H columns are the gate, the last H the up projection (the
on-disk layout of `linear_in`); silu is computed in fp32 and rounded to the input dtype, then
multiplied by `up` and rounded again, exactly as eager torch does in two launches (plus the
strided views' handling).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from duplex_agent.kernels.dispatch import require_triton, tl, triton, use_triton



def silu_gate_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.unflatten(-1, (2, -1)).unbind(-2)
    return F.silu(gate) * up


if triton is not None:

    @triton.jit
    def _silu_gate_kernel(gu_ptr, out_ptr, H, stride_gu, stride_out, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < H
        gate = tl.load(gu_ptr + row * stride_gu + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gu_ptr + row * stride_gu + H + offs, mask=mask, other=0.0)
        act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
        out = act.to(tl.float32) * up.to(tl.float32)
        tl.store(out_ptr + row * stride_out + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_gate_triton(gate_up: torch.Tensor) -> torch.Tensor:
    require_triton()
    if gate_up.dim() != 2 or gate_up.stride(-1) != 1 or gate_up.shape[1] % 2:
        raise ValueError("gate_up must be [B, 2H] with contiguous rows")
    B, H = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(B, H, device=gate_up.device, dtype=gate_up.dtype)
    block = min(1024, triton.next_power_of_2(H))
    _silu_gate_kernel[(B, triton.cdiv(H, block))](gate_up, out, H, gate_up.stride(0),
                                                  out.stride(0), BLOCK=block, num_warps=4)
    return out


def silu_gate(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton on CUDA, the reference elsewhere; AGENT_KERNELS forces either."""
    return silu_gate_triton(gate_up) if use_triton(gate_up, "silu_gate") else silu_gate_ref(gate_up)
