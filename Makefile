# The two commands of the README:
#   make demo   — create the environment and materialize the whole asset graph on the embedded default
#   make test   — create the environment and run the test suite
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export MMBERT_HOME ?= $(CURDIR)/.mmbert
export DAGSTER_HOME ?= $(MMBERT_HOME)/dagster
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test env ui clean

env: $(STAMP)

# torch first and pinned: it is the CPU build on this machine's disk; any other spec pulls a CUDA build.
$(STAMP): pyproject.toml scripts/activate.sh scripts/install_activation.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/python scripts/install_activation.py $(VENV)
	touch $(STAMP)

$(DAGSTER_HOME)/dagster.yaml: scripts/dagster.yaml
	mkdir -p "$(DAGSTER_HOME)"
	cp scripts/dagster.yaml "$@"

demo: env $(DAGSTER_HOME)/dagster.yaml
	@start=$$(date +%s); \
	$(BIN)/dagster asset materialize -m mmbert_dagster.definitions --select '*' && \
	echo "materialized the whole graph in $$(( $$(date +%s) - start )) s; artifacts under $(MMBERT_HOME)/$${MMBERT_PRESET:-tiny}/" && \
	echo "report: $(MMBERT_HOME)/$${MMBERT_PRESET:-tiny}/benchmark_scores/report.md"

test: env
	$(BIN)/python -m pytest -q

ui: env $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster dev -h 127.0.0.1 -p 3000

clean:
	rm -rf $(MMBERT_HOME)
