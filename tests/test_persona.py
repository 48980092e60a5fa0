"""Personas (PersonaPlex): the prompt prefilled in one pass equals the reference's step-by-step
prompt phase; joining a batch disturbs no one; the prompt cache; bad requests refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from moshi.models.lm import LMGen as RefLMGen

from duplex_agent.agent.config import FRAME_SIZE, SAMPLE_RATE, SamplingConfig
from duplex_agent.agent.engine import Engine
from duplex_agent.agent.lm_gen import LMGen
from duplex_agent.agent.persona import (PROMPT_SILENCE_FRAMES, max_prompt_frames, persona_prompt,
                                        prefill, text_prompt_tokens)
from duplex_agent.checkpoints.loader import load_checkpoint
from duplex_agent.checkpoints.bundle import load_voice_prompt
from duplex_agent.checkpoints.personaplex import PersonaError, VoicePrompt
from duplex_agent.checkpoints.tiny_random import synthetic_audio

TEXT = "Be kind."
# The reference's `audio_silence_frame_cnt=int(0.5 * mimi.frame_rate)`, after voice and text.
REFERENCE_SILENCE_FRAMES = int(0.5 * 12.5)
LIVE_STEPS = 64  # the prompt (~43 positions) + 64 > 2 x the tiny context (50): the ring wraps
GREEDY = SamplingConfig(greedy=True)


@pytest.fixture(scope="module")
def bundle():
    return load_checkpoint("tiny-random-personaplex", device="cpu")


@pytest.fixture(scope="module")
def reference(bundle):
    """moshi's LMModel with PersonaPlex's 16-step depformer and the builtin's weights, the model
    our loader read from the on-disk layout (and sliced to the agent's 8 steps). The reference
    LMGen serves its first 8 depformer steps (`dep_q = 8`), which predict the agent: PersonaPlex
    runs 16, but steps 8-15 only predict the user's streams, which are always given (checked in
    `PersonaPlexRing`), and the depformer is causal, so steps 0-7 see nothing of them."""
    from moshi.models.loaders import get_moshi_lm

    from duplex_agent.checkpoints.kyutai_format import moshi_to_disk
    from duplex_agent.checkpoints.tiny_random import (TINY_SEED, build_tiny_personaplex_lm_state,
                                                      tiny_personaplex_lm_kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(TINY_SEED)
        ref = get_moshi_lm(None, lm_kwargs=tiny_personaplex_lm_kwargs(), device="cpu",
                           dtype=torch.float32).eval()
    on_disk = build_tiny_personaplex_lm_state()
    assert ref.dep_q == 16 and all(torch.equal(on_disk[k], v)
                                   for k, v in moshi_to_disk(ref.state_dict()).items())
    ref.dep_q = 8
    return ref


@pytest.fixture(scope="module")
def audio_voice(bundle, tmp_path_factory):
    import soundfile
    path = tmp_path_factory.mktemp("voices") / "speaker.wav"
    soundfile.write(path, synthetic_audio(int(0.6 * SAMPLE_RATE), seed=5).numpy().reshape(-1),
                    SAMPLE_RATE)
    return load_voice_prompt(path, bundle)


# -- the reference procedure -----------------------------------------------------------------

class PersonaPlexRing:
    """PersonaPlex LMGen's token bookkeeping (`prepare_step_input`, `process_transformer_output`),
    written out from its code without the model: a ring of max_delay + 3 columns with `provided`
    flags; call c writes its forced tokens at column c + delay and runs the model at position
    c - 1 (the first call only fills column 0 with initial tokens)."""

    def __init__(self, cfg):
        self.cfg, self.size = cfg, cfg.max_delay + 3
        self.cache = torch.full((cfg.num_codebooks, self.size), -2, dtype=torch.long)
        self.provided = torch.zeros(cfg.num_codebooks, self.size, dtype=torch.bool)
        self.initial = torch.tensor([cfg.text_init_id] + [cfg.audio_init_id] * cfg.n_q)
        self.offset = 0

    def prepare(self, text, agent, user):
        """One call's writes. None for the first call; else the column the model reads and its
        target column with the target's `provided` flags."""
        o, cfg, n = self.offset, self.cfg, self.size
        for values, first in ((user, 1 + cfg.dep_q), (agent, 1)):
            if values is not None:
                for q, value in enumerate(values):
                    k = first + q
                    self.cache[k, (o + cfg.delays[k]) % n] = value
                    self.provided[k, (o + cfg.delays[k]) % n] = True
        if text is not None:
            self.cache[0, o % n], self.provided[0, o % n] = text, True
        for k, delay in enumerate(cfg.delays):
            if o <= delay:
                self.cache[k, o % n], self.provided[k, o % n] = self.initial[k], True
        if o == 0:
            self.cache[:, 0] = self.initial
            self.offset = 1
            return None
        # The depformer's user streams (steps 8-15) are always given: never sampled.
        assert self.provided[1 + cfg.dep_q:, o % n].all()
        return self.cache[:, (o - 1) % n].clone(), self.cache[:, o % n].clone(), \
            self.provided[:, o % n].clone()

    def finish(self, generated):
        o, n = self.offset, self.size
        self.provided[:, (o - 1) % n] = False
        self.cache[:, o % n] = torch.where(self.provided[:, o % n], self.cache[:, o % n], generated)
        self.offset += 1


