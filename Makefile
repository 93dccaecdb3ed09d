# `make` alone lists the targets. Everything runs inside .venv, which `make install` builds.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXP ?= line_fit_15pts
TRIALS ?= 20
STUDY ?=
WORKERS ?= 1
PORT ?= 5000
SERVE_PORT ?= 5001
ROWS ?= 1000000
MODEL ?= models:/$(EXP)@champion
TRACKING_URI ?= sqlite:///mlflow.db
BACKEND ?= sqlite:///mlflow-server.db
STORAGE ?= optuna.journal
DASHBOARD_PORT ?= 8080


.DEFAULT_GOAL := help
.PHONY: help install run sweep ui dashboard server serve test lint bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-9s %s\n", $$1, $$2}'
	@echo "  variables: EXP=$(EXP) TRIALS=$(TRIALS) WORKERS=$(WORKERS) STUDY=$(STUDY)"
	@echo "             TRACKING_URI=$(TRACKING_URI) PORT=$(PORT) BACKEND=$(BACKEND)"
	@echo "             STORAGE=$(STORAGE) DASHBOARD_PORT=$(DASHBOARD_PORT) ROWS=$(ROWS)"
	@echo "             MODEL=$(MODEL) SERVE_PORT=$(SERVE_PORT)"

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed ## create .venv and install the project with its test tools

run: install ## run generate -> train -> evaluate for EXP through `mlflow run`
	PATH="$(CURDIR)/$(BIN):$$PATH" MLFLOW_TRACKING_URI=$(TRACKING_URI) \
	  $(BIN)/mlflow run . --env-manager local \
	  --experiment-name $(EXP) -P experiment=$(EXP)
	@echo "Next: 'make ui' and open http://127.0.0.1:$(PORT) (experiment '$(EXP)'),"
	@echo "      'make sweep EXP=$(EXP)' to search lr and epochs, 'make test' for the suite."

# One worker: the default four keep dying while importing on a two-core machine.
ui: install ## start the MLflow UI on 127.0.0.1 (PORT=5000) over TRACKING_URI
	$(BIN)/mlflow ui --backend-store-uri $(TRACKING_URI) --host 127.0.0.1 --port $(PORT) \
	  --workers 1

dashboard: install ## optuna-dashboard over STORAGE (a sweep's journal or database URL) on 127.0.0.1
	@case '$(STORAGE)' in *://*) ;; *) test -f '$(STORAGE)' || { \
	  echo "Error: no journal $(STORAGE) here: run 'make sweep' first, or give STORAGE=" >&2; \
	  exit 1; };; esac
	$(BIN)/optuna-dashboard '$(STORAGE)' --host 127.0.0.1 --port $(DASHBOARD_PORT)

server: install ## tracking server on 127.0.0.1:PORT, store BACKEND, artifacts in mlartifacts/
	$(BIN)/mlflow server --backend-store-uri '$(BACKEND)' --host 127.0.0.1 --port $(PORT) \
	  --artifacts-destination $(CURDIR)/mlartifacts --workers 1

# One pytest worker per core, at most four; the tests that start servers or kill sweeps
# share one worker (tests/conftest.py), so no two of them load the machine at once.
test: install ## run the test suite
	$(BIN)/python -m pytest --numprocesses auto --maxprocesses 4 --dist loadgroup

bench: install ## measure speed and memory (ROWS=1000000), results in bench-results/
	$(BIN)/python benchmarks/bench.py --rows $(ROWS)

lint: install ## check style with ruff
	$(BIN)/ruff check pipeline tests benchmarks

sweep: install ## Optuna sweep of lr and epochs for EXP (TRIALS=, WORKERS=, STUDY=)
	$(BIN)/pipeline sweep -e $(EXP) --n-trials $(TRIALS) --workers $(WORKERS) \
	  --tracking-uri $(TRACKING_URI) $(if $(STUDY),--study-name '$(STUDY)')

serve: install ## serve MODEL (default: EXP's champion) on 127.0.0.1:SERVE_PORT for REST calls
	@$(BIN)/pipeline models --check "$(MODEL)" --tracking-uri '$(TRACKING_URI)'
	PATH="$(CURDIR)/$(BIN):$$PATH" MLFLOW_TRACKING_URI=$(TRACKING_URI) \
	  MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false \
	  $(BIN)/mlflow models serve -m "$(MODEL)" \
	  --env-manager local --host 127.0.0.1 --port $(SERVE_PORT)

clean: ## remove .venv, the local MLflow store and caches
	rm -rf $(VENV) mlflow.db mlflow-server.db mlruns mlartifacts optuna.journal* .pytest_cache .ruff_cache *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
