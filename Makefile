# `make test` and `make demo` do all the set-up on a fresh machine with Python 3.11.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first and pinned: pip then takes the local CPU build and never a newer CUDA one.
TORCH_PIN := torch==2.13.0

.PHONY: install test lint format demo demo-db bench

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# The browser tests drive Debian's Chromium (a browser download is impossible offline).
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

# The Neuronpedia import test loads an export into Debian's PostgreSQL.
PG_CTLCLUSTER := /usr/bin/pg_ctlcluster
$(PG_CTLCLUSTER):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint $(CHROMIUM) $(PG_CTLCLUSTER)
	$(BIN)/pytest -q

# The embedded demo: builds data/demo/demo.db from the committed demo SAEs if missing.
demo-db: install
	$(BIN)/saescope demo --no-serve

# ... and serves it at http://127.0.0.1:8000/
demo: install
	$(BIN)/saescope demo

bench: install
	$(BIN)/python tests/benchmarks/build_speed.py
