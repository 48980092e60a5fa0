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

from duplex_agent.agent.config import TEXT_EOS_ID, TEXT_PAD_ID, LMConfig, SamplingConfig
from duplex_agent.agent.model import MoshiLM
from duplex_agent.checkpoints import personaplex
from duplex_agent.checkpoints.bundle import AgentBundle
from duplex_agent.checkpoints.personaplex import Personas
from duplex_agent.checkpoints.registry import (DEFAULT_CHECKPOINT, KNOWN, TRANSCRIBERS, lookup,
                                               lookup_transcriber)
from duplex_agent.checkpoints.stt import TranscriberBundle

log = logging.getLogger(__name__)

# File names of Kyutai's repos when they carry no config.json (the moshi library's defaults).
KYUTAI_LM_NAME = "model.safetensors"
KYUTAI_MIMI_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
KYUTAI_TOKENIZER_NAME = "tokenizer_spm_32k_3.model"


# moshi's `model_type`s served: dialogue, and speech translation (Hibiki-Zero: agent/engine.py).
MODEL_TYPES = ("moshi", "hibiki")


class CheckpointError(Exception):
    """A checkpoint could not be found, fetched or understood. The message is for the user."""


@dataclass(frozen=True)
class WeightOptions:
    """How the LM weights are changed at load: `quantize="int8"` keeps the linears int8 (moshi's
    q8 layout), `lora` fuses a LoRA adapter file into the weights."""
    quantize: str | None = None
    lora: str | Path | None = None
    lora_rank: int | None = None  # from the checkpoint's config.json, checked against the adapter
    lora_scaling: float | None = None

    def __post_init__(self):
        if self.quantize not in (None, "int8"):
            raise CheckpointError(f"--quantize {self.quantize}: only int8 is supported.")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_checkpoint(spec: str = DEFAULT_CHECKPOINT, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None, *,
                    voice_prompt_dir: str | Path | None = None, quantize: str | None = None,
                    lora: str | Path | None = None, transcriber: str | None = None) -> AgentBundle:
    """`voice_prompt_dir`: a folder of voices (`.pt` presets, recordings) that replaces a
    persona checkpoint's own (`voices/` or `voices.tgz`). `quantize="int8"`: int8 linear weights
    made at load (a q8 checkpoint is int8 already). `lora`: a LoRA adapter (moshi-finetune's
    `lora.safetensors`) fused into the weights. `transcriber`: a Kyutai STT checkpoint for the
    user's words (`load_transcriber`)."""
    bundle = _load_checkpoint(spec, device, dtype, voice_prompt_dir, WeightOptions(quantize, lora))
    bundle.config = bundle.model.cfg  # quantised at load: the model's config says so
    if voice_prompt_dir is not None and bundle.personas is None:
        raise CheckpointError(f"--voice-prompt-dir: {bundle.name} has no persona training "
                              "(voice prompts need a PersonaPlex checkpoint).")
    if transcriber:
        bundle.transcriber = load_transcriber(transcriber, bundle.mimi, dtype=dtype)
    return bundle


def _load_checkpoint(spec, device, dtype, voice_prompt_dir, weights) -> AgentBundle:
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("--device cuda was asked for, but no CUDA GPU is available here; "
                              "use --device cpu.")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    known = lookup(spec)
    if known is not None and known.layout == "builtin":
        return _load_tiny_random(device, known.name, voice_prompt_dir, weights)
    path = Path(spec).expanduser()
    if path.is_dir():  # a local directory wins over a known name
        return _load_directory(spec, path, device, dtype, voice_prompt_dir, weights)
    if known is not None:
        return _load_from_hub(known.repo, device, dtype, voice_prompt_dir, weights)
    if path.exists():
        raise CheckpointError(f"--checkpoint {spec}: is a file; give the directory that holds the "
                              "checkpoint files, a Hugging Face repo id, or tiny-random.")
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise CheckpointError(f"--checkpoint {spec}: no such directory, and not a Hugging Face repo "
                              f"id (owner/name) or a known name ({', '.join(KNOWN)}).")
    return _load_from_hub(spec, device, dtype, voice_prompt_dir, weights)


# -- sources ---------------------------------------------------------------------------------------

