"""Token sampling for B rows at once, each with its own temperature, top-k and seed.

All rows are sampled by the same few operations: no host loop, no device sync, fixed shapes, so
the whole step can be captured in a CUDA graph. Randomness is counter-based: the noise for
candidate token i of row b is a hash of (row seed, row step, stream, i), so a conversation's draws
depend only on its own seed and its own step count, never on which other conversations share the
batch or how many ticks they skipped.

The distribution is the reference's: softmax(logits / temp) restricted to the top-k tokens
(k = 0 means all), drawn with the Gumbel-max trick, argmax(logits / temp + Gumbel noise) over
the candidates, which picks token i with exactly its renormalised top-k probability. Rows with
temperature 0 or greedy mode take argmax(logits). The draw itself is one fused kernel
(kernels/sampling.py).
"""
from __future__ import annotations

import torch

from kernels.sampling import MASK32, gumbel_argmax, mix32


class BatchSampler:
    """Per-row sampling settings for B rows; `sample` draws one token per row for one stream."""

    def __init__(self, batch: int, device):
        self.temp = torch.ones(batch, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(batch, dtype=torch.long, device=device)
        self.greedy = torch.ones(batch, dtype=torch.bool, device=device)
        self.seed_key = torch.zeros(batch, dtype=torch.long, device=device)

    def configure(self, row: int, seed: int, temp: float, top_k: int, greedy: bool) -> None:
        greedy = greedy or temp <= 0.0
        self.temp[row] = 1.0 if greedy else temp
        self.top_k[row] = 0 if greedy else top_k
        self.greedy[row] = greedy
        # Fold the (up to 64-bit) seed into one 32-bit key.
        self.seed_key[row] = int(mix32(torch.tensor((seed >> 32) & MASK32)) ^ (seed & MASK32))

    def sample(self, logits: torch.Tensor, counter: torch.Tensor, stream: int) -> torch.Tensor:
        """logits [B, V] -> tokens [B]. `counter` [B] is each row's step number and `stream`
        tells apart the draws of one step (text, then each audio codebook)."""
        V = logits.shape[-1]
        scaled = logits.float() / self.temp.view(-1, 1)
        # Top-k as a threshold: the k-th largest scaled logit of each row (k = 0 or >= V: all).
        k = torch.where((self.top_k > 0) & (self.top_k < V), self.top_k, V)
        kth = scaled.sort(dim=-1, descending=True).values.gather(1, (k - 1).view(-1, 1)).view(-1)
        row_keys = mix32(mix32(self.seed_key ^ (counter & MASK32)) ^ stream)
        return gumbel_argmax(scaled, kth, row_keys, self.greedy)
