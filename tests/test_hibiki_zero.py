"""Hibiki-Zero (speech translation) against moshi 0.2.13 driven as kyutai-labs/hibiki-zero drives
it, on a tiny random checkpoint in its layout written by moshi (`model_type` "hibiki", GQA with
kv_repeat 2, 16 generated + 16 source codebooks, delays of 2, depformer weight sets, LayerNorms):
file mode, a live batch of translations joining and leaving, capacity, and a live translation
over Moshi's websocket protocol."""
from __future__ import annotations

import asyncio
import json
import math
import random

import numpy as np
import pytest
import torch
from moshi.models import loaders
from moshi.models.lm import LMGen as RefLMGen
from moshi.run_inference import get_condition_tensors

from duplex_agent.agent.config import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE, LMConfig, SamplingConfig
from duplex_agent.agent.engine import Engine, bytes_per_conversation, kv_bytes_per_step
from duplex_agent.agent.offline import translate
from duplex_agent.agent.text import PieceTable, TextDecoder
from duplex_agent.checkpoints.loader import load_checkpoint
from duplex_agent.checkpoints.registry import lookup
from duplex_agent.checkpoints.tiny_random import (build_tiny_mimi, synthetic_audio,
                                                  write_hibiki_zero_checkpoint_dir)

GREEDY = SamplingConfig(greedy=True)
EOS = 2
SLOTS = 3


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    return write_hibiki_zero_checkpoint_dir(tmp_path_factory.mktemp("hibiki-zero"))


@pytest.fixture(scope="module")
def bundle(checkpoint_dir):
    return load_checkpoint(str(checkpoint_dir), "cpu")


def fresh_engine(bundle, slots=SLOTS) -> Engine:
    """An engine with its own codec (the engine owns the Mimi streaming state)."""
    return Engine(type(bundle)(**{**bundle.__dict__, "mimi": build_tiny_mimi(n_q=16)}), slots)


def source_speech(seed: int, seconds: float) -> np.ndarray:
    return synthetic_audio(int(seconds * SAMPLE_RATE), seed=seed).numpy()


