"""PersonaPlex checkpoints and voices: the 16-step depformer detected from tensor shapes and served
with its 8 agent steps (exactly moshi's logits), tiny-random-personaplex's 18 preset voices, voice
loading from presets and recordings, and the refusals of bad voices and archives."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pyloudnorm
import pytest
import soundfile
import torch
from moshi.models import loaders
from moshi.models.lm import LMModel
from safetensors.torch import save_file

from duplex_agent.agent.config import FRAME_SIZE, SAMPLE_RATE, LMConfig
from duplex_agent.agent.model import MoshiLM
from duplex_agent.checkpoints import personaplex, tiny_random
from duplex_agent.checkpoints.kyutai_format import moshi_to_disk
from duplex_agent.checkpoints.loader import CheckpointError, load_checkpoint
from duplex_agent.checkpoints.bundle import load_voice_prompt
from duplex_agent.checkpoints.personaplex import PRESET_NAMES, PersonaError, extract_voices
from helpers import espeak, needs_espeak

SEED = 7


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """Unpacked archives and the tiny presets go to a fresh cache, not ~/.cache."""
    previous = os.environ.get("DUPLEX_AGENT_CACHE")
    os.environ["DUPLEX_AGENT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if previous is None:
        del os.environ["DUPLEX_AGENT_CACHE"]
    else:
        os.environ["DUPLEX_AGENT_CACHE"] = previous


@pytest.fixture(scope="module")
def reference():
    """moshi's LMModel in PersonaPlex's layout (16 depformer steps, depformer context 8), tiny."""
    torch.manual_seed(SEED)
    return loaders.get_moshi_lm(None, lm_kwargs=tiny_random.tiny_personaplex_lm_kwargs(),
                                dtype=torch.float32, device="cpu").eval()


def _write_dir(path, reference, config_overrides=None, voices=None):
    """tiny-random's directory layout with `reference`'s 16-step LM as model.safetensors. Its
    config.json is moshi's dep_q 8 default unless overridden: the 16 steps are not announced."""
    tiny_random.write_checkpoint_dir(path)
    save_file(moshi_to_disk(reference.state_dict()), str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    assert config["dep_q"] == 8
    (path / "config.json").write_text(json.dumps(config | (config_overrides or {})))
    if voices is not None:
        (path / "voices").mkdir()
        for name, preset in voices.items():
            torch.save(preset, path / "voices" / name)
    return path


@pytest.fixture(scope="module")
def presets():
    return tiny_random.tiny_voice_presets()


@pytest.fixture(scope="module")
def persona_dir(tmp_path_factory, reference, presets):
    return _write_dir(tmp_path_factory.mktemp("personaplex"), reference,
                      voices={n: presets[n] for n in ("NATF0.pt", "VARM4.pt")})


@pytest.fixture(scope="module")
def bundle(persona_dir):
    return load_checkpoint(str(persona_dir), device="cpu")


# -- the checkpoint --------------------------------------------------------------------------------

@pytest.mark.parametrize("says", [None, {"dep_q": 16}])
def test_layout_detected_from_shapes_and_sliced_to_agent_steps(tmp_path, reference, says,
                                                               caplog):
    bundle = load_checkpoint(str(_write_dir(tmp_path, reference, says)), device="cpu")
    assert bundle.config == LMConfig.tiny()  # dep_q 8: the agent's steps
    assert bundle.personas is not None
    # Shapes alone cannot tell PersonaPlex from another two-stream fine-tune: the log says so.
    assert "taken as a persona checkpoint" in caplog.text
    disk = moshi_to_disk(reference.state_dict())
    assert personaplex.depformer_steps(disk) == 16
    ours = bundle.model.state_dict()
    d = LMConfig.tiny().depformer_dim
    for key, value in ours.items():
        if key.endswith("self_attn.in_proj_weight") and key.startswith("depformer."):
            expected = disk[key][:8 * 3 * d]
        elif key.endswith("self_attn.out_proj.weight") and key.startswith("depformer."):
            expected = disk[key][:8 * d]
        else:
            expected = disk[key]
        assert torch.equal(value, expected), key
        # A slice holds only its own rows: the 16-step tensor is not kept alive behind a view.
        assert value.untyped_storage().nbytes() == value.numel() * value.element_size(), key
    dropped = set(disk) - set(ours)
    assert {k.split(".")[0] for k in dropped} == {"depformer_in", "depformer_emb", "linears",
                                                  "depformer"}
    assert "depformer_in.8.weight" in dropped and "depformer_emb.7.weight" in dropped
    assert "depformer_in.7.weight" in ours and "depformer_emb.6.weight" in ours
    assert "depformer.layers.0.gating.8.linear_in.weight" in dropped


def test_an_empty_config_json_means_no_config(tmp_path, reference):
    """PersonaPlex's config.json is empty: read as "moshiko's defaults", not as broken JSON (the
    tiny weights then do not fit the 7B architecture, and the message says so)."""
    root = _write_dir(tmp_path, reference)
    (root / "config.json").write_text("\n")
    with pytest.raises(CheckpointError, match="is missing"):  # Kyutai's default file names
        load_checkpoint(str(root), device="cpu")
    (root / "tokenizer.model").rename(root / "tokenizer_spm_32k_3.model")
    (root / "mimi.safetensors").rename(root / "tokenizer-e351c8d8-checkpoint125.safetensors")
    with pytest.raises(CheckpointError, match="do not match the configured architecture"):
        load_checkpoint(str(root), device="cpu")


def test_agent_steps_give_moshis_depformer_logits(bundle, reference):
    """Steps 0-7 of our sliced depformer against moshi's full 16-step one, same inputs."""
    cfg, model, batch = bundle.config, bundle.model, 3
    gen = torch.Generator().manual_seed(SEED)
    h = torch.randn(batch, cfg.dim, generator=gen)
    prev = torch.cat([torch.randint(0, cfg.text_card, (batch, 1), generator=gen),
                      torch.randint(0, cfg.card, (batch, 7), generator=gen)], dim=1)
    model.setup_caches(batch)
    run = torch.ones(batch, dtype=torch.bool)
    with torch.no_grad(), reference.depformer.streaming(batch):
        for step in range(8):
            ours = model.forward_depformer(step, h, prev[:, step], run)
            ref = reference.forward_depformer(step, prev[:, step].view(batch, 1, 1),
                                              h.view(batch, 1, -1)).view(batch, -1)
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_real_personaplex_shapes_slice_to_moshiko_on_meta():
    """The 7B PersonaPlex layout (moshiko + 16 depformer steps, as its own loader builds it) is
    recognised from shapes alone and sliced to exactly moshiko's tensors."""
    kwargs = dict(loaders._lm_kwargs) | {"dep_q": 16}
    with torch.device("meta"):
        disk = moshi_to_disk(LMModel(device="meta", dtype=torch.bfloat16, **kwargs).state_dict())
        moshiko = MoshiLM(LMConfig.moshiko()).state_dict()
    assert disk["depformer.layers.0.self_attn.in_proj_weight"].shape == (16 * 3 * 1024, 1024)
    assert personaplex.is_personaplex_layout(disk, LMConfig.moshiko())
    state, cfg = personaplex.agent_steps_only(disk, LMConfig.moshiko())
    assert cfg == LMConfig.moshiko()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in moshiko.items()}
    dropped = sum(v.numel() for v in disk.values()) - sum(v.numel() for v in state.values())
    assert dropped == 683_679_744  # 1.37 GB of bf16 weights not loaded
    assert not personaplex.is_personaplex_layout(moshiko, LMConfig.moshiko())


