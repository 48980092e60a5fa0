"""Resolve `--checkpoint` and load the LM, the Mimi codec and the text tokenizer.

`--checkpoint` takes a Hugging Face repo id (downloaded with huggingface_hub: its cache and
progress bars), a local directory laid out like such a repo (Kyutai's layout, optionally with the
moshi library's `config.json`, or the transformers layout), or the built-in name `tiny-random`.
"""
from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from duplex_agent.agent.config import LMConfig, SamplingConfig
from duplex_agent.agent.model import MoshiLM
from duplex_agent.checkpoints.registry import DEFAULT_CHECKPOINT, KNOWN, lookup

log = logging.getLogger(__name__)

# File names of Kyutai's repos when they carry no config.json (the moshi library's defaults).
KYUTAI_LM_NAME = "model.safetensors"
KYUTAI_MIMI_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
KYUTAI_TOKENIZER_NAME = "tokenizer_spm_32k_3.model"


class CheckpointError(Exception):
    """A checkpoint could not be found, fetched or understood. The message is for the user."""


@dataclass
class AgentBundle:
    """Everything a running agent needs from a checkpoint."""
    name: str
    config: LMConfig
    model: MoshiLM
    mimi: torch.nn.Module  # moshi.models.compression.MimiModel
    tokenizer: object  # sentencepiece.SentencePieceProcessor
    sampling: SamplingConfig  # the checkpoint's default sampling (lm_gen_config)
    builtin: bool = False  # True for tiny-random: random weights, speaks noise


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_checkpoint(spec: str = DEFAULT_CHECKPOINT, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> AgentBundle:
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("--device cuda was asked for, but no CUDA GPU is available here; "
                              "use --device cpu.")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    known = lookup(spec)
    if known is not None and known.layout == "builtin":
        return _load_tiny_random(device)
    path = Path(spec).expanduser()
    if path.is_dir():  # a local directory wins over a known name
        return _load_directory(spec, path, device, dtype)
    if known is not None:
        return _load_from_hub(known.repo, device, dtype)
    if path.exists():
        raise CheckpointError(f"--checkpoint {spec}: is a file; give the directory that holds the "
                              "checkpoint files, a Hugging Face repo id, or tiny-random.")
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise CheckpointError(f"--checkpoint {spec}: no such directory, and not a Hugging Face repo "
                              f"id (owner/name) or a known name ({', '.join(KNOWN)}).")
    return _load_from_hub(spec, device, dtype)


# -- sources ---------------------------------------------------------------------------------------

def _load_tiny_random(device: torch.device) -> AgentBundle:
    from duplex_agent.checkpoints import tiny_random
    cfg = LMConfig.tiny()
    model = _build_lm(cfg, tiny_random.build_tiny_lm_state(), device, torch.float32)
    mimi = tiny_random.build_tiny_mimi().to(device)
    log.warning("Using the built-in tiny-random checkpoint: random weights for smoke runs and "
                "tests; it produces noise, not speech.")
    return AgentBundle("tiny-random", cfg, model, mimi, tiny_random.build_tiny_tokenizer(),
                       SamplingConfig(), builtin=True)


def _load_directory(name: str, root: Path, device, dtype) -> AgentBundle:
    def local(filename: str, required: bool = True) -> Path | None:
        if filename.startswith("file://"):
            filename = filename.removeprefix("file://")
        if filename.startswith("hf://"):
            return _hub_file_spec(filename)
        p = Path(filename) if Path(filename).is_absolute() else root / filename
        if p.exists():
            return p
        if required:
            raise CheckpointError(f"--checkpoint {name}: {p} is missing.")
        return None
    return _load_layout(name, local, root, device, dtype)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick probe, so that an offline machine gets the cache (or a clear message) at once
    instead of huggingface_hub's retries with back-off."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_from_hub(repo: str, device, dtype) -> AgentBundle:
    known = lookup(repo)
    cache_only = not _hub_reachable()
    if known is not None and known.layout == "hf":
        root = _hub_call(repo, lambda hub: hub.snapshot_download(
            repo, allow_patterns=["*.json", "*.safetensors", "*.model"],
            local_files_only=cache_only))
        return _load_directory(repo, Path(root), device, dtype)

    def fetch(filename: str, required: bool = True) -> Path | None:
        if filename.startswith("hf://"):
            return _hub_file_spec(filename, cache_only)
        if filename.startswith("file://"):
            return Path(filename.removeprefix("file://"))
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

        def download(hub):
            try:
                return hub.hf_hub_download(repo, filename, local_files_only=cache_only)
            except LocalEntryNotFoundError:
                raise
            except EntryNotFoundError:
                if required:
                    raise CheckpointError(f"--checkpoint {repo}: the repo has no file {filename}.")
                return None
        got = _hub_call(repo, download)
        return Path(got) if got else None
    return _load_layout(repo, fetch, None, device, dtype)


def _hub_file_spec(spec: str, cache_only: bool | None = None) -> Path:
    owner, name, *rest = spec.removeprefix("hf://").split("/")
    repo = f"{owner}/{name}"
    if cache_only is None:
        cache_only = not _hub_reachable()
    return Path(_hub_call(repo, lambda hub: hub.hf_hub_download(repo, "/".join(rest),
                                                                local_files_only=cache_only)))


def _hub_call(repo: str, fn: Callable):
    import huggingface_hub as hub
    from huggingface_hub.utils import (GatedRepoError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError)
    try:
        return fn(hub)
    except CheckpointError:
        raise
    except LocalEntryNotFoundError as e:
        raise CheckpointError(offline_message(repo, "no network connection to the Hub, and the "
                                              "files are not in the local Hugging Face cache")) from e
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise CheckpointError(f"--checkpoint {repo}: the Hugging Face Hub has no such repository "
                              "(or it needs a login). Check the repo id, or give a local "
                              "directory or tiny-random.") from e
    except OSError as e:  # connection errors, timeouts, disk
        raise CheckpointError(offline_message(repo, str(e).splitlines()[0][:200])) from e


def offline_message(repo: str, reason: str) -> str:
    return (f"Could not download the checkpoint '{repo}' from the Hugging Face Hub ({reason}). "
            "Real Moshi weights are a 15 GB download. If you already have them, point "
            "--checkpoint at the local directory that holds them (model.safetensors, the Mimi "
            "weights tokenizer-e351c8d8-checkpoint125.safetensors and the text tokenizer "
            "tokenizer_spm_32k_3.model, as in the Hugging Face repo), e.g. "
            "--checkpoint ~/models/moshiko-pytorch-bf16. To try everything offline, run the "
            "built-in smoke model with --checkpoint tiny-random (random weights: it produces "
            "noise, not speech).")


# -- layouts ---------------------------------------------------------------------------------------

def _load_layout(name: str, get: Callable[..., Path | None], root: Path | None, device,
                 dtype) -> AgentBundle:
    config_path = get("config.json", required=False)
    raw = json.loads(config_path.read_text()) if config_path else None
    if raw is not None and _is_hf_transformers_config(raw):
        if root is None:
            raise CheckpointError(f"{name}: transformers-format repos must be given as a directory")
        return _load_hf_layout(name, root, raw, device, dtype)
    raw = dict(raw or {})
    if raw.pop("quantize", False):
        raise CheckpointError(f"{name}: int8-quantised checkpoints are not supported; use a bf16 one.")
    if raw.pop("lora_name", None):
        raise CheckpointError(f"{name}: LoRA checkpoints are not supported yet.")
    model_type = raw.pop("model_type", "moshi")
    if model_type != "moshi":
        raise CheckpointError(f"{name}: model_type {model_type!r} is not a Moshi dialogue model.")
    lm_file = get(raw.pop("moshi_name", KYUTAI_LM_NAME))
    mimi_file = get(raw.pop("mimi_name", KYUTAI_MIMI_NAME))
    tokenizer_file = get(raw.pop("tokenizer_name", KYUTAI_TOKENIZER_NAME))
    mimi_config_name = raw.pop("mimi_config_name", None)
    mimi_config = json.loads(get(mimi_config_name).read_text()) if mimi_config_name else None
    sampling = _sampling_from_lm_gen_config(raw.pop("lm_gen_config", {}) or {})
    try:
        cfg = LMConfig.from_moshi_json(raw) if raw else LMConfig.moshiko()
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}") from e

    from safetensors.torch import load_file
    state = load_file(str(lm_file), device=str(device))
    model = _build_lm(cfg, state, device, dtype, name)
    from moshi.models import loaders
    mimi = loaders.get_mimi(str(mimi_file), mimi_config, device=device,
                            num_codebooks=max(cfg.dep_q, cfg.num_user_codebooks))
    return AgentBundle(name, cfg, model, mimi.eval(), _load_tokenizer(tokenizer_file, cfg, name),
                       sampling)


