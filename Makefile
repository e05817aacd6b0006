# The two commands of the README: `make demo` and `make test`. Each sets up everything it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL := var/tiny.gguf
# llama-cpp-python compiles llama.cpp from source: use both cores.
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2

.PHONY: demo test lint format bench clean install

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[upstream,dev]'
	touch $(STAMP)

$(MODEL): $(STAMP) upstream/make_tiny_model.py
	mkdir -p var
	$(BIN)/python upstream/make_tiny_model.py $(MODEL)

demo: $(STAMP) $(MODEL)
	$(BIN)/sidecar demo --model $(MODEL)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# wrk is the JSON load generator (Debian package); without it the bench falls back to a
# slower Python client and says so.
bench: $(STAMP)
	command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq wrk; } || echo "wrk not installed: using the Python client"
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache .hypothesis