def test_q8_row_scales_are_sliced_with_their_weights():
    """A q8 checkpoint stacks each weight's float32 row scales (`_scb`) like the weight."""
    cfg, d = LMConfig.tiny(), LMConfig.tiny().depformer_dim
    layer = "depformer.layers.0.self_attn."
    state = {f"depformer_in.{i}.weight": torch.zeros(d, cfg.dim, dtype=torch.int8) for i in range(16)}
    state |= {layer + "in_proj_weight": torch.zeros(16 * 3 * d, d, dtype=torch.int8),
              layer + "in_proj_weight_scb": torch.arange(16 * 3 * d, dtype=torch.float32),
              layer + "out_proj.weight": torch.zeros(16 * d, d, dtype=torch.int8),
              layer + "out_proj.weight_scb": torch.arange(16 * d, dtype=torch.float32)}
    sliced, _ = personaplex.agent_steps_only(state, cfg)
    assert torch.equal(sliced[layer + "in_proj_weight_scb"], torch.arange(8 * 3 * d).float())
    assert torch.equal(sliced[layer + "out_proj.weight_scb"], torch.arange(8 * d).float())
    assert sliced[layer + "in_proj_weight"].shape == (8 * 3 * d, d)


def test_registry_knows_personaplex():
    from duplex_agent.checkpoints.registry import lookup
    assert lookup("personaplex").repo == "nvidia/personaplex-7b-v1"
    assert lookup("nvidia/personaplex-7b-v1").personas
    assert lookup("tiny-random-personaplex").personas and not lookup("tiny-random").personas