def run_reference(ref, cfg, personas, voice: VoicePrompt | None, text_tokens, live):
    """PersonaPlex's `step_system_prompts` then its live steps, with moshi's own LMGen doing the
    model work: each model run of the reference is one moshi step at the same position, its forced
    text through `on_text_logits_hook` (all logits but the forced token masked), its forced agent
    audio through `depformer_replace_tokens` (or, where only the delayed codebooks are forced,
    written over the depformer's samples by `on_audio_hook`); a preset's embeddings go straight
    into moshi's streaming transformer, then the ring is restored from its snapshot. Returns per
    position: the input column, text logits, audio logits and the output frame."""
    pp = PersonaPlexRing(cfg)
    pad, card = cfg.text_pad_id, cfg.audio_init_id
    silence, sine = list(personas.silence_codes), list(personas.sine_codes)
    force = {}
    records: dict[int, dict] = {}
    current: dict = {}

    def on_text_logits(logits):
        current["text_logits"] = logits.float().reshape(-1).clone()
        if "text" in force:
            keep = logits[..., force["text"]].clone()
            logits.fill_(-float("inf"))
            logits[..., force["text"]] = keep

    def on_audio(tokens):
        if "delayed" in force:  # in place: these are the tokens moshi then writes to its ring
            tokens[0, 1:] = force["delayed"]

    original_text, original_depformer = ref.forward_text, ref.forward_depformer

    def recording_text(sequence, *args):
        current["input"] = sequence.view(-1).clone()
        return original_text(sequence, *args)

    def recording_depformer(i, seq, h):
        logits = original_depformer(i, seq, h)
        current.setdefault("audio_logits", []).append(logits.float().reshape(-1))
        return logits

    ref.forward_text, ref.forward_depformer = recording_text, recording_depformer
    gen = RefLMGen(ref, use_sampling=False, on_text_logits_hook=on_text_logits,
                   on_audio_hook=on_audio)
    try:
        with torch.no_grad(), gen.streaming(1):
            state = gen._streaming_state

            def model_run(prepared):
                read, target, provided = prepared
                position = pp.offset - 1
                assert int(state.offsets[0]) == position
                force.clear()
                if provided[0]:
                    force["text"] = int(target[0])
                agent = provided[1:1 + cfg.dep_q]
                replace = None
                if agent.all():
                    replace = target[1:1 + cfg.dep_q].view(1, -1, 1)
                elif agent.any():
                    assert not agent[0] and agent[1:].all()  # only the delayed ones: a suffix
                    force["delayed"] = target[2:1 + cfg.dep_q]
                user = torch.cat([read[1 + cfg.dep_q:2 + cfg.dep_q], target[2 + cfg.dep_q:]])
                current.clear()
                out = gen.step(user.view(1, -1, 1), depformer_replace_tokens=replace)
                assert torch.equal(current["input"], read), f"position {position}"
                out = None if out is None else out.view(-1).clone()
                ring_next = state.cache[0, :, (position + 1) % state.cache.shape[-1]].clone()
                records[position] = {**current, "out": out, "ring_next": ring_next}
                pp.finish(state.cache[0, :, (position + 1) % state.cache.shape[-1]])

            def call(text, agent, user):
                prepared = pp.prepare(text, agent, user)
                if prepared is not None:
                    model_run(prepared)

            if voice is not None and voice.is_preset:
                for row in voice.embeddings:
                    while (prepared := pp.prepare(pad, [card] * 8, [card] * 8)) is None:
                        pass
                    assert prepared[2].all()  # every token forced: the outputs do not matter
                    ref.transformer(row.view(1, 1, -1).float())
                    state.offsets += 1
                    state.offset_cpu += 1
                    pp.finish(prepared[1])
                pp.cache = voice.ring.clone()  # `state.cache.copy_(self.voice_prompt_cache)`
                end = voice.embeddings.shape[0]
                for c in (end - 1, end, end + 1):  # the same columns on moshi's 3-slot ring
                    state.cache[0, :, c % state.cache.shape[-1]] = pp.cache[:, c % pp.size]
            elif voice is not None:
                for codes in voice.codes:
                    call(pad, codes.tolist(), sine)
            for _ in range(REFERENCE_SILENCE_FRAMES):
                call(pad, silence, sine)
            for token in text_tokens:
                call(token, silence, sine)
            for _ in range(REFERENCE_SILENCE_FRAMES):
                call(pad, silence, sine)
            for user in live:
                call(None, None, user.tolist())
    finally:
        del ref.forward_text, ref.forward_depformer
    return records


