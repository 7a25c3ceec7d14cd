# Two set-up commands: `make demo` and `make test`. Both create (or reuse) .venv and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# Where there is no CUDA, install the CPU build of torch first; an unpinned torch pulls a multi-GB CUDA build.
TORCH_CPU := torch==2.13.0

.PHONY: venv test demo check lint clean

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

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
