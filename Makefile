# The README's two commands: `make up` (the whole service on this machine) and `make test` (the whole suite).
# Each makes .venv on first use; a fresh machine needs only Python >= 3.11.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned and installed before the rest: a CPU build, unless TORCH=cuda (then PyPI's CUDA build).
TORCH ?= cpu
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
ARGS ?=

.PHONY: up test lint clean

up: $(VENV)/.installed
	$(BIN)/blipq up $(ARGS)

test: $(VENV)/.installed lint
	$(BIN)/pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The pinned CPU build ("+cpu": never a CUDA build) from a local wheel (pip's find-links) when there is one, its
# dependencies from the usual index; else PyTorch's CPU index; else, as a last resort, PyPI's (CUDA on Linux: GBs).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	if [ "$(TORCH)" = "cuda" ]; then \
		$(BIN)/pip install "torch==$(TORCH_VERSION)"; \
	else \
		$(BIN)/pip install "torch==$(TORCH_VERSION)+cpu" 2>/dev/null \
		|| $(BIN)/pip install "torch==$(TORCH_VERSION)" --index-url "$(TORCH_CPU_INDEX)" \
		|| $(BIN)/pip install "torch==$(TORCH_VERSION)"; \
	fi
	$(BIN)/pip install -e ".[dev]"
	touch $@

clean:
	rm -rf $(VENV) .blipq .pytest_cache .mypy_cache .ruff_cache
