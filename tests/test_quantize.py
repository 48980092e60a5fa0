"""int8 (q8) weights against the moshi library: a tiny model quantised by moshi's own routine
(`moshi.utils.quantize.replace_linear_with_qlinear`, bitsandbytes' row-wise int8), saved as Kyutai
saves q8 checkpoints, loaded through our loader.

What "moshi's math" is for q8: moshi's `QLinear` calls `bitsandbytes.matmul`; on CPU that is
`MatMul8bitFp`, which dequantises the weight (weight * weight_scb / 127) and multiplies in
float16; on CUDA it is LLM.int8 (activations quantised to int8 too). Our weight-only int8 GEMM
applies the same dequantised weight in the activations' precision (fp32 here). So tokens and
logits are compared, tightly, with moshi's `LMGen` running the dequantised weights (dequantised
by bitsandbytes' own `int8_vectorwise_dequant`), and, loosely, with moshi's `QLinear` forward
itself (float16 arithmetic: logits within 5e-3 relative while the two runs' tokens agree).
"""
from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch
from moshi.models import loaders
from safetensors.torch import save_file

from duplex_agent.agent.config import LMConfig, SamplingConfig
from duplex_agent.agent.engine import (CapacityError, Engine, conversations_on_device,
                                       model_weight_bytes)
from duplex_agent.agent.model import Int8Linear
from duplex_agent.checkpoints.kyutai_format import moshi_to_disk
from duplex_agent.checkpoints.loader import load_checkpoint
from duplex_agent.checkpoints.quantize import quantize_rows, weight_bytes
from duplex_agent.checkpoints.tiny_random import TINY_SEED, write_checkpoint_dir
from duplex_agent.kernels.selfcheck import FUSED_TOL
from duplex_agent.kernels.int8_gemm import int8_linear_ref, int8_linear_triton
from tests.test_parity import _rel_err, _run_ours, _run_reference, _user_codes

bnb_functional = pytest.importorskip("bitsandbytes.functional")
from moshi.utils.quantize import QLinear, replace_linear_with_qlinear  # noqa: E402

STEPS = 110  # > 2x the tiny context (50): the ring KV cache wraps twice
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def moshi_q8_model(seed: int = 1234):
    """moshi's tiny LMModel, quantised by moshi's own routine (every Linear -> QLinear)."""
    torch.manual_seed(seed)
    model = loaders.get_moshi_lm(None, lm_kwargs=LMConfig.tiny().to_moshi_lm_kwargs(),
                                 dtype=torch.float32, device="cpu").eval()
    replace_linear_with_qlinear(model)
    return model


def moshi_dequantised(q8) -> torch.nn.Module:
    """The same architecture without quantisation, holding q8's weights as bitsandbytes
    dequantises them: moshi's dequantised math, run by moshi's own modules."""
    model = loaders.get_moshi_lm(None, lm_kwargs=LMConfig.tiny().to_moshi_lm_kwargs(),
                                 dtype=torch.float32, device="cpu").eval()
    state = q8.state_dict()
    dense = {k: (bnb_functional.int8_vectorwise_dequant(v, state[k + "_scb"]) if v.dtype == torch.int8
                 else v) for k, v in state.items() if not k.endswith("_scb")}
    model.load_state_dict(dense, strict=True)
    return model


def write_q8_checkpoint(path, q8):
    """Kyutai's q8 layout: model.q8.safetensors (on-disk names, fused per-step weights and their
    `_scb` twins) and a config.json with "quantize": true naming it."""
    ckpt = write_checkpoint_dir(path)
    (ckpt / "model.safetensors").unlink()
    save_file(moshi_to_disk({k: v.detach() for k, v in q8.state_dict().items()}),
              str(ckpt / "model.q8.safetensors"))
    config = json.loads((ckpt / "config.json").read_text())
    config.update(moshi_name="model.q8.safetensors", quantize=True)
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt


@pytest.fixture(scope="module")
def q8(tmp_path_factory):
    ref = moshi_q8_model()
    ckpt = write_q8_checkpoint(tmp_path_factory.mktemp("q8"), ref)
    bundle = load_checkpoint(str(ckpt), "cpu")
    return ref, moshi_dequantised(ref), bundle


def assert_int8_in_memory(model, cfg):
    int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
    # text_linear, depformer_in x8, linears x8, out_proj + 2 FFN linears per temporal layer,
    # out_proj + 8 x 2 FFN linears per depformer layer.
    assert len(int8) == 1 + 2 * cfg.dep_q + 3 * cfg.num_layers + (1 + 2 * cfg.dep_q) * cfg.depformer_num_layers
    for m in int8:
        assert m.weight.dtype == torch.int8 and m.weight_scb.dtype == torch.float32
    for layer in list(model.transformer.layers) + list(model.depformer.layers):
        assert layer.self_attn.in_proj_weight.dtype == torch.int8
        assert layer.self_attn.in_proj_weight_scb.dtype == torch.float32
    # Nothing dequantised kept around: the bytes held are what the capacity arithmetic counts
    # (int8 linears, float32 scales, the rest in float32 here), and no float linear is left.
    assert weight_bytes(model) == model_weight_bytes(cfg, torch.float32)
    assert weight_bytes(model) < model_weight_bytes(replace(cfg, quantize=False), torch.float32) / 2
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())


def test_q8_checkpoint_stays_int8(q8):
    ref, _, bundle = q8
    assert bundle.config.quantize and bundle.model.cfg.quantize
    assert_int8_in_memory(bundle.model, bundle.config)
    # The int8 bytes and scales are moshi's, unchanged by loading.
    ours = bundle.model.transformer.layers[0].gating.linear_in
    theirs = ref.transformer.layers[0].gating.linear_in
    assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.weight_scb, theirs.weight_scb)
    stacked = bundle.model.depformer.layers[1].self_attn
    per_step = ref.depformer.layers[1].self_attn.in_projs
    assert torch.equal(stacked.in_proj_weight, torch.cat([p.weight for p in per_step]))
    assert torch.equal(stacked.in_proj_weight_scb, torch.cat([p.weight_scb for p in per_step]))


def test_q8_greedy_tokens_and_logits_match_moshi(q8):
    _, dense, bundle = q8
    codes = _user_codes(bundle.config, STEPS, seed=7)
    ref_text, ref_audio, ref_frames = _run_reference(dense, codes, use_sampling=False)
    our_text, our_audio, our_frames = _run_ours(bundle.model, codes, SamplingConfig(greedy=True))
    assert _rel_err(our_text, ref_text) <= 1e-5
    assert _rel_err(our_audio, ref_audio) <= 1e-5
    for t in range(1, STEPS):
        assert torch.equal(ref_frames[t], our_frames[t]), f"step {t}"
    assert len(set(torch.stack(our_frames[1:])[:, 0].tolist())) > 5  # not a degenerate run
    assert_int8_in_memory(bundle.model, bundle.config)  # still int8 after running


def test_q8_logits_close_to_moshis_qlinear(q8):
    """moshi's QLinear forward itself (bitsandbytes on CPU: float16 arithmetic): logits within
    5e-3 relative over the steps where both runs still chose the same tokens (float16 rounding
    eventually flips a near-tie, after which the conversations differ)."""
    ref, _, bundle = q8
    assert isinstance(ref.text_linear, QLinear)
    codes = _user_codes(bundle.config, 30, seed=7)
    ref_text, ref_audio, ref_frames = _run_reference(ref, codes, use_sampling=False)
    our_text, our_audio, our_frames = _run_ours(bundle.model, codes, SamplingConfig(greedy=True))
    agree = 1
    while agree < len(ref_frames) and torch.equal(ref_frames[agree], our_frames[agree]):
        agree += 1
    assert agree >= 10
    # Frames are re-aligned (delayed codebooks come out one step later): steps before the
    # frame that first differs had the same inputs and choices everywhere.
    same = agree - 2
    assert _rel_err(our_text[:same], ref_text[:same]) <= 5e-3
    assert _rel_err(our_audio[:same], ref_audio[:same]) <= 5e-3


def test_quantize_flag_makes_moshis_q8_bytes(tmp_path):
    """--quantize int8 on a float checkpoint gives exactly the int8 weights and scales that
    moshi's routine makes from the same weights, and runs like the q8 checkpoint."""
    ckpt = write_checkpoint_dir(tmp_path / "fp32")
    ours = load_checkpoint(str(ckpt), "cpu", quantize="int8")
    assert ours.config.quantize
    assert_int8_in_memory(ours.model, ours.config)
    ref = moshi_q8_model(TINY_SEED)
    expected = moshi_to_disk({k: v.detach() for k, v in ref.state_dict().items()})
    got = ours.model.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


def test_quantize_rows_is_bitsandbytes():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(37, 53, generator=g) * torch.rand(37, 1, generator=g) * 4
    q, scale = quantize_rows(w)
    q_ref, scale_ref, _ = bnb_functional.int8_vectorwise_quant(w.to(torch.float16))
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
    w[5] = 0  # an all-zero row stays zero (bitsandbytes would divide by zero)
    q, scale = quantize_rows(w)
    assert not q[5].any() and scale[5] == 0


# -- the kernel ------------------------------------------------------------------------------------

KERNEL = pytest.mark.skipif(not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                            reason="no CUDA and the Triton interpreter is not enabled")
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skipif(
              not CUDA, reason="bf16 tl ops are wrong in the Triton interpreter"))]
# fp32: summation order only; fp16/bf16: one rounding of the output.
TOL = FUSED_TOL  # the load-time self-check's


