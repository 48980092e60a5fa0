"""Triton decode attention (kernels/decode_attention.py) against the torch reference.

Without CUDA the kernels run in the Triton interpreter on CPU tensors (fp32, fp16); with CUDA
the same cases run compiled on the GPU, plus bf16 and the real model shapes. Every case draws
fresh random inputs; the seed is part of every assertion message so a failure can be replayed
with `run_case(..., seed=SEED)`.

Poisoning: cache slots the kernel must not read (outside the valid window, and the slot about to
be overwritten) hold NaN, so any stray read shows up as a non-finite output. The reference runs
on a sanitised copy (NaN -> 0), because SDPA multiplies masked-out values by 0 and 0 * NaN = NaN.
"""
from __future__ import annotations

import importlib
import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must happen before kernels.decode_attention decorates its kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import duplex_agent.kernels.decode_attention as da  # noqa: E402
from duplex_agent.kernels.attention_ref import decode_attention_ref  # noqa: E402
from duplex_agent.kernels.selfcheck import (_BITS, ATTENTION_OUT_TOL,  # noqa: E402
                                            ATTENTION_SLOT_TOL)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

if not CUDA and not isinstance(da._decode_split_kernel, InterpretedFunction):
    # Another module imported the kernels before TRITON_INTERPRET was set: decorate again.
    da = importlib.reload(da)
    if not isinstance(da._decode_split_kernel, InterpretedFunction):
        pytest.skip("no CUDA and the Triton interpreter is not enabled (TRITON_INTERPRET=0?)",
                    allow_module_level=True)

bf16_needs_gpu = pytest.mark.skipif(not CUDA, reason="bf16 tl ops are wrong in the Triton interpreter")
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16", marks=bf16_needs_gpu)]

# (atol, rtol) for the attention output and for the rotated key written into the cache: the
# load-time self-check's, so a kernel that passes here passes there.
OUT_TOL, SLOT_TOL = ATTENTION_OUT_TOL, ATTENTION_SLOT_TOL


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _poison_allocator(*shapes, device) -> None:
    """Best effort: leave NaN-filled freed blocks of the sizes the kernel is about to allocate
    (output, split workspace), so an element it forgets to write is likely to read as NaN."""
    blocks = [torch.full(s, float("nan"), device=device) for s in shapes]
    del blocks


FP8 = torch.float8_e4m3fn
FP8_NAN = 0x7F


