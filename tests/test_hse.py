"""HSE's options on tiny models (docs/algorithms.md, "HSE"): all off is MEMIT bit for bit, the
forgetting term lowers p(old answer), the Fisher penalty shrinks δ along high-Fisher directions,
the schedule weights the history in the solve, bad input fails early, and a resumed editor
continues identically."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from blueedit.data.records import EditRecordError, EditRequest
from blueedit.editing import hse
from blueedit.editing.editor import EditingConfig, Editor, EditorState
from blueedit.editing.targets import TargetConfig, optimize_targets
from blueedit.models.adapters import ModelAdapter
from helpers import LAYERS, REQUESTS, TEMPLATES, TOP1_REQUESTS, make_model, make_tokenizer
from helpers import key_moments as _mom2
from helpers import weights_of as _weights
from oracle_sites import p_answer, site_target


def _editor(strategy="distribute", arch="llama", target=None, model=None, **kw):
    model = model or make_model(arch)
    tok = make_tokenizer()
    adapter = ModelAdapter(model)
    hp = EditingConfig(method="memit", strategy=strategy, layers=list(LAYERS),
                       target=target or TargetConfig(v_num_grad_steps=3, v_lr=0.5), **kw)
    return Editor(model, tok, adapter, hp, _mom2(model, adapter, tok), TEMPLATES)


# -- pure functions ---------------------------------------------------------------------------------
def test_history_weight_schedule():
    assert hse.history_weight("constant", 5, None) == 1.0
    assert hse.history_weight("inverse", 0, 10) == 1.0  # H = 0 in the first round
    assert [hse.history_weight("inverse", i, 10) for i in (1, 2, 4, 10)] == [10.0, 5.0, 2.5, 1.0]
    with pytest.raises(ValueError, match="number of rounds"):
        hse.history_weight("inverse", 3, None)


def test_fisher_estimate_and_penalty():
    g = torch.randn(5, 4, dtype=torch.float64)
    full = sum(torch.outer(r, r) for r in g)
    torch.testing.assert_close(hse.fisher_estimate(g, "full"), full)
    torch.testing.assert_close(hse.fisher_estimate(g, "diagonal"), torch.diagonal(full))
    d = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(hse.fisher_penalty(d, full), torch.stack([0.5 * r @ full @ r for r in d]))
    torch.testing.assert_close(hse.fisher_penalty(d, torch.diagonal(full)),
                               torch.stack([0.5 * r @ torch.diag(torch.diagonal(full)) @ r for r in d]))


# -- everything off == MEMIT ----------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["distribute", "boundary"])
def test_all_options_off_is_memit_bit_for_bit(strategy):
    """Zero forgetting weight, zero Fisher weight, and the ``inverse`` schedule where it gives
    α = 1 (a stream of one round seen twice: α_2 = 1/1) leave every bit of MEMIT's two rounds."""
    memit = _editor(strategy)
    off = _editor(strategy, target=TargetConfig(v_num_grad_steps=3, v_lr=0.5, forget_weight=0.0, fisher_weight=0.0,
                                                fisher_estimator="full"), history_schedule="inverse")
    off.set_total_rounds(1)
    for ed in (memit, off):
        ed.edit_round(REQUESTS[:2])
        ed.edit_round(REQUESTS[2:])
    a, b = memit.model.state_dict(), off.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert off.state.fisher == {}


# -- memory-directed forgetting ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_forgetting_term_equals_oracle_and_lowers_p_old(arch):
    """The unlikelihood term on the old answer: the batched optimization equals the oracle, and
    with it the edited hidden state gives the old answer a lower probability than without it."""
    model, tok = make_model(arch), make_tokenizer()
    adapter = ModelAdapter(model)
    kw = dict(v_num_grad_steps=8, v_lr=0.5, v_weight_decay=0.0, clamp_norm_factor=4.0, early_stop_loss=0.0)
    runs = {}
    for w in (0.0, 10.0):
        res = optimize_targets(model, adapter, tok, TOP1_REQUESTS, 2, TEMPLATES, TargetConfig(**kw, forget_weight=w))
        o = [site_target(model, tok, r, 2, TEMPLATES, steps=8, v_weight_decay=0.0, clamp=4.0, early_stop=0.0,
                         forget_weight=w) for r in TOP1_REQUESTS]
        zo = torch.stack([t.z for t in o])
        assert ((res.z - zo).norm(dim=1) / zo.norm(dim=1) < 1e-4).all()
        torch.testing.assert_close(res.loss, torch.tensor([t.loss for t in o]), rtol=1e-4, atol=1e-6)
        runs[w] = [p_answer(model, tok, r, r.target_true, 2, ("block",), res.delta[i:i + 1])
                   for i, r in enumerate(TOP1_REQUESTS)]
    for p_plain, p_forget in zip(runs[0.0], runs[10.0]):
        assert p_forget < p_plain, (p_plain, p_forget)


