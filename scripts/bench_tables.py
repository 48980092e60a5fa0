"""Fill bench/results/README.md's tables from the result files beside it, never by hand.

Each table sits between `<!-- table: KIND [device=cpu|cuda] [model=NAME] -->` and
`<!-- /table -->`; everything between the two is rewritten from the newest matching result (by the
stamp in its file name). The engine tables are of the dialogue model (moshiko, or its tiny twin)
unless `model=` names another (`hibiki-zero`, `tiny-hibiki-zero`).
`--check` changes nothing and exits 1 when the README is not what the results say.

    python scripts/bench_tables.py [--results bench/results] [--readme RESULTS/README.md] [--check]
    python scripts/bench_tables.py --summarize-run DIR --out FILE   # scripts/device_bench.sh collect
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

MARKER = re.compile(r"(<!-- table: (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)
STAMP = re.compile(r"-(\d{8}(?:-\d{6})?)\.json$")
NONE_YET = "_No result yet: it needs a GPU run (see the run book above)._\n"


# ---- reading results ------------------------------------------------------------------------

def load(path: Path) -> dict:
    return json.loads(path.read_text())


def stamp(path: Path) -> str:
    m = STAMP.search(path.name)
    return m.group(1) if m else ""


def series(path: Path) -> str:
    """A file's name without its stamp: reruns of one measurement share it."""
    return STAMP.sub("", path.name).removesuffix(".json")


def newest(paths) -> Path | None:
    return max(paths, key=lambda p: (stamp(p), p.name), default=None)


def newest_per_series(paths) -> list[Path]:
    by = {}
    for p in paths:
        by.setdefault(series(p), []).append(p)
    return sorted((newest(ps) for ps in by.values()), key=lambda p: p.name)


DIALOGUE_MODELS = ("moshiko", "tiny")


def of_model(paths, model: str | None) -> list[Path]:
    """The engine runs of `model` (the first word of meta["model"]); None: the dialogue model."""
    wanted = (model,) if model else DIALOGUE_MODELS
    return [p for p in paths if load(p)["meta"].get("model", "").split(" ")[0] in wanted]


def results_on(folder: Path, prefix: str, device: str | None, rows: bool = True) -> list[Path]:
    """`prefix`*.json files shaped {"meta": {...}, "rows": [...]} (or, `rows` False, any other
    figures beside "meta") measured on `device`."""
    found = []
    for p in sorted(folder.glob(f"{prefix}*.json")):
        data = load(p)
        if isinstance(data, dict) and isinstance(data.get("meta"), dict) and (
                "rows" in data or not rows) and (device is None or data["meta"].get("device") == device):
            found.append(p)
    return found


# ---- formatting -----------------------------------------------------------------------------

def table(header: list[str], rows: list[list], align: str | None = None) -> str:
    align = align or "-" + ":" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if a == ":" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def ms(value) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def caption(path: Path, meta: dict) -> str:
    versions = ", ".join(f"{k} {meta[k]}" for k in ("driver", "cuda", "torch", "triton", "moshi", "python")
                         if meta.get(k))
    what = [f"**{meta.get('model', meta.get('benchmark', series(path)))}** on **{meta.get('device_name')}**",
            versions, meta.get("date")]
    if "kv_cache" in meta:
        what.append(f"KV cache {meta['kv_cache']}, kernels {meta.get('kernels')}, "
                    f"CUDA graphs {'on' if meta.get('cuda_graphs') else 'off'}")
    fallbacks = sorted(k for k, p in (meta.get("kernel_paths") or {}).items() if "why" in p)
    if fallbacks:
        what.append("fell back to torch at load: " + ", ".join(fallbacks))
    if meta.get("selfcheck_s") is not None:
        what.append(f"kernel self-check at load {meta['selfcheck_s']:.1f} s")
    if meta.get("copy_bandwidth_gbps"):
        what.append(f"measured copy bandwidth {meta['copy_bandwidth_gbps']:.0f} GB/s")
    text = f"`{path.name}`: " + "; ".join(str(w) for w in what if w) + "."
    if meta.get("skipped"):
        text += " Not measured (did not fit): " + ", ".join(
            f"{s['impl']} at {s['sessions']} ({s['context']})" for s in meta["skipped"]) + "."
    return text + "\n\n"


