"""Hugging Face transformers Moshi checkpoints (`kmhf/hf-moshiko` layout) -> Kyutai on-disk names.

transformers' `MoshiForConditionalGeneration` stores the same weights as Kyutai's
`model.safetensors` + Mimi file, reorganised:

- the temporal transformer lives under `decoder.model.*` with q/k/v split and the **q and k rows
  permuted** per head (`view(heads, d/2, 2, dim).transpose(1, 2)`), which turns Kyutai's interleaved
  RoPE into the "rotate half" RoPE of Llama-style code. Kyutai weights need interleaved RoPE, so we
  apply the inverse permutation;
- norms are `[dim]` vectors (`*_layernorm.weight`) instead of `[1, 1, dim]` `alpha`s;
- the depth transformer (`depth_decoder.*`) stacks its 8 per-codebook matrices in `[8, out, in]`
  tensors; Kyutai stacks attention along rows (`[8*out, in]`) and keeps one module per step for
  the gating FFN, `depformer_in` and the output heads;
- Mimi is bundled under `audio_encoder.*` with its own renames (see `hf_to_kyutai_mimi`).

The HF config has no delays (HF hard-codes "codebook 0 undelayed, the others one step late") and
no text padding id; we fill in Moshi's. Everything here is plain tensor work: transformers is not
needed to read or convert a checkpoint.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file

from duplex_agent.agent.config import TEXT_PAD_ID, gating_hidden

# Constructor defaults of transformers' MoshiConfig / MoshiDepthConfig / MimiConfig (= the real
# moshiko and kyutai/mimi architecture): a config.json may omit values equal to them.
_MOSHI_DEFAULTS = dict(
    vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=None, head_dim=None, audio_vocab_size=None, rope_theta=10000.0,
    hidden_act="silu", sliding_window=3000, ffn_dim=22528, rms_norm_eps=1e-8, num_codebooks=8,
)
_DEPTH_DEFAULTS = dict(
    hidden_size=1024, num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=None,
    head_dim=None, hidden_act="silu", ffn_dim=5632, rms_norm_eps=1e-8, num_codebooks=None,
)
_MIMI_DEFAULTS = dict(
    sampling_rate=24000, audio_channels=1, hidden_size=512, num_filters=64, num_residual_layers=1,
    upsampling_ratios=[8, 6, 5, 4], kernel_size=7, last_kernel_size=3, residual_kernel_size=3,
    dilation_growth_rate=2, use_causal_conv=True, pad_mode="constant", compress=2,
    trim_right_ratio=1.0, codebook_size=2048, codebook_dim=256, num_quantizers=32,
    use_conv_shortcut=False, vector_quantization_hidden_dimension=256, num_semantic_quantizers=1,
    upsample_groups=512, num_hidden_layers=8, intermediate_size=2048, num_attention_heads=8,
    num_key_value_heads=8, head_dim=None, hidden_act="gelu", norm_eps=1e-5, rope_theta=10000.0,
    sliding_window=250, layer_scale_initial_scale=0.01, attention_bias=False,
)
# moshi hard-codes these epsilons: `rms_norm_f32` (LM) and `layer_norm` (Mimi).
_LM_NORM_EPS = 1e-8
_MIMI_NORM_EPS = 1e-5
# HF's Mimi always halves the encoder frame rate with one stride-2 convolution.
_MIMI_DOWNSAMPLE_STRIDE = 2


# -- recognising and reading ---------------------------------------------------------------------
def is_hf_moshi_state(keys: Iterable[str]) -> bool:
    """True for a transformers `MoshiForConditionalGeneration` state dict. Kyutai's Mimi file also
    has `decoder.model.{i}...` keys, hence the more specific prefixes."""
    return any(k.startswith(("depth_decoder.", "decoder.model.layers.", "decoder.lm_head."))
               for k in keys)


def read_hf_checkpoint(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read `config.json` and the weights of a transformers checkpoint directory: the shards named
    by `model.safetensors.index.json` when present, else every `*.safetensors` file."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {directory}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(directory / name))
    return config, state


# -- configs -------------------------------------------------------------------------------------
def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"HF Moshi config: {message}")


def _lm_configs(config: dict) -> tuple[dict, dict]:
    """(temporal, depth) HF configs with defaults filled in. Current transformers nests the depth
    config in `depth_decoder_config`; early versions of the port flattened it as `depth_*` keys."""
    main = _MOSHI_DEFAULTS | {k: v for k, v in config.items() if k in _MOSHI_DEFAULTS}
    nested = config.get("depth_decoder_config")
    if nested is None:
        nested = {k[len("depth_"):]: v for k, v in config.items() if k.startswith("depth_")}
    depth = _DEPTH_DEFAULTS | {k: v for k, v in nested.items() if k in _DEPTH_DEFAULTS}
    return main, depth


def audio_encoder_config(config: dict) -> dict:
    # `audio_encoder` is the key used by early versions of the port.
    return config.get("audio_encoder_config") or config.get("audio_encoder") or {}


def _check_attention(cfg: dict, where: str) -> None:
    dim, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    _require(dim % heads == 0, f"{where}: hidden_size {dim} not divisible by {heads} heads")
    _require(cfg["head_dim"] in (None, dim // heads), f"{where}: head_dim != hidden_size / heads")
    _require(cfg["num_key_value_heads"] in (None, heads),
             f"{where}: grouped-query attention (num_key_value_heads != heads) is not supported")


def _dim_feedforward_for(dim: int, hidden: int, where: str) -> int:
    """moshi `dim_feedforward` whose gating hidden width is `hidden` (HF's ffn_dim is the width of
    `linear_in`, i.e. 2 * hidden)."""
    first = -(-3 * hidden // 2)  # ceil(1.5 * hidden)
    for dim_feedforward in (first, first + 1, 4 * dim):
        if gating_hidden(dim, dim_feedforward) == hidden:
            return dim_feedforward
    raise ValueError(f"HF Moshi config: {where} ffn_dim {2 * hidden} has no moshi equivalent")


def _hidden_scale_for(dim: int, dim_feedforward: int) -> float:
    """Smallest float `s` with `int(s * dim) == dim_feedforward` (moshi computes the temporal FFN
    width as `int(hidden_scale * dim)`; plain division can land one ulp short)."""
    scale = dim_feedforward / dim
    while int(scale * dim) < dim_feedforward:
        scale = math.nextafter(scale, math.inf)
    return scale


def hf_config_to_moshi(config: dict) -> dict:
    """HF `MoshiForConditionalGeneration` config.json -> moshi `LMModel` kwargs (the keys of
    `LMConfig.to_moshi_lm_kwargs()`). Raises ValueError for variants moshi cannot express."""
    main, depth = _lm_configs(config)
    _check_attention(main, "decoder")
    _check_attention(depth, "depth decoder")
    _require(main["hidden_act"] == "silu" and depth["hidden_act"] == "silu",
             "only SiLU gating is supported")
    _require(main["rms_norm_eps"] == _LM_NORM_EPS and depth["rms_norm_eps"] == _LM_NORM_EPS,
             f"rms_norm_eps must be {_LM_NORM_EPS} (fixed in moshi's rms_norm_f32)")
    dep_q = main["num_codebooks"]
    _require(depth["num_codebooks"] in (None, dep_q), "depth num_codebooks != num_codebooks")
    card = main["audio_vocab_size"]
    if card is None:
        card = audio_encoder_config(config).get("codebook_size", _MIMI_DEFAULTS["codebook_size"])

    dim, depformer_dim = main["hidden_size"], depth["hidden_size"]
    dim_feedforward = _dim_feedforward_for(dim, main["ffn_dim"] // 2, "decoder")
    max_period = main["rope_theta"]
    # Per stream group (Moshi's codebooks, then the user's): semantic codebook 0 undelayed, the
    # acoustic ones one step late, as HF's build_delay_pattern_mask does; text undelayed.
    delays = [0] + ([0] + [1] * (dep_q - 1)) * 2
    return dict(
        dim=dim, text_card=main["vocab_size"], existing_text_padding_id=TEXT_PAD_ID,
        n_q=2 * dep_q, dep_q=dep_q, card=card, num_heads=main["num_attention_heads"],
        num_layers=main["num_hidden_layers"],
        hidden_scale=_hidden_scale_for(dim, dim_feedforward), causal=True, layer_scale=None,
        context=main["sliding_window"], max_period=max_period, gating="silu",
        norm="rms_norm_f32", positional_embedding="rope", depformer_dim=depformer_dim,
        depformer_dim_feedforward=_dim_feedforward_for(depformer_dim, depth["ffn_dim"] // 2,
                                                       "depth decoder"),
        depformer_num_heads=depth["num_attention_heads"],
        depformer_num_layers=depth["num_hidden_layers"], depformer_layer_scale=None,
        depformer_multi_linear=True, depformer_context=dep_q, depformer_max_period=max_period,
        depformer_gating="silu", depformer_pos_emb="none", depformer_weights_per_step=True,
        delays=delays,
    )


def hf_mimi_config_to_moshi(audio_encoder_config: dict) -> dict:
    """HF `MimiConfig` dict (`audio_encoder_config` of a Moshi config.json) -> moshi Mimi config,
    structured like `moshi.models.loaders._mimi_config` (for `get_mimi(..., mimi_config=...)`)."""
    c = _MIMI_DEFAULTS | {k: v for k, v in audio_encoder_config.items() if k in _MIMI_DEFAULTS}
    dim = c["hidden_size"]
    _check_attention(c, "audio encoder")
    for key, expected in (("use_conv_shortcut", False), ("use_causal_conv", True),
                          ("hidden_act", "gelu"), ("norm_eps", _MIMI_NORM_EPS),
                          ("trim_right_ratio", 1.0), ("attention_bias", False),
                          ("num_semantic_quantizers", 1)):
        _require(c[key] == expected, f"audio encoder {key}={c[key]!r} is not supported")
    # moshi's Mimi upsamples channel-wise and uses one dimension for codebooks and projections.
    _require(c["upsample_groups"] == dim, "audio encoder upsample_groups != hidden_size")
    _require(c["codebook_dim"] == c["vector_quantization_hidden_dimension"],
             "audio encoder codebook_dim != vector_quantization_hidden_dimension")
    sample_rate = c["sampling_rate"]
    frame_rate = sample_rate / (math.prod(c["upsampling_ratios"]) * _MIMI_DOWNSAMPLE_STRIDE)
    stated = audio_encoder_config.get("frame_rate") or audio_encoder_config.get("_frame_rate")
    _require(stated in (None, frame_rate), f"audio encoder frame_rate {stated} != {frame_rate}")
    seanet = {
        "channels": c["audio_channels"], "dimension": dim, "causal": True,
        "n_filters": c["num_filters"], "n_residual_layers": c["num_residual_layers"],
        "activation": "ELU", "compress": c["compress"], "dilation_base": c["dilation_growth_rate"],
        "disable_norm_outer_blocks": 0, "kernel_size": c["kernel_size"],
        "residual_kernel_size": c["residual_kernel_size"],
        "last_kernel_size": c["last_kernel_size"], "norm": "none", "pad_mode": c["pad_mode"],
        "ratios": list(c["upsampling_ratios"]), "true_skip": True,
    }
    quantizer = {
        "dimension": c["codebook_dim"], "n_q": c["num_quantizers"], "bins": c["codebook_size"],
        "input_dimension": dim, "output_dimension": dim,
    }
    transformer = {
        "d_model": dim, "num_heads": c["num_attention_heads"],
        "num_layers": c["num_hidden_layers"], "causal": True,
        "layer_scale": c["layer_scale_initial_scale"], "context": c["sliding_window"],
        "conv_layout": True, "max_period": c["rope_theta"], "gating": "none",
        "norm": "layer_norm", "positional_embedding": "rope",
        "dim_feedforward": c["intermediate_size"], "input_dimension": dim,
        "output_dimensions": [dim],
    }
    return {"sample_rate": sample_rate, "channels": c["audio_channels"], "frame_rate": frame_rate,
            "seanet": seanet, "quantizer": quantizer, "transformer": transformer}


# -- weights -------------------------------------------------------------------------------------
def _unpermute_rope(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of HF's `view(heads, d/2, 2, dim).transpose(1, 2)`: rows back to interleaved-RoPE
    order (pairs (2i, 2i+1) adjacent) from rotate-half order (i and i + d/2)."""
    rows, cols = weight.shape
    half = rows // num_heads // 2
    return weight.view(num_heads, 2, half, cols).transpose(1, 2).reshape(rows, cols)


