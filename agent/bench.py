"""`run_agent.py bench`: per-tick time against the number of active conversations.

Each tick is split into Mimi encode / LM / Mimi decode, at empty context and at full context
(every slot's ring KV cache holding `context` steps), for our engine and for the moshi library's
`LMGen` + Mimi on identical random weights, in the same run. On CUDA the model is the real
shape of `--model` (moshiko or hibiki-zero, random init, bf16); on CPU its tiny config. With
`--transcriber`, our engine is also timed with the transcriber in its tick (rows "ours+stt", its
stage "transcriber"): a published model's name (stt-1b-en_fr, stt-1b-en_fr-candle, stt-2.6b-en)
is built with random weights in its shape, as the dialogue model is; tiny-random-stt or a folder
is loaded. Prints a table, writes JSON (rewritten after every point, so a run cut short keeps
what it measured) and a PNG. `--sessions max` is the most conversations whose KV caches fit in
free memory; a point that does not fit after all is listed in the JSON's meta["skipped"] and the
run goes on. `--capacity` instead writes the conversations that fit per device size, from the
engine's capacity functions (no device needed).
"""
from __future__ import annotations

import datetime
import functools
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from importlib import metadata
from pathlib import Path

# --contexts: a name for each set of contexts; a comma-separated list works too.
CONTEXT_CHOICES = {"empty": ["empty"], "full": ["full"], "both": ["empty", "full"]}
# --model: the LM preset benchmarked on CUDA, its tiny twin on CPU, and its model_type.
MODELS = {"moshiko": ("moshiko", "tiny-random", "moshi"),
          "hibiki-zero": ("hibiki_zero", "tiny-random-hibiki-zero", "hibiki")}
CAPACITY_GIB = (24, 40, 48, 80, 94, 141)  # device memory sizes of the capacity table


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark ticks vs active conversations, ours and moshi's")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--sessions", default=None,
                   help="comma-separated conversation counts, `max` for the most that fit at full "
                        "context (default cpu: 1,2,4,8; cuda: 1,2,4,8,16,32,64)")
    p.add_argument("--max-cap", type=int, default=None, help="an upper bound for `max`")
    p.add_argument("--contexts", default="both",
                   help="empty, full (every ring holding its whole window), or both "
                        "(same as empty,full)")
    p.add_argument("--steps", type=int, default=None, help="timed ticks per point")
    p.add_argument("--no-reference", action="store_true", help="skip the moshi library")
    p.add_argument("--kv-cache", choices=["auto", "fp8"], default="auto",
                   help="our engine's KV cache dtype (the reference's is always the weights')")
    p.add_argument("--out", default="bench/results", help="folder for JSON and PNG")
    p.add_argument("--tag", default="", help="a label for the file name (e.g. torch-kernels)")
    p.add_argument("--transcriber", metavar="NAME|PATH", default=None,
                   help="also time the tick with this transcriber: a published model's name "
                        "(random weights in its shape), tiny-random-stt or a local folder")
    p.add_argument("--model", choices=list(MODELS), default="moshiko",
                   help="the LM shape (random weights): moshiko, or hibiki-zero (grouped-query "
                        "attention, 16 + 16 codebooks); on CPU its tiny twin")
    p.add_argument("--note", default=None, help="a remark on the conditions, kept in the JSON's "
                   "meta (e.g. a CPU shared with other work)")
    p.add_argument("--capacity", action="store_true",
                   help="only the capacity table: conversations per device size for every model")
    p.set_defaults(func=run_bench)


def run_bench(args) -> int:
    import torch
    if args.capacity:
        return run_capacity(Path(args.out))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    sessions = (args.sessions or ("1,2,4,8,16,32,64" if cuda else "1,2,4,8")).split(",")
    contexts = CONTEXT_CHOICES.get(args.contexts) or args.contexts.split(",")
    if not set(contexts) <= {"empty", "full"}:
        raise SystemExit(f"--contexts takes empty, full, both or empty,full; not {args.contexts!r}")
    steps = args.steps or (50 if cuda else 10)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    tag = f"-{args.tag}" if args.tag else ""
    json_path = None

    def save(partial: dict) -> None:  # after every point: a run cut short keeps what it measured
        nonlocal json_path
        m = partial["meta"]
        stt = "-stt" if m.get("transcriber") else ""
        json_path = json_path or out / (f"bench-{m['device']}-{m['model'].split()[0]}{stt}{tag}-"
                                        f"{stamp}.json")
        json_path.write_text(json.dumps(partial, indent=1) + "\n")

    results = bench(device, sessions, steps, reference=not args.no_reference, kv_cache=args.kv_cache,
                    contexts=contexts, max_cap=args.max_cap, on_point=save,
                    transcriber=args.transcriber, note=args.note, model=args.model)
    save(results)
    print(format_table(results))
    png = plot(results, json_path.with_suffix(".png"))
    print(f"wrote {json_path}" + (f" and {png}" if png else ""))
    return 0