def run_case(B, H, C, D, dtype, positions, exec_mask=None, max_period=10_000.0, *,
             num_splits=None, block_n=None, seed=None, caches=None, cache_dtype=None,
             matrix=False, kv_heads=None, interleaved=True):
    """One decode step with both implementations; checks output and both caches.

    `caches` optionally supplies (k_cache, v_cache) tensors (e.g. strided views) to fill;
    `cache_dtype` float8_e4m3fn gives narrow caches (q, k, v stay in `dtype`). `kv_heads`
    (default H) below H is grouped-query attention; `interleaved` False is half-split RoPE.
    """
    fp8 = cache_dtype == FP8
    seed = fresh_seed() if seed is None else seed
    exec_mask = [True] * B if exec_mask is None else exec_mask
    ctx = (f"seed={seed} B={B} H={H} kv_heads={kv_heads} C={C} D={D} {dtype} "
           f"positions={positions} exec={exec_mask} max_period={max_period} "
           f"interleaved={interleaved} splits={num_splits} block_n={block_n} matrix={matrix}")
    gen = torch.Generator().manual_seed(seed)
    Q, H = H, kv_heads or H  # query heads; H is the KV heads from here on

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)

    q, k, v = randn(B, Q, D), randn(B, H, D), randn(B, H, D)
    if fp8:
        k_cache, v_cache = randn(B, H, C, D).to(FP8), randn(B, H, C, D).to(FP8)
    elif caches is None:
        k_cache, v_cache = randn(B, H, C, D), randn(B, H, C, D)
    else:
        k_cache, v_cache = caches
        k_cache.copy_(randn(B, H, C, D))
        v_cache.copy_(randn(B, H, C, D))
    pos = torch.tensor(positions, dtype=torch.int64, device=DEVICE)
    ex = torch.tensor(exec_mask, dtype=torch.bool, device=DEVICE)

    slots = torch.arange(C, device=DEVICE).view(1, C)
    written = (slots == (pos % C).view(B, 1)) & ex.view(B, 1)  # [B, C]
    never_written = slots > pos.view(B, 1)
    poison = (written | never_written).view(B, 1, C, 1).expand(B, H, C, D)
    if fp8:  # masked_fill_ has no float8 kernel: poison the bytes
        k_cache.view(torch.uint8).masked_fill_(poison, FP8_NAN)
        v_cache.view(torch.uint8).masked_fill_(poison, FP8_NAN)
        k_ref, v_ref = (torch.nan_to_num(c.float(), nan=0.0).to(FP8) for c in (k_cache, v_cache))
    else:
        k_cache.masked_fill_(poison, float("nan"))
        v_cache.masked_fill_(poison, float("nan"))
        k_ref, v_ref = torch.nan_to_num(k_cache, nan=0.0), torch.nan_to_num(v_cache, nan=0.0)
    k_before, v_before = k_cache.clone(), v_cache.clone()

    ref = decode_attention_ref(q, k, v, k_ref, v_ref, pos, ex, max_period, interleaved)

    splits = num_splits or da.choose_num_splits(B * H, C, da._num_sms(torch.device(DEVICE)),
                                                 block_n or da.default_block_n(C))
    _poison_allocator((B, Q, D), (B, Q, splits, D), (B, Q, splits, 2), device=DEVICE)
    config = da.LaunchConfig(block_n or da.default_block_n(C), splits, matrix=matrix)
    out = da.decode_attention_triton(q, k, v, k_cache, v_cache, pos, ex, max_period, interleaved,
                                     num_splits=num_splits, block_n=block_n, config=config)
    assert out.shape == (B, Q, D) and out.dtype == dtype, ctx

    atol, rtol = OUT_TOL[FP8 if fp8 else dtype]
    got, want = out[ex].float().cpu(), ref[ex].float().cpu()
    assert torch.isfinite(got).all(), f"non-finite output: {ctx}"
    err = (got - want).abs().max().item() if got.numel() else 0.0
    assert torch.allclose(got, want, atol=atol, rtol=rtol), f"output max err {err:.3g}: {ctx}"

    # The written slot equals the reference's; every other element is untouched, bit for bit.
    sel = written.view(B, 1, C, 1).expand(B, H, C, D)
    atol, rtol = SLOT_TOL[FP8 if fp8 else dtype]
    assert torch.allclose(k_cache[sel].float(), k_ref[sel].float(), atol=atol, rtol=rtol), \
        f"written key differs: {ctx}"
    bits = _BITS[(FP8 if fp8 else dtype).itemsize]  # bit for bit, as the self-check compares
    assert torch.equal(v_cache[sel].view(bits), v_ref[sel].view(bits)), f"written value differs: {ctx}"
    assert torch.equal(k_cache[~sel].view(bits), k_before[~sel].view(bits)), f"key cache clobbered: {ctx}"
    assert torch.equal(v_cache[~sel].view(bits), v_before[~sel].view(bits)), f"value cache clobbered: {ctx}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [32, 64])
def test_odd_sizes(dtype, D):
    run_case(3, 5, 37, D, dtype, positions=[0, 20, 36])


@pytest.mark.parametrize("dtype", DTYPES)
def test_ring_wraparound(dtype):
    # Past the end of the ring, including a large position (RoPE at large angles).
    run_case(3, 5, 37, 32, dtype, positions=[37, 37 * 4 + 11, 100_003])


