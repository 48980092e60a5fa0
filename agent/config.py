"""Model configuration: one dataclass, named presets, and moshi-style config.json interop."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Text ids with a fixed meaning in every Moshi checkpoint.
TEXT_PAD_ID = 3  # "no word right now"
TEXT_EPAD_ID = 0  # last pad before a word
TEXT_EOS_ID = 2  # end of sequence: a translating model's "translation complete"
DEFAULT_DELAYS = (0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1)
# Hibiki-Zero: text, then 16 generated and 16 source codebooks, each semantic codebook undelayed
# and the 15 acoustic ones 2 frames late.
HIBIKI_ZERO_DELAYS = (0,) + ((0,) + (2,) * 15) * 2

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
    # Grouped-query attention: num_heads // kv_repeat key/value heads, each shared by kv_repeat
    # query heads (moshi's `kv_repeat`); the KV cache holds only those.
    kv_repeat: int = 1
    # RoPE pairs: (2i, 2i+1) as moshi's "rope" (Moshi 7B), or (i, i + head_dim/2) as its
    # "rope_concat" (Hibiki-Zero).
    rope_interleaved: bool = True
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
    depformer_kv_repeat: int = 1
    # Weight set of each depformer step (moshi's `depformer_weights_per_step_schedule`): steps
    # that share a set share its input projection, attention and FFN weights. None: one per step.
    depformer_weights_per_step_schedule: tuple[int, ...] | None = None
    # A LayerNorm per generated codebook before its output head (moshi's `depformer_norm`
    # "layer_norm"); None: none.
    depformer_norm: str | None = None
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

    @classmethod
    def hibiki_zero(cls) -> "LMConfig":
        """Kyutai's Hibiki-Zero (3B, speech translation into English): GQA with 8 KV heads,
        16 generated + 16 source codebooks, 9 depformer weight sets for 16 steps. The shape for
        benchmarks and capacity; a checkpoint's own config.json decides what loads. Its depformer
        FFN (moshi's default, hidden_scale x width) makes the published 3.1 B parameters."""
        return cls(dim=2048, num_heads=16, num_layers=28, hidden_scale=6.0, context=3000,
                   max_period=20_000.0, kv_repeat=2, rope_interleaved=False, text_card=48_000,
                   n_q=32, dep_q=16, delays=HIBIKI_ZERO_DELAYS, depformer_dim=1024,
                   depformer_num_heads=16, depformer_num_layers=6, depformer_dim_feedforward=6144,
                   depformer_weights_per_step_schedule=tuple(range(8)) + (8,) * 8,
                   depformer_norm="layer_norm")

    @classmethod
    def tiny_hibiki_zero(cls) -> "LMConfig":
        """`tiny` in Hibiki-Zero's layout: 2 KV heads for 4 query heads, 16 + 16 codebooks with
        delays up to 2, half-split RoPE, 4 weight sets for 16 depformer steps, LayerNorms."""
        return cls(dim=64, num_heads=4, num_layers=2, hidden_scale=6.0, context=50,
                   max_period=20_000.0, kv_repeat=2, rope_interleaved=False, text_card=256,
                   card=128, n_q=32, dep_q=16, delays=HIBIKI_ZERO_DELAYS, depformer_dim=64,
                   depformer_num_heads=4, depformer_num_layers=2, depformer_dim_feedforward=128,
                   depformer_weights_per_step_schedule=(0, 1, 2) + (3,) * 13,
                   depformer_norm="layer_norm")

    # -- derived ---------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads // self.kv_repeat

    @property
    def depformer_num_kv_heads(self) -> int:
        return self.depformer_num_heads // self.depformer_kv_repeat

    @property
    def depformer_weight_sets(self) -> int:
        """Weight sets the depformer stores: one per step, or as many as its schedule names."""
        schedule = self.depformer_weights_per_step_schedule
        return self.dep_q if schedule is None else max(schedule) + 1

    def depformer_weight_set(self, step: int) -> int:
        schedule = self.depformer_weights_per_step_schedule
        return step if schedule is None else schedule[step]

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
    def mimi_codebooks(self) -> int:
        """Codebooks the model's Mimi must encode and decode: the generated and the user's."""
        return max(self.dep_q, self.num_user_codebooks)

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
        ) | ({"quantize": True} if self.quantize else {}) | self._variant_kwargs()

    def _variant_kwargs(self) -> dict:
        """The moshi kwargs of what differs from Moshi 7B's architecture (none for moshiko, so
        that its kwargs stay exactly moshi's defaults)."""
        out: dict = {}
        if self.kv_repeat != 1 or self.depformer_kv_repeat != 1:
            out |= {"kv_repeat": self.kv_repeat, "depformer_kv_repeat": self.depformer_kv_repeat}
        if not self.rope_interleaved:
            out["positional_embedding"] = "rope_concat"
        if self.depformer_weights_per_step_schedule is not None:
            out["depformer_weights_per_step_schedule"] = list(
                self.depformer_weights_per_step_schedule)
        if self.depformer_norm is not None:
            out["depformer_norm"] = self.depformer_norm
        if self.extra_heads_num_heads:
            out |= {"extra_heads_num_heads": self.extra_heads_num_heads,
                    "extra_heads_dim": self.extra_heads_dim}
        return out

    @classmethod
    def from_moshi_json(cls, raw: dict) -> "LMConfig":
        """Build from a moshi-style `config.json` (LM kwargs at top level, as the moshi library
        reads them). Missing keys keep the moshiko defaults; unsupported variants are refused."""
        unsupported = {
            "gating": ("silu",), "norm": ("rms_norm_f32",),
            "positional_embedding": ("rope", "rope_concat"),
            "depformer_pos_emb": ("none",), "depformer_multi_linear": (True,),
            "depformer_weights_per_step": (True,), "depformer_gating": ("silu",),
            "depformer_norm": (None, "layer_norm"),
        }
        for key, supported in unsupported.items():
            if key in raw and raw[key] not in supported:
                raise ValueError(f"config.json: {key}={raw[key]!r} is not supported "
                                 f"(this runtime implements {' or '.join(map(repr, supported))})")
        if raw.get("conditioners") or raw.get("fuser"):
            raise ValueError("config.json: conditioners (the original Hibiki's description "
                             "conditioning and classifier-free guidance) are not supported")
        for key in ("layer_scale", "depformer_layer_scale", "cross_attention"):
            if raw.get(key):
                raise ValueError(f"config.json: {key}={raw[key]!r} is not supported")
        if isinstance(raw.get("depformer_dim_feedforward"), list):
            raise ValueError("config.json: a depformer_dim_feedforward per weight set is not "
                             "supported")
        names = {f.name for f in dataclasses.fields(cls)}
        # As moshi's LMModel: the depformer inherits the temporal transformer's kv_repeat unless
        # it has its own, and its FFN is hidden_scale x its width unless given.
        kwargs = {"depformer_kv_repeat": raw.get("depformer_kv_repeat", raw.get("kv_repeat", 1)),
                  "depformer_dim_feedforward": int(raw.get("hidden_scale", cls.hidden_scale)
                                                   * raw.get("depformer_dim", cls.depformer_dim))}
        for key, value in raw.items():
            if key == "positional_embedding":
                kwargs["rope_interleaved"] = value == "rope"
            elif key == "depformer_weights_per_step_schedule":
                kwargs[key] = tuple(value) if value else None
            elif key == "existing_text_padding_id":
                kwargs["text_pad_id"] = value
            elif key == "existing_text_end_padding_id":
                kwargs["text_epad_id"] = value
            elif key == "delays":
                kwargs["delays"] = tuple(value)
            elif key == "depformer_dim_feedforward" and value is None:
                pass  # moshi's default, set above: hidden_scale x depformer_dim
            elif key in names:
                kwargs[key] = value
        cfg = cls(**kwargs)
        if len(cfg.delays) != cfg.num_codebooks:
            raise ValueError(f"config.json: {len(cfg.delays)} delays for {cfg.num_codebooks} streams")
        for heads, repeat, what in ((cfg.num_heads, cfg.kv_repeat, "kv_repeat"),
                                    (cfg.depformer_num_heads, cfg.depformer_kv_repeat,
                                     "depformer_kv_repeat")):
            if repeat < 1 or heads % repeat:
                raise ValueError(f"config.json: {what}={repeat} does not divide {heads} heads")
        schedule = cfg.depformer_weights_per_step_schedule
        if schedule is not None and (len(schedule) != cfg.dep_q or min(schedule) < 0):
            raise ValueError(f"config.json: depformer_weights_per_step_schedule has "
                             f"{len(schedule)} entries for {cfg.dep_q} depformer steps")
        return cfg


def gating_hidden(dim: int, dim_feedforward: int) -> int:
    # The reference's ActivationGating rule: 21/8 * dim when the FFN is exactly 4x, else 2/3.
    if dim_feedforward == 4 * dim:
        return (21 * dim) // 8
    return (2 * dim_feedforward) // 3


PRESETS = {"moshiko": LMConfig.moshiko, "moshika": LMConfig.moshika, "tiny": LMConfig.tiny,
           "hibiki-zero": LMConfig.hibiki_zero, "tiny-hibiki-zero": LMConfig.tiny_hibiki_zero}


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
           "TEXT_PAD_ID", "TEXT_EPAD_ID", "TEXT_EOS_ID"]
