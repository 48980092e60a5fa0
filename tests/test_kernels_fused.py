"""Fused RMSNorm (+ residual add), SiLU gating and embedding-add against their torch references, fresh random
inputs every run (seed in the messages). Triton interpreter on CPU (fp32, fp16), compiled on a
GPU (bf16 too)."""
from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from duplex_agent.kernels.embedding import embed_add_ref, embed_add_triton  # noqa: E402
from duplex_agent.kernels.rms_norm import rms_norm_ref, rms_norm_triton  # noqa: E402
from duplex_agent.kernels.silu_gate import silu_gate_ref, silu_gate_triton  # noqa: E402
from duplex_agent.kernels.selfcheck import FUSED_TOL  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and the Triton interpreter is not enabled", allow_module_level=True)
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skipif(
              not CUDA, reason="bf16 tl ops are wrong in the Triton interpreter"))]
# One rounding of the output may differ (fp32 statistics summed in another order).
TOL = FUSED_TOL  # the load-time self-check's


def randn(gen, *shape, dtype, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,D", [(1, 64), (3, 100), (2, 1024), (5, 4096)])
def test_rms_norm(dtype, B, D):
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    x, add = randn(g, B, D, dtype=dtype, scale=3.0), randn(g, B, D, dtype=dtype)
    alpha = randn(g, 1, 1, D, dtype=dtype)  # the on-disk shape
    ctx = f"seed={seed} B={B} D={D} {dtype}"
    y = rms_norm_triton(x, alpha, 1e-8)
    torch.testing.assert_close(y, rms_norm_ref(x, alpha, 1e-8), rtol=TOL[dtype], atol=TOL[dtype],
                               msg=ctx)
    s, y = rms_norm_triton(x, alpha, 1e-8, add)
    s_ref, y_ref = rms_norm_ref(x, alpha, 1e-8, add)
    assert torch.equal(s, s_ref), f"residual sum differs: {ctx}"
    torch.testing.assert_close(y, y_ref, rtol=TOL[dtype], atol=TOL[dtype], msg=ctx)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H", [(1, 16), (3, 1000), (2, 2816), (4, 11264)])
def test_silu_gate(dtype, B, H):
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    gate_up = randn(g, B, 2 * H, dtype=dtype, scale=4.0)
    out = silu_gate_triton(gate_up)
    assert out.shape == (B, H) and out.dtype == dtype
    torch.testing.assert_close(out, silu_gate_ref(gate_up), rtol=TOL[dtype], atol=TOL[dtype],
                               msg=f"seed={seed} B={B} H={H} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,D", [(5, 16), (2049, 100), (129, 4096)])
def test_embed_add(dtype, N, D):
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    table = randn(g, N, D, dtype=dtype)
    ids = torch.randint(0, N, (7,), generator=g)
    ids[1], ids[4] = -1, -2  # no input (zeros), and another negative id (row 0, as the reference)
    ids = ids.to(DEVICE)
    acc = randn(g, 7, D, dtype=dtype)
    ctx = f"seed={seed} N={N} D={D} {dtype}"
    first = embed_add_triton(table, ids)
    assert torch.equal(first, embed_add_ref(table, ids)), ctx
    assert not first[1].any() and torch.equal(first[4], table[0]), ctx
    # The running sum rounds like the reference's separate add: bit for bit.
    assert torch.equal(embed_add_triton(table, ids, acc), embed_add_ref(table, ids, acc)), ctx
    # ids as a column of the model's [B, 17] token tensor: read in place, strided.
    column = torch.stack([ids, ids.flip(0)], dim=1)[:, 0]
    assert torch.equal(embed_add_triton(table, column, acc), embed_add_ref(table, ids, acc)), ctx


def test_bad_shapes_are_refused():
    x = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="alpha"):
        rms_norm_triton(x, torch.ones(4, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="add"):
        rms_norm_triton(x, torch.ones(8, device=DEVICE), 1e-5, torch.zeros(2, 4, device=DEVICE))
    with pytest.raises(ValueError, match="gate_up"):
        silu_gate_triton(torch.zeros(2, 7, device=DEVICE))
    with pytest.raises(ValueError, match="acc"):
        embed_add_triton(torch.zeros(4, 8, device=DEVICE), torch.zeros(2, dtype=torch.long,
                         device=DEVICE), torch.zeros(3, 8, device=DEVICE))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="counts on CPU tensors")
def test_fused_kernels_cut_the_launches_of_a_step():
    """On the real layer structure, the Triton path launches far fewer kernels per step, and none
    of the torch operations the fused kernels replace is left."""
    from duplex_agent.kernels.launch_count import count_step_launches
    on_torch, on_triton = count_step_launches("torch"), count_step_launches("triton")
    assert sum(on_triton.values()) * 3 < sum(on_torch.values())
    for replaced in ("rsqrt", "mean", "silu", "log", "bitwise_xor", "embedding", "clamp",
                     "_scaled_dot_product_flash_attention_for_cpu"):
        assert on_torch[replaced] > 0 and on_triton[replaced] == 0, replaced
    # Per step: 2 norms per layer + the output norm, one gating and one attention per layer.
    layers = 32 + 6 * 8
    assert on_triton["triton:_rms_norm_kernel"] == 2 * layers + 1
    assert on_triton["triton:_silu_gate_kernel"] == layers
    assert on_triton["triton:_sample_kernel"] == 9
    assert on_triton["triton:_embed_add_kernel"] == 16 + 1 + 8  # audio, text, one per depformer step
