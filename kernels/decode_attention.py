"""Triton decode attention over a per-slot ring KV cache (one query token per conversation).

Same contract as `kernels.attention_ref.decode_attention_ref` (see its docstring for shapes):
RoPE on q and the new k, ring write of the new k/v into slot `positions[b] % C` for executing
rows, then softmax attention of q over the valid window, i.e. slots `j <= positions[b]`
(all C slots once the ring is full). Because RoPE is applied before keys are cached, the
order of the slots is irrelevant and the window is just the prefix `[0, min(pos + 1, C))`.

Algorithm ("flash-decoding", two launches):

1. `_decode_split_kernel`, grid (B, Hkv, num_splits). Each program
   - loads k, v of its (b, KV head) row and q of the G = H / Hkv query heads that share it
     (grouped-query attention; G = 1 for plain multi-head), applies RoPE (interleaved or
     half-split pairs) in fp32 and rounds the results to the dtypes the reference would store
     them in;
   - takes a BLOCK_N-aligned chunk of the row's window and streams it in BLOCK_N x D tiles,
     each read once for the G heads, with an online softmax per head (running max m, running
     sum l, unnormalised accumulator acc), all in fp32. A few query rows need no matrix unit:
     scores are `sum(q[:, None] * k_tile[None], 2)`. (`_decode_split_dot_kernel` does the
     same with `tl.dot`, the G query rows in a 16-row tile.)
   - The current step's slot is never read from memory: every program masks it out of its
     loads and substitutes the new k/v from registers. The write of the new k/v (done by
     split 0) can therefore race with the reads of other programs without changing the result.
   - Writes (m, l, acc) to an fp32 workspace, or, with a single split, the final output.
2. `_decode_combine_kernel`, grid (B, H): merges the splits with the log-sum-exp rule
   out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s, with M = max_s m_s; empty splits
   (m_s = -inf) get weight 0.

Rows with exec_mask False read nothing and write nothing; their output is 0 (the contract
leaves it unspecified). The number of splits is chosen on the host from B*Hkv and the cache
capacity only (reading `positions` would force a device sync and break CUDA graphs); the
split length is derived in the kernel from each row's actual window, so short windows cost
proportionally less.
"""
from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from duplex_agent.kernels.attention_ref import decode_attention_ref, rope_frequencies
from duplex_agent.kernels.dispatch import require_triton, tl, triton, use_triton


# Aim for a few resident programs per SM so that enough loads are in flight to saturate HBM.
PROGRAMS_PER_SM = 4
MAX_SPLITS = 64
# Streaming multiprocessor count assumed for CPU tensors (Triton interpreter): keeps tests cheap.
INTERPRETER_NUM_SMS = 4


