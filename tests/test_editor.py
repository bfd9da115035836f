"""Editor rounds on tiny models: batched targets, which layers are written, history, atomicity,
PRUNE post-processing, and the key-statistics cache."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from blueedit.data.records import EditRecordError, EditRequest
from blueedit.editing import solvers
from blueedit.editing.editor import EditingConfig, Editor, EditRoundError
from blueedit.editing.statistics import StatisticsCache, StatsConfig, accumulate_key_moments
from blueedit.editing.targets import TargetConfig, optimize_targets, optimize_targets_one_by_one
from blueedit.models.adapters import ModelAdapter
from helpers import CORPUS as _CORPUS
from helpers import LAYERS, REQUESTS, TEMPLATES, make_model, make_tokenizer
from helpers import tiny_editor as _editor
from helpers import weights_of as _weights
from oracle import Oracle, OracleHParams


def _rel_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).norm(dim=1) / b.norm(dim=1)


def _assert_same(before: dict, model, exclude=()) -> None:
    after = model.state_dict()
    assert set(before) == set(after)
    for k, v in before.items():
        if k in exclude:
            continue
        assert torch.equal(v, after[k]), k


# -- batched targets == the oracle's one-request-at-a-time targets ---------------------------------------
def _oracle(model, tok, hp: TargetConfig, layers=LAYERS, templates=TEMPLATES, **kw) -> Oracle:
    ohp = OracleHParams(layers=list(layers), v_num_grad_steps=hp.v_num_grad_steps, v_lr=hp.v_lr,
                        v_weight_decay=hp.v_weight_decay, kl_factor=hp.kl_factor,
                        clamp_norm_factor=hp.clamp_norm_factor, early_stop_loss=hp.early_stop_loss,
                        loss_layer=hp.loss_layer, **kw)
    return Oracle(model, tok, ohp, {}, templates)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_targets_equal_oracle(arch):
    """All requests optimized together equal the oracle, which optimizes each request alone on
    whole unpadded prompts (tests/oracle.py; it shares no code with blueedit.editing)."""
    model = make_model(arch)
    tok = make_tokenizer()
    adapter = ModelAdapter(model)
    hp = TargetConfig(v_num_grad_steps=4, v_lr=0.5)
    a = optimize_targets(model, adapter, tok, REQUESTS, 2, TEMPLATES, hp)
    o = [_oracle(model, tok, hp).target(r, 2) for r in REQUESTS]
    assert a.z.shape == (len(REQUESTS), adapter.hidden_size())
    assert (_rel_rows(a.z, torch.stack([t.z for t in o])) < 1e-4).all()
    assert torch.allclose(a.h_init, torch.stack([t.h_init for t in o]), rtol=1e-5, atol=1e-6)
    assert a.steps.tolist() == [t.updates for t in o] == [3] * len(REQUESTS)  # v_num_grad_steps − 1
    assert torch.allclose(a.loss, torch.tensor([t.loss for t in o]), rtol=1e-4)
    # δ respects the clamp
    assert (a.delta.norm(dim=1) <= hp.clamp_norm_factor * a.h_init.norm(dim=1) * (1 + 1e-5)).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_targets_equal_oracle_with_early_stops(arch):
    """Requests stop at different steps (one after two updates, others later or never): the batch
    still equals the oracle's per-request loop."""
    model = make_model(arch)
    tok = make_tokenizer()
    adapter = ModelAdapter(model)
    base = TargetConfig(v_num_grad_steps=1, v_lr=0.5, v_weight_decay=0.0, clamp_norm_factor=4.0, early_stop_loss=0.0)
    # the loss of each request after k updates (k + 1 iterations), from the oracle
    traj = torch.tensor([[_oracle(model, tok, dataclasses.replace(base, v_num_grad_steps=k + 1)).target(r, 2).loss
                          for r in REQUESTS] for k in (0, 1, 2)])  # [3, B]
    # request j stops after 2 updates: threshold between its loss after 1 and after 2 updates
    j = int(torch.argmax(traj[1] - traj[2]))
    thresh = float(traj[1, j] + traj[2, j]) / 2
    hp = dataclasses.replace(base, v_num_grad_steps=6, early_stop_loss=thresh)
    a = optimize_targets(model, adapter, tok, REQUESTS, 2, TEMPLATES, hp)
    o = [_oracle(model, tok, hp).target(r, 2) for r in REQUESTS]
    assert a.steps.tolist() == [t.updates for t in o]
    assert int(a.steps[j]) == 2
    assert (a.steps < 5).any() and (a.steps == 5).any(), a.steps  # at most 6 − 1 updates
    assert (_rel_rows(a.z, torch.stack([t.z for t in o])) < 1e-4).all()
    assert torch.allclose(a.loss, torch.tensor([t.loss for t in o]), rtol=1e-4)
    # a request that stopped at step 0 keeps δ = 0
    for i in (a.steps == 0).nonzero().flatten().tolist():
        assert torch.equal(a.delta[i], torch.zeros_like(a.delta[i]))


