"""`run_agent.py bench`: per-tick time against the number of active conversations.

Each tick is split into Mimi encode / LM / Mimi decode, at empty context and at full context
(every slot's ring KV cache holding `context` steps), for our engine and for the moshi library's
`LMGen` + Mimi on identical random weights, in the same run. On CUDA the model is the real
moshiko shape (random init, bf16); on CPU the tiny config. Prints a table, writes JSON and a PNG.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

# Bytes of bf16 weights read per step at B=1 (temporal + text head + 8 depformer slices), from
# ../shared/reference/moshi.md section 1.7; used for the bandwidth floor.
MOSHIKO_BYTES_PER_STEP = 7.37e9 * 2


def register(sub, add_checkpoint_args, add_sampling_args) -> None:
    p = sub.add_parser("bench", help="benchmark ticks vs active conversations, ours and moshi's")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--sessions", default=None,
                   help="comma-separated conversation counts (default cpu: 1,2,4,8; "
                        "cuda: 1,2,4,8,16,32,64)")
    p.add_argument("--steps", type=int, default=None, help="timed ticks per point")
    p.add_argument("--no-reference", action="store_true", help="skip the moshi library")
    p.add_argument("--kv-cache", choices=["auto", "fp8"], default="auto",
                   help="our engine's KV cache dtype (the reference's is always the weights')")
    p.add_argument("--out", default="bench/results", help="folder for JSON and PNG")
    p.set_defaults(func=run_bench)


def run_bench(args) -> int:
    import torch
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    sessions = [int(s) for s in (args.sessions or ("1,2,4,8,16,32,64" if cuda else "1,2,4,8")).split(",")]
    steps = args.steps or (50 if cuda else 10)
    results = bench(device, sessions, steps, reference=not args.no_reference, kv_cache=args.kv_cache)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = out / f"bench-{results['meta']['device']}-{results['meta']['model'].split()[0]}-{stamp}.json"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    print(format_table(results))
    png = plot(results, json_path.with_suffix(".png"))
    print(f"wrote {json_path}" + (f" and {png}" if png else ""))
    return 0


def bench(device, sessions: list[int], steps: int, reference: bool = True,
          kv_cache: str = "auto") -> dict:
    import torch

    from duplex_agent.agent.engine import KV_CACHE_DTYPES, Engine, conversations_that_fit, free_device_memory
    kv_dtype = KV_CACHE_DTYPES[kv_cache]
    bundle_factory, cfg_name = _model_factory(device)
    probe = bundle_factory()
    weights = probe.model.text_linear.weight
    # Ours and the reference each hold a KV cache per conversation, one after the other; the
    # reference's is in the weights' dtype.
    fit = conversations_that_fit(probe.config, weights.dtype, free_device_memory(device),
                                 None if reference else kv_dtype)
    if any(n > fit for n in sessions):
        print(f"skipping {[n for n in sessions if n > fit]}: at most {fit} conversations fit")
        sessions = [n for n in sessions if n <= fit]
    probe_cfg = probe.config
    del probe
    rows, described = [], {}
    for n in sessions:
        for context in ("empty", "full"):
            bundle = bundle_factory()
            engine = Engine(bundle, n, kv_dtype=kv_dtype)
            described = engine.describe()
            for _ in range(n):
                engine.open()
            engine.profile = True
            if context == "full":
                _fill_context(engine, bundle)
            rows.append(_time_ours(engine, n, steps, context))
            del engine
            bundle.model.caches = bundle.model.dep_caches = None  # free our KV before moshi's
            if reference:
                rows.append(_time_reference(bundle_factory(), n, steps, context))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    meta = _meta(device, cfg_name)
    meta["kv_cache"] = described.get("kv_cache")
    meta["cuda_graphs"] = described.get("cuda_graphs")
    if device.type == "cuda":
        # The floor of an LM step: weights read once, plus every executing conversation's KV
        # window (full context: all `context` steps), at the measured copy bandwidth.
        bandwidth = _copy_bandwidth(device)
        kv_dtypes = {"ours": kv_dtype or weights.dtype, "moshi": weights.dtype}
        meta["copy_bandwidth_gbps"] = round(bandwidth / 1e9, 1)
        meta["bandwidth_floor_ms_b1"] = round(MOSHIKO_BYTES_PER_STEP / bandwidth * 1e3, 3)
        for row in rows:
            floor = lm_floor_ms(probe_cfg, row["sessions"], row["context"] == "full",
                                kv_dtypes[row["impl"]], bandwidth)
            row["lm_floor_ms"] = round(floor, 3)
            row["lm_over_floor"] = round(row["lm_p50_ms"] / floor, 2)
    return {"meta": meta, "rows": rows}


def _model_factory(device):
    import torch

    from duplex_agent.agent.config import LMConfig, SamplingConfig
    from duplex_agent.checkpoints.loader import AgentBundle, load_checkpoint
    if device.type != "cuda":
        base = load_checkpoint("tiny-random", device)

        def tiny():
            from duplex_agent.checkpoints.tiny_random import build_tiny_mimi
            return AgentBundle(**{**base.__dict__, "mimi": build_tiny_mimi()})
        return tiny, "tiny"

    from moshi.models import loaders

    from duplex_agent.agent.model import MoshiLM
    cfg = LMConfig.moshiko()
    with torch.device("meta"):
        model = MoshiLM(cfg)
    model = model.to_empty(device=device).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    tokenizer = load_checkpoint("tiny-random", "cpu").tokenizer  # only for printing pieces

    def real():
        mimi = loaders.get_mimi(None, device=device)
        return AgentBundle("moshiko-random", cfg, model, mimi, tokenizer, SamplingConfig())
    return real, "moshiko (random init, bf16)"


def _fill_context(engine, bundle) -> None:
    """Jump every slot to a position past the context: attention then reads the whole ring."""
    import numpy as np
    frame = np.zeros(1920, dtype=np.float32)
    engine.tick({row: frame for row in engine.active})  # apply resets first
    engine.lm.offsets.fill_(bundle.config.context + 5)


def _time_ours(engine, n: int, steps: int, context: str) -> dict:
    import numpy as np
    rng = np.random.default_rng(0)
    frames = {row: (rng.standard_normal(1920) * 0.1).astype(np.float32) for row in engine.active}
    for _ in range(3):
        engine.tick(frames)
    stages = {"encode": [], "lm": [], "decode": [], "tick": []}
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.tick(frames)
        stages["tick"].append((time.perf_counter() - t0) * 1e3)
        for k in ("encode", "lm", "decode"):
            stages[k].append(engine.last_timings[k])
    return _row("ours", n, context, stages)


def _time_reference(bundle, n: int, steps: int, context: str) -> dict:
    import torch
    from moshi.models import loaders
    from moshi.models.lm import LMGen

    device = bundle.model.text_linear.weight.device
    dtype = bundle.model.text_linear.weight.dtype
    with torch.device("meta"):
        ref = loaders.get_moshi_lm(None, lm_kwargs=bundle.config.to_moshi_lm_kwargs(),
                                   device="meta", dtype=dtype)
    ref.load_state_dict(bundle.model.state_dict(), strict=True, assign=True)
    ref.eval()
    mimi = bundle.mimi
    gen = LMGen(ref, support_out_of_sync=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    stages = {"encode": [], "lm": [], "decode": [], "tick": []}
    with torch.no_grad(), mimi.streaming(n), gen.streaming(n):
        pcm = torch.randn(n, 1, 1920, device=device) * 0.1
        for _ in range(4):
            gen.step(mimi.encode(pcm))
        if context == "full":
            _fast_forward_reference(gen, ref, bundle.config.context + 5)
        for i in range(steps + 3):
            t0 = time.perf_counter()
            codes = mimi.encode(pcm)
            sync()
            t1 = time.perf_counter()
            out = gen.step(codes)
            sync()
            t2 = time.perf_counter()
            mimi.decode(out[:, 1:].clamp(min=0))
            sync()
            t3 = time.perf_counter()
            if i >= 3:
                stages["encode"].append((t1 - t0) * 1e3)
                stages["lm"].append((t2 - t1) * 1e3)
                stages["decode"].append((t3 - t2) * 1e3)
                stages["tick"].append((t3 - t0) * 1e3)
    return _row("moshi", n, context, stages)


def _fast_forward_reference(gen, lm, position: int) -> None:
    """Move moshi's streaming offsets (LMGen and every attention ring) to `position`."""
    import torch
    state = gen._streaming_state
    state.offsets.fill_(position)
    state.offset_cpu = position
    for module in lm.transformer.modules():
        s = getattr(module, "_streaming_state", None)
        if s is None:
            continue
        if isinstance(getattr(s, "offset", None), torch.Tensor):
            s.offset.fill_(position)
        if hasattr(s, "offset_cpu"):
            s.offset_cpu = position
        kv = getattr(s, "kv_cache", None)
        if kv is not None:
            kv.end_offset.fill_(position)


