"""The transcriber (Kyutai's streaming STT as rows of the engine's tick) against the moshi library
driven as Kyutai's `scripts/stt_from_file_pytorch.py` drives it, on a tiny random STT checkpoint
written by the moshi library (model_type stt, dep_q 0, 32 codebooks, 4 pause heads, 1 s silence
prefix, 0.5 s delay, a context of 32 steps: shorter than every input here).

The reference's words come from the token stream by the script's decoding, rewritten below
(`kyutai_words`); ours come out of the engine as it runs.
"""
from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch

from duplex_agent.agent.config import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE, SamplingConfig
from duplex_agent.agent.engine import Engine
from duplex_agent.agent.offline import run_file
from duplex_agent.agent.transcriber import WordTracker
from duplex_agent.agent.turns import PauseDetector, TurnTaking
from duplex_agent.checkpoints.loader import CheckpointError, load_checkpoint, load_transcriber
from duplex_agent.checkpoints.stt import write_tiny_stt_dir
from duplex_agent.checkpoints.tiny_random import build_tiny_tokenizer, synthetic_audio
from tests.helpers import ROOT, agent_fixture, espeak_frames

SPEECH = "Hello, can you hear me? The weather is lovely today."
FRAMES = 40  # 3.2 s


@pytest.fixture(scope="module")
def stt_dir(tmp_path_factory):
    return write_tiny_stt_dir(tmp_path_factory.mktemp("stt"))


@pytest.fixture(scope="module")
def stt0_dir(tmp_path_factory):
    """The same weights with no silence prefix: its Mimi state is the dialogue Mimi's, so one
    encode can serve both models."""
    return write_tiny_stt_dir(tmp_path_factory.mktemp("stt0"), stt_config={
        "audio_silence_prefix_seconds": 0.0, "audio_delay_seconds": 0.5})


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> np.ndarray:
    return espeak_frames(SPEECH, "en-us", tmp_path_factory.mktemp("speech") / "s.wav", FRAMES)


def engine_with(stt_path, slots: int = 1, **engine_kwargs) -> Engine:
    """A fresh engine (its own Mimi streaming states and caches) for tiny-random + `stt_path`."""
    return Engine(load_checkpoint("tiny-random", "cpu", transcriber=str(stt_path)), slots,
                  **engine_kwargs)


# -- the reference -------------------------------------------------------------------------------

def kyutai_reference(stt_path, pcm: np.ndarray):
    """moshi's Mimi and LMGen.step_with_extra_heads as Kyutai's script drives them: loaded by
    moshi's CheckpointInfo, the silence prefix, the audio, delay-worth of silence, greedy.
    Returns (text tokens, head 2's pause probabilities, words, prefix frames)."""
    from moshi.models import loaders
    from moshi.models.lm import LMGen
    info = loaders.CheckpointInfo.from_hf_repo(
        "local/tiny-random-stt", moshi_weights=stt_path / "model.safetensors",
        mimi_weights=stt_path / "mimi.safetensors", tokenizer=stt_path / "tokenizer.model",
        config_path=stt_path / "config.json", mimi_config_path=stt_path / "mimi_config.json")
    mimi = info.get_mimi(device="cpu")
    lm = info.get_moshi(device="cpu", dtype=torch.float32)
    lm_gen = LMGen(lm, temp=0, temp_text=0.0)
    prefix_s = info.stt_config.get("audio_silence_prefix_seconds", 1.0)
    delay_s = info.stt_config.get("audio_delay_seconds", 5.0)
    n_prefix = math.ceil(prefix_s * mimi.frame_rate)
    n_suffix = math.ceil(delay_s * mimi.frame_rate)
    silence = torch.zeros(1, 1, mimi.frame_size)
    audio = torch.from_numpy(pcm).view(1, 1, -1)
    chunks = itertools.chain(itertools.repeat(silence, n_prefix),
                             torch.split(audio, mimi.frame_size, dim=-1),
                             itertools.repeat(silence, n_suffix))
    tokens, pauses = [], []
    with torch.no_grad(), mimi.streaming(1), lm_gen.streaming(1):
        for chunk in chunks:
            out, heads = lm_gen.step_with_extra_heads(mimi.encode(chunk))
            tokens.append(int(out[0, 0, 0]))
            pauses.append(float(heads[2][0, 0, 0]))
    words = kyutai_words(tokens, info.get_text_tokenizer(), n_prefix, delay_s)
    return tokens, pauses, words, n_prefix


def kyutai_words(tokens, tokenizer, n_prefix: int, delay_s: float) -> list[tuple[str, float]]:
    """The script's `tokens_to_timestamped_text`: segments between end-of-padding tokens, the last
    one up to EOS or one second; words by whitespace, a multi-word segment's split by token
    counts. Returns (word, start). (The script's last-segment slice has a float bound and fails
    unless the audio ends within that second; here it is rounded down.)"""
    tokens = torch.tensor(tokens)
    offset = int(n_prefix / FRAME_RATE) + delay_s
    words = []

    def segment(start: int, end: int) -> None:
        ids = tokens[start:end]
        text = tokenizer.decode(ids[ids > 3].tolist())
        parts = text.split()
        for part in parts[:-1]:
            words.append((part, max(0.0, start / FRAME_RATE - offset)))
            start += len(tokenizer.encode(part))
        if parts:
            words.append((parts[-1], max(0.0, start / FRAME_RATE - offset)))

    bounds = torch.where(tokens == 0)[0].tolist()
    for a, b in zip(bounds, bounds[1:]):
        segment(a + 1, b)
    if bounds:
        last = bounds[-1] + 1
        eos = torch.where(tokens[last:] == 2)[0]
        segment(last, last + int(eos[0]) if eos.numel() else int(min(len(tokens), last + FRAME_RATE)))
    return words


def assert_words_match(ours, reference):
    """Text equal, each start within one frame."""
    assert [w[0] for w in ours] == [w[0] for w in reference]
    for (text, start), (_, ref_start) in zip(ours, reference):
        assert abs(start - ref_start) <= 1 / FRAME_RATE + 1e-9, (text, start, ref_start)


def run_live(engine: Engine, row: int, frames: list, tick) -> tuple[list, list]:
    words, pauses = [], []
    for f in frames:
        out = tick({row: f})[row]
        words += [(w.text, w.start) for w in out.words]
        pauses.append(out.pause)
    return words, pauses


# -- parity ----------------------------------------------------------------------------------------

def test_file_mode_equals_kyutai_reference(stt_dir, speech, tmp_path):
    """`run_file` (the file command's core) gives the reference's words, and every live frame's
    pause probability within 1e-5; the JSON gains exactly "user": {"text", "words"}."""
    tokens, ref_pauses, ref_words, n_prefix = kyutai_reference(stt_dir, speech)
    assert len(ref_words) >= 5 and 0 in tokens and 3 in tokens, "a degenerate stream proves little"
    engine = engine_with(stt_dir)
    pauses = []
    tick = engine.tick

    def recording_tick(frames, owners=None):  # the engine's own results, looked at on the way
        results = tick(frames, owners)
        pauses.extend(r.pause for r in results.values())
        return results
    engine.tick = recording_tick
    transcript = run_file(engine, speech, tmp_path / "out.wav", tmp_path / "t.json",
                          SamplingConfig(greedy=True))
    assert_words_match([(w.text, w.start) for w in transcript.user], ref_words)
    np.testing.assert_allclose(pauses, ref_pauses[n_prefix:n_prefix + FRAMES], rtol=0, atol=1e-5)
    written = json.loads((tmp_path / "t.json").read_text())
    assert set(written) == {"text", "pieces", "user"} and set(written["user"]) == {"text", "words"}
    assert written["user"]["text"] == " ".join(w for w, _ in ref_words)
    assert all(set(w) == {"text", "start", "end"} and w["start"] <= w["end"]
               for w in written["user"]["words"])


