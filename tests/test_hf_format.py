"""HF transformers Moshi checkpoints (`kmhf/hf-moshiko` layout) -> Kyutai names: config mapping,
key sets, and numerical parity between transformers' model and moshi's reference model loaded
with the converted weights (tiny random model, fp32, CPU)."""
from __future__ import annotations

import copy

import pytest
import torch
from moshi.models import loaders
from moshi.models.lm import LMModel
from moshi.modules.gating import ActivationGating
from safetensors.torch import save_file

from duplex_agent.agent.config import LMConfig
from duplex_agent.checkpoints.hf_format import (hf_config_to_moshi, hf_mimi_config_to_moshi, hf_to_kyutai_lm,
                                   hf_to_kyutai_mimi, is_hf_moshi_state, read_hf_checkpoint)
from duplex_agent.checkpoints.kyutai_format import moshi_to_disk

transformers = pytest.importorskip("transformers")

B, T = 2, 6
TEXT_CARD, CARD = 256, 128
# Tiny Mimi: 800 Hz, hop 8 -> 100 Hz encoder rate, 50 Hz frames of 16 samples.
MIMI = dict(sampling_rate=800, hidden_size=32, num_filters=4, upsampling_ratios=[4, 2],
            codebook_size=64, codebook_dim=16, vector_quantization_hidden_dimension=16,
            num_quantizers=8, num_hidden_layers=2, intermediate_size=64, num_attention_heads=2,
            num_key_value_heads=2, upsample_groups=32)