def _load_tiny_random(device: torch.device, name: str = "tiny-random",
                      voice_prompt_dir=None, weights: WeightOptions = WeightOptions()) -> AgentBundle:
    from duplex_agent.checkpoints import tiny_random
    cfg = LMConfig.tiny()
    persona, model_type = KNOWN[name].personas, KNOWN[name].model_type
    if persona:  # PersonaPlex's layout: 16 depformer steps on disk, sliced like the real one
        state, cfg = personaplex.agent_steps_only(tiny_random.build_tiny_personaplex_lm_state(), cfg)
    elif model_type == "hibiki":
        state, cfg = tiny_random.build_tiny_hibiki_zero_lm_state(), LMConfig.tiny_hibiki_zero()
    else:
        state = tiny_random.build_tiny_lm_state()
    model = _build_lm(cfg, state, device, torch.float32, name, weights, model_type)
    mimi = tiny_random.build_tiny_mimi(n_q=cfg.mimi_codebooks).to(device)
    personas = (_personas(name, cfg, mimi, voice_prompt_dir, tiny_random.tiny_voices_dir)
                if persona else None)
    log.warning(f"Using the built-in {name} checkpoint: random weights for smoke runs and "
                "tests; it produces noise, not speech.")
    return AgentBundle(name, cfg, model, mimi, tiny_random.build_tiny_tokenizer(),
                       SamplingConfig(), builtin=True, personas=personas, model_type=model_type)


def _load_directory(name: str, root: Path, device, dtype, voice_prompt_dir=None,
                    weights: WeightOptions = WeightOptions()) -> AgentBundle:
    return _load_layout(name, _dir_getter(name, root), root, device, dtype, voice_prompt_dir,
                        weights)


