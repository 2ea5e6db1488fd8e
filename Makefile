# Two commands for a newcomer on a fresh machine:
#   make run    install everything, then start the certification service on its embedded defaults
#   make test   install everything, then run the whole test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: run test test-fast lint dataset redis-server install certify-table bench clean

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

install: $(STAMP) dataset redis-server

run: install
	$(BIN)/python -m service

test: install
	$(BIN)/python -m pytest -m "" -q

test-fast: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
