# `make test` and `make serve` each set up .venv on a fresh machine, then run.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU := torch==2.13.0

.PHONY: setup test lint format serve demo clean image image-cpu

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

# Container images (Dockerfile: CUDA; Dockerfile.cpu: CPU torch + the tiny model). Where Docker
# is missing or its daemon is not running, say so and fail: nothing was built.
IMAGE ?= pdserve
DOCKER ?= docker

define docker_build
	@if ! command -v $(DOCKER) >/dev/null 2>&1; then \
		echo "make: no '$(DOCKER)' command here, so $(2) was not built. Where Docker exists: docker build -f $(1) -t $(2) ."; exit 1; \
	elif ! $(DOCKER) info >/dev/null 2>&1; then \
		echo "make: '$(DOCKER)' reaches no Docker daemon here, so $(2) was not built. Start the daemon, or where one runs: docker build -f $(1) -t $(2) ."; exit 1; \
	fi
	$(DOCKER) build -f $(1) -t $(2) .
endef

image:
	$(call docker_build,Dockerfile,$(IMAGE):latest)

image-cpu:
	$(call docker_build,Dockerfile.cpu,$(IMAGE):cpu)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
