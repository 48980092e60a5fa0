"""Sampling microbenchmark (CUDA only): the fused draw kernel against its torch reference, and
the whole per-stream draw (top-k threshold by sort, then the kernel) that a Moshi step runs
9 times (text over 32000 tokens, 8 audio codebooks over 2048).

Usage: python -m duplex_agent.kernels.bench_sampling [results.json] [--batches 1,8,32,64]
"""
from __future__ import annotations

import argparse
import sys

import torch

from duplex_agent.kernels.bench_attention import _int_list, gpu_missing, time_cuda, write_rows


def bench_sampling(batches=(1, 8, 32, 64), vocabs=(32000, 2048)) -> list[dict]:
    from duplex_agent.agent.sampling import BatchSampler
    from duplex_agent.kernels.sampling import sample_ref, sample_triton
    rows = []
    for B in batches:
        for V in vocabs:
            logits = torch.randn(B, V, device="cuda") * 3
            temp = torch.full((B,), 0.8, device="cuda")
            kth = logits.topk(25 if V > 10_000 else 250, dim=-1).values[:, -1].contiguous()
            seed_key = torch.arange(B, device="cuda")
            counter = torch.zeros(B, dtype=torch.long, device="cuda")
            greedy = torch.zeros(B, dtype=torch.bool, device="cuda")
            args = (logits, temp, kth, seed_key, counter, 0, greedy)
            sampler = BatchSampler(B, V, "cuda")
            for row in range(B):
                sampler.configure(row, row, 0.8, 250, greedy=False)
            t_ref = time_cuda(lambda: sample_ref(*args))
            t_tri = time_cuda(lambda: sample_triton(*args))
            t_all = time_cuda(lambda: sampler.sample(logits, counter, 0))
            rows.append({"device": torch.cuda.get_device_name(), "batch": B, "vocab": V,
                         "torch_ref_us": t_ref * 1e6, "triton_us": t_tri * 1e6,
                         "speedup": t_ref / t_tri, "whole_draw_us": t_all * 1e6})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_path", nargs="?")
    parser.add_argument("--batches", type=_int_list, default=(1, 8, 32, 64))
    args = parser.parse_args(argv)
    if gpu_missing("bench_sampling"):
        return 2
    rows = bench_sampling(args.batches)
    print(f"{rows[0]['device']}: per draw, L2 flushed, median (us)")
    print(f"{'B':>4} {'V':>6} {'torch ref':>10} {'triton':>8} {'x':>6} {'whole draw':>11}")
    for r in rows:
        print(f"{r['batch']:>4} {r['vocab']:>6} {r['torch_ref_us']:>10.1f} {r['triton_us']:>8.1f} "
              f"{r['speedup']:>6.2f} {r['whole_draw_us']:>11.1f}")
    write_rows(args.json_path, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
