"""LoRA adapters fused at load against the moshi library's `get_lora_moshi` (fp32, CPU): a tiny
model plus a random adapter saved as moshi-finetune saves `lora.safetensors`."""
from __future__ import annotations

import json

import pytest
import torch
from moshi.models import loaders
from moshi.modules.lora import replace_all_linear_with_lora
from safetensors.torch import load_file, save_file

from duplex_agent.agent.config import LMConfig, SamplingConfig
from duplex_agent.checkpoints.loader import CheckpointError, load_checkpoint
from duplex_agent.checkpoints.quantize import quantize_rows
from duplex_agent.checkpoints.tiny_random import TINY_SEED, write_checkpoint_dir
from tests.test_parity import _rel_err, _run_ours, _run_reference, _user_codes

RANK, SCALING = 4, 1.5
STEPS = 60  # past the tiny context (50): the ring KV cache wraps


def moshi_base():
    """moshi's tiny LMModel with tiny-random's weights (moshi's init under its seed)."""
    torch.manual_seed(TINY_SEED)
    return loaders.get_moshi_lm(None, lm_kwargs=LMConfig.tiny().to_moshi_lm_kwargs(),
                                dtype=torch.float32, device="cpu").eval()


def random_adapter(seed: int = 5) -> dict[str, torch.Tensor]:
    """Every linear's lora_A / lora_B, in moshi's in-memory names (what moshi-finetune saves:
    the trainable leaves), random and large enough to change the outputs."""
    model = moshi_base()
    replace_all_linear_with_lora(model, RANK, SCALING)
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in model.state_dict().items()
            if ".lora_A." in k or ".lora_B." in k}


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A moshi-finetune output folder: lora.safetensors and its config.json (rank, scaling)."""
    d = tmp_path_factory.mktemp("adapter")
    save_file(random_adapter(), str(d / "lora.safetensors"))
    (d / "config.json").write_text(json.dumps({"lora": True, "lora_rank": RANK,
                                               "lora_scaling": SCALING}))
    return d


@pytest.fixture(scope="module")
def reference(adapter_dir):
    """moshi's own fused model: get_lora_moshi, as its server loads LoRA checkpoints."""
    return loaders.get_lora_moshi(moshi_base(), str(adapter_dir / "lora.safetensors"),
                                  lora_rank=RANK, lora_scaling=SCALING, dtype=torch.float32,
                                  device="cpu", fuse_lora=True).eval()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return write_checkpoint_dir(tmp_path_factory.mktemp("base"))


def assert_same_as_reference(model, reference, steps=STEPS):
    codes = _user_codes(LMConfig.tiny(), steps, seed=21)
    ref_text, ref_audio, ref_frames = _run_reference(reference, codes, use_sampling=False)
    our_text, our_audio, our_frames = _run_ours(model, codes, SamplingConfig(greedy=True))
    assert _rel_err(our_text, ref_text) <= 1e-5
    assert _rel_err(our_audio, ref_audio) <= 1e-5
    for t in range(1, steps):
        assert torch.equal(ref_frames[t], our_frames[t]), f"step {t}"


def test_lora_flag_matches_get_lora_moshi(base_dir, adapter_dir, reference):
    """--lora PATH on a plain checkpoint; rank and scaling from the config.json beside it."""
    bundle = load_checkpoint(str(base_dir), "cpu", lora=adapter_dir / "lora.safetensors")
    assert_same_as_reference(bundle.model, reference)
    # The adapter really changed the model (so the match above is not the base model's).
    plain = load_checkpoint(str(base_dir), "cpu").model
    assert not torch.equal(plain.text_linear.weight, bundle.model.text_linear.weight)
    stacked = bundle.model.depformer.layers[0].self_attn.in_proj_weight
    assert not torch.equal(plain.depformer.layers[0].self_attn.in_proj_weight, stacked)


