# Every target sets up what it needs: a fresh clone runs `make demo` or `make test` directly.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test lint openapi bench redis

setup: $(VENV)/.installed

# torch==2.13.0 first: on the project's machines it is a local CPU build (pip would otherwise pull a CUDA build).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/python -m adapter_surgery.demo

# The Redis job tests need redis-server (Debian's package); as root without it, install it (skipped otherwise).
redis:
	@command -v redis-server >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; } \
		|| echo "redis-server not installed: the Redis job tests will be skipped"

test: setup redis
	$(BIN)/python -m adapter_surgery.demo.checkpoints all
	$(BIN)/ruff check service tests bench docker
	$(BIN)/python -m adapter_surgery.cli openapi | diff -q - openapi/openapi.json \
		|| (echo "openapi/openapi.json is stale: run 'make openapi'" && exit 1)
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check service tests bench docker

openapi: setup
	$(BIN)/python -m adapter_surgery.cli openapi > openapi/openapi.json

# The side-by-side bench (bench/README.md): every operation at 0.13B, 1B, 3B and 7B shape, 3 reps; writes
# bench/RESULTS.md. BENCH_ARGS narrows it, e.g. make bench BENCH_ARGS="--sizes 0.13b --ops extend-vocab --reps 1".
BENCH_ARGS ?=
bench: setup
	$(BIN)/pip install -q -e ".[dev,bench]"
	$(BIN)/python bench/run.py $(BENCH_ARGS)
