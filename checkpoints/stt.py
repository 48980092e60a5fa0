"""Kyutai's streaming speech-to-text models ("delayed streams modeling") as the engine's transcriber.

A Kyutai STT checkpoint is the dialogue model's temporal transformer with no depformer (`dep_q` 0):
it listens to 32 Mimi codebooks of the user's audio and writes a text stream, greedily. Its
`config.json` is in the moshi library's format with `model_type: stt` and
`stt_config: {audio_silence_prefix_seconds, audio_delay_seconds}`; `kyutai/stt-1b-en_fr-candle`
adds 4 pause-prediction heads (`extra_heads_num_heads`, `extra_heads_dim`). This module reads and
checks such a checkpoint's description, builds the built-in `tiny-random-stt`, and gives the
shapes `bench` uses; `checkpoints/loader.py` fetches the files (`load_transcriber`).

Its Mimi is the dialogue model's (`mimi-pytorch-e351c8d8@125` = `tokenizer-e351c8d8-checkpoint125`):
when the weights are equal, the transcriber's Mimi takes the dialogue Mimi's tensors (no second
copy in memory) and, if the transcriber has no silence prefix, the engine encodes the user's audio
once (see agent/transcriber.py).
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from duplex_agent.agent.config import FRAME_RATE, LMConfig
from duplex_agent.agent.model import MoshiLM

STT_CODEBOOKS = 32
# The pause heads (Kyutai's semantic VAD): head i's softmax element 0 is the probability of no
# voice activity over the next 0.5 / 1 / 2 / 3 s. Kyutai's script and Unmute read head 2.
PAUSE_HEAD = 2


@dataclass
class TranscriberBundle:
    """Everything the engine needs from a transcriber checkpoint."""
    name: str
    config: LMConfig  # dep_q 0, n_q 32
    model: MoshiLM
    mimi: torch.nn.Module  # moshi.models.compression.MimiModel, set to `config.n_q` codebooks
    tokenizer: object  # sentencepiece.SentencePieceProcessor
    prefix_s: float  # stt_config.audio_silence_prefix_seconds
    delay_s: float  # stt_config.audio_delay_seconds
    builtin: bool = False
    same_mimi: bool = False  # its Mimi's weights are the dialogue Mimi's (tensors shared)

    @property
    def prefix_frames(self) -> int:
        """Silence frames before the audio, as Kyutai's script counts them (ceil)."""
        return math.ceil(self.prefix_s * FRAME_RATE)

    @property
    def delay_frames(self) -> int:
        """Silence frames that flush the last words at the end of the audio (ceil of the delay)."""
        return math.ceil(self.delay_s * FRAME_RATE)

    @property
    def pause_heads(self) -> bool:
        return self.config.extra_heads_num_heads > PAUSE_HEAD


def stt_config_from_json(raw: dict) -> tuple[LMConfig, float, float, dict]:
    """A Kyutai STT `config.json` -> (LMConfig, prefix seconds, delay seconds, file names
    {"model", "mimi", "mimi_config", "tokenizer"}). Raises ValueError naming what is wrong."""
    raw = dict(raw)
    model_type = raw.pop("model_type", None)
    if model_type != "stt":
        raise ValueError(f"config.json has model_type {model_type!r}: a transcriber is a Kyutai "
                         "speech-to-text checkpoint (model_type 'stt')")
    stt = raw.pop("stt_config", None) or {}
    files = {"model": raw.pop("moshi_name", "model.safetensors"),
             "mimi": raw.pop("mimi_name", None), "mimi_config": raw.pop("mimi_config_name", None),
             "tokenizer": raw.pop("tokenizer_name", None)}
    if files["mimi"] is None or files["tokenizer"] is None:
        raise ValueError("config.json names no Mimi (mimi_name) or no text tokenizer "
                         "(tokenizer_name)")
    for key in ("lm_gen_config", "model_id", "tts_config", "lora", "lora_name"):
        if key in ("lora", "lora_name") and raw.get(key):
            raise ValueError("a LoRA transcriber is not supported")
        raw.pop(key, None)
    cfg = LMConfig.from_moshi_json(raw)
    if cfg.dep_q != 0:
        raise ValueError(f"dep_q={cfg.dep_q}: this model generates audio (a depformer); a "
                         "transcriber only listens (dep_q 0)")
    if cfg.n_q < 1:
        raise ValueError("n_q=0: the model hears no audio")
    prefix = float(stt.get("audio_silence_prefix_seconds", 0.0))
    delay = float(stt.get("audio_delay_seconds", 0.0))
    if not (0.0 <= prefix <= 30.0 and 0.0 <= delay <= 30.0):
        raise ValueError(f"stt_config: prefix {prefix} s and delay {delay} s must be in [0, 30]")
    return cfg, prefix, delay, files


