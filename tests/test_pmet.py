"""PMET on tiny models: its targets against an independent oracle (tests/oracle_sites.py), its
residuals and solve against their equations, BLUE's two layers, and fast path == reference path."""

from __future__ import annotations

import math

import pytest
import torch

from blueedit.editing.editor import EditingConfig, Editor
from blueedit.editing.pmet import pmet_residuals
from blueedit.editing.targets import TargetConfig, optimize_targets, optimize_targets_one_by_one
from blueedit.models.adapters import ModelAdapter
from helpers import LAYERS, REQUESTS, TEMPLATES, TOP1_REQUESTS, make_model, make_tokenizer
from helpers import key_moments as _mom2
from helpers import weights_of as _weights
from oracle_sites import mlp_output, site_target

ATTN_NAMES = {"llama": "model.layers.{}.self_attn.o_proj.weight", "gpt2": "transformer.h.{}.attn.c_proj.weight"}
W_OUT_NAMES = {"llama": "model.layers.{}.mlp.down_proj.weight", "gpt2": "transformer.h.{}.mlp.c_proj.weight"}


def _pmet_editor(strategy, arch="llama", steps=3, **kw):
    model, tok = make_model(arch), make_tokenizer()
    adapter = ModelAdapter(model)
    hp = EditingConfig(method="pmet", strategy=strategy, layers=list(LAYERS),
                       target=TargetConfig(v_num_grad_steps=steps, v_lr=0.5), **kw)
    return Editor(model, tok, adapter, hp, _mom2(model, adapter, tok), TEMPLATES)


def test_pmet_residuals_formula():
    z, m = torch.randn(4, 3), torch.randn(4, 3)
    for i in range(5):
        assert torch.allclose(pmet_residuals(z, m, i, 5), (z - m) / math.sqrt(5 - i))
    assert torch.equal(pmet_residuals(z, m, 0, 1), z - m)
    with pytest.raises(ValueError):
        pmet_residuals(z, m, 5, 5)


def _compare(res, o, clamp):
    ref = torch.stack([t.deltas for t in o])
    assert res.steps.tolist() == [t.updates for t in o]
    assert ((res.site_delta - ref).norm(dim=-1) / ref.norm(dim=-1).clamp(min=1e-9) < 1e-3).all()
    zo = torch.stack([t.z for t in o])
    assert ((res.z - zo).norm(dim=1) / zo.norm(dim=1) < 1e-4).all()
    torch.testing.assert_close(res.loss, torch.tensor([t.loss for t in o]), rtol=1e-4, atol=1e-6)
    inits = torch.stack([t.inits for t in o])  # each site's δ respects its own clamp
    assert (res.site_delta.norm(dim=-1) <= clamp * inits.norm(dim=-1) * (1 + 1e-5)).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pmet_targets_equal_oracle(arch):
    """Both δ's (attention output, MLP output), optimized for all requests at once, equal the
    oracle's one-request loop."""
    model, tok = make_model(arch), make_tokenizer()
    adapter = ModelAdapter(model)
    hp = TargetConfig(v_num_grad_steps=6, v_lr=0.5)
    res = optimize_targets(model, adapter, tok, REQUESTS, 2, TEMPLATES, hp, sites=("attn", "mlp"))
    o = [site_target(model, tok, r, 2, TEMPLATES, sites=("attn", "mlp"), steps=6) for r in REQUESTS]
    assert res.site_delta.shape == (len(REQUESTS), 2, adapter.hidden_size())
    _compare(res, o, 0.75)


def test_pmet_top1_exit_equals_oracle():
    """PMET's published exit: once o* is top-1, the NLL weight drops to the factor and the request
    stops when KL < top1_kl_stop. The requests stop at different steps, as in the oracle, and
    without the exit none stops early."""
    model, tok = make_model("llama"), make_tokenizer()
    adapter = ModelAdapter(model)
    kw = dict(v_num_grad_steps=12, v_lr=0.5, v_weight_decay=0.0, early_stop_loss=0.0, clamp_norm_factor=4.0)
    hp = TargetConfig(**kw, top1_nll_factor=0.1, top1_kl_stop=10.0)
    on = optimize_targets(model, adapter, tok, TOP1_REQUESTS, 2, TEMPLATES, hp, sites=("attn", "mlp"))
    o = [site_target(model, tok, r, 2, TEMPLATES, sites=("attn", "mlp"), steps=12, v_weight_decay=0.0, early_stop=0.0,
                     clamp=4.0, top1_factor=0.1, top1_kl=10.0) for r in TOP1_REQUESTS]
    _compare(on, o, 4.0)
    assert len(set(on.steps.tolist())) > 1 and (on.steps < 11).all()
    off = optimize_targets(model, adapter, tok, TOP1_REQUESTS, 2, TEMPLATES, TargetConfig(**kw), sites=("attn", "mlp"))
    assert (off.steps == 11).all()