MIMI_FRAME = 16


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def _randomise(model: torch.nn.Module, g: torch.Generator) -> None:
    """Replace HF's init (unit norms, zero codebooks, ...) so every tensor matters numerically."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 or name.endswith("bias"):
                p.normal_(0.0, 0.1, generator=g)
            else:  # norm weights, layer scales
                p.normal_(1.0, 0.1, generator=g)
        for name, buf in model.named_buffers():
            if name.endswith("cluster_usage"):
                buf.uniform_(0.5, 2.0, generator=g)
        # Codebook vectors (embed_sum / cluster_usage) at the scale of the projected latent, so
        # that encoding picks varied codes.
        for name, buf in model.named_buffers():
            if name.endswith("embed_sum"):
                usage = model.get_buffer(name.replace("embed_sum", "cluster_usage"))
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.2 * usage[:, None])


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    config = transformers.MoshiConfig(
        vocab_size=TEXT_CARD, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        ffn_dim=352, audio_vocab_size=CARD, num_codebooks=8, audio_encoder_config=dict(MIMI),
        # transformers 4.57 ignores top-level depth_* kwargs.
        depth_decoder_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  ffn_dim=176),
    )
    model = transformers.MoshiForConditionalGeneration(config).eval()
    _randomise(model, torch.Generator().manual_seed(1))
    return model


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf_moshi")
    hf_model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def converted(hf_dir):
    config, state = read_hf_checkpoint(hf_dir)
    lm_kwargs = hf_config_to_moshi(config)
    lm = LMModel(**lm_kwargs, dtype=torch.float32).eval()
    lm_state = hf_to_kyutai_lm(state, lm_kwargs)
    lm.load_state_dict(lm_state, strict=True)
    mimi_cfg = hf_mimi_config_to_moshi(config["audio_encoder_config"])
    mimi_state = hf_to_kyutai_mimi(state, mimi_cfg)
    return dict(config=config, state=state, lm_kwargs=lm_kwargs, lm=lm, lm_state=lm_state,
                mimi_cfg=mimi_cfg, mimi_state=mimi_state)


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(2)
    # Include the init ids (TEXT_CARD, CARD): they have embedding rows in both models.
    text = torch.randint(0, TEXT_CARD + 1, (B, T), generator=g)
    audio = torch.randint(0, CARD + 1, (B, 16, T), generator=g)  # Moshi cb0..7, user cb0..7
    return text, audio


@pytest.fixture(scope="module")
def hf_text_out(hf_model, tokens):
    text, audio = tokens
    with torch.no_grad():
        # HF sums text_emb(text) + embed_tokens[0..7](Moshi codes) + embed_tokens[8..15](user
        # codes): the same 17 streams, in the same order, as moshi's forward_text. The explicit
        # mask keeps attention causal whatever the attention implementation.
        return hf_model(input_ids=text, moshi_audio_codes=audio[:, :8],
                        user_audio_codes=audio[:, 8:],
                        attention_mask=torch.ones(B, T, dtype=torch.long))


# -- configs -------------------------------------------------------------------------------------
def test_layout_detection(converted):
    assert is_hf_moshi_state(converted["state"])
    assert not is_hf_moshi_state(converted["lm_state"])
    assert not is_hf_moshi_state(converted["mimi_state"])


def test_moshiko_defaults_map_to_moshi_defaults():
    # An HF config that states nothing is the real moshiko / kyutai-mimi architecture.
    kwargs = hf_config_to_moshi({})
    assert kwargs["hidden_scale"] == 4.125  # ffn_dim 22528
    assert kwargs["depformer_dim_feedforward"] == 4224  # depth ffn_dim 5632
    assert kwargs == loaders._lm_kwargs
    assert kwargs == LMConfig.moshiko().to_moshi_lm_kwargs()
    assert LMConfig.from_moshi_json(kwargs) == LMConfig.moshiko()
    assert hf_mimi_config_to_moshi({}) == loaders._mimi_config


def test_flattened_depth_config_of_older_transformers(converted):
    config = {k: v for k, v in converted["config"].items() if k != "depth_decoder_config"}
    for key, value in converted["config"]["depth_decoder_config"].items():
        config[f"depth_{key}"] = value
    assert hf_config_to_moshi(config) == converted["lm_kwargs"]


@pytest.mark.parametrize("dim, hidden", [(4096, 11264), (1024, 2816), (64, 176), (64, 88),
                                         (64, 101), (48, 128)])
def test_ffn_width_round_trips_through_moshi_gating(dim, hidden):
    # (48, 128): 1.5 * 128 == 4 * 48 would trigger moshi's 21/8 rule, so another width is needed.
    arch = {"hidden_size": dim, "num_attention_heads": 4, "ffn_dim": 2 * hidden}
    kwargs = hf_config_to_moshi(dict(arch, depth_decoder_config=dict(arch)))
    for width, dim_feedforward in ((dim, int(kwargs["hidden_scale"] * dim)),
                                   (dim, kwargs["depformer_dim_feedforward"])):
        gating = ActivationGating(width, dim_feedforward, torch.nn.functional.silu, device="meta")
        assert gating.linear_out.in_features == hidden


def test_unsupported_variants_are_refused(converted):
    with pytest.raises(ValueError, match="grouped-query"):
        hf_config_to_moshi({"num_key_value_heads": 8})
    with pytest.raises(ValueError, match="rms_norm_eps"):
        hf_config_to_moshi({"rms_norm_eps": 1e-6})
    with pytest.raises(ValueError, match="use_conv_shortcut"):
        hf_mimi_config_to_moshi({"use_conv_shortcut": True})
    state = dict(converted["state"], **{"decoder.model.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected"):
        hf_to_kyutai_lm(state, converted["lm_kwargs"])


# -- reading -------------------------------------------------------------------------------------
def test_sharded_checkpoint_reads_like_a_single_file(hf_model, converted, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="500KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    config, state = read_hf_checkpoint(tmp_path)
    assert config == converted["config"]
    assert state.keys() == converted["state"].keys()
    assert all(torch.equal(state[k], converted["state"][k]) for k in state)


# -- LM ------------------------------------------------------------------------------------------
def test_lm_key_set_is_moshis_on_disk_set(converted):
    reference = moshi_to_disk(LMModel(**converted["lm_kwargs"], device="meta").state_dict())
    assert converted["lm_state"].keys() == reference.keys()
    for key, value in reference.items():
        assert converted["lm_state"][key].shape == value.shape, key


def test_converted_lm_loads_through_moshis_file_loader(converted, tmp_path):
    path = tmp_path / "model.safetensors"
    # Per-codebook depformer tensors are views of HF's stacked ones: clone to save them.
    save_file({k: v.clone() for k, v in converted["lm_state"].items()}, str(path))
    lm = loaders.get_moshi_lm(path, lm_kwargs=converted["lm_kwargs"], dtype=torch.float32)
    for key, value in converted["lm"].state_dict().items():
        assert torch.equal(lm.state_dict()[key], value), key


def test_text_logits_match_transformers(converted, tokens, hf_text_out):
    lm = converted["lm"]
    text, audio = tokens
    sequence = torch.cat([text[:, None], audio], dim=1)  # [B, 17, T]
    with torch.no_grad():
        hidden, logits = lm.forward_text(sequence)
        with lm.streaming(B):
            steps = [lm.forward_text(sequence[:, :, t:t + 1])[1] for t in range(T)]
    streamed = torch.cat(steps, dim=2)
    assert rel_err(hidden, hf_text_out.last_hidden_state) < 1e-5
    assert rel_err(logits[:, 0], hf_text_out.logits) < 1e-5
    assert rel_err(streamed[:, 0], hf_text_out.logits) < 1e-5


def test_depth_logits_match_transformers(converted, hf_model, tokens, hf_text_out):
    lm = converted["lm"]
    text, audio = tokens
    audio = audio.clamp(max=CARD - 1)  # depformer inputs are sampled tokens, never the init id
    hidden = hf_text_out.last_hidden_state  # [B, T, D], after the final norm in both models
    # HF: one depth sequence per (batch, time): [text, cb0..cb6] against that step's hidden state.
    depth_ids = torch.cat([text.reshape(-1, 1), audio[:, :7].transpose(1, 2).reshape(B * T, 7)], 1)
    with torch.no_grad():
        expected = hf_model.depth_decoder(
            input_ids=depth_ids, last_hidden_state=hidden.reshape(B * T, 1, -1),
            attention_mask=torch.ones(B * T, 8, dtype=torch.long), use_cache=False,
        ).logits.view(B, T, 8, CARD).transpose(1, 2)  # [B, 8, T, card]
        sequence = torch.cat([text[:, None], audio], dim=1)
        teacher_forced = lm.forward_depformer_training(sequence, hidden)
        streamed = []
        for t in range(T):  # as LMGen.depformer_step: fresh depformer state per time step
            with lm.depformer.streaming(B):
                for k in range(8):
                    token = text[:, t] if k == 0 else audio[:, k - 1, t]
                    streamed.append(
                        lm.forward_depformer(k, token[:, None, None], hidden[:, t:t + 1]))
    streamed = torch.cat(streamed, dim=1).view(B, T, 8, CARD).transpose(1, 2)
    assert rel_err(teacher_forced, expected) < 1e-5
    assert rel_err(streamed, expected) < 1e-5


# -- Mimi ----------------------------------------------------------------------------------------
def test_mimi_config_structure(converted):
    cfg = converted["mimi_cfg"]
    assert cfg.keys() == loaders._mimi_config.keys()
    for part in ("seanet", "quantizer", "transformer"):
        assert cfg[part].keys() == loaders._mimi_config[part].keys()
    assert cfg["frame_rate"] == 50.0


def test_mimi_matches_transformers(converted, hf_model, tmp_path):
    cfg, state = converted["mimi_cfg"], converted["mimi_state"]
    mimi = loaders.get_mimi(None, mimi_config=copy.deepcopy(cfg))
    mimi.load_state_dict(state, strict=True)
    path = tmp_path / "mimi.safetensors"
    save_file(state, str(path))
    from_file = loaders.get_mimi(path, mimi_config=copy.deepcopy(cfg))  # moshi's own loading path

    hf_mimi = hf_model.audio_encoder
    wav = 0.3 * torch.randn(1, 1, 25 * MIMI_FRAME, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        latent = hf_mimi.encoder(wav)
        latent = hf_mimi.encoder_transformer(latent.transpose(1, 2), return_dict=True)
        latent = hf_mimi.downsample(latent.last_hidden_state.transpose(1, 2))
        hf_codes = hf_mimi.encode(wav, num_quantizers=8).audio_codes
        hf_wav = hf_mimi.decode(hf_codes).audio_values
        assert rel_err(mimi._encode_to_unquantized_latent(wav), latent) < 1e-5
        for model in (mimi, from_file):
            assert torch.equal(model.encode(wav), hf_codes)
            assert rel_err(model.decode(hf_codes), hf_wav) < 1e-5
    assert hf_codes.shape == (1, 8, 25)
    assert len(hf_codes.unique()) > 8  # the codes really vary


# -- through our loader and our model ------------------------------------------------------------
def test_our_loader_and_model_match_transformers(hf_dir, hf_model, tokens, hf_text_out, tmp_path):
    """The transformers-format directory through `load_checkpoint` into our MoshiLM: the same
    text and depth logits as transformers computes."""
    import shutil

    from duplex_agent.checkpoints.loader import load_checkpoint
    from duplex_agent.checkpoints.tiny_random import tiny_tokenizer_bytes

    directory = tmp_path / "hf"
    shutil.copytree(hf_dir, directory)
    (directory / "tokenizer.model").write_bytes(tiny_tokenizer_bytes())  # 256 pieces = TEXT_CARD
    model = load_checkpoint(str(directory), device="cpu").model
    model.setup_caches(B)
    text, audio = tokens
    run = torch.ones(B, dtype=torch.bool)
    text_logits, hidden = [], []
    with torch.no_grad():
        for t in range(T):
            step_tokens = torch.cat([text[:, t:t + 1], audio[:, :, t]], dim=1)  # [B, 17]
            h, logits = model.forward_temporal(step_tokens, torch.full((B,), t), run)
            text_logits.append(logits)
            hidden.append(h)
        assert rel_err(torch.stack(text_logits, 1), hf_text_out.logits) < 1e-5
        assert rel_err(torch.stack(hidden, 1), hf_text_out.last_hidden_state) < 1e-5

        audio_in = audio.clamp(max=CARD - 1)
        depth_ids = torch.cat([text.reshape(-1, 1),
                               audio_in[:, :7].transpose(1, 2).reshape(B * T, 7)], 1)
        expected = hf_model.depth_decoder(
            input_ids=depth_ids, last_hidden_state=hf_text_out.last_hidden_state.reshape(B * T, 1, -1),
            attention_mask=torch.ones(B * T, 8, dtype=torch.long), use_cache=False,
        ).logits.view(B, T, 8, CARD)
        ours = torch.stack([torch.stack([
            model.forward_depformer(k, hidden[t], text[:, t] if k == 0 else audio_in[:, k - 1, t],
                                    run) for k in range(8)], 1) for t in range(T)], 1)
    assert rel_err(ours, expected) < 1e-5
