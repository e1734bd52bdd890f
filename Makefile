# The README's two commands: `make up` (the whole service on this machine) and `make test` (lint, the docs site, the whole suite).
# Each makes .venv on first use; a fresh machine needs only Python >= 3.11.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned and installed before the rest: a CPU build, unless TORCH=cuda (then PyPI's CUDA build).
TORCH ?= cpu
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
ARGS ?=
# Where `make docs` writes the site: under build/, which git ignores.
DOCS_SITE ?= build/site

.PHONY: up test lint docs reference clean

up: $(VENV)/.installed
	$(BIN)/blipq up $(ARGS)

test: $(VENV)/.installed lint docs
	$(BIN)/pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The docs site (mkdocs.yml), strict: a broken link, a missing anchor or a page left out of the nav fails it.
# NO_MKDOCS_2_WARNING silences Material's end-of-life notice, printed on every build and not about these pages.
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir $(DOCS_SITE)

# docs/configuration.md and docs/errors.md, written from the code (tests/test_reference.py fails when they differ).
reference: $(VENV)/.installed
	$(BIN)/python -m api.reference

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
	rm -rf $(VENV) .blipq .pytest_cache .mypy_cache .ruff_cache $(DOCS_SITE)
