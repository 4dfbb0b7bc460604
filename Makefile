# DreamFlow: `make test` (CPU test suite) and `make demo` (offline end-to-end run).
# A fresh machine needs only python3 (3.10+), pip and, for the glTF validator in tests, npm.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TOOLS  := .tools
PROMPT ?= a red torus
PYTEST_ARGS ?=

.PHONY: test test-comfyui demo setup clean bench-smoke gpu-test gpu-wheels

# The venv is (re)made when the requirements change. torch is installed only when none is
# importable there: the CPU wheel 2.13.0 here; in ComfyUI, the user's torch is used as is.
$(VENV)/.stamp: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

# Khronos glTF validator (npm package) used by the export tests.
$(TOOLS)/node_modules/gltf-validator/package.json:
	npm install --silent --no-audit --no-fund --prefix $(TOOLS) gltf-validator@2.0.0-dev.3.10

setup: $(VENV)/.stamp $(TOOLS)/node_modules/gltf-validator/package.json

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# The live-ComfyUI tests (tests/test_comfyui_live.py, not skipped) in a real ComfyUI server: the source at
# ../shared/comfyui (COMFYUI_SRC=...) is copied to .cache/comfyui/src, its own venv (ComfyUI's requirements minus
# torchaudio + ours) is built once in .cache/comfyui/venv. .ci/run runs this after `make test`.
test-comfyui: setup
	PYTHON=$(PYTHON) PY=$(PY) bash .ci/comfyui_live.sh $(PYTEST_ARGS)

demo: $(VENV)/.stamp
	$(PY) -m dreamflow demo --prompt "$(PROMPT)"

# The GPU benchmark's code end to end on the CPU with tiny models (seconds); on a GPU: python3 bench/bench_gpu.py.
bench-smoke: $(VENV)/.stamp
	$(PY) bench/bench_gpu.py --smoke --out .bench-smoke
	$(PY) bench/bench_lowvram.py --smoke --out .bench-smoke

# On a CUDA machine with the requirements installed (e.g. `make gpu-test PY=python3`): the GPU-marked tests only.
gpu-test:
	$(PY) -m pytest -q -m gpu tests/test_fast_path.py tests/test_hashgrid.py tests/test_occupancy.py tests/test_volume.py tests/test_raster.py \
		tests/test_gpu_twins.py tests/test_memory.py

# Wheels the lent GPU machine lacks (its python3 is 3.12; torch, peft, transformers are there), for the device tool's
# `carry: [".whl"]`; there, `bash bench/on_device.sh python3 bench/bench_gpu.py ...` installs them and runs the command.
GPU_WHEELS ?= diffusers==0.42.1 trimesh==5.2.0 xatlas==0.0.11 fast-simplification==0.2.0 diffrp-nvdiffrast==0.3.3.1 \
	importlib_metadata==8.7.0
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .bench-smoke .cache
