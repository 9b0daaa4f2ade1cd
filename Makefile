# `make test` and `make serve` each set up .venv on a fresh machine, then run.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU := torch==2.13.0

.PHONY: setup test lint format serve demo clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_CPU)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(VENV)/bin/ruff format --check pdserve tests benchmarks examples
	$(VENV)/bin/ruff check pdserve tests benchmarks examples

format: setup
	$(VENV)/bin/ruff format pdserve tests benchmarks examples
	$(VENV)/bin/ruff check --fix pdserve tests benchmarks examples

test: setup lint
	$(PY) -m pytest -q -x --durations=15 tests

serve: setup
	$(VENV)/bin/pdserve demo

demo: serve

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
