# Two commands on a fresh machine:
#   make quickstart   # builds a tiny base model, then a real continual-pretraining run (2 workers, ZeRO-3), CPU only
#   make test         # the test suite (real multi-process gloo, DeepSpeed, FSDP2, torchrun, deepspeed CLI)
#   make test-gpu     # only the gpu-marked tests, on a machine with CUDA GPUs (PY=python3: no .venv, see README)
# Both create .venv and install what they need. Without a GPU, torch is the CPU build (TORCH_SPEC below).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?= --durations=25

.PHONY: install quickstart test test-gpu lint format clean

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
	@# torchao for the CPU tests of float8 layer conversion, in a directory only the test process reads (see
	@# tests/test_float8.py: installed in the venv, every worker that loads a model would import it)
	$(PY) -m pip install -q --no-deps --target $(VENV)/float8 'torchao==0.18.0'
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/cpt quickstart --output-dir runs/quickstart

test: $(STAMP)
	FLOAT8_SITE=$(VENV)/float8 $(PY) -m pytest -q $(PYTEST_ARGS)

# Only the tests marked gpu, with DeepSpeed on CUDA. Without a CUDA device they would all skip, which is no pass:
# stop with an error instead. PY=python3 runs them with that interpreter as it is (no .venv is built), e.g. with
# the packages installed under PYTHONPATH.
test-gpu: $(if $(filter $(VENV)/bin/python,$(PY)),$(STAMP))
	@$(PY) -c 'import sys, torch; n = torch.cuda.device_count() if torch.cuda.is_available() else 0; \
		print(f"test-gpu: torch {torch.__version__}, {n} CUDA device(s)"); sys.exit(n == 0)' \
		|| { echo "test-gpu: $(PY) sees no CUDA device (or cannot import torch); the GPU tests need one" >&2; exit 1; }
	DS_ACCELERATOR=cuda NCCL_NVLS_ENABLE=$${NCCL_NVLS_ENABLE:-0} $(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check launcher tests benchmarks
	$(VENV)/bin/ruff format --check launcher tests benchmarks
	$(VENV)/bin/mypy launcher

format: $(STAMP)
	$(VENV)/bin/ruff check --fix launcher tests benchmarks
	$(VENV)/bin/ruff format launcher tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache
