"""RMSNorm with an optional fused residual add, one launch per call.

Contract (`rms_norm_ref`), for x [B, D] in bf16/fp16/fp32 and alpha [D]:
  s = x + add                            (in x's dtype, when `add` is given; returned too)
  y = s * (alpha * rsqrt(eps + mean(s**2)))   with the statistics in fp32, y rounded to x's dtype
which is the reference model's norm. In eager torch this is ~9 launches (casts, square, mean,
rsqrt, products) plus one for the residual add; a decode step runs it twice per layer in 32
temporal layers and 8 x 6 depformer layers, where each launch handles a few KB. Launch count,
not bandwidth, is what these cost.
"""
from __future__ import annotations

import torch

from duplex_agent.kernels.dispatch import require_triton, tl, triton, use_triton



def rms_norm_ref(x: torch.Tensor, alpha: torch.Tensor, eps: float,
                 add: torch.Tensor | None = None):
    """Returns y, or (s, y) when `add` is given (s = x + add: the residual stream's update)."""
    s = x if add is None else x + add
    sf = s.float()
    var = eps + torch.mean(sf * sf, dim=-1, keepdim=True)
    y = (sf * (alpha.reshape(-1).float() * torch.rsqrt(var))).to(x.dtype)
    return y if add is None else (s, y)


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, r_ptr, alpha_ptr, s_ptr, y_ptr, D, eps,
                         stride_x, stride_r, stride_s, stride_y,
                         HAS_ADD: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_D)
        mask = offs < D
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
        if HAS_ADD:
            r = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0)
            # Round the sum to the input dtype, as the reference's separate add does.
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(s_ptr + row * stride_s + offs, x, mask=mask)
        xf = x.to(tl.float32)
        var = eps + tl.sum(xf * xf, 0) / D
        alpha = tl.load(alpha_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = xf * (alpha * tl.math.rsqrt(var))
        tl.store(y_ptr + row * stride_y + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(x: torch.Tensor, alpha: torch.Tensor, eps: float,
                    add: torch.Tensor | None = None):
    require_triton()
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError("x must be [B, D] with contiguous rows")
    B, D = x.shape
    alpha = alpha.reshape(-1)
    if alpha.numel() != D:
        raise ValueError(f"alpha has {alpha.numel()} elements, expected {D}")
    if add is not None and (add.shape != x.shape or add.stride(-1) != 1 or add.dtype != x.dtype):
        raise ValueError("add must match x in shape and dtype")
    y = torch.empty_like(x)
    s = torch.empty_like(x) if add is not None else y
    r = add if add is not None else x
    block = triton.next_power_of_2(D)
    _rms_norm_kernel[(B,)](x, r, alpha, s, y, D, float(eps),
                           x.stride(0), r.stride(0), s.stride(0), y.stride(0),
                           HAS_ADD=add is not None, BLOCK_D=block,
                           num_warps=min(16, max(1, block // 256)))
    return y if add is None else (s, y)


def rms_norm(x: torch.Tensor, alpha: torch.Tensor, eps: float, add: torch.Tensor | None = None):
    """Triton on CUDA, the reference elsewhere; AGENT_KERNELS forces either."""
    impl = rms_norm_triton if use_triton(x, "rms_norm") else rms_norm_ref
    return impl(x, alpha, eps, add)
