"""The batched engine: conversations are isolated from each other and equal the reference run alone."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from duplex_agent.agent.config import FRAME_SIZE, LMConfig, SamplingConfig
from duplex_agent.agent.engine import Engine, EngineFull
from duplex_agent.checkpoints.loader import load_checkpoint
from duplex_agent.checkpoints.tiny_random import synthetic_audio

FRAMES = 30
SLOTS = 4


@pytest.fixture(scope="module")
def bundle():
    return load_checkpoint("tiny-random", device="cpu")


def fresh_engine(bundle, slots=SLOTS, kv_dtype=None, free_bytes=None):
    # The engine owns the Mimi streaming state, so each engine gets its own codec instance.
    from duplex_agent.checkpoints.tiny_random import build_tiny_mimi
    b = type(bundle)(**{**bundle.__dict__, "mimi": build_tiny_mimi()})
    return Engine(b, slots, kv_dtype=kv_dtype, free_bytes=free_bytes)


def speech_frames(seed, n=FRAMES):
    pcm = synthetic_audio(n * FRAME_SIZE, seed=seed).numpy().reshape(-1)
    return [pcm[i * FRAME_SIZE:(i + 1) * FRAME_SIZE] for i in range(n)]


def run_alone(bundle, frames, sampling, kv_dtype=None):
    engine = fresh_engine(bundle, kv_dtype=kv_dtype)
    row = engine.open(sampling)
    return [engine.tick({row: f})[row] for f in frames]


def assert_same(outs_a, outs_b):
    assert len(outs_a) == len(outs_b)
    for a, b in zip(outs_a, outs_b):
        assert a.step == b.step and a.text_id == b.text_id, f"step {a.step}"
        assert np.array_equal(a.pcm, b.pcm), f"audio differs at step {a.step}"


@pytest.mark.parametrize("sampling,kv_dtype", [
    (SamplingConfig(greedy=True), None), (SamplingConfig(seed=1234), None),
    (SamplingConfig(seed=1234), torch.float8_e4m3fn)], ids=["greedy", "seeded", "seeded-fp8-kv"])
def test_conversation_is_bit_identical_alone_or_in_a_changing_batch(bundle, sampling, kv_dtype):
    mine = speech_frames(seed=101)
    alone = run_alone(bundle, mine, sampling, kv_dtype)
    assert len({o.text_id for o in alone}) > 3, "a degenerate run would prove nothing"

    engine = fresh_engine(bundle, kv_dtype=kv_dtype)
    rng = random.Random(7)
    me = engine.open(sampling)
    others: dict[int, list] = {}
    outs, i, ticks = [], 0, 0
    while i < len(mine):
        # Others join, leave and skip ticks at random; so do we.
        if len(others) < SLOTS - 1 and rng.random() < 0.3:
            others[engine.open(SamplingConfig(seed=rng.randrange(1 << 30)))] = speech_frames(
                seed=rng.randrange(1000, 2000))
        for row in list(others):
            if rng.random() < 0.1:
                engine.close(row)
                del others[row]
        frames = {row: f.pop() for row, f in others.items() if f and rng.random() < 0.7}
        skip_me = rng.random() < 0.25
        if not skip_me:
            frames[me] = mine[i]
        if frames:
            res = engine.tick(frames)
            if not skip_me:
                outs.append(res[me])
                i += 1
        ticks += 1
    assert ticks > len(mine), "we skipped at least one tick"
    assert_same(alone, outs)


def test_reused_slot_carries_no_trace(bundle):
    sampling = SamplingConfig(greedy=True)
    mine = speech_frames(seed=202)
    alone = run_alone(bundle, mine, sampling)
    engine = fresh_engine(bundle)  # same batch shape as `alone`: results are then bit-exact
    previous = engine.open(SamplingConfig(seed=5))
    for f in speech_frames(seed=303, n=12):
        engine.tick({previous: f})
    engine.close(previous)
    row = engine.open(sampling)
    assert row == previous
    assert_same(alone, [engine.tick({row: f})[row] for f in mine])


def test_warm_up_leaves_every_conversation_as_it_was(bundle):
    """Agent.load warms the engine up (kernels, graphs) before the first conversation; the same
    idle tick in the middle of a live conversation must not change a token or a sample of it."""
    sampling = SamplingConfig(seed=77)
    mine = speech_frames(seed=404)
    alone = run_alone(bundle, mine, sampling)
    engine = fresh_engine(bundle)
    engine.warm_up()
    row = engine.open(sampling)
    outs = []
    for k, frame in enumerate(mine):
        if k % 7 == 3:
            engine.warm_up()
        outs.append(engine.tick({row: frame})[row])
    assert_same(alone, outs)


def test_full_engine_refuses(bundle):
    engine = fresh_engine(bundle, slots=2)
    engine.open()
    engine.open()
    with pytest.raises(EngineFull, match="2 conversation slots"):
        engine.open()


def test_equals_reference_library_one_conversation_at_a_time(bundle):
    """moshi's Mimi + LMGen on identical weights, one conversation at a time, vs our engine with
    several conversations in flight."""
    from moshi.models import loaders
    from moshi.models.lm import LMGen as RefLMGen

    from duplex_agent.checkpoints.tiny_random import build_tiny_lm_state, build_tiny_mimi

    cfg = LMConfig.tiny()
    ref_lm = loaders.get_moshi_lm(None, lm_kwargs=cfg.to_moshi_lm_kwargs(), dtype=torch.float32,
                                  device="cpu").eval()
    ref_lm.load_state_dict(build_tiny_lm_state(), strict=True)
    ref_mimi = build_tiny_mimi()
    inputs = [speech_frames(seed=s, n=20) for s in (11, 12, 13)]

    reference = []
    for frames in inputs:
        gen = RefLMGen(ref_lm, use_sampling=False)
        texts, audio = [], []
        with torch.no_grad(), ref_mimi.streaming(1), gen.streaming(1):
            for f in frames:
                codes = ref_mimi.encode(torch.from_numpy(f).view(1, 1, -1))
                out = gen.step(codes)
                if out is None:
                    texts.append(-2)
                    audio.append(np.zeros(FRAME_SIZE, np.float32))
                else:
                    texts.append(int(out[0, 0, 0]))
                    audio.append(ref_mimi.decode(out[:, 1:]).view(-1).numpy())
        reference.append((texts, np.concatenate(audio)))

    engine = fresh_engine(bundle, slots=3)
    rows = [engine.open(SamplingConfig(greedy=True)) for _ in inputs]
    got = {r: ([], []) for r in rows}
    for t in range(20):
        res = engine.tick({r: inputs[k][t] for k, r in enumerate(rows)})
        for r in rows:
            got[r][0].append(res[r].text_id)
            got[r][1].append(res[r].pcm)
    for k, r in enumerate(rows):
        ref_text, ref_audio = reference[k]
        assert got[r][0] == ref_text
        ours = np.concatenate(got[r][1])
        assert np.abs(ours - ref_audio).max() <= 1e-5 * max(1.0, np.abs(ref_audio).max())


def test_stale_frame_for_a_reopened_slot_is_skipped(bundle):
    """A frame taken for a conversation that closed, its row reopened by someone else before the
    tick: the newcomer must not receive the old conversation's audio."""
    engine = fresh_engine(bundle)
    old_row = engine.open()
    old_owner = engine.slots[old_row]
    engine.close(old_row)
    new_row = engine.open()
    assert new_row == old_row
    frame = speech_frames(seed=9, n=1)[0]
    assert engine.tick({old_row: frame}, owners={old_row: old_owner}) == {}
    assert engine.slots[new_row].steps == 0
    out = engine.tick({new_row: frame}, owners={new_row: engine.slots[new_row]})
    assert out[new_row].step == 0


