"""The LM step on CUDA: captured as one graph, it equals the eager step token for token, and the
eager step never synchronises with the host (the precondition for capturing it). GPU only."""
from __future__ import annotations

import copy
import random

import pytest
import torch

from duplex_agent.agent.config import LMConfig, SamplingConfig
from duplex_agent.agent.lm_gen import LMGen
from duplex_agent.checkpoints.loader import load_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SLOTS = 6


@pytest.fixture(scope="module")
def model():
    return load_checkpoint("tiny-random", device="cuda").model


def scripted_run(gen: LMGen, cfg: LMConfig, steps: int, seed: int) -> list[torch.Tensor]:
    """Rows open, skip and reopen at random (the same script for every `gen` given `seed`)."""
    rng = random.Random(seed)
    codes = torch.Generator().manual_seed(seed)
    outs = []
    for t in range(steps):
        for row in range(SLOTS):
            if t == 0 or rng.random() < 0.05:
                gen.reset(row, SamplingConfig(seed=rng.randrange(1 << 40), greedy=row % 3 == 0))
        exec_mask = torch.tensor([rng.random() < 0.8 for _ in range(SLOTS)]).cuda()
        user = torch.randint(0, cfg.card, (SLOTS, cfg.num_user_codebooks), generator=codes).cuda()
        outs.append(gen.step(user, exec_mask).tokens.cpu())
    return outs


def test_graph_replay_equals_eager_step(model):
    cfg = model.cfg
    graphed = LMGen(copy.deepcopy(model), SLOTS, cuda_graph=True)
    eager = LMGen(copy.deepcopy(model), SLOTS, cuda_graph=False)
    a = scripted_run(graphed, cfg, 3 * cfg.context, seed=1)  # the ring KV cache wraps
    b = scripted_run(eager, cfg, 3 * cfg.context, seed=1)
    assert graphed._graph is not None and eager._graph is None
    for t, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"step {t}"
    assert len(torch.stack(a)[:, :, 0].unique()) > 5, "a degenerate run would prove nothing"


def test_step_never_synchronises_with_the_host(model):
    gen = LMGen(copy.deepcopy(model), SLOTS, cuda_graph=False)
    for row in range(SLOTS):
        gen.reset(row, SamplingConfig(seed=row))
    gen._exec_mask.fill_(True)
    gen._step()  # first call builds cached tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            gen._step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_engine_isolation_on_cuda():
    """The engine on the GPU (CUDA graphs, Triton kernels, Mimi on CUDA): a seeded conversation's
    tokens and audio are bit-identical alone or among others that join, leave and skip."""
    import numpy as np

    from duplex_agent.agent.config import FRAME_SIZE
    from duplex_agent.agent.engine import Engine
    from duplex_agent.checkpoints.tiny_random import synthetic_audio

    def frames(seed, n):
        pcm = synthetic_audio(n * FRAME_SIZE, seed=seed).numpy().reshape(-1)
        return [pcm[i * FRAME_SIZE:(i + 1) * FRAME_SIZE] for i in range(n)]

    def engine():
        return Engine(load_checkpoint("tiny-random", device="cuda"), 4)

    mine, sampling = frames(101, 30), SamplingConfig(seed=1234)
    alone_engine = engine()
    row = alone_engine.open(sampling)
    alone = [alone_engine.tick({row: f})[row] for f in mine]
    assert alone_engine.lm._graph is not None
    busy, rng, outs, i = engine(), random.Random(3), [], 0
    me, others = busy.open(sampling), {}
    while i < len(mine):
        if len(others) < 3 and rng.random() < 0.3:
            others[busy.open(SamplingConfig(seed=rng.randrange(1 << 30)))] = frames(
                rng.randrange(1000, 2000), 40)
        for r in [r for r in others if rng.random() < 0.1]:
            busy.close(r)
            del others[r]
        batch = {r: f.pop() for r, f in others.items() if f and rng.random() < 0.7}
        if rng.random() < 0.8:
            batch[me] = mine[i]
        if batch:
            res = busy.tick(batch)
            if me in batch:
                outs.append(res[me])
                i += 1
    for a, b in zip(alone, outs):
        assert a.text_id == b.text_id and np.array_equal(a.pcm, b.pcm), f"step {a.step}"


def test_agent_load_captures_the_graph_before_any_conversation():
    """The warm-up in Agent.load: the first conversation does not wait for Triton compiles and
    graph capture."""
    from duplex_agent.agent.api import Agent
    agent = Agent.load("tiny-random", device="cuda", max_conversations=2)
    try:
        assert agent.engine.lm._graph is not None and agent._driver.ticks == 0
    finally:
        agent.close()
