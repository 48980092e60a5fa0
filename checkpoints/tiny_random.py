"""The built-in `tiny-random` checkpoint: a seeded, file-free LM + Mimi + text tokenizer.

Everything here is rebuilt from a seed, so tests and demos run without any download:

* LM: a moshi `LMModel` with the `LMConfig.tiny()` architecture, returned in Kyutai's on-disk
  names so it goes through the same loading path as a real `model.safetensors`.
* Mimi: the real Mimi layout (SEANet encoder/decoder, ratios 8-6-5-4, 25 Hz -> 12.5 Hz learnt
  resampling, projected transformers, split RVQ) with tiny widths. Moshi's default init makes a small
  random Mimi emit almost the same code everywhere and decode audio that is mostly bias, which would
  let tests comparing audio miss wrong codes. So the weights are re-initialised: He-initialised,
  bias-free convolutions, codebooks fitted by k-means to latents of deterministic speech-like
  synthetic audio, and a decoder output scaled to a fixed loudness. Codes then vary from frame to
  frame and the decoded audio is a function of the codes.
* Tokenizer: a 256-piece SentencePiece unigram model trained in-process on a generated English
  corpus, with Moshi's special ids (0 unk / end-of-pad, 1 bos, 2 eos, 3 pad).

`write_checkpoint_dir` lays the three out like a Kyutai Hugging Face repo, which the moshi library's
`CheckpointInfo` can read.
"""
from __future__ import annotations

import contextlib
import functools
import io
import itertools
import json
import math
import os
from pathlib import Path

import numpy as np
import sentencepiece
import torch
from moshi.models.compression import MimiModel
from moshi.models.loaders import get_mimi, get_moshi_lm
from safetensors.torch import save_file
from torch import nn

from duplex_agent.agent.config import FRAME_RATE, SAMPLE_RATE, LMConfig
from duplex_agent.checkpoints.kyutai_format import moshi_to_disk

TINY_SEED = 0

# Calibration set for the Mimi re-initialisation: 24 clips x 2 s = 600 latent frames, enough for
# 128-entry codebooks without singleton clusters, and quick to encode.
_CALIB_CLIPS = 24
_CALIB_SECONDS = 2.0
_KMEANS_ITERS = 12
_DECODER_RMS = 0.1  # target loudness of decoded calibration audio
_LOUDNESS_CLIPS = 4
_HARMONICS = 12  # sines per voiced segment of the synthetic audio
_TRANSFORMER_LAYER_SCALE = 0.3  # moshi inits 0.01, which would make the transformers near no-ops


# -- Mimi ------------------------------------------------------------------------------------------

def tiny_mimi_config(n_q: int = 8) -> dict:
    """Moshi-style Mimi config (same structure as `moshi.models.loaders._mimi_config`): 24 kHz,
    12.5 Hz frames of 1920 samples, `n_q` codebooks of `LMConfig.tiny().card` bins, tiny widths."""
    dimension = 32
    seanet = {
        "channels": 1, "dimension": dimension, "causal": True, "n_filters": 4,
        "n_residual_layers": 1, "activation": "ELU", "compress": 2, "dilation_base": 2,
        "disable_norm_outer_blocks": 0, "kernel_size": 7, "residual_kernel_size": 3,
        "last_kernel_size": 3, "norm": "none", "pad_mode": "constant", "ratios": [8, 6, 5, 4],
        "true_skip": True,
    }
    quantizer = {
        "dimension": 16, "n_q": n_q, "bins": LMConfig.tiny().card,
        "input_dimension": dimension, "output_dimension": dimension,
    }
    transformer = {
        "d_model": dimension, "num_heads": 2, "num_layers": 1, "causal": True, "layer_scale": 0.01,
        "context": 250, "conv_layout": True, "max_period": 10000, "gating": "none",
        "norm": "layer_norm", "positional_embedding": "rope", "dim_feedforward": 64,
        "input_dimension": dimension, "output_dimensions": [dimension],
    }
    return {"sample_rate": SAMPLE_RATE, "channels": 1, "frame_rate": FRAME_RATE,
            "seanet": seanet, "quantizer": quantizer, "transformer": transformer}