def test_forgetting_needs_target_true_and_fails_before_editing():
    ed = _editor(target=TargetConfig(v_num_grad_steps=2, forget_weight=0.5))
    before = _weights(ed.model)
    bad = [REQUESTS[0], EditRequest(99, "{} is in", "The Eiffel Tower", "Rome")]
    with pytest.raises(EditRecordError, match=r"edit record 1 \(case_id=99\).*target_true.*forget_weight"):
        ed.edit_round(bad)
    assert all(torch.equal(v, ed.model.state_dict()[k]) for k, v in before.items())
    assert ed.state.rounds_done == 0


# -- Fisher-guided stability ------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["full", "diagonal"])
def test_fisher_penalty_shrinks_delta_along_high_fisher_directions(estimator):
    """With ``F`` large along one direction ``e`` (δ's own direction without the penalty), the
    optimized δ has a much smaller component along ``e``; the orthogonal part changes less."""
    model, tok = make_model("llama"), make_tokenizer()
    adapter = ModelAdapter(model)
    hp = TargetConfig(v_num_grad_steps=10, v_lr=0.1, v_weight_decay=0.0, clamp_norm_factor=4.0, early_stop_loss=0.0)
    free = optimize_targets(model, adapter, tok, TOP1_REQUESTS[:1], 2, TEMPLATES, hp)
    d = free.delta[0]
    if estimator == "full":
        e = d / d.norm()
        F = 10.0 * torch.outer(e, e)
    else:  # the coordinates where δ is largest
        e = torch.zeros_like(d)
        top = d.abs().topk(4).indices
        e[top] = d[top]
        e = e / e.norm()
        F = torch.zeros_like(d)
        F[top] = 10.0
    pen = optimize_targets(model, adapter, tok, TOP1_REQUESTS[:1], 2, TEMPLATES, hp, fisher=F)
    p = pen.delta[0]
    along_free, along_pen = float(d @ e), float(p @ e)
    assert abs(along_pen) < 0.5 * abs(along_free), (along_free, along_pen)
    o = site_target(model, tok, TOP1_REQUESTS[0], 2, TEMPLATES, steps=10, v_lr=0.1, v_weight_decay=0.0, clamp=4.0,
                    early_stop=0.0, fisher=F)
    assert (p - o.deltas[0]).norm() / o.deltas[0].norm() < 1e-3


def test_round_fisher_is_the_empirical_fisher_of_the_edit_nll():
    """The state's ``F`` after a round is ``Σ_b g_b g_bᵀ`` with ``g_b = ∇_δ NLL_b`` at the final δ
    (oracle autograd, one request at a time), at the target layer only; the next round uses it."""
    tp = TargetConfig(v_num_grad_steps=3, v_lr=0.5, fisher_weight=1.0, fisher_estimator="full")
    ed = _editor("distribute", target=tp)
    model0 = copy.deepcopy(ed.model)
    ed.edit_round(REQUESTS[:2])
    assert sorted(ed.state.fisher) == [3]
    o = [site_target(model0, ed.tokenizer, r, 3, TEMPLATES, steps=3) for r in REQUESTS[:2]]
    G = torch.stack([t.grad for t in o]).double()
    ref = G.T @ G
    assert (ed.state.fisher[3].double() - ref).norm() / ref.norm() < 1e-3
    seen = {}
    inner = ed.targets

    def spy(requests, layer):
        seen[layer] = ed.state.fisher.get(layer)
        return inner(requests, layer)

    ed.targets = spy
    ed.edit_round(REQUESTS[2:])
    assert seen[3] is not None  # the second round optimized under the first round's F