@pytest.mark.parametrize("dtype", DTYPES)
def test_window_of_one(dtype):
    # First step of each conversation; with 4 splits three of them are empty.
    run_case(2, 3, 37, 32, dtype, positions=[0, 0])
    run_case(2, 3, 37, 32, dtype, positions=[0, 0], num_splits=4, block_n=16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("position", [2999, 7001])
def test_full_long_window(dtype, position):
    # Real capacity, full window (exactly full, and wrapped); splits from the heuristic.
    run_case(1, 1, 3000, 32, dtype, positions=[position])


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_exec_mask(dtype):
    run_case(5, 3, 37, 32, dtype, positions=[0, 5, 36, 40, 500],
             exec_mask=[True, False, True, False, True])
    run_case(2, 3, 37, 32, dtype, positions=[3, 80], exec_mask=[False, False])


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_rope_depth_transformer(dtype):
    # Depth transformer: C=8, no RoPE, windows from 1 to full and wrapped.
    run_case(4, 3, 8, 64, dtype, positions=[0, 3, 7, 42], max_period=None)


@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize("num_splits", [1, 2, 3, 5])
def test_forced_splits(dtype, num_splits):
    # Small tiles so that splits span several tiles and the combine sees uneven / empty splits.
    run_case(3, 2, 37, 32, dtype, positions=[3, 36, 37 * 2 + 30],
             num_splits=num_splits, block_n=16)


def test_strided_views():
    # Caches as views of one (2, B, H, C, D) buffer (as moshi's RingKVCache stores them).
    B, H, C, D = 3, 2, 37, 32
    buf = torch.empty(2, B, H, C, D, device=DEVICE)
    run_case(B, H, C, D, torch.float32, positions=[1, 36, 90], caches=(buf[0], buf[1]),
             num_splits=2, block_n=16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matrix_variant(dtype):
    """The tl.dot variant (LaunchConfig.matrix) on the cases above: odd sizes, wrap-around, the
    first step with empty splits, a full long window, idle rows, the depth transformer, uneven
    splits."""
    run_case(3, 5, 37, 32, dtype, positions=[0, 20, 36], matrix=True)
    run_case(3, 5, 37, 64, dtype, positions=[37, 37 * 4 + 11, 100_003], matrix=True)
    run_case(2, 3, 37, 32, dtype, positions=[0, 0], num_splits=4, block_n=16, matrix=True)
    run_case(1, 1, 3000, 32, dtype, positions=[7001], matrix=True)
    run_case(5, 3, 37, 32, dtype, positions=[0, 5, 36, 40, 500],
             exec_mask=[True, False, True, False, True], matrix=True)
    run_case(4, 3, 8, 64, dtype, positions=[0, 3, 7, 42], max_period=None, matrix=True)
    run_case(3, 2, 37, 32, dtype, positions=[3, 36, 37 * 2 + 30], num_splits=3, block_n=16,
             matrix=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("matrix", [False, True], ids=["rows", "matrix"])
def test_grouped_query_attention(dtype, matrix):
    # Hibiki-Zero's layout: KV heads shared by 2 query heads (also 4, and all 6 on one), half-split
    # RoPE; one split and several, idle rows, wrap-around; the depth transformer without RoPE.
    run_case(3, 4, 37, 32, dtype, positions=[0, 36, 37 * 3 + 4], kv_heads=2, interleaved=False,
             matrix=matrix)
    run_case(3, 4, 37, 32, dtype, positions=[5, 36, 90], exec_mask=[True, False, True],
             kv_heads=2, interleaved=False, num_splits=3, block_n=16, matrix=matrix)
    run_case(2, 8, 37, 32, dtype, positions=[20, 200], kv_heads=2, num_splits=2, matrix=matrix)
    run_case(2, 6, 37, 16, dtype, positions=[3, 45], kv_heads=1, interleaved=False, matrix=matrix)
    run_case(3, 4, 16, 32, dtype, positions=[0, 9, 40], max_period=None, kv_heads=2,
             matrix=matrix)


def test_half_split_rope():
    # moshi's "rope_concat" without grouping, at large angles.
    run_case(2, 3, 37, 32, torch.float32, positions=[17, 100_003], interleaved=False)


def test_grouped_launch_heuristics():
    # A program per KV head: splits from B x Hkv, and tiles as short as the group is large.
    cpu = torch.device("cpu")
    assert da.heuristic_config(4, 16, 3000, cpu, kv_heads=8) == da.LaunchConfig(
        32, da.choose_num_splits(4 * 8, 3000, da._num_sms(cpu), 32))
    assert da.heuristic_config(4, 16, 3000, cpu) == da.heuristic_config(4, 16, 3000, cpu, 16)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                   pytest.param(torch.bfloat16, id="bf16", marks=bf16_needs_gpu)])
def test_matrix_variant_float8_cache(dtype):
    run_case(4, 3, 37, 32, dtype, positions=[0, 20, 37 * 3 + 5, 90],
             exec_mask=[True, True, True, False], cache_dtype=FP8, matrix=True)
    run_case(1, 2, 3000, 64, dtype, positions=[7001], cache_dtype=FP8, matrix=True)
    run_case(3, 4, 37, 32, dtype, positions=[0, 20, 90], kv_heads=2, interleaved=False,
             cache_dtype=FP8, num_splits=2, matrix=True)


FP8_QUERY_DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
                    pytest.param(torch.bfloat16, id="bf16", marks=bf16_needs_gpu)]


