"""The Moshi language model: temporal transformer + depth transformer ("depformer").

Plain modules whose parameter names are exactly Kyutai's on-disk names, so `model.safetensors`
loads with a strict `load_state_dict`. Built for batched decoding: every call handles B rows
(conversations), each at its own absolute position, over a static ring KV cache of
`config.context` steps per row. One call = one 80 ms step; nothing here samples or keeps
token state (see `agent/lm_gen.py`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from duplex_agent.agent.config import LMConfig
from duplex_agent.kernels.attention_ref import prefill_attention_ref
from duplex_agent.kernels.decode_attention import decode_attention
from duplex_agent.kernels.embedding import embed_add
from duplex_agent.kernels.int8_gemm import int8_linear
from duplex_agent.kernels.rms_norm import rms_norm
from duplex_agent.kernels.silu_gate import silu_gate


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.alpha = nn.Parameter(torch.ones(1, 1, dim))  # on-disk shape [1, 1, dim]

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None):
        """norm(x); with `add`, (x + add, norm(x + add)) in one kernel. Statistics in fp32
        whatever the weights' dtype, as the reference does."""
        return rms_norm(x, self.alpha, self.eps, add)


class Int8Linear(nn.Module):
    """A bias-free linear with moshi's q8 weights: int8 `weight` [out, in], row-wise quantised,
    and its float32 absmax per row `weight_scb`; W = weight * weight_scb / 127. The weights stay
    int8 in memory and are dequantised inside the GEMM."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scb", torch.empty(out_features, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.weight_scb)


def linear(in_features: int, out_features: int, quantize: bool = False) -> nn.Module:
    return (Int8Linear(in_features, out_features) if quantize
            else nn.Linear(in_features, out_features, bias=False))


def project(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
            rows: slice) -> torch.Tensor:
    """x @ weight[rows].T, where `weight` stacks several matrices along dim 0 (one per depformer
    step, or q/k/v); int8 weights (`scale` given) go through the int8 GEMM."""
    if scale is None:
        return F.linear(x, weight[rows])
    return int8_linear(x, weight[rows], scale[rows])


class GatedFFN(nn.Module):
    """SiLU-gated FFN: the first `hidden` rows of linear_in are the gate, the rest the up side."""

    def __init__(self, dim: int, hidden: int, quantize: bool = False):
        super().__init__()
        self.linear_in = linear(dim, 2 * hidden, quantize)
        self.linear_out = linear(hidden, dim, quantize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_out(silu_gate(self.linear_in(x)))


class KVCache(nn.Module):
    """Static ring buffers [B, H, C, D]; absolute position p lives in slot p % C."""

    def __init__(self, batch: int, heads: int, capacity: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, heads, capacity, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)


class Attention(nn.Module):
    """Self-attention with fused [q; k; v] projection; `steps` > 1 stacks one weight set per
    depformer step along dim 0, exactly as on disk. With `kv_heads` < `heads` (grouped-query
    attention) k and v have kv_heads heads each, shared by heads / kv_heads query heads, and
    only those are cached. `interleaved`: the RoPE pairs (see kernels/attention_ref.py)."""

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, steps: int = 1,
                 quantize: bool = False, interleaved: bool = True):
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads or heads
        self.kv_dim = dim // heads * self.kv_heads
        self.interleaved = interleaved
        rows = steps * (dim + 2 * self.kv_dim)
        if quantize:  # q8: the fused weight and its per-row scales (`in_proj_weight_scb` on disk)
            self.register_buffer("in_proj_weight", torch.empty(rows, dim, dtype=torch.int8))
            self.register_buffer("in_proj_weight_scb", torch.empty(rows))
        else:
            self.in_proj_weight = nn.Parameter(torch.empty(rows, dim))
            self.register_buffer("in_proj_weight_scb", None)
        self.out_proj = linear(dim, steps * dim, quantize)

    def _qkv(self, x: torch.Tensor, step: int):
        """q [N, heads, head_dim], k and v [N, kv_heads, head_dim] of weight set `step`."""
        N, d = x.shape
        rows = d + 2 * self.kv_dim
        qkv = project(x, self.in_proj_weight, self.in_proj_weight_scb,
                      slice(step * rows, (step + 1) * rows))
        head_dim = d // self.heads
        q = qkv[:, :d].view(N, self.heads, head_dim)
        k = qkv[:, d:d + self.kv_dim].view(N, self.kv_heads, head_dim)
        v = qkv[:, d + self.kv_dim:].view(N, self.kv_heads, head_dim)
        return q, k, v

    def forward(self, x: torch.Tensor, cache: KVCache, positions: torch.Tensor,
                exec_mask: torch.Tensor, max_period: float | None, step: int = 0) -> torch.Tensor:
        B, d = x.shape
        q, k, v = self._qkv(x, step)
        out = decode_attention(q, k, v, cache.k, cache.v, positions, exec_mask, max_period,
                               self.interleaved)
        return project(out.reshape(B, d), self.out_proj.weight,
                       getattr(self.out_proj, "weight_scb", None), slice(step * d, (step + 1) * d))

    def prefill(self, x: torch.Tensor, cache: KVCache, row: int, max_period: float) -> torch.Tensor:
        """Positions 0..T-1 of `row` at once (x [T, dim]): their K/V go into the row's ring."""
        T, d = x.shape
        q, k, v = self._qkv(x, 0)
        out = prefill_attention_ref(q, k, v, cache.k[row], cache.v[row], max_period,
                                    self.interleaved)
        return project(out.reshape(T, d), self.out_proj.weight,
                       getattr(self.out_proj, "weight_scb", None), slice(0, d))


