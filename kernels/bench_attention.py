"""Decode-attention microbenchmark: Triton ring-cache kernel vs torch SDPA.

For each (batch, context) the cache has the model's capacity (3000 slots) and every row sits at
position context - 1, so the valid window is `context` keys. Timings use CUDA events around a
single call, with L2 flushed before each iteration (a per-layer KV slice is about L2-sized), and
report the median. Bandwidth counts the bytes the operation must move: K and V of the valid
window plus q and the output. It is compared with a measured device-to-device copy.

Baselines (both without the RoPE and cache write that our kernel also does):
  sdpa_prefix: F.scaled_dot_product_attention on the valid prefix of the cache (a view);
  sdpa_masked: SDPA over all capacity slots with a boolean mask (what moshi does today).

The figures mean something on a CUDA GPU only; `--device cpu` (Triton's interpreter, wall-clock
timing) with `--tiny` shapes is a dry run of the same code and file layout.

Usage: python -m duplex_agent.kernels.bench_attention [results.json] [--dtype bf16] [--batches 1,8] ...
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

CAPACITY = 3000
FLUSH_BYTES = 256 << 20
COPY_BYTES = 1 << 30
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KV_DTYPES = {"same": None, "fp8": torch.float8_e4m3fn}
# Shapes: the moshiko temporal transformer's, and --tiny ones for a dry run on CPU.
SHAPES = {"full": {"batches": (1, 8, 16, 32, 64), "contexts": (250, 1500, 3000), "heads": 32,
                   "head_dim": 128, "capacity": CAPACITY},
          "tiny": {"batches": (1, 2), "contexts": (8, 24), "heads": 2, "head_dim": 16, "capacity": 32}}


def attention_bytes(batch: int, heads: int, context: int, head_dim: int, elem_size: int,
                    kv_elem_size: int | None = None) -> int:
    """Minimum HBM traffic of one decode step: K and V of the window, plus q and the output."""
    kv_elem_size = kv_elem_size or elem_size
    return (2 * context * kv_elem_size + 2 * elem_size) * batch * heads * head_dim


def time_cuda(fn, warmup: int = 5, iters: int = 30) -> float:
    """Median seconds per call of `fn`, L2 flushed before every timed call."""
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        flush.zero_()  # evicts L2 and keeps the GPU busy while the next launch is queued
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def time_wall(fn, warmup: int = 1, iters: int = 3) -> float:
    """Median wall-clock seconds per call of `fn` (CPU dry runs: no L2 to flush, no events)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timer(device: torch.device):
    return time_cuda if device.type == "cuda" else time_wall


def copy_bandwidth(device: torch.device = torch.device("cuda"), nbytes: int = COPY_BYTES) -> float:
    """Device-to-device copy rate in bytes/s (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / timer(device)(lambda: dst.copy_(src), warmup=3, iters=10)


def bench_decode_attention(batches=(1, 8, 16, 32, 64), contexts=(250, 1500, 3000),
                           dtype=torch.bfloat16, H=32, D=128, kv_dtype=None, *,
                           capacity: int = CAPACITY, device: str = "cuda",
                           on_batch=None) -> list[dict]:
    """One row per (batch, context): times in microseconds, bandwidths in GB/s. With `kv_dtype`
    float8 our kernel reads float8 caches; SDPA, which cannot, reads `dtype` copies of them.
    `on_batch` gets the rows so far after each batch."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("bench_decode_attention needs a CUDA GPU")
    from duplex_agent.kernels.decode_attention import decode_attention_triton, launch_config

    measure = timer(device)
    copy_bw = copy_bandwidth(device, COPY_BYTES if device.type == "cuda" else 1 << 24)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    elem = torch.empty((), dtype=dtype).element_size()
    kv_elem = torch.empty((), dtype=kv_dtype or dtype).element_size()
    rows = []
    for B in batches:
        k_wide = torch.randn(B, H, capacity, D, device=device, dtype=dtype)
        v_wide = torch.randn_like(k_wide)
        k_cache, v_cache = ((k_wide.to(kv_dtype), v_wide.to(kv_dtype)) if kv_dtype
                            else (k_wide, v_wide))
        q, k, v = (torch.randn(B, H, D, device=device, dtype=dtype) for _ in range(3))
        exec_mask = torch.ones(B, dtype=torch.bool, device=device)
        for ctx in contexts:
            if ctx > capacity:
                raise ValueError(f"context {ctx} exceeds the cache capacity {capacity}")
            positions = torch.full((B,), ctx - 1, dtype=torch.int64, device=device)
            valid = (torch.arange(capacity, device=device) < ctx).view(1, 1, 1, capacity)
            q4 = q.unsqueeze(2)
            k_prefix, v_prefix = k_wide[:, :, :ctx], v_wide[:, :, :ctx]
            t_triton = measure(lambda: decode_attention_triton(
                q, k, v, k_cache, v_cache, positions, exec_mask))
            t_prefix = measure(lambda: F.scaled_dot_product_attention(q4, k_prefix, v_prefix))
            t_masked = measure(lambda: F.scaled_dot_product_attention(
                q4, k_wide, v_wide, attn_mask=valid))
            nbytes = attention_bytes(B, H, ctx, D, elem, kv_elem)
            bw = nbytes / t_triton
            rows.append({
                "device": device_name, "dtype": str(dtype).removeprefix("torch."),
                "kv_dtype": str(kv_dtype or dtype).removeprefix("torch."),
                "batch": B, "context": ctx, "capacity": capacity, "heads": H, "head_dim": D,
                # as the kernel launches (launch_config: the tuned table, else the heuristics)
                "num_splits": launch_config(B, H, capacity, D, dtype, kv_dtype or dtype,
                                            device).num_splits,
                "bytes": nbytes,
                "triton_us": t_triton * 1e6, "sdpa_prefix_us": t_prefix * 1e6, "sdpa_masked_us": t_masked * 1e6,
                "triton_gbps": bw / 1e9, "sdpa_prefix_gbps": nbytes / t_prefix / 1e9,
                "copy_gbps": copy_bw / 1e9, "triton_frac_of_copy": bw / copy_bw,
                "speedup_vs_sdpa_prefix": t_prefix / t_triton, "speedup_vs_sdpa_masked": t_masked / t_triton,
            })
        k_cache = v_cache = k_wide = v_wide = None  # free before the next batch allocates
        if on_batch:
            on_batch(rows)
    return rows