def run_ours(bundle, voice, text, live):
    lm = LMGen(bundle.model, 1)
    lm.reset(0, GREEDY)
    prompt = persona_prompt(bundle, voice, text)
    entry = prefill(lm.model, 0, prompt)
    lm.finish_prompt(0, entry.h, entry.text_logits, prompt.carry, prompt.length)
    after = (int(lm.offsets[0]), lm.cache[0, :, prompt.length % lm.ring].clone())
    run = torch.ones(1, dtype=torch.bool)
    steps = [lm.step(codes.view(1, -1), run, return_logits=True) for codes in live]
    return prompt, entry, after, steps


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("kind", ["preset", "audio"])
def test_one_pass_prefill_equals_reference_prompt_phase(bundle, reference, audio_voice, kind):
    cfg = bundle.config
    voice = bundle.personas.voice("NATF0.pt") if kind == "preset" else audio_voice
    g = torch.Generator().manual_seed(3)
    live = torch.randint(0, cfg.card, (LIVE_STEPS + 1, cfg.num_user_codebooks), generator=g)
    prompt, entry, (offset, column), ours = run_ours(bundle, voice, TEXT, live[:LIVE_STEPS])
    records = run_reference(reference, cfg, bundle.personas, voice,
                            text_prompt_tokens(bundle.tokenizer, TEXT), live)
    length = prompt.length
    assert max(records) == length + LIVE_STEPS - 1
    assert length + LIVE_STEPS > 2 * cfg.context  # the ring KV cache wraps twice
    # Our columns are the ones the reference's positions read.
    first = 0 if prompt.embeddings is None else prompt.embeddings.shape[0]
    for p in range(first, length):
        assert torch.equal(prompt.columns[p - first], records[p]["input"]), f"position {p}"
    # The last prompt position: our one-pass logits vs the reference's step-by-step ones, and
    # the state the prompt leaves: the offset, and the first live column (all but the user's
    # first codebook, which the first live step writes).
    assert rel_err(entry.text_logits[0], records[length - 1]["text_logits"]) <= 1e-5
    assert offset == length
    user0 = 1 + cfg.dep_q
    ring_next = records[length - 1]["ring_next"]
    assert torch.equal(column[:user0], ring_next[:user0]), (column, ring_next)
    assert torch.equal(column[user0 + 1:], ring_next[user0 + 1:])
    texts = set()
    for j, step in enumerate(ours):
        rec = records[length + j]
        assert rel_err(step.text_logits[0], rec["text_logits"]) <= 1e-5, f"live step {j}"
        assert rel_err(step.audio_logits[0], torch.stack(rec["audio_logits"])) <= 1e-5
        assert torch.equal(step.tokens.view(-1), rec["out"]), f"live step {j}"
        texts.add(int(rec["out"][0]))
    assert len(texts) > 5  # not a degenerate run


