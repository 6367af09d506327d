# Two commands on a fresh machine (Python 3.11 + pip):
#   make repro   create .venv if needed, then run the whole pipeline (dvc repro) on the embedded data
#   make test    create .venv if needed, then run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mimflow-installed

export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install repro test flow mlflow-ui prefect-ui clean-outputs

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

repro: $(STAMP)
	$(BIN)/dvc repro

test: $(STAMP)
	$(BIN)/python -m pytest

flow: $(STAMP)
	$(BIN)/python -m pipelines.flow

mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db

prefect-ui: $(STAMP)
	PREFECT_HOME=$(CURDIR)/.prefect $(BIN)/prefect server start
