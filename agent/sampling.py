"""Token sampling with per-row settings and per-row random streams.

Each row (conversation) has its own temperature, top-k and torch.Generator, so a conversation's
tokens do not depend on which other conversations share the batch. The arithmetic is the
reference's: softmax(logits / temp) in fp32, top-k, then the sync-free multinomial
argmax(p / Exponential(1)); temperature 0 or greedy mode is argmax of the logits.
"""
from __future__ import annotations

import torch


class RowSampler:
    """Sampling settings for B rows of one kind of token (text or audio)."""

    def __init__(self, batch: int, device):
        self.temp = torch.zeros(batch, dtype=torch.float32, device=device)
        self.top_k = [0] * batch
        self.greedy = [True] * batch

    def configure(self, row: int, temp: float, top_k: int, greedy: bool) -> None:
        self.temp[row] = temp
        self.top_k[row] = top_k
        self.greedy[row] = greedy or temp <= 0.0

    def sample(self, logits: torch.Tensor, generators: list[torch.Generator],
               rows: list[int]) -> torch.Tensor:
        """logits [B, V] -> tokens [B]. Only `rows` draw random numbers (others get argmax)."""
        logits = logits.float()
        tokens = logits.argmax(dim=-1)
        sampled = [b for b in rows if not self.greedy[b]]
        if not sampled:
            return tokens
        V = logits.shape[-1]
        ks = {b: min(self.top_k[b], V) if self.top_k[b] > 0 else V for b in sampled}
        idx = torch.tensor(sampled, device=logits.device)
        probs = torch.softmax(logits[idx] / self.temp[idx, None], dim=-1)
        top_p, top_i = torch.topk(probs, max(ks.values()), dim=-1)
        for j, b in enumerate(sampled):
            k = ks[b]
            noise = torch.empty((1, k), device=logits.device).exponential_(1, generator=generators[b])
            choice = (top_p[j:j + 1, :k] / noise).argmax(dim=-1)
            tokens[b] = top_i[j, choice[0]]
        return tokens