def to_frames(pcm: np.ndarray) -> list[np.ndarray]:
    """80 ms frames, the last one zero-padded."""
    padded = np.zeros(-(-len(pcm) // FRAME_SIZE) * FRAME_SIZE, np.float32)
    padded[:len(pcm)] = pcm
    return list(padded.reshape(-1, FRAME_SIZE))


def reference_translation(checkpoint_dir, pcm: np.ndarray, gen_frames: int):
    """moshi's LMGen and Mimi as hibiki_zero's `generate` drives them, greedy, batch 1: the
    recording zero-padded to `gen_frames` frames and encoded at once; the end-of-input marker
    (the codebook size on every source codebook) at frame ceil(seconds x 12.5); max_delay frames
    of encoded silence stepped first; one step per frame. The output is cut at the first EOS
    from the marker's frame on: an EOS before it is ignored, as moshi's hibiki loop in
    run_inference.py ignores it and as its loader means it to be (the model reads it back as
    PAD and goes on); `generate` would cut there too, having no early EOS to skip in practice.
    Returns the text ids and the audio before the end, and the marker's frame."""
    config = json.loads((checkpoint_dir / "config.json").read_text())
    names = ("moshi_name", "mimi_name", "mimi_config_name", "tokenizer_name", "model_type",
             "lm_gen_config")
    info = loaders.CheckpointInfo(
        checkpoint_dir / config["moshi_name"], checkpoint_dir / config["mimi_name"],
        checkpoint_dir / config["tokenizer_name"],
        lm_config={k: v for k, v in config.items() if k not in names},
        mimi_config=json.loads((checkpoint_dir / config["mimi_config_name"]).read_text()),
        model_type=config["model_type"], lm_gen_config=config["lm_gen_config"])
    assert info.model_type == "hibiki"
    mimi = info.get_mimi()
    lm = info.get_moshi(device="cpu", dtype=torch.float32)
    lm_gen = RefLMGen(lm, cfg_coef=1, use_sampling=False, **info.lm_gen_config,
                      condition_tensors=get_condition_tensors("hibiki", lm, 1, 1))
    duration = len(pcm) / mimi.sample_rate
    wav = torch.zeros(1, 1, gen_frames * FRAME_SIZE)
    wav[0, 0, :len(pcm)] = torch.from_numpy(pcm)
    text, audio = [], []
    with torch.no_grad():
        codes = mimi.encode(wav)
        marker = min(math.ceil(duration * mimi.frame_rate), codes.shape[-1] - 1)
        codes[:, :, marker] = mimi.cardinality
        warmup = mimi.encode(torch.zeros(1, 1, FRAME_SIZE * lm_gen.max_delay))
        with lm_gen.streaming(1):
            for t in range(warmup.shape[-1]):
                lm_gen.step(warmup[:, :, t:t + 1])
            for t in range(codes.shape[-1]):
                tokens = lm_gen.step(codes[:, :, t:t + 1])
                text.append(int(tokens[0, 0, 0]))
                audio.append(tokens[:, 1:])
        end = text.index(EOS, marker)
        pcm_out = mimi.decode(torch.cat(audio, dim=-1))[0, 0, :end * FRAME_SIZE].numpy()
    return text[:end], pcm_out, marker


def assert_audio_close(ours: np.ndarray, ref: np.ndarray) -> None:
    # Our codec decodes frame by frame, the reference all at once: equal up to float rounding.
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


def test_checkpoint_layout_and_names(bundle):
    assert lookup("hibiki-zero").repo == "kyutai/hibiki-zero-3b-pytorch-bf16"
    assert bundle.translates and bundle.config == LMConfig.tiny_hibiki_zero()
    assert bundle.mimi.num_codebooks == 16
    # moshi's loader for model_type "hibiki": an early EOS is read back as PAD.
    emb = bundle.model.text_emb.weight
    assert torch.equal(emb[EOS], emb[3]) and not torch.equal(emb[1], emb[3])
    builtin = load_checkpoint("tiny-random-hibiki-zero", "cpu")
    assert builtin.translates and torch.equal(builtin.model.text_emb.weight, emb)


def test_real_shape_has_moshis_keys_and_shapes():
    """Hibiki-Zero's real shape on the meta device, from a config.json without
    depformer_dim_feedforward (moshi then takes hidden_scale x the depformer's width): our
    on-disk tensors are exactly those of moshi's LMModel, 3.13 G parameters."""
    from moshi.models.lm import LMModel

    from duplex_agent.agent.model import MoshiLM
    from duplex_agent.checkpoints.kyutai_format import moshi_to_disk
    raw = LMConfig.hibiki_zero().to_moshi_lm_kwargs()
    del raw["depformer_dim_feedforward"]
    cfg = LMConfig.from_moshi_json(raw)
    assert cfg == LMConfig.hibiki_zero()
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in MoshiLM(cfg).state_dict().items()}
        ref = LMModel(device="meta", dtype=torch.bfloat16, **raw)
    assert ours == {k: tuple(v.shape) for k, v in moshi_to_disk(ref.state_dict()).items()}
    assert round(sum(torch.Size(s).numel() for s in ours.values()) / 1e9, 2) == 3.13


def test_file_mode_equals_reference(bundle, checkpoint_dir):
    pcm = source_speech(seed=3, seconds=1.53)
    ref_text, ref_audio, marker = reference_translation(checkpoint_dir, pcm, gen_frames=40)
    assert marker == 20 and len(ref_text) > marker  # the translation outlasts its source
    audio, transcript = translate(fresh_engine(bundle, 1), pcm, GREEDY)
    assert_audio_close(audio, ref_audio)
    decoder = TextDecoder(PieceTable(bundle.tokenizer, {0, 3}))
    expected = [(t, piece) for t, i in enumerate(ref_text) if (piece := decoder.feed(i))]
    assert [(round(p["start"] * FRAME_RATE), p["text"]) for p in transcript.pieces] == expected
    assert len(expected) > 10
    # The same text as `generate` decodes: ids above PAD, through the tokenizer.
    assert transcript.text == bundle.tokenizer.decode([i for i in ref_text if i > 3]).strip()


def test_file_command_translates_a_recording(tmp_path):
    """`run_agent.py file` with a translation checkpoint: the output runs to the EOS, past the
    input's end, and the transcript is the translation's text."""
    import soundfile

    from duplex_agent.cli import main
    pcm = source_speech(seed=5, seconds=1.0)
    soundfile.write(tmp_path / "in.wav", pcm, SAMPLE_RATE)
    assert main(["file", str(tmp_path / "in.wav"), str(tmp_path / "out.wav"), "--transcript",
                 str(tmp_path / "out.json"), "--checkpoint", "tiny-random-hibiki-zero",
                 "--greedy", "--device", "cpu"]) == 0
    audio, rate = soundfile.read(tmp_path / "out.wav", dtype="float32")
    # 13 source frames (the last one partial), the marker's, then the model's 2-frame lag.
    assert rate == SAMPLE_RATE and len(audio) == (13 + 2) * FRAME_SIZE
    transcript = json.loads((tmp_path / "out.json").read_text())
    assert transcript["text"] and transcript["pieces"][-1]["end"] <= 15 / FRAME_RATE


def run_translation(engine: Engine, row: int, frames: list[np.ndarray], skip=lambda: False,
                    others=lambda: None) -> list:
    """A translation of `frames` in `row`: its frames, then end of input and silence until the
    model's EOS. `skip()` True leaves the row out of a tick; `others()` gives the other rows'
    frames of each tick. Returns the row's FrameOuts before the end."""
    outs, i, silence = [], 0, np.zeros(FRAME_SIZE, np.float32)
    while True:
        ticked = dict(others() or {})
        mine = not skip()
        if mine:
            if i == len(frames):
                engine.end_input(row)
            ticked[row] = frames[i] if i < len(frames) else silence
        if not ticked:
            continue
        results = engine.tick(ticked)
        if mine:
            i += 1
            if results[row].end:
                return outs
            outs.append(results[row])
        assert len(outs) < 200


def test_live_batch_rows_are_bit_identical_and_equal_reference(bundle, checkpoint_dir):
    """One translation alone, and again while other translations join (their silence warm-up
    steps run as it goes on), end their input, finish or leave, and while it skips ticks."""
    pcm = source_speech(seed=8, seconds=1.2)
    frames = to_frames(pcm)
    ref_text, ref_audio, marker = reference_translation(checkpoint_dir, pcm, gen_frames=35)
    assert EOS in ref_text[:marker]  # this source makes the model say EOS early: read as PAD
    engine = fresh_engine(bundle)
    alone = run_translation(engine, engine.open(GREEDY), frames)
    assert [o.text_id for o in alone] == ref_text
    assert_audio_close(np.concatenate([o.pcm for o in alone]), ref_audio)

    engine = fresh_engine(bundle)
    rng = random.Random(5)
    me = engine.open(GREEDY)
    others: dict[int, list] = {}  # row -> frames left (None: input ended)
    events = {"joined": 0, "finished": 0, "left": 0}

    def others_frames():
        if len(others) < SLOTS - 1 and rng.random() < 0.3:
            speech = source_speech(rng.randrange(100, 200), rng.uniform(0.1, 0.5))
            others[engine.open(GREEDY if rng.random() < 0.5 else
                               SamplingConfig(seed=rng.randrange(1 << 30)))] = to_frames(speech)
            events["joined"] += 1
        for row in list(others):
            if rng.random() < 0.02:
                engine.close(row)
                del others[row]
                events["left"] += 1
        ticked = {}
        for row, left in others.items():
            if rng.random() < 0.8:
                if left == []:
                    engine.end_input(row)
                    others[row] = None
                ticked[row] = left.pop(0) if left else np.zeros(FRAME_SIZE, np.float32)
        return ticked

    def skip_me():
        return rng.random() < 0.25

    original_tick = engine.tick

    def tick_and_retire(frames, owners=None):
        results = original_tick(frames, owners)
        for row, out in results.items():
            if row in others and out.end:
                engine.close(row)
                del others[row]
                events["finished"] += 1
        return results

    engine.tick = tick_and_retire
    batched = run_translation(engine, me, frames, skip_me, others_frames)
    assert events["joined"] >= 3 and events["finished"] >= 1, events
    assert len(batched) == len(alone)
    for a, b in zip(alone, batched):
        assert (a.step, a.text_id) == (b.step, b.text_id), f"frame {a.step}"
        assert np.array_equal(a.pcm, b.pcm), f"audio differs at frame {a.step}"


def test_capacity_counts_the_halved_kv(bundle):
    """Hibiki-Zero caches 8 of its 16 heads: half the temporal KV bytes of the same model
    without grouping, and what the capacity functions count is what the engine allocates."""
    import dataclasses
    hz = LMConfig.hibiki_zero()
    ungrouped = dataclasses.replace(hz, kv_repeat=1)
    assert 2 * kv_bytes_per_step(hz, torch.bfloat16) == kv_bytes_per_step(ungrouped, torch.bfloat16)
    assert kv_bytes_per_step(hz, torch.bfloat16) * hz.context == 28 * 2 * 8 * 128 * 3000 * 2
    engine = fresh_engine(bundle, 2)
    model, cfg = engine.lm.model, bundle.config
    allocated = sum(c.k.numel() + c.v.numel() for c in [*model.caches, *model.dep_caches])
    assert model.caches[0].k.shape == (2, cfg.num_heads // 2, cfg.context, cfg.head_dim)
    from duplex_agent.agent.engine import PER_SLOT_OVERHEAD_BYTES
    per_slot = bytes_per_conversation(cfg, torch.float32) - PER_SLOT_OVERHEAD_BYTES
    assert allocated * 4 == 2 * per_slot


def test_kernel_self_check_runs_the_grouped_shapes(bundle):
    """The load-time check of the decode-attention kernel runs the engine's own GQA shapes (in
    Triton's interpreter here) and passes."""
    import os

    from duplex_agent.kernels import selfcheck
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and the Triton interpreter is not enabled")
    engine = fresh_engine(bundle, 2)
    [shapes] = engine.kernel_shapes()
    [check] = selfcheck.check_kernels(shapes, torch.device("cpu"), ("decode_attention",))
    assert check.ok, check.problem
    assert check.cases[0].startswith("temporal B=2 H=4 KV heads=2 C=50 D=16")


async def test_live_translation_over_each_transport(session, tmp_path, monkeypatch):
    """Speech in, then the transport's end of input: the translation comes back, and the server
    ends the conversation once the model said EOS. Moshi's /api/chat (the control message
    endTurn), the Realtime API (input_audio_buffer.commit), and WebRTC (the events data
    channel's end_of_input)."""
    import base64

    import aiohttp

    from duplex_agent.agent.api import Agent
    from tests.helpers import serving
    from tests.moshi_client import Client

    import aioice.ice
    # aioice leaves 127.0.0.1 out of its host candidates; this machine may have nothing else.
    monkeypatch.setattr(aioice.ice, "get_host_addresses",
                        lambda use_ipv4=True, use_ipv6=False: ["127.0.0.1"])
    agent = await asyncio.to_thread(Agent.load, "tiny-random-hibiki-zero", device="cpu",
                                    max_conversations=2)
    speech = source_speech(seed=12, seconds=1.2)
    try:
        async with serving(agent, static_dir=tmp_path) as url:
            client = await Client.connect(session, url)
            await client.send_audio(speech, pace=False)
            await client.ws.send_bytes(b"\x03\x01")
            await client.wait_closed(timeout=15)
            assert not client.errors and client.text
            # The source (15 frames), then the model's lag until EOS: about 2 frames more.
            assert len(speech) + FRAME_SIZE <= client.samples <= len(speech) + 6 * FRAME_SIZE

            events = []
            async with session.ws_connect(url.replace("http", "ws") + "/v1/realtime") as ws:
                pcm16 = (np.clip(speech, -1, 1) * 32767).astype(np.int16).tobytes()
                await ws.send_json({"type": "input_audio_buffer.append",
                                    "audio": base64.b64encode(pcm16).decode()})
                await ws.send_json({"type": "input_audio_buffer.commit"})
                async with asyncio.timeout(15):
                    async for msg in ws:
                        if msg.type == aiohttp.WSMsgType.TEXT:
                            events.append(json.loads(msg.data))
            kinds = [e["type"] for e in events]
            assert "input_audio_buffer.committed" in kinds and "error" not in kinds, kinds
            assert "response.output_audio.delta" in kinds
            assert [e["response"]["status"] for e in events if e["type"] == "response.done"][-1] == \
                "completed"
            assert agent.active == 0

            # WebRTC: a Python peer stands in for the page; {"type": "end_of_input"} on its data
            # channel, {"type": "end"} back once the translation is complete, then the hang-up.
            from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
            from aiortc.mediastreams import AudioStreamTrack
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            pc.addTrack(AudioStreamTrack())  # silence at real-time rate
            messages = []
            channel = pc.createDataChannel("events")
            channel.on("message", lambda m: messages.append(json.loads(m)["type"]))
            await pc.setLocalDescription(await pc.createOffer())
            async with session.post(f"{url}/offer", json={"sdp": pc.localDescription.sdp,
                                                          "type": "offer"}) as r:
                answer = await r.json()
            assert answer["translates"] is True
            await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
            try:
                async with asyncio.timeout(15):
                    while "stats" not in messages:  # the channel is open and the call live
                        await asyncio.sleep(0.05)
                    channel.send(json.dumps({"type": "end_of_input"}))
                    while agent.active or pc.connectionState != "closed":
                        await asyncio.sleep(0.05)
                assert "end" in messages and "error" not in messages, messages
            finally:
                await pc.close()
    finally:
        agent.close()
