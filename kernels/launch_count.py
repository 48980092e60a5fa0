"""Device kernel launches per LM step, on the torch references and on our Triton kernels.

At batch 1 a Moshi step is thousands of small kernels: even replayed from a CUDA graph each costs
a few microseconds, which adds up to the order of the 5 ms weight-read floor. Launch counts do
not depend on tensor sizes, so they are counted exactly on CPU, on the real layer structure
(moshiko: 32 temporal layers, 6 depformer layers x 8 steps) with small widths: every aten
operation that reaches a backend kernel (views, reshapes and allocations excluded) plus every
Triton launch (run by the Triton interpreter).

Usage: TRITON_INTERPRET=1 python -m duplex_agent.kernels.launch_count [results.json]
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Aten operations that only make views or allocate: no kernel launch.
NO_LAUNCH = {"view", "_unsafe_view", "as_strided", "t", "transpose", "expand", "select", "slice",
             "unsqueeze", "squeeze", "alias", "detach", "empty", "empty_strided", "permute",
             "unbind", "split", "split_with_sizes", "lift_fresh", "_reshape_alias", "unflatten",
             "view_as_real", "view_as_complex", "empty_like", "new_empty"}


class _CountAten(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.paused = False  # while the Triton interpreter moves a kernel's tensors

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket.__name__
        if name not in NO_LAUNCH and not self.paused:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _count_triton(aten: _CountAten):
    """Counts launches of every Triton kernel in `kernels` (InterpretedFunction or JITFunction)."""
    patched = []
    for mod in [m for name, m in sys.modules.items() if name.startswith("duplex_agent.kernels.")]:
        for attr, fn in list(vars(mod).items()):
            if attr.startswith("_") and attr.endswith("_kernel") and hasattr(fn, "__getitem__"):
                class Counting:
                    def __init__(self, fn, name):
                        self.fn, self.name = fn, name

                    def __getitem__(self, grid):
                        def launch(*args, **kwargs):
                            aten.counts[f"triton:{self.name}"] += 1
                            aten.paused = True
                            try:
                                return self.fn[grid](*args, **kwargs)
                            finally:
                                aten.paused = False
                        return launch
                setattr(mod, attr, Counting(fn, attr))
                patched.append((mod, attr, fn))
    try:
        yield
    finally:
        for mod, attr, fn in patched:
            setattr(mod, attr, fn)


def count_step_launches(backend: str, batch: int = 1) -> collections.Counter:
    """Launches of one LMGen step (temporal + depformer + sampling) with AGENT_KERNELS=backend."""
    from duplex_agent.agent.config import LMConfig, SamplingConfig
    from duplex_agent.agent.lm_gen import LMGen
    from duplex_agent.agent.model import MoshiLM
    cfg = dataclasses.replace(LMConfig.moshiko(), dim=64, num_heads=2, depformer_dim=32,
                              depformer_num_heads=2, depformer_dim_feedforward=128, context=16,
                              text_card=64, card=32)
    torch.manual_seed(0)
    model = MoshiLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # some are allocated uninitialised
            p.normal_(0.0, 0.02)
    gen = LMGen(model, batch)
    for row in range(batch):
        gen.reset(row, SamplingConfig(seed=row))
    codes = torch.zeros(batch, cfg.num_user_codebooks, dtype=torch.long)
    run = torch.ones(batch, dtype=torch.bool)
    old = os.environ.get("AGENT_KERNELS")
    os.environ["AGENT_KERNELS"] = backend
    try:
        gen.step(codes, run)  # warm-up: lazily built tables
        aten = _CountAten()
        with _count_triton(aten), aten:
            gen._step()
        return aten.counts
    finally:
        if old is None:
            del os.environ["AGENT_KERNELS"]
        else:
            os.environ["AGENT_KERNELS"] = old


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        print("set TRITON_INTERPRET=1 to count the Triton path on CPU", file=sys.stderr)
        return 2
    rows = {}
    for backend in ("torch", "triton"):
        counts = count_step_launches(backend)
        rows[backend] = {"total": sum(counts.values()), "by_op": dict(counts.most_common())}
        top = ", ".join(f"{k} {v}" for k, v in counts.most_common(8))
        print(f"{backend:6} {rows[backend]['total']:5d} launches per step  ({top}, ...)")
    print(f"moshiko layer structure (32 temporal layers, 6 depformer layers x 8 steps), batch 1; "
          f"{rows['torch']['total'] / rows['triton']['total']:.2f}x fewer with the Triton kernels")
    if argv:
        with open(argv[0], "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
