# Two commands matter: `make run` (set up, build the sample model, serve it) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8080

.PHONY: run test lint typecheck unit samples bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

samples: $(STAMP)
	$(BIN)/python build/make_sample_models.py --out build/samples --store models

run: samples
	$(BIN)/appliance serve --models models --host $(HOST) --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check appliance build tests
	$(BIN)/ruff format --check appliance build tests

typecheck: $(STAMP)
	$(BIN)/mypy

unit: samples
	$(BIN)/pytest -q $(PYTEST_ARGS)

test: lint typecheck unit

bench: samples
	$(BIN)/appliance bench build/samples/sample.onnx

clean:
	rm -rf $(VENV) build/samples .mypy_cache .ruff_cache .pytest_cache
