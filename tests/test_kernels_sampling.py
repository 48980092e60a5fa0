"""The fused Gumbel-max draw (kernels/sampling.py) against its torch reference, on fresh random
inputs every run (seed in the messages). Triton interpreter on CPU, compiled on a GPU."""
from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from kernels.sampling import gumbel_argmax_ref, gumbel_argmax_triton, mix32  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and the Triton interpreter is not enabled", allow_module_level=True)


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def case(B, V, seed):
    g = torch.Generator().manual_seed(seed)
    scaled = torch.randn(B, V, generator=g) * 3
    k = torch.randint(1, V + 1, (B,), generator=g)
    kth = scaled.sort(dim=-1, descending=True).values.gather(1, (k - 1).view(-1, 1)).view(-1)
    kth[::3] = float("-inf")  # every third row: the whole vocabulary
    greedy = torch.rand(B, generator=g) < 0.3
    keys = mix32(torch.randint(0, 1 << 31, (B,), generator=g))
    return [t.to(DEVICE) for t in (scaled, kth, keys, greedy)]


@pytest.mark.parametrize("B,V", [(1, 5), (3, 128), (7, 2048), (4, 5000)])
def test_matches_reference(B, V):
    seed = fresh_seed()
    scaled, kth, keys, greedy = case(B, V, seed)
    want = gumbel_argmax_ref(scaled, kth, keys, greedy)
    got = gumbel_argmax_triton(scaled, kth, keys, greedy)
    assert got.shape == (B,) and got.dtype == torch.long
    assert bool(((got >= 0) & (got < V)).all()), f"seed={seed}"
    assert bool((scaled.gather(1, got.view(-1, 1)).view(-1) >= kth).all()), f"outside top-k, seed={seed}"
    # log() may differ by an ulp between Triton and torch: then only a near-tie can flip.
    from kernels.sampling import gumbel_noise
    noise = torch.where(greedy.view(-1, 1), 0.0, gumbel_noise(keys, V))
    score = scaled + noise
    for b in torch.nonzero(got != want).view(-1).tolist():
        a, w = score[b, got[b]].item(), score[b, want[b]].item()
        assert abs(a - w) <= 1e-5 * max(1.0, abs(w)), f"row {b}: {got[b]} vs {want[b]}, seed={seed}"
    assert int((got != want).sum()) <= 1, f"seed={seed}"


def test_greedy_ties_take_the_first_index_across_blocks():
    V = 9000  # three blocks of 4096
    scaled = torch.zeros(2, V)
    scaled[0, [17, 5000, 8999]] = 4.0
    scaled[1, [6000, 8000]] = 2.5
    kth = torch.full((2,), float("-inf"))
    keys = torch.tensor([1, 2])
    greedy = torch.tensor([True, True])
    args = [t.to(DEVICE) for t in (scaled, kth, keys, greedy)]
    assert gumbel_argmax_triton(*args).tolist() == [17, 6000]
    assert gumbel_argmax_ref(*args).tolist() == [17, 6000]
