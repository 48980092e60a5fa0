"""Weight-only int8 GEMM: y = x @ W.T with W kept int8 in memory, dequantised inside the kernel.

Contract (`int8_linear_ref`), for x [B, K] in fp32/fp16/bf16, weight [N, K] int8 and scale [N]
fp32 (moshi's q8 layout: `weight` row-wise absmax-quantised, `weight_scb` the absmax per row):
  y[b, n] = (sum_k x[b, k] * weight[n, k]) * scale[n] / 127
accumulated in fp32 and rounded once to x's dtype. That is moshi's dequantised weight
(weight * weight_scb / 127) applied to x, with the per-row scale factored out of the sum.

At serving batch sizes (B = 1..64 conversations) a decode step's linears are bound by reading
the weights: int8 halves the bytes of bf16. The kernel streams each weight tile once for all
rows, converts it to the activation dtype in registers (exact: |w| <= 127) and applies the scale
to the fp32 accumulator at the end.
"""
from __future__ import annotations

import torch

from duplex_agent.kernels.dispatch import require_triton, tl, triton, use_triton


def int8_linear_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    acc = x.float() @ weight.float().t()
    return (acc * (scale.float() / 127.0)).to(x.dtype)


if triton is not None:

    @triton.jit
    def _int8_gemm_kernel(x_ptr, w_ptr, s_ptr, y_ptr, B, N, K,
                          stride_xb, stride_wn, stride_yb,
                          DOT_FP32: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_b = tl.program_id(1)
        offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        b_mask = offs_b < B
        n_mask = offs_n < N
        x_rows = x_ptr + offs_b.to(tl.int64)[:, None] * stride_xb
        w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            k_mask = k < K
            x = tl.load(x_rows + k[None, :], mask=b_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0)
            if DOT_FP32:  # fp32 activations, or bf16 where the interpreter's bf16 dot is wrong
                acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        scale = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0) * (1.0 / 127.0)
        y = acc * scale[None, :]
        y_ptrs = y_ptr + offs_b.to(tl.int64)[:, None] * stride_yb + offs_n[None, :]
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=b_mask[:, None] & n_mask[None, :])


def int8_linear_triton(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    require_triton()
    if x.dim() != 2:
        raise ValueError(f"x must be [B, K], got {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.dtype != torch.int8 or weight.dim() != 2 or weight.stride(-1) != 1:
        raise ValueError("weight must be int8 [N, K] with contiguous rows")
    B, K = x.shape
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"weight is {tuple(weight.shape)}, x has {K} columns")
    if scale.dtype != torch.float32 or scale.shape != (N,) or scale.stride(0) != 1:
        raise ValueError(f"scale must be float32 [{N}], contiguous")
    y = torch.empty(B, N, device=x.device, dtype=x.dtype)
    # tl.dot needs >= 16 rows; one block of rows covers the usual batches, so each weight tile is
    # read once. Narrower column blocks give more programs for the small depformer linears.
    block_b = min(64, max(16, triton.next_power_of_2(B)))
    block_n = 64 if N >= 8192 else 32
    if not x.is_cuda:  # the interpreter (tests): its cost is per program, so few, wide ones
        block_n = min(256, max(16, triton.next_power_of_2(N)))
    block_k = 128 if K >= 128 else max(16, triton.next_power_of_2(K))
    dot_fp32 = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and not x.is_cuda)
    grid = (triton.cdiv(N, block_n), triton.cdiv(B, block_b))
    _int8_gemm_kernel[grid](x, weight, scale, y, B, N, K, x.stride(0), weight.stride(0),
                            y.stride(0), DOT_FP32=dot_fp32, BLOCK_B=block_b, BLOCK_N=block_n,
                            BLOCK_K=block_k, num_warps=4)
    return y


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Triton on CUDA, the reference elsewhere; AGENT_KERNELS forces either."""
    impl = int8_linear_triton if use_triton(x, "int8_gemm") else int8_linear_ref
    return impl(x, weight, scale)
