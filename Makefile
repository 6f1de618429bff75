# Two commands on a fresh machine:  `make pipeline`  and  `make test`.
# Each creates .venv and installs what is missing first.
SHELL := /bin/bash
PY := .venv/bin/python
export DAGSTER_HOME := $(CURDIR)/dagster_home
PROFILE ?= quick
# inprocess: every Dagster run in one Python process; dg: a `dg launch` subprocess per run.
LAUNCHER ?= inprocess
MLFLOW_PORT ?= 5000
MLFLOW_HOST ?= 127.0.0.1

.PHONY: install pipeline test ui mlflow lint bench

.venv/installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: pip takes the CPU wheel on disk (a GPU machine keeps its own).
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: .venv/installed

pipeline: install
	GAMPEN_PROFILE=$(PROFILE) $(PY) -m gampen_assets.pipeline --launcher $(LAUNCHER)

test: install
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

ui: install
	GAMPEN_PROFILE=$(PROFILE) .venv/bin/dagster dev -w workspace.yaml

# The MLflow UI on the embedded store: registered models, versions, the champion alias, runs.
# Job execution (GenAI judges, trace roll-ups) is off: it forks seven worker pools we never use.
mlflow: install
	@test -f $(DAGSTER_HOME)/mlflow.db || echo "no $(DAGSTER_HOME)/mlflow.db yet: make pipeline registers the models"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false .venv/bin/mlflow ui --backend-store-uri sqlite:///$(abspath $(DAGSTER_HOME))/mlflow.db \
		--default-artifact-root file://$(abspath $(DAGSTER_HOME))/mlartifacts \
		--host $(MLFLOW_HOST) --port $(MLFLOW_PORT) --workers 1

lint: install
	.venv/bin/ruff format --check . && .venv/bin/ruff check .

bench: install
	$(PY) -m benchmarks.run_all
