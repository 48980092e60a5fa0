"""The load-time self-check: every Triton kernel the engine is about to use runs once on the live
device, on the engine's own shapes and dtypes, against its torch reference, within the
tolerances the kernel tests use (tests/test_kernel*.py import them from here).

A kernel that fails to compile or launch, or computes wrong values, is reported with the error
or the measured difference. What happens then is the caller's choice (agent/engine.py): under
AGENT_KERNELS=auto the kernel falls back to its reference for the process; forced Triton makes
the failure an error. Inputs are seeded: a failure can be replayed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from duplex_agent.kernels import decode_attention, embedding, int8_gemm, rms_norm, sampling, silu_gate
from duplex_agent.kernels.attention_ref import decode_attention_ref
from duplex_agent.kernels.dispatch import KERNELS

FP8 = torch.float8_e4m3fn
# (atol, rtol) of the attention output and of the rotated key written into the cache (one
# rounding of an fp32 RoPE result that may differ from the reference's by an ulp). float8 caches:
# both sides read the same bytes, but a key an ulp apart before rounding may land one float8 step
# (12.5 %) apart after it.
ATTENTION_OUT_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3),
                     torch.bfloat16: (2e-2, 2e-2), FP8: (1e-2, 1e-2)}
ATTENTION_SLOT_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3),
                      torch.bfloat16: (1e-2, 1e-2), FP8: (2.0 ** -9, 0.125)}
# rtol = atol of the fused elementwise kernels (RMSNorm, SiLU gate) and, scaled by the output's
# largest magnitude, of the int8 GEMM.
FUSED_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# Two draws may differ only where their perturbed scores tie within this (log() can differ by an
# ulp between Triton and torch).
SAMPLING_TIE = 1e-5
ATTENTION_ROWS = 4  # rows the attention check runs; its split count is the engine's batch's


@dataclass(frozen=True)
class KernelShapes:
    """The shapes and dtypes of one engine's kernels (its model config and slot count)."""
    batch: int
    dtype: torch.dtype  # compute dtype
    kv_dtype: torch.dtype  # the temporal KV cache's
    dim: int
    heads: int
    context: int
    max_period: float
    ffn_hidden: int
    dep_dim: int  # the depformer's (all 0 for a model without one: a transcriber)
    dep_heads: int
    dep_context: int
    dep_ffn_hidden: int
    vocabularies: tuple[int, ...]  # sampled vocabularies (text, audio)
    int8: bool = False  # int8 linears: the int8 GEMM runs too
    kv_heads: int | None = None  # grouped-query attention's (default: heads)
    dep_kv_heads: int | None = None
    rope_interleaved: bool = True  # RoPE pairs (2i, 2i+1); else (i, i + head_dim/2)

    def kernels(self) -> tuple[str, ...]:
        return tuple(k for k in KERNELS if k != "int8_gemm" or self.int8)


@dataclass
class KernelCheck:
    kernel: str
    ok: bool
    problem: str = ""  # the error, or what differed and by how much
    cases: list[str] = field(default_factory=list)


class Mismatch(Exception):
    """A kernel ran but its values are not the reference's."""


def check_kernels(shapes: KernelShapes, device: torch.device,
                  only: tuple[str, ...] | None = None) -> list[KernelCheck]:
    """Run each of `shapes.kernels()` (or `only`) once on `device`; one result per kernel."""
    results = []
    for kernel in shapes.kernels() if only is None else only:
        check = KernelCheck(kernel, ok=True)
        gen = torch.Generator().manual_seed(len(results))
        try:
            for label, run in CHECKS[kernel](shapes, device, gen):
                check.cases.append(label)
                run()
        except Mismatch as e:
            check.ok, check.problem = False, f"{check.cases[-1]}: {e}"
        except Exception as e:  # compile, launch or resource errors of this device
            case = check.cases[-1] if check.cases else kernel
            check.ok, check.problem = False, f"{case}: {type(e).__name__}: {str(e).strip()[:400]}"
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        results.append(check)
    return results