# -- tiny-random-personaplex -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return load_checkpoint("tiny-random-personaplex", device="cpu")


def test_tiny_random_personaplex_has_the_18_preset_voices(tiny, presets):
    assert tiny.personas.voices() == sorted(PRESET_NAMES) and len(PRESET_NAMES) == 18
    assert {n.removesuffix(".pt") for n in PRESET_NAMES} == (
        {f"NATF{i}" for i in range(4)} | {f"NATM{i}" for i in range(4)}
        | {f"VARF{i}" for i in range(5)} | {f"VARM{i}" for i in range(5)})
    assert tiny.config.dep_q == 8 and tiny.builtin
    assert tiny.model.depformer.layers[0].self_attn.in_proj_weight.shape[0] == 8 * 3 * 64
    for name in ("NATF0.pt", "VARM4.pt"):
        voice = tiny.personas.voice(name)
        assert voice.is_preset and voice.codes is None
        assert torch.equal(voice.embeddings, presets[name]["embeddings"][:, 0, 0])
        assert torch.equal(voice.ring, presets[name]["cache"][0])
        assert voice.num_frames == voice.embeddings.shape[0] + 1
    assert tiny.personas.voice("NATF0") is tiny.personas.voice("NATF0.pt")  # loaded once
    # Seeded: the same presets every time, different voices under different names.
    again = tiny_random.tiny_voice_presets()
    assert all(torch.equal(again[n]["embeddings"], presets[n]["embeddings"]) for n in presets)
    assert not torch.equal(presets["NATF0.pt"]["cache"], presets["NATF1.pt"]["cache"])


def test_tiny_presets_hold_the_reference_prompt_columns(tiny, presets):
    """The user streams of a preset's ring hold the sine filler, its text stream the pad token,
    as the reference's voice-prompt steps leave them."""
    ring = presets["VARF2.pt"]["cache"][0]
    assert ring.dtype == torch.int64 and ring.shape == (17, 4)
    assert (ring[0] == LMConfig.tiny().text_pad_id).all()
    sine = torch.tensor(tiny.personas.sine_codes)
    assert (ring[9:] == sine[:, None]).all()
    assert tiny.personas.silence_codes != tiny.personas.sine_codes


def test_checkpoints_without_personas():
    plain = load_checkpoint("tiny-random", device="cpu")
    assert plain.personas is None
    with pytest.raises(CheckpointError, match="no persona training"):
        load_checkpoint("tiny-random", device="cpu", voice_prompt_dir="/")


def test_real_mimi_fillers_are_the_reference_constants():
    assert personaplex.filler_codes(None, 2048) == (
        (948, 243, 1178, 546, 1736, 1030, 1978, 2008), (430, 1268, 381, 1611, 1095, 1495, 56, 472))


# -- voices: presets, bad files, names -------------------------------------------------------------

def test_directory_voices_and_unknown_names(bundle):
    assert bundle.personas.voices() == ["NATF0.pt", "VARM4.pt"]
    for bad in ("NATM1.pt", "../voices/NATF0.pt", str(bundle.personas.directory / "NATF0.pt"), ""):
        with pytest.raises(PersonaError, match=r"unknown voice .*available voices: NATF0.pt, VARM4"):
            bundle.personas.voice(bad)


def _preset(presets, **changes):
    return presets["NATF0.pt"] | changes


class Smuggled:  # a pickled object inside a "voice": weights_only must refuse it
    pass