# ---- the tables -----------------------------------------------------------------------------

def engine_table(folder: Path, device: str = "cuda", model: str | None = None) -> str:
    """Ours against the moshi library, per (conversations, context), from the newest engine run
    of `model` on `device` that has both."""
    runs = [p for p in of_model(results_on(folder, "bench-", device), model)
            if any(r["impl"] == "moshi" for r in load(p)["rows"])]
    path = newest(runs)
    if path is None:
        return NONE_YET
    data = load(path)
    by = {(r["impl"], r["sessions"], r["context"]): r for r in data["rows"]}
    points = sorted({(n, c) for _, n, c in by}, key=lambda nc: (nc[0], nc[1] != "empty"))
    floors = any("lm_floor_ms" in r for r in data["rows"])
    header = ["conversations", "context", "ours tick p50", "ours LM p50", "moshi tick p50",
              "moshi `LMGen.step` p50"] + (["LM floor", "ours / floor", "moshi / floor"] if floors else [])
    rows = []
    for n, c in points:
        ours, ref = by.get(("ours", n, c), {}), by.get(("moshi", n, c), {})
        row = [n, c, ms(ours.get("tick_p50_ms")), ms(ours.get("lm_p50_ms")),
               ms(ref.get("tick_p50_ms")), ms(ref.get("lm_p50_ms"))]
        if floors:
            row += [ms(ours.get("lm_floor_ms") or ref.get("lm_floor_ms")), ours.get("lm_over_floor"),
                    ref.get("lm_over_floor")]
        rows.append(row)
    return caption(path, data["meta"]) + table(header, rows, "-" * 2 + ":" * (len(header) - 2))


def variant(meta: dict) -> str:
    return (f"kernels {meta.get('kernels')}, CUDA graphs {'on' if meta.get('cuda_graphs') else 'off'}, "
            f"KV {meta.get('kv_cache')}"
            + (f", transcriber run ({meta['transcriber']})" if meta.get("transcriber") else ""))


def variants_table(folder: Path, device: str = "cuda", model: str | None = None) -> str:
    """Our engine alone, newest run of `model` per configuration (kernels, CUDA graphs, KV dtype)."""
    newest_by_variant = {}
    for p in of_model(results_on(folder, "bench-", device), model):
        key = variant(load(p)["meta"])
        if key not in newest_by_variant or stamp(p) > stamp(newest_by_variant[key]):
            newest_by_variant[key] = p
    if not newest_by_variant:
        return NONE_YET
    rows = []
    for key, p in sorted(newest_by_variant.items()):
        for r in load(p)["rows"]:
            if r["impl"] in ("ours", "ours+stt"):  # a transcriber run times both
                label = key if "transcriber" not in key else key + (
                    ": with it" if r["impl"] == "ours+stt" else ": without it")
                rows.append([label, f"`{p.name}`", r["sessions"], r["context"], ms(r["tick_p50_ms"]),
                             ms(r["lm_p50_ms"]), ms(r.get("lm_floor_ms")), r.get("lm_over_floor")])
    header = ["configuration", "file", "conversations", "context", "tick p50", "LM p50", "LM floor",
              "LM / floor"]
    return table(header, rows, "--" + ":" * 6)


def attention_table(folder: Path, device: str = "cuda") -> str:
    paths = newest_per_series(results_on(folder, "attention-", device))
    if not paths:
        return NONE_YET
    out, rows = "", []
    for p in paths:
        data = load(p)
        out += caption(p, data["meta"])
        for r in data["rows"]:
            rows.append([r["dtype"], r["kv_dtype"], r["batch"], r["context"], r["num_splits"],
                         f"{r['triton_us']:.1f}", f"{r['triton_gbps']:.0f}",
                         f"{r['triton_frac_of_copy']:.1%}",
                         f"{r['sdpa_prefix_us']:.1f}", f"{r['sdpa_masked_us']:.1f}",
                         r["speedup_vs_sdpa_prefix"], r["speedup_vs_sdpa_masked"]])
    header = ["q dtype", "KV dtype", "B", "context", "splits", "ours µs", "ours GB/s", "of copy",
              "SDPA prefix µs", "SDPA masked µs", "x prefix", "x masked"]
    return out + table(header, rows, "--" + ":" * 10)