class _Source:
    """Tensor lookup that remembers what was used, so leftovers can be reported."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state
        self.used: set[str] = set()

    def __call__(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise KeyError(f"HF Moshi checkpoint lacks {key!r}")
        self.used.add(key)
        return self.state[key]


def hf_to_kyutai_lm(state: dict[str, torch.Tensor], moshi_cfg: dict) -> dict[str, torch.Tensor]:
    """LM tensors of an HF Moshi state dict in Kyutai on-disk names (the key set of
    `moshi_to_disk(LMModel(**moshi_cfg).state_dict())`). `moshi_cfg` is `hf_config_to_moshi(...)`.
    `audio_encoder.*` entries are ignored; any other unused entry is an error. Outputs may be views
    of the inputs (clone before saving them side by side with safetensors)."""
    get = _Source(state)
    heads, dep_q = moshi_cfg["num_heads"], moshi_cfg["dep_q"]

    def alpha(key: str) -> torch.Tensor:
        return get(key).reshape(1, 1, -1)

    out: dict[str, torch.Tensor] = {}
    for i in range(moshi_cfg["n_q"]):
        out[f"emb.{i}.weight"] = get(f"embed_tokens.{i}.weight")
    out["text_emb.weight"] = get("decoder.model.embed_tokens.weight")
    for layer in range(moshi_cfg["num_layers"]):
        hf, ky = f"decoder.model.layers.{layer}.", f"transformer.layers.{layer}."
        q = _unpermute_rope(get(hf + "self_attn.q_proj.linear.weight"), heads)
        k = _unpermute_rope(get(hf + "self_attn.k_proj.linear.weight"), heads)
        v = get(hf + "self_attn.v_proj.linear.weight")
        out[ky + "self_attn.in_proj_weight"] = torch.cat([q, k, v], dim=0)
        out[ky + "self_attn.out_proj.weight"] = get(hf + "self_attn.o_proj.linear.weight")
        out[ky + "norm1.alpha"] = alpha(hf + "input_layernorm.weight")
        out[ky + "norm2.alpha"] = alpha(hf + "post_attention_layernorm.weight")
        out[ky + "gating.linear_in.weight"] = get(hf + "mlp.fc1.weight")
        out[ky + "gating.linear_out.weight"] = get(hf + "mlp.fc2.weight")
    out["out_norm.alpha"] = alpha("decoder.model.norm.weight")
    out["text_linear.weight"] = get("decoder.lm_head.weight")

    input_projections = get("depth_decoder.input_projections.weight")
    lm_heads = get("depth_decoder.lm_heads.weight")
    for i in range(dep_q):
        out[f"depformer_in.{i}.weight"] = input_projections[i]
        out[f"linears.{i}.weight"] = lm_heads[i]
    out["depformer_text_emb.weight"] = get("depth_decoder.text_embed_tokens.weight")
    for i in range(dep_q - 1):
        out[f"depformer_emb.{i}.weight"] = get(f"depth_decoder.embed_tokens.{i}.weight")
    for layer in range(moshi_cfg["depformer_num_layers"]):
        hf, ky = f"depth_decoder.layers.{layer}.", f"depformer.layers.{layer}."
        # No RoPE in the depformer, hence no permutation. [steps, d, d] x3 -> per step [q; k; v].
        qkv = torch.cat([get(hf + f"self_attn.{p}_proj.linear.weight") for p in "qkv"], dim=1)
        out[ky + "self_attn.in_proj_weight"] = qkv.reshape(-1, qkv.shape[-1])
        o = get(hf + "self_attn.o_proj.linear.weight")
        out[ky + "self_attn.out_proj.weight"] = o.reshape(-1, o.shape[-1])
        out[ky + "norm1.alpha"] = alpha(hf + "input_layernorm.weight")
        out[ky + "norm2.alpha"] = alpha(hf + "post_attention_layernorm.weight")
        fc1, fc2 = get(hf + "mlp.fc1.weight"), get(hf + "mlp.fc2.weight")
        for step in range(dep_q):
            out[ky + f"gating.{step}.linear_in.weight"] = fc1[step]
            out[ky + f"gating.{step}.linear_out.weight"] = fc2[step]

    leftover = sorted(k for k in state if k not in get.used and not k.startswith("audio_encoder."))
    if leftover:
        raise ValueError(f"HF Moshi checkpoint has unexpected LM entries: {leftover[:8]}")
    return out


_T = r"(encoder|decoder)_transformer\.layers\.(\d+)\."  # HF transformer layer prefix
_KT = r"\1_transformer.transformer.layers.\2."  # its Kyutai name


def _mimi_renames() -> list[tuple[re.Pattern, str]]:
    """HF Mimi name (full match) -> Kyutai Mimi file name. Decoder top-level convolutions and
    q/k/v need context and are handled in `hf_to_kyutai_mimi`."""
    rules = [
        (r"(encoder|decoder)\.layers\.(\d+)\.block\.(\d+)\.conv\.(weight|bias)",
         r"\1.model.\2.block.\3.conv.conv.\4"),
        (r"encoder\.layers\.(\d+)\.conv\.(weight|bias)", r"encoder.model.\1.conv.conv.\2"),
        (r"downsample\.conv\.weight", "downsample.conv.conv.conv.weight"),
        (r"upsample\.conv\.weight", "upsample.convtr.convtr.convtr.weight"),
        (_T + r"self_attn\.o_proj\.weight", _KT + "self_attn.out_proj.weight"),
        (_T + r"mlp\.fc([12])\.weight", _KT + r"linear\3.weight"),
        (_T + r"input_layernorm\.(weight|bias)", _KT + r"norm1.\3"),
        (_T + r"post_attention_layernorm\.(weight|bias)", _KT + r"norm2.\3"),
        (_T + r"self_attn_layer_scale\.scale", _KT + "layer_scale_1.scale"),
        (_T + r"mlp_layer_scale\.scale", _KT + "layer_scale_2.scale"),
    ]
    for hf_name, rvq in (("semantic", "rvq_first"), ("acoustic", "rvq_rest")):
        q = rf"quantizer\.{hf_name}_residual_vector_quantizer\."
        codebook = rf"quantizer.{rvq}.vq.layers.\1._codebook."
        rules += [
            (q + r"(input_proj|output_proj)\.weight", rf"quantizer.{rvq}.\1.weight"),
            (q + r"layers\.(\d+)\.codebook\.initialized", codebook + "_initialized"),
            (q + r"layers\.(\d+)\.codebook\.cluster_usage", codebook + "cluster_usage"),
            (q + r"layers\.(\d+)\.codebook\.embed_sum", codebook + "embedding_sum"),
        ]
    return [(re.compile(pattern), template) for pattern, template in rules]


_MIMI_RENAMES = _mimi_renames()
_DECODER_CONV = re.compile(r"decoder\.layers\.(\d+)\.conv\.(weight|bias)")
_QKV = re.compile(_T + r"self_attn\.([qkv])_proj\.weight")


def hf_to_kyutai_mimi(state: dict[str, torch.Tensor], mimi_cfg: dict) -> dict[str, torch.Tensor]:
    """HF Mimi tensors -> Kyutai Mimi file names (as in `tokenizer-e351c8d8-checkpoint125`), which
    `get_mimi(None, mimi_config=mimi_cfg).load_state_dict(..., strict=True)` and
    `get_mimi(path, mimi_config)` accept. `state` is either a whole HF Moshi state dict (its
    `audio_encoder.*` entries are used) or a standalone HF `MimiModel` one. `mimi_cfg` is
    `hf_mimi_config_to_moshi(...)` (the head count is needed to undo the RoPE permutation)."""
    prefix = "audio_encoder." if any(k.startswith("audio_encoder.") for k in state) else ""
    src = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    heads = mimi_cfg["transformer"]["num_heads"]
    # SEANet decoder: the first and last top-level convolutions are plain, the ones in between are
    # the transposed upsampling convolutions (Kyutai names them `convtr.convtr`).
    decoder_convs = [int(m.group(1)) for k in src if (m := _DECODER_CONV.fullmatch(k))]
    plain_convs = {min(decoder_convs), max(decoder_convs)} if decoder_convs else set()

    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in src.items():
        if m := _QKV.fullmatch(key):
            qkv.setdefault(m.expand(_KT + "self_attn."), {})[m.group(3)] = value
            continue
        if m := _DECODER_CONV.fullmatch(key):
            kind = "conv" if int(m.group(1)) in plain_convs else "convtr"
            out[f"decoder.model.{m.group(1)}.{kind}.{kind}.{m.group(2)}"] = value
            continue
        for pattern, template in _MIMI_RENAMES:
            if m := pattern.fullmatch(key):
                out[m.expand(template)] = value
                break
        else:
            raise ValueError(f"HF Mimi checkpoint has an unexpected entry {prefix + key!r}")
    for attn, parts in qkv.items():
        out[attn + "in_proj_weight"] = torch.cat(
            [_unpermute_rope(parts["q"], heads), _unpermute_rope(parts["k"], heads), parts["v"]])
    return out
