# Every target builds the pinned virtual environment first (once; again when the lock changes).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-stop lint test test-fast test-services bench zoo lock clean

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# The main job on the bundled default: start the service (SQLite, files in out/service), submit
# W8A8 of the digits ViT (its trained weights ship in the package: no training on first use)
# through the CLI, print the dashboard URL and the report. The service stays up for the
# dashboard: `make demo-stop` ends it. Time from an empty cache: BENCHMARKS.md, "First run".
demo: setup
	$(BIN)/python scripts/demo_service.py

demo-stop: setup
	$(BIN)/python scripts/demo_service.py --stop

# What the service tests need besides Python packages: Debian's Chromium for the dashboard test
# (never a browser download) and the local PostgreSQL server, started if it is down.
test-services:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)
	@if command -v pg_ctlcluster >/dev/null 2>&1 && ! pg_isready -q -h 127.0.0.1; then \
		pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start; fi

# The model zoo (random weights, built offline into out/zoo) x every pass family beside ORT's
# quantizers, one process per member; ZOO_ARGS e.g. "--models resnet18,swin_tiny --quick".
zoo: setup
	$(BIN)/python scripts/build_zoo.py
	$(BIN)/python bench/zoo.py $(ZOO_ARGS)

# ruff with the settings in pyproject.toml; `make test` fails on any finding.
lint: setup
	$(BIN)/ruff check .

test: setup test-services lint
	$(BIN)/python -m pytest -q -n 2

test-fast: setup test-services
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

bench: setup
	$(BIN)/python bench/quantization.py --out bench/results

# Regenerate requirements.lock from pyproject.toml (needs network to PyPI).
lock:
	rm -rf .lockenv && $(PYTHON) -m venv .lockenv
	.lockenv/bin/pip install --quiet --upgrade "pip>=24"
	.lockenv/bin/pip install --quiet ".[service,ray,dev]"
	.lockenv/bin/pip freeze --exclude compress-models > requirements.lock
	rm -rf .lockenv

# Build the images and run them for real: API + worker on PostgreSQL, a job, its artifacts across
# a container restart, then a job on Ray containers (docs/deployment.md). Needs a Docker engine,
# docker-compose, debootstrap and the local PostgreSQL; not part of `make test` (GBs of images).
.PHONY: docker-smoke
docker-smoke:
	scripts/docker/smoke.sh

clean:
	rm -rf out $(VENV)
