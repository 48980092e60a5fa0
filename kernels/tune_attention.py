"""Measure the decode-attention kernel's launch configurations on this GPU and keep the fastest.

For each (KV dtype, batch) at the model's full context (every row's window holds all `capacity`
keys), every candidate (keys per tile, warps, pipeline stages, splits) is timed as
bench_attention times the kernel (L2 flushed, median); the fastest that also matches the torch
reference is written to kernels/tuned/decode_attention-<device>.json, which `launch_config`
reads from then on. Entries of other shapes already in the file are kept.

    python -m duplex_agent.kernels.tune_attention [RESULTS.json] [--batches 1,8,32,80]
        [--kv-dtypes bf16,fp8] [--table-dir DIR]

`--device cpu --tiny` is a dry run in Triton's interpreter (few candidates, figures meaningless,
nothing written to the package's table unless --table-dir says where).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

from duplex_agent.kernels.bench_attention import (SHAPES, _int_list, add_device_args, gpu_missing,
                                                  timer, write_rows)

KV_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "fp16": torch.float16,
             "fp32": torch.float32}
# The candidates on a GPU, per kernel variant (matrix: the tl.dot one, whose tile loads Triton
# pipelines over num_stages), and the few of a dry run.
GRID = {False: {"block_n": (16, 32, 64), "num_warps": (4, 8), "num_stages": (1, 3)},
        True: {"block_n": (32, 64, 128), "num_warps": (4, 8), "num_stages": (2, 4)}}
TINY_GRID = {False: {"block_n": (16,), "num_warps": (4,), "num_stages": (1,)},
             True: {"block_n": (16,), "num_warps": (4,), "num_stages": (2,)}}
MAX_SPLIT_CHOICES = 5


def split_choices(batch_heads: int, capacity: int, block_n: int, num_sms: int) -> list[int]:
    """Powers of two from the split count that gives one program per SM up, at most five, never
    more splits than tiles in the window."""
    from duplex_agent.kernels.decode_attention import MAX_SPLITS
    tiles = -(-capacity // block_n)
    first = 1
    while first * 2 * batch_heads <= num_sms:
        first *= 2
    return [s for s in (first << i for i in range(MAX_SPLIT_CHOICES)) if s <= min(tiles, MAX_SPLITS)] or [1]


def tune(batches, kv_dtypes, *, dtype=torch.bfloat16, heads=32, head_dim=128, capacity=3000,
         device="cuda", grid=GRID, on_row=None, on_best=None) -> tuple[list[dict], list[dict]]:
    """Returns (every measured row, the best entry per (kv dtype, batch)), batch by batch in the
    order given; `on_row` and `on_best` get the lists so far (a run cut short keeps them)."""
    from duplex_agent.kernels import decode_attention as da
    from duplex_agent.kernels.attention_ref import decode_attention_ref
    from duplex_agent.kernels.bench_attention import attention_bytes
    from duplex_agent.kernels.selfcheck import ATTENTION_OUT_TOL
    device = torch.device(device)
    measure = timer(device)
    num_sms = da._num_sms(device)
    rows, best = [], []
    for B, kv_dtype in itertools.product(batches, kv_dtypes):
        H, C, D = heads, capacity, head_dim
        gen = torch.Generator(device="cpu").manual_seed(B)
        k_cache = torch.randn(B, H, C, D, generator=gen).to(device=device, dtype=dtype).to(kv_dtype)
        v_cache = torch.randn(B, H, C, D, generator=gen).to(device=device, dtype=dtype).to(kv_dtype)
        q, k, v = (torch.randn(B, H, D, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
        positions = torch.full((B,), 2 * C + 5, device=device)  # a full window, wrapped
        exec_mask = torch.ones(B, dtype=torch.bool, device=device)
        want = decode_attention_ref(q, k, v, k_cache.clone(), v_cache.clone(), positions, exec_mask)
        nbytes = attention_bytes(B, H, C, D, dtype.itemsize, kv_dtype.itemsize)
        atol, rtol = ATTENTION_OUT_TOL[kv_dtype if kv_dtype == torch.float8_e4m3fn else dtype]
        heuristic = da.heuristic_config(B, H, C, device)
        candidates = {da.LaunchConfig(bn, s, w, st, matrix)
                      for matrix, g in grid.items()
                      for bn, w, st in itertools.product(g["block_n"], g["num_warps"], g["num_stages"])
                      for s in split_choices(B * H, C, bn, num_sms)}
        candidates.add(heuristic)
        measured = []
        for config in sorted(candidates, key=lambda c: (c.matrix, c.block_n, c.num_warps,
                                                         c.num_stages, c.num_splits)):
            row = {"dtype": str(dtype)[6:], "kv_dtype": str(kv_dtype)[6:], "batch": B, "heads": H,
                   "head_dim": D, "capacity": C, **config.__dict__, "heuristic": config == heuristic}
            try:
                got = da.decode_attention_triton(q, k, v, k_cache, v_cache, positions, exec_mask,
                                                 config=config)
                err = (got.float() - want.float()).abs()
                row["max_err"] = err.max().item()
                # The tests' (and the self-check's) tolerance decides what is correct.
                row["correct"] = bool((err <= atol + rtol * want.float().abs()).all())
                row["us"] = measure(lambda: da.decode_attention_triton(
                    q, k, v, k_cache, v_cache, positions, exec_mask, config=config)) * 1e6
                row["gbps"] = nbytes / row["us"] / 1e3
            except Exception as e:  # out of resources, compile errors: not a candidate here
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            if "us" in row:
                measured.append(row)
            if on_row:
                on_row(rows)
        correct = [r for r in measured if r["correct"]]
        if correct:
            top = min(correct, key=lambda r: r["us"])
            base = next((r for r in measured if r["heuristic"]), None)
            best.append({k: top[k] for k in ("dtype", "kv_dtype", "heads", "head_dim", "capacity",
                                             "batch", "block_n", "num_splits", "num_warps",
                                             "num_stages", "matrix", "us", "gbps")}
                        | {"heuristic_us": base["us"] if base else None})
            if on_best:
                on_best(best)
        k_cache = v_cache = None
    return rows, best


def write_table(best: list[dict], device_name: str, table_dir: Path | None = None,
                copy_to: Path | None = None) -> Path:
    """Merge `best` into the device's table: an entry of the same shape and batch is replaced.
    `copy_to`: a folder that gets a copy of the whole table too."""
    from duplex_agent.kernels import decode_attention as da
    path = da.tuned_table_path(device_name)
    if table_dir is not None:
        path = Path(table_dir) / path.name
    key = ("dtype", "kv_dtype", "heads", "head_dim", "capacity", "batch")
    old = json.loads(path.read_text())["entries"] if path.is_file() else []
    fresh = {tuple(e[k] for k in key) for e in best}
    entries = [e for e in old if tuple(e[k] for k in key) not in fresh] + best
    import triton
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": device_name, "triton": triton.__version__,
                                "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                                "entries": sorted(entries, key=lambda e: [str(e[k]) for k in key])},
                               indent=1) + "\n")
    da.forget_tuning()
    if copy_to is not None:
        (Path(copy_to) / path.name).write_text(path.read_text())
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_path", nargs="?", help="write every measured row here")
    parser.add_argument("--batches", type=_int_list, default=(1, 8, 32, 80))
    parser.add_argument("--kv-dtypes", default="bf16,fp8")
    parser.add_argument("--table-dir", default=None,
                        help="where the device's table goes (default: the package's kernels/tuned/)")
    parser.add_argument("--copy-to", default=None, help="a folder that gets a copy of the table")
    add_device_args(parser)
    args = parser.parse_args(argv)
    if gpu_missing("tune_attention", args.device):
        return 2
    shape = SHAPES["tiny" if args.tiny else "full"]
    if args.tiny and args.batches == (1, 8, 32, 80):
        args.batches = shape["batches"]
    from duplex_agent.agent.bench import bench_meta
    meta = {**bench_meta(args.device), "benchmark": "decode_attention_tuning"}
    # On CPU the interpreter computes in fp32 (bf16 needs a GPU): the "same as the weights" cache too.
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    kv_dtypes = [dtype if x == "bf16" else KV_DTYPES[x] for x in args.kv_dtypes.split(",")]
    keep = args.device == "cuda" or args.table_dir  # a dry run's table only where asked

    def save_best(best: list[dict]) -> None:
        write_rows(args.json_path, rows_so_far, {**meta, "best": best})
        if keep:
            write_table(best, meta["device_name"], args.table_dir, args.copy_to)

    rows_so_far: list[dict] = []

    def save_rows(rows: list[dict]) -> None:
        rows_so_far[:] = rows
        write_rows(args.json_path, rows, meta)

    rows, best = tune(args.batches, kv_dtypes, dtype=dtype, heads=shape["heads"],
                      head_dim=shape["head_dim"], capacity=shape["capacity"], device=args.device,
                      grid=TINY_GRID if args.tiny else GRID, on_row=save_rows, on_best=save_best)
    save_best(best)
    if keep:
        from duplex_agent.kernels.decode_attention import tuned_table_path
        print(f"wrote {Path(args.table_dir or tuned_table_path(meta['device_name']).parent)}")
    for e in best:
        base = f"{e['heuristic_us']:.1f}" if e["heuristic_us"] else "-"
        print(f"{e['kv_dtype']:>14} B={e['batch']:<4} best {e['us']:8.1f} us ({e['gbps']:6.0f} GB/s) "
              f"block_n={e['block_n']} splits={e['num_splits']} warps={e['num_warps']} "
              f"stages={e['num_stages']} matrix={e['matrix']}; heuristic {base} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