def sampling_table(folder: Path, device: str = "cuda") -> str:
    path = newest(results_on(folder, "sampling-", device))
    if path is None:
        return NONE_YET
    data = load(path)
    rows = [[r["batch"], r["vocab"], f"{r['torch_ref_us']:.1f}", f"{r['triton_us']:.1f}", r["speedup"],
             f"{r['whole_draw_us']:.1f}"] for r in data["rows"]]
    return caption(path, data["meta"]) + table(
        ["B", "vocab", "torch reference µs", "Triton µs", "x", "whole draw µs"], rows)


def tuning_table(folder: Path, device: str = "cuda") -> str:
    """The decode-attention tuning run: the fastest correct launch configuration per (KV dtype,
    batch) against the heuristics' choice."""
    path = newest(results_on(folder, "tune-attention-", device))
    if path is None:
        return NONE_YET
    data = load(path)
    rows = []
    for e in data["meta"].get("best", []):
        kind = "tl.dot" if e.get("matrix") else "rows"
        base = e.get("heuristic_us")
        rows.append([e["kv_dtype"], e["batch"], kind, e["block_n"], e["num_splits"], e["num_warps"],
                     e["num_stages"], f"{e['us']:.1f}", f"{e['gbps']:.0f}",
                     "-" if base is None else f"{base:.1f}", "-" if base is None else round(base / e["us"], 2)])
    header = ["KV dtype", "B", "variant", "keys/tile", "splits", "warps", "stages", "best µs",
              "GB/s", "heuristic µs", "x heuristic"]
    return caption(path, data["meta"]) + table(header, rows, "--" + "-" + ":" * 8)


KNOWN_PREFIXES = ("bench-", "attention-", "sampling-", "device-run-", "launches-", "loadtest-",
                  "tune-attention-", "capacity-")


def capacity_table(folder: Path) -> str:
    """Conversations per device size of each model (`run_agent.py bench --capacity`: computed by
    the engine's capacity functions, no device)."""
    path = newest(folder.glob("capacity-*.json"))
    if path is None:
        return NONE_YET
    data = load(path)
    sizes = data["meta"]["device_gib"]
    rows = [[r["model"], r["kv_heads"], r["kv_cache"], r["weight_gb"], r["per_conversation_gib"]]
            + [r[f"fit_{g}gib"] for g in sizes] for r in data["rows"]]
    header = ["model", "KV heads", "KV cache", "weights GB", "GiB / conversation"] + [
        f"{g} GiB" for g in sizes]
    return (f"`{path.name}` ({data['meta']['date']}; {data['meta']['source']}).\n\n"
            + table(header, rows, "---" + ":" * (len(header) - 3)))


def flatten(value, key: str = "") -> list[list]:
    """[name, value] pairs of a nested dict's scalars, names joined with dots."""
    if isinstance(value, dict):
        return [pair for k, v in value.items() for pair in flatten(v, f"{key}.{k}" if key else str(k))]
    return [] if isinstance(value, list) else [[f"`{key}`", value]]


def other_table(folder: Path, device: str = "cuda") -> str:
    """Any other result with a "meta" (persona prefill, int8 GEMM, ...), newest per series: its
    rows as they are, or its other figures as name/value pairs."""
    paths = newest_per_series(p for p in results_on(folder, "", device, rows=False)
                              if not p.name.startswith(KNOWN_PREFIXES))
    if not paths:
        return NONE_YET
    out = ""
    for p in paths:
        data = load(p)
        rows = [r for r in data.get("rows") or [] if isinstance(r, dict)]
        if rows:
            header = [k for k in rows[0] if not isinstance(rows[0][k], (dict, list))]
            body = table(header, [[r.get(k) for k in header] for r in rows])
        else:
            body = table(["figure", "value"], flatten({k: v for k, v in data.items() if k != "meta"}))
        out += caption(p, data["meta"]) + body + "\n"
    return out.rstrip("\n") + "\n"


