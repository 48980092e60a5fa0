"""Torch reference for one decode step of attention over a per-slot ring KV cache.

This is the contract every fused kernel in `kernels/` must match. Shapes:
  q            [B, H, D]     this step's query projections, before RoPE
  k, v         [B, Hkv, D]   its key/value projections, k before RoPE; Hkv divides H
                             (grouped-query attention: query head h reads KV head h // (H/Hkv))
  k_cache      [B, Hkv, C, D] ring buffer; slot of absolute position p is p % C
  v_cache      [B, Hkv, C, D] (may be float8_e4m3fn: the new k/v are rounded into it, saturating
                             at +-448, and the window is read back from it)
  positions    [B] int64     absolute position of this step, per slot
  exec_mask    [B] bool      rows that run this step; others leave their cache untouched
  interleaved                RoPE pairs (2i, 2i+1) (moshi's "rope") or (i, i + D/2) ("rope_concat")
Returns the attention output [B, H, D] (rows with exec_mask False hold unspecified values).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@functools.lru_cache(maxsize=None)
def rope_frequencies(head_dim: int, max_period: float, device: torch.device) -> torch.Tensor:
    """[head_dim / 2] fp32, built once per shape and device (by a warm-up call, before any CUDA
    graph capture) with the reference's own expression, so that the fp32 angles pos * freq are
    bit-identical to it (an in-kernel exp would differ by an ulp, which at positions ~1e5 moves
    the angle by ~1e-2 rad)."""
    ds = torch.arange(head_dim // 2, device=device, dtype=torch.float32)
    return torch.exp(ds * (-math.log(max_period) * 2 / head_dim))


def rope_cos_sin(positions: torch.Tensor, head_dim: int, max_period: float):
    """cos and sin [B, 1, D/2] of the angles at one absolute position per row."""
    freqs = rope_frequencies(head_dim, float(max_period), positions.device)
    angles = freqs * positions.float().view(-1, 1, 1)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               interleaved: bool = True) -> torch.Tensor:
    """RoPE on [B, H, D] in fp32, rounded back to x's dtype: pairs (2i, 2i+1) when
    `interleaved`, else (i, i + D/2)."""
    B, H, D = x.shape
    if interleaved:
        pairs = x.view(B, H, D // 2, 2)
        xr, xi = pairs[..., 0].float(), pairs[..., 1].float()
    else:
        xr, xi = x[..., :D // 2].float(), x[..., D // 2:].float()
    out_r = xr * cos - xi * sin
    out_i = xr * sin + xi * cos
    if interleaved:
        return torch.stack([out_r.to(x.dtype), out_i.to(x.dtype)], dim=-1).view(B, H, D)
    return torch.cat([out_r.to(x.dtype), out_i.to(x.dtype)], dim=-1)


@functools.lru_cache(maxsize=None)
def _arange(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device)  # built once: this runs per layer and step


def decode_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor,
                         positions: torch.Tensor, exec_mask: torch.Tensor,
                         max_period: float | None = 10_000.0,
                         interleaved: bool = True) -> torch.Tensor:
    """RoPE (if max_period is not None), ring write for executing rows, masked attention."""
    B, H, C, D = k_cache.shape
    if max_period is not None:
        cos, sin = rope_cos_sin(positions, D, max_period)
        q, k = apply_rope(q, cos, sin, interleaved), apply_rope(k, cos, sin, interleaved)
    rows = _arange(B, q.device)
    slots = positions % C
    keep = ~exec_mask.view(B, 1, 1)
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    for cache, new in ((k_cache, k), (v_cache, v)):
        old = cache[rows, :, slots]
        if fp8:  # float8: saturate (no NaN from an outlier), select on the raw bytes
            new = new.float().clamp(-FP8_MAX, FP8_MAX).to(cache.dtype)
            cache[rows, :, slots] = torch.where(keep, old.view(torch.uint8),
                                                new.view(torch.uint8)).view(cache.dtype)
        else:
            cache[rows, :, slots] = torch.where(keep, old, new)
    if fp8:
        k_cache, v_cache = k_cache.to(q.dtype), v_cache.to(q.dtype)
    # A ring of capacity C written up to `positions` holds exactly the last min(p+1, C) steps.
    valid = _arange(C, q.device).view(1, C) <= positions.view(B, 1)
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k_cache, v_cache,
                                         attn_mask=valid.view(B, 1, 1, C),
                                         enable_gqa=q.shape[1] != H)
    return out.squeeze(2)


def prefill_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          k_ring: torch.Tensor, v_ring: torch.Tensor,
                          max_period: float | None = 10_000.0,
                          interleaved: bool = True) -> torch.Tensor:
    """Positions 0..T-1 of one row at once, causally (a prompt prefill). q [T, H, D] and k, v
    [T, Hkv, D] before RoPE; k_ring, v_ring [Hkv, C, D] are that row's ring buffers, T <= C. K/V
    land in slots 0..T-1 rounded exactly as T decode steps would write them (float8: saturated),
    and attention reads them back from the ring, as the decode steps that follow will.
    Returns [T, H, D]."""
    T, H, D = q.shape
    if max_period is not None:
        cos, sin = rope_cos_sin(_arange(T, q.device), D, max_period)
        q, k = apply_rope(q, cos, sin, interleaved), apply_rope(k, cos, sin, interleaved)
    for ring, new in ((k_ring, k), (v_ring, v)):
        if ring.dtype == torch.float8_e4m3fn:
            new = new.float().clamp(-FP8_MAX, FP8_MAX)
        ring[:, :T] = new.transpose(0, 1).to(ring.dtype)
    keys, values = k_ring[:, :T].to(q.dtype), v_ring[:, :T].to(q.dtype)
    # 4-D, so that a GPU picks a fused (flash) kernel instead of materialising T x T scores.
    out = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), keys.unsqueeze(0),
                                         values.unsqueeze(0), is_causal=True,
                                         enable_gqa=k_ring.shape[0] != H)
    return out[0].transpose(0, 1)
