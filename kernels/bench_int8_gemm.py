"""int8 weight-only GEMM microbenchmark, and what int8 weights mean for capacity.

1. Kernel: for each of moshiko's linear shapes (temporal attention and FFN, the text head, the
   depformer's per-step weights) and B = 1..64 rows (conversations), the Triton int8 GEMM
   against torch's bf16 GEMM (cuBLAS) on the same shape. At these batch sizes both are bound by
   reading the weights, so the figure of merit is bandwidth: bytes the call must move (weights,
   scales, x, y) per second, against a device-to-device copy, and the time ratio.
2. Capacity: conversations that fit on 24, 48 and 80 GiB devices next to the weights, bf16 vs
   int8 linears, with the KV cache in bf16 or float8 (from agent/engine.py's capacity functions:
   the engine refuses larger --max-sessions with the same arithmetic).

`--tiny` runs small shapes (on CPU in Triton's interpreter where there is no GPU: a dry run of the
same code and file layout, figures meaningless) and finishes in seconds.

Usage: python -m duplex_agent.kernels.bench_int8_gemm [results.json] [--tiny] [--batches 1,8]
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from duplex_agent.kernels.bench_attention import _int_list, copy_bandwidth, gpu_missing, timer

# (name, out_features N, in_features K): moshiko's linears as one decode step calls them.
MOSHIKO_SHAPES = (
    ("temporal in_proj", 3 * 4096, 4096), ("temporal out_proj", 4096, 4096),
    ("temporal ffn in", 2 * 11264, 4096), ("temporal ffn out", 4096, 11264),
    ("text_linear", 32000, 4096), ("depformer_in", 1024, 4096),
    ("depformer in_proj", 3 * 1024, 1024), ("depformer ffn in", 2 * 2816, 1024),
    ("depformer ffn out", 1024, 2816), ("depformer linears", 2048, 1024),
)
TINY_SHAPES = (("tiny in_proj", 192, 64), ("tiny ffn out", 64, 170))
BATCHES = (1, 2, 4, 8, 16, 32, 64)
DEVICE_GIB = (24, 48, 80)


def gemm_bytes(B: int, N: int, K: int, weight_elem: int, act_elem: int, scales: bool) -> int:
    """Minimum memory traffic of y = x @ W.T: W once, its row scales, x and y."""
    return N * K * weight_elem + (4 * N if scales else 0) + B * (K + N) * act_elem


def bench_gemm(shapes=MOSHIKO_SHAPES, batches=BATCHES, device: str = "cuda",
               dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    from duplex_agent.checkpoints.quantize import quantize_rows
    from duplex_agent.kernels.int8_gemm import int8_linear_triton
    device = torch.device(device)
    measure = timer(device)
    copy_gbps = copy_bandwidth(device, 1 << 30 if device.type == "cuda" else 1 << 22) / 1e9
    rows = []
    for name, N, K in shapes:
        w = torch.randn(N, K, device=device) * 0.02
        w_q, scale = quantize_rows(w)
        w_dense = w.to(dtype)
        del w
        for B in batches:
            x = torch.randn(B, K, device=device, dtype=dtype)
            t_int8 = measure(lambda: int8_linear_triton(x, w_q, scale))
            t_dense = measure(lambda: F.linear(x, w_dense))
            int8_bytes = gemm_bytes(B, N, K, 1, dtype.itemsize, True)
            dense_bytes = gemm_bytes(B, N, K, dtype.itemsize, dtype.itemsize, False)
            rows.append({
                "shape": name, "N": N, "K": K, "batch": B, "dtype": str(dtype).removeprefix("torch."),
                "int8_us": t_int8 * 1e6, "dense_us": t_dense * 1e6,
                "int8_gbps": int8_bytes / t_int8 / 1e9, "dense_gbps": dense_bytes / t_dense / 1e9,
                "int8_frac_of_copy": int8_bytes / t_int8 / 1e9 / copy_gbps,
                "speedup_vs_dense": t_dense / t_int8, "copy_gbps": copy_gbps,
            })
        del w_q, scale, w_dense
    return rows


def capacity_table() -> list[dict]:
    """Conversations that fit on each device size: moshiko, bf16 compute, bf16 vs int8 linears,
    KV cache bf16 vs float8."""
    from duplex_agent.agent.config import LMConfig
    from duplex_agent.agent.engine import (KV_CACHE_DTYPES, bytes_per_conversation,
                                           conversations_on_device, model_weight_bytes)
    rows = []
    for quantize in (False, True):
        cfg = LMConfig(quantize=quantize)
        for kv_name, kv in (("bf16", None), ("fp8", KV_CACHE_DTYPES["fp8"])):
            row = {"weights": "int8" if quantize else "bf16", "kv_cache": kv_name,
                   "weight_gb": model_weight_bytes(cfg, torch.bfloat16) / 1e9,
                   "per_conversation_gib": bytes_per_conversation(cfg, torch.bfloat16, kv) / 2**30}
            for gib in DEVICE_GIB:
                row[f"fit_{gib}gib"] = conversations_on_device(cfg, torch.bfloat16, gib * 2**30, kv)
            rows.append(row)
    return rows


def format_gemm(rows: list[dict]) -> str:
    header = (f"{'shape':<18} {'B':>3} {'int8 us':>9} {'GB/s':>7} {'of copy':>8} "
              f"{'dense us':>9} {'GB/s':>7} {'x dense':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['shape']:<18} {r['batch']:>3} {r['int8_us']:>9.1f} {r['int8_gbps']:>7.0f} "
                     f"{r['int8_frac_of_copy']:>8.1%} {r['dense_us']:>9.1f} {r['dense_gbps']:>7.0f} "
                     f"{r['speedup_vs_dense']:>7.2f}")
    return "\n".join(lines)


def format_capacity(rows: list[dict]) -> str:
    header = (f"{'weights':<8} {'KV':<5} {'weights GB':>10} {'GiB/conv':>9} "
              + " ".join(f"{f'{g} GiB':>7}" for g in DEVICE_GIB))
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['weights']:<8} {r['kv_cache']:<5} {r['weight_gb']:>10.1f} "
                     f"{r['per_conversation_gib']:>9.2f} "
                     + " ".join(f"{r[f'fit_{g}gib']:>7}" for g in DEVICE_GIB))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_path", nargs="?", help="write meta, GEMM rows and capacity as JSON here")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny shapes; on CPU (Triton's interpreter) where there is no GPU")
    parser.add_argument("--batches", type=_int_list, help="default 1,2,4,8,16,32,64 (tiny: 1,3)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if gpu_missing("bench_int8_gemm", "cpu" if args.tiny and device == "cpu" else "cuda"):
        return 2
    from duplex_agent.agent.bench import bench_meta
    from duplex_agent.kernels.bench_attention import write_rows
    shapes, batches = (TINY_SHAPES, (1, 3)) if args.tiny else (MOSHIKO_SHAPES, BATCHES)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = bench_gemm(shapes, args.batches or batches, device, dtype)
    capacity = capacity_table()
    meta = {**bench_meta(device), "benchmark": "int8_gemm", "tiny": args.tiny}
    how = ("median per call, L2 flushed" if device == "cuda"
           else "Triton's interpreter: a dry run, figures meaningless")
    print(f"{meta['device_name']}: int8 weight-only GEMM (Triton) vs {rows[0]['dtype']} GEMM, "
          f"{how}; copy {rows[0]['copy_gbps']:.0f} GB/s")
    print(format_gemm(rows))
    print("\nmoshiko conversations per device (3000-step KV cache each):")
    print(format_capacity(capacity))
    write_rows(args.json_path, rows, {**meta, "capacity": capacity})
    return 0


if __name__ == "__main__":
    sys.exit(main())
