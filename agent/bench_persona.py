"""Persona prompts: connect -> first agent frame, and what a joining persona costs the others.

    python -m duplex_agent.agent.bench_persona [--device cpu|cuda] [--out DIR] [--tiny]

A persona conversation joins an engine where `--others` conversations are live. Measured, each as
the median of `--repeats`:

* one-pass prefill, prompt cache miss: from building the prompt (voice, tokens) to the first
  agent frame, i.e. the tick that prefills the prompt and answers the first input frame;
* the same on a cache hit (the prompt's KV copied into the slot);
* the reference's way, the prompt stepped one frame per tick by our engine (each tick a full
  batched tick), then the first live tick: its compute time back to back, and paced as live ticks
  are (one per 80 ms frame);
* the others' tick time without a join, and with a join (miss, hit): the delay a join adds.

`--tiny` (the default on CPU): tiny-random-personaplex with its NATF0 voice. On CUDA without
`--tiny`: the real moshiko/PersonaPlex shape with random bf16 weights, a random 50-row preset
voice and a 40-token text prompt. Without `--out` nothing is written (a dry run).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from duplex_agent.agent.config import FRAME_RATE, FRAME_SIZE, SamplingConfig
from duplex_agent.agent.engine import Engine
from duplex_agent.agent.persona import PromptCache, build_prompt, persona_prompt

TINY_TEXT = "Be kind."
REAL_VOICE_ROWS = 50  # a PersonaPlex preset holds about 4 s of voice
REAL_TEXT_TOKENS = 40  # "<system> You are a wise and friendly teacher. ... <system>"


def _tiny(device):
    from duplex_agent.checkpoints.loader import load_checkpoint
    bundle = load_checkpoint("tiny-random-personaplex", device)
    return bundle, lambda: persona_prompt(bundle, "NATF0.pt", TINY_TEXT), "tiny-random-personaplex"


def _real(device):
    """moshiko's shape (PersonaPlex's temporal transformer and served depformer), random bf16
    weights made on the meta device; a random preset voice and random text tokens."""
    from moshi.models import loaders

    from duplex_agent.agent.bench import random_moshiko_lm
    from duplex_agent.checkpoints.bundle import AgentBundle
    from duplex_agent.checkpoints.loader import load_checkpoint
    from duplex_agent.checkpoints.personaplex import SILENCE_CODES, SINE_CODES, VoicePrompt
    model = random_moshiko_lm(device)
    cfg = model.cfg
    tokenizer = load_checkpoint("tiny-random", "cpu").tokenizer  # only for printing pieces
    mimi = loaders.get_mimi(None, device=device)
    bundle = AgentBundle("personaplex-shape-random", cfg, model, mimi, tokenizer, SamplingConfig())
    g = torch.Generator().manual_seed(0)
    voice = VoicePrompt("random.pt", embeddings=torch.randn(REAL_VOICE_ROWS, cfg.dim, generator=g),
                        ring=torch.randint(0, cfg.card, (cfg.num_codebooks, cfg.max_delay + 3),
                                           generator=g))
    text = torch.randint(4, cfg.text_card, (REAL_TEXT_TOKENS,), generator=g).tolist()

    def prompt():
        return build_prompt(cfg, bundle.name, voice, "random", text, SILENCE_CODES, SINE_CODES)
    return bundle, prompt, "personaplex shape (moshiko), random init, bf16"


def _sync(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def run(device, tiny: bool, others: int, repeats: int) -> dict:
    from duplex_agent.agent.bench import bench_meta
    bundle, make_prompt, model_name = (_tiny if tiny else _real)(device)
    engine = Engine(bundle, others + 1)
    rng = np.random.default_rng(0)
    frame = lambda: (0.1 * rng.standard_normal(FRAME_SIZE)).astype(np.float32)  # noqa: E731
    rows = [engine.open(SamplingConfig(seed=i)) for i in range(others)]

    def tick(extra: dict | None = None) -> tuple[float, dict]:
        frames = {row: frame() for row in rows} | (extra or {})
        t0 = _sync(device)
        out = engine.tick(frames)
        return (_sync(device) - t0) * 1e3, out

    for _ in range(5):  # warm-up: kernels, the CUDA graph, allocator
        tick()
    baseline = [tick()[0] for _ in range(max(10, repeats))]

    def join(prompt_from_cache: bool) -> tuple[float, float]:
        """(connect -> first frame ms, that tick's ms) for one persona conversation."""
        if not prompt_from_cache:  # an empty cache: this join prefills
            engine.prompt_cache = PromptCache(engine.prompt_cache.budget_bytes)
        t0 = _sync(device)
        row = engine.open(SamplingConfig(seed=99), make_prompt())
        tick_ms, out = tick({row: frame()})
        first = (_sync(device) - t0) * 1e3
        assert out[row].step == 0
        engine.close(row)
        return first, tick_ms

    prompt = make_prompt()
    join(False)  # warm-up of the prefill path (shapes, kernels)
    miss, hit = [], []
    for _ in range(repeats):  # interleaved, so that drift on a shared machine hits both alike
        miss.append(join(False))
        hit.append(join(True))

    stepped, stepped_ticks = [], []
    for _ in range(repeats):  # the prompt one frame per tick, then the first live frame
        row = engine.open(SamplingConfig(seed=99))
        times = [tick({row: frame()})[0] for _ in range(prompt.length + 1)]
        stepped.append(sum(times))
        stepped_ticks.append(statistics.median(times))
        engine.close(row)

    med = lambda xs: round(statistics.median(xs), 3)  # noqa: E731
    base = med(baseline)
    frame_ms = 1e3 / FRAME_RATE
    results = {
        "meta": {**bench_meta(device), "model": model_name, "engine": engine.describe(),
                 "conversations_live": others, "repeats": repeats,
                 "prompt_positions": prompt.length,
                 "prompt_kv_bytes": engine.prompt_cache.stats()["bytes"],
                 "date_time": datetime.datetime.now().isoformat(timespec="seconds"),
                 # A shared machine's load (processes wanting a core) skews every figure.
                 "load_average_1m": round(os.getloadavg()[0], 2)},
        "connect_to_first_frame_ms": {
            "prefill_miss": med([m[0] for m in miss]),
            "prefill_hit": med([h[0] for h in hit]),
            "frame_by_frame_compute": med(stepped),
            "frame_by_frame_paced": round(prompt.length * frame_ms
                                          + statistics.median(stepped_ticks), 1),
        },
        "others_tick_ms": {
            "no_join": base,
            "join_miss": med([m[1] for m in miss]),
            "join_hit": med([h[1] for h in hit]),
            "added_by_join_miss": round(med([m[1] for m in miss]) - base, 3),
            "added_by_join_hit": round(med([h[1] for h in hit]) - base, 3),
            "frame_by_frame_tick": med(stepped_ticks),
        },
        "prompt_cache": engine.prompt_cache.stats(),
    }
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m duplex_agent.agent.bench_persona",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--tiny", action="store_true",
                   help="tiny-random-personaplex (the default on CPU)")
    p.add_argument("--others", type=int, default=None,
                   help="live conversations the persona joins (default: 3 tiny, 15 real)")
    p.add_argument("--repeats", type=int, default=None, help="default: 3 tiny, 10 real")
    p.add_argument("--out", default=None, help="folder for the JSON (bench/results); none: dry run")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tiny = args.tiny or device.type != "cuda"
    results = run(device, tiny, args.others or (3 if tiny else 15),
                  args.repeats or (3 if tiny else 10))
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = out / f"persona-{device.type}-{'tiny' if tiny else 'personaplex-shape'}-{stamp}.json"
        path.write_text(text + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
