"""The package's layering, read from its source with `ast` (nothing is imported):

- the model layers (`agent/`, `checkpoints/`, `kernels/`) never import the serving layer
  (`streams/`); the command line sits above both;
- no import circle between modules: every import counts, at module level, inside functions and
  under `TYPE_CHECKING` alike, because each one is a dependency a reader has to hold in mind.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "duplex_agent"
# The card's folders install as duplex_agent.<folder>; the package's own top-level modules sit
# in duplex_agent/.
SUBPACKAGES = ("agent", "streams", "kernels", "checkpoints")
MODEL_LAYERS = ("agent", "checkpoints", "kernels")


def source_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package by dotted name (`duplex_agent.streams.realtime.session`); a
    package's `__init__.py` under the package's own name."""
    modules = {}
    folders = [(root / PACKAGE, PACKAGE)] + [(root / sub, f"{PACKAGE}.{sub}") for sub in SUBPACKAGES]
    for folder, prefix in folders:
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((prefix, *parts))] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports anywhere in its source: `from X import y` counts
    as X.y where that is a module (a submodule import), else as X."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a name inside a.b.c
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = source_modules(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    streams = f"{PACKAGE}.streams"
    bad = []
    for name, targets in sorted(graph.items()):
        layer = name.split(".")[1] if name.count(".") else ""
        if layer not in MODEL_LAYERS:
            continue
        bad += [f"{name} imports {t}" for t in sorted(targets) if t == streams or t.startswith(streams + ".")]
    return bad


def test_the_graph_is_read_from_the_whole_package():
    graph = import_graph()
    assert f"{PACKAGE}.agent.engine" in graph and f"{PACKAGE}.streams.server" in graph
    # Known edges, so an analyser that reads nothing cannot pass the checks below.
    assert f"{PACKAGE}.agent.model" in graph[f"{PACKAGE}.agent.lm_gen"]
    assert f"{PACKAGE}.streams.security" in graph[f"{PACKAGE}.streams.moshi_ws"]


def test_no_model_layer_imports_the_serving_layer():
    assert upward_imports(import_graph()) == []


def test_no_import_circle_between_modules():
    assert circles(import_graph()) == []


def test_streams_is_grouped_by_protocol_family():
    streams = ROOT / "streams"
    for family in ("realtime", "cluster", "phone"):
        assert (streams / family / "__init__.py").is_file(), family
        for module in (streams / family).glob("*.py"):
            assert not module.name.startswith(family + "_"), f"{module}: drop the folder's prefix"


def _missing_files(text: str, folder: Path) -> list[str]:
    """The files and folders a piece of README names in backticks (`b.py`, `realtime/call.py`,
    `streams/`) that exist neither under `folder` nor from the repository's root."""
    names = re.findall(r"`([\w./]+(?:\.py|/))`", text)
    return [n for n in names if not (folder / n).exists() and not (ROOT / n).exists()]


def test_readme_layout_and_frame_path_name_files_that_exist():
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in layout.splitlines() if line.startswith("| `")]
    assert len(rows) > 10
    missing = []
    for row in rows:
        first = re.match(r"\| `([\w./]+)`", row).group(1)
        missing += _missing_files(row, ROOT / (first if first.endswith("/") else Path(first).parent))
    frame = readme.split("## One 80 ms frame, mic to speaker", 1)[1].split("\n## ", 1)[0]
    missing += _missing_files(frame, ROOT / "streams")
    assert missing == []
    assert _missing_files("`streams/phone.py` `nowhere.py`", ROOT / "streams") == ["streams/phone.py", "nowhere.py"]


@pytest.mark.parametrize("case", ["upward", "circle", "relative-circle"])
def test_the_checks_catch_what_they_are_for(tmp_path, case):
    """A tree with one planted fault of each kind fails the check that is meant to catch it."""
    for sub in (PACKAGE, *SUBPACKAGES):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "__init__.py").write_text("")
    (tmp_path / "streams" / "server.py").write_text("import os\n")
    if case == "upward":
        (tmp_path / "agent" / "cli.py").write_text(
            "def main():\n    from duplex_agent.streams.server import run\n")
        assert upward_imports(import_graph(tmp_path)) == [
            "duplex_agent.agent.cli imports duplex_agent.streams.server"]
        assert circles(import_graph(tmp_path)) == []
    elif case == "circle":
        (tmp_path / "checkpoints" / "loader.py").write_text("from duplex_agent.checkpoints import personaplex\n")
        (tmp_path / "checkpoints" / "personaplex.py").write_text(
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from duplex_agent.checkpoints.loader import AgentBundle\n")
        assert circles(import_graph(tmp_path)) == [
            ["duplex_agent.checkpoints.loader", "duplex_agent.checkpoints.personaplex"]]
    else:
        (tmp_path / "streams" / "realtime").mkdir()
        (tmp_path / "streams" / "realtime" / "__init__.py").write_text("")
        (tmp_path / "streams" / "realtime" / "session.py").write_text("from .events import x\n")
        (tmp_path / "streams" / "realtime" / "events.py").write_text("from . import session\n")
        assert circles(import_graph(tmp_path)) == [
            ["duplex_agent.streams.realtime.events", "duplex_agent.streams.realtime.session"]]