def test_boundary_keeps_one_fisher_per_target_layer():
    tp = TargetConfig(v_num_grad_steps=2, v_lr=0.5, fisher_weight=1.0)
    ed = _editor("boundary", target=tp)
    ed.edit_round(REQUESTS[:2])
    assert sorted(ed.state.fisher) == [1, 3]
    assert all(f.shape == (32,) for f in ed.state.fisher.values())


# -- parameter replay --------------------------------------------------------------------------------------
def test_inverse_schedule_weights_the_history_in_the_solve():
    """Round 2 of a 4-round stream solves ``ΔW (λ C_0 + α H + K Kᵀ) = R Kᵀ`` with α = 4/1."""
    ed = _editor("distribute", history_schedule="inverse")
    ed.set_total_rounds(4)
    ed.edit_round(REQUESTS[:2])
    H1 = {l: h.clone() for l, h in ed.state.history.items()}
    checked = []

    def check(step):
        K, R, D = step.keys.double(), step.residuals.double(), step.delta.double()
        A = ed.hp.mom2_update_weight * ed.mom2[step.layer].double() + 4.0 * H1[step.layer].double() + K @ K.T
        assert (D @ A - R @ K.T).abs().max() <= 1e-8 * (R @ K.T).abs().max()
        A1 = A - 3.0 * H1[step.layer].double()  # α = 1 would not solve it
        assert (D @ A1 - R @ K.T).abs().max() > 1e-4 * (R @ K.T).abs().max()
        checked.append(step.layer)

    ed.on_layer = check
    ed.edit_round(REQUESTS[2:])
    assert checked == LAYERS