def test_prompt_columns_at_the_boundaries(bundle):
    """The columns at the voice's end, after the ring restore and at the first live position,
    derived by hand from PersonaPlex's LMGen: frame f writes stream k at column f + delay."""
    cfg, personas = bundle.config, bundle.personas
    silence, sine = torch.tensor(personas.silence_codes), torch.tensor(personas.sine_codes)
    voice = personas.voice("VARM2.pt")
    tokens = text_prompt_tokens(bundle.tokenizer, TEXT)
    prompt = persona_prompt(bundle, "VARM2.pt", TEXT)
    E = voice.embeddings.shape[0]
    assert prompt.length == E + 1 + 2 * PROMPT_SILENCE_FRAMES + len(tokens)
    assert prompt.columns.shape[0] == prompt.length - E
    ring = voice.ring
    # Position E reads the restored ring's column E: all 17 streams.
    assert torch.equal(prompt.columns[0], ring[:, E % 4])
    # Position E + 1: the first silence frame's undelayed streams, the ring's delayed ones.
    col = prompt.columns[1]
    assert col[0] == cfg.text_pad_id and col[1] == silence[0] and col[9] == sine[0]
    assert torch.equal(col[2:9], ring[2:9, (E + 1) % 4])
    assert torch.equal(col[10:], ring[10:, (E + 1) % 4])
    # Position E + 2: silence all through (agent) and sine (user), text pad.
    pad = torch.tensor([cfg.text_pad_id])
    assert torch.equal(prompt.columns[2], torch.cat([pad, silence, sine]))
    # The text prompt: token i is read at position E + 1 + 6 + i, with silence and sine.
    for i, token in enumerate(tokens):
        assert prompt.columns[1 + PROMPT_SILENCE_FRAMES + i, 0] == token
    assert prompt.columns[1 + PROMPT_SILENCE_FRAMES + len(tokens), 0] == cfg.text_pad_id
    # The first live column: the last silence frame's delayed streams; the rest is the
    # conversation's (sampled text and first agent codebook, the user's live frame).
    assert torch.equal(prompt.carry, torch.cat([torch.tensor([-2, -2]), silence[1:],
                                                torch.tensor([-2]), sine[1:]]))
    # Wrapped without BOS, as the reference's spm.encode of "<system> ... <system>".
    assert tokens == bundle.tokenizer.encode("<system> Be kind. <system>")
    assert bundle.tokenizer.bos_id() not in tokens
    # No text: no text phase. No voice: the 12 silence frames around the text, from position 0.
    assert persona_prompt(bundle, "VARM2.pt", "").length == E + 1 + 2 * PROMPT_SILENCE_FRAMES
    text_only = persona_prompt(bundle, None, TEXT)
    assert text_only.embeddings is None
    assert text_only.length == 2 * PROMPT_SILENCE_FRAMES + len(tokens)
    initial = torch.tensor([cfg.text_init_id] + [cfg.audio_init_id] * cfg.n_q)
    assert torch.equal(text_only.columns[0], initial)


@pytest.mark.parametrize("kv_dtype", [None, torch.float8_e4m3fn], ids=["fp32", "fp8"])
def test_prefill_writes_what_step_by_step_decoding_writes(bundle, kv_dtype):
    """The one-pass prefill against the same columns stepped one at a time through the decode
    path (forward_temporal), on a float8 KV cache too: the same K/V (rounded the same way) and
    the same last hidden state."""
    import copy
    prompt = persona_prompt(bundle, None, TEXT)
    models = [copy.deepcopy(bundle.model) for _ in range(2)]
    for m in models:
        m.setup_caches(2, kv_dtype)
    one_pass, stepped = models
    row = 1
    entry = prefill(one_pass, row, prompt)
    run = torch.tensor([False, True])
    for p, column in enumerate(prompt.columns):
        with torch.no_grad():
            h, logits = stepped.forward_temporal(column.view(1, -1).repeat(2, 1),
                                                 torch.full((2,), p), run)
    assert rel_err(entry.text_logits[0], logits[row]) <= 1e-5
    assert rel_err(entry.h[0], h[row]) <= 1e-5
    for a, b in zip(one_pass.caches, stepped.caches):
        for x, y in ((a.k, b.k), (a.v, b.v)):
            assert x[0].float().abs().sum() == 0  # the other row: untouched
            got, want = x[row, :, :prompt.length].float(), y[row, :, :prompt.length].float()
            tol = 1e-5 if kv_dtype is None else 0.07  # float8: one rounding step at most
            assert rel_err(got, want) <= tol


# -- the engine ------------------------------------------------------------------------------

def speech_frames(seed, n):
    pcm = synthetic_audio(n * FRAME_SIZE, seed=seed).numpy().reshape(-1)
    return [pcm[i * FRAME_SIZE:(i + 1) * FRAME_SIZE] for i in range(n)]


def fresh_engine(bundle, slots=4):
    from duplex_agent.checkpoints.tiny_random import build_tiny_mimi
    mimi = build_tiny_mimi().to(bundle.model.out_norm.alpha.device)
    b = type(bundle)(**{**bundle.__dict__, "mimi": mimi})
    return Engine(b, slots)


def assert_same(a, b):
    assert [o.text_id for o in a] == [o.text_id for o in b]
    assert all(np.array_equal(x.pcm, y.pcm) for x, y in zip(a, b))


def test_engine_persona_conversation_equals_reference_pipeline(bundle, reference):
    """The whole path as PersonaPlex's server runs it: Mimi reset after the prompt, each input
    frame Mimi-encoded and stepped, each output decoded (the first one being the last prompt
    frame, which the reference returns and we do not: our decoder is primed with it)."""
    from duplex_agent.checkpoints.tiny_random import build_tiny_mimi
    frames = speech_frames(50, 12)
    ref_mimi = build_tiny_mimi()
    with torch.no_grad(), ref_mimi.streaming(1):
        live = torch.stack([ref_mimi.encode(torch.from_numpy(f).view(1, 1, -1))[0, :, 0]
                            for f in frames + frames[:1]])
    voice = bundle.personas.voice("VARF3.pt")
    records = run_reference(reference, bundle.config, bundle.personas, voice,
                            text_prompt_tokens(bundle.tokenizer, TEXT), live)
    length = persona_prompt(bundle, voice, TEXT).length
    with torch.no_grad(), ref_mimi.streaming(1):
        pcm = [ref_mimi.decode(records[p]["out"][1:].view(1, -1, 1)).view(-1).numpy()
               for p in range(length - 1, length + len(frames))]
    engine = fresh_engine(bundle, slots=3)
    row = engine.open(GREEDY, persona_prompt(bundle, "VARF3.pt", TEXT))
    outs = [engine.tick({row: f})[row] for f in frames]
    assert [o.text_id for o in outs] == [int(records[length + j]["out"][0])
                                         for j in range(len(frames))]
    for j, out in enumerate(outs):
        assert np.abs(out.pcm - pcm[1 + j]).max() <= 1e-5 * max(1.0, np.abs(pcm[1 + j]).max())


