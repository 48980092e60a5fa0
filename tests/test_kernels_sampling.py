"""The fused sampling draw (kernels/sampling.py) against its torch reference, on fresh random
inputs every run (seed in the messages). Triton interpreter on CPU, compiled on a GPU."""
from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from duplex_agent.kernels.sampling import (gumbel_noise, row_keys, sample_ref,  # noqa: E402
                                           sample_triton)
from duplex_agent.kernels.selfcheck import SAMPLING_TIE, sampling_inputs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and the Triton interpreter is not enabled", allow_module_level=True)


def case(B, V, seed):
    """The self-check's inputs: every third row samples the whole vocabulary, counters pass
    2**32."""
    *inputs, greedy = sampling_inputs(B, V, torch.Generator().manual_seed(seed), DEVICE)
    return inputs, greedy


@pytest.mark.parametrize("B,V", [(1, 5), (3, 128), (7, 2048), (4, 5000)])
@pytest.mark.parametrize("stream", [0, 1, 7])
def test_matches_reference(B, V, stream):
    seed = int.from_bytes(os.urandom(4), "little")
    (logits, temp, kth, seed_key, counter), greedy = case(B, V, seed)
    args = (logits, temp, kth, seed_key, counter, stream, greedy)
    want, got = sample_ref(*args), sample_triton(*args)
    ctx = f"seed={seed} B={B} V={V} stream={stream}"
    assert got.shape == (B,) and got.dtype == torch.long, ctx
    assert bool(((got >= 0) & (got < V)).all()), ctx
    scaled = logits / temp.view(-1, 1)
    assert bool((scaled.gather(1, got.view(-1, 1)).view(-1) >= kth / temp).all()), f"outside top-k: {ctx}"
    # log() may differ by an ulp between Triton and torch: then only a near-tie can flip.
    noise = torch.where(greedy.view(-1, 1), 0.0, gumbel_noise(row_keys(seed_key, counter, stream), V))
    score = scaled + noise
    for b in torch.nonzero(got != want).view(-1).tolist():
        a, w = score[b, got[b]].item(), score[b, want[b]].item()
        assert abs(a - w) <= SAMPLING_TIE * max(1.0, abs(w)), \
            f"row {b}: {got[b]} vs {want[b]}, {ctx}"
    assert int((got != want).sum()) <= 1, ctx


def test_greedy_ties_take_the_first_index_across_blocks():
    V = 9000  # three blocks of 4096
    logits = torch.zeros(2, V)
    logits[0, [17, 5000, 8999]] = 4.0
    logits[1, [6000, 8000]] = 2.5
    args = [t.to(DEVICE) for t in (logits, torch.ones(2), torch.full((2,), float("-inf")),
                                   torch.tensor([1, 2]), torch.tensor([0, 0]))]
    greedy = torch.tensor([True, True], device=DEVICE)
    assert sample_triton(*args, 0, greedy).tolist() == [17, 6000]
    assert sample_ref(*args, 0, greedy).tolist() == [17, 6000]