class TemporalLayer(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg.dim, cfg.num_heads, cfg.num_kv_heads, quantize=cfg.quantize,
                                   interleaved=cfg.rope_interleaved)
        self.norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.gating = GatedFFN(cfg.dim, cfg.ffn_hidden, cfg.quantize)

    def forward(self, x, pending, cache, positions, exec_mask, max_period):
        """The layer's input is x + pending; returns (x, pending) likewise: each residual add is
        done by the norm that follows it, in the same kernel."""
        x, h = self.norm1(x, add=pending)
        attn = self.self_attn(h, cache, positions, exec_mask, max_period)
        x, h = self.norm2(x, add=attn)
        return x, self.gating(h)

    def prefill(self, x, pending, cache, row: int, max_period):
        """`forward` for positions 0..T-1 of one row at once (x, pending [T, dim])."""
        x, h = self.norm1(x, add=pending)
        attn = self.self_attn.prefill(h, cache, row, max_period)
        x, h = self.norm2(x, add=attn)
        return x, self.gating(h)


class DepformerLayer(nn.Module):
    """Depth-transformer layer: norms shared, attention and FFN weights chosen per step (steps
    may share a weight set: `LMConfig.depformer_weights_per_step_schedule`)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.depformer_dim, cfg.norm_eps)
        self.self_attn = Attention(cfg.depformer_dim, cfg.depformer_num_heads,
                                   cfg.depformer_num_kv_heads, steps=cfg.depformer_weight_sets,
                                   quantize=cfg.quantize)
        self.norm2 = RMSNorm(cfg.depformer_dim, cfg.norm_eps)
        self.gating = nn.ModuleList(GatedFFN(cfg.depformer_dim, cfg.depformer_ffn_hidden,
                                             cfg.quantize) for _ in range(cfg.depformer_weight_sets))

    def forward(self, x, pending, cache, positions, exec_mask, weights: int):
        """Input x + pending, output (x, pending), as in TemporalLayer, with weight set
        `weights`. No positional embedding: order comes from causality and the per-step weights."""
        x, h = self.norm1(x, add=pending)
        attn = self.self_attn(h, cache, positions, exec_mask, None, weights)
        x, h = self.norm2(x, add=attn)
        return x, self.gating[weights](h)


class Transformer(nn.Module):
    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class MoshiLM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.ModuleList(nn.Embedding(cfg.card + 1, cfg.dim) for _ in range(cfg.n_q))
        self.text_emb = nn.Embedding(cfg.text_card + 1, cfg.dim)
        self.transformer = Transformer([TemporalLayer(cfg) for _ in range(cfg.num_layers)])
        self.out_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.text_linear = linear(cfg.dim, cfg.text_card, cfg.quantize)
        self.depformer_in = nn.ModuleList(linear(cfg.dim, cfg.depformer_dim, cfg.quantize)
                                          for _ in range(cfg.depformer_weight_sets))
        self.depformer_norms = None
        if cfg.dep_q > 0:
            self.depformer_text_emb = nn.Embedding(cfg.text_card + 1, cfg.depformer_dim)
            self.depformer_emb = nn.ModuleList(nn.Embedding(cfg.card + 1, cfg.depformer_dim)
                                               for _ in range(cfg.dep_q - 1))
            self.depformer = Transformer([DepformerLayer(cfg)
                                          for _ in range(cfg.depformer_num_layers)])
            if cfg.depformer_norm == "layer_norm":  # one per codebook, before its head
                self.depformer_norms = nn.ModuleList(nn.LayerNorm(cfg.depformer_dim, eps=1e-5)
                                                     for _ in range(cfg.dep_q))
        else:  # a listener (Kyutai's STT): text out only, no audio generated
            self.depformer_text_emb = self.depformer_emb = self.depformer = None
        self.linears = nn.ModuleList(linear(cfg.depformer_dim, cfg.card, cfg.quantize)
                                     for _ in range(cfg.dep_q))
        # Softmaxed by LMGen: Kyutai STT's pause prediction (see agent/transcriber.py).
        self.extra_heads = nn.ModuleList(nn.Linear(cfg.dim, cfg.extra_heads_dim, bias=False)
                                         for _ in range(cfg.extra_heads_num_heads))
        self.caches: nn.ModuleList | None = None
        self.dep_caches: nn.ModuleList | None = None
        self.dep_positions: torch.Tensor | None = None

    # -- state -----------------------------------------------------------------------------------
    def setup_caches(self, batch: int, kv_dtype: torch.dtype | None = None) -> None:
        """Allocate the static KV caches for `batch` rows (slots). The temporal caches are in
        `kv_dtype` (default: the weights' dtype; float8_e4m3fn halves them); the depformer's
        dep_q-step caches always in the weights' dtype."""
        cfg, p = self.cfg, self.out_norm.alpha  # the compute dtype, also with int8 weights
        self.caches = nn.ModuleList(
            KVCache(batch, cfg.num_kv_heads, cfg.context, cfg.head_dim, kv_dtype or p.dtype,
                    p.device)
            for _ in range(cfg.num_layers))
        self.dep_caches = nn.ModuleList(
            KVCache(batch, cfg.depformer_num_kv_heads, cfg.dep_q,
                    cfg.depformer_dim // cfg.depformer_num_heads, p.dtype, p.device)
            for _ in range(cfg.depformer_num_layers if cfg.dep_q else 0))
        # Depformer sub-step k sits at position k of its dep_q-slot cache, for every row.
        self.dep_positions = torch.arange(cfg.dep_q, device=p.device).view(-1, 1).repeat(1, batch)

    # -- one step --------------------------------------------------------------------------------
    def forward_temporal(self, tokens: torch.Tensor, positions: torch.Tensor,
                         exec_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, 1 + n_q] (text, dep_q agent codes, the user's codes) at `positions` [B].
        Returns the normalised hidden state [B, dim] and text logits [B, text_card]."""
        assert self.caches is not None, "call setup_caches() first"
        # Embeddings summed stream by stream (id -1: no input, a zero vector), text last.
        x = None
        for i, table in enumerate(self.emb):
            x = embed_add(table.weight, tokens[:, 1 + i], x)
        pending = embed_add(self.text_emb.weight, tokens[:, 0])  # added by the first norm
        for layer, cache in zip(self.transformer.layers, self.caches):
            x, pending = layer(x, pending, cache, positions, exec_mask, self.cfg.max_period)
        _, h = self.out_norm(x, add=pending)
        return h, self.text_linear(h)

    # -- a prompt, all positions at once ------------------------------------------------------
    def embed_columns(self, tokens: torch.Tensor) -> torch.Tensor:
        """Input embeddings [T, dim] of T token columns [T, 17], summed as `forward_temporal`
        sums them (audio streams in order, text last)."""
        x = None
        for i, table in enumerate(self.emb):
            x = embed_add(table.weight, tokens[:, 1 + i], x)
        return embed_add(self.text_emb.weight, tokens[:, 0], x)

    def forward_prefill(self, x: torch.Tensor, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions 0..T-1 of `row` as one causal pass: x [T, dim] are their input embeddings
        (T <= context). Their K/V are written into the row's ring, as T steps would write them;
        no other row is touched. Returns the last position's normalised hidden state [1, dim]
        and text logits [1, text_card]. The depformer is not run: a prompt's tokens are forced."""
        assert self.caches is not None, "call setup_caches() first"
        pending = torch.zeros_like(x)
        for layer, cache in zip(self.transformer.layers, self.caches):
            x, pending = layer.prefill(x, pending, cache, row, self.cfg.max_period)
        _, h = self.out_norm(x[-1:], add=pending[-1:])
        return h, self.text_linear(h)

    def prompt_kv(self, row: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Host copies of the K and V of positions 0..length-1 of `row`, [layers, H, length, D]
        each, layer by layer (no device memory needed); pinned from a GPU, so that restoring them
        (`load_prompt_kv`) is one asynchronous copy."""
        assert self.caches is not None
        ring = self.caches[0].k
        pinned = ring.device.type == "cuda"
        shape = (len(self.caches), ring.shape[1], length, ring.shape[3])
        k, v = (torch.empty(shape, dtype=ring.dtype, pin_memory=pinned) for _ in range(2))
        for i, c in enumerate(self.caches):
            k[i].copy_(c.k[row, :, :length], non_blocking=pinned)
            v[i].copy_(c.v[row, :, :length], non_blocking=pinned)
        return k, v

    def load_prompt_kv(self, row: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write K/V saved by `prompt_kv` back as positions 0..length-1 of `row`, in place."""
        assert self.caches is not None
        length = k.shape[2]
        for i, c in enumerate(self.caches):
            c.k[row, :, :length].copy_(k[i], non_blocking=k.is_pinned())
            c.v[row, :, :length].copy_(v[i], non_blocking=v.is_pinned())

    def forward_depformer(self, step: int, h: torch.Tensor, prev_token: torch.Tensor,
                          exec_mask: torch.Tensor) -> torch.Tensor:
        """Sub-step `step` (0..dep_q-1) of the depth transformer. `prev_token` is the text token
        at step 0, else the audio token of codebook step-1. Returns logits [B, card]."""
        assert self.dep_caches is not None
        weights = self.cfg.depformer_weight_set(step)
        x = self.depformer_in[weights](h)
        table = self.depformer_text_emb if step == 0 else self.depformer_emb[step - 1]
        pending = embed_add(table.weight, prev_token)  # added by the first norm
        positions = self.dep_positions[step]
        for layer, cache in zip(self.depformer.layers, self.dep_caches):
            x, pending = layer(x, pending, cache, positions, exec_mask, weights)
        x = x + pending
        if self.depformer_norms is not None:
            x = self.depformer_norms[step](x)
        return self.linears[step](x)