def synthetic_audio(num_samples: int, seed: int) -> torch.Tensor:
    """Deterministic speech-like mono audio, float32 `[num_samples]` at 24 kHz: a sequence of
    60-400 ms segments of voiced sounds (gliding harmonic tones with two formants), noise bursts,
    chirps and near-silence, each with its own loudness and short fades."""
    rng = np.random.default_rng(seed)
    out = np.zeros(num_samples, dtype=np.float64)
    pos = 0
    while pos < num_samples:
        n = min(int(rng.uniform(0.06, 0.4) * SAMPLE_RATE), num_samples - pos)
        t = np.arange(n) / SAMPLE_RATE
        kind = rng.choice(["voiced", "voiced", "noise", "chirp", "silence"])
        if kind == "voiced":
            f0 = np.linspace(rng.uniform(90, 300), rng.uniform(90, 300), n)
            phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
            f1, f2 = rng.uniform(300, 900), rng.uniform(900, 2500)
            ks = np.arange(1, int(4000 / f0.max()) + 1)
            fk = ks * f0.mean()
            gains = np.exp(-((fk - f1) / 200) ** 2) + 0.6 * np.exp(-((fk - f2) / 300) ** 2) + 0.3 / ks
            # Only the strongest harmonics: they carry the formant shape, and sines are the cost.
            strongest = np.sort(np.argsort(gains)[-_HARMONICS:])
            ks, gains = ks[strongest], gains[strongest]
            offsets = rng.uniform(0, 2 * np.pi, len(ks))
            seg = gains @ np.sin(ks[:, None] * phase[None] + offsets[:, None])
        elif kind == "noise":
            seg = rng.standard_normal(n)
            if rng.random() < 0.5:  # fricative-like: high-passed
                seg = np.diff(seg, prepend=0.0)
        elif kind == "chirp":
            f_start, f_end = rng.uniform(100, 1000), rng.uniform(1000, 6000)
            freq = f_start * (f_end / f_start) ** (t / max(t[-1], 1e-9))
            seg = np.sin(2 * np.pi * np.cumsum(freq) / SAMPLE_RATE)
        else:
            seg = 0.01 * rng.standard_normal(n)
        seg = seg / (np.sqrt(np.mean(seg ** 2)) + 1e-9) * rng.uniform(0.03, 0.3)
        fade = min(n // 2, int(0.005 * SAMPLE_RATE))
        if fade > 0:
            ramp = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, fade))
            seg[:fade] *= ramp
            seg[n - fade:] *= ramp[::-1]
        out[pos:pos + n] = seg
        pos += n
    return torch.from_numpy(np.clip(out, -1.0, 1.0).astype(np.float32))


def build_tiny_mimi(seed: int = TINY_SEED, n_q: int = 8) -> MimiModel:
    """The tiny Mimi for `seed`: eval mode, fp32, CPU, `n_q` codebooks (16 for
    tiny-random-hibiki-zero)."""
    model = get_mimi(None, tiny_mimi_config(n_q), device="cpu", num_codebooks=n_q)
    model.load_state_dict(_mimi_state_cached(seed, n_q))
    return model


def tiny_mimi_state(seed: int = TINY_SEED, n_q: int = 8) -> dict[str, torch.Tensor]:
    """State dict of `build_tiny_mimi(seed, n_q)`, with the key names moshi's
    `get_mimi(filename)` loads."""
    return {k: v.clone() for k, v in _mimi_state_cached(seed, n_q).items()}


@functools.lru_cache(maxsize=4)
def _mimi_state_cached(seed: int, n_q: int = 8) -> dict[str, torch.Tensor]:
    # Leave the caller's global RNG alone, and calibrate single-threaded: the result then doesn't
    # depend on the caller's thread count (reduction order), and these thin convolutions over long
    # signals gain little from a second intra-op thread on an idle CPU but lose seconds to
    # spin-waiting on a busy one.
    with torch.random.fork_rng(), torch.no_grad(), _single_threaded():
        torch.manual_seed(seed)
        model = get_mimi(None, tiny_mimi_config(n_q), device="cpu", num_codebooks=n_q)
        gen = torch.Generator().manual_seed(seed)
        _init_convs(model, gen)
        for transformer in (model.encoder_transformer, model.decoder_transformer):
            for name, param in transformer.named_parameters():
                if name.endswith("layer_scale_1.scale") or name.endswith("layer_scale_2.scale"):
                    param.fill_(_TRANSFORMER_LAYER_SCALE)
        clip = int(_CALIB_SECONDS * SAMPLE_RATE)
        audio = synthetic_audio(_CALIB_CLIPS * clip, seed).view(_CALIB_CLIPS, 1, clip)
        latent = model._encode_to_unquantized_latent(audio)
        _fit_codebooks(model, latent, gen)
        # A few clips are enough to measure loudness; the decoder at 24 kHz dominates build time.
        decoded = model.decode(model.quantizer.encode(latent[:_LOUDNESS_CLIPS]))
        last = model.decoder.model[-1].conv.conv
        last.weight.mul_(_DECODER_RMS / decoded.pow(2).mean().sqrt().item())
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


@contextlib.contextmanager
def _single_threaded():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _init_convs(model: nn.Module, gen: torch.Generator) -> None:
    """He-normal init of every (transposed) convolution, biases zeroed so that the audio out of the
    decoder is driven by its input rather than by constants."""
    gain = math.sqrt(2.0)
    for module in model.modules():
        if isinstance(module, nn.ConvTranspose1d):
            # Each output sample sees in/groups channels x kernel/stride taps.
            in_per_group = module.in_channels // module.groups
            fan_in = in_per_group * module.kernel_size[0] / module.stride[0]
        elif isinstance(module, nn.Conv1d):
            fan_in = module.weight[0].numel()
        else:
            continue
        module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * gain / math.sqrt(fan_in))
        if module.bias is not None:
            module.bias.zero_()


def _fit_codebooks(model: MimiModel, latent: torch.Tensor, gen: torch.Generator) -> None:
    """Fit every RVQ codebook by k-means on the latents (level 0) or on the residuals left by the
    previous levels, as the codebooks of a trained Mimi would be."""
    for rvq in (model.quantizer.rvq_first, model.quantizer.rvq_rest):
        residual = rvq.input_proj(latent).transpose(1, 2).reshape(-1, rvq.dimension)
        for layer in rvq.vq.layers:
            book = layer._codebook
            means = _kmeans(residual, book.codebook_size, gen)
            book.embedding_sum.copy_(means)
            book.cluster_usage.fill_(1.0)
            book._initialized.fill_(1.0)
            book.register_buffer("_embedding", None, persistent=False)  # drop the cached centroids
            residual = residual - book.decode(book.encode(residual))


def _kmeans(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    means = x[torch.randperm(len(x), generator=gen)[:k]].clone()
    for _ in range(_KMEANS_ITERS):
        assign = torch.cdist(x, means).argmin(dim=1)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(means).index_add_(0, assign, x)
        # Empty clusters keep their previous centre.
        means = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], means)
    return means


# -- LM --------------------------------------------------------------------------------------------

def build_tiny_lm_state(seed: int = TINY_SEED) -> dict[str, torch.Tensor]:
    """A moshi `LMModel` with the `LMConfig.tiny()` architecture, moshi's own init under
    `torch.manual_seed(seed)`, fp32, as an on-disk (Kyutai-named) state dict."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = get_moshi_lm(None, lm_kwargs=LMConfig.tiny().to_moshi_lm_kwargs(),
                             device="cpu", dtype=torch.float32)
    return moshi_to_disk({k: v.detach().clone() for k, v in model.state_dict().items()})


# -- tiny-random-personaplex -----------------------------------------------------------------------

def tiny_personaplex_lm_kwargs() -> dict:
    """moshi `LMModel` kwargs of tiny-random-personaplex: tiny-random's architecture with
    PersonaPlex's depformer, 16 steps (8 agent + 8 user codebooks) over a context of 8."""
    return LMConfig.tiny().to_moshi_lm_kwargs() | {"dep_q": 16, "depformer_context": 8}


