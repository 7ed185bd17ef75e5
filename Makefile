# The fabric's Makefile. `make demo` and `make test` are the two set-up commands.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: deps test lint fmt typecheck unit demo bench clean-lab clean

deps:
	@scripts/install-deps.sh

lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

fmt: deps
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

typecheck: deps
	$(VENV)/bin/mypy

test: lint typecheck
	$(PY) -m pytest $(PYTEST_ARGS)

demo: deps
	$(PY) -m lab.demo

# every benchmark under lab/bench/: JSON lines to lab/out/bench.jsonl, a table on the
# terminal, non-zero if one failed or missed its target (BENCH_ARGS=--quick: smoke sizes)
bench: deps
	$(PY) -m lab.bench all $(BENCH_ARGS)

clean-lab:
	$(PY) -m lab clean

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
