# The two commands of the README:
#   make demo   — create the environment and materialize the whole asset graph on the embedded default
#   make test   — create the environment and run the test suite
# and, beside them:
#   make repro  — the demo's graph plus the paper's ablations and seeds (recipe `repro`), with the findings table
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export MMBERT_HOME ?= $(CURDIR)/.mmbert
export DAGSTER_HOME ?= $(MMBERT_HOME)/dagster
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test env ui clean browser repro

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

# The recipe `repro` includes `tiny` (same artifacts): the demo's checkpoints are reused when they are up to
# date, so after `make demo` only the ablations, the seeds and the scores are computed. REPRO: another recipe
# (the tests run one on their small budget); REPRO_ARGS: more `dagster asset materialize` arguments (e.g. -c run.yaml).
REPRO ?= repro
REPRO_ARGS ?=
repro: env $(DAGSTER_HOME)/dagster.yaml
	@start=$$(date +%s); \
	MMBERT_PRESET=$(REPRO) MMBERT_REUSE_CHECKPOINTS=1 $(BIN)/dagster asset materialize -m mmbert_dagster.definitions \
	  --select '*' $(REPRO_ARGS) && \
	echo "materialized the paper graph, the ablations and the seeds in $$(( $$(date +%s) - start )) s" && \
	echo "findings: $(MMBERT_HOME)/$$($(BIN)/python -c "from mmbert_dagster.recipe import load_recipe; print(load_recipe('$(REPRO)').name)")/benchmark_scores/report.md"

test: env browser
	$(BIN)/python -m pytest -q

# Headless Chromium for tests/test_ui.py: Debian's package, installed when missing and we may (root + apt-get).
# Without it the UI test is skipped, except under CI=true where it fails.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (apt-get) for the UI test"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }; \
	  else echo "chromium is not installed and cannot be installed here: tests/test_ui.py will be skipped"; fi; }

ui: env $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster dev -h 127.0.0.1 -p 3000

clean:
	rm -rf $(MMBERT_HOME)