def _dir_getter(name: str, root: Path, flag: str = "--checkpoint") -> Callable[..., Path | None]:
    """`get(filename, required=True)` for the files of a local checkpoint directory `root`
    (`flag name` on the command line): a relative name is in `root`, an absolute or `file://`
    one is where it says, an `hf://owner/repo/file` one comes from the Hub. A missing required
    file is a CheckpointError; a missing optional one is None."""
    def get(filename: str, required: bool = True) -> Path | None:
        if filename.startswith("file://"):
            filename = filename.removeprefix("file://")
        if filename.startswith("hf://"):
            return _hub_file_spec(filename)
        p = Path(filename) if Path(filename).is_absolute() else root / filename
        if p.is_file():
            return p
        if required:
            raise CheckpointError(f"{flag} {name}: {p} is missing.")
        return None
    return get


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick probe of the Hub's host (HF_ENDPOINT's, for a mirror), so that an offline machine
    gets the cache (or a clear message) at once instead of huggingface_hub's retries with
    back-off."""
    from urllib.parse import urlsplit

    from huggingface_hub import constants
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return False
    endpoint = urlsplit(constants.ENDPOINT)
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_from_hub(repo: str, device, dtype, voice_prompt_dir=None,
                   weights: WeightOptions = WeightOptions()) -> AgentBundle:
    known = lookup(repo)
    if known is not None and known.licence:
        log.info("%s is under the %s licence%s.", repo, known.licence,
                 " (gated on the Hub: its licence is accepted on the model page)"
                 if known.gated else "")
    cache_only = not _hub_reachable()
    if known is not None and known.layout == "hf":
        root = _hub_call(repo, lambda hub: hub.snapshot_download(
            repo, allow_patterns=["*.json", "*.safetensors", "*.model"],
            local_files_only=cache_only))
        return _load_directory(repo, Path(root), device, dtype, voice_prompt_dir, weights)

    return _load_layout(repo, _hub_getter(repo, cache_only), None, device, dtype,
                        voice_prompt_dir, weights)


def _hub_getter(repo: str, cache_only: bool, flag: str = "--checkpoint",
                offline: Callable[[str, str], str] | None = None) -> Callable[..., Path | None]:
    """`get(filename, required=True)` for the files of a Hub repo (or `hf://` / `file://`
    names): downloaded with progress bars into the Hugging Face cache, or found there offline."""
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
                    raise CheckpointError(f"{flag} {repo}: the repo has no file {filename}.")
                return None
        got = _hub_call(repo, download, offline, flag)
        return Path(got) if got else None
    return fetch


def _hub_file_spec(spec: str, cache_only: bool | None = None) -> Path:
    owner, name, *rest = spec.removeprefix("hf://").split("/")
    repo = f"{owner}/{name}"
    if cache_only is None:
        cache_only = not _hub_reachable()
    return Path(_hub_call(repo, lambda hub: hub.hf_hub_download(repo, "/".join(rest),
                                                                local_files_only=cache_only)))


def _hub_call(repo: str, fn: Callable, offline: Callable[[str, str], str] | None = None,
              flag: str = "--checkpoint"):
    import huggingface_hub as hub
    from huggingface_hub.utils import LocalEntryNotFoundError
    offline = offline or offline_message
    try:
        return fn(hub)
    except CheckpointError:
        raise
    except Exception as e:
        refused = _refusal_message(repo, e, flag)
        if refused is not None:
            raise CheckpointError(refused) from e
        if isinstance(e, LocalEntryNotFoundError):
            raise CheckpointError(offline(repo, "no network connection to the Hub, and the "
                                          "files are not in the local Hugging Face cache")) from e
        if isinstance(e, OSError):  # connection errors, timeouts, disk
            raise CheckpointError(offline(repo, str(e).splitlines()[0][:200])) from e
        raise


def _refusal_message(repo: str, error: BaseException, flag: str = "--checkpoint") -> str | None:
    """The message for a Hub that answered but refused `repo` (gated, 401, 403, not found), or
    None. The answer is looked for along the exception chain: hf_hub_download reports a 403 on a
    file's metadata as a LocalEntryNotFoundError caused by it, as if the network were down."""
    from huggingface_hub import constants
    from huggingface_hub.utils import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
    known = lookup(repo)
    seen: BaseException | None = error
    while seen is not None:
        status = getattr(getattr(seen, "response", None), "status_code", None)
        if isinstance(seen, GatedRepoError) or (known is not None and known.gated
                                                and status in (401, 403)):
            return _gated_message(repo, flag, f"HTTP {status}, gated repository" if status
                                 else "gated repository")
        if isinstance(seen, RepositoryNotFoundError):
            return (f"{flag} {repo}: the Hugging Face Hub has no such repository, or it is "
                    "private or gated and needs a login (accept its licence on its page, then set "
                    "HF_TOKEN or run `hf auth login`). Check the repo id, or give a local "
                    "directory or tiny-random.")
        if isinstance(seen, HfHubHTTPError) and status == 401:
            return (f"{flag} {repo}: the Hugging Face Hub refused the access token "
                    "(HTTP 401, invalid credentials): set HF_TOKEN to a valid token "
                    f"({constants.ENDPOINT}/settings/tokens) or run `hf auth login` again.")
        if isinstance(seen, HfHubHTTPError) and status == 403:
            return _gated_message(repo, flag, "HTTP 403, forbidden: a gated repository, or a token "
                                 "without read access to it")
        seen = seen.__cause__ or seen.__context__
    return None


def _gated_message(repo: str, flag: str, answer: str) -> str:
    from huggingface_hub import constants
    known = lookup(repo)
    licence = f" ({known.licence})" if known is not None and known.licence else ""
    return (f"{flag} {repo}: the Hugging Face Hub refused the download ({answer}). Accept "
            f"the licence{licence} on {constants.ENDPOINT}/{repo} while logged in, then let this "
            "machine use your account: set HF_TOKEN to an access token "
            f"({constants.ENDPOINT}/settings/tokens) or run `hf auth login`.")


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
                 dtype, voice_prompt_dir=None, weights: WeightOptions = WeightOptions()) -> AgentBundle:
    config_path = get("config.json", required=False)
    text = config_path.read_text().strip() if config_path else ""
    raw = json.loads(text) if text else None  # PersonaPlex ships an empty config.json
    if raw is not None and _is_hf_transformers_config(raw):
        if root is None:
            raise CheckpointError(f"{name}: transformers-format repos must be given as a directory")
        return _load_hf_layout(name, root, raw, device, dtype, weights)
    raw = dict(raw or {})
    weights = _lora_from_config(name, raw, get, weights)
    model_type = raw.pop("model_type", "moshi")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{name}: model_type {model_type!r} is not served here (this "
                              f"runtime serves {' and '.join(map(repr, MODEL_TYPES))}).")
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
    # Quantised at load: read on the host, each weight goes to the device once, as int8.
    on_host = weights.quantize is not None and not cfg.quantize
    state = load_file(str(lm_file), device="cpu" if on_host else str(device))
    known = lookup(name)
    persona = known is not None and known.personas
    if personaplex.is_personaplex_layout(state, cfg):  # 16 depformer steps; serve the agent's 8
        state, cfg = personaplex.agent_steps_only(state, cfg)
        if not persona:  # the shapes cannot tell PersonaPlex from another two-stream fine-tune
            log.warning("%s: its depformer also predicts the user's audio (PersonaPlex's layout): "
                        "served with the agent's %d steps and taken as a persona checkpoint. "
                        "If it was not trained on persona prompts, open conversations without "
                        "voice_prompt/text_prompt.", name, cfg.dep_q)
        persona = True
    model = _build_lm(cfg, state, device, dtype, name, weights, model_type)
    from moshi.models import loaders
    mimi = loaders.get_mimi(str(mimi_file), mimi_config, device=device,
                            num_codebooks=cfg.mimi_codebooks).eval()
    personas = (_personas(name, cfg, mimi, voice_prompt_dir,
                          lambda: personaplex.checkpoint_voices(
                              root, get, known.voices if known else None))
                if persona else None)
    return AgentBundle(name, cfg, model, mimi, _load_tokenizer(tokenizer_file, cfg, name),
                       sampling, personas=personas, model_type=model_type)


