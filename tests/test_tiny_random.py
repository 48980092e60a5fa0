"""The built-in tiny-random checkpoint: determinism, a Mimi whose codes and audio carry information,
the tokenizer's special ids, and an on-disk layout the moshi library itself loads."""
import json

import pytest
import torch
from moshi.models.loaders import CheckpointInfo, get_mimi
from safetensors.torch import load_file

from duplex_agent.agent.config import FRAME_SIZE, LMConfig
from duplex_agent.checkpoints import tiny_random
from duplex_agent.checkpoints.kyutai_format import moshi_to_disk

TEST_AUDIO_SEED = 1234  # not the calibration audio of seed 0


def _rms(x: torch.Tensor) -> float:
    return x.pow(2).mean().sqrt().item()


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


def _stream_encode(mimi, audio: torch.Tensor) -> torch.Tensor:
    frames = audio.shape[-1] // FRAME_SIZE
    with torch.no_grad(), mimi.streaming(1):
        codes = [mimi.encode(audio[None, None, i * FRAME_SIZE:(i + 1) * FRAME_SIZE])
                 for i in range(frames)]
    return torch.cat(codes, dim=-1)


def _stream_decode(mimi, codes: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), mimi.streaming(1):
        audio = [mimi.decode(codes[..., t:t + 1]) for t in range(codes.shape[-1])]
    return torch.cat(audio, dim=-1)


@pytest.fixture(scope="module")
def mimi():
    return tiny_random.build_tiny_mimi()


@pytest.fixture(scope="module")
def test_audio():
    return tiny_random.synthetic_audio(3 * 24_000, seed=TEST_AUDIO_SEED)


@pytest.fixture(scope="module")
def codes(mimi, test_audio):
    return _stream_encode(mimi, test_audio)


# -- determinism -----------------------------------------------------------------------------------

def test_mimi_state_is_deterministic_per_seed():
    build = tiny_random._mimi_state_cached.__wrapped__  # bypass the per-process cache
    fresh = build(0)
    _assert_same_state(fresh, tiny_random.tiny_mimi_state(0))
    _assert_same_state(fresh, tiny_random.build_tiny_mimi(0).state_dict())
    assert _differs(fresh, build(1))


def test_lm_state_is_deterministic_per_seed():
    first, second = tiny_random.build_tiny_lm_state(0), tiny_random.build_tiny_lm_state(0)
    _assert_same_state(first, second)
    assert _differs(first, tiny_random.build_tiny_lm_state(1))
    assert all(v.dtype == torch.float32 for v in first.values())


def test_lm_state_uses_on_disk_names():
    state = tiny_random.build_tiny_lm_state()
    assert any(k.endswith("self_attn.in_proj_weight") for k in state)
    assert not any(".in_projs." in k or ".out_projs." in k for k in state)
    cfg = LMConfig.tiny()
    assert state["text_emb.weight"].shape == (cfg.text_card + 1, cfg.dim)
    # The depformer stacks its dep_q per-step projections along dim 0.
    dep_in = state["depformer.layers.0.self_attn.in_proj_weight"]
    assert dep_in.shape == (cfg.dep_q * 3 * cfg.depformer_dim, cfg.depformer_dim)


def test_synthetic_audio_is_deterministic_and_bounded():
    a = tiny_random.synthetic_audio(24_000, seed=5)
    assert torch.equal(a, tiny_random.synthetic_audio(24_000, seed=5))
    assert not torch.equal(a, tiny_random.synthetic_audio(24_000, seed=6))
    assert a.dtype == torch.float32 and a.shape == (24_000,)
    assert a.abs().max() <= 1.0 and 0.03 < _rms(a) < 0.5


# -- tokenizer -------------------------------------------------------------------------------------

def test_tokenizer_is_deterministic():
    assert tiny_random.tiny_tokenizer_bytes.__wrapped__() == tiny_random.tiny_tokenizer_bytes()