def bench(device, sessions: list[int | str], steps: int, reference: bool = True,
          kv_cache: str = "auto", contexts=("empty", "full"), max_cap: int | None = None,
          on_point=None, transcriber: str | None = None, note: str | None = None,
          model: str = "moshiko") -> dict:
    """Rows per (conversations, context, implementation). `sessions` may hold "max": the most
    conversations whose full KV caches fit in free memory (at most `max_cap`). A point that
    does not fit after all is listed in meta["skipped"] and the run goes on. `on_point` gets
    the results so far after every point. With `transcriber`, our engine is timed again with
    it ("ours+stt")."""
    import torch

    from duplex_agent.agent.engine import (KV_CACHE_DTYPES, CapacityError, Engine, conversations_that_fit,
                                           free_device_memory)
    kv_dtype = KV_CACHE_DTYPES[kv_cache]
    cuda = device.type == "cuda"
    bundle_factory, cfg_name = _model_factory(device, model)
    probe = bundle_factory()
    weights = probe.model.text_linear.weight
    probe_cfg = probe.config
    meta = _meta(device, cfg_name)
    if note:
        meta["note"] = note
    if transcriber:
        meta["transcriber"] = transcriber
    if cuda:
        # The floor of an LM step: weights read once, plus every executing conversation's KV
        # window (full context: all `context` steps), at the measured copy bandwidth.
        bandwidth = _copy_bandwidth(device)
        torch.cuda.empty_cache()  # the copy's buffers are not ours to keep
        kv_dtypes = {"ours": kv_dtype or weights.dtype, "ours+stt": kv_dtype or weights.dtype,
                     "moshi": weights.dtype}
        meta["copy_bandwidth_gbps"] = round(bandwidth / 1e9, 1)
        meta["weights_read_per_step_gb"] = round(weights_read_per_step(probe_cfg) / 1e9, 2)
        meta["bandwidth_floor_ms_b1"] = round(weights_read_per_step(probe_cfg) / bandwidth * 1e3, 3)
    # Ours and the reference each hold a KV cache per conversation, one after the other; the
    # reference's is in the weights' dtype. Full or empty, a ring is allocated whole. Measured
    # while the probe's Mimi is alive, as one bundle's will be when each engine is made.
    fit = conversations_that_fit(probe_cfg, weights.dtype, free_device_memory(device),
                                 None if reference else kv_dtype)
    del probe
    meta["conversations_that_fit"] = fit
    meta["skipped"] = []
    counts = session_counts(sessions, fit, max_cap)
    rows, results = [], {"meta": meta, "rows": []}

    def add(row: dict) -> None:
        if cuda:
            floor = lm_floor_ms(probe_cfg, row["sessions"], row["context"] == "full",
                                kv_dtypes[row["impl"]], bandwidth)
            row["lm_floor_ms"] = round(floor, 3)
            row["lm_over_floor"] = round(row["lm_p50_ms"] / floor, 2)
        rows.append(row)
        results["rows"] = rows
        if on_point:
            on_point(results)

    def release() -> None:
        gc.collect()  # CUDA graphs and streaming states hold their memory until collected
        if cuda:
            torch.cuda.empty_cache()

    for n in counts:
        for context in contexts:
            for impl in ("ours", "ours+stt") if transcriber else ("ours",):
                bundle = bundle_factory()
                try:
                    if impl == "ours+stt":
                        bundle.transcriber = bench_transcriber(transcriber, bundle, device)
                        meta["transcriber_model"] = bundle.transcriber.name
                    engine = Engine(bundle, n, kv_dtype=kv_dtype)
                    engine.warm_up()  # as Agent.load does: the kernel self-check, graph capture
                    described = engine.describe()
                    meta.update({k: described.get(k) for k in ("kv_cache", "cuda_graphs")})
                    meta["kernel_paths"] = described["kernels"]
                    meta.setdefault("selfcheck_s", described["selfcheck_s"])  # the first: compiles
                    if described.get("cuda_graphs_why"):
                        meta["cuda_graphs_why"] = described["cuda_graphs_why"]
                    for _ in range(n):
                        engine.open()
                    engine.profile = True
                    if context == "full":
                        _fill_context(engine, bundle)
                    add(_time_ours(engine, n, steps, context, impl))
                except (CapacityError, torch.OutOfMemoryError) as e:
                    meta["skipped"].append({"impl": impl, "sessions": n, "context": context,
                                            "reason": str(e).splitlines()[0]})
                engine = None
                bundle.model.caches = bundle.model.dep_caches = None  # free our KV before moshi's
                if bundle.transcriber is not None:
                    bundle.transcriber.model.caches = None
                bundle = None  # and this Mimi's streaming state
                release()
            if reference:
                try:
                    add(_time_reference(bundle_factory(), n, steps, context))
                except torch.OutOfMemoryError as e:
                    meta["skipped"].append({"impl": "moshi", "sessions": n, "context": context,
                                            "reason": str(e).splitlines()[0]})
                release()
    return results


