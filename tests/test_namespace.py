"""The installed package has one import name, `duplex_agent`: nothing of ours lands at the top of
site-packages as `kernels`, `agent`, `streams` or `checkpoints`, where `kernels` would shadow
Hugging Face's package (bitsandbytes and transformers then fail with "cannot import name
'get_kernel' from 'kernels'").

Run in a fresh interpreter whose working directory is a temporary folder, so the repository root
is not on sys.path and only what is installed is importable.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import importlib.util, json, warnings
from importlib import metadata
warnings.simplefilter("always")
dist = metadata.distribution("duplex-agent")  # what `pip install` recorded for this project
import duplex_agent.agent.api
import duplex_agent.kernels.dispatch
import transformers
import bitsandbytes
import kernels
from kernels import get_kernel
print(json.dumps({
    "ours": {name: importlib.util.find_spec(name) is not None
             for name in ("agent", "streams", "checkpoints")},
    "kernels_file": kernels.__file__,
    "get_kernel_module": get_kernel.__module__,
    "dispatch": duplex_agent.kernels.dispatch.__name__,
    "top_level": (dist.read_text("top_level.txt") or "").split(),
    "files": [str(f) for f in dist.files or []],
}))
"""


def test_installed_names_do_not_shadow_hf_kernels(tmp_path):
    pytest.importorskip("kernels")
    pytest.importorskip("bitsandbytes")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"  # bitsandbytes asks the Hub for optional CPU kernels at import
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=240)
    output = r.stdout + r.stderr
    assert "cannot import name 'get_kernel'" not in output, output
    assert r.returncode == 0, output
    found = json.loads(r.stdout.strip().splitlines()[-1])
    assert found["ours"] == {"agent": False, "streams": False, "checkpoints": False}
    kernels_file = Path(found["kernels_file"]).resolve()
    assert kernels_file.parent != ROOT / "kernels" and "site-packages" in kernels_file.parts
    assert found["get_kernel_module"].startswith("kernels.")  # Hugging Face's, not a stub
    assert found["dispatch"] == "duplex_agent.kernels.dispatch"
    # The installed distribution declares one top-level name and installs no file under the
    # generic ones.
    assert found["top_level"] == ["duplex_agent"]
    for name in ("kernels", "agent", "streams", "checkpoints"):
        assert not any(f.split("/")[0] == name for f in found["files"]), name
