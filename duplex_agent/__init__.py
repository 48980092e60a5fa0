"""duplex-agent's one import name: `duplex_agent.agent`, `.streams`, `.kernels`, `.checkpoints`.

Installed, those four are subpackages here (pyproject's package-dir mapping), so nothing generic
such as `kernels` lands at the top of site-packages. In a checkout they stay as folders at the
repository root; this path entry makes them importable under the same names without installing.
"""
from pathlib import Path

_root = Path(__file__).resolve().parent.parent
if not (Path(__file__).resolve().parent / "agent").is_dir() and (_root / "agent" / "engine.py").is_file():
    __path__.append(str(_root))  # noqa: F821 (a package's own __path__)