def build_tiny_personaplex_lm_state(seed: int = TINY_SEED) -> dict[str, torch.Tensor]:
    """Like `build_tiny_lm_state`, with PersonaPlex's 16-step depformer on disk."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = get_moshi_lm(None, lm_kwargs=tiny_personaplex_lm_kwargs(), device="cpu",
                             dtype=torch.float32)
    return moshi_to_disk({k: v.detach().clone() for k, v in model.state_dict().items()})


def tiny_voice_presets(seed: int = TINY_SEED) -> dict[str, dict[str, torch.Tensor]]:
    """PersonaPlex-format presets for tiny-random-personaplex under PersonaPlex's 18 names:
    {"embeddings": [V, 1, 1, dim] float32, "cache": [1, 17, 4] int64}. Each is what the
    reference's LMGen saves for a voice recording (`save_voice_prompt_embeddings`), computed for
    5-8 frames of seeded random agent codes: the summed input embeddings of the positions the
    prompt steps read, and the token ring after the last frame."""
    from duplex_agent.checkpoints.personaplex import PRESET_NAMES, VoiceEncoder, filler_codes
    cfg = LMConfig.tiny()
    state = build_tiny_personaplex_lm_state(seed)
    _, sine = filler_codes(VoiceEncoder(build_tiny_mimi(seed)), cfg.card)
    presets = {}
    for index, name in enumerate(PRESET_NAMES):
        gen = torch.Generator().manual_seed(seed * 1000 + index)
        frames = int(torch.randint(5, 9, (), generator=gen))
        codes = torch.randint(0, cfg.card, (frames, 8), generator=gen)
        columns, ring = _reference_prompt_columns(cfg, codes, torch.tensor(sine))
        presets[name] = {"embeddings": _embed_columns(state, columns).view(-1, 1, 1, cfg.dim),
                         "cache": ring.unsqueeze(0)}
    return presets


def _reference_prompt_columns(cfg: LMConfig, codes: torch.Tensor,
                              user: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's voice-prompt steps (PersonaPlex LMGen.prepare_step_input, every token
    forced: text pad, agent `codes[t]`, user `user`) on its ring of max_delay + 3 slots.
    Returns the 17-stream columns the model reads ([F - 1, 17]: the first step reads nothing)
    and the ring after the last step ([17, ring])."""
    size = cfg.max_delay + 3
    initial = torch.tensor([cfg.text_init_id] + [cfg.audio_init_id] * cfg.n_q)
    ring = torch.full((cfg.num_codebooks, size), -2, dtype=torch.int64)  # -2: not generated
    columns = []
    for t, agent in enumerate(codes):
        forced = torch.cat([torch.tensor([cfg.text_pad_id]), agent, user])
        for k, delay in enumerate(cfg.delays):
            ring[k, (t + delay) % size] = forced[k]
            if t <= delay:  # positions before a stream's delay hold its initial token
                ring[k, t % size] = initial[k]
        if t == 0:
            ring[:, 0] = initial
        else:
            columns.append(ring[:, (t - 1) % size].clone())
    return torch.stack(columns), ring