@pytest.mark.parametrize("content, message", [
    (lambda p: torch.zeros(3), r"expected a dict with 'embeddings' and 'cache', got Tensor"),
    (lambda p: {"embeddings": p["NATF0.pt"]["embeddings"]}, r"no tensor 'cache'"),
    (lambda p: _preset(p, embeddings=torch.zeros(5, 1, 1, 32)),
     r"embeddings have shape \[5, 1, 1, 32\], expected \[V, 1, 1, 64\]"),
    (lambda p: _preset(p, embeddings=torch.zeros(5, 64)), r"embeddings have shape \[5, 64\]"),
    (lambda p: _preset(p, embeddings=torch.zeros(5, 1, 1, 64, dtype=torch.int64)),
     r"embeddings are torch.int64, expected floats"),
    (lambda p: _preset(p, embeddings=torch.full((5, 1, 1, 64), float("nan"))), r"NaN"),
    (lambda p: _preset(p, cache=torch.zeros(1, 17, 3, dtype=torch.int64)),
     r"cache has shape \[1, 17, 3\], expected \[1, 17, 4\]"),
    (lambda p: _preset(p, cache=torch.zeros(1, 9, 4, dtype=torch.int64)), r"17 streams"),
    (lambda p: _preset(p, cache=torch.zeros(1, 17, 4, dtype=torch.int32)),
     r"cache is torch.int32, expected torch.int64"),
    (lambda p: _preset(p, cache=torch.full((1, 17, 4), 5000, dtype=torch.int64)),
     r"tokens outside the model's vocabularies"),
    (lambda p: _preset(p, embeddings=torch.zeros(60, 1, 1, 64)), r"context of 50"),
    (lambda p: _preset(p, extra=Smuggled()), r"refused, it holds Python objects"),
    (lambda p: b"not a torch file", r"not a readable PersonaPlex voice preset"),
])
def test_bad_presets_are_refused_with_one_clear_error(tmp_path, bundle, presets, content, message):
    path = tmp_path / "bad.pt"
    value = content(presets)
    if isinstance(value, bytes):
        path.write_bytes(value)
    else:
        torch.save(value, path)
    with pytest.raises(PersonaError, match=message) as info:
        load_voice_prompt(path, bundle)
    assert str(info.value).startswith("voice prompt bad.pt: ")


def test_a_good_preset_file_loads(tmp_path, bundle, presets):
    torch.save(presets["NATM2.pt"], tmp_path / "mine.pt")
    voice = load_voice_prompt(tmp_path / "mine.pt", bundle)
    assert voice.name == "mine.pt" and voice.embeddings.shape[1] == 64


# -- voices: recordings ----------------------------------------------------------------------------

