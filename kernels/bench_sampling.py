"""Sampling microbenchmark: the fused draw kernel against its torch reference, and the whole
per-stream draw (top-k threshold by sort, then the kernel) that a Moshi step runs 9 times (text
over 32000 tokens, 8 audio codebooks over 2048). Figures mean something on a CUDA GPU only;
`--device cpu --tiny` is a dry run of the same code and file layout.

Usage: python -m duplex_agent.kernels.bench_sampling [results.json] [--batches 1,8,32,64]
"""
from __future__ import annotations

import argparse
import sys

import torch

from duplex_agent.kernels.bench_attention import _int_list, add_device_args, gpu_missing, timer, write_rows

TINY = {"batches": (1, 2), "vocabs": (1024, 256)}


def bench_sampling(batches=(1, 8, 32, 64), vocabs=(32000, 2048), device: str = "cuda") -> list[dict]:
    from duplex_agent.agent.sampling import BatchSampler
    from duplex_agent.kernels.sampling import sample_ref, sample_triton
    device = torch.device(device)
    measure = timer(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    for B in batches:
        for V in vocabs:
            logits = torch.randn(B, V, device=device) * 3
            temp = torch.full((B,), 0.8, device=device)
            kth = logits.topk(25 if V > 10_000 else 250, dim=-1).values[:, -1].contiguous()
            seed_key = torch.arange(B, device=device)
            counter = torch.zeros(B, dtype=torch.long, device=device)
            greedy = torch.zeros(B, dtype=torch.bool, device=device)
            args = (logits, temp, kth, seed_key, counter, 0, greedy)
            sampler = BatchSampler(B, V, device)
            for row in range(B):
                sampler.configure(row, row, 0.8, 250, greedy=False)
            t_ref = measure(lambda: sample_ref(*args))
            t_tri = measure(lambda: sample_triton(*args))
            t_all = measure(lambda: sampler.sample(logits, counter, 0))
            rows.append({"device": device_name, "batch": B, "vocab": V,
                         "torch_ref_us": t_ref * 1e6, "triton_us": t_tri * 1e6,
                         "speedup": t_ref / t_tri, "whole_draw_us": t_all * 1e6})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_path", nargs="?")
    parser.add_argument("--batches", type=_int_list, default=None, help="default 1,8,32,64")
    add_device_args(parser)
    args = parser.parse_args(argv)
    if gpu_missing("bench_sampling", args.device):
        return 2
    from duplex_agent.agent.bench import bench_meta
    shapes = dict(TINY) if args.tiny else {}
    if args.batches:
        shapes["batches"] = args.batches
    rows = bench_sampling(**shapes, device=args.device)
    print(f"{rows[0]['device']}: per draw, L2 flushed, median (us)")
    print(f"{'B':>4} {'V':>6} {'torch ref':>10} {'triton':>8} {'x':>6} {'whole draw':>11}")
    for r in rows:
        print(f"{r['batch']:>4} {r['vocab']:>6} {r['torch_ref_us']:>10.1f} {r['triton_us']:>8.1f} "
              f"{r['speedup']:>6.2f} {r['whole_draw_us']:>11.1f}")
    write_rows(args.json_path, rows, {**bench_meta(args.device), "benchmark": "sampling"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
