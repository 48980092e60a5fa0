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
from duplex_agent.kernels.decode_attention import decode_attention
from duplex_agent.kernels.embedding import embed_add
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


class GatedFFN(nn.Module):
    """SiLU-gated FFN: the first `hidden` rows of linear_in are the gate, the rest the up side."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.linear_out = nn.Linear(hidden, dim, bias=False)

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
    """Multi-head self-attention with fused [q; k; v] projection; `steps` > 1 stacks one weight set
    per depformer step along dim 0, exactly as on disk."""

    def __init__(self, dim: int, heads: int, steps: int = 1):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(steps * 3 * dim, dim))
        self.out_proj = nn.Linear(dim, steps * dim, bias=False)

    def forward(self, x: torch.Tensor, cache: KVCache, positions: torch.Tensor,
                exec_mask: torch.Tensor, max_period: float | None, step: int = 0) -> torch.Tensor:
        B, d = x.shape
        w_in = self.in_proj_weight[step * 3 * d:(step + 1) * 3 * d]
        w_out = self.out_proj.weight[step * d:(step + 1) * d]
        q, k, v = F.linear(x, w_in).view(B, 3, self.heads, d // self.heads).unbind(1)
        out = decode_attention(q, k, v, cache.k, cache.v, positions, exec_mask, max_period)
        return F.linear(out.reshape(B, d), w_out)


class TemporalLayer(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg.dim, cfg.num_heads)
        self.norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.gating = GatedFFN(cfg.dim, cfg.ffn_hidden)

    def forward(self, x, pending, cache, positions, exec_mask, max_period):
        """The layer's input is x + pending; returns (x, pending) likewise: each residual add is
        done by the norm that follows it, in the same kernel."""
        x, h = self.norm1(x, add=pending)
        attn = self.self_attn(h, cache, positions, exec_mask, max_period)
        x, h = self.norm2(x, add=attn)
        return x, self.gating(h)


class DepformerLayer(nn.Module):
    """Depth-transformer layer: norms shared, attention and FFN weights chosen per step."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.depformer_dim, cfg.norm_eps)
        self.self_attn = Attention(cfg.depformer_dim, cfg.depformer_num_heads, steps=cfg.dep_q)
        self.norm2 = RMSNorm(cfg.depformer_dim, cfg.norm_eps)
        self.gating = nn.ModuleList(GatedFFN(cfg.depformer_dim, cfg.depformer_ffn_hidden)
                                    for _ in range(cfg.dep_q))

    def forward(self, x, pending, cache, positions, exec_mask, step: int):
        """Input x + pending, output (x, pending), as in TemporalLayer. No positional embedding:
        order comes from causality and the per-step weights."""
        x, h = self.norm1(x, add=pending)
        attn = self.self_attn(h, cache, positions, exec_mask, None, step)
        x, h = self.norm2(x, add=attn)
        return x, self.gating[step](h)


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
        self.text_linear = nn.Linear(cfg.dim, cfg.text_card, bias=False)
        self.depformer_in = nn.ModuleList(nn.Linear(cfg.dim, cfg.depformer_dim, bias=False)
                                          for _ in range(cfg.dep_q))
        self.depformer_text_emb = nn.Embedding(cfg.text_card + 1, cfg.depformer_dim)
        self.depformer_emb = nn.ModuleList(nn.Embedding(cfg.card + 1, cfg.depformer_dim)
                                           for _ in range(cfg.dep_q - 1))
        self.depformer = Transformer([DepformerLayer(cfg) for _ in range(cfg.depformer_num_layers)])
        self.linears = nn.ModuleList(nn.Linear(cfg.depformer_dim, cfg.card, bias=False)
                                     for _ in range(cfg.dep_q))
        self.caches: nn.ModuleList | None = None
        self.dep_caches: nn.ModuleList | None = None
        self.dep_positions: torch.Tensor | None = None

    # -- state -----------------------------------------------------------------------------------
    def setup_caches(self, batch: int, kv_dtype: torch.dtype | None = None) -> None:
        """Allocate the static KV caches for `batch` rows (slots). The temporal caches are in
        `kv_dtype` (default: the weights' dtype; float8_e4m3fn halves them); the depformer's
        8-step caches always in the weights' dtype."""
        cfg, p = self.cfg, self.text_linear.weight
        self.caches = nn.ModuleList(
            KVCache(batch, cfg.num_heads, cfg.context, cfg.head_dim, kv_dtype or p.dtype, p.device)
            for _ in range(cfg.num_layers))
        self.dep_caches = nn.ModuleList(
            KVCache(batch, cfg.depformer_num_heads, cfg.dep_q,
                    cfg.depformer_dim // cfg.depformer_num_heads, p.dtype, p.device)
            for _ in range(cfg.depformer_num_layers))
        # Depformer sub-step k sits at position k of its 8-slot cache, for every row.
        self.dep_positions = torch.arange(cfg.dep_q, device=p.device).view(-1, 1).repeat(1, batch)

    # -- one step --------------------------------------------------------------------------------
    def forward_temporal(self, tokens: torch.Tensor, positions: torch.Tensor,
                         exec_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, 17] (text, 8 agent codes, 8 user codes) at `positions` [B].
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

    def forward_depformer(self, step: int, h: torch.Tensor, prev_token: torch.Tensor,
                          exec_mask: torch.Tensor) -> torch.Tensor:
        """Sub-step `step` (0..dep_q-1) of the depth transformer. `prev_token` is the text token
        at step 0, else the audio token of codebook step-1. Returns logits [B, card]."""
        assert self.dep_caches is not None
        x = self.depformer_in[step](h)
        table = self.depformer_text_emb if step == 0 else self.depformer_emb[step - 1]
        pending = embed_add(table.weight, prev_token)  # added by the first norm
        positions = self.dep_positions[step]
        for layer, cache in zip(self.depformer.layers, self.dep_caches):
            x, pending = layer(x, pending, cache, positions, exec_mask, step)
        return self.linears[step](x + pending)