def _row(impl, n, context, stages) -> dict:
    from duplex_agent.agent.api import percentile
    row = {"impl": impl, "sessions": n, "context": context}
    for k, xs in stages.items():
        row[f"{k}_p50_ms"] = round(statistics.median(xs), 3)
        row[f"{k}_p99_ms"] = percentile(sorted(xs), 0.99, digits=3)
    return row


def _meta(device, cfg_name) -> dict:
    import moshi
    import torch

    from duplex_agent.kernels.dispatch import kernel_backend
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{_cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
    return {"date": datetime.date.today().isoformat(), "device": device.type, "device_name": name,
            "model": cfg_name, "torch": torch.__version__, "moshi": moshi.__version__,
            "kernels": kernel_backend(),
            "python": platform.python_version()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def lm_floor_ms(cfg, sessions: int, full_context: bool, kv_dtype, bandwidth: float) -> float:
    """The memory-bound floor of one LM step: the weights read once, plus each conversation's
    KV window (all `context` steps when full, ~none when empty), at `bandwidth` bytes/s."""
    from duplex_agent.agent.engine import kv_bytes_per_step
    window = cfg.context if full_context else 0
    kv = sessions * window * kv_bytes_per_step(cfg, kv_dtype)
    return (MOSHIKO_BYTES_PER_STEP + kv) / bandwidth * 1e3


def _copy_bandwidth(device) -> float:
    """Measured device-to-device copy rate in bytes/s (read + write counted)."""
    import torch
    buf = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(buf)
    for _ in range(3):
        dst.copy_(buf)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        dst.copy_(buf)
    torch.cuda.synchronize()
    return 2 * buf.numel() * 10 / (time.perf_counter() - t0)


def format_table(results: dict) -> str:
    m = results["meta"]
    lines = [f"{m['model']} on {m['device_name']} (torch {m['torch']}, moshi {m['moshi']}, {m['date']}; "
             f"our KV cache {m.get('kv_cache', '?')}, kernels {m['kernels']}, "
             f"CUDA graphs {'on' if m.get('cuda_graphs') else 'off'})",
             f"{'impl':6} {'sessions':>8} {'context':>7} {'tick p50':>9} {'tick p99':>9} "
             f"{'encode':>8} {'lm':>8} {'decode':>8} {'lm floor':>9} {'x floor':>8}   (ms)"]
    for r in results["rows"]:
        floor = (f"{r['lm_floor_ms']:>9.2f} {r['lm_over_floor']:>8.2f}" if "lm_floor_ms" in r
                 else f"{'-':>9} {'-':>8}")
        lines.append(f"{r['impl']:6} {r['sessions']:>8} {r['context']:>7} {r['tick_p50_ms']:>9.2f} "
                     f"{r['tick_p99_ms']:>9.2f} {r['encode_p50_ms']:>8.2f} {r['lm_p50_ms']:>8.2f} "
                     f"{r['decode_p50_ms']:>8.2f} {floor}")
    if m.get("copy_bandwidth_gbps"):
        lines.append(f"lm floor: weights ({MOSHIKO_BYTES_PER_STEP / 1e9:.2f} GB) + each conversation's "
                     f"KV window, at the measured copy bandwidth {m['copy_bandwidth_gbps']:.0f} GB/s; "
                     f"weights only: {m['bandwidth_floor_ms_b1']:.2f} ms")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for impl, style in (("ours", "-"), ("moshi", "--")):
        for context, marker in (("empty", "o"), ("full", "s")):
            pts = [(r["sessions"], r["tick_p50_ms"]) for r in results["rows"]
                   if r["impl"] == impl and r["context"] == context]
            if pts:
                ax.plot(*zip(*pts), style, marker=marker, label=f"{impl}, {context} context")
    ax.axhline(80, color="grey", lw=0.8)
    ax.text(1, 82, "80 ms frame", color="grey", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("active conversations")
    ax.set_ylabel("tick p50 (ms)")
    ax.set_title(f"{results['meta']['model']} on {results['meta']['device_name']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