def test_file_command_writes_the_users_words(stt_dir, speech, tmp_path):
    """The command line, exactly as documented."""
    wav = tmp_path / "in.wav"
    soundfile.write(str(wav), speech, SAMPLE_RATE, subtype="FLOAT")
    r = subprocess.run([sys.executable, str(ROOT / "run_agent.py"), "file", str(wav),
                        str(tmp_path / "out.wav"), "--checkpoint", "tiny-random", "--transcriber",
                        str(stt_dir), "--greedy", "--transcript", str(tmp_path / "t.json")],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    _, _, ref_words, _ = kyutai_reference(stt_dir, speech)
    user = json.loads((tmp_path / "t.json").read_text())["user"]
    assert_words_match([(w["text"], w["start"]) for w in user["words"]], ref_words)
    assert f"{len(ref_words)} user words" in r.stderr


def test_live_engine_equals_reference_while_others_join_and_leave(stt_dir, speech):
    """One conversation's words and pauses equal the reference while others open and close
    around it (one reusing a freed slot); each of the others is bit-identical to itself alone."""
    _, ref_pauses, ref_words, n_prefix = kyutai_reference(stt_dir, speech)
    mine = [speech[i * FRAME_SIZE:(i + 1) * FRAME_SIZE] for i in range(FRAMES)]
    others = {name: [f.copy() for f in np.split(synthetic_audio(n * FRAME_SIZE, seed).numpy(), n)]
              for name, n, seed in (("b", 18, 21), ("c", 25, 22), ("d", 12, 23))}
    schedule = {"b": 2, "c": 9, "d": 22}  # the tick each opens at; b closes after its frames

    engine = engine_with(stt_dir, slots=3)
    me = engine.open(SamplingConfig(greedy=True))
    rows, got, placed = {}, {name: [] for name in others}, {}
    words, pauses = [], []
    for t in range(FRAMES):
        for name, start in schedule.items():
            if t == start:
                rows[name] = placed[name] = engine.open(SamplingConfig(seed=5))
            if name in rows and len(got[name]) == len(others[name]):
                engine.close(rows.pop(name))
        frames = {me: mine[t]} | {rows[n]: others[n][len(got[n])] for n in rows}
        results = engine.tick(frames)
        words += [(w.text, w.start) for w in results[me].words]
        pauses.append(results[me].pause)
        for name, row in rows.items():
            got[name].append(results[row])
    words += [(w.text, w.start) for w in engine.flush_words(me)]
    assert_words_match(words, ref_words)
    np.testing.assert_allclose(pauses, ref_pauses[n_prefix:n_prefix + FRAMES], rtol=0, atol=1e-5)

    assert placed["d"] == placed["b"], "d reuses b's slot"
    # Each alone, in the same row of an engine of the same size: the same shapes and positions.
    for name, frames in others.items():
        alone = engine_with(stt_dir, slots=3)
        for _ in range(placed[name]):
            alone.open()  # holds a row, never ticked
        row = alone.open(SamplingConfig(seed=5))
        assert row == placed[name]
        expected = [alone.tick({row: f})[row] for f in frames[:len(got[name])]]
        assert len(got[name]) >= 10
        for a, b in zip(got[name], expected):
            assert a.text_id == b.text_id and np.array_equal(a.pcm, b.pcm), name
            assert a.words == b.words and a.pause == b.pause, name


def test_one_encode_and_own_mimi_give_the_same_words(stt0_dir, speech):
    """With no prefix, one 32-codebook encode serves both models; the transcriber's own Mimi gives
    the same codes, so the same words and pauses, both the reference's; and the dialogue model
    hears exactly what it hears without a transcriber."""
    _, ref_pauses, ref_words, _ = kyutai_reference(stt0_dir, speech)
    frames = [speech[i * FRAME_SIZE:(i + 1) * FRAME_SIZE] for i in range(FRAMES)]
    runs = {}
    for encode_once in (True, False):
        engine = engine_with(stt0_dir, encode_once=encode_once)
        assert engine.describe()["transcriber"]["encode"] == ("shared" if encode_once else "own")
        row = engine.open(SamplingConfig(greedy=True))
        outs = [engine.tick({row: f})[row] for f in frames]
        words = [(w.text, w.start) for o in outs for w in o.words]
        runs[encode_once] = (outs, words + [(w.text, w.start) for w in engine.flush_words(row)])
    (shared, shared_words), (own, own_words) = runs[True], runs[False]
    assert shared_words == own_words
    assert [o.pause for o in shared] == [o.pause for o in own]
    assert_words_match(shared_words, ref_words)
    np.testing.assert_allclose([o.pause for o in shared], ref_pauses[:FRAMES], rtol=0, atol=1e-5)

    plain = Engine(load_checkpoint("tiny-random", "cpu"), 1)
    row = plain.open(SamplingConfig(greedy=True))
    for f, o in zip(frames, shared):
        p = plain.tick({row: f})[row]
        assert p.text_id == o.text_id and np.array_equal(p.pcm, o.pcm)


# -- loading ---------------------------------------------------------------------------------------

def test_bad_transcriber_checkpoints_are_refused_at_load(stt_dir, tmp_path, monkeypatch):
    """Each gets a message that says what is wrong, from load_checkpoint (so from Agent.load and
    every command) before any engine exists."""
    def variant(name, **overrides):
        path = tmp_path / name
        path.mkdir()
        for f in stt_dir.iterdir():
            (path / f.name).symlink_to(f)
        (path / "config.json").unlink()
        config = json.loads((stt_dir / "config.json").read_text()) | overrides
        (path / "config.json").write_text(json.dumps(config))
        return path
    missing = variant("missing")
    (missing / "model.safetensors").unlink()
    bad = {
        "dep_q": (variant("speaks", dep_q=8), "dep_q=8: this model generates audio"),
        "codebooks": (variant("wide", n_q=40, delays=[0] * 41),
                      "hears 40 Mimi codebooks; its Mimi has 32"),
        "bins": (variant("bins", card=2048), "audio vocabulary is 2048; its Mimi's codebooks have 128"),
        "model_type": (variant("dialogue", model_type="moshi"), "model_type 'moshi'"),
        "missing file": (missing, "model.safetensors is missing"),
        "no folder": ("./no/such/stt", "no such directory"),
    }
    for what, (spec, message) in bad.items():
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint("tiny-random", "cpu", transcriber=str(spec))
    # A Hub name with no network and an empty cache: the offline message, at once.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="Could not download the transcriber 'kyutai/stt-1b-en_fr'"):
        load_transcriber("stt-1b-en_fr", device="cpu")


def test_a_failed_transcriber_start_ends_only_that_conversation(stt_dir, speech):
    """If the transcriber cannot start a conversation, that conversation ends with an error; the
    others go on and the slot serves the next one."""
    engine = engine_with(stt_dir, slots=2)
    first = engine.open()
    engine.tick({first: speech[:FRAME_SIZE]})
    reset = engine.transcriber.reset

    def failing(rows, mask, trackers):
        raise RuntimeError("boom")
    engine.transcriber.reset = failing
    second = engine.open()
    out = engine.tick({first: speech[FRAME_SIZE:2 * FRAME_SIZE], second: speech[:FRAME_SIZE]})
    assert set(out) == {first} and "transcriber" in engine.slots[second].error
    engine.transcriber.reset = reset
    engine.close(second)
    again = engine.open()
    assert again == second
    assert set(engine.tick({first: speech[:FRAME_SIZE], again: speech[:FRAME_SIZE]})) == {first, again}


# -- words and turns, on their own -----------------------------------------------------------------

def test_word_tracker_follows_the_scripts_segmentation():
    """Hand-made token streams through the tracker and the script's decoding: segments between
    end-of-padding tokens, multi-word segments split by token counts, the last segment ended by
    EOS, tokens before the first boundary dropped, a segment closed after one second."""
    tok = build_tiny_tokenizer()
    hello, weather = tok.encode("hello"), tok.encode("the weather")
    assert len(weather) >= 2
    streams = [
        [5, 9] + [3, 0] + hello + [3, 3, 0] + weather + [3] * 4 + [0] + hello + [2] + hello,
        [3, 0] + hello + [3] * 14 + [0] + weather + [3] * 20,  # long pauses: capped segments
    ]
    for tokens in streams:
        tracker = WordTracker(tok, 3, 0, prefix_frames=0, delay_s=0.0)
        words = [w for step, t in enumerate(tokens) for w in tracker.feed(step, t)]
        words += tracker.finish()
        assert_words_match([(w.text, w.start) for w in words], kyutai_words(tokens, tok, 0, 0.0))
        assert all(w.start <= w.end for w in words)
    # Live, a word is out one second after its segment opened, without waiting for the next.
    tracker = WordTracker(tok, 3, 0, prefix_frames=0, delay_s=0.0)
    out = [(step, tracker.feed(step, t)) for step, t in enumerate([0] + hello + [3] * 20)]
    assert [step for step, w in out if w] == [13]


def test_semantic_turn_ends_merge_pauses_inside_a_turn():
    """With pause probabilities, webrtcvad segments merge into turns unless the smoothed
    probability rose above 0.6 between them; the first 12 steps are not used."""
    detector = PauseDetector()
    assert not any(detector.update(0.9, k * 0.08) for k in range(12))  # skipped
    turns = TurnTaking()
    t, probs = 0.0, [0.9] * 12 + [0.1] * 10 + [0.2] * 5 + [0.1] * 10 + [0.9] * 5 + [0.1] * 10
    for p in probs:
        turns.add_pause(p, t)
        t += 0.08
    ends = turns.pauses.turn_ends
    assert len(ends) == 1 and ends[0] == pytest.approx(37 * 0.08)
    from duplex_agent.agent.turns import _turns
    segments = [(1.0, 1.5), (1.9, 2.4), (3.2, 3.6)]  # a pause at 1.5-1.9, the turn end at 2.96
    assert _turns(segments, ends) == [(1.0, 2.4), (3.2, 3.6)]
    assert turns.summary()["turn_ends"] == "semantic"


def test_bench_builds_a_published_shape_with_random_weights(monkeypatch):
    """`bench --transcriber NAME` makes the model's shape with random weights sharing the
    dialogue's Mimi (here a small stand-in shape in the registry of shapes)."""
    from duplex_agent.agent.bench import bench_transcriber
    from duplex_agent.checkpoints import stt
    small = stt.tiny_stt_config()
    monkeypatch.setitem(stt.STT_SHAPES, "small", (small, 1.0, 0.5))
    bundle = load_checkpoint("tiny-random", "cpu")
    bundle.mimi = stt.build_tiny_stt_mimi()
    bundle.transcriber = bench_transcriber("small", bundle, torch.device("cpu"))
    assert bundle.transcriber.mimi is not bundle.mimi
    assert bundle.transcriber.mimi.encoder.model[0].conv.conv.weight is \
        bundle.mimi.encoder.model[0].conv.conv.weight
    engine = Engine(bundle, 2)
    row = engine.open()
    frames = np.split(synthetic_audio(5 * FRAME_SIZE, 3).numpy(), 5)
    assert all(0.0 <= engine.tick({row: f})[row].pause <= 1.0 for f in frames)


def test_capacity_counts_the_transcriber():
    from duplex_agent.agent.config import LMConfig
    from duplex_agent.agent.engine import bytes_per_conversation, conversations_on_device
    from duplex_agent.checkpoints.stt import STT_SHAPES
    moshiko, stt1b = LMConfig.moshiko(), STT_SHAPES["stt-1b-en_fr-candle"][0]
    extra = bytes_per_conversation(moshiko, torch.bfloat16, transcriber=stt1b) - \
        bytes_per_conversation(moshiko, torch.bfloat16)
    assert extra == 2 * 16 * 2048 * 2 * 750  # its KV cache: 98 MB in bf16
    h100 = 80 << 30
    assert conversations_on_device(moshiko, torch.bfloat16, h100, transcriber=stt1b) < \
        conversations_on_device(moshiko, torch.bfloat16, h100)


# -- Realtime, stats, metrics ----------------------------------------------------------------------

stt_agent = agent_fixture(conversations=2, transcriber="tiny-random-stt")


async def test_realtime_transcripts_equal_file_mode(stt_agent, tmp_path, session):
    """The official SDK asks for input transcription and streams speech in real time: each user
    item's completed transcript holds exactly the words file mode finds in that item's span, in
    item order; /api/stats and /metrics count the words and time the transcriber."""
    import asyncio
    import base64
    import time

    openai = pytest.importorskip("openai")

    from duplex_agent.agent.offline import converse
    from duplex_agent.streams.realtime.transcripts import GRACE_S
    from tests.helpers import espeak, serving
    pcm = espeak("Hello there. I would like to book a table for two.", "en-us",
                 tmp_path / "s.wav", SAMPLE_RATE)
    tail = np.zeros(int(2.6 * SAMPLE_RATE), np.float32)  # the last item's words settle
    pcm = np.concatenate([np.zeros(SAMPLE_RATE // 4, np.float32), pcm, tail])
    pcm16 = (np.clip(pcm, -1, 1) * 32767).astype(np.int16)
    heard = pcm16.astype(np.float32) / 32768  # what the server decodes
    file_engine = Engine(load_checkpoint("tiny-random", "cpu", transcriber="tiny-random-stt"), 1)
    _, offline = converse(file_engine, heard)

    events = []
    async with serving(stt_agent, static_dir=tmp_path) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)
        async with client.realtime.connect(model="tiny-random") as conn:
            await conn.session.update(session={"type": "realtime", "audio": {"input": {
                "transcription": {"model": "gpt-4o-mini-transcribe"},
                "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}}})

            async def receive():
                async for event in conn:
                    events.append(event)
            reader = asyncio.create_task(receive())
            n, t0 = SAMPLE_RATE // 50, time.monotonic()
            for i, k in enumerate(range(0, len(pcm16), n)):  # 20 ms appends, in real time
                await asyncio.sleep(max(0.0, t0 + i * 0.02 - time.monotonic()))
                await conn.input_audio_buffer.append(
                    audio=base64.b64encode(pcm16[k:k + n].astype("<i2").tobytes()).decode())
            async with asyncio.timeout(15):
                while sum(e.type.endswith("transcription.completed") for e in events) < sum(
                        e.type == "input_audio_buffer.speech_stopped" for e in events):
                    await asyncio.sleep(0.1)
            async with session.get(f"{url}/api/stats") as r:
                stats = await r.json()
            async with session.get(f"{url}/metrics") as r:
                metrics = await r.text()
            reader.cancel()

    assert not [e for e in events if e.type == "error"]
    updated = next(e for e in events if e.type == "session.updated")
    assert updated.session.audio.input.transcription.model == "gpt-4o-mini-transcribe"
    starts = {e.item_id: e.audio_start_ms / 1000 for e in events
              if e.type == "input_audio_buffer.speech_started"}
    ends = {e.item_id: e.audio_end_ms / 1000 for e in events
            if e.type == "input_audio_buffer.speech_stopped"}
    completed = [e for e in events if e.type == "conversation.item.input_audio_transcription.completed"]
    assert ends and [e.item_id for e in completed] == list(ends)
    placed, total = set(), 0
    for e in completed:
        start, end = starts[e.item_id], ends[e.item_id]
        expected = [w for i, w in enumerate(offline.user)
                    if i not in placed and start <= w.start < end + GRACE_S]
        placed |= {i for i, w in enumerate(offline.user) if start <= w.start < end + GRACE_S}
        assert e.transcript == " ".join(w.text for w in expected)
        deltas = "".join(d.delta for d in events if d.type.endswith("transcription.delta")
                         and d.item_id == e.item_id)
        assert deltas == e.transcript and e.usage.seconds == pytest.approx(end - start, abs=1e-3)
        total += len(expected)
    assert total >= 3, "the speech should hold words, or the comparison proves little"

    assert stats["engine"]["transcriber"]["checkpoint"] == "tiny-random-stt"
    assert stats["engine"]["user_words"] >= total
    assert stats["engine"]["transcriber_step_ms_p50"] > 0
    (conv,) = stats["conversations"]
    assert conv["user_words"] >= total
    words_metric = next(line for line in metrics.splitlines()
                        if line.startswith("duplex_user_words_total "))
    assert float(words_metric.split()[1]) >= total
    assert 'duplex_tick_stage_seconds_count{stage="transcriber"}' in metrics


async def test_realtime_semantic_vad_ends_speech_where_the_pause_heads_say(stt_agent, tmp_path):
    """semantic_vad with pause heads: a pause inside the user's utterance is no turn end; the
    user's speech stops where the smoothed pause probability rises above 0.6, at the end of the
    speech webrtcvad heard. Real espeak speech through the session's VAD; the pause
    probabilities are the input here (the tiny transcriber's are random)."""
    import json as json_module

    from duplex_agent.agent.api import AudioOut
    from duplex_agent.streams.metrics import Metrics
    from duplex_agent.streams.realtime.session import RealtimeEndpoint, RealtimeSession
    from duplex_agent.streams.security import ConversationTracker, Policy
    from tests.helpers import espeak
    first = espeak("Hello there.", "en-us", tmp_path / "a.wav", SAMPLE_RATE)
    second = espeak("How are you today?", "en-us", tmp_path / "b.wav", SAMPLE_RATE)
    gap, tail = np.zeros(int(0.8 * SAMPLE_RATE), np.float32), np.zeros(SAMPLE_RATE, np.float32)
    pcm = np.concatenate([first, gap, second, tail])
    pcm = np.pad(pcm, (0, -len(pcm) % FRAME_SIZE))
    speech_end = (len(first) + len(gap) + len(second)) / SAMPLE_RATE  # espeak's own tail included
    turn_end = int(speech_end * FRAME_RATE) + 2  # the heads call the turn's end after it

    policy, metrics = Policy(), Metrics()
    endpoint = RealtimeEndpoint(stt_agent, policy, ConversationTracker(stt_agent, policy, metrics),
                                metrics)
    sent = []

    async def send(event):
        sent.append(event)

    async def close():
        pass
    session = RealtimeSession(endpoint, "test", stt_agent.sampling_defaults, send, close)
    await session.handle(json_module.dumps({"type": "session.update", "session": {
        "audio": {"input": {"turn_detection": {"type": "semantic_vad", "eagerness": "high"}}}}}))
    for k in range(len(pcm) // FRAME_SIZE):
        await session._detect_speech(pcm[k * FRAME_SIZE:(k + 1) * FRAME_SIZE], SAMPLE_RATE,
                                     k / FRAME_RATE)
        await session._on_audio(AudioOut(np.zeros(FRAME_SIZE, np.float32), k, 0.0,
                                         pause=0.9 if k >= turn_end else 0.1))
    started = [e for e in sent if e["type"] == "input_audio_buffer.speech_started"]
    stopped = [e for e in sent if e["type"] == "input_audio_buffer.speech_stopped"]
    # One turn, not two; stopped by the pause heads (the 1 s of silence after the speech is less
    # than eagerness high's 2 s), at the end of the second sentence as webrtcvad heard it.
    assert len(started) == len(stopped) == 1, [e["type"] for e in sent]
    second_start = (len(first) + len(gap)) / SAMPLE_RATE
    assert second_start < stopped[0]["audio_end_ms"] / 1000 <= speech_end
    assert [e["type"] for e in sent if e["type"] == "error"] == []