def session_counts(sessions: list[int | str], fit: int, max_cap: int | None = None) -> list[int]:
    """Ascending conversation counts from `--sessions` items; "max" is `fit` (at most
    `max_cap`); counts above `fit` are dropped, saying so."""
    most = min(fit, max_cap) if max_cap else fit
    counts = sorted({most if str(s).strip() == "max" else int(s) for s in sessions} - {0})
    if any(n > fit for n in counts):
        print(f"skipping {[n for n in counts if n > fit]}: at most {fit} conversations fit")
    return [n for n in counts if n <= fit]


def _model_factory(device, model: str = "moshiko"):
    from duplex_agent.agent.config import LMConfig, SamplingConfig
    from duplex_agent.checkpoints.bundle import AgentBundle
    from duplex_agent.checkpoints.loader import load_checkpoint
    preset, tiny_name, model_type = MODELS[model]
    if device.type != "cuda":
        base = load_checkpoint(tiny_name, device)
        codebooks = base.mimi.num_codebooks

        def tiny():
            from duplex_agent.checkpoints.tiny_random import build_tiny_mimi
            return AgentBundle(**{**base.__dict__, "mimi": build_tiny_mimi(n_q=codebooks)})
        return tiny, "tiny" if model == "moshiko" else f"tiny-{model}"

    from moshi.models import loaders
    lm = random_lm(device, getattr(LMConfig, preset)())
    tokenizer = load_checkpoint("tiny-random", "cpu").tokenizer  # only for printing pieces

    def real():
        mimi = loaders.get_mimi(None, device=device,
                                num_codebooks=max(lm.cfg.dep_q, lm.cfg.num_user_codebooks))
        return AgentBundle(f"{model}-random", lm.cfg, lm, mimi, tokenizer, SamplingConfig(),
                           model_type=model_type)
    return real, f"{model} (random init, bf16)"


def bench_transcriber(spec: str, bundle, device):
    """The transcriber for a bench point, next to `bundle` (whose Mimi it shares)."""
    from duplex_agent.checkpoints.loader import load_transcriber
    from duplex_agent.checkpoints.stt import STT_SHAPES, random_stt
    weights = bundle.model.out_norm.alpha
    if spec in STT_SHAPES:
        return random_stt(spec, device, weights.dtype, bundle.mimi)
    return load_transcriber(spec, bundle.mimi, device, weights.dtype)


def random_moshiko_lm(device):
    from duplex_agent.agent.config import LMConfig
    return random_lm(device, LMConfig.moshiko())


def random_lm(device, cfg):
    """An LM of shape `cfg` with random bf16 weights, made on the meta device and then allocated
    once on `device` (no host copy of its gigabytes)."""
    import torch

    from duplex_agent.agent.model import MoshiLM
    with torch.device("meta"):
        model = MoshiLM(cfg)
    model = model.to_empty(device=device).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


@functools.lru_cache(maxsize=8)
def weights_read_per_step(cfg, itemsize: int = 2) -> int:
    """Bytes of (bf16) weights a decode step reads at batch 1: every linear and norm (temporal
    transformer, text head, depformer); of an embedding table only a row, not counted.
    Moshiko: 7.37 G parameters, 14.7 GB (../shared/reference/moshi.md section 1.7)."""
    import torch

    from duplex_agent.agent.model import MoshiLM
    with torch.device("meta"):
        state = MoshiLM(cfg).state_dict()
    embeddings = ("emb.", "text_emb.", "depformer_emb.", "depformer_text_emb.")
    return sum(t.numel() for k, t in state.items() if not k.startswith(embeddings)) * itemsize


def capacity_table() -> list[dict]:
    """Conversations that fit per device size (bf16 weights and compute, next to Mimi), for each
    model, KV cache in bf16 or float8: `agent/engine.py`'s capacity functions."""
    import torch

    from duplex_agent.agent.config import LMConfig
    from duplex_agent.agent.engine import (KV_CACHE_DTYPES, bytes_per_conversation,
                                           conversations_on_device, model_weight_bytes)
    rows = []
    for model, (preset, _, _) in MODELS.items():
        cfg = getattr(LMConfig, preset)()
        for kv_name, kv in (("bf16", None), ("fp8", KV_CACHE_DTYPES["fp8"])):
            row = {"model": model, "kv_cache": kv_name, "kv_heads": cfg.num_kv_heads,
                   "weight_gb": round(model_weight_bytes(cfg, torch.bfloat16) / 1e9, 2),
                   "per_conversation_gib": round(
                       bytes_per_conversation(cfg, torch.bfloat16, kv) / 2**30, 3)}
            for gib in CAPACITY_GIB:
                row[f"fit_{gib}gib"] = conversations_on_device(cfg, torch.bfloat16, gib * 2**30, kv)
            rows.append(row)
    return rows