def test_inverse_schedule_needs_the_stream_length():
    ed = _editor(history_schedule="inverse")
    before = _weights(ed.model)
    with pytest.raises(ValueError, match="number of rounds"):
        ed.edit_round(REQUESTS[:1])
    assert all(torch.equal(v, ed.model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="history_schedule"):
        EditingConfig(method="alphaedit", history_schedule="inverse")


def test_fit_fails_early_without_target_true(tmp_path, monkeypatch):
    """``blueedit fit`` with forgetting on records without ``target_true``: the error names the
    record and the option, raised in setup before the key statistics are collected."""
    import blueedit.module as bm
    from blueedit.data.datamodule import EditDataModule
    from blueedit.module import EditingModule

    model, tok = make_model("llama"), make_tokenizer()
    monkeypatch.setattr(bm, "load_model_and_tokenizer", lambda spec, cache_dir=None: (model, tok))
    called = []
    monkeypatch.setattr(bm, "build_editor", lambda *a, **k: called.append(a))
    path = tmp_path / "edits.json"
    import json

    path.write_text(json.dumps([{"prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": "violin"}]))
    hp = EditingConfig(layers=list(LAYERS), target=TargetConfig(forget_weight=1.0))
    module = EditingModule(editing=hp, evaluate=False)
    dm = EditDataModule(dataset=str(path), edits_per_round=1)

    class T:
        datamodule = dm
        strategy = None

    module._trainer = T()
    with pytest.raises(EditRecordError, match="target_true.*forget_weight"):
        module.setup("fit")
    assert not called


# -- resume -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["distribute", "boundary"])
def test_resume_is_identical(strategy):
    """Three rounds straight equal one round, a save (state dict + weights), a fresh editor on a
    fresh model, and two more rounds: weights, history, Fisher state, n and the round counter."""
    tp = TargetConfig(v_num_grad_steps=3, v_lr=0.5, forget_weight=0.5, fisher_weight=10.0, fisher_estimator="full")
    reqs = [dataclasses.replace(r) for r in REQUESTS] + [EditRequest(14, "{} plays the", "Danielle Darrieux", "piano",
                                                                     "guitar")]
    rounds = [reqs[:2], reqs[2:4], reqs[4:]]
    straight = _editor(strategy, target=tp, history_schedule="inverse")
    straight.set_total_rounds(3)
    for r in rounds:
        straight.edit_round(r)

    first = _editor(strategy, target=tp, history_schedule="inverse")
    first.set_total_rounds(3)
    first.edit_round(rounds[0])
    saved_state = first.state.to_dict()
    saved_weights = {k: v.clone() for k, v in first.model.state_dict().items()}
    assert saved_state["fisher"] and saved_state["total_rounds"] == 3

    model = make_model("llama")
    resumed = _editor(strategy, target=tp, history_schedule="inverse", model=model)
    resumed.state = EditorState.from_dict(saved_state)
    model.load_state_dict(saved_weights)
    for r in rounds[1:]:
        resumed.edit_round(r)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for l in straight.state.history:
        assert torch.equal(straight.state.history[l], resumed.state.history[l])
    assert sorted(straight.state.fisher) == sorted(resumed.state.fisher)
    for l in straight.state.fisher:
        assert torch.equal(straight.state.fisher[l], resumed.state.fisher[l])
    assert resumed.state.rounds_done == straight.state.rounds_done == 3
    with pytest.raises(ValueError, match="3 rounds"):
        resumed.set_total_rounds(5)


def test_hse_configs_set_the_preset():
    """configs/smollm2-135m/hse.yaml is MEMIT with exactly the options of ``hse.PRESET`` (what the
    benchmarks run as ``hse``)."""
    import yaml

    from helpers import REPO

    cfg = yaml.safe_load((REPO / "configs" / "smollm2-135m" / "hse.yaml").read_text())["model"]["editing"]
    assert cfg["method"] == "memit" and cfg["strategy"] == "distribute"
    assert {k: cfg[k] for k in hse.PRESET["editing"]} == hse.PRESET["editing"]
    assert {k: cfg["target"][k] for k in hse.PRESET["target"]} == hse.PRESET["target"]


def test_checkpoint_settings_leave_out_default_new_options(monkeypatch):
    """A run with the new options at their defaults has the settings fingerprint of a run written
    before they existed (so older checkpoints still resume); a set option is part of it."""
    import blueedit.module as bm
    from blueedit.module import EditingModule

    monkeypatch.setattr(bm, "load_model_and_tokenizer", lambda spec, cache_dir=None: (make_model("llama"),
                                                                                       make_tokenizer()))
    plain = EditingModule(editing=EditingConfig(layers=list(LAYERS)), evaluate=False).settings_fingerprint()
    assert "history_schedule" not in plain["editing"] and "forget_weight" not in plain["editing"]["target"]
    assert "top1_nll_factor" not in plain["editing"]["target"]
    assert "wise" not in plain["editing"]  # WISE's settings only count for method 'wise'
    wise = EditingModule(editing=EditingConfig(method="wise", layers=[LAYERS[0]]), evaluate=False)
    assert wise.settings_fingerprint()["editing"]["wise"]["n_iter"] == wise.hp.wise.n_iter
    on = EditingModule(editing=EditingConfig(layers=list(LAYERS), history_schedule="inverse",
                                             target=TargetConfig(forget_weight=0.5)), evaluate=False)
    fp = on.settings_fingerprint()
    assert fp["editing"]["history_schedule"] == "inverse" and fp["editing"]["target"]["forget_weight"] == 0.5


def test_sequence_benchmark_runs_presets():
    """blueedit.bench.sequence accepts ``pmet`` and ``hse`` runs and writes their options into the
    generated config."""
    from helpers import benchmark as _load

    seq = _load("sequence")
    cfg = seq.editing_config("hse", "boundary")
    assert cfg["method"] == "memit" and cfg["strategy"] == "boundary"
    assert cfg["history_schedule"] == "inverse" and cfg["target"] == hse.PRESET["target"]
    assert seq.editing_config("pmet", "distribute") == {"method": "pmet", "strategy": "distribute",
                                                        "target": {"top1_nll_factor": 0.1}}
    assert seq.editing_config("memit", "distribute") == {"method": "memit", "strategy": "distribute"}


def test_weight_shift_diagnostics_leave_the_fisher_state_alone():
    """The diagnostic's extra target optimizations do not count as the round's Fisher estimate."""
    from blueedit.callbacks.weight_shift import layer_diagnostics

    tp = TargetConfig(v_num_grad_steps=2, v_lr=0.5, fisher_weight=1.0)
    plain, probed = _editor("distribute", target=tp), _editor("distribute", target=tp)
    probed.on_layer = lambda step: layer_diagnostics(probed, step, contribution=False)
    plain.edit_round(REQUESTS[:2])
    probed.edit_round(REQUESTS[:2])
    assert sorted(probed.state.fisher) == sorted(plain.state.fisher) == [3]
    assert torch.equal(probed.state.fisher[3], plain.state.fisher[3])
