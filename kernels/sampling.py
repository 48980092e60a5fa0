"""Fused sampling draw for B rows: temperature, top-k mask, hash noise and argmax in one pass.

The contract (`sample_ref`), per row b, for logits [B, V] in fp32:
  scaled[i] = logits[b, i] / temp[b],   kth = kth_logit[b] / temp[b]   (the row's top-k threshold)
  key       = mix32(mix32(seed_key[b] ^ (counter[b] mod 2**32)) ^ stream)
  score[i]  = scaled[i] + (0 if greedy[b] else Gumbel(hash(key, i)))   if scaled[i] >= kth
            = -inf                                                      otherwise
  token[b]  = argmax_i score[i]  (first index on ties)
`kth_logit` is the row's k-th largest logit: dividing by the positive temperature keeps the
order, so the comparison selects exactly the top k. The noise of candidate i is
Gumbel(u) = -log(-log(u)), u from the 23 high bits of mix32(mix32(key ^ mix32(i)) ^ key):
counter-based, so a row's draws depend on nothing but its own seed, step and stream.

In torch this is ~30 launches per draw (elementwise over [B, V] and the key mixing over [B]);
a Moshi step draws 9 times. The Triton kernel is one launch per draw and reads the logits once.
"""
from __future__ import annotations

import functools

import torch

from duplex_agent.kernels.dispatch import require_triton, tl, triton, use_triton


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
    """Gumbel noise [B, V] for candidates 0..V-1 of each row key [B]. Uniforms are
    (n + 0.5) / 2**23 for 23-bit n: exact in fp32, never 0 or 1 (with 24 bits the top one would
    round to 1.0, whose Gumbel value is +inf)."""
    keys = row_keys.view(-1, 1)
    h = mix32(mix32(keys ^ _index_keys(V, row_keys.device)) ^ keys)
    return -torch.log(-torch.log(uniform_from_hash(h)))


def uniform_from_hash(h: torch.Tensor) -> torch.Tensor:
    """(n + 0.5) / 2**23 from the top 23 bits n of 32-bit hashes, in fp32."""
    return ((h >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def row_keys(seed_key: torch.Tensor, counter: torch.Tensor, stream: int) -> torch.Tensor:
    """One 32-bit key per row and draw."""
    return mix32(mix32(seed_key ^ (counter & MASK32)) ^ stream)


def sample_ref(logits: torch.Tensor, temp: torch.Tensor, kth_logit: torch.Tensor,
               seed_key: torch.Tensor, counter: torch.Tensor, stream: int,
               greedy: torch.Tensor) -> torch.Tensor:
    """logits [B, V] fp32; temp, kth_logit [B] fp32; seed_key, counter [B] int64; greedy [B]
    bool -> tokens [B] int64."""
    scaled = logits / temp.view(-1, 1)
    kth = kth_logit / temp
    noise = torch.where(greedy.view(-1, 1), 0.0,
                        gumbel_noise(row_keys(seed_key, counter, stream), logits.shape[1]))
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

    @triton.jit(do_not_specialize=["stream"])  # 1 would become a constant: no .to() on it
    def _sample_kernel(logits_ptr, temp_ptr, kth_ptr, seed_ptr, counter_ptr, greedy_ptr, out_ptr,
                       V, stride_b, stream, BLOCK_V: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        temp = tl.load(temp_ptr + b)
        kth = tl.load(kth_ptr + b) / temp
        seed = tl.load(seed_ptr + b).to(tl.uint32)
        counter = (tl.load(counter_ptr + b) & 0xFFFFFFFF).to(tl.uint32)
        key = _mix32(_mix32(seed ^ counter) ^ stream.to(tl.uint32))
        noisy = tl.load(greedy_ptr + b) == 0
        best = -float("inf")
        best_i = 0
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(logits_ptr + b * stride_b + offs, mask=offs < V, other=-float("inf")) / temp
            h = _mix32(_mix32(key ^ _mix32(offs.to(tl.uint32))) ^ key)
            u = ((h >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
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


def sample_triton(logits: torch.Tensor, temp: torch.Tensor, kth_logit: torch.Tensor,
                  seed_key: torch.Tensor, counter: torch.Tensor, stream: int,
                  greedy: torch.Tensor) -> torch.Tensor:
    require_triton()
    B, V = logits.shape
    if logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError("logits must be contiguous float32 rows")
    for name, t in (("temp", temp), ("kth_logit", kth_logit), ("seed_key", seed_key),
                    ("counter", counter), ("greedy", greedy)):
        if t.shape != (B,) or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous [B] tensor")
    out = torch.empty(B, dtype=torch.long, device=logits.device)
    block = min(4096, triton.next_power_of_2(V))
    _sample_kernel[(B,)](logits, temp, kth_logit, seed_key, counter, greedy, out, V,
                         logits.stride(0), stream, BLOCK_V=block,
                         num_warps=8 if block >= 2048 else 4)
    return out


def sample(logits: torch.Tensor, temp: torch.Tensor, kth_logit: torch.Tensor,
           seed_key: torch.Tensor, counter: torch.Tensor, stream: int,
           greedy: torch.Tensor) -> torch.Tensor:
    """Triton on CUDA, the reference elsewhere; AGENT_KERNELS forces either (kernels/dispatch.py)."""
    impl = sample_triton if use_triton(logits, "sampling") else sample_ref
    return impl(logits, temp, kth_logit, seed_key, counter, stream, greedy)