def test_tokenizer_vocabulary_and_special_ids():
    sp = tiny_random.build_tiny_tokenizer()
    assert sp.get_piece_size() == LMConfig.tiny().text_card == 256
    assert sp.is_unknown(0) and sp.id_to_piece(0) == "<unk>"
    assert [sp.id_to_piece(i) for i in (1, 2, 3)] == ["<s>", "</s>", "<pad>"]
    assert all(sp.is_control(i) for i in (1, 2, 3))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    text = "Hello, how are you doing today? I really like the garden."
    ids = sp.encode(text)
    assert min(ids) > 3  # ordinary text never produces EPAD (0) or PAD (3)
    assert sp.decode(ids) == text
    assert len(ids) < len(text) / 2  # real multi-character pieces, not just letters


# -- Mimi ------------------------------------------------------------------------------------------

def test_mimi_matches_lm_layout(mimi):
    assert mimi.sample_rate == 24_000 and mimi.frame_rate == 12.5
    assert mimi.frame_size == FRAME_SIZE
    assert mimi.num_codebooks == 8
    assert mimi.cardinality == LMConfig.tiny().card
    cfg = tiny_random.tiny_mimi_config()
    assert json.loads(json.dumps(cfg)) == cfg


def test_mimi_codes_vary(codes):
    assert codes.shape == (1, 8, 37)
    distinct = [len(codes[0, k].unique()) for k in range(8)]
    assert distinct[0] >= 24 and distinct[1] >= 24, distinct
    assert min(distinct) >= 16, distinct


def test_mimi_streaming_matches_offline(mimi, test_audio, codes):
    with torch.no_grad():
        offline = mimi.encode(test_audio[None, None, :codes.shape[-1] * FRAME_SIZE])
    assert torch.equal(offline, codes)


def test_mimi_audio_depends_on_codes(mimi, codes):
    audio = _stream_decode(mimi, codes)
    assert audio.shape == (1, 1, codes.shape[-1] * FRAME_SIZE)
    assert 0.03 < _rms(audio) < 0.5
    for other in (torch.roll(codes, 1, dims=-1), (codes + 1) % mimi.cardinality):
        assert _rms(_stream_decode(mimi, other) - audio) > 0.3 * _rms(audio)
    # Even the last acoustic codebook changes the waveform.
    last_changed = codes.clone()
    last_changed[:, -1] = (last_changed[:, -1] + 5) % mimi.cardinality
    assert _rms(_stream_decode(mimi, last_changed) - audio) > 0.01 * _rms(audio)


# -- on-disk checkpoint ----------------------------------------------------------------------------

def test_write_checkpoint_dir_is_loadable_by_moshi(tmp_path, mimi, test_audio, codes):
    root = tiny_random.write_checkpoint_dir(tmp_path / "tiny")
    config = json.loads((root / "config.json").read_text())
    assert {k: config[k] for k in LMConfig.tiny().to_moshi_lm_kwargs()} == \
        json.loads(json.dumps(LMConfig.tiny().to_moshi_lm_kwargs()))
    assert config["moshi_name"] == "model.safetensors" and config["model_type"] == "moshi"

    lm_state = load_file(root / "model.safetensors")
    _assert_same_state(lm_state, tiny_random.build_tiny_lm_state())

    # The moshi library parses config.json and loads every file (strictly) by itself.
    info = CheckpointInfo.from_hf_repo(
        "local/tiny-random", config_path=root / "config.json",
        moshi_weights=root / config["moshi_name"], mimi_weights=root / config["mimi_name"],
        tokenizer=root / config["tokenizer_name"],
        mimi_config_path=root / config["mimi_config_name"])
    assert info.mimi_config == tiny_random.tiny_mimi_config()
    lm = info.get_moshi(dtype=torch.float32)
    assert moshi_to_disk(lm.state_dict()).keys() == lm_state.keys()
    assert torch.equal(lm.text_emb.weight, lm_state["text_emb.weight"])

    loaded_mimi = get_mimi(root / "mimi.safetensors",
                           json.loads((root / "mimi_config.json").read_text()))
    with torch.no_grad():
        reloaded_codes = loaded_mimi.encode(test_audio[None, None, :codes.shape[-1] * FRAME_SIZE])
    assert torch.equal(reloaded_codes, codes)
    assert info.get_mimi().num_codebooks == 8

    assert info.get_text_tokenizer().serialized_model_proto() == tiny_random.tiny_tokenizer_bytes()
