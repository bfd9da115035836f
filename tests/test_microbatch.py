"""The memory budget of the target optimization: micro-batches give the result of one batch."""

from __future__ import annotations

import pytest
import torch

from blueedit.data.records import EditRequest
from blueedit.editing.targets import TargetHParams, optimize_targets, request_chunks
from blueedit.models.adapters import ModelAdapter
from conftest import make_model, make_tokenizer

TEMPLATES = ["{}", "Because I said so. {}", "The end. {}"]
REQUESTS = [
    EditRequest(10, "{} plays the", "Toko Yasuda", "violin", "guitar"),
    EditRequest(11, "The mother tongue of {} is", "Thomas Joannes Stieltjes", "French", "Dutch"),
    EditRequest(12, "{} is located in", "Autonomous University of Madrid", "Tokyo Beijing", "Spain"),
    EditRequest(13, "{} is in", "The Eiffel Tower", "Rome", "Paris"),
    EditRequest(14, "{} was born in", "Alan Turing", "Sydney", "London"),
]


def test_request_chunks_respect_the_budget():
    costs = [(3, 4), (3, 6), (3, 2), (3, 10)]
    # padded positions: [0,1] -> 6 rows x 6 = 36 ; [2] -> 3 x 2 = 6 ... with budget 36
    assert request_chunks(costs, 36) == [[0, 1], [2], [3]]
    assert request_chunks(costs, None) == [[0, 1, 2, 3]]
    assert request_chunks(costs, 1) == [[0], [1], [2], [3]]  # over budget alone: one each
    assert request_chunks(costs, 10_000) == [[0, 1, 2, 3]]
    for budget in (12, 20, 40, 70):
        for chunk in request_chunks(costs, budget):
            cost = sum(costs[i][0] for i in chunk) * max(costs[i][1] for i in chunk)
            assert len(chunk) == 1 or cost <= budget


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("fast", [True, False])
def test_micro_batches_equal_one_batch(arch, fast):
    torch.manual_seed(0)
    model = make_model(arch)
    tok = make_tokenizer()
    adapter = ModelAdapter(model)
    hp = TargetHParams(v_num_grad_steps=6, v_lr=0.5, loss_layer=4)
    one = optimize_targets(model, adapter, tok, REQUESTS, 2, TEMPLATES, hp, fast=fast)
    for budget in (1, 60):
        micro = optimize_targets(model, adapter, tok, REQUESTS, 2, TEMPLATES, hp, fast=fast, max_batch_tokens=budget)
        assert torch.equal(micro.steps, one.steps)
        # padding differs between batch layouts, which changes float32 round-off (~1e-5 relative
        # per forward) that 5 Adam steps can amplify; a real difference would be O(1)
        assert ((micro.z - one.z).norm(dim=1) / one.z.norm(dim=1)).max() < 5e-4
        assert torch.allclose(micro.loss, one.loss, rtol=1e-4, atol=1e-6)
        assert torch.allclose(micro.h_init, one.h_init, atol=1e-6)
    assert (one.z - one.h_init).norm() > 0  # the optimization did move


def test_micro_batching_really_splits(monkeypatch):
    """The budget is honoured: with a budget of 1 every request is a micro-batch of its own."""
    from blueedit.editing import targets

    seen = []
    real = targets._Chunk.__init__

    def spy(self, req, *a, **k):
        seen.append(list(req))
        real(self, req, *a, **k)

    monkeypatch.setattr(targets._Chunk, "__init__", spy)
    model, tok = make_model("llama"), make_tokenizer()
    optimize_targets(model, ModelAdapter(model), tok, REQUESTS, 2, TEMPLATES,
                     TargetHParams(v_num_grad_steps=2), max_batch_tokens=1)
    assert seen == [[i] for i in range(len(REQUESTS))]
