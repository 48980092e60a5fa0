"""Token sampling for B rows at once, each with its own temperature, top-k and seed.

All rows are sampled by the same few tensor operations: no host loop, no device sync, fixed
shapes, so the whole step can be captured in a CUDA graph. Randomness is counter-based: the noise
for candidate token i of row b is a hash of (row seed, row step, stream, i), so a conversation's
draws depend only on its own seed and its own step count, never on which other conversations
share the batch or how many ticks they skipped.

The distribution is the reference's: softmax(logits / temp) restricted to the top-k tokens
(k = 0 means all), drawn with the Gumbel-max trick, argmax(logits / temp + Gumbel noise) over
the candidates, which picks token i with exactly its renormalised top-k probability. Rows with
temperature 0 or greedy mode take argmax(logits).
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2**32 for x in [0, 2**32) held in int64, without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash with full avalanche (Wellons' "lowbias32")."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(row_keys: torch.Tensor, index_keys: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise [B, V] from per-row keys [B] and per-candidate keys [V] (int64
    holding 32-bit values). Uniforms have 24 bits and never reach 0 or 1."""
    h = mix32(mix32(row_keys.view(-1, 1) ^ index_keys.view(1, -1)) ^ row_keys.view(-1, 1))
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    return -torch.log(-torch.log(u))


class BatchSampler:
    """Per-row sampling settings for B rows; `sample` draws one token per row for one stream."""

    def __init__(self, batch: int, device):
        self.temp = torch.ones(batch, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(batch, dtype=torch.long, device=device)
        self.greedy = torch.ones(batch, dtype=torch.bool, device=device)
        self.seed_key = torch.zeros(batch, dtype=torch.long, device=device)
        self._index_keys: dict[int, torch.Tensor] = {}

    def configure(self, row: int, seed: int, temps: float, top_k: int, greedy: bool) -> None:
        greedy = greedy or temps <= 0.0
        self.temp[row] = 1.0 if greedy else temps
        self.top_k[row] = top_k
        self.greedy[row] = greedy
        # Fold the (up to 64-bit) seed into one 32-bit key.
        self.seed_key[row] = int(mix32(torch.tensor((seed >> 32) & MASK32)) ^ (seed & MASK32))

    def sample(self, logits: torch.Tensor, counter: torch.Tensor, stream: int) -> torch.Tensor:
        """logits [B, V] -> tokens [B]. `counter` [B] is each row's step number and `stream`
        tells apart the draws of one step (text, then each audio codebook)."""
        B, V = logits.shape
        logits = logits.float()
        greedy_tokens = logits.argmax(dim=-1)
        scaled = logits / self.temp.view(-1, 1)
        # Top-k as a threshold: the k-th largest scaled logit of each row (k = 0 or > V: all).
        k = torch.where((self.top_k > 0) & (self.top_k < V), self.top_k, V)
        kth = scaled.sort(dim=-1, descending=True).values.gather(1, (k - 1).view(-1, 1))
        row_keys = mix32(mix32(self.seed_key ^ (counter & MASK32)) ^ stream)
        race = torch.where(scaled >= kth, scaled + gumbel_noise(row_keys, self._keys(V, logits.device)),
                           float("-inf"))
        return torch.where(self.greedy, greedy_tokens, race.argmax(dim=-1))

    def _keys(self, V: int, device) -> torch.Tensor:
        keys = self._index_keys.get(V)
        if keys is None:
            keys = self._index_keys[V] = mix32(torch.arange(V, dtype=torch.long, device=device))
        return keys