# -- which layers a round writes ----------------------------------------------------------------
@pytest.mark.parametrize("method", ["memit", "alphaedit", "prune", "rect"])
@pytest.mark.parametrize("strategy", ["boundary", "distribute"])
def test_round_writes_only_edited_layers(method, strategy):
    ed = _editor(method, strategy)
    before = _weights(ed.model)
    report = ed.edit_round(REQUESTS[:2])
    written = [1, 3] if strategy == "boundary" else [1, 2, 3]
    assert ed.hp.edited_layers == written
    assert sorted(report.update_norms) == written
    names = {l: f"model.layers.{l}.mlp.down_proj.weight" for l in range(6)}
    _assert_same(before, ed.model, exclude=[names[l] for l in written])
    after = ed.model.state_dict()
    for l in written:
        assert not torch.equal(before[names[l]], after[names[l]]), l
        assert report.update_norms[l] > 0
    assert ed.state.rounds_done == 1
    assert report.case_ids == [10, 11]
    steps_layers = written if strategy == "boundary" else [3]
    assert sorted(report.target_steps) == steps_layers
    if method == "rect":
        for l in written:
            delta = after[names[l]] - before[names[l]]
            frac = float((delta != 0).float().mean())
            assert frac <= ed.hp.rect_keep + 0.02
    if method == "alphaedit":
        # updates lie in the null-space projection's row space
        for l in written:
            delta = (after[names[l]] - before[names[l]]).double()
            P = ed.state.projection[l].double()
            assert torch.allclose(delta @ P, delta, atol=1e-5 * float(delta.abs().max()) + 1e-7)


def test_gpt2_boundary_round():
    ed = _editor("memit", "boundary", arch="gpt2")
    before = _weights(ed.model)
    ed.edit_round(REQUESTS[2:])
    written = {f"transformer.h.{l}.mlp.c_proj.weight" for l in (1, 3)}
    _assert_same(before, ed.model, exclude=written)
    for k in written:
        assert not torch.equal(before[k], ed.model.state_dict()[k])


# -- edit history ---------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["boundary", "distribute"])
def test_history_grows_by_keys_of_edited_model(strategy):
    ed = _editor("memit", strategy)
    layers = ed.hp.edited_layers
    for l in layers:
        assert torch.equal(ed.state.history[l], torch.zeros_like(ed.state.history[l]))
    probe = _oracle(ed.model, ed.tokenizer, ed.hp.target)  # reads keys with its own hooks, on the edited model
    ed.edit_round(REQUESTS[:2])
    H1 = {l: ed.state.history[l].clone() for l in layers}
    for l in layers:
        K = probe.keys(REQUESTS[:2], l).float()
        assert torch.allclose(H1[l], K @ K.T, rtol=1e-4, atol=1e-9)
    ed.edit_round(REQUESTS[2:])
    for l in layers:
        K2 = probe.keys(REQUESTS[2:], l).float()
        assert torch.allclose(ed.state.history[l], H1[l] + K2 @ K2.T, rtol=1e-4, atol=1e-9)
    assert ed.state.rounds_done == 2


# -- atomic rounds ----------------------------------------------------------------------------------
BAD = {
    "no_slot": dict(prompt="Toko Yasuda plays the"),
    "empty_target": dict(target_new=""),
    "blank_target": dict(target_new="   "),
    "number_target": dict(target_new=42),
    "paraphrases_string": dict(paraphrases="Toko Yasuda is a musician who plays the"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_record_raises_and_leaves_model_unchanged(case):
    ed = _editor("memit", "distribute")
    ed.edit_round(REQUESTS[2:])  # a first, good round: the state is not trivial
    before = _weights(ed.model)
    hist = {l: h.clone() for l, h in ed.state.history.items()}
    bad = dataclasses.replace(REQUESTS[0], case_id="bad-case", **BAD[case])
    with pytest.raises(EditRecordError) as ei:
        ed.edit_round([REQUESTS[1], bad])
    msg = str(ei.value)
    assert "record 1" in msg and "bad-case" in msg, msg
    _assert_same(before, ed.model)
    assert ed.state.rounds_done == 1
    for l, h in hist.items():
        assert torch.equal(h, ed.state.history[l])


def test_empty_round_raises():
    ed = _editor("memit", "boundary")
    with pytest.raises(EditRoundError):
        ed.edit_round([])


@pytest.mark.parametrize("strategy", ["distribute", "boundary"])
@pytest.mark.parametrize("how", ["solvers", "editor"])
def test_failed_solve_rolls_back_the_round(strategy, how, monkeypatch):
    ed = _editor("memit", strategy)
    ed.edit_round(REQUESTS[2:], 0)
    before = _weights(ed.model)
    hist = {l: h.clone() for l, h in ed.state.history.items()}
    calls = []
    if how == "solvers":
        real = solvers.memit_factors

        def fake(residuals, keys, mom2, history, lam):
            calls.append(1)
            left, right = real(residuals, keys, mom2, history, lam)
            return (left * float("nan"), right) if len(calls) == 2 else (left, right)

        monkeypatch.setattr(solvers, "memit_factors", fake)
    else:
        real = ed.method.solve  # the method's hook, as the round calls it

        def fake(hp, inputs, residuals, keys):
            calls.append(1)
            left, right = real(hp, inputs, residuals, keys)
            return (left * float("nan"), right) if len(calls) == 2 else (left, right)

        monkeypatch.setattr(ed.method, "solve", fake)
    with pytest.raises(EditRoundError) as ei:
        ed.edit_round(REQUESTS[:2], 1)
    msg = str(ei.value)
    assert "round 1" in msg and "10" in msg and "11" in msg, msg
    assert len(calls) == 2  # the first layer was written, then the second failed
    _assert_same(before, ed.model)
    assert ed.state.rounds_done == 1
    assert set(hist) == set(ed.state.history)
    for l, h in hist.items():
        assert torch.equal(h, ed.state.history[l])
    # the editor still works afterwards
    monkeypatch.undo()
    ed.edit_round(REQUESTS[:2], 1)
    assert ed.state.rounds_done == 2


# -- PRUNE post-processing --------------------------------------------------------------------------
def test_prune_finalize_bounds_update_and_evaluation_weights_restore():
    ed = _editor("prune", "boundary")
    ed.edit_round(REQUESTS[:2])
    # make the accumulated update large so that the restraint acts
    g = torch.Generator().manual_seed(0)
    for l in ed.hp.edited_layers:
        ed.adapter.add_to_w_out(l, 5.0 * torch.randn(ed.adapter.hidden_size(), ed.adapter.key_size(l), generator=g))
    edited = _weights(ed.model)
    expected = {}
    for l in ed.hp.edited_layers:
        W0 = ed.state.original[l].double()
        sigma = float(torch.linalg.matrix_norm(W0, ord=2))
        s = torch.linalg.svdvals(ed.adapter.get_w_out(l).double() - W0)
        assert float(s.max()) > sigma
        expected[l] = (torch.where(s > sigma, torch.log(s) - torch.log(torch.tensor(sigma, dtype=torch.float64)) + sigma, s),
                       sigma)
    with ed.evaluation_weights():
        for l in ed.hp.edited_layers:
            s_new = torch.linalg.svdvals(ed.adapter.get_w_out(l).double() - ed.state.original[l].double())
            assert torch.allclose(s_new, expected[l][0], rtol=1e-4, atol=1e-4)
    _assert_same(edited, ed.model)
    ed.finalize()
    for l in ed.hp.edited_layers:
        W0 = ed.state.original[l].double()
        sigma = expected[l][1]
        s_new = torch.linalg.svdvals(ed.adapter.get_w_out(l).double() - W0)
        assert torch.allclose(s_new, expected[l][0], rtol=1e-4, atol=1e-4)
        # bounded: log growth above sigma
        assert float(s_new.max()) < sigma + torch.log(torch.tensor(1e3)).item()
    names = {f"model.layers.{l}.mlp.down_proj.weight" for l in ed.hp.edited_layers}
    _assert_same(edited, ed.model, exclude=names)


def test_evaluation_weights_noop_for_memit():
    ed = _editor("memit", "boundary")
    ed.edit_round(REQUESTS[:1])
    before = _weights(ed.model)
    with ed.evaluation_weights():
        _assert_same(before, ed.model)
    ed.finalize()
    _assert_same(before, ed.model)


# -- key statistics ------------------------------------------------------------------------------
def _texts():
    return list(_CORPUS)


def test_single_pass_statistics_equal_per_layer(tmp_path):
    model = make_model("llama")
    tok = make_tokenizer()
    adapter = ModelAdapter(model)
    spec = StatsConfig(corpus="wikipedia-sample", num_samples=len(_CORPUS), max_length=32, batch_size=3)
    one = StatisticsCache(tmp_path / "a", "tiny").get_or_collect(model, adapter, tok, [1, 3], spec, "c", _texts,
                                                               single_pass=True)
    per = StatisticsCache(tmp_path / "b", "tiny").get_or_collect(model, adapter, tok, [1, 3], spec, "c", _texts,
                                                               single_pass=False)
    for l in (1, 3):
        assert one[l].count == per[l].count > 0
        assert one[l].mom2.dtype == torch.float32
        assert torch.allclose(one[l].mom2, per[l].mom2, rtol=1e-5, atol=1e-10)
        assert torch.allclose(one[l].mom2, one[l].mom2.T)
    # the reference: accumulate directly
    st = accumulate_key_moments(model, adapter, tok, _CORPUS, [1, 3], max_length=32)
    for l in (1, 3):
        assert torch.allclose(one[l].mom2.double(), st["sums"][l] / st["count"], rtol=1e-5, atol=1e-10)

    def boom():
        raise AssertionError("texts_fn must not be called when everything is cached")

    again = StatisticsCache(tmp_path / "a", "tiny").get_or_collect(model, adapter, tok, [1, 3], spec, "c", boom)
    for l in (1, 3):
        assert torch.equal(again[l].mom2, one[l].mom2)
    # a missing layer is collected (only that one), the cached one is loaded
    mixed = StatisticsCache(tmp_path / "a", "tiny").get_or_collect(model, adapter, tok, [1, 2], spec, "c", _texts)
    assert torch.equal(mixed[1].mom2, one[1].mom2)
    assert mixed[2].mom2.shape == (64, 64)


def test_interrupted_statistics_resume(tmp_path):
    model = make_model("llama")
    tok = make_tokenizer()
    adapter = ModelAdapter(model)
    spec = StatsConfig(corpus="wikipedia-sample", num_samples=len(_CORPUS), max_length=32, batch_size=2)  # 5 batches
    ref = StatisticsCache(tmp_path / "ref", "tiny").get_or_collect(model, adapter, tok, [1, 3], spec, "c", _texts)

    calls = [0]

    class Interrupt(Exception):
        pass

    def hook(module, args):
        calls[0] += 1
        if fail[0] and calls[0] == 3:
            raise Interrupt

    fail = [True]
    handle = model.model.layers[0].register_forward_pre_hook(hook)
    try:
        cache = StatisticsCache(tmp_path / "run", "tiny", checkpoint_every=1)
        with pytest.raises(Interrupt):
            cache.get_or_collect(model, adapter, tok, [1, 3], spec, "c", _texts)
        partial = list(cache.dir.glob("partial-*.pt"))
        assert len(partial) == 1
        assert not list(cache.dir.glob("[!p]*.pt"))  # nothing final written
        fail[0] = False
        calls[0] = 0
        res = StatisticsCache(tmp_path / "run", "tiny", checkpoint_every=1).get_or_collect(
            model, adapter, tok, [1, 3], spec, "c", _texts)
    finally:
        handle.remove()
    assert calls[0] == 3  # resumed after the two checkpointed batches
    assert not list(cache.dir.glob("partial-*.pt"))
    for l in (1, 3):
        assert res[l].count == ref[l].count
        assert torch.allclose(res[l].mom2, ref[l].mom2, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("bos", [False, True])
def test_fast_path_equals_reference_path(arch, bos):
    """The prefix-cached, block-replayed batched optimization equals the straightforward
    one-request-at-a-time path on whole prompts, with ``loss_layer`` below the last block (both
    paths must read the target log-probs there)."""
    from blueedit.editing.targets import TargetConfig, optimize_targets

    tok, model = make_tokenizer(bos=bos), make_model(arch)
    adapter = ModelAdapter(model)
    requests = [
        EditRequest(0, "{} plays the", "Toko Yasuda", "guitar", "piano"),
        EditRequest(1, "The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
        EditRequest(2, "{} is located in", "Autonomous University of Madrid", "Tokyo", "Spain"),
    ]
    templates = ["{}", "The a. {}", "Berlin. {}"]
    hp = TargetConfig(v_num_grad_steps=6, v_lr=0.5, loss_layer=3)  # below the last block (5)
    fast = optimize_targets(model, adapter, tok, requests, 2, templates, hp, fast=True)
    ref = optimize_targets_one_by_one(model, adapter, tok, requests, 2, templates, hp, fast=False)
    assert torch.equal(fast.steps, ref.steps)
    # float32 round-off of padded/cached vs whole-prompt passes (measured ≤ 2e-5 relative); reading
    # the final logits instead of loss_layer differs by ~1e-2
    torch.testing.assert_close(fast.loss, ref.loss, rtol=1e-4, atol=1e-6)
    assert ((fast.z - ref.z).abs().max() / ref.z.abs().max()).item() < 5e-4


# -- PRUNE: the evaluated "post" model is the saved model ----------------------------------------------------
def test_fit_with_prune_evaluates_the_saved_model(tmp_path, monkeypatch):
    """``fit`` restrains once (``on_train_end``); the post-edit evaluation in ``metrics.json`` must
    see exactly those weights, i.e. the model that is then saved (``module.lm``), not a second
    restraint of them."""
    import json
    import warnings

    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    import blueedit.module as module_mod
    from blueedit.data.datamodule import EditDataModule
    from blueedit.editing.statistics import StatsConfig
    from blueedit.models.loading import ModelConfig

    model_dir = tmp_path / "tiny"
    make_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    records = [
        {"case_id": i, "prompt": r.prompt, "subject": r.subject, "target_new": r.target_new,
         "target_true": r.target_true, "paraphrases": [r.prompt.replace("{}", r.subject)],
         "neighborhood": ["Berlin is in"]}
        for i, r in enumerate(REQUESTS)
    ]
    (tmp_path / "edits.json").write_text(json.dumps(records))
    # a small λ: the accumulated update outgrows σ_max(W_0), so the restraint acts
    hp = EditingConfig(method="prune", strategy="distribute", layers=list(LAYERS), mom2_update_weight=1e-3,
                     target=TargetConfig(v_num_grad_steps=4, v_lr=0.5))
    module = module_mod.EditingModule(
        model=ModelConfig(name_or_path=str(model_dir)), editing=hp, evaluate=True,
        stats=StatsConfig(corpus="model-samples", num_samples=8, max_length=32, cache_dir=str(tmp_path / "cache")),
        cache_dir=str(tmp_path / "cache"))
    evaluated, finalized = [], []
    real_eval = module_mod.evaluate_requests

    def recording_eval(lm, *args, **kwargs):
        evaluated.append({l: module.adapter.get_w_out(l) for l in LAYERS})
        return real_eval(lm, *args, **kwargs)

    real_finalize = Editor.finalize

    def recording_finalize(self):
        before = {l: self.adapter.get_w_out(l) for l in LAYERS}
        real_finalize(self)
        finalized.append((before, {l: self.adapter.get_w_out(l) for l in LAYERS}))

    monkeypatch.setattr(module_mod, "evaluate_requests", recording_eval)
    monkeypatch.setattr(Editor, "finalize", recording_finalize)
    dm = EditDataModule(dataset=str(tmp_path / "edits.json"), format="user", edits_per_round=2)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=CSVLogger(str(tmp_path), name="run"),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=dm)
    assert len(finalized) == 1 and len(evaluated) == 2  # pre, post
    unrestrained, restrained = finalized[0]
    assert any(not torch.allclose(unrestrained[l], restrained[l], atol=1e-5) for l in LAYERS)  # it acted
    saved = {l: module.adapter.get_w_out(l) for l in LAYERS}
    for l in LAYERS:
        assert torch.equal(saved[l], restrained[l]), l
        assert torch.equal(evaluated[-1][l], saved[l]), l
    # and metrics.json's "post" is the evaluation of the saved model
    summary = json.loads((Path(trainer.log_dir) / "metrics.json").read_text())
    again = real_eval(module.lm, module.tokenizer, dm.eval_requests()).metrics
    for name in ("efficacy", "generalization", "specificity"):
        assert summary["metrics"][name]["post"] == pytest.approx(again[name]), name