def _streaming_codes(mimi, pcm):
    """The reference's encoding: 1920-sample frames, last one zero-padded, one streaming encode
    each from a fresh state."""
    frames = -(-len(pcm) // FRAME_SIZE)
    padded = np.zeros(frames * FRAME_SIZE, dtype=np.float32)
    padded[:len(pcm)] = pcm
    with torch.no_grad(), mimi.streaming(1):
        return torch.stack([mimi.encode(torch.from_numpy(padded[i * FRAME_SIZE:(i + 1) * FRAME_SIZE])
                                        .view(1, 1, -1))[0, :, 0] for i in range(frames)])


@needs_espeak
def test_audio_voice_prompt_is_normalised_and_encoded_like_the_reference(tmp_path, bundle):
    speech = espeak("Hello, I am your assistant. How can I help you today?", "en-us",
                    tmp_path / "scratch.wav", 16_000)
    stereo = np.stack([speech * 0.05, speech * 0.05], axis=1)  # quiet, two channels, 16 kHz
    soundfile.write(tmp_path / "voice.flac", stereo, 16_000)

    # The engine's Mimi mid-conversation: loading a recording must not touch its state.
    engine_mimi = bundle.mimi
    engine_mimi.streaming_forever(2)
    with torch.no_grad():
        engine_mimi.encode(torch.randn(2, 1, FRAME_SIZE) * 0.1)
    before = {k: v.clone() for k, v in _streaming_tensors(engine_mimi).items()}
    try:
        voice = load_voice_prompt(tmp_path / "voice.flac", bundle)
        after = _streaming_tensors(engine_mimi)
    finally:
        engine_mimi._stop_streaming()
    assert before.keys() == after.keys() and before
    assert all(torch.equal(before[k], after[k]) for k in before)

    pcm = personaplex.read_voice_audio(tmp_path / "voice.flac")
    assert abs(pyloudnorm.Meter(SAMPLE_RATE).integrated_loudness(pcm.astype(np.float64))
               - personaplex.VOICE_LOUDNESS_LUFS) < 0.1
    assert abs(len(pcm) - len(speech) * SAMPLE_RATE / 16_000) <= 1
    frames = -(-len(pcm) // FRAME_SIZE)
    assert not voice.is_preset and voice.codes.shape == (frames, 8) and voice.num_frames == frames
    assert voice.codes.dtype == torch.int64
    assert voice.codes.min() >= 0 and voice.codes.max() < bundle.config.card
    assert len(voice.codes.unique()) > 8  # speech, not one code everywhere
    fresh = tiny_random.build_tiny_mimi()
    assert torch.equal(voice.codes, _streaming_codes(fresh, pcm).long())


def _streaming_tensors(module):
    out = {}
    for name, sub in module.named_modules():
        state = getattr(sub, "_streaming_state", None)
        if state is None:
            continue
        for field in dataclasses.fields(state) if dataclasses.is_dataclass(state) else []:
            value = getattr(state, field.name)
            if isinstance(value, torch.Tensor):
                out[f"{name}.{field.name}"] = value
    return out


def test_recordings_in_a_voice_prompt_dir(tmp_path, presets, caplog):
    voices = tmp_path / "voices"
    voices.mkdir()
    audio = tiny_random.synthetic_audio(2 * 44_100, seed=3).numpy()
    soundfile.write(voices / "me.wav", audio, 44_100)
    torch.save(presets["VARF0.pt"], voices / "VARF0.pt")
    (voices / "notes.txt").write_text("not a voice")
    (voices / "._VARF0.pt").write_bytes(b"a macOS resource fork")
    (voices / "broken.wav").write_bytes(b"not audio")
    tiny = load_checkpoint("tiny-random-personaplex", device="cpu", voice_prompt_dir=voices)
    assert "Unusable voice prompt broken.wav: not a readable audio file" in caplog.text
    assert tiny.personas.voices() == ["VARF0.pt", "broken.wav", "me.wav"]
    with pytest.raises(PersonaError, match="broken.wav: not a readable audio file"):
        tiny.personas.voice("broken.wav")  # reported at load, refused when asked for
    voice = tiny.personas.voice("me.wav")
    assert voice.codes.shape == (-(-2 * SAMPLE_RATE // FRAME_SIZE), 8)
    assert tiny.personas.voice("me.wav") is voice
    with pytest.raises(CheckpointError, match="no such directory"):
        load_checkpoint("tiny-random-personaplex", device="cpu", voice_prompt_dir=tmp_path / "nope")


@pytest.mark.parametrize("write, message", [
    (lambda p: p.write_bytes(b"RIFF\x00\x00garbage" * 10),
     r"^voice prompt bad.wav: not a readable audio file \(Format not recognised.\)$"),
    (lambda p: soundfile.write(p, np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE),
     r"the audio is silent"),
    (lambda p: soundfile.write(p, np.full(2400, 0.1, np.float32), SAMPLE_RATE),
     r"0.10 s of audio; a voice prompt needs at least 0.4 s"),
    (lambda p: soundfile.write(p, np.full(5 * 8_000, 0.1, np.float32), 8_000),
     r"5.0 s of audio is longer than the model's context \(4 s\)"),
])
def test_bad_recordings_are_refused(tmp_path, bundle, write, message):
    path = tmp_path / "bad.wav"
    write(path)
    with pytest.raises(PersonaError, match=message):
        load_voice_prompt(path, bundle)


# -- voices.tgz ------------------------------------------------------------------------------------

def _tgz(path, members):
    """members: (name, bytes | None for a folder | "link" for a symlink)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif data == "link":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _pt_bytes(preset):
    buffer = io.BytesIO()
    torch.save(preset, buffer)
    return buffer.getvalue()


def test_voices_tgz_of_a_local_directory_is_unpacked_once(tmp_path, reference, presets):
    root = _write_dir(tmp_path / "ckpt", reference)
    _tgz(root / "voices.tgz", [("voices", None), ("voices/NATM0.pt", _pt_bytes(presets["NATM0.pt"])),
                               ("voices/VARF1.pt", _pt_bytes(presets["VARF1.pt"]))])
    bundle = load_checkpoint(str(root), device="cpu")
    assert bundle.personas.voices() == ["NATM0.pt", "VARF1.pt"]
    folder = bundle.personas.directory
    assert folder.name == "voices" and folder.is_relative_to(personaplex.cache_root())
    assert torch.equal(bundle.personas.voice("VARF1.pt").ring, presets["VARF1.pt"]["cache"][0])
    stamp = (folder / "NATM0.pt").stat().st_mtime_ns
    assert extract_voices(root / "voices.tgz") == folder
    assert (folder / "NATM0.pt").stat().st_mtime_ns == stamp  # not unpacked again


@pytest.mark.parametrize("members, message", [
    ([("voices/../../evil.pt", b"x")], r"member 'voices/../../evil.pt' points outside"),
    ([("/tmp/evil.pt", b"x")], r"points outside"),
    ([("voices/NATF0.pt", "link")], r"is not a regular file"),
])
def test_unsafe_voices_tgz_is_refused(tmp_path, reference, members, message):
    root = _write_dir(tmp_path / "ckpt", reference)
    _tgz(root / "voices.tgz", members)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(str(root), device="cpu")
    assert not (tmp_path / "evil.pt").exists()
    # Nothing half-unpacked is left, nor taken for a finished folder.
    digest = hashlib.sha256((root / "voices.tgz").read_bytes()).hexdigest()[:16]
    assert not (personaplex.cache_root() / "voices" / digest).exists()
    assert not list((personaplex.cache_root() / "voices").glob(".unpack-*"))


def test_hub_voices_come_from_voices_tgz(tmp_path, presets):
    """From the Hub (no local folder), the checkpoint's voices.tgz is fetched like its other
    files and unpacked; a repo without one has no voices of its own."""
    archive = _tgz(tmp_path / "voices.tgz", [("voices/NATF3.pt", _pt_bytes(presets["NATF3.pt"]))])
    asked = []

    def fetch(filename, required=True):
        asked.append((filename, required))
        return archive
    folder = personaplex.checkpoint_voices(None, fetch)
    assert asked == [("voices.tgz", False)]
    assert sorted(p.name for p in folder.iterdir()) == ["NATF3.pt"]
    assert personaplex.checkpoint_voices(None, lambda filename, required=True: None) is None


def test_a_persona_checkpoint_without_voices(tmp_path, reference):
    bundle = load_checkpoint(str(_write_dir(tmp_path, reference)), device="cpu")
    assert bundle.personas.voices() == []
    with pytest.raises(PersonaError, match=r"unknown voice 'NATF0.pt'; available voices: none "
                                           r"\(the checkpoint has no voices/ or voices.tgz; give "
                                           r"--voice-prompt-dir\)"):
        bundle.personas.voice("NATF0.pt")


def test_hub_checkpoint_from_the_local_cache(tmp_path, monkeypatch, reference, presets):
    """`--checkpoint personaplex` is nvidia/personaplex-7b-v1, here read offline from the Hugging
    Face cache: its voices.tgz is fetched like its other files and unpacked."""
    import huggingface_hub.constants
    repo = tmp_path / "hub" / "models--nvidia--personaplex-7b-v1"
    snapshot = _write_dir(repo / "snapshots" / ("0" * 40), reference)
    _tgz(snapshot / "voices.tgz", [("voices/NATM3.pt", _pt_bytes(presets["NATM3.pt"]))])
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    bundle = load_checkpoint("personaplex", device="cpu")
    assert bundle.name == "nvidia/personaplex-7b-v1" and bundle.config.dep_q == 8
    assert bundle.personas.voices() == ["NATM3.pt"]
    assert bundle.personas.directory.is_relative_to(personaplex.cache_root())
    # --voice-prompt-dir replaces the checkpoint's voices.
    (tmp_path / "mine").mkdir()
    torch.save(presets["VARM0.pt"], tmp_path / "mine" / "VARM0.pt")
    bundle = load_checkpoint("personaplex", device="cpu", voice_prompt_dir=tmp_path / "mine")
    assert bundle.personas.voices() == ["VARM0.pt"]


def test_damaged_voices_tgz_is_refused(tmp_path):
    (tmp_path / "voices.tgz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(PersonaError, match="voices.tgz: not a readable tar archive"):
        extract_voices(tmp_path / "voices.tgz")