# -- comparisons ----------------------------------------------------------------------------------

def _close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> None:
    got, want = got.float().cpu(), want.float().cpu()
    if got.shape != want.shape:
        raise Mismatch(f"{name} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    if not torch.isfinite(got).all():
        raise Mismatch(f"{name} has non-finite values")
    diff = (got - want).abs()
    if not bool((diff <= atol + rtol * want.abs()).all()):
        raise Mismatch(f"{name} max |diff| {diff.max().item():.3g} (allowed {atol:g} + "
                       f"{rtol:g} x |reference|)")


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _equal(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit for bit (so a float8 -0 is not +0)."""
    if got.shape != want.shape:
        raise Mismatch(f"{name} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    bits = _BITS[got.element_size()]
    if not torch.equal(got.cpu().view(bits), want.cpu().view(bits)):
        diff = (got.float().cpu() - want.float().cpu()).abs().max().item()
        raise Mismatch(f"{name} differs from the reference (max |diff| {diff:.3g})")


def _randn(gen: torch.Generator, *shape, device, dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)


# -- the checks: each yields (case label, a callable that raises on failure) -----------------------

def _attention_cases(s: KernelShapes, device, gen):
    temporal = (s.heads, s.kv_heads or s.heads, s.context, s.dim // s.heads, s.kv_dtype,
                s.max_period, "temporal")
    depth = (s.dep_heads, s.dep_kv_heads or s.dep_heads, s.dep_context,
             s.dep_dim // max(s.dep_heads, 1), s.dtype, None, "depformer")
    for H, H_kv, C, D, cache_dtype, max_period, what in (temporal, depth) if s.dep_context else (temporal,):
        label = (f"{what} B={s.batch} H={H} KV heads={H_kv} C={C} D={D} {str(s.dtype)[6:]}, "
                 f"cache {str(cache_dtype)[6:]}")
        yield label, lambda H=H, H_kv=H_kv, C=C, D=D, cd=cache_dtype, mp=max_period: _attention(
            s, device, gen, H, H_kv, C, D, cd, mp)


def _attention(s: KernelShapes, device, gen, H, H_kv, C, D, cache_dtype, max_period) -> None:
    B = min(s.batch, ATTENTION_ROWS)
    # A row at its first step, one mid-window, one past a wrap of the ring, one idle.
    positions = torch.tensor([0, C // 2, 2 * C + 3, C - 1][:B], device=device)
    exec_mask = torch.tensor([True, True, True, False][:B], device=device)
    q = _randn(gen, B, H, D, device=device, dtype=s.dtype)
    k, v = (_randn(gen, B, H_kv, D, device=device, dtype=s.dtype) for _ in range(2))
    k_cache = _randn(gen, B, H_kv, C, D, device=device, dtype=s.dtype).to(cache_dtype)
    v_cache = _randn(gen, B, H_kv, C, D, device=device, dtype=s.dtype).to(cache_dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    # The launch configuration the engine's whole batch gets: the same kernel variant as in service.
    config = decode_attention.launch_config(s.batch, H, C, D, s.dtype, cache_dtype, device, H_kv)
    got = decode_attention.decode_attention_triton(q, k, v, k_cache, v_cache, positions, exec_mask,
                                                   max_period, s.rope_interleaved, config=config)
    want = decode_attention_ref(q, k, v, k_ref, v_ref, positions, exec_mask, max_period,
                                s.rope_interleaved)
    run = exec_mask.cpu()
    fp8 = cache_dtype == FP8
    _close("output", got[run], want[run], *ATTENTION_OUT_TOL[FP8 if fp8 else s.dtype])
    slots = (positions % C).cpu()
    for name, cache, ref in (("written key", k_cache, k_ref), ("written value", v_cache, v_ref)):
        for b in range(B):
            if run[b]:
                _close(name, cache[b, :, slots[b]], ref[b, :, slots[b]],
                       *ATTENTION_SLOT_TOL[FP8 if fp8 else s.dtype])
    # Nothing else of the caches may change (the idle row's included).
    keep = torch.ones(B, C, dtype=torch.bool)
    for b in range(B):
        keep[b, slots[b]] = not run[b]
    bits = _BITS[k_cache.element_size()]
    for name, cache, ref in (("the rest of the key cache", k_cache, k_ref),
                             ("the rest of the value cache", v_cache, v_ref)):
        _equal(name, cache.view(bits).cpu().transpose(1, 2)[keep], ref.view(bits).cpu().transpose(1, 2)[keep])


def _rms_norm_cases(s: KernelShapes, device, gen):
    for dim in sorted({s.dim, s.dep_dim} - {0}):
        yield f"[{s.batch}, {dim}] {str(s.dtype)[6:]} + residual", \
            lambda dim=dim: _rms_norm(s, device, gen, dim)


def _rms_norm(s, device, gen, dim) -> None:
    x = _randn(gen, s.batch, dim, device=device, dtype=s.dtype)
    add = _randn(gen, s.batch, dim, device=device, dtype=s.dtype)
    alpha = _randn(gen, dim, device=device, dtype=s.dtype)
    tol = FUSED_TOL[s.dtype]
    s_got, y_got = rms_norm.rms_norm_triton(x, alpha, 1e-8, add)
    s_want, y_want = rms_norm.rms_norm_ref(x, alpha, 1e-8, add)
    _equal("residual sum", s_got, s_want)
    _close("normalised", y_got, y_want, tol, tol)
    _close("normalised (no residual)", rms_norm.rms_norm_triton(x, alpha, 1e-8),
           rms_norm.rms_norm_ref(x, alpha, 1e-8), tol, tol)


def _silu_gate_cases(s: KernelShapes, device, gen):
    for hidden in sorted({s.ffn_hidden, s.dep_ffn_hidden} - {0}):
        yield f"[{s.batch}, 2 x {hidden}] {str(s.dtype)[6:]}", \
            lambda hidden=hidden: _silu_gate(s, device, gen, hidden)


def _silu_gate(s, device, gen, hidden) -> None:
    gate_up = _randn(gen, s.batch, 2 * hidden, device=device, dtype=s.dtype, scale=3.0)
    tol = FUSED_TOL[s.dtype]
    _close("output", silu_gate.silu_gate_triton(gate_up), silu_gate.silu_gate_ref(gate_up), tol, tol)


def _embedding_cases(s: KernelShapes, device, gen):
    for rows in sorted(set(s.vocabularies)):
        for dim in sorted({s.dim, s.dep_dim} - {0}):
            yield f"table [{rows + 1}, {dim}] {str(s.dtype)[6:]}", \
                lambda rows=rows, dim=dim: _embedding(s, device, gen, rows + 1, dim)


def _embedding(s, device, gen, rows, dim) -> None:
    table = _randn(gen, rows, dim, device=device, dtype=s.dtype)
    ids = torch.randint(0, rows, (s.batch,), generator=gen)
    ids[::3] = -1  # "no input": a zero vector
    ids = ids.to(device)
    acc = _randn(gen, s.batch, dim, device=device, dtype=s.dtype)
    _equal("embedding", embedding.embed_add_triton(table, ids), embedding.embed_add_ref(table, ids))
    _equal("embedding + sum", embedding.embed_add_triton(table, ids, acc),
           embedding.embed_add_ref(table, ids, acc))


def _sampling_cases(s: KernelShapes, device, gen):
    for vocab in sorted(set(s.vocabularies)):
        yield f"[{s.batch}, {vocab}]", lambda vocab=vocab: _sampling(s, device, gen, vocab)


def sampling_inputs(B: int, V: int, gen: torch.Generator, device) -> tuple[torch.Tensor, ...]:
    """Random arguments of the sampling draw (the self-check's and the kernel tests'), drawn
    from `gen` (a CPU generator) and put on `device`: (logits [B, V], temperatures, top-k
    thresholds (every third row: the whole vocabulary), seed keys, counters (past 2**32: taken
    mod 2**32), greedy rows)."""
    logits = torch.randn(B, V, generator=gen) * 3
    temp = 0.3 + torch.rand(B, generator=gen) * 1.5
    k = torch.randint(1, V + 1, (B,), generator=gen)
    kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1).view(-1, 1)).view(-1)
    kth[::3] = float("-inf")
    seed_key = sampling.mix32(torch.randint(0, 1 << 31, (B,), generator=gen))
    counter = torch.randint(0, 1 << 40, (B,), generator=gen)
    greedy = torch.rand(B, generator=gen) < 0.3
    return tuple(t.to(device) for t in (logits, temp, kth, seed_key, counter, greedy))


def _sampling(s, device, gen, V) -> None:
    logits, temp, kth, seed_key, counter, greedy = sampling_inputs(s.batch, V, gen, device)
    args = (logits, temp, kth, seed_key, counter, 1, greedy)
    got, want = sampling.sample_triton(*args).cpu(), sampling.sample_ref(*args).cpu()
    if not bool(((got >= 0) & (got < V)).all()):
        raise Mismatch(f"drew ids outside [0, {V})")
    # The scores on the host, as drawn.
    logits, temp, seed_key, counter, greedy = (t.cpu() for t in (logits, temp, seed_key, counter,
                                                                 greedy))
    noise = torch.where(greedy.view(-1, 1), 0.0,
                        sampling.gumbel_noise(sampling.row_keys(seed_key, counter, 1), V))
    score = logits / temp.view(-1, 1) + noise
    for b in torch.nonzero(got != want).view(-1).tolist():
        a, w = score[b, got[b]].item(), score[b, want[b]].item()
        if abs(a - w) > SAMPLING_TIE * max(1.0, abs(w)):
            raise Mismatch(f"row {b} drew {int(got[b])}, the reference {int(want[b])} "
                           f"(scores {a:.6g} vs {w:.6g})")


def _int8_cases(s: KernelShapes, device, gen):
    kv_dim = s.dim // s.heads * (s.kv_heads or s.heads)
    shapes = {(s.dim + 2 * kv_dim, s.dim), (s.dim, s.ffn_hidden)}
    if s.dep_dim:
        shapes.add((2 * s.dep_ffn_hidden, s.dep_dim))
    for N, K in sorted(shapes):
        yield f"[{s.batch}, {K}] x int8 [{N}, {K}]", lambda N=N, K=K: _int8(s, device, gen, N, K)


def _int8(s, device, gen, N, K) -> None:
    x = _randn(gen, s.batch, K, device=device, dtype=s.dtype)
    weight = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8).to(device)
    scale = (torch.rand(N, generator=gen) * 0.1 + 0.01).to(device)
    want = int8_gemm.int8_linear_ref(x, weight, scale)
    tol = FUSED_TOL[s.dtype]
    atol = tol * want.float().abs().max().item()
    _close("output", int8_gemm.int8_linear_triton(x, weight, scale), want, atol, tol)


CHECKS = {"decode_attention": _attention_cases, "rms_norm": _rms_norm_cases,
          "silu_gate": _silu_gate_cases, "embedding": _embedding_cases,
          "sampling": _sampling_cases, "int8_gemm": _int8_cases}


def describe_failure(check: KernelCheck) -> str:
    return f"{check.kernel} failed its check on this device ({check.problem})"


__all__ = ["KernelShapes", "KernelCheck", "check_kernels", "describe_failure", "sampling_inputs",
           "ATTENTION_OUT_TOL", "ATTENTION_SLOT_TOL", "FUSED_TOL", "SAMPLING_TIE"]
