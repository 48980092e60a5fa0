"""scripts/device_bench.sh, the GPU run book's one device call, proven on CPU so that the call
cannot fail on a script bug: its plan fits the 9-minute call, and a dry run of every step (tiny
shapes, Triton's interpreter, GPU-only tests skipping) brings back the file layout that
`collect` and scripts/bench_tables.py turn into bench/results/README.md's tables."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "device_bench.sh"
RESULTS = ROOT / "bench" / "results"
STEPS = ["setup", "tests", "tune", "engine", "fp8", "attention", "transcriber", "hibiki", "ablations",
         "int8", "persona"]
# Steps that run only once what they measure exists: a file, or a flag of `run_agent.py bench`.
OPTIONAL = {"persona": ROOT / "agent" / "bench_persona.py", "int8": ROOT / "kernels" / "bench_int8_gemm.py",
            "transcriber": "--transcriber", "hibiki": "--model"}


def optional_exists(what) -> bool:
    if isinstance(what, Path):
        return what.exists()
    from duplex_agent.cli import build_parser
    bench = build_parser()._subparsers._group_actions[0].choices["bench"]
    return any(what in action.option_strings for action in bench._actions)
# What a device run brings back: at most 8 files, no more than 2 folders down, plain names.
MAX_FILES, NAME = 8, re.compile(r"^[A-Za-z0-9._-]+$")


def script(*args: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env={**os.environ, "PYTHON": sys.executable, **env})


def test_plan_fits_one_call_in_priority_order():
    r = script("plan", timeout=30)
    assert r.returncode == 0, r.stderr
    *lines, total = r.stdout.splitlines()
    budgets = {line.split()[0]: int(line.split()[1]) for line in lines}
    assert list(budgets) == STEPS
    assert total == f"total {sum(budgets.values())} s" and sum(budgets.values()) <= 540
    # The run book shows the plan as it is.
    assert r.stdout in (RESULTS / "README.md").read_text()
    # A later call for what an earlier one missed: chosen steps, own budgets; a typo is refused.
    r = script("plan", timeout=30, DEVICE_BENCH_STEPS="fp8:90,engine")
    assert [line.split()[:2] for line in r.stdout.splitlines()] == [
        ["fp8", "90"], ["engine", str(budgets["engine"])], ["total", str(90 + budgets["engine"])]]
    r = script("plan", timeout=30, DEVICE_BENCH_STEPS="engin")
    assert r.returncode == 2 and "unknown step engin" in r.stderr


def test_session_counts_resolve_max_to_what_fits():
    from duplex_agent.agent.bench import session_counts
    assert session_counts(["1", "8", "32", "max"], fit=79) == [1, 8, 32, 79]
    assert session_counts(["32", "80", "max"], fit=160, max_cap=128) == [32, 80, 128]
    assert session_counts(["1", "8", "32", "max"], fit=20) == [1, 8, 20]  # 32 does not fit
    assert session_counts(["1", "max"], fit=0) == []


def test_a_point_that_no_longer_fits_is_skipped_and_the_run_goes_on(monkeypatch):
    """`max` is measured once; if memory shrinks before its engine is made, that point is listed
    as skipped (the engine refuses it) instead of allocating beyond memory or ending the run."""
    import torch

    from duplex_agent.agent import bench, engine
    from duplex_agent.agent.config import LMConfig
    per = engine.bytes_per_conversation(LMConfig.tiny(), torch.float32)
    free = iter([engine.RESERVED_BYTES + 3 * per])  # when `max` is resolved; then only 1 fits
    monkeypatch.setattr(engine, "free_device_memory", lambda device: next(free, engine.RESERVED_BYTES + per))
    saved = []
    results = bench.bench(torch.device("cpu"), ["1", "max"], 1, reference=False, contexts=["full"],
                          on_point=lambda r: saved.append(len(r["rows"])))
    meta = results["meta"]
    assert meta["conversations_that_fit"] == 3 and saved == [1]
    assert [(r["sessions"], r["context"]) for r in results["rows"]] == [(1, "full")]
    assert [(s["impl"], s["sessions"]) for s in meta["skipped"]] == [("ours", 3)]
    assert "do not fit" in meta["skipped"][0]["reason"]


def test_readme_tables_are_what_the_results_say():
    r = subprocess.run([sys.executable, "scripts/bench_tables.py", "--check"], capture_output=True,
                       text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# The dry run's time limits are hang guards, not speed thresholds: a shared CPU may run a step
# several times slower than its GPU budget, so each step gets 10x its budget (the script's
# DEVICE_BENCH_BUDGET_SCALE; it defaults to 3 for a dry run) and the whole run far more than it needs.
DRY_BUDGET_SCALE = "10"
DRY_RUN_TIMEOUT_S = 3000


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    r = script(timeout=DRY_RUN_TIMEOUT_S, DEVICE_BENCH_DRY="1", OUT=str(out),
               DEVICE_BENCH_BUDGET_SCALE=DRY_BUDGET_SCALE)
    return out, r


def brought_back(out: Path) -> list[Path]:
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= MAX_FILES
    for p in files:
        rel = p.relative_to(out)
        assert len(rel.parts) <= 3 and all(NAME.match(part) for part in rel.parts), rel
    return files


def test_dry_run_brings_back_every_step(dry_run):
    out, r = dry_run
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert {p.name for p in brought_back(out)} == {"results.tgz", "log.txt"}
    with tarfile.open(out / "results.tgz") as tar:
        names = tar.getnames()
        statuses = {json.load(tar.extractfile(f"results/{s}/status.json"))["step"]:
                    json.load(tar.extractfile(f"results/{s}/status.json")) for s in STEPS}
        engine = [n for n in names if re.fullmatch(r"results/engine/bench-cpu-tiny-\d{8}-\d{6}\.json", n)]
        assert len(engine) == 1
        data = json.load(tar.extractfile(engine[0]))
        junit = ET.parse(tar.extractfile("results/tests/junit.xml")).getroot()
    for step, status in statuses.items():
        expected = "skipped" if step in OPTIONAL and not optional_exists(OPTIONAL[step]) else "ok"
        assert status["status"] == expected, (step, status)
        assert status["seconds"] <= status["budget_s"]
    for kind in ("engine/bench-cpu-tiny-", "fp8/bench-cpu-tiny-fp8-",
                 "ablations/bench-cpu-tiny-torch-kernels-",
                 "ablations/bench-cpu-tiny-no-graphs-", "transcriber/bench-cpu-tiny-stt-",
                 "attention/attention-cpu-tiny-bf16-",
                 "attention/sampling-cpu-tiny-", "fp8/attention-cpu-tiny-fp8-", "tests/junit.xml",
                 "setup/env.json", "tune/tune-attention-cpu-tiny-", "tune/decode_attention-"):
        assert any(n.startswith(f"results/{kind}") for n in names), kind
    meta = data["meta"]
    assert meta["device"] == "cpu" and meta["device_name"] and meta["model"] == "tiny"
    assert meta["torch"] and meta["triton"] and meta["moshi"] and "driver" in meta
    # What ran: each kernel's path, and how long the load-time self-check took.
    assert set(meta["kernel_paths"]) >= {"decode_attention", "rms_norm", "sampling"}
    assert meta["selfcheck_s"] is not None
    # "max" is the most conversations that fit, capped at 2 for the dry run; full context only.
    assert meta["conversations_that_fit"] >= 2 and meta["skipped"] == []
    assert sorted((row["impl"], row["sessions"], row["context"]) for row in data["rows"]) == [
        (impl, n, "full") for impl in ("moshi", "ours") for n in (1, 2)]
    # The GPU tests' files were all collected; the GPU-only tests among them skipped.
    suite = junit if junit.tag == "testsuite" else junit.find("testsuite")
    assert int(suite.get("failures")) == int(suite.get("errors")) == 0
    assert int(suite.get("skipped")) == int(suite.get("tests")) > 0


def test_collect_fills_the_readme_tables(dry_run, tmp_path):
    out, r = dry_run
    assert r.returncode == 0
    results = tmp_path / "results"
    results.mkdir()
    # The README's GPU tables, pointed at the dry run's CPU files.
    readme = (RESULTS / "README.md").read_text().replace("device=cuda", "device=cpu")
    (results / "README.md").write_text(readme)
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    c = script("collect", str(out), str(results), timeout=120, TUNED_DIR=str(tuned))
    assert c.returncode == 0, c.stdout + c.stderr
    [summary] = results.glob("device-run-*.json")
    run = json.loads(summary.read_text())
    assert [s["step"] for s in run["steps"]] == STEPS
    assert run["meta"]["device"] == "cpu" and run["tests"]["failures"] == 0
    assert run["tests"]["skipped"] == run["tests"]["tests"] > 0
    assert summary.with_suffix(".log").read_text() == (out / "log.txt").read_text()
    filled = (results / "README.md").read_text()
    sections = dict(re.findall(r"<!-- table: ([^>\n]*?) -->\n(.*?)<!-- /table -->", filled, re.S))
    # The tuned launch configurations went where the kernel reads them (here: TUNED_DIR).
    assert len(list(tuned.glob("decode_attention-*.json"))) == 1
    assert not list(results.glob("decode_attention-*.json"))
    for spec in ("device-run", "engine device=cpu", "variants device=cpu", "attention device=cpu",
                 "sampling device=cpu", "tuning device=cpu"):
        assert "No result yet" not in sections[spec], spec
    assert "| engine | ok |" in sections["device-run"]
    variants = sections["variants device=cpu"]
    assert "float8_e4m3fn" in variants and "kernels torch" in variants and "CUDA graphs off" in variants
    assert "| 2 | full |" in sections["engine device=cpu"]
    # Collected once, the tables are up to date; nothing else in the README changed.
    check = subprocess.run([sys.executable, "scripts/bench_tables.py", "--results", str(results), "--check"],
                           capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert check.returncode == 0, check.stdout
    strip = re.compile(r"(<!-- table: [^>\n]*? -->\n).*?(<!-- /table -->)", re.S)
    assert strip.sub(r"\1\2", filled) == strip.sub(r"\1\2", readme)


def test_a_step_past_its_budget_is_cut_and_the_run_goes_on(tmp_path):
    # The engine step gets 1 s before SIGTERM (budget 6 s): cut, recorded, packed; setup after it runs.
    r = script(timeout=120, DEVICE_BENCH_DRY="1", OUT=str(tmp_path), DEVICE_BENCH_STEPS="engine:6,setup",
               DEVICE_BENCH_BUDGET_SCALE="1")
    assert r.returncode == 1  # a step not ok
    with tarfile.open(tmp_path / "results.tgz") as tar:
        engine = json.load(tar.extractfile("results/engine/status.json"))
        setup = json.load(tar.extractfile("results/setup/status.json"))
    assert engine["status"] == "timeout" and engine["seconds"] <= 6
    assert setup["status"] == "ok" and setup["index"] == 2
    assert "step engine: timeout" in (tmp_path / "log.txt").read_text()
