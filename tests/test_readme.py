"""The README's embedding example runs as written (with the tiny model)."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile

ROOT = Path(__file__).resolve().parents[1]


def test_embedding_example_runs(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Embedding the agent in a voice product", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    rng = np.random.default_rng(0)
    soundfile.write(tmp_path / "hello.wav", (rng.standard_normal(16_000 * 2) * 0.1), 16_000)
    (tmp_path / "example.py").write_text(code)
    r = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env={"PYTHONPATH": str(ROOT), "NO_TORCH_COMPILE": "1",
                                                    "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    reply, rate = soundfile.read(tmp_path / "reply.wav")
    assert rate == 24_000 and len(reply) == 2 * 24_000
    assert "'dropped_input_frames': 0" in r.stdout


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = "bash scripts/setup.sh test && .venv/bin/python -m pytest -q"
    assert command in readme and command in ci
