"""Shared fixtures: tiny random models with a tiny BPE tokenizer (from ``helpers``), the torch
threads of real-model tests, the benchmark data directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import REPO, make_model, make_tokenizer

# Tiny models gain nothing from threads, and several OpenMP pools on a 2-core machine spin
# against each other (a 100x slow-down); real-model tests raise this with `torch_threads`.
torch.set_num_threads(1)


@pytest.fixture
def torch_threads():
    """Use every core for the duration of a real-model test."""
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(before)

@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model(request):
    return make_model(request.param)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The benchmark data directory: ``$BLUEEDIT_DATA_DIR`` or ``../shared/data`` beside the repo."""
    d = Path(os.environ.get("BLUEEDIT_DATA_DIR", REPO.parent / "shared" / "data"))
    if not d.is_dir():
        message = f"benchmark data directory {d} not found (set BLUEEDIT_DATA_DIR)"
        if os.environ.get("CI"):  # CI has ../shared beside the checkout: never pass by skipping
            pytest.fail(message)
        pytest.skip(message)
    return d
