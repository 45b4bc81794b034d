# Two commands do everything, set-up included, on a fresh machine:
#   make smoke   # the embedded default: a small built-in model, a real sweep, MLflow tracking
#   make test    # the test suite
# PyTorch: a CUDA machine should install its own torch build into .venv first (or set
# TORCH_SPEC); the default pin takes the CPU build where one lies on disk, PyPI's otherwise
# (on Linux a CUDA build of several GB, which also runs on the CPU). A CPU-only machine can
# take PyTorch's CPU build instead: make TORCH_INDEX=https://download.pytorch.org/whl/cpu smoke
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.cwa-installed

.PHONY: setup smoke test test-fast golden bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)")
	$(BIN)/pip install -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

smoke: setup
	$(BIN)/python orchestrator.py --sweep sweeps/smoke.yaml

test: setup
	$(BIN)/python -m pytest -q

# everyday work: every test not marked slow (no Ray sweeps, no whole-corpus perplexities; ~3 min
# on 2 cores once the demo model is built); make test is the whole suite, and what CI runs
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# the numbers of the working tree against the reference commit (benchmarks/golden_reference),
# bit for bit, both run here (issue 16; a few minutes)
golden: setup
	$(BIN)/python -m benchmarks.golden check

bench: setup
	MALLOC_MMAP_THRESHOLD_=65536 $(BIN)/python -m benchmarks.topk
	MALLOC_MMAP_THRESHOLD_=65536 $(BIN)/python -m benchmarks.gradient_memory
	MALLOC_MMAP_THRESHOLD_=65536 $(BIN)/python -m benchmarks.perturb
	MALLOC_MMAP_THRESHOLD_=65536 $(BIN)/python -m benchmarks.random_k_memory
	$(BIN)/python -m benchmarks.sweep_overhead --two-actors  # timing: default malloc
	$(BIN)/python -m benchmarks.gpu_8b  # on the GPU when there is one, else the CPU smoke run

clean:
	rm -rf results mlruns mlflow.db .pytest_cache