def _personas(name: str, cfg: LMConfig, mimi, voice_prompt_dir,
              own_voices: Callable[[], Path | None]) -> Personas:
    """A persona checkpoint's voices: `voice_prompt_dir` if given (the checkpoint's own are then
    not fetched), else the folder `own_voices()` finds."""
    if voice_prompt_dir is not None:
        folder = Path(voice_prompt_dir).expanduser()
        if not folder.is_dir():
            raise CheckpointError(f"--voice-prompt-dir {voice_prompt_dir}: no such directory.")
    else:
        try:
            folder = own_voices()
        except personaplex.PersonaError as e:
            raise CheckpointError(f"{name}: {e}") from e
    if folder is None:
        return Personas(cfg, mimi, None, f"the checkpoint has no {personaplex.VOICES_DIR}/ or "
                        f"{personaplex.VOICES_ARCHIVE}; give --voice-prompt-dir")
    personas = Personas(cfg, mimi, folder)
    # Read (and encode) every voice now, not on a conversation's first request; a bad file is
    # reported here and refused when asked for, the others serve.
    for problem in personas.preload().values():
        log.warning("Unusable %s", problem)
    return personas


def _is_hf_transformers_config(raw: dict) -> bool:
    return "audio_encoder_config" in raw or "depth_decoder_config" in raw or any(
        "Moshi" in a for a in raw.get("architectures", []))


def _load_hf_layout(name: str, root: Path, raw: dict, device, dtype,
                    weights: WeightOptions = WeightOptions()) -> AgentBundle:
    from duplex_agent.checkpoints import hf_format
    _, state = hf_format.read_hf_checkpoint(root)
    try:
        cfg = LMConfig.from_moshi_json(hf_format.hf_config_to_moshi(raw))
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}") from e
    model = _build_lm(cfg, hf_format.hf_to_kyutai_lm(state, cfg.to_moshi_lm_kwargs()), device,
                      dtype, name, weights)
    from moshi.models import loaders
    mimi_cfg = hf_format.hf_mimi_config_to_moshi(hf_format.audio_encoder_config(raw))
    mimi = loaders.get_mimi(None, mimi_cfg, device=device,
                            num_codebooks=cfg.mimi_codebooks)
    mimi.load_state_dict(hf_format.hf_to_kyutai_mimi(state, mimi_cfg), strict=True)
    tokenizers = sorted(root.glob("*.model"))
    if not tokenizers:
        raise CheckpointError(f"{name}: no SentencePiece tokenizer (*.model) in {root}; copy "
                              f"{KYUTAI_TOKENIZER_NAME} from kyutai/moshiko-pytorch-bf16 there.")
    return AgentBundle(name, cfg, model, mimi.eval(), _load_tokenizer(tokenizers[0], cfg, name),
                       SamplingConfig())


