# Two entry points for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build by default; a GPU user sets TORCH to the CUDA build they want (README).
TORCH ?= torch==2.13.0
GRID ?= examples/grid.yaml
STAMP := $(VENV)/.installed

.PHONY: install demo test lint format bench zoo drafters clean

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
	$(BIN)/python -m mmspec.training.train_tiny

# Retrain the committed draft heads (models/zoo/drafters/): every head for both tiny models,
# two at a time (one thread each); the first two distil their target's answers, which the
# rest reuse from $$MMSPEC_HOME. ~20 min on 2 cores. CI never runs this.
DRAFT_HEADS := eagle eagle3 vispec msd medusa
TINY_TARGETS := tiny-llava tiny-qwen2.5-vl
drafters: $(STAMP)
	for m in $(DRAFT_HEADS); do for t in $(TINY_TARGETS); do echo "$$m $$t"; done; done | \
	  xargs -P 2 -L 1 sh -c '$(BIN)/mmspec-orch train-drafter --method $$0 --target $$1'

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