@KERNEL
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,K", [(1, 33, 17), (3, 100, 257), (17, 64, 130), (65, 48, 96)])
def test_int8_kernel_matches_reference(dtype, B, N, K):
    pytest.importorskip("triton")
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, K, generator=g) * 2).to(DEVICE, dtype)
    w, scale = quantize_rows(torch.randn(N, K, generator=g))
    w, scale = w.to(DEVICE), scale.to(DEVICE)
    y = int8_linear_triton(x, w, scale)
    assert y.dtype == dtype and y.shape == (B, N)
    ref = int8_linear_ref(x, w, scale)
    # Sums of K terms cancel: absolute errors scale with the outputs' size, not each output's.
    atol = TOL[dtype] * ref.float().abs().max().item()
    ctx = f"seed={seed} B={B} N={N} K={K} {dtype}"
    torch.testing.assert_close(y.float(), ref.float(), rtol=TOL[dtype], atol=atol, msg=ctx)
    # The reference is moshi's dequantised weight applied to x.
    dense = x.float() @ (w.float() * (scale / 127).unsqueeze(1)).t()
    torch.testing.assert_close(ref.float(), dense, rtol=TOL[dtype], atol=atol, msg=ctx)
    # Rows of a stacked weight (one depformer step) are read in place.
    rows = slice(N // 3, N // 3 + 16)
    torch.testing.assert_close(int8_linear_triton(x, w[rows], scale[rows]).float(),
                               ref[:, rows].float(), rtol=TOL[dtype], atol=atol, msg=ctx)


@KERNEL
def test_int8_kernel_refuses_bad_shapes():
    pytest.importorskip("triton")
    x = torch.zeros(2, 8, device=DEVICE)
    w = torch.zeros(4, 8, dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match="int8"):
        int8_linear_triton(x, w.float(), torch.ones(4, device=DEVICE))
    with pytest.raises(ValueError, match="columns"):
        int8_linear_triton(torch.zeros(2, 7, device=DEVICE), w, torch.ones(4, device=DEVICE))
    with pytest.raises(ValueError, match="scale"):
        int8_linear_triton(x, w, torch.ones(4, device=DEVICE, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        int8_linear_triton(torch.zeros(2, 1, 8, device=DEVICE), w, torch.ones(4, device=DEVICE))
    # Columns that are not contiguous are gathered, not refused.
    xt = torch.arange(16.0, device=DEVICE).view(8, 2).t()
    assert torch.equal(int8_linear_triton(xt, torch.ones(4, 8, dtype=torch.int8, device=DEVICE),
                                          torch.full((4,), 127.0, device=DEVICE)),
                       xt.sum(1, keepdim=True).expand(2, 4))


@KERNEL
def test_q8_model_on_the_triton_kernel(q8, monkeypatch):
    """The whole q8 model with its every linear on the Triton kernel (the interpreter on CPU;
    the other kernels are tested in test_parity): the same greedy tokens as moshi's dequantised
    math."""
    import copy

    import duplex_agent.kernels.int8_gemm as int8_gemm
    _, dense, bundle = q8
    steps = 4  # the interpreter costs ~40 ms per launch, 97 launches per step
    codes = _user_codes(bundle.config, steps, seed=9)
    _, _, ref_frames = _run_reference(dense, codes, use_sampling=False)
    monkeypatch.setattr(int8_gemm, "use_triton", lambda x, kernel: True)
    launches = []
    triton_impl = int8_gemm.int8_linear_triton
    monkeypatch.setattr(int8_gemm, "int8_linear_triton",
                        lambda *a: launches.append(1) or triton_impl(*a))
    model = copy.deepcopy(bundle.model).to(DEVICE)
    _, _, our_frames = _run_ours(model, codes.to(DEVICE), SamplingConfig(greedy=True))
    cfg = bundle.config
    per_step = 1 + 4 * cfg.num_layers + cfg.dep_q * (2 + 4 * cfg.depformer_num_layers)
    assert len(launches) == steps * per_step
    for t in range(1, steps):
        assert torch.equal(ref_frames[t], our_frames[t].cpu()), f"step {t}"


# -- capacity ----------------------------------------------------------------------------------------

def test_moshiko_weights_and_capacity():
    """The real moshiko shape on the meta device: int8 linears halve the weights (15.4 GB ->
    8.0 GB, as kyutai's model.q8.safetensors), which leaves room for more conversations."""
    bf16 = model_weight_bytes(LMConfig.moshiko(), torch.bfloat16)
    int8 = model_weight_bytes(LMConfig(quantize=True), torch.bfloat16)
    assert bf16 == 2 * 7_687_729_152
    assert 7.9e9 < int8 < 8.1e9
    gib = 2**30
    for size in (24, 48, 80):
        assert (conversations_on_device(LMConfig(quantize=True), torch.bfloat16, size * gib)
                > conversations_on_device(LMConfig(), torch.bfloat16, size * gib))
    assert conversations_on_device(LMConfig(), torch.bfloat16, 24 * gib) >= 1


def test_engine_reports_int8_and_refusal_offers_it():
    bundle = load_checkpoint("tiny-random", "cpu", quantize="int8")
    engine = Engine(bundle, max_sessions=1)
    described = engine.describe()
    assert described["weights"] == "int8" and described["dtype"] == "float32"
    assert described["weight_bytes"] == weight_bytes(bundle.model)
    plain = load_checkpoint("tiny-random", "cpu")
    plain_described = Engine(plain, max_sessions=1).describe()
    assert plain_described["weights"] == "float32"
    assert described["weight_bytes"] < plain_described["weight_bytes"]
    # A refusal on float weights names what --quantize int8 would fit; on int8 weights it doesn't.
    cfg = plain.config
    from duplex_agent.agent.engine import RESERVED_BYTES, bytes_per_conversation
    free = RESERVED_BYTES + 2 * bytes_per_conversation(cfg, torch.float32) - 1
    with pytest.raises(CapacityError, match=r"at most 1 fit.*--quantize int8 .*: 2 fit"):
        Engine(plain, max_sessions=3, free_bytes=free)
    with pytest.raises(CapacityError, match=r"weights \(int8") as refused:
        Engine(bundle, max_sessions=3, free_bytes=free)
    assert "--quantize" not in str(refused.value)