def _lora_from_config(name: str, raw: dict, get: Callable[..., Path | None],
                      weights: WeightOptions) -> WeightOptions:
    """moshi's LoRA keys of config.json (`lora`, `lora_name`, `lora_rank`, `lora_scaling`),
    popped from `raw`; `--lora` wins over `lora_name`. A config.json beside the adapter (as
    moshi-finetune writes it) gives the rank and scaling when the checkpoint's does not."""
    from dataclasses import replace
    enabled, lora_name = raw.pop("lora", False), raw.pop("lora_name", None)
    rank, scaling = raw.pop("lora_rank", None), raw.pop("lora_scaling", None)
    lora = weights.lora or (get(lora_name) if lora_name else None)
    if lora is None:
        if enabled:
            raise CheckpointError(f"{name}: config.json enables LoRA (lora: true) but names no "
                                  "adapter (lora_name); give --lora PATH (moshi-finetune's "
                                  "lora.safetensors).")
        return weights
    beside = Path(lora).expanduser().parent / "config.json"
    if (rank is None or scaling is None) and beside.is_file():
        adapter_cfg = json.loads(beside.read_text() or "{}")
        rank = rank if rank is not None else adapter_cfg.get("lora_rank")
        scaling = scaling if scaling is not None else adapter_cfg.get("lora_scaling")
    return replace(weights, lora=lora, lora_rank=rank, lora_scaling=scaling)


def _apply_weight_options(cfg: LMConfig, state: dict, device, dtype, name: str,
                          weights: WeightOptions) -> tuple[LMConfig, dict]:
    """LoRA fused into the float weights at the compute `dtype`, then --quantize int8; both on
    the state dict, so the model is built once with its final weights."""
    from dataclasses import replace

    from duplex_agent.checkpoints import lora, quantize
    if not cfg.quantize and any(k.endswith(quantize.SCALE_SUFFIX) for k in state):
        cfg = replace(cfg, quantize=True)  # a q8 file whose config.json does not say so
    if weights.lora is not None:
        if cfg.quantize:
            raise CheckpointError(f"{name}: a LoRA adapter cannot be fused into int8 (q8) weights; "
                                  "use the bf16 checkpoint (with --quantize int8 if you want int8).")
        steps = {k: cfg.depformer_weight_sets for k in state
                 if k.startswith("depformer.layers.") and ".self_attn." in k}
        scaling = lora.DEFAULT_SCALING if weights.lora_scaling is None else float(weights.lora_scaling)
        try:
            state = lora.fuse_lora(state, lora.read_adapter(weights.lora), scaling, steps,
                                   weights.lora_rank, dtype)
        except lora.AdapterMismatch as e:
            raise CheckpointError(f"{name}: LoRA adapter {weights.lora}: {e}") from e
    if weights.quantize == "int8" and not cfg.quantize:
        cfg = replace(cfg, quantize=True)
        with torch.device("meta"):
            names = quantize.int8_weight_names(MoshiLM(cfg))
        missing = [n for n in names if n not in state]
        if missing:
            raise CheckpointError(f"{name}: cannot quantise, weights missing: {missing[:3]}")
        state = quantize.quantize_state(state, names, device)
    return cfg, state


def _build_lm(cfg: LMConfig, state: dict, device, dtype, name: str = "",
              weights: WeightOptions = WeightOptions(), model_type: str = "moshi") -> MoshiLM:
    cfg, state = _apply_weight_options(cfg, state, device, dtype, name, weights)
    if model_type == "hibiki":
        # As moshi's loader does for Hibiki: an EOS sampled before the end of the input is read
        # back as PAD, so the translation goes on.
        state = dict(state, **{"text_emb.weight": state["text_emb.weight"].clone()})
        state["text_emb.weight"][TEXT_EOS_ID] = state["text_emb.weight"][TEXT_PAD_ID]
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
    if cfg.quantize:
        from duplex_agent.checkpoints.quantize import cast_quantized
        return cast_quantized(model, device, dtype).eval()
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


# -- the transcriber (--transcriber) ---------------------------------------------------------------

def load_transcriber(spec: str, dialogue_mimi=None, device: str | torch.device | None = None,
                     dtype: torch.dtype | None = None) -> TranscriberBundle:
    """A Kyutai STT checkpoint for the user's words: a registry name (TRANSCRIBERS), a local
    directory in Kyutai's layout, a Hub repo id, or `tiny-random-stt`. It goes on `device`, else
    the dialogue Mimi's (else the default device), its LM in `dtype` (default bfloat16 on CUDA,
    float32 elsewhere; `load_checkpoint` passes the dialogue's; tiny-random-stt's LM and every
    Mimi stay float32); when its Mimi has the same weights, it uses the dialogue Mimi's tensors.
    Raises CheckpointError, before anything is served, for anything it cannot use."""
    from duplex_agent.checkpoints import stt
    if dialogue_mimi is not None:
        device = device or next(dialogue_mimi.parameters()).device
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    known = lookup_transcriber(spec)
    if known is not None and known.layout == "builtin":
        model = _build_lm(stt.tiny_stt_config(), stt.build_tiny_stt_lm_state(), device,
                          torch.float32, known.name)
        mimi = stt.build_tiny_stt_mimi().to(device)
        from duplex_agent.checkpoints.tiny_random import build_tiny_tokenizer
        return TranscriberBundle(known.name, model.cfg, model, mimi, build_tiny_tokenizer(),
                                 stt.TINY_STT_PREFIX_S, stt.TINY_STT_DELAY_S, builtin=True,
                                 same_mimi=stt.share_mimi_weights(mimi, dialogue_mimi))
    path = Path(spec).expanduser()
    if path.is_dir():
        get = _dir_getter(spec, path, "--transcriber")
    elif known is not None or (not spec.startswith((".", "/", "~")) and spec.count("/") == 1):
        repo = known.repo if known is not None else spec
        get = _hub_getter(repo, not _hub_reachable(), "--transcriber", transcriber_offline_message)
    else:
        raise CheckpointError(f"--transcriber {spec}: no such directory, and not a Hugging Face "
                              f"repo id (owner/name) or a known name ({', '.join(TRANSCRIBERS)}).")
    return _load_transcriber_layout(spec, get, device, dtype, dialogue_mimi)


def _load_transcriber_layout(name: str, get: Callable[..., Path | None], device, dtype,
                             dialogue_mimi) -> TranscriberBundle:
    from moshi.models import loaders
    from safetensors.torch import load_file

    from duplex_agent.checkpoints import stt
    from duplex_agent.checkpoints.kyutai_format import moshi_to_disk
    config_path = get("config.json", required=False)
    if config_path is None:
        raise CheckpointError(f"--transcriber {name}: no config.json; a Kyutai STT checkpoint has "
                              "one in the moshi library's format (model_type 'stt').")
    try:
        cfg, prefix_s, delay_s, files = stt.stt_config_from_json(json.loads(config_path.read_text()))
    except ValueError as e:  # includes a config.json that is not JSON
        raise CheckpointError(f"--transcriber {name}: {e}.") from e
    lm_file, mimi_file = get(files["model"]), get(files["mimi"])
    tokenizer_file = get(files["tokenizer"])
    mimi_config = json.loads(get(files["mimi_config"]).read_text()) if files["mimi_config"] else None
    try:
        mimi = loaders.get_mimi(str(mimi_file), mimi_config, device=device, num_codebooks=1)
        stt.check_mimi(cfg, mimi)
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"--transcriber {name}: its Mimi ({Path(str(mimi_file)).name}) "
                              f"cannot serve it: {str(e).splitlines()[0][:300]}") from e
    mimi.set_num_codebooks(cfg.n_q)
    try:
        state = moshi_to_disk(load_file(str(lm_file), device=str(device)))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"--transcriber {name}: {lm_file} is not a safetensors file "
                              f"({e}).") from e
    model = _build_lm(cfg, state, device, dtype, f"--transcriber {name}")
    return TranscriberBundle(name, cfg, model, mimi.eval(), _load_tokenizer(tokenizer_file, cfg, name),
                             prefix_s, delay_s, same_mimi=stt.share_mimi_weights(mimi, dialogue_mimi))


def transcriber_offline_message(repo: str, reason: str) -> str:
    return (f"Could not download the transcriber '{repo}' from the Hugging Face Hub ({reason}). "
            "If you have its files, point --transcriber at the local directory that holds them "
            "(config.json, model.safetensors, its Mimi and text tokenizer, as in the Hugging Face "
            "repo). To try everything offline, use --transcriber tiny-random-stt (random "
            "weights: it writes random words).")
