# Two commands do everything on a fresh machine:
#   make quickstart   set up .venv, then compare a student trained alone and distilled, tuned fairly (offline, 2 cores)
#   make test         set up .venv, then lint and run the default test suite (offline, CPU)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# pip on the project's machines takes these from local disk; elsewhere override, e.g. TORCH="torch torchvision".
TORCH ?= torch==2.14.1 torchvision==0.29.1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup quickstart test test-slow test-multiprocess lint format bench gpu-check gpu-check-smoke clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

quickstart: setup
	$(PY) recipes/mnist_quickstart.py

lint: setup
	$(PY) -m ruff check hf_kdsearch recipes tests benchmarks
	$(PY) -m ruff format --check hf_kdsearch recipes tests benchmarks

format: setup
	$(PY) -m ruff check --fix hf_kdsearch recipes tests benchmarks
	$(PY) -m ruff format hf_kdsearch recipes tests benchmarks

test: lint
	$(PY) -m pytest -q -ra --durations=15

# The slow and the 2-process (DDP) tests; the default tier leaves both out.
test-slow: setup
	$(PY) -m pytest -q -ra -m "slow or multiprocess"

test-multiprocess: setup
	$(PY) -m pytest -q -ra -m multiprocess

bench: setup
	$(PY) benchmarks/throughput.py --smoke

# Every GPU figure in one bounded run (under 8 minutes on one H100): out/gpu_check/report.md and report.json. No setup
# step, so that a GPU machine without network runs it with its own python3 (or PYTHON=...); see the script's header
# for the wheels it needs there. The smoke run is the same at toy sizes on CPU; CI runs it in the slow tier
# (tests/test_gpu_check.py).
GPU_CHECK_PYTHON = $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	PYTHON=$(GPU_CHECK_PYTHON) bash benchmarks/gpu_check.sh

gpu-check-smoke:
	PYTHON=$(GPU_CHECK_PYTHON) bash benchmarks/gpu_check.sh --smoke

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