def _embed_columns(state: dict[str, torch.Tensor], columns: torch.Tensor) -> torch.Tensor:
    """The temporal transformer's input for each column [N, 17]: the audio streams' embeddings
    summed in order, then the text embedding (the reference's `embed_codes`), -1 embedding to 0."""
    def lookup(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return torch.where((ids >= 0)[:, None], table[ids.clamp(min=0)], 0.0)
    x = None
    for k in range(columns.shape[1] - 1):
        emb = lookup(state[f"emb.{k}.weight"], columns[:, 1 + k])
        x = emb if x is None else x + emb
    return x + lookup(state["text_emb.weight"], columns[:, 0])


# -- tiny-random-hibiki-zero -----------------------------------------------------------------------

def build_tiny_hibiki_zero_lm_state(seed: int = TINY_SEED) -> dict[str, torch.Tensor]:
    """Like `build_tiny_lm_state`, in Hibiki-Zero's layout (`LMConfig.tiny_hibiki_zero()`), with
    two changes to moshi's init:

    * the depformer's LayerNorms (moshi: the identity) get random scales and biases, so that a
      model that skipped or misapplied them would not pass for the same;
    * like a trained translator, it ends its translation with EOS once the input has ended: the
      end-of-input marker on the first source codebook (its embedding row `card`) points the
      text head at EOS. That row is also the initial token, read at position 0 only, where the
      text's initial token cancels it, so EOS never comes earlier."""
    cfg = LMConfig.tiny_hibiki_zero()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = get_moshi_lm(None, lm_kwargs=cfg.to_moshi_lm_kwargs(), device="cpu",
                             dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm in model.depformer_norms:
            norm.weight.copy_(1 + 0.3 * torch.randn(norm.weight.shape, generator=gen))
            norm.bias.copy_(0.3 * torch.randn(norm.bias.shape, generator=gen))
        toward_eos = torch.randn(cfg.dim, generator=gen)
        toward_eos /= toward_eos.norm()
        model.emb[cfg.dep_q].weight[cfg.card] += 40 * toward_eos  # the first source codebook
        model.text_emb.weight[cfg.text_card] -= 40 * toward_eos
        model.text_linear.weight[2] = toward_eos
    return moshi_to_disk({k: v.detach().clone() for k, v in model.state_dict().items()})


TINY_VOICES_VERSION = 1  # bump when tiny_voice_presets changes: the cache folder is keyed by it


def tiny_voices_dir(seed: int = TINY_SEED) -> Path:
    """tiny-random-personaplex's voice folder in the cache (see personaplex.cache_root), written
    on first use."""
    from duplex_agent.checkpoints.personaplex import PRESET_NAMES, cache_root
    folder = f"voices-v{TINY_VOICES_VERSION}-seed{seed}"
    directory = cache_root() / "tiny-random-personaplex" / folder
    if not all((directory / name).is_file() for name in PRESET_NAMES):
        write_tiny_voices(directory, seed)
    return directory


def write_tiny_voices(directory: str | Path, seed: int = TINY_SEED) -> Path:
    """Write `tiny_voice_presets(seed)` as `.pt` files into `directory` (each atomically, so
    concurrent writers are harmless). Returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, preset in tiny_voice_presets(seed).items():
        partial = directory / f".{name}.{os.getpid()}.partial"
        torch.save(preset, partial)
        os.replace(partial, directory / name)
    return directory


# -- text tokenizer --------------------------------------------------------------------------------

_HANDWRITTEN = """\
Hello, how are you doing today?
I'm doing well, thanks for asking.
What did you have for breakfast this morning?
Just some toast and a cup of coffee.
Do you want to go for a walk later?
Sure, that sounds like a great idea.
Can you hear me okay?
Yes, I can hear you perfectly.
Sorry, could you say that again?
I said the weather is really nice today.
Where are you from originally?
I grew up in a small town by the sea.
That's interesting, I've never lived near the ocean.
What kind of music do you like?
Mostly jazz, but I listen to a bit of everything.
Have you seen any good movies recently?
Not really, I've been too busy with work.
Oh no, that sounds stressful.
It's fine, the project is almost finished.
Let me think about it for a second.
Hmm, I'm not sure I understand the question.
Okay, so what do you want to talk about?
Tell me a story about a dragon.
Once upon a time, there was a very small dragon.
Why is the sky blue?
Because sunlight scatters off the air, and blue light scatters the most.
How many days are there in a year?
There are three hundred and sixty five days, or sixty six in a leap year.
I'm going to the store, do you need anything?
Could you pick up some milk and eggs, please?
Thank you so much, that's very kind of you.
You're welcome, it's no problem at all.
Good night, sleep well!
See you tomorrow, bye!
Wait, what time is it right now?
It's a quarter past seven in the evening.
Are you a robot?
I'm an assistant, and I'm happy to chat with you.
Yeah, right, exactly.
No, I don't think so.
Well, maybe we can try again next week.
I love cooking pasta with fresh tomatoes and basil.
My favourite book is about a long journey across the mountains.
The train leaves at nine, so we should hurry.
Did you remember to call your mother?
Oops, I completely forgot about that.
"""

_SUBJECTS = ["I", "you", "we", "they", "my friend", "the teacher", "our neighbour", "everyone"]
_VERBS = ["really like", "want to visit", "talked about", "never understood", "often think about",
          "just found", "would love to see", "can't stop watching"]
_OBJECTS = ["the old library", "a quiet beach", "that new restaurant", "the football game",
            "a funny video", "the garden", "this little puzzle", "the night sky"]
_TAILS = ["today.", "last weekend.", "every morning.", "with my family.", "right now.",
          "a long time ago.", "after dinner.", "for some reason."]
_QUESTIONS = ["do you think", "did you know that", "is it true that", "why do you say"]


def _corpus() -> list[str]:
    """A few hundred lines of plain conversational English: handwritten lines plus a deterministic
    sweep over sentence templates (every third one turned into a question)."""
    lines = _HANDWRITTEN.splitlines()
    combos = list(itertools.product(_SUBJECTS, _VERBS, _OBJECTS, _TAILS))
    for i, (subj, verb, obj, tail) in enumerate(combos[::13]):  # a stride spreads the choices
        if i % 3 == 0:
            sentence = f"{_QUESTIONS[i % len(_QUESTIONS)]} {subj} {verb} {obj}?"
        else:
            sentence = f"{subj} {verb} {obj} {tail}"
        lines.append(sentence[0].upper() + sentence[1:])
    return lines


@functools.lru_cache(maxsize=1)
def tiny_tokenizer_bytes() -> bytes:
    """Serialized SentencePiece model: 256 pieces (== `LMConfig.tiny().text_card`), ids 0-3 are
    <unk>, <s>, </s>, <pad>. Deterministic: single-threaded training with fixed options."""
    writer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=writer,
        vocab_size=LMConfig.tiny().text_card, model_type="unigram", character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1, minloglevel=2,
    )
    return writer.getvalue()


def build_tiny_tokenizer() -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_proto=tiny_tokenizer_bytes())


# -- on-disk layout --------------------------------------------------------------------------------

def write_checkpoint_dir(path: str | Path, seed: int = TINY_SEED) -> Path:
    """Write the tiny-random checkpoint laid out like a Kyutai HF repo (`config.json` in the moshi
    library's format, `model.safetensors`, `mimi.safetensors`, `mimi_config.json`,
    `tokenizer.model`). Returns the directory."""
    return _write_layout(Path(path), build_tiny_lm_state(seed), LMConfig.tiny(), "moshi", seed)


def write_hibiki_zero_checkpoint_dir(path: str | Path, seed: int = TINY_SEED) -> Path:
    """tiny-random-hibiki-zero laid out as Hibiki-Zero's repo is: `model_type` "hibiki", its
    architecture keys in config.json, and a Mimi with 16 codebooks."""
    return _write_layout(Path(path), build_tiny_hibiki_zero_lm_state(seed),
                         LMConfig.tiny_hibiki_zero(), "hibiki", seed)


def _write_layout(path: Path, state: dict[str, torch.Tensor], cfg: LMConfig, model_type: str,
                  seed: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    n_q = cfg.mimi_codebooks
    save_file(state, str(path / "model.safetensors"))
    save_file(tiny_mimi_state(seed, n_q), str(path / "mimi.safetensors"))
    (path / "mimi_config.json").write_text(json.dumps(tiny_mimi_config(n_q), indent=2))
    (path / "tokenizer.model").write_bytes(tiny_tokenizer_bytes())
    config = cfg.to_moshi_lm_kwargs() | {
        "moshi_name": "model.safetensors", "mimi_name": "mimi.safetensors",
        "mimi_config_name": "mimi_config.json", "tokenizer_name": "tokenizer.model",
        "model_type": model_type, "lm_gen_config": {},
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


__all__ = ["TINY_SEED", "tiny_mimi_config", "synthetic_audio", "build_tiny_mimi", "tiny_mimi_state",
           "build_tiny_lm_state", "tiny_tokenizer_bytes", "build_tiny_tokenizer",
           "write_checkpoint_dir", "write_hibiki_zero_checkpoint_dir",
           "build_tiny_hibiki_zero_lm_state", "tiny_personaplex_lm_kwargs",
           "build_tiny_personaplex_lm_state",
           "tiny_voice_presets", "tiny_voices_dir", "write_tiny_voices"]