def check_mimi(cfg: LMConfig, mimi) -> None:
    """The Mimi must give the codebooks the model hears, with the model's number of bins."""
    have = mimi.quantizer.total_codebooks
    if cfg.n_q > have:
        raise ValueError(f"the model hears {cfg.n_q} Mimi codebooks; its Mimi has {have}")
    bins = mimi.quantizer.cardinality
    if bins != cfg.card:
        raise ValueError(f"the model's audio vocabulary is {cfg.card}; its Mimi's codebooks have "
                         f"{bins} bins")


def share_mimi_weights(mimi, dialogue_mimi) -> bool:
    """If every tensor of the dialogue's Mimi is in `mimi` with the same value (the dialogue Mimi
    may hold fewer codebooks), make `mimi` use the dialogue's tensors and return True."""
    if dialogue_mimi is None:
        return False
    ours, theirs = mimi.state_dict(), dialogue_mimi.state_dict()
    for key, value in theirs.items():
        mine = ours.get(key)
        if mine is None or mine.shape != value.shape or not torch.equal(
                mine.to(value.device, value.dtype), value):
            return False
    mimi.load_state_dict(theirs, strict=False, assign=True)
    return True


# -- shapes of the published models (bench builds them with random weights) -----------------------

def _stt_shape(dim, heads, layers, hidden_scale, context, text_card, extra_heads) -> LMConfig:
    return LMConfig(dim=dim, num_heads=heads, num_layers=layers, hidden_scale=hidden_scale,
                    context=context, max_period=100_000.0, text_card=text_card, card=2048,
                    n_q=STT_CODEBOOKS, dep_q=0, delays=(0,) * (STT_CODEBOOKS + 1),
                    extra_heads_num_heads=extra_heads)


# name -> (LMConfig, prefix s, delay s). stt-2.6b-en is its config.json; stt-1b-en_fr's is from
# Kyutai's server config (configs/config-stt-en_fr-hf.toml in delayed-streams-modeling), with the
# FFN width of its sibling's config.json.
STT_SHAPES = {
    "stt-1b-en_fr": (_stt_shape(2048, 16, 16, 4.125, 750, 8000, 0), 0.0, 0.5),
    "stt-1b-en_fr-candle": (_stt_shape(2048, 16, 16, 4.125, 750, 8000, 4), 0.0, 0.5),
    "stt-2.6b-en": (_stt_shape(2048, 32, 48, 4.125, 375, 4000, 0), 1.0, 2.5),
}


def random_stt(name: str, device, dtype, mimi) -> TranscriberBundle:
    """A published model's shape (STT_SHAPES) with random weights, made on the meta device and
    allocated once on `device`; `mimi` is shared with the dialogue. For bench: no download."""
    cfg, prefix, delay = STT_SHAPES[name]
    with torch.device("meta"):
        model = MoshiLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    from duplex_agent.checkpoints.tiny_random import build_tiny_tokenizer
    mimi = mimi_sharing_weights(mimi)
    mimi.set_num_codebooks(cfg.n_q)
    return TranscriberBundle(f"{name} (random init)", cfg, model.eval(), mimi,
                             build_tiny_tokenizer(), prefix, delay, builtin=True, same_mimi=True)


def mimi_sharing_weights(mimi):
    """A second Mimi module (its own streaming state) over the same weight tensors."""
    import copy
    shared = {id(t): t for t in mimi.state_dict(keep_vars=True).values()}
    return copy.deepcopy(mimi, shared)


# -- tiny-random-stt -------------------------------------------------------------------------------

TINY_STT_SEED = 0
TINY_STT_PREFIX_S = 1.0
TINY_STT_DELAY_S = 0.5


def tiny_stt_config() -> LMConfig:
    """tiny-random's widths over Kyutai STT's layout: 32 codebooks in, no depformer, every delay
    0, 4 pause heads; a context of 32 steps (2.6 s), so that tests wrap its ring."""
    tiny = LMConfig.tiny()
    return replace(tiny, context=32, n_q=STT_CODEBOOKS, dep_q=0,
                   delays=(0,) * (STT_CODEBOOKS + 1), extra_heads_num_heads=4)


# Text-head rows scaled so that the random model writes like an STT: pads about a third of the
# steps, an end-of-padding token every five steps or so (each opens a "word"), rarely BOS/EOS.
# Moshi's plain init argmaxes over 256 near-equal rows and never pads, which would leave no words.
_TINY_TEXT_ROW_SCALES = {3: 4.0, 0: 6.0, 1: 0.2, 2: 0.2}


def build_tiny_stt_lm_state(seed: int = TINY_STT_SEED) -> dict[str, torch.Tensor]:
    """The moshi library's `LMModel` for `tiny_stt_config()` under `torch.manual_seed(seed)`, fp32,
    in Kyutai's on-disk names, with the text head's special rows scaled (see above)."""
    from moshi.models.loaders import get_moshi_lm

    from duplex_agent.checkpoints.kyutai_format import moshi_to_disk
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = get_moshi_lm(None, lm_kwargs=tiny_stt_config().to_moshi_lm_kwargs(),
                             device="cpu", dtype=torch.float32)
    state = moshi_to_disk({k: v.detach().clone() for k, v in model.state_dict().items()})
    for row, scale in _TINY_TEXT_ROW_SCALES.items():
        state["text_linear.weight"][row] *= scale
    return state


