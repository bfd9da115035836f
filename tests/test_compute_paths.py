"""Speed and memory paths of a round: micro-batches give the result of one batch; a bf16 compute
copy gives (nearly) the float32 edit and mirrors every write."""

from __future__ import annotations

import pytest
import torch

from blueedit.data.records import EditRequest
from blueedit.editing.targets import TargetConfig, optimize_targets, request_chunks
from blueedit.models.adapters import ModelAdapter
from helpers import make_model, make_tokenizer

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
    hp = TargetConfig(v_num_grad_steps=6, v_lr=0.5, loss_layer=4)
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
    real = targets.Chunk.__init__

    def spy(self, req, *a, **k):
        seen.append(list(req))
        real(self, req, *a, **k)

    monkeypatch.setattr(targets.Chunk, "__init__", spy)
    model, tok = make_model("llama"), make_tokenizer()
    optimize_targets(model, ModelAdapter(model), tok, REQUESTS, 2, TEMPLATES,
                     TargetConfig(v_num_grad_steps=2), max_batch_tokens=1)
    assert seen == [[i] for i in range(len(REQUESTS))]


def _editor(arch, **kw):
    from blueedit.editing.editor import EditingConfig, Editor

    torch.manual_seed(0)
    model, tok = make_model(arch), make_tokenizer()
    adapter = ModelAdapter(model)
    layers = [1, 2]
    g = torch.Generator().manual_seed(1)
    mom2 = {}
    for l in layers:
        x = torch.randn(256, adapter.key_size(l), generator=g)
        mom2[l] = x.T @ x / 256 + torch.eye(adapter.key_size(l))  # well conditioned
    hp = EditingConfig(method="memit", strategy="boundary", layers=layers, mom2_update_weight=1.0,
                     target=TargetConfig(v_num_grad_steps=5, v_lr=0.5, loss_layer=3), **kw)
    return Editor(model, tok, adapter, hp, mom2, TEMPLATES), adapter


@pytest.mark.parametrize("arch", ["llama"])
def test_bfloat16_compute_copy_edits_like_float32(arch):
    """(The tiny GPT-2's δ optimization is chaotic at this learning rate: bf16 round-off changes
    δ's direction by tens of % while the losses agree to 1e-3, so it is not compared here.)"""
    ref, ad_ref = _editor(arch)
    bf, ad_bf = _editor(arch, compute_dtype="bfloat16")
    assert bf.compute_model is not bf.model
    assert next(bf.compute_model.parameters()).dtype == torch.bfloat16
    assert next(bf.model.parameters()).dtype == torch.float32
    w0 = {l: ad_ref.get_w_out(l) for l in (1, 2)}
    ref.edit_round(REQUESTS, 0)
    bf.edit_round(REQUESTS, 0)
    for l in (1, 2):
        d_ref = ad_ref.get_w_out(l) - w0[l]
        d_bf = ad_bf.get_w_out(l) - w0[l]
        assert d_bf.dtype == torch.float32 and d_ref.norm() > 0
        # bf16 forward passes: keys and targets carry ~3 significant digits, which the solve of a
        # tiny random model amplifies to ~0.5 %; the update keeps its direction
        assert (d_bf - d_ref).norm() / d_ref.norm() < 0.05
        assert torch.nn.functional.cosine_similarity(d_bf.flatten(), d_ref.flatten(), dim=0) > 0.97
        # the compute copy mirrors the written weights (to bf16 precision)
        assert torch.equal(bf.compute_adapter.get_w_out(l), ad_bf.get_w_out(l).to(torch.bfloat16))


def test_compute_dtype_equal_to_the_model_makes_no_copy():
    ed, _ = _editor("llama", compute_dtype="float32")
    assert ed.compute_model is ed.model


def test_compute_dtype_is_validated():
    from blueedit.editing.editor import EditingConfig

    with pytest.raises(ValueError, match="compute_dtype"):
        EditingConfig(compute_dtype="int8")
    with pytest.raises(ValueError, match="max_batch_tokens"):
        EditingConfig(max_batch_tokens=0)


def test_replay_keeps_only_the_edit_layers_input(monkeypatch):
    """After the first step the replay holds block ``first``'s input (detached) and the blocks'
    other arguments, not every later block's δ-dependent input nor a key/value cache."""
    from transformers import Cache

    from blueedit.editing import targets

    replays = []
    real = targets.BlockReplay.__init__

    def spy(self, *a, **k):
        real(self, *a, **k)
        replays.append(self)

    monkeypatch.setattr(targets.BlockReplay, "__init__", spy)
    model, tok = make_model("llama"), make_tokenizer()
    optimize_targets(model, ModelAdapter(model), tok, REQUESTS, 1, TEMPLATES,
                     TargetConfig(v_num_grad_steps=3, loss_layer=3), max_batch_tokens=None)
    assert replays and all(r.calls for r in replays)

    def tensors_and_caches(x):
        if isinstance(x, (tuple, list)):
            return [y for v in x for y in tensors_and_caches(v)]
        if isinstance(x, dict):
            return [y for v in x.values() for y in tensors_and_caches(v)]
        return [x] if isinstance(x, (torch.Tensor, Cache)) else []

    for r in replays:
        first_args, first_kw = r.calls[r.first]
        h = first_args[0] if first_args else first_kw["hidden_states"]
        assert isinstance(h, torch.Tensor) and not h.requires_grad
        for b, (args, kw) in r.calls.items():
            held = tensors_and_caches((args, kw))
            assert not any(isinstance(x, Cache) for x in held)
            if b != r.first:
                assert (args[0] if args else kw.get("hidden_states")) is None
            assert not any(x.requires_grad for x in held if isinstance(x, torch.Tensor))