@pytest.mark.parametrize("strategy", ["distribute", "boundary"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pmet_round_residuals_and_normal_equations(strategy, arch):
    """Every written layer: ``R`` is ``(z_mlp − m^L) / sqrt(m − i)`` (distribute) or
    ``z_mlp^l − m^l`` (boundary) with ``m`` read by the oracle on the model as it is before that
    write, and ``ΔW (λ C_0 + H + K Kᵀ) = R Kᵀ`` (its normal equations)."""
    ed = _pmet_editor(strategy, arch)
    ed.edit_round(REQUESTS[:2])  # a history H ≠ 0 for the second round
    targets, steps = {}, []
    inner = ed.targets

    def spy(requests, layer):
        res = inner(requests, layer)
        targets[layer] = res.z.T.double()
        return res

    ed.targets = spy
    reqs = REQUESTS[2:]

    def check(step):
        z = targets[step.target_layer]
        m = torch.stack([mlp_output(ed.model, ed.tokenizer, r, step.target_layer) for r in reqs], dim=1)
        i = LAYERS.index(step.layer)
        div = math.sqrt(len(LAYERS) - i) if strategy == "distribute" else 1.0
        torch.testing.assert_close(step.residuals.double(), (z - m) / div, rtol=1e-4, atol=1e-5)
        K, R, D = step.keys.double(), step.residuals.double(), step.delta.double()
        A = ed.hp.mom2_update_weight * ed.mom2[step.layer].double() + ed.state.history[step.layer].double() + K @ K.T
        lhs, rhs = D @ A, R @ K.T
        assert (lhs - rhs).abs().max() <= 1e-8 * rhs.abs().max()
        steps.append(step.layer)

    ed.on_layer = check
    ed.edit_round(reqs)
    assert steps == ([1, 3] if strategy == "boundary" else [1, 2, 3])
    assert sorted(targets) == ([1, 3] if strategy == "boundary" else [3])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pmet_blue_changes_only_the_boundary_layers(arch):
    """Under BLUE only ``W_out`` of ``l_1`` and ``l_m`` change; no attention weight is written."""
    ed = _pmet_editor("boundary", arch)
    before = _weights(ed.model)
    ed.edit_round(REQUESTS)
    after = ed.model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == sorted(W_OUT_NAMES[arch].format(l) for l in (1, 3))
    ed2 = _pmet_editor("distribute", arch)
    before = _weights(ed2.model)
    ed2.edit_round(REQUESTS)
    after = ed2.model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == sorted(W_OUT_NAMES[arch].format(l) for l in LAYERS)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pmet_fast_path_equals_reference_path(arch):
    """Prefix cache + block replay + batching (``optimize: true``) equal the one-request,
    whole-prompt reference path, for the targets and for a whole round (both strategies)."""
    model, tok = make_model(arch), make_tokenizer()
    adapter = ModelAdapter(model)
    hp = TargetConfig(v_num_grad_steps=6, v_lr=0.5, loss_layer=4, top1_nll_factor=0.1)
    fast = optimize_targets(model, adapter, tok, REQUESTS, 2, TEMPLATES, hp, fast=True, sites=("attn", "mlp"))
    ref = optimize_targets_one_by_one(model, adapter, tok, REQUESTS, 2, TEMPLATES, hp, fast=False, sites=("attn", "mlp"))
    assert torch.equal(fast.steps, ref.steps)
    assert ((fast.site_delta - ref.site_delta).abs().max() / ref.site_delta.abs().max()).item() < 5e-4
    assert ((fast.z - ref.z).abs().max() / ref.z.abs().max()).item() < 5e-4
    for strategy in ("distribute", "boundary"):
        eds = [_pmet_editor(strategy, arch, optimize=o) for o in (True, False)]
        for ed in eds:
            ed.edit_round(REQUESTS)
        w0 = ModelAdapter(make_model(arch))  # the untouched weights
        for l in eds[0].hp.edited_layers:
            da, db = (e.adapter.get_w_out(l) - w0.get_w_out(l) for e in eds)
            assert (da - db).norm() / db.norm() < 1e-3, (strategy, l)


def test_pmet_rejects_fisher_penalty():
    with pytest.raises(ValueError, match="fisher_weight"):
        EditingConfig(method="pmet", target=TargetConfig(fisher_weight=1.0))


def test_pmet_weight_shift_error_is_measured_in_the_mlp_output_space():
    """The weight-shift-error diagnostic uses PMET's residual space: under BLUE the applied update
    is the ideal one (zero error), under distribute the early layers' is not."""
    from blueedit.callbacks.weight_shift import layer_diagnostics

    for strategy in ("boundary", "distribute"):
        ed = _pmet_editor(strategy, steps=4)
        seen = []
        ed.on_layer = lambda step, ed=ed, seen=seen: seen.append(
            (step.layer, layer_diagnostics(ed, step, contribution=False)))
        ed.edit_round(REQUESTS[:2])
        assert [l for l, _ in seen] == ed.hp.edited_layers
        for l, m in seen:
            if strategy == "boundary":
                assert m["relative"] < 1e-4 and m["cosine"] > 1 - 1e-4, (strategy, l, m)
            elif l < LAYERS[-1]:  # a fraction of a residual from L
                assert m["relative"] > 1e-2, (strategy, l, m)
