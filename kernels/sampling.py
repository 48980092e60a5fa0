"""Fused Gumbel-max draw for B rows: hash noise, top-k mask and argmax in one pass over the logits.

The contract (`gumbel_argmax_ref`), per row b:
  score[i] = scaled[b, i] + (0 if greedy[b] else Gumbel(hash(row_keys[b], i)))  if scaled[b, i] >= kth[b]
           = -inf                                                                 otherwise
  token[b] = argmax_i score[i]  (first index on ties)
`scaled` are the logits divided by the row's temperature, `kth` the row's k-th largest scaled
logit (its top-k threshold) and `row_keys` a 32-bit key per row and draw. The noise of candidate
i is Gumbel(u) = -log(-log(u)) with u from the 24 high bits of
mix32(mix32(row_key ^ mix32(i)) ^ row_key): counter-based, so it depends on nothing but the row.

In torch this is ~30 elementwise launches over [B, V] per draw, and a Moshi step draws 9 times;
the Triton kernel is one launch per draw and reads the logits once.
"""
from __future__ import annotations

import functools

import torch

from kernels.dispatch import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MASK32 = 0xFFFFFFFF
# Multipliers below 2**31, so that a 32-bit value times one fits in int64 exactly (torch has no
# wrapping uint32 multiply); the shifts and constants are a full-avalanche 32-bit hash from
# Wellons' hash-prospector.
MIX_C1, MIX_C2 = 0x21F0AAAD, 0x735A2D97


def mix32(x: torch.Tensor) -> torch.Tensor:
    """Bijective 32-bit hash of int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * MIX_C1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MIX_C2) & MASK32
    return x ^ (x >> 15)


@functools.lru_cache(maxsize=None)
def _index_keys(V: int, device: torch.device) -> torch.Tensor:
    # Built by the first (warm-up) call, before any CUDA graph capture.
    return mix32(torch.arange(V, dtype=torch.long, device=device)).view(1, -1)


def gumbel_noise(row_keys: torch.Tensor, V: int) -> torch.Tensor:
    """Gumbel noise [B, V] for candidates 0..V-1 of each row key [B]. Uniforms have 24 bits and
    never reach 0 or 1."""
    keys = row_keys.view(-1, 1)
    h = mix32(mix32(keys ^ _index_keys(V, row_keys.device)) ^ keys)
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    return -torch.log(-torch.log(u))


def gumbel_argmax_ref(scaled: torch.Tensor, kth: torch.Tensor, row_keys: torch.Tensor,
                      greedy: torch.Tensor) -> torch.Tensor:
    """scaled [B, V] fp32, kth [B] fp32, row_keys [B] int64, greedy [B] bool -> tokens [B]."""
    noise = torch.where(greedy.view(-1, 1), 0.0, gumbel_noise(row_keys, scaled.shape[1]))
    score = torch.where(scaled >= kth.view(-1, 1), scaled + noise, float("-inf"))
    return score.argmax(dim=-1)


if triton is not None:

    @triton.jit
    def _mix32(x):
        x = x ^ (x >> 16)
        x = x * 0x21F0AAAD
        x = x ^ (x >> 15)
        x = x * 0x735A2D97
        return x ^ (x >> 15)

    @triton.jit
    def _gumbel_argmax_kernel(scaled_ptr, kth_ptr, keys_ptr, greedy_ptr, out_ptr, V, stride_b,
                              BLOCK_V: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        kth = tl.load(kth_ptr + b)
        key = tl.load(keys_ptr + b).to(tl.uint32)
        noisy = tl.load(greedy_ptr + b) == 0
        best = -float("inf")
        best_i = 0
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(scaled_ptr + b * stride_b + offs, mask=offs < V, other=-float("inf"))
            h = _mix32(_mix32(key ^ _mix32(offs.to(tl.uint32))) ^ key)
            u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
            g = -tl.log(-tl.log(u))
            score = tl.where(x >= kth, x + tl.where(noisy, g, 0.0), -float("inf"))
            score = tl.where(offs < V, score, -float("inf"))
            m = tl.max(score, 0)
            # First index holding the block's max (argmax's tie rule), then strict > across blocks.
            i = tl.min(tl.where(score == m, offs, V), 0)
            take = m > best
            best_i = tl.where(take, i, best_i)
            best = tl.where(take, m, best)
        tl.store(out_ptr + b, best_i.to(tl.int64))


def gumbel_argmax_triton(scaled: torch.Tensor, kth: torch.Tensor, row_keys: torch.Tensor,
                         greedy: torch.Tensor) -> torch.Tensor:
    if triton is None:
        raise RuntimeError("triton is not installed; use AGENT_KERNELS=torch")
    B, V = scaled.shape
    if scaled.dtype != torch.float32 or scaled.stride(1) != 1:
        raise ValueError("scaled logits must be contiguous float32 rows")
    out = torch.empty(B, dtype=torch.long, device=scaled.device)
    block = min(4096, triton.next_power_of_2(V))
    _gumbel_argmax_kernel[(B,)](scaled, kth.float().contiguous(), row_keys.contiguous(),
                                greedy.contiguous(), out, V, scaled.stride(0), BLOCK_V=block,
                                num_warps=8 if block >= 2048 else 4)
    return out


def gumbel_argmax(scaled: torch.Tensor, kth: torch.Tensor, row_keys: torch.Tensor,
                  greedy: torch.Tensor) -> torch.Tensor:
    """Triton on CUDA, the reference elsewhere; AGENT_KERNELS forces either (kernels/dispatch.py)."""
    impl = gumbel_argmax_triton if use_triton(scaled) else gumbel_argmax_ref
    return impl(scaled, kth, row_keys, greedy)