def check_join(bundle):
    """A persona conversation joins two live ones at tick 6: they are bit-identical to a run
    without the join; the persona's own frames equal its run alone (same row: two slots held,
    never ticked); a second conversation with the same persona hits the prompt cache and says
    exactly the same. Returns the engine of the run with the join."""
    others = {seed: speech_frames(seed, 24) for seed in (31, 32)}
    mine = speech_frames(40, 16)
    persona = persona_prompt(bundle, "NATM1.pt", TEXT)
    sampling = SamplingConfig(seed=77)

    def run(join: bool):
        engine = fresh_engine(bundle)
        rows = {seed: engine.open(SamplingConfig(seed=seed)) for seed in others}
        outs = {seed: [] for seed in others}
        me, my_outs = None, []
        for t in range(24):
            if join and t == 6:
                me = engine.open(sampling, persona)
            frames = {rows[s]: others[s][t] for s in others}
            if me is not None and t - 6 < len(mine):
                frames[me] = mine[t - 6]
            res = engine.tick(frames)
            for s in others:
                outs[s].append(res[rows[s]])
            if me is not None and me in res:
                my_outs.append(res[me])
        again = []
        if join:  # the next conversation with this persona: its prompt comes from the cache
            engine.close(me)
            row = engine.open(sampling, persona)
            assert row == me
            again = [engine.tick({row: f})[row] for f in mine]
        return outs, my_outs, again, engine

    without, _, _, _ = run(join=False)
    with_join, my_outs, again, engine = run(join=True)
    for seed in others:
        assert_same(without[seed], with_join[seed])
    alone_engine = fresh_engine(bundle)
    for _ in others:
        alone_engine.open()
    row = alone_engine.open(sampling, persona)
    alone = [alone_engine.tick({row: f})[row] for f in mine]
    assert len({o.text_id for o in alone}) > 3
    assert alone[0].step == 0 and np.abs(alone[0].pcm).max() > 0  # speaks from its first frame
    assert_same(alone, my_outs)
    assert_same(alone, again)
    stats = engine.prompt_cache.stats()
    assert (stats["hits"], stats["misses"], stats["entries"], stats["evictions"]) == (1, 1, 1, 0)
    assert stats["bytes"] > 0
    return engine


def test_persona_joins_a_live_batch_without_disturbing_it(bundle):
    check_join(bundle)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_persona_join_on_cuda_with_graphs_and_kernels():
    """The same on a GPU: the step replays its CUDA graph (captured before the join) and runs
    the Triton kernels; the prefill writes in place, so the graph stays valid."""
    engine = check_join(load_checkpoint("tiny-random-personaplex", device="cuda"))
    assert engine.lm.cuda_graph and engine.lm._graph is not None


def test_prompt_cache_evicts_least_recently_used(bundle):
    engine = fresh_engine(bundle, slots=1)
    prompts = [persona_prompt(bundle, name, TEXT) for name in ("NATF0.pt", "NATF1.pt", "NATF2.pt")]
    frame = speech_frames(1, 1)[0]

    def converse(prompt):
        row = engine.open(GREEDY, prompt)
        engine.tick({row: frame})
        engine.close(row)

    converse(prompts[0])
    size = engine.prompt_cache.stats()["bytes"]
    engine.prompt_cache.budget_bytes = 2 * size + size // 2  # room for two of these
    converse(prompts[1])
    converse(prompts[0])  # hit: now the most recently used
    converse(prompts[2])  # evicts prompts[1]
    converse(prompts[0])  # still there
    converse(prompts[1])  # miss again
    stats = engine.prompt_cache.stats()
    assert (stats["hits"], stats["misses"], stats["entries"]) == (2, 4, 2)
    assert stats["evictions"] == 2 and stats["bytes"] <= engine.prompt_cache.budget_bytes
    engine.prompt_cache.budget_bytes = size - 1  # an entry over the budget is not kept
    converse(persona_prompt(bundle, "NATM0.pt", TEXT))
    stats = engine.prompt_cache.stats()
    assert (stats["misses"], stats["entries"], stats["evictions"]) == (5, 2, 2)