def run_capacity(out: Path) -> int:
    rows = capacity_table()
    header = (f"{'model':<12} {'KV':<5} {'weights GB':>10} {'GiB/conv':>9} "
              + " ".join(f"{f'{g} GiB':>7}" for g in CAPACITY_GIB))
    print("conversations per device (bf16 weights and compute, Mimi beside them, a 3000-step "
          "KV cache each):")
    print("\n".join([header] + [
        f"{r['model']:<12} {r['kv_cache']:<5} {r['weight_gb']:>10.1f} {r['per_conversation_gib']:>9.3f} "
        + " ".join(f"{r[f'fit_{g}gib']:>7}" for g in CAPACITY_GIB) for r in rows]))
    out.mkdir(parents=True, exist_ok=True)
    today = datetime.date.today()
    path = out / f"capacity-{today.strftime('%Y%m%d')}.json"
    meta = {"date": today.isoformat(), "device_gib": list(CAPACITY_GIB),
            "source": "agent/engine.py conversations_on_device: computed, no device involved"}
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


def _fill_context(engine, bundle) -> None:
    """Jump every slot to a position past the context: attention then reads the whole ring."""
    import numpy as np
    frame = np.zeros(1920, dtype=np.float32)
    engine.tick({row: frame for row in engine.active})  # apply resets first
    engine.lm.offsets.fill_(bundle.config.context + 5)
    if engine.transcriber is not None:
        engine.transcriber.lm.offsets.fill_(engine.transcriber.cfg.context + 5)


def _time_ours(engine, n: int, steps: int, context: str, impl: str = "ours") -> dict:
    import numpy as np
    rng = np.random.default_rng(0)
    frames = {row: (rng.standard_normal(1920) * 0.1).astype(np.float32) for row in engine.active}
    for _ in range(3):
        engine.tick(frames)
    stages = {"encode": [], "lm": [], "decode": [], "tick": []}
    if engine.transcriber is not None:
        stages["transcriber"] = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.tick(frames)
        stages["tick"].append((time.perf_counter() - t0) * 1e3)
        for k in stages.keys() - {"tick"}:
            stages[k].append(engine.last_timings[k])
    return _row(impl, n, context, stages)


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
    from duplex_agent.kernels.dispatch import kernel_backend
    return {**bench_meta(device), "model": cfg_name, "kernels": kernel_backend()}


def bench_meta(device) -> dict:
    """Where a result was measured: the device by name, its driver, and the versions that matter."""
    import torch
    cuda = torch.device(device).type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else (
        f"{_cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
    return {"date": datetime.date.today().isoformat(), "device": torch.device(device).type,
            "device_name": name, "driver": _nvidia_driver() if cuda else None,
            "cuda": torch.version.cuda, "torch": torch.__version__, "triton": _version("triton"),
            "moshi": _version("moshi"), "python": platform.python_version()}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


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
    return (weights_read_per_step(cfg) + kv) / bandwidth * 1e3


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
             f"{'impl':8} {'sessions':>8} {'context':>7} {'tick p50':>9} {'tick p99':>9} "
             f"{'encode':>8} {'lm':>8} {'stt':>8} {'decode':>8} {'lm floor':>9} {'x floor':>8}"
             "   (ms)"]
    for r in results["rows"]:
        floor = (f"{r['lm_floor_ms']:>9.2f} {r['lm_over_floor']:>8.2f}" if "lm_floor_ms" in r
                 else f"{'-':>9} {'-':>8}")
        stt = f"{r['transcriber_p50_ms']:>8.2f}" if "transcriber_p50_ms" in r else f"{'-':>8}"
        lines.append(f"{r['impl']:8} {r['sessions']:>8} {r['context']:>7} {r['tick_p50_ms']:>9.2f} "
                     f"{r['tick_p99_ms']:>9.2f} {r['encode_p50_ms']:>8.2f} {r['lm_p50_ms']:>8.2f} "
                     f"{stt} {r['decode_p50_ms']:>8.2f} {floor}")
    if m.get("copy_bandwidth_gbps"):
        lines.append(f"lm floor: weights ({m['weights_read_per_step_gb']:.2f} GB) + each conversation's "
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
    for impl, style in (("ours", "-"), ("ours+stt", ":"), ("moshi", "--")):
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