def build_tiny_stt_mimi(seed: int = TINY_STT_SEED):
    """tiny-random's Mimi with 32 codebooks: its 8 codebooks and every other weight unchanged, 24
    more fitted on what they leave (as Mimi's residual VQ is built), so that its first 8 codes are
    exactly tiny-random's and one 32-codebook encode serves both models."""
    from moshi.models.loaders import get_mimi

    from duplex_agent.checkpoints.tiny_random import tiny_mimi_config
    model = get_mimi(None, tiny_mimi_config(STT_CODEBOOKS), device="cpu",
                     num_codebooks=STT_CODEBOOKS)
    model.load_state_dict(_tiny_stt_mimi_state(seed))
    return model


def tiny_stt_mimi_state(seed: int = TINY_STT_SEED) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in _tiny_stt_mimi_state(seed).items()}


@functools.lru_cache(maxsize=2)
def _tiny_stt_mimi_state(seed: int) -> dict[str, torch.Tensor]:
    from moshi.models.loaders import get_mimi

    from duplex_agent.checkpoints import tiny_random
    base = tiny_random.tiny_mimi_state(seed)
    with torch.random.fork_rng(), torch.no_grad(), tiny_random._single_threaded():
        model = get_mimi(None, tiny_random.tiny_mimi_config(STT_CODEBOOKS), device="cpu",
                         num_codebooks=STT_CODEBOOKS)
        missing, unexpected = model.load_state_dict(base, strict=False)
        assert not unexpected and all(".vq.layers." in k for k in missing), (missing, unexpected)
        clip = int(tiny_random._CALIB_SECONDS * tiny_random.SAMPLE_RATE)
        audio = tiny_random.synthetic_audio(tiny_random._CALIB_CLIPS * clip, seed)
        latent = model._encode_to_unquantized_latent(audio.view(tiny_random._CALIB_CLIPS, 1, clip))
        rvq = model.quantizer.rvq_rest
        residual = rvq.input_proj(latent).transpose(1, 2).reshape(-1, rvq.dimension)
        gen = torch.Generator().manual_seed(seed + 1)
        base_levels = tiny_random.tiny_mimi_config()["quantizer"]["n_q"] - 1
        for i, layer in enumerate(rvq.vq.layers):
            book = layer._codebook
            if i >= base_levels:  # a new level: k-means on the residual left so far
                book.embedding_sum.copy_(tiny_random._kmeans(residual, book.codebook_size, gen))
                book.cluster_usage.fill_(1.0)
                book._initialized.fill_(1.0)
                book.register_buffer("_embedding", None, persistent=False)
            residual = residual - book.decode(book.encode(residual))
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def tiny_stt_json(prefix_s: float = TINY_STT_PREFIX_S, delay_s: float = TINY_STT_DELAY_S) -> dict:
    """config.json of tiny-random-stt, as Kyutai lays out an STT repo."""
    return tiny_stt_config().to_moshi_lm_kwargs() | {
        "model_type": "stt", "moshi_name": "model.safetensors", "mimi_name": "mimi.safetensors",
        "mimi_config_name": "mimi_config.json", "tokenizer_name": "tokenizer.model",
        "lm_gen_config": {"temp": 0.0, "temp_text": 0.0},
        "stt_config": {"audio_silence_prefix_seconds": prefix_s, "audio_delay_seconds": delay_s}}


def write_tiny_stt_dir(path: str | Path, seed: int = TINY_STT_SEED, **json_overrides) -> Path:
    """tiny-random-stt laid out like a Kyutai STT repo (config.json, model.safetensors,
    mimi.safetensors + mimi_config.json, tokenizer.model), weights written by the moshi library.
    `json_overrides` replace config.json keys (tests write variants and bad checkpoints)."""
    from safetensors.torch import save_file

    from duplex_agent.checkpoints.tiny_random import tiny_mimi_config, tiny_tokenizer_bytes
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(build_tiny_stt_lm_state(seed), str(path / "model.safetensors"))
    save_file(tiny_stt_mimi_state(seed), str(path / "mimi.safetensors"))
    (path / "mimi_config.json").write_text(json.dumps(tiny_mimi_config(STT_CODEBOOKS), indent=1))
    (path / "tokenizer.model").write_bytes(tiny_tokenizer_bytes())
    (path / "config.json").write_text(json.dumps(tiny_stt_json() | json_overrides, indent=1))
    return path


__all__ = ["PAUSE_HEAD", "STT_CODEBOOKS", "STT_SHAPES", "TranscriberBundle", "build_tiny_stt_lm_state",
           "build_tiny_stt_mimi", "check_mimi", "random_stt", "share_mimi_weights",
           "stt_config_from_json", "tiny_stt_config", "tiny_stt_json",
           "tiny_stt_mimi_state", "write_tiny_stt_dir"]