def _is_hf_transformers_config(raw: dict) -> bool:
    return "audio_encoder_config" in raw or "depth_decoder_config" in raw or any(
        "Moshi" in a for a in raw.get("architectures", []))


def _load_hf_layout(name: str, root: Path, raw: dict, device, dtype) -> AgentBundle:
    from duplex_agent.checkpoints import hf_format
    _, state = hf_format.read_hf_checkpoint(root)
    try:
        cfg = LMConfig.from_moshi_json(hf_format.hf_config_to_moshi(raw))
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}") from e
    model = _build_lm(cfg, hf_format.hf_to_kyutai_lm(state, cfg.to_moshi_lm_kwargs()), device,
                      dtype, name)
    from moshi.models import loaders
    mimi_cfg = hf_format.hf_mimi_config_to_moshi(hf_format.audio_encoder_config(raw))
    mimi = loaders.get_mimi(None, mimi_cfg, device=device,
                            num_codebooks=max(cfg.dep_q, cfg.num_user_codebooks))
    mimi.load_state_dict(hf_format.hf_to_kyutai_mimi(state, mimi_cfg), strict=True)
    tokenizers = sorted(root.glob("*.model"))
    if not tokenizers:
        raise CheckpointError(f"{name}: no SentencePiece tokenizer (*.model) in {root}; copy "
                              f"{KYUTAI_TOKENIZER_NAME} from kyutai/moshiko-pytorch-bf16 there.")
    return AgentBundle(name, cfg, model, mimi.eval(), _load_tokenizer(tokenizers[0], cfg, name),
                       SamplingConfig())