# -- the API and bad requests -----------------------------------------------------------------

def test_agent_open_with_persona_and_refusals(bundle):
    from duplex_agent.agent.api import Agent
    agent = Agent(fresh_engine(bundle, slots=2))
    try:
        assert agent.voices() == bundle.personas.voices() and "NATF0.pt" in agent.voices()
        conv = agent.open(voice_prompt="NATF0.pt", text_prompt=TEXT)
        assert (conv.voice_prompt, conv.text_prompt) == ("NATF0.pt", TEXT)
        plain = agent.open()
        assert (plain.voice_prompt, plain.text_prompt) == (None, None)
        plain.close()
        taken = agent.engine.active
        unknown = "unknown voice 'NOBODY.pt'; available voices: NATF0.pt"
        with pytest.raises(PersonaError, match=unknown):
            agent.open(voice_prompt="NOBODY.pt")
        limit = max_prompt_frames(bundle.config)
        with pytest.raises(PersonaError, match=f"allows at most {limit} "):
            agent.open(voice_prompt="NATF0.pt", text_prompt="You are a wise teacher. " * 5)
        assert agent.engine.active == taken  # no slot consumed by a refusal
    finally:
        agent.close()


def test_persona_on_a_checkpoint_without_personas_is_refused():
    from duplex_agent.agent.api import Agent
    plain = load_checkpoint("tiny-random", device="cpu")
    agent = Agent(fresh_engine(plain, slots=1))
    try:
        assert agent.voices() == []
        with pytest.raises(PersonaError, match="has no persona training; use a PersonaPlex"):
            agent.open(voice_prompt="NATF0.pt")
        with pytest.raises(PersonaError, match="has no persona training"):
            agent.open(text_prompt=TEXT)
        assert agent.engine.active == []
        agent.open().close()  # without a persona: as before
    finally:
        agent.close()


async def test_a_failing_prefill_ends_only_its_conversation(bundle):
    """An internal error while prefilling a persona ends that conversation with an ErrorOut; the
    conversation already live goes on."""
    import asyncio

    from duplex_agent.agent.api import Agent, AudioOut, ErrorOut
    agent = Agent(fresh_engine(bundle, slots=2))
    model = agent.engine.lm.model

    def failing_prefill(*args):
        raise RuntimeError("simulated device fault")

    try:
        live = agent.open()
        live.push(speech_frames(3, 1)[0])
        assert isinstance(await asyncio.wait_for(live.recv(), 30), AudioOut)
        model.forward_prefill = failing_prefill
        persona = agent.open(voice_prompt="NATF0.pt", text_prompt=TEXT)
        for f in speech_frames(4, 2):
            persona.push(f)
            live.push(f)
        event = await asyncio.wait_for(persona.recv(), 30)
        assert isinstance(event, ErrorOut) and "preparing the persona" in event.message
        assert persona.closed
        audio = 0
        while audio < 2:  # the live one answers its next frames (text pieces may come too)
            event = await asyncio.wait_for(live.recv(), 30)
            assert not isinstance(event, ErrorOut)
            audio += isinstance(event, AudioOut)
        assert not live.closed
        assert agent.engine.active == [live.slot]  # the failed one's slot is free again
    finally:
        del model.forward_prefill
        agent.close()
