"""The repository's shape: the stdlib `platform` stays importable, every config loads."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hftlab.config import load_config
from tests.conftest import REPO

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_platform_is_only_a_source_root():
    assert not (REPO / "platform" / "__init__.py").exists()
    out = subprocess.run([sys.executable, "-c", "import platform; print(platform.python_version())"],
                         cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ".".join(map(str, sys.version_info[:3]))


def test_there_are_configs():
    assert {"quickstart.yaml", "smoke.yaml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_config_loads_and_starts_with_its_command(path):
    if "sweeps" in path.relative_to(REPO).parts:  # a sweep file: its own schema, every trial point checked against the config's
        from hftlab.sweep.spec import load_sweep

        spec, _ = load_sweep(path)
        assert spec.space
    else:
        assert load_config(path).name
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and "hftlab " in first, f"{path} must open with the command that runs it"


PACKAGE = REPO / "platform" / "hftlab"
TOP_LEVEL = {"__init__.py", "cli.py", "allocator.py", "faults.py", "metrics.py", "progress.py", "resources.py", "stats.py",
             "storage.py"}
"""The package's face, the CLI and the cross-cutting modules; everything else lives in a sub-package (docs/architecture.md)."""


def test_the_top_level_holds_only_the_cli_the_face_and_cross_cutting_modules():
    assert {p.name for p in PACKAGE.glob("*.py")} <= TOP_LEVEL


def test_no_module_is_over_300_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 300}
    assert not long, long


def imports_of(path) -> set[str]:
    """The hftlab modules a file imports, at any depth (a function's lazy import counts: it is a dependency too)."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hftlab") and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from hftlab.sweep import spec`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("hftlab"))
    return found


def test_no_import_circle():
    modules = {".".join(("hftlab", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): p
               for p in PACKAGE.rglob("*.py")}
    graph = {m: {i for i in imports_of(p) if i in modules and i != m} for m, p in modules.items()}
    for m in graph:  # a package's __init__ is empty or the face: importing hftlab.x.y is not a dependency on hftlab.x
        graph[m] = {i for i in graph[m] if modules[i].name != "__init__.py" or i == "hftlab"}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
