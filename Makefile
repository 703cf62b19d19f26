# Two commands on a fresh machine:
#   make quickstart   # builds a tiny base model, then a real continual-pretraining run (2 workers, ZeRO-3), CPU only
#   make test         # the test suite (real multi-process gloo, DeepSpeed, FSDP2, torchrun, deepspeed CLI)
# Both create .venv and install what they need. Without a GPU, torch is the CPU build (TORCH_SPEC below).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install quickstart test lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "GPU found: installing torch with CUDA"; $(PY) -m pip install -q torch; \
	else \
		echo "no GPU: installing the CPU build of $(TORCH_SPEC)"; \
		$(PY) -m pip install -q $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),); \
	fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/cpt quickstart --output-dir runs/quickstart

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check launcher tests benchmarks
	$(VENV)/bin/ruff format --check launcher tests benchmarks
	$(VENV)/bin/mypy launcher

format: $(STAMP)
	$(VENV)/bin/ruff check --fix launcher tests benchmarks
	$(VENV)/bin/ruff format launcher tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache
