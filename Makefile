# Every target builds the pinned virtual environment first (once; again when the lock changes).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench lock clean

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# The main job on the bundled default: W8A8 on the digits ViT (trained and cached on first use).
demo: setup
	$(BIN)/compress run recipes/digits_vit_w8a8.yaml --out out/demo

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python bench/quantization.py --out bench/results

# Regenerate requirements.lock from pyproject.toml (needs network to PyPI).
lock:
	rm -rf .lockenv && $(PYTHON) -m venv .lockenv
	.lockenv/bin/pip install --quiet --upgrade "pip>=24"
	.lockenv/bin/pip install --quiet ".[service,dev]"
	.lockenv/bin/pip freeze --exclude compress > requirements.lock
	rm -rf .lockenv

clean:
	rm -rf out $(VENV)