def format_table(rows: list[dict]) -> str:
    header = (f"{'B':>4} {'ctx':>5} {'splits':>6} {'triton us':>10} {'GB/s':>7} {'of copy':>8} "
              f"{'sdpa pre us':>12} {'sdpa mask us':>13} {'x pre':>6} {'x mask':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['batch']:>4} {r['context']:>5} {r['num_splits']:>6} {r['triton_us']:>10.1f} "
            f"{r['triton_gbps']:>7.0f} {r['triton_frac_of_copy']:>8.1%} {r['sdpa_prefix_us']:>12.1f} "
            f"{r['sdpa_masked_us']:>13.1f} {r['speedup_vs_sdpa_prefix']:>6.2f} {r['speedup_vs_sdpa_masked']:>7.2f}")
    return "\n".join(lines)


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def gpu_missing(name: str, device: str = "cuda") -> bool:
    """True (after saying so on stderr) when there is no CUDA GPU for benchmark `name`. On
    `device` cpu, Triton kernels run in its interpreter: chosen here, before they are defined."""
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        return False
    if torch.cuda.is_available():
        return False
    print(f"{name}: no CUDA GPU available; this benchmark only runs on a GPU "
          "(--device cpu --tiny is a dry run).", file=sys.stderr)
    return True


def write_rows(path: str | None, rows: list[dict], meta: dict) -> None:
    """{"meta": where and with what (bench_meta), "rows": [...]} as JSON at `path`."""
    if path:
        with open(path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


def add_device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: a dry run in Triton's interpreter (figures meaningless)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, for a dry run")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_path", nargs="?", help="write the rows as JSON here")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--kv-dtype", choices=sorted(KV_DTYPES), default="same",
                        help="our kernel's cache dtype (fp8: float8 e4m3; SDPA keeps --dtype)")
    parser.add_argument("--batches", type=_int_list, help="default 1,8,16,32,64")
    parser.add_argument("--contexts", type=_int_list, help="default 250,1500,3000")
    parser.add_argument("--heads", type=int, help="default 32")
    parser.add_argument("--head-dim", type=int, help="default 128")
    parser.add_argument("--capacity", type=int, help=f"default {CAPACITY}")
    add_device_args(parser)
    args = parser.parse_args(argv)
    for name, value in SHAPES["tiny" if args.tiny else "full"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if gpu_missing("bench_attention", args.device):
        return 2
    from duplex_agent.agent.bench import bench_meta
    meta = {**bench_meta(args.device), "benchmark": "decode_attention"}
    rows = bench_decode_attention(args.batches, args.contexts, DTYPES[args.dtype],
                                  H=args.heads, D=args.head_dim, kv_dtype=KV_DTYPES[args.kv_dtype],
                                  capacity=args.capacity, device=args.device,
                                  on_batch=lambda rows: write_rows(args.json_path, rows, meta))
    print(f"{meta['device_name']}, {args.dtype}, KV {rows[0]['kv_dtype']}, H={args.heads}, "
          f"D={args.head_dim}, capacity {args.capacity}, copy {rows[0]['copy_gbps']:.0f} GB/s")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