def choose_num_splits(batch_heads: int, window: int, num_sms: int, block_n: int) -> int:
    """Number of key splits per (batch, head) row.

    Enough programs for PROGRAMS_PER_SM per SM, but never more splits than BLOCK_N tiles in
    the window (a split of less than one tile only adds combine work) nor MAX_SPLITS.
    """
    wanted = (PROGRAMS_PER_SM * num_sms) // max(batch_heads, 1)
    useful = -(-window // block_n)
    return max(1, min(wanted, useful, MAX_SPLITS))


def default_block_n(capacity: int) -> int:
    # 64 keys x 128 dims keeps K and V tiles in registers with 4 warps; tiny caches
    # (the depth transformer's C=8) use a smaller tile, >= 16 to stay a safe Triton shape.
    return max(16, min(64, _next_power_of_2(capacity)))


@dataclass(frozen=True)
class LaunchConfig:
    """How one call is launched: keys per tile, splits of each row's window, and the Triton
    launch options. `launch_config` picks one per shape and device."""
    block_n: int
    num_splits: int
    num_warps: int = 4
    num_stages: int = 3  # Triton's default
    matrix: bool = False  # the tl.dot variant (_decode_split_dot_kernel)


# Configurations measured on a device (python -m duplex_agent.kernels.tune_attention), one file
# per device name: decode_attention-<device>.json beside this module, in tuned/.
TUNED_DIR = Path(__file__).resolve().parent / "tuned"


def tuned_table_path(device_name: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-")
    return TUNED_DIR / f"decode_attention-{slug}.json"


@functools.lru_cache(maxsize=None)
def _tuned_entries(device_name: str) -> tuple[dict, ...]:
    path = tuned_table_path(device_name)
    if not path.is_file():
        return ()
    return tuple(json.loads(path.read_text())["entries"])


def heuristic_config(B: int, H: int, C: int, device: torch.device,
                     kv_heads: int | None = None) -> LaunchConfig:
    """What the heuristics choose where nothing was measured. Programs are per KV head; one
    that serves G query heads takes tiles G times shorter, for the registers of one."""
    kv_heads = kv_heads or H
    block_n = max(16, default_block_n(C) // _next_power_of_2(H // kv_heads))
    return LaunchConfig(block_n, choose_num_splits(B * kv_heads, C, _num_sms(device), block_n))


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.lru_cache(maxsize=256)
def launch_config(B: int, H: int, C: int, D: int, dtype: torch.dtype, kv_dtype: torch.dtype,
                  device: torch.device, kv_heads: int | None = None) -> LaunchConfig:
    """The configuration measured fastest on this device for this shape (the nearest measured
    batch size), else the heuristics (`heuristic_config`). `kv_heads` (default H): grouped-query
    attention's; a tuned entry without "kv_heads" is for plain multi-head attention."""
    if device.type == "cuda":
        shape = {"dtype": str(dtype).removeprefix("torch."), "heads": H, "head_dim": D,
                 "kv_dtype": str(kv_dtype).removeprefix("torch."), "capacity": C}
        entries = [e for e in _tuned_entries(torch.cuda.get_device_name(device))
                   if all(e[k] == v for k, v in shape.items())
                   and e.get("kv_heads", e["heads"]) == (kv_heads or H)]
        if entries:
            best = min(entries, key=lambda e: abs(math.log2(e["batch"]) - math.log2(B)))
            return LaunchConfig(best["block_n"], best["num_splits"], best["num_warps"],
                                best["num_stages"], best.get("matrix", False))
    return heuristic_config(B, H, C, device, kv_heads)


def forget_tuning() -> None:
    """Read the tuned tables afresh (after a tuning run wrote one; tests)."""
    _tuned_entries.cache_clear()
    launch_config.cache_clear()


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_NUM_SMS


# float8 e4m3 (OCP "fn": no infinities, largest finite value 448) is the one narrow cache dtype.
FP8_DTYPE = torch.float8_e4m3fn


if triton is not None:

    @triton.jit
    def _round_to_e4m3(x):
        """x (fp32) rounded to nearest-even on the float8 e4m3fn grid, saturated at +-448, still
        in fp32. The following cast to float8 is then exact: the same bits as torch's
        `.to(torch.float8_e4m3fn)` on every backend (the interpreter's own cast rounds wrongly)."""
        ax = tl.abs(x)
        e = ((ax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        e = tl.maximum(e, -6)  # subnormals share the step of the smallest normal binade
        step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2^(e-3): 3 mantissa bits
        y = ax / step
        r = (y + 12582912.0) - 12582912.0  # 1.5 * 2^23: fp32 addition rounds y to an integer, RNE
        out = tl.minimum(r * step, 448.0)
        # The sign goes back as a bit, not by negation: compiled, `-out` is `0 - out`, which
        # turns a negative value that rounds to zero into +0 where torch keeps -0 (seen on H200).
        sign = x.to(tl.int32, bitcast=True) & -2147483648
        return (out.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)

    @triton.jit
    def _split_range(pos_ptr, exec_ptr, b, s, C, num_splits, BLOCK_N: tl.constexpr):
        """Row `b`'s position, whether it runs, its ring slot this step, and split `s`'s keys
        [start, end): a BLOCK_N-aligned share of the row's window (empty for an idle row)."""
        pos = tl.load(pos_ptr + b).to(tl.int64)
        run = tl.load(exec_ptr + b) != 0
        window = tl.where(run, tl.minimum(pos + 1, C), 0)
        split_len = tl.cdiv(tl.cdiv(window, num_splits), BLOCK_N) * BLOCK_N
        start = s * split_len
        return pos, run, pos % C, start, tl.minimum(start + split_len, window)

    @triton.jit
    def _store_split(acc, m_i, l_i, out_ptr, part_acc_ptr, part_ml_ptr, b, heads, s, H, num_splits,
                     stride_ob, stride_oh, offs_d, qd_mask, head_mask, D: tl.constexpr,
                     SINGLE_SPLIT: tl.constexpr):
        """A program's result for its query `heads`: with a single split the normalised output
        (idle rows, l = 0, get 0); else its (acc, m, l) for the combine kernel."""
        if SINGLE_SPLIT:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=qd_mask)
        else:
            part = (b * H + heads) * num_splits + s
            tl.store(part_acc_ptr + part[:, None] * D + offs_d[None, :], acc, mask=qd_mask)
            tl.store(part_ml_ptr + part * 2, m_i, mask=head_mask)
            tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=head_mask)

    @triton.jit
    def _new_token(q_rows, k_row, v_row, kc_row, vc_row, freq_ptr, pos, cur, write, offs_d, d_mask,
                   qd_mask, stride_kcc, stride_vcc, D: tl.constexpr, ROPE: tl.constexpr,
                   INTERLEAVED: tl.constexpr, FP8_CACHE: tl.constexpr):
        """This step's own token, shared by both kernel variants: the query rows and the new key
        rotated (RoPE, in fp32) and rounded to their input dtype as the reference stores them;
        the new key and value rounded to the cache's dtype and written to slot `cur` where
        `write` (one program per row and KV head). Returns (q, k_new, v_new)."""
        q = tl.load(q_rows + offs_d[None, :], mask=qd_mask, other=0.0).to(tl.float32)
        k_new = tl.load(k_row + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        if ROPE:
            # out[d] = x[d] cos - x[partner] sin for the first of a pair, + for the second. The
            # pairs are (2i, 2i+1) interleaved ("rope"), or (i, i + D/2) ("rope_concat").
            if INTERLEAVED:
                partner = offs_d ^ 1
                freq_index = offs_d // 2
                first = offs_d % 2 == 0
            else:
                partner = (offs_d + D // 2) % D
                freq_index = offs_d % (D // 2)
                first = offs_d < D // 2
            freq = tl.load(freq_ptr + freq_index, mask=d_mask, other=0.0)
            angle = pos.to(tl.float32) * freq
            cos = tl.cos(angle)
            sin = tl.where(first, -tl.sin(angle), tl.sin(angle))
            q_p = tl.load(q_rows + partner[None, :], mask=qd_mask, other=0.0).to(tl.float32)
            k_p = tl.load(k_row + partner, mask=d_mask, other=0.0).to(tl.float32)
            q = q * cos[None, :] + q_p * sin[None, :]
            k_new = k_new * cos + k_p * sin
        cache_ty = kc_row.dtype.element_ty
        q = q.to(q_rows.dtype.element_ty)
        k_new = k_new.to(k_row.dtype.element_ty)
        v_new = tl.load(v_row + offs_d, mask=d_mask, other=0.0)
        if FP8_CACHE:
            k_new = _round_to_e4m3(k_new.to(tl.float32))
            v_new = _round_to_e4m3(v_new.to(tl.float32))
        k_new = k_new.to(cache_ty)
        v_new = v_new.to(cache_ty)
        tl.store(kc_row + cur * stride_kcc + offs_d, k_new, mask=write)
        tl.store(vc_row + cur * stride_vcc + offs_d, v_new, mask=write)
        return q, k_new, v_new

    @triton.jit
    def _decode_split_kernel(
        q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, pos_ptr, exec_ptr, freq_ptr,
        out_ptr, part_acc_ptr, part_ml_ptr,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
        stride_kcb, stride_kch, stride_kcc, stride_vcb, stride_vch, stride_vcc,
        stride_ob, stride_oh,
        C, num_splits, qk_scale,
        D: tl.constexpr, ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
        SINGLE_SPLIT: tl.constexpr, FP8_CACHE: tl.constexpr,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # One program per (row, KV head, split): the GROUP query heads sharing the KV head are
        # handled together, so each key/value tile is read once for all of them.
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1).to(tl.int64)
        s = tl.program_id(2)
        H = tl.num_programs(1) * GROUP  # query heads

        pos, run, cur, start, end = _split_range(pos_ptr, exec_ptr, b, s, C, num_splits, BLOCK_N)

        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        offs_g = tl.arange(0, BLOCK_G)
        heads = kvh * GROUP + offs_g  # this program's query heads
        qd_mask = (offs_g < GROUP)[:, None] & d_mask[None, :]
        q_rows = q_ptr + b * stride_qb + heads[:, None] * stride_qh
        k_row = k_ptr + b * stride_kb + kvh * stride_kh
        v_row = v_ptr + b * stride_vb + kvh * stride_vh
        kc_row = kc_ptr + b * stride_kcb + kvh * stride_kch
        vc_row = vc_ptr + b * stride_vcb + kvh * stride_vch
        # One program per row and KV head writes the new k/v; nobody reads that slot from memory.
        # (Mask built by comparing offsets: the interpreter mis-types scalar-bool broadcasts.)
        write = offs_d < tl.where(run & (s == 0), D, 0)
        q, k_new, v_new = _new_token(q_rows, k_row, v_row, kc_row, vc_row, freq_ptr, pos, cur, write,
                                     offs_d, d_mask, qd_mask, stride_kcc, stride_vcc, D, ROPE,
                                     INTERLEAVED, FP8_CACHE)
        q = q.to(tl.float32) * qk_scale
        k_new = k_new.to(tl.float32)
        v_new = v_new.to(tl.float32)

        m_i = tl.full([BLOCK_G], -float("inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            in_win = offs_n < end
            is_cur = offs_n == cur
            tile_mask = (in_win & (offs_n != cur))[:, None] & d_mask[None, :]
            k_t = tl.load(kc_row + offs_n[:, None] * stride_kcc + offs_d[None, :],
                          mask=tile_mask, other=0.0).to(tl.float32)
            k_t = tl.where(is_cur[:, None], k_new[None, :], k_t)
            # [G, N]: one query row per head needs no matrix unit; already in log2 units.
            scores = tl.sum(q[:, None, :] * k_t[None, :, :], 2)
            scores = tl.where(in_win[None, :], scores, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])
            v_t = tl.load(vc_row + offs_n[:, None] * stride_vcc + offs_d[None, :],
                          mask=tile_mask, other=0.0).to(tl.float32)
            v_t = tl.where(is_cur[:, None], v_new[None, :], v_t)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v_t[None, :, :], 1)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new

        _store_split(acc, m_i, l_i, out_ptr, part_acc_ptr, part_ml_ptr, b, heads, s, H, num_splits,
                     stride_ob, stride_oh, offs_d, qd_mask, offs_g < GROUP, D, SINGLE_SPLIT)

    @triton.jit
    def _decode_split_dot_kernel(
        q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, pos_ptr, exec_ptr, freq_ptr,
        out_ptr, part_acc_ptr, part_ml_ptr,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
        stride_kcb, stride_kch, stride_kcc, stride_vcb, stride_vch, stride_vcc,
        stride_ob, stride_oh,
        C, num_splits, qk_scale,
        D: tl.constexpr, ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
        SINGLE_SPLIT: tl.constexpr, FP8_CACHE: tl.constexpr, GROUP: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, IEEE: tl.constexpr,
    ):
        """`_decode_split_kernel` with both products on the matrix units: the GROUP queries that
        share the program's KV head are the first rows of a BLOCK_M-row tile (the others zero),
        so `q @ K^T` and `p @ V` are `tl.dot`s whose tile loads Triton pipelines (num_stages)
        instead of shuffle reductions over each tile. The current step's key and value are
        never read from memory: they enter the online softmax from registers, in the split
        whose range holds their slot."""
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1).to(tl.int64)
        s = tl.program_id(2)
        H = tl.num_programs(1) * GROUP  # query heads

        pos, run, cur, start, end = _split_range(pos_ptr, exec_ptr, b, s, C, num_splits, BLOCK_N)

        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        offs_m = tl.arange(0, BLOCK_M)
        mine = offs_m < GROUP  # the tile's rows that hold a query
        heads = kvh * GROUP + offs_m
        qd_mask = mine[:, None] & d_mask[None, :]
        q_rows = q_ptr + b * stride_qb + heads[:, None] * stride_qh
        k_row = k_ptr + b * stride_kb + kvh * stride_kh
        v_row = v_ptr + b * stride_vb + kvh * stride_vh
        kc_row = kc_ptr + b * stride_kcb + kvh * stride_kch
        vc_row = vc_ptr + b * stride_vcb + kvh * stride_vch
        write = offs_d < tl.where(run & (s == 0), D, 0)
        # q is rounded as the reference stores it: exact as a dot operand.
        q_tile, k_new, v_new = _new_token(q_rows, k_row, v_row, kc_row, vc_row, freq_ptr, pos, cur,
                                          write, offs_d, d_mask, qd_mask, stride_kcc, stride_vcc,
                                          D, ROPE, INTERLEAVED, FP8_CACHE)
        in_ty = q_ptr.dtype.element_ty

        # The current key's scores, and its value, seed the softmax of the split holding `cur`.
        s_cur = tl.sum(q_tile.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * qk_scale
        seeded = mine & (start <= cur) & (cur < end)
        m_i = tl.where(seeded, s_cur, -float("inf"))
        l_i = tl.where(seeded, 1.0, 0.0)
        acc = tl.where(seeded[:, None], v_new.to(tl.float32)[None, :],
                       tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32))
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            use = (offs_n < end) & (offs_n != cur)
            tile_mask = use[:, None] & d_mask[None, :]
            k_t = tl.load(kc_row + offs_n[:, None] * stride_kcc + offs_d[None, :],
                          mask=tile_mask, other=0.0).to(in_ty)
            if IEEE:
                scores = tl.dot(q_tile, tl.trans(k_t), input_precision="ieee")
            else:
                scores = tl.dot(q_tile, tl.trans(k_t))
            scores = tl.where(use[None, :], scores * qk_scale, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # rows with nothing yet
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(scores - m_safe[:, None])
            v_t = tl.load(vc_row + offs_n[:, None] * stride_vcc + offs_d[None, :],
                          mask=tile_mask, other=0.0).to(in_ty)
            if IEEE:
                pv = tl.dot(p.to(in_ty), v_t, input_precision="ieee")
            else:
                pv = tl.dot(p.to(in_ty), v_t)
            acc = acc * alpha[:, None] + pv
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new

        _store_split(acc, m_i, l_i, out_ptr, part_acc_ptr, part_ml_ptr, b, heads, s, H, num_splits,
                     stride_ob, stride_oh, offs_d, qd_mask, mine, D, SINGLE_SPLIT)

    @triton.jit
    def _decode_combine_kernel(
        part_acc_ptr, part_ml_ptr, out_ptr, stride_ob, stride_oh, num_splits,
        D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        H = tl.num_programs(1)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        s_mask = offs_s < num_splits
        d_mask = offs_d < D
        part = (b * H + h) * num_splits + offs_s
        m = tl.load(part_ml_ptr + part * 2, mask=s_mask, other=-float("inf"))
        l = tl.load(part_ml_ptr + part * 2 + 1, mask=s_mask, other=0.0)
        m_max = tl.max(m, 0)
        m_max = tl.where(m_max == -float("inf"), 0.0, m_max)  # idle row: avoid -inf - -inf
        w = tl.where(m == -float("inf"), 0.0, tl.exp2(m - m_max))
        acc = tl.load(part_acc_ptr + part[:, None] * D + offs_d[None, :],
                      mask=s_mask[:, None] & d_mask[None, :], other=0.0)
        num = tl.sum(w[:, None] * acc, 0)
        den = tl.sum(w * l, 0)
        out = num / tl.where(den > 0, den, 1.0)  # idle rows (den = 0) get 0
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d,
                 out.to(out_ptr.dtype.element_ty), mask=d_mask)


def decode_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            k_cache: torch.Tensor, v_cache: torch.Tensor,
                            positions: torch.Tensor, exec_mask: torch.Tensor,
                            max_period: float | None = 10_000.0, interleaved: bool = True, *,
                            num_splits: int | None = None,
                            block_n: int | None = None,
                            config: LaunchConfig | None = None) -> torch.Tensor:
    """Triton version of `decode_attention_ref` (same arguments and semantics).

    `config` (default: `launch_config` for this shape and device) and `num_splits` / `block_n`
    override what would be chosen (tests and tuning). Updates k_cache/v_cache in place and
    returns the output [B, H, D] in q's dtype.
    """
    require_triton()
    B, H_kv, C, D = k_cache.shape
    H = q.shape[1]
    if q.dim() != 3 or H % H_kv:
        raise ValueError(f"q has shape {tuple(q.shape)}: expected [B, H, D] with H a multiple of "
                         f"the cache's {H_kv} KV heads")
    group = H // H_kv
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError("k_cache and v_cache must have the same shape and dtype")
    if k_cache.dtype not in (FP8_DTYPE, torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"unsupported KV cache dtype {k_cache.dtype}: use float8_e4m3fn, "
                         "float16, bfloat16 or float32")
    for name, t, heads in (("q", q, H), ("k", k, H_kv), ("v", v, H_kv)):
        if t.shape != (B, heads, D):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {(B, heads, D)}")
    if positions.shape != (B,) or exec_mask.shape != (B,):
        raise ValueError("positions and exec_mask must have shape [B]")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("caches are updated in place and need a contiguous last dimension")
    if max_period is not None and D % 2:
        raise ValueError("RoPE needs an even head dimension")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    config = config or launch_config(B, H, C, D, q.dtype, k_cache.dtype, q.device, H_kv)
    block_n = block_n or config.block_n
    if block_n & (block_n - 1):
        raise ValueError("block_n must be a power of two")
    splits = num_splits or (config.num_splits if block_n == config.block_n
                            else choose_num_splits(B * H_kv, C, _num_sms(q.device), block_n))
    block_d = triton.next_power_of_2(D)
    rope = max_period is not None
    freqs = rope_frequencies(D, float(max_period), q.device) if rope else positions  # unused if no RoPE

    out = torch.empty(B, H, D, device=q.device, dtype=q.dtype)
    single = splits == 1
    if single:
        part_acc = part_ml = out  # not touched by the kernel
    else:
        part_acc = torch.empty(B, H, splits, D, device=q.device, dtype=torch.float32)
        part_ml = torch.empty(B, H, splits, 2, device=q.device, dtype=torch.float32)
    qk_scale = 1.0 / math.sqrt(D) * math.log2(math.e)  # softmax via exp2

    args = (q, k, v, k_cache, v_cache, positions, exec_mask, freqs, out, part_acc, part_ml,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            out.stride(0), out.stride(1), C, splits, qk_scale)
    shapes = dict(D=D, ROPE=rope, INTERLEAVED=interleaved, SINGLE_SPLIT=single,
                  FP8_CACHE=k_cache.dtype == FP8_DTYPE, GROUP=group, BLOCK_N=block_n,
                  BLOCK_D=block_d)
    launch = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    if config.matrix:
        if block_n < 16 or block_d < 16 or group > 16:
            raise ValueError("the tl.dot variant needs block_n and the head dimension >= 16, "
                             "and at most 16 query heads per KV head")
        _decode_split_dot_kernel[(B, H_kv, splits)](*args, **shapes, BLOCK_M=16,
                                                     IEEE=q.dtype == torch.float32, **launch)
    else:
        _decode_split_kernel[(B, H_kv, splits)](*args, **shapes,
                                                BLOCK_G=triton.next_power_of_2(group), **launch)
    if not single:
        _decode_combine_kernel[(B, H)](
            part_acc, part_ml, out, out.stride(0), out.stride(1), splits,
            D=D, BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d, num_warps=4,
        )
    return out


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor,
                     positions: torch.Tensor, exec_mask: torch.Tensor,
                     max_period: float | None = 10_000.0, interleaved: bool = True) -> torch.Tensor:
    """One decode step of ring-cache attention; picks the implementation.

    AGENT_KERNELS=auto (default): Triton on CUDA tensors, the torch reference elsewhere.
    AGENT_KERNELS=triton forces Triton (CPU tensors need TRITON_INTERPRET=1);
    AGENT_KERNELS=torch forces the reference.
    """
    impl = decode_attention_triton if use_triton(q, "decode_attention") else decode_attention_ref
    return impl(q, k, v, k_cache, v_cache, positions, exec_mask, max_period, interleaved)
