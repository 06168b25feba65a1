# Two entry points for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build by default; a GPU user sets TORCH to the CUDA build they want (README).
TORCH ?= torch==2.13.0
GRID ?= examples/grid.yaml
STAMP := $(VENV)/.installed

.PHONY: install demo test lint format bench zoo clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 $(BIN)/mmspec-orch submit $(GRID) --local

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 $(BIN)/pytest -q

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_engine_vs_hf.py

# Retrain the committed tiny model zoo (models/zoo/) from scratch: both models side by side,
# one thread each; ~30 min on 2 cores. CI never runs this.
zoo: $(STAMP)
	$(BIN)/python -m mmspec.models.train_tiny

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
