# Two commands for a newcomer on a fresh machine:
#   make run    install everything, then start the certification service on its embedded defaults
#   make test   install everything, then run the whole test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist

CHROMIUM := /usr/bin/chromium

.PHONY: run test test-fast lint dataset browser prometheus redis-server install certify-table bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Debian's Fashion-MNIST (gzipped IDX). Installed automatically when running as root.
dataset:
	@if [ ! -f $(FMNIST)/t10k-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y dataset-fashion-mnist || { apt-get update && apt-get install -y dataset-fashion-mnist; }; \
	  else \
	    echo "Fashion-MNIST is missing: run  sudo apt-get install dataset-fashion-mnist  and retry"; exit 1; \
	  fi; \
	fi

# The job-outage tests start (and kill) redis-server processes of their own on ports 6390-6399.
redis-server:
	@if ! command -v redis-server >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y redis-server || { apt-get update && apt-get install -y redis-server; }; \
	  else \
	    echo "redis-server is missing: run  sudo apt-get install redis-server  and retry"; exit 1; \
	  fi; \
	fi

# Debian's Chromium, which the console's browser tests drive through Playwright (which downloads no browser).
browser:
	@if [ ! -x $(CHROMIUM) ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y chromium || { apt-get update && apt-get install -y chromium; }; \
	  else \
	    echo "Chromium is missing (the console's browser tests need it): run  sudo apt-get install chromium  and retry"; exit 1; \
	  fi; \
	fi

# Debian's Prometheus 2.42: promtool checks the alert rules, and the loopback stack test runs prometheus itself.
# Installed automatically when running as root; the package starts no daemon by itself.
prometheus:
	@if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y prometheus || { apt-get update && apt-get install -y prometheus; }; \
	  else \
	    echo "Prometheus is missing: run  sudo apt-get install prometheus  and retry"; exit 1; \
	  fi; \
	fi

install: $(STAMP) dataset

run: install
	$(BIN)/python -m service

test: install browser prometheus redis-server
	$(BIN)/python -m pytest -m "" -q

test-fast: install prometheus
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache artifacts