def test_bf16_base_fused_at_compute_dtype(tmp_path):
    """A bf16 checkpoint and a bf16 adapter (as published and as moshi-finetune saves them) run in
    fp32: the fused weights stay fp32, as in moshi's `get_moshi(fuse_lora=True)`; rounding them
    back to the storage dtype made greedy text drift from moshi's."""
    base = write_checkpoint_dir(tmp_path / "bf16")
    state = load_file(str(base / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(base / "model.safetensors"))
    adapter = tmp_path / "lora.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in random_adapter(seed=6).items()}, str(adapter))
    (tmp_path / "config.json").write_text(json.dumps({"lora_rank": RANK, "lora_scaling": SCALING}))
    config = json.loads((base / "config.json").read_text())
    info = loaders.CheckpointInfo(
        base / "model.safetensors", base / "mimi.safetensors", base / "tokenizer.model",
        lm_config={k: v for k, v in config.items() if not k.endswith("_name")
                   and k not in ("model_type", "lm_gen_config")}
        | {"lora": True, "lora_rank": RANK, "lora_scaling": SCALING},
        lora_weights=adapter)
    reference = info.get_moshi(device="cpu", dtype=torch.float32, fuse_lora=True).eval()
    bundle = load_checkpoint(str(base), "cpu", lora=adapter)
    assert bundle.model.text_linear.weight.dtype == torch.float32
    assert torch.equal(bundle.model.text_linear.weight, reference.text_linear.weight)
    assert_same_as_reference(bundle.model, reference, steps=110)


def test_lora_on_hibiki_zero_layout(tmp_path):
    """An adapter of a model whose depformer steps share weight sets (and whose attention has
    fewer KV heads): each shared set is fused once, as moshi fuses it."""
    from duplex_agent.checkpoints.tiny_random import (build_tiny_hibiki_zero_lm_state,
                                                      write_hibiki_zero_checkpoint_dir)
    cfg = LMConfig.tiny_hibiki_zero()

    def moshi_model():
        model = loaders.get_moshi_lm(None, lm_kwargs=cfg.to_moshi_lm_kwargs(),
                                     dtype=torch.float32, device="cpu")
        model.load_state_dict(build_tiny_hibiki_zero_lm_state())
        return model.eval()
    lora_model = moshi_model()
    replace_all_linear_with_lora(lora_model, RANK, SCALING)
    g = torch.Generator().manual_seed(9)
    adapter = {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in lora_model.state_dict().items()
               if ".lora_A." in k or ".lora_B." in k}
    assert any(".depformer.layers.0.self_attn.in_projs.3.lora_A" in f".{k}" for k in adapter)
    save_file(adapter, str(tmp_path / "lora.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"lora_rank": RANK, "lora_scaling": SCALING}))
    reference = loaders.get_lora_moshi(moshi_model(), str(tmp_path / "lora.safetensors"),
                                       lora_rank=RANK, lora_scaling=SCALING, dtype=torch.float32,
                                       device="cpu", fuse_lora=True).eval()
    base = write_hibiki_zero_checkpoint_dir(tmp_path / "hibiki")
    bundle = load_checkpoint(str(base), "cpu", lora=tmp_path / "lora.safetensors")
    # What moshi's hibiki loader adds on top (EOS read as PAD), on both sides.
    reference.text_emb.weight.data[2] = reference.text_emb.weight.data[3]
    codes = _user_codes(cfg, 24, seed=4)
    ref_text, ref_audio, ref_frames = _run_reference(reference, codes, use_sampling=False)
    our_text, our_audio, our_frames = _run_ours(bundle.model, codes, SamplingConfig(greedy=True))
    assert _rel_err(our_text, ref_text) <= 1e-5 and _rel_err(our_audio, ref_audio) <= 1e-5
    for t in range(cfg.max_delay, 24):
        assert torch.equal(ref_frames[t], our_frames[t]), f"step {t}"


def test_lora_config_keys(tmp_path, adapter_dir, reference):
    """A checkpoint whose config.json names its adapter (lora, lora_name, lora_rank,
    lora_scaling), as the moshi library reads them."""
    ckpt = write_checkpoint_dir(tmp_path / "ckpt")
    (ckpt / "adapter.safetensors").write_bytes((adapter_dir / "lora.safetensors").read_bytes())
    config = json.loads((ckpt / "config.json").read_text())
    config.update(lora=True, lora_name="adapter.safetensors", lora_rank=RANK, lora_scaling=SCALING)
    (ckpt / "config.json").write_text(json.dumps(config))
    assert_same_as_reference(load_checkpoint(str(ckpt), "cpu").model, reference, steps=8)
    # lora: true with no adapter anywhere is refused, not run with random LoRA weights.
    del config["lora_name"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="lora_name.*--lora"):
        load_checkpoint(str(ckpt), "cpu")


def test_fused_attention_names_are_accepted(tmp_path, base_dir, reference):
    """The fused `self_attn.in_proj.lora_A.weight` form (moshi's load hook splits it per step)
    gives the same model as the per-step names."""
    adapter = random_adapter()
    fused: dict[str, torch.Tensor] = {}
    for key, value in adapter.items():
        for kind in ("in_proj", "out_proj"):
            marker = f".self_attn.{kind}s."
            if marker in key:
                prefix, rest = key.split(marker)
                step, tail = rest.split(".", 1)
                fused.setdefault(f"{prefix}.self_attn.{kind}.{tail}", {})[int(step)] = value
                break
        else:
            fused[key] = value
    fused = {k: torch.cat([v[s] for s in sorted(v)]) if isinstance(v, dict) else v
             for k, v in fused.items()}
    assert any(".self_attn.in_proj.lora_A" in k for k in fused)
    save_file(fused, str(tmp_path / "lora.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"lora_rank": RANK, "lora_scaling": SCALING}))
    bundle = load_checkpoint(str(base_dir), "cpu", lora=tmp_path / "lora.safetensors")
    assert_same_as_reference(bundle.model, reference, steps=8)


def test_mismatched_adapters_are_refused(tmp_path, base_dir):
    adapter = random_adapter()
    (tmp_path / "config.json").write_text(json.dumps({"lora_rank": RANK, "lora_scaling": SCALING}))

    def load_with(state, name):
        save_file(state, str(tmp_path / name))
        return load_checkpoint(str(base_dir), "cpu", lora=tmp_path / name)

    # A key for a layer the model does not have: named in the error.
    extra = dict(adapter)
    for ab in "AB":
        extra[f"transformer.layers.7.gating.linear_in.lora_{ab}.weight"] = adapter[
            f"transformer.layers.0.gating.linear_in.lora_{ab}.weight"].clone()
    with pytest.raises(CheckpointError, match=r"match no weight.*transformer\.layers\.7\.gating"):
        load_with(extra, "extra.safetensors")
    # An adapter trained for another model size: the shapes are named.
    wrong = dict(adapter)
    wrong["text_linear.lora_A.weight"] = torch.zeros(RANK, 96)
    with pytest.raises(CheckpointError, match=r"text_linear\.lora_A \(4, 96\)"):
        load_with(wrong, "wrong.safetensors")
    # Half of a pair.
    half = {k: v for k, v in adapter.items() if k != "linears.3.lora_B.weight"}
    with pytest.raises(CheckpointError, match=r"linears\.3"):
        load_with(half, "half.safetensors")
    # A rank other than the configured lora_rank.
    (tmp_path / "config.json").write_text(json.dumps({"lora_rank": 8, "lora_scaling": SCALING}))
    with pytest.raises(CheckpointError, match="lora_rank 8"):
        load_with(adapter, "rank.safetensors")
    with pytest.raises(CheckpointError, match="no such LoRA file"):
        load_checkpoint(str(base_dir), "cpu", lora=tmp_path / "missing.safetensors")


def test_lora_then_int8(base_dir, adapter_dir, reference):
    """--lora with --quantize int8: fused first, then quantised (moshi cannot fuse into q8)."""
    bundle = load_checkpoint(str(base_dir), "cpu", lora=adapter_dir / "lora.safetensors",
                             quantize="int8")
    q, scale = quantize_rows(reference.text_linear.weight.detach())
    assert torch.equal(bundle.model.text_linear.weight, q)
    assert torch.equal(bundle.model.text_linear.weight_scb, scale)


def test_commands_take_quantize_and_lora():
    from duplex_agent.agent.options import weight_options
    from duplex_agent.cli import build_parser
    parser = build_parser()
    for argv in (["file", "in.wav", "out.wav"], ["serve"], ["local"]):
        args = parser.parse_args(argv + ["--quantize", "int8", "--lora", "a.safetensors"])
        assert weight_options(args) == {"quantize": "int8", "lora": "a.safetensors",
                                        "transcriber": None}
        assert weight_options(parser.parse_args(argv)) == {"quantize": None, "lora": None,
                                                           "transcriber": None}
