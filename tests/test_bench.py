"""`run_agent.py bench` runs on CPU with the tiny config and both implementations."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_cpu_tiny(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "run_agent.py"), "bench", "--device", "cpu",
                        "--sessions", "1,2", "--steps", "2", "--contexts", "both", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env=dict(os.environ, NO_TORCH_COMPILE="1"))
    assert r.returncode == 0, r.stderr
    [result] = tmp_path.glob("bench-*.json")
    data = json.loads(result.read_text())
    assert data["meta"]["model"] == "tiny" and data["meta"]["device"] == "cpu"
    points = {(row["impl"], row["sessions"], row["context"]) for row in data["rows"]}
    assert points == {(impl, n, ctx) for impl in ("ours", "moshi") for n in (1, 2)
                      for ctx in ("empty", "full")}
    for row in data["rows"]:
        assert 0 < row["tick_p50_ms"] <= row["tick_p99_ms"]
        assert row["encode_p50_ms"] > 0 and row["lm_p50_ms"] > 0 and row["decode_p50_ms"] > 0
    assert result.with_suffix(".png").stat().st_size > 10_000
    assert "ours" in r.stdout and "moshi" in r.stdout


def test_contexts_take_what_the_help_offers():
    import pytest

    from duplex_agent.cli import build_parser
    parser = build_parser()
    help_text = parser._subparsers._group_actions[0].choices["bench"].format_help()
    assert "both" in help_text
    with pytest.raises(SystemExit, match="--contexts takes empty, full, both"):
        args = parser.parse_args(["bench", "--device", "cpu", "--contexts", "middle"])
        args.func(args)


def test_lm_floor_is_the_reference_figures():
    """../shared/reference/performance.md: at a 3.0 TB/s measured copy rate, an H100's floor is
    5.44 ms per frame for one conversation at full context and 21.7 ms for 32."""
    import torch

    from duplex_agent.agent.bench import lm_floor_ms
    from duplex_agent.agent.config import LMConfig
    cfg, bw = LMConfig.moshiko(), 3.0e12
    bf16, fp8 = torch.bfloat16, torch.float8_e4m3fn
    assert round(lm_floor_ms(cfg, 1, True, bf16, bw), 2) == 5.44
    assert round(lm_floor_ms(cfg, 32, True, bf16, bw), 1) == 21.7
    assert lm_floor_ms(cfg, 32, False, bf16, bw) == lm_floor_ms(cfg, 1, False, bf16, bw)  # weights only
    # A float8 KV cache halves the KV part.
    kv_bf16 = lm_floor_ms(cfg, 32, True, bf16, bw) - lm_floor_ms(cfg, 32, False, bf16, bw)
    kv_fp8 = lm_floor_ms(cfg, 32, True, fp8, bw) - lm_floor_ms(cfg, 32, False, fp8, bw)
    assert abs(kv_fp8 - kv_bf16 / 2) < 1e-9
