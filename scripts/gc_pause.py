"""How long a full garbage collection pauses a serving process, before and after `settle_heap`.

A full collection walks every tracked object while holding the GIL, so the engine thread and
every conversation wait for it. Loads what `serve` loads, then times `gc.collect()`:

    python scripts/gc_pause.py [--checkpoint tiny-random] [--device cpu] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def collect_ms(times: int) -> list[float]:
    out = []
    for _ in range(times):
        t0 = time.perf_counter()
        gc.collect()
        out.append(round((time.perf_counter() - t0) * 1e3, 2))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="tiny-random")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    from duplex_agent.agent.api import Agent
    from duplex_agent.agent.bench import bench_meta
    from duplex_agent.streams.server import create_app, settle_heap
    agent = Agent.load(args.checkpoint, args.device, max_conversations=4)
    try:
        create_app(agent)  # the transports' modules (aiohttp, aiortc, Realtime) as serve has them
        tracked = len(gc.get_objects())
        before = collect_ms(args.repeat)
        frozen = settle_heap()
        after = collect_ms(args.repeat)
    finally:
        agent.close()
    def row(heap, objects, ms):
        return {"heap": heap, "tracked_objects": objects,
                "full_collection_ms_median": sorted(ms)[len(ms) // 2], "full_collection_ms_max": max(ms)}
    result = {"meta": {**bench_meta(args.device), "benchmark": f"gc pause, {args.checkpoint} loaded"},
              "rows": [row("as loaded", tracked, before),
                       row("after settle_heap()", tracked - frozen, after)],
              "samples_ms": {"as_loaded": before, "after_settle_heap": after}}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
