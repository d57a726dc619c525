# The two quick-start commands: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
KEYS   ?= keys
ARGS   ?=

.PHONY: run test lint format bench keys docs clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "Installing secagg and its dependencies into $(VENV) (first time: a few minutes)..."
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,bench,ray,docs,dp,flower]"
	@touch $(STAMP)

$(KEYS)/manifest.json: | $(STAMP)
	$(BIN)/secagg keygen --out $(KEYS)

keys: $(KEYS)/manifest.json

## run: the main job, 8 clients with HE secure aggregation on the bundled digits dataset
run: $(STAMP) $(KEYS)/manifest.json
	$(BIN)/secagg run --he --clients 8 --keys $(KEYS) $(ARGS)

## test: the whole test suite (what CI runs)
test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

## docs: the docs site, built strictly (a broken link fails it) into site/
docs: $(STAMP)
	$(BIN)/mkdocs build --strict

bench: $(STAMP)
	$(BIN)/python bench/compare_he.py $(ARGS)

clean:
	rm -rf $(VENV) runs mlruns mlflow.db bench/results site
