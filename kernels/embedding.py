"""Embedding lookup added onto a running sum, one launch: acc + table[ids], with id -1 meaning
"no input on this stream" (an exact zero vector).

Contract (`embed_add_ref`), for table [N, D], ids [B] int64 and acc [B, D] or None:
  e[b] = 0 if ids[b] == -1 else table[max(ids[b], 0)]        (other negative ids read row 0)
  out  = e if acc is None else acc + e                      (rounded to the table's dtype)
The model sums 17 stream embeddings per step (and one per depformer step); in eager torch each
is ~6 launches (clamp, lookup, compare, zeros, where, add).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from duplex_agent.kernels.dispatch import require_triton, tl, triton, use_triton



def embed_add_ref(table: torch.Tensor, ids: torch.Tensor,
                  acc: torch.Tensor | None = None) -> torch.Tensor:
    e = F.embedding(ids.clamp(min=0), table)
    e = torch.where((ids == -1).unsqueeze(-1), 0.0, e)
    return e if acc is None else acc + e


if triton is not None:

    @triton.jit
    def _embed_add_kernel(table_ptr, ids_ptr, acc_ptr, out_ptr, N, D, stride_ids, stride_t,
                          stride_acc, stride_out, HAS_ACC: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = offs < D
        idx = tl.load(ids_ptr + b * stride_ids)  # ids may be a column of the [B, 17] tokens
        row = tl.minimum(tl.maximum(idx, 0), N - 1)  # never a read outside the table
        present = offs < tl.where(idx == -1, 0, D)  # an all-false mask for id -1
        e = tl.load(table_ptr + row * stride_t + offs, mask=mask & present, other=0.0)
        if HAS_ACC:
            a = tl.load(acc_ptr + b * stride_acc + offs, mask=mask, other=0.0)
            e = (a.to(tl.float32) + e.to(tl.float32)).to(table_ptr.dtype.element_ty)
        tl.store(out_ptr + b * stride_out + offs, e, mask=mask)


def embed_add_triton(table: torch.Tensor, ids: torch.Tensor,
                     acc: torch.Tensor | None = None) -> torch.Tensor:
    require_triton()
    N, D = table.shape
    if ids.dim() != 1 or table.stride(1) != 1:
        raise ValueError("ids must be [B] and the table's rows contiguous")
    B = ids.shape[0]
    if acc is not None and (acc.shape != (B, D) or acc.stride(1) != 1 or acc.dtype != table.dtype):
        raise ValueError("acc must be [B, D] in the table's dtype")
    out = torch.empty(B, D, device=table.device, dtype=table.dtype)
    block = min(1024, triton.next_power_of_2(D))
    src = acc if acc is not None else out
    _embed_add_kernel[(B, triton.cdiv(D, block))](
        table, ids, src, out, N, D, ids.stride(0), table.stride(0), src.stride(0), out.stride(0),
        HAS_ACC=acc is not None, BLOCK_D=block, num_warps=4)
    return out


def embed_add(table: torch.Tensor, ids: torch.Tensor, acc: torch.Tensor | None = None):
    """Triton on CUDA, the reference elsewhere; AGENT_KERNELS forces either."""
    impl = embed_add_triton if use_triton(table, "embedding") else embed_add_ref
    return impl(table, ids, acc)