def test_capacity_is_computed_and_an_oversized_engine_refused(bundle, monkeypatch):
    from duplex_agent.agent import engine as engine_module
    from duplex_agent.agent.engine import CapacityError, bytes_per_conversation, conversations_that_fit

    moshiko, fp8 = LMConfig.moshiko(), torch.float8_e4m3fn
    # The real shape: 32 layers x 2 x 4096 x 3000 steps in bf16 = 1.57 GB of KV per conversation.
    kv = 2 * 32 * 4096 * 3000 * 2
    assert bytes_per_conversation(moshiko, torch.bfloat16) > kv
    assert conversations_that_fit(moshiko, torch.bfloat16, 64 << 30) == (
        ((64 << 30) - (1 << 30)) // bytes_per_conversation(moshiko, torch.bfloat16))
    # float8 halves the temporal KV cache (0.79 GB), so about twice as many fit: on an H100
    # (about 78 GiB visible), some 63 GiB is left next to the 14.3 GiB of bf16 weights.
    assert bytes_per_conversation(moshiko, torch.bfloat16) - bytes_per_conversation(
        moshiko, torch.bfloat16, fp8) == kv // 2
    bf16_fit = conversations_that_fit(moshiko, torch.bfloat16, 63 << 30)
    assert conversations_that_fit(moshiko, torch.bfloat16, 63 << 30, fp8) >= 1.9 * bf16_fit

    # The tiny engine, with a KV cache big next to the fixed per-slot overhead (as for the real
    # model, so that float8 lets more in): refused with both numbers.
    monkeypatch.setattr(engine_module, "PER_SLOT_OVERHEAD_BYTES", 1 << 10)
    per = bytes_per_conversation(bundle.config, torch.float32)
    free = (1 << 30) + 5 * per + 1
    with pytest.raises(CapacityError, match="at most 5 fit") as refused:
        fresh_engine(bundle, 6, free_bytes=free)
    fit_fp8 = conversations_that_fit(bundle.config, torch.float32, free, fp8)
    assert fit_fp8 > 5
    assert f"--kv-cache fp8 (float8 KV cache, slightly less exact): {fit_fp8} fit" in str(refused.value)
    assert fresh_engine(bundle, 5, free_bytes=free).max_sessions == 5


def test_serve_with_too_many_sessions_says_how_many_fit():
    import subprocess
    import sys

    from tests.helpers import ROOT
    r = subprocess.run([sys.executable, str(ROOT / "run_agent.py"), "serve", "--checkpoint",
                        "tiny-random", "--device", "cpu", "--port", "0", "--max-sessions",
                        "10000000"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "conversations do not fit" in r.stderr and "--max-sessions" in r.stderr, r.stderr


def test_float8_kv_cache_is_close_to_full_precision(bundle):
    """The float8 cache changes only the attention inputs' precision: logits stay close."""
    import copy

    from duplex_agent.agent.lm_gen import LMGen
    gens = {dtype: LMGen(copy.deepcopy(bundle.model), 1, kv_dtype=dtype)
            for dtype in (None, torch.float8_e4m3fn)}
    assert gens[torch.float8_e4m3fn].model.caches[0].k.dtype == torch.float8_e4m3fn
    g = torch.Generator().manual_seed(4)
    run = torch.ones(1, dtype=torch.bool)
    errs = []
    for gen in gens.values():
        gen.reset(0, SamplingConfig(greedy=True))
    for t in range(12):
        codes = torch.randint(0, bundle.config.card, (1, 8), generator=g)
        outs = [gen.step(codes, run, return_logits=True) for gen in gens.values()]
        full, fp8 = (o.text_logits for o in outs)
        errs.append(((fp8 - full).abs().max() / full.abs().max()).item())
        if not torch.equal(outs[0].tokens, outs[1].tokens):
            break  # greedy paths diverged: later logits are not comparable
    assert len(errs) >= 3
    assert 0 < max(errs) < 0.1, errs  # not identical (the cache is float8) and not far off
