# The README's two commands: `make up` (the whole service on this machine) and `make test` (lint, the docs site, the whole suite).
# Each makes .venv on first use; a fresh machine needs only Python >= 3.11.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned and installed before the rest: a CPU build, unless TORCH=cuda (then PyPI's CUDA build).
TORCH ?= cpu
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# Which torch the venv holds: one stamp per build, so that a change of TORCH (or TORCH_VERSION) installs the other.
TORCH_STAMP := $(VENV)/.torch-$(TORCH)-$(TORCH_VERSION)
ARGS ?=
# `make test` runs the suite in this many processes (pytest-xdist; a module, or a test class, each at a time): most
# tests wait on the processes they start, so two share even a 2-core machine well. 0: one process.
TEST_PROCESSES ?= 2
# MODELS=real: `make up`'s workers serve the real models from the Hugging Face hub, both of them (a GPU wants
# TORCH=cuda too), where BLIPQ_MODEL and BLIPQ_CAPTION_MODEL do not name others; MODELS=demo: the shipped demo models.
MODELS ?= demo
REAL_VQA_MODEL := Salesforce/blip-vqa-base
REAL_CAPTION_MODEL := Salesforce/blip-image-captioning-base
ifeq ($(MODELS),real)
UP_MODELS := BLIPQ_MODEL="$${BLIPQ_MODEL:-$(REAL_VQA_MODEL)}" \
	BLIPQ_CAPTION_MODEL="$${BLIPQ_CAPTION_MODEL:-$(REAL_CAPTION_MODEL)}"
else ifneq ($(MODELS),demo)
$(error MODELS is demo (the shipped demo models) or real ($(REAL_VQA_MODEL) and $(REAL_CAPTION_MODEL)))
endif
# Where `make docs` writes the site: under build/, which git ignores.
DOCS_SITE ?= build/site

.PHONY: up test quick lint docs reference clean

up: $(VENV)/.installed
	$(UP_MODELS) $(BIN)/blipq up $(ARGS)

test: $(VENV)/.installed lint docs
	$(BIN)/pytest --numprocesses $(TEST_PROCESSES) --dist loadscope

# The process-free tests (tests/unit: no worker, no API server; a Redis at most), in seconds, while editing.
quick: $(VENV)/.installed
	$(BIN)/pytest --numprocesses $(TEST_PROCESSES) tests/unit

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The docs site (mkdocs.yml), strict: a broken link, a missing anchor or a page left out of the nav fails it.
# NO_MKDOCS_2_WARNING silences Material's end-of-life notice, printed on every build and not about these pages.
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir $(DOCS_SITE)

# docs/configuration.md and docs/errors.md, written from the code (tests/unit/test_reference.py fails when they differ).
reference: $(VENV)/.installed
	$(BIN)/python -m blipq.reference

# The rest, once torch is there (order-only: another torch build needs no reinstall of the rest).
$(VENV)/.installed: pyproject.toml | $(TORCH_STAMP)
	$(BIN)/pip install -e ".[dev]"
	touch $@

# torch as TORCH asks. The pinned CPU build ("+cpu": never a CUDA build) from a local wheel (pip's find-links) when
# there is one, its dependencies from the usual index; else PyTorch's CPU index; else, as a last resort, PyPI's (CUDA
# on Linux: GBs). A torch of the other build is uninstalled first: pip takes 2.13.0+cpu for a 2.13.0 it was asked
# for (a local version label matches), so TORCH=cuda after a CPU install would otherwise keep the CPU build. A venv
# that holds the asked build already (made before the stamps) keeps it.
$(TORCH_STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	rm -f $(VENV)/.torch-*
	if ! $(BIN)/python -c 'import sys, torch; \
		same = torch.__version__.split("+")[0] == "$(TORCH_VERSION)" and (torch.version.cuda is None) == ("$(TORCH)" != "cuda"); \
		sys.exit(not same)' 2>/dev/null; then \
		$(BIN)/pip uninstall --yes torch 2>/dev/null; \
		if [ "$(TORCH)" = "cuda" ]; then \
			$(BIN)/pip install "torch==$(TORCH_VERSION)"; \
		else \
			$(BIN)/pip install "torch==$(TORCH_VERSION)+cpu" 2>/dev/null \
			|| $(BIN)/pip install "torch==$(TORCH_VERSION)" --index-url "$(TORCH_CPU_INDEX)" \
			|| $(BIN)/pip install "torch==$(TORCH_VERSION)"; \
		fi \
	fi
	touch $@

clean:
	rm -rf $(VENV) .blipq .pytest_cache .mypy_cache .ruff_cache $(DOCS_SITE)
