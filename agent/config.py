"""Model configuration: one dataclass, named presets, and moshi-style config.json interop."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Text ids with a fixed meaning in every Moshi checkpoint.
TEXT_PAD_ID = 3  # "no word right now"
TEXT_EPAD_ID = 0  # last pad before a word
DEFAULT_DELAYS = (0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1)

SAMPLE_RATE = 24_000
FRAME_RATE = 12.5
FRAME_SIZE = 1920  # samples per 80 ms frame


@dataclass(frozen=True)
class LMConfig:
    # temporal transformer
    dim: int = 4096
    num_heads: int = 32
    num_layers: int = 32
    hidden_scale: float = 4.125
    context: int = 3000
    max_period: float = 10_000.0
    norm_eps: float = 1e-8
    # vocabularies
    text_card: int = 32_000
    card: int = 2048
    n_q: int = 16  # audio streams in: 8 agent + 8 user
    dep_q: int = 8  # audio streams generated
    delays: tuple[int, ...] = DEFAULT_DELAYS
    text_pad_id: int = TEXT_PAD_ID
    text_epad_id: int = TEXT_EPAD_ID
    # depth transformer
    depformer_dim: int = 1024
    depformer_num_heads: int = 16
    depformer_num_layers: int = 6
    depformer_dim_feedforward: int = 4224
    # extra heads on the temporal transformer's output (Kyutai STT's pause prediction): each a
    # bias-free Linear(dim, extra_heads_dim), softmaxed
    extra_heads_num_heads: int = 0
    extra_heads_dim: int = 6
    # weights: int8 linears (moshi's q8 layout: row-wise int8 `weight` + float32 `weight_scb`)
    quantize: bool = False

    # -- presets ---------------------------------------------------------------------------------
    @classmethod
    def moshiko(cls) -> "LMConfig":
        return cls()

    @classmethod
    def moshika(cls) -> "LMConfig":
        return cls()  # same architecture, different weights

    @classmethod
    def tiny(cls) -> "LMConfig":
        """Test-sized model with the real 17-stream layout and delays; context 50 so that runs of
        100+ steps wrap the ring KV cache."""
        return cls(dim=64, num_heads=4, num_layers=2, context=50, text_card=256, card=128,
                   depformer_dim=64, depformer_num_heads=4, depformer_num_layers=2,
                   depformer_dim_feedforward=128)

    # -- derived ---------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        return gating_hidden(self.dim, int(self.hidden_scale * self.dim))

    @property
    def depformer_ffn_hidden(self) -> int:
        return gating_hidden(self.depformer_dim, self.depformer_dim_feedforward)

    @property
    def num_codebooks(self) -> int:
        return self.n_q + 1

    @property
    def num_user_codebooks(self) -> int:
        return self.n_q - self.dep_q

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    @property
    def text_init_id(self) -> int:
        return self.text_card

    @property
    def audio_init_id(self) -> int:
        return self.card

    # -- moshi interop ---------------------------------------------------------------------------
    def to_moshi_lm_kwargs(self) -> dict:
        """Keyword arguments for `moshi.models.lm.LMModel` describing the same architecture."""
        return dict(
            dim=self.dim, text_card=self.text_card, existing_text_padding_id=self.text_pad_id,
            n_q=self.n_q, dep_q=self.dep_q, card=self.card, num_heads=self.num_heads,
            num_layers=self.num_layers, hidden_scale=self.hidden_scale, causal=True,
            layer_scale=None, context=self.context, max_period=self.max_period, gating="silu",
            norm="rms_norm_f32", positional_embedding="rope", depformer_dim=self.depformer_dim,
            depformer_dim_feedforward=self.depformer_dim_feedforward,
            depformer_num_heads=self.depformer_num_heads,
            depformer_num_layers=self.depformer_num_layers, depformer_layer_scale=None,
            depformer_multi_linear=True, depformer_context=self.dep_q,
            depformer_max_period=self.max_period, depformer_gating="silu",
            depformer_pos_emb="none", depformer_weights_per_step=True, delays=list(self.delays),
        ) | ({"quantize": True} if self.quantize else {}) | (
            {"extra_heads_num_heads": self.extra_heads_num_heads,
             "extra_heads_dim": self.extra_heads_dim} if self.extra_heads_num_heads else {})

    @classmethod
    def from_moshi_json(cls, raw: dict) -> "LMConfig":
        """Build from a moshi-style `config.json` (LM kwargs at top level, as the moshi library
        reads them). Missing keys keep the moshiko defaults; unsupported variants are refused."""
        unsupported = {
            "gating": "silu", "norm": "rms_norm_f32", "positional_embedding": "rope",
            "depformer_pos_emb": "none", "depformer_multi_linear": True,
            "depformer_weights_per_step": True, "depformer_gating": "silu",
        }
        for key, expected in unsupported.items():
            if key in raw and raw[key] != expected:
                raise ValueError(f"config.json: {key}={raw[key]!r} is not supported "
                                 f"(this runtime implements {key}={expected!r})")
        for key in ("layer_scale", "depformer_layer_scale", "depformer_weights_per_step_schedule",
                    "conditioners", "fuser", "cross_attention"):
            if raw.get(key):
                raise ValueError(f"config.json: {key}={raw[key]!r} is not supported")
        if raw.get("kv_repeat", 1) != 1:
            raise ValueError("config.json: kv_repeat != 1 (grouped-query attention) is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in raw.items():
            if key == "existing_text_padding_id":
                kwargs["text_pad_id"] = value
            elif key == "existing_text_end_padding_id":
                kwargs["text_epad_id"] = value
            elif key == "delays":
                kwargs["delays"] = tuple(value)
            elif key == "depformer_max_period" and value != raw.get("max_period", cls.max_period):
                raise ValueError("config.json: depformer_max_period differs from max_period")
            elif key == "depformer_dim_feedforward" and value is None:
                # moshi's default: hidden_scale x depformer_dim
                kwargs[key] = int(raw.get("hidden_scale", cls.hidden_scale)
                                  * raw.get("depformer_dim", cls.depformer_dim))
            elif key in names:
                kwargs[key] = value
        cfg = cls(**kwargs)
        if len(cfg.delays) != cfg.num_codebooks:
            raise ValueError(f"config.json: {len(cfg.delays)} delays for {cfg.num_codebooks} streams")
        return cfg


def gating_hidden(dim: int, dim_feedforward: int) -> int:
    # The reference's ActivationGating rule: 21/8 * dim when the FFN is exactly 4x, else 2/3.
    if dim_feedforward == 4 * dim:
        return (21 * dim) // 8
    return (2 * dim_feedforward) // 3


PRESETS = {"moshiko": LMConfig.moshiko, "moshika": LMConfig.moshika, "tiny": LMConfig.tiny}


@dataclass(frozen=True)
class SamplingConfig:
    """Per-conversation sampling. `greedy` overrides temperatures."""
    temp_text: float = 0.7
    top_k_text: int = 25
    temp_audio: float = 0.8
    top_k_audio: int = 250
    greedy: bool = False
    seed: int | None = None

    def validated(self) -> "SamplingConfig":
        for name in ("temp_text", "temp_audio"):
            v = getattr(self, name)
            if not (0.0 <= v <= 10.0):
                raise ValueError(f"{name} must be in [0, 10], got {v}")
        for name in ("top_k_text", "top_k_audio"):
            v = getattr(self, name)
            if not (0 <= v <= 1_000_000):
                raise ValueError(f"{name} must be >= 0, got {v}")
        return self


# Client-facing sampling parameters (the names kyutai's web UI sends), in the order they apply:
# a later seed wins, so audio_seed beats text_seed.
CLIENT_SAMPLING_PARAMS = (
    ("text_temperature", "temp_text", float, 0.0, 10.0),
    ("audio_temperature", "temp_audio", float, 0.0, 10.0),
    ("text_topk", "top_k_text", int, 0, 1_000_000),
    ("audio_topk", "top_k_audio", int, 0, 1_000_000),
    ("seed", "seed", int, 0, 2**63 - 1),
    ("text_seed", "seed", int, 0, 2**63 - 1),
    ("audio_seed", "seed", int, 0, 2**63 - 1),
)


def sampling_from_params(params, defaults: SamplingConfig, strings: bool) -> SamplingConfig:
    """A client's sampling parameters on top of the checkpoint's defaults: URL query strings
    (`strings=True`) or JSON numbers. Raises ValueError with a message for the client."""
    import math
    changes = {}
    for name, field, kind, low, high in CLIENT_SAMPLING_PARAMS:
        raw = params.get(name)
        if raw is None:
            continue
        what = "an integer" if kind is int else "a number"
        if strings:
            try:
                value = kind(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not {what}") from None
        else:
            if not isinstance(raw, (int, float)) or isinstance(raw, bool) or (
                    kind is int and not float(raw).is_integer()):
                raise ValueError(f"{name} must be {what}, got {raw!r}")
            value = raw
        if not (math.isfinite(value) and low <= value <= high):
            raise ValueError(f"{name}={raw!r} must be between {low} and {high}")
        changes[field] = kind(value)
    return dataclasses.replace(defaults, **changes)


__all__ = ["CLIENT_SAMPLING_PARAMS", "sampling_from_params", "LMConfig", "SamplingConfig", "PRESETS", "SAMPLE_RATE", "FRAME_RATE", "FRAME_SIZE",
           "TEXT_PAD_ID", "TEXT_EPAD_ID"]