@pytest.mark.parametrize("dtype", FP8_QUERY_DTYPES)
def test_float8_cache(dtype):
    # Narrow caches: wrap-around, idle rows, a full 3000 window, the depth transformer's C=8.
    run_case(4, 3, 37, 32, dtype, positions=[0, 20, 37 * 3 + 5, 90],
             exec_mask=[True, True, True, False], cache_dtype=FP8)
    run_case(1, 2, 3000, 64, dtype, positions=[7001], cache_dtype=FP8)
    run_case(3, 2, 8, 64, dtype, positions=[0, 5, 42], max_period=None, cache_dtype=FP8)
    run_case(3, 4, 37, 32, dtype, positions=[0, 20, 90], kv_heads=2, interleaved=False,
             cache_dtype=FP8, num_splits=2)


def test_float8_rounding_matches_torch():
    # Values spanning subnormals, halfway cases and saturation: the written bytes equal torch's
    # cast (after the same clamp to +-448), bit for bit.
    D = 64
    signs = torch.tensor([1.0, -1.0]).repeat(D // 2)
    spread = 2.0 ** torch.linspace(-12, 10, D - 8) * signs[:D - 8]
    halfway = torch.tensor([1.0625, 1.1875, 2 ** -9 * 1.5, 2 ** -10, 464.0, 1000.0, -1.0625, 3.0])
    v = torch.cat([spread, halfway]).view(1, 1, D)
    k = v.flip(-1).contiguous()
    k_cache, v_cache = (torch.zeros(1, 1, 4, D).to(FP8).to(DEVICE) for _ in range(2))
    da.decode_attention_triton(v.to(DEVICE), k.to(DEVICE), v.to(DEVICE), k_cache, v_cache,
                               torch.tensor([2], device=DEVICE),
                               torch.tensor([True], device=DEVICE), None)
    for cache, x in ((k_cache, k), (v_cache, v)):
        want = x.clamp(-448, 448).to(FP8).view(torch.uint8)[0, 0]
        assert torch.equal(cache.cpu()[0, 0, 2].view(torch.uint8), want)


def test_consecutive_steps():
    # A stream of steps through the ring's wrap with a random exec mask: both caches evolve alike.
    B, H, C, D = 2, 2, 8, 32
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(B, H, C, D, generator=gen).to(DEVICE)
    v_cache = torch.randn(B, H, C, D, generator=gen).to(DEVICE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    pos = torch.zeros(B, dtype=torch.int64)
    for step in range(12):
        ex = torch.rand(B, generator=gen) < 0.7
        q, k, v = (torch.randn(B, H, D, generator=gen).to(DEVICE) for _ in range(3))
        p, e = pos.to(DEVICE), ex.to(DEVICE)
        out = da.decode_attention_triton(q, k, v, k_cache, v_cache, p, e, num_splits=2, block_n=16)
        ref = decode_attention_ref(q, k, v, k_ref, v_ref, p, e)
        ctx = f"seed={seed} step={step} positions={pos.tolist()} exec={ex.tolist()}"
        assert torch.allclose(out[e].cpu(), ref[e].cpu(), atol=1e-5, rtol=1e-5), ctx
        assert torch.allclose(k_cache, k_ref, atol=1e-5, rtol=1e-5), ctx
        assert torch.equal(v_cache, v_ref), ctx
        pos += ex.long()


def test_dispatcher(monkeypatch):
    B, H, C, D = 2, 2, 8, 32
    args = [torch.randn(B, H, D, device=DEVICE) for _ in range(3)]
    caches = [torch.randn(B, H, C, D, device=DEVICE) for _ in range(2)]
    pos = torch.tensor([3, 9], device=DEVICE)
    ex = torch.tensor([True, True], device=DEVICE)

    def call():
        return da.decode_attention(*args, *(c.clone() for c in caches), pos, ex)

    ref = decode_attention_ref(*args, *(c.clone() for c in caches), pos, ex)
    launches = []
    triton_impl = da.decode_attention_triton
    monkeypatch.setattr(da, "decode_attention_triton",
                        lambda *a, **kw: launches.append(1) or triton_impl(*a, **kw))
    monkeypatch.setenv("AGENT_KERNELS", "torch")
    assert torch.equal(call(), ref) and not launches
    monkeypatch.setenv("AGENT_KERNELS", "triton")  # on CPU tensors: the interpreter
    assert torch.allclose(call(), ref, atol=1e-5, rtol=1e-5) and launches == [1]

    def no_triton(*a, **kw):
        raise AssertionError("auto picked Triton for CPU tensors")

    monkeypatch.setenv("AGENT_KERNELS", "auto")
    if CUDA:
        assert torch.allclose(call(), ref, atol=1e-5, rtol=1e-5)
    else:
        monkeypatch.setattr(da, "decode_attention_triton", no_triton)
        assert torch.equal(call(), ref)
    monkeypatch.setenv("AGENT_KERNELS", "cuda")
    with pytest.raises(ValueError, match="AGENT_KERNELS"):
        call()


def test_split_heuristic():
    # H100 (132 SMs), temporal transformer: batch 1 splits its 3000 keys, batch 64 does not.
    assert da.choose_num_splits(32, 3000, 132, 64) == 16
    assert da.choose_num_splits(8 * 32, 3000, 132, 64) == 2
    assert da.choose_num_splits(64 * 32, 3000, 132, 64) == 1
    # Never more splits than tiles in the window, nor than MAX_SPLITS.
    assert da.choose_num_splits(1, 8, 132, 16) == 1
    assert da.choose_num_splits(1, 250, 132, 64) == 4
    assert da.choose_num_splits(1, 10**6, 132, 64) == da.MAX_SPLITS
    assert [da.default_block_n(c) for c in (1, 8, 37, 3000)] == [16, 16, 64, 64]


@gpu_only
def test_real_shapes_cuda():
    # Temporal transformer (bf16, H=32, D=128, C=3000) at batch 1 and with wrap-around;
    # depth transformer (H=16, D=64, C=8, no RoPE) at batch 64.
    run_case(1, 32, 3000, 128, torch.bfloat16, positions=[1499])
    run_case(3, 32, 3000, 128, torch.bfloat16, positions=[0, 2999, 123_456],
             exec_mask=[True, False, True])
    run_case(64, 16, 8, 64, torch.bfloat16, positions=list(range(64)), max_period=None)
    # Hibiki-Zero's temporal transformer: 16 query heads over 8 KV heads, half-split RoPE.
    for matrix in (False, True):
        run_case(3, 16, 3000, 128, torch.bfloat16, positions=[0, 2999, 123_456], kv_heads=8,
                 interleaved=False, matrix=matrix)
        run_case(64, 16, 3000, 128, torch.bfloat16, positions=list(range(0, 6400, 100)),
                 kv_heads=8, interleaved=False, matrix=matrix)


@gpu_only
def test_int64_offsets_cuda():
    # Row 1 of the cache starts beyond 2**31 elements: 32-bit offset arithmetic would wrap.
    B, H, C, D = 2, 2, 64, 128
    row = 2**31 + 4096
    k_buf = torch.empty(row + H * C * D, device="cuda", dtype=torch.float16)
    v_buf = torch.empty_like(k_buf)
    views = [b.as_strided((B, H, C, D), (row, C * D, D, 1)) for b in (k_buf, v_buf)]
    run_case(B, H, C, D, torch.float16, positions=[10, 500], caches=tuple(views), num_splits=2)


def test_bench_pure_python(capsys):
    from duplex_agent.kernels import bench_attention as ba

    # bf16, B=1, H=32, D=128, full window: 2 * 3000 keys/values + q + out, 256 bytes per row each.
    assert ba.attention_bytes(1, 32, 3000, 128, 2) == (2 * 3000 + 2) * 32 * 128 * 2
    row = {"batch": 1, "context": 3000, "num_splits": 16, "triton_us": 20.0, "triton_gbps": 2458.0,
           "triton_frac_of_copy": 0.82, "sdpa_prefix_us": 40.0, "sdpa_masked_us": 55.0,
           "speedup_vs_sdpa_prefix": 2.0, "speedup_vs_sdpa_masked": 2.75}
    table = ba.format_table([row])
    assert "82.0%" in table and len(table.splitlines()) == 3
    if not CUDA:
        assert ba.main(["--batches", "1", "--contexts", "250"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err


def test_launch_config_takes_the_nearest_tuned_batch(tmp_path, monkeypatch):
    """A device's tuned table (kernels/tune_attention.py) decides the launch for its shapes, from
    the entry of the nearest batch size; other shapes and devices keep the heuristics."""
    entry = {"dtype": "bfloat16", "kv_dtype": "bfloat16", "heads": 32, "head_dim": 128,
             "capacity": 3000, "num_warps": 8, "num_stages": 2}
    table = {"device": "Some GPU", "entries": [
        {**entry, "batch": 1, "block_n": 32, "num_splits": 16, "matrix": True},
        {**entry, "batch": 32, "block_n": 64, "num_splits": 2, "matrix": False}]}
    monkeypatch.setattr(da, "TUNED_DIR", tmp_path)
    (tmp_path / "decode_attention-Some-GPU.json").write_text(json.dumps(table))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    da.forget_tuning()
    try:
        cuda = torch.device("cuda")
        bf16 = torch.bfloat16
        assert da.launch_config(2, 32, 3000, 128, bf16, bf16, cuda) == da.LaunchConfig(32, 16, 8, 2, True)
        assert da.launch_config(20, 32, 3000, 128, bf16, bf16, cuda) == da.LaunchConfig(64, 2, 8, 2, False)
        # Another KV dtype: no entry, the heuristics (which need the SM count).
        monkeypatch.setattr(da, "_num_sms", lambda device: 132)
        fp8 = da.launch_config(20, 32, 3000, 128, bf16, torch.float8_e4m3fn, cuda)
        assert fp8 == da.LaunchConfig(64, da.choose_num_splits(20 * 32, 3000, 132, 64))
    finally:
        da.forget_tuning()