def device_run_table(folder: Path, device: str | None = None) -> str:
    path = newest(folder.glob("device-run-*.json"))
    if path is None:
        return NONE_YET
    run = load(path)
    meta, tests = run.get("meta", {}), run.get("tests")
    text = caption(path, {**meta, "benchmark": "scripts/device_bench.sh"})
    if tests:
        text += (f"GPU tests: {tests['tests']} run, {tests['failures']} failed, {tests['errors']} errors, "
                 f"{tests['skipped']} skipped.\n\n")
    rows = [[s["step"], s["status"], s["seconds"], s["budget_s"]] for s in run["steps"]]
    return text + table(["step", "status", "seconds", "budget (s)"], rows, "--::")


def launches_table(folder: Path, device: str | None = None) -> str:
    path = folder / "launches-per-step.json"
    if not path.exists():
        return NONE_YET
    data = load(path)
    names = {"torch": "torch references (`AGENT_KERNELS=torch`)",
             "triton": "Triton kernels (default on CUDA)"}
    rows = [[names.get(k, k), v["total"], ", ".join(f"{op.removeprefix('triton:')} {n}"
                                                    for op, n in list(v["by_op"].items())[:8]) + ", ..."]
            for k, v in data.items()]
    return table(["path", "launches per step", "largest counts"], rows, "-:-")


def loadtest_table(folder: Path, device: str = "cpu") -> str:
    paths = sorted(folder.glob(f"loadtest-{device}-*-clients-*.json"), key=lambda p: load(p)["clients"])
    if not paths:
        return NONE_YET
    rows = []
    for p in paths:
        d = load(p)
        lat, server = d["latency_ms"], d.get("server", {})
        dropped = int(server.get("dropped_input_frames", 0) + server.get("dropped_output_frames", 0))
        rows.append([d["clients"], f"{d['sent_frames']} / {d['received_frames']}", ms(lat["p50"]),
                     ms(lat["p90"]), ms(lat["p99"]), dropped])
    return table(["clients", "frames sent / received", "p50", "p90", "p99", "dropped"], rows)


TABLES = {"engine": engine_table, "variants": variants_table, "attention": attention_table,
          "tuning": tuning_table,
          "sampling": sampling_table, "other": other_table, "device-run": device_run_table,
          "launches": launches_table, "loadtest": loadtest_table, "capacity": capacity_table}


def render(readme: str, folder: Path) -> str:
    def fill(m: re.Match) -> str:
        kind, *options = m.group("spec").split()
        if kind not in TABLES:
            raise SystemExit(f"unknown table {kind!r} in a marker; known: {', '.join(TABLES)}")
        kwargs = dict(o.split("=", 1) for o in options)
        return m.group(1) + TABLES[kind](folder, **kwargs) + m.group(4)
    return MARKER.sub(fill, readme)


# ---- a device run's summary -----------------------------------------------------------------

def summarize_run(run: Path) -> dict:
    """scripts/device_bench.sh's results folder: each step's status, the environment, the tests."""
    steps = sorted((load(p) for p in run.glob("*/status.json")), key=lambda s: s.get("index", 0))
    env = run / "setup" / "env.json"
    summary = {"meta": load(env) if env.exists() else {}, "stamp": (run / "stamp").read_text().strip(),
               "steps": steps}
    junit = run / "tests" / "junit.xml"
    if junit.exists():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        summary["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="bench/results", type=Path)
    parser.add_argument("--readme", type=Path, help="default RESULTS/README.md")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if out of date")
    parser.add_argument("--summarize-run", type=Path, metavar="DIR")
    parser.add_argument("--out", type=Path, help="with --summarize-run: the summary JSON")
    args = parser.parse_args(argv)
    if args.summarize_run:
        summary = json.dumps(summarize_run(args.summarize_run), indent=1) + "\n"
        args.out.write_text(summary) if args.out else sys.stdout.write(summary)
        return 0
    readme = args.readme or args.results / "README.md"
    old = readme.read_text()
    new = render(old, args.results)
    if args.check:
        if new != old:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                                       str(readme), "from the results"))
            return 1
        return 0
    if new != old:
        readme.write_text(new)
    print(f"{readme}: {len(MARKER.findall(new))} tables from {args.results}"
          + ("" if new != old else " (unchanged)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
