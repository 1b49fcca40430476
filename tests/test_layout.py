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
        from hftlab.sweepfile import load_sweep

        spec, _ = load_sweep(path)
        assert spec.space
    else:
        assert load_config(path).name
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and "hftlab " in first, f"{path} must open with the command that runs it"