def _build_lm(cfg: LMConfig, state: dict, device, dtype, name: str = "") -> MoshiLM:
    with torch.device("meta"):
        model = MoshiLM(cfg)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise CheckpointError(
            f"{name}: the LM weights do not match the configured architecture "
            f"({len(missing)} missing, e.g. {sorted(missing)[:3]}; {len(unexpected)} unexpected, "
            f"e.g. {sorted(unexpected)[:3]}).")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{name}: LM weight shapes do not match the architecture: "
                              f"{str(e).splitlines()[-1].strip()}") from e
    return model.to(device=device, dtype=dtype).eval()


def _load_tokenizer(path: Path, cfg: LMConfig, name: str):
    import sentencepiece
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{name}: {path} is not a SentencePiece model ({e}).") from e
    if sp.get_piece_size() < cfg.text_card:
        raise CheckpointError(f"{name}: the tokenizer has {sp.get_piece_size()} pieces, fewer "
                              f"than the model's {cfg.text_card} text tokens.")
    return sp


def _sampling_from_lm_gen_config(gen: dict) -> SamplingConfig:
    base = SamplingConfig()
    return SamplingConfig(
        temp_text=float(gen.get("temp_text", base.temp_text)),
        top_k_text=int(gen.get("top_k_text", base.top_k_text)),
        temp_audio=float(gen.get("temp", base.temp_audio)),
        top_k_audio=int(gen.get("top_k", base.top_k_audio)),
        greedy=not gen.get("use_sampling", True),
    ).validated()
