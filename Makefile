# One entry point for newcomers: `make demo` and `make test` set up .venv on first use.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Test files run in 2 processes (pytest-xdist, a file stays in one): most of the suite waits
# on brokers, sockets and subprocesses, so two halve the wall time on 2 cores.
TEST_WORKERS ?= 2
STAMP  := $(VENV)/.installed
DEMO_ARGS ?=
TEST_ARGS ?=

# Without an NVIDIA GPU, pin the CPU build of torch first so that pip does not pull a
# multi-GB CUDA build for the unpinned `torch>=2.3` in pyproject.toml.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_PIN := $(if $(HAS_GPU),torch>=2.3,torch==2.13.0)

.PHONY: venv demo test lint typecheck bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/streamer demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m ruff check streamer trainer tests benchmarks scripts
	$(PY) -m mypy
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile $(TEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check streamer trainer tests benchmarks scripts
	$(PY) -m mypy

bench: $(STAMP)
	$(VENV)/bin/streamer bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
