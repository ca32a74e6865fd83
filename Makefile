# One command sets up and runs the main job; one runs the whole test suite.
# Both create .venv (or reuse it) and install lorank into it; torch==2.13.0 is pinned so pip
# takes the CPU wheel instead of a multi-GB CUDA build.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: venv install dev demo test lint docs wheel-check clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .

dev: install
	$(BIN)/pip install -q -e ".[dev]"

# The flagship: every method on MNIST with the same budget, then report.html + summary.md.
demo: install
	$(BIN)/lorank compare --out runs/compare

test: dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/pytest -q
	$(BIN)/python -W error::UserWarning -m pdoc $(DOC_MODULES) -o build/docs
	bash .ci/wheel_check.sh $(BIN)/python

# API reference from the docstrings; any pdoc warning fails the build.
DOC_MODULES := lorank lorank.core lorank.data lorank.models lorank.methods lorank.training \
	lorank.compress lorank.experiments lorank.integrations '!lorank._compat'
docs: dev
	$(BIN)/python -W error::UserWarning -m pdoc $(DOC_MODULES) -o build/docs

# The built wheel, installed in a fresh venv, runs compare/train/init outside the source tree.
wheel-check: dev
	bash .ci/wheel_check.sh $(BIN)/python

lint: dev
	$(BIN)/ruff check src tests benchmarks && $(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist
