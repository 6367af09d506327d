# Two commands on a fresh machine (Python 3.11 + pip):
#   make repro   create .venv if needed, then run the whole pipeline (dvc repro) on the embedded data
#   make test    create .venv if needed, then run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mimflow-installed

# dvc.yaml's commands say `python`: the environment's, also for dvc started from here.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install install-team postgres repro test test-integration team-up team-down chromium flow mlflow-ui \
	prefect-ui gpu-check lint

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q --no-compile -c constraints.txt -e ".[dev]"
	@# byte-compile on both cores (pip does it on one: half the install time); the few files in
	@# site-packages that are not valid Python on purpose (test fixtures) fail here as they do under pip
	$(BIN)/python -m compileall -q -j 0 $$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") >/dev/null 2>&1 || true
	touch $(STAMP)

# The team extra: PostgreSQL's Python driver for the MLflow server's database (docs/team.md).
TEAM_STAMP := $(VENV)/.mimflow-team-installed
install-team: $(TEAM_STAMP)

$(TEAM_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q --no-compile -c constraints.txt -e ".[dev,team]"
	touch $(TEAM_STAMP)

# The params check first: on a broken params.yaml it prints one line naming file, line and column (or the
# key), where dvc repro's own YAML parser would print several.
repro: $(STAMP)
	$(BIN)/python -m pipelines.config params.yaml
	$(BIN)/dvc repro

test: $(STAMP) chromium
	$(BIN)/python -m pytest -m "not integration" -n 2 --dist loadfile --no-loadscope-reorder

# House style (pyproject.toml's [tool.ruff]): formatted, linted, lines <= 120.
lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

# Slower end-to-end runs (the GPU profile's smoke run through the whole DAG, ...); .ci/run runs both.
test-integration: $(TEAM_STAMP)
	$(BIN)/python -m pytest -m integration -n 2 --dist loadfile --no-loadscope-reorder

# Debian's PostgreSQL for the team MLflow server (team-up and the integration tests start their own cluster).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || \
	  { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } || \
	  echo "note: PostgreSQL is not installed and apt-get cannot install it; the team MLflow server test will be skipped"

# The team's MLflow server (docs/team.md): PostgreSQL in a temporary cluster + `mlflow server` serving the
# artifacts under .team/artifacts, both on 127.0.0.1; prints the MLFLOW_TRACKING_URI to export.
team-up: $(TEAM_STAMP) postgres
	$(BIN)/python -m pipelines.team_server up --state .team

team-down:
	$(BIN)/python -m pipelines.team_server down --state .team

# The report test opens reports/index.html in headless Chromium (Debian's package).
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "note: chromium is not installed; the report page test will be skipped"

flow: $(STAMP)
	$(BIN)/python -m pipelines.flow

mlflow-ui: $(STAMP)
	@echo "runs table: http://127.0.0.1:5000/#/experiments/1?workflowType=machine_learning"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db

prefect-ui: $(STAMP)
	PREFECT_HOME=$(CURDIR)/.prefect $(BIN)/prefect server start

# The device check (benchmarks/gpu_check.py): on a GPU machine `make gpu-check`; the same code paths at
# tiny sizes on a CPU: `make gpu-check DEVICE=cpu`. Results: benchmarks/results/gpu-check-<device>.{json,md}
DEVICE ?= auto
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py --device $(DEVICE)
