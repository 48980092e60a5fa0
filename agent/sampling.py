"""Token sampling for B rows at once, each with its own temperature, top-k and seed.

All rows are sampled by the same few operations: no host loop, no device sync, fixed shapes, so
the whole step can be captured in a CUDA graph. Randomness is counter-based: the noise for
candidate token i of row b is a hash of (row seed, row step, stream, i), so a conversation's draws
depend only on its own seed and its own step count, never on which other conversations share the
batch or how many ticks they skipped.

The distribution is the reference's: softmax(logits / temp) restricted to the top-k tokens
(k = 0 means all), drawn with the Gumbel-max trick, argmax(logits / temp + Gumbel noise) over
the candidates, which picks token i with exactly its renormalised top-k probability. Rows with
temperature 0 or greedy mode take argmax(logits). Per draw: one sort for the top-k thresholds,
then one fused kernel (kernels/sampling.py).
"""
from __future__ import annotations

import torch

from duplex_agent.kernels.sampling import MASK32, mix32, sample


class BatchSampler:
    """Per-row sampling settings for B rows over a vocabulary of V tokens."""

    def __init__(self, batch: int, vocab: int, device):
        self.vocab = vocab
        self.temp = torch.ones(batch, dtype=torch.float32, device=device)
        self.kth_index = torch.full((batch, 1), vocab - 1, dtype=torch.long, device=device)
        self.greedy = torch.ones(batch, dtype=torch.bool, device=device)
        self.seed_key = torch.zeros(batch, dtype=torch.long, device=device)

    def configure(self, row: int, seed: int, temp: float, top_k: int, greedy: bool) -> None:
        greedy = greedy or temp <= 0.0
        self.temp[row] = 1.0 if greedy else temp
        # Position of the row's top-k threshold among its sorted logits (k = 0 or >= V: all).
        k = top_k if 0 < top_k < self.vocab and not greedy else self.vocab
        self.kth_index[row] = k - 1
        self.greedy[row] = greedy
        # Fold the (up to 64-bit) seed into one 32-bit key.
        self.seed_key[row] = int(mix32(torch.tensor((seed >> 32) & MASK32)) ^ (seed & MASK32))

    def sample(self, logits: torch.Tensor, counter: torch.Tensor, stream: int) -> torch.Tensor:
        """logits [B, V] -> tokens [B]. `counter` [B] is each row's step number and `stream`
        tells apart the draws of one step (text, then each audio codebook)."""
        logits = logits.float().contiguous()
        kth_logit = logits.sort(dim=-1, descending=True).values.gather(1, self.kth_index).view(-1)
        return sample(logits, self.temp, kth_logit, self.seed_key, counter, stream, self.greedy)
