"""Diagnostic callbacks (weight shift error, hidden-state drift, progress, general capability),
run reports, and ``validate`` / ``test`` on a saved model, all on tiny random models."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch

from blueedit.callbacks.drift import HiddenStateDrift, drift_metrics, load_probes, probe_states
from blueedit.callbacks.progress import EditProgress, GeneralCapability
from blueedit.callbacks.weight_shift import WeightShiftError, injected_target_prob, layer_diagnostics
from blueedit.data.records import EditRequest
from blueedit.editing.editor import EditingConfig, Editor
from blueedit.editing.statistics import accumulate_key_moments
from blueedit.editing.targets import TargetConfig
from blueedit.evaluation.reports import write_report
from blueedit.models.adapters import ModelAdapter
from helpers import CORPUS, make_model, make_tokenizer
from oracle import Model as OracleModel

LAYERS = [1, 2, 3]
TEMPLATES = ["{}", "Because I said so. {}"]
REQUESTS = [
    EditRequest(0, "{} plays the", "Toko Yasuda", "violin", "guitar"),
    EditRequest(1, "{} is in", "The Eiffel Tower", "Rome", "Paris"),
]
KNOWN = [
    {"known_id": 0, "subject": "Toko Yasuda", "attribute": "guitar", "template": "{} plays the",
     "prompt": "Toko Yasuda plays the"},
    {"known_id": 1, "subject": "Danielle Darrieux", "attribute": "French", "template": "{} speaks",
     "prompt": "Danielle Darrieux spoke"},
    {"known_id": 2, "subject": "Apple A5", "attribute": "Apple", "template": "{} was created by",
     "prompt": "Apple A5 was created by"},
]


def _editor(strategy: str) -> Editor:
    model, tok = make_model("llama"), make_tokenizer()
    adapter = ModelAdapter(model)
    st = accumulate_key_moments(model, adapter, tok, CORPUS, LAYERS, max_length=32, batch_size=4)
    mom2 = {l: (st["sums"][l] / st["count"]).float() for l in LAYERS}
    hp = EditingConfig(method="memit", strategy=strategy, layers=list(LAYERS), mom2_update_weight=1.0,
                     target=TargetConfig(v_num_grad_steps=5))
    return Editor(model, tok, adapter, hp, mom2, TEMPLATES)


@pytest.mark.parametrize("strategy", ["boundary", "distribute"])
def test_weight_shift_error_zero_at_blue_boundaries_positive_for_distribute(strategy: str) -> None:
    editor = _editor(strategy)
    seen = []
    editor.on_layer = lambda step: seen.append((step, layer_diagnostics(editor, step)))
    editor.edit_round(REQUESTS, 0)
    assert [s.layer for s, _ in seen] == editor.hp.edited_layers
    for step, m in seen:
        assert set(m) >= {"frobenius", "spectral", "relative", "cosine", "contribution_distributed",
                          "contribution_computed", "contribution_base"}
        if strategy == "boundary":
            assert m["relative"] < 1e-6 and m["cosine"] > 1 - 1e-6
            assert m["contribution_distributed"] == pytest.approx(m["contribution_computed"], rel=1e-6)
        elif step.layer < LAYERS[-1]:  # middle / first layers get a fraction of a residual from L
            assert m["relative"] > 1e-3
            assert m["cosine"] < 1 - 1e-3


def test_layer_diagnostics_leave_the_edit_unchanged() -> None:
    """The same round with and without the hook writes bit-identical weights."""
    plain, probed = _editor("distribute"), _editor("distribute")
    probed.on_layer = lambda step: layer_diagnostics(probed, step)
    plain.edit_round(REQUESTS, 0)
    probed.edit_round(REQUESTS, 0)
    for l in LAYERS:
        assert torch.equal(plain.adapter.get_w_out(l), probed.adapter.get_w_out(l))


def test_contribution_score_is_target_probability() -> None:
    editor = _editor("boundary")
    base = injected_target_prob(editor.model, editor.adapter, editor.tokenizer, REQUESTS, 1, None)
    zero = injected_target_prob(editor.model, editor.adapter, editor.tokenizer, REQUESTS, 1,
                                torch.zeros(len(REQUESTS), editor.adapter.hidden_size()))
    assert base.shape == (2,) and torch.all((base > 0) & (base < 1))
    assert torch.allclose(base, zero)


def test_drift_zero_before_and_positive_after_edit(tmp_path: Path) -> None:
    path = tmp_path / "known.json"
    path.write_text(json.dumps(KNOWN))
    probes = load_probes(path, 2)
    assert [p.prompt for p in probes] == ["{} plays the", "{} spoke"]  # from 'prompt', not 'template'
    editor = _editor("boundary")
    module = types.SimpleNamespace(lm=editor.model, adapter=editor.adapter, tokenizer=editor.tokenizer,
                                   hp=editor.hp, editor=editor)
    cb = HiddenStateDrift(probe_file=str(path), num_probes=3)
    probes3 = load_probes(path, 3)
    m = OracleModel(editor.model, editor.tokenizer)

    def top1_hits():  # first attribute token is the argmax after the filled prompt (one unpadded pass)
        hits = []
        for p in probes3:
            logits, _, _ = m.run(list(editor.tokenizer(p.prompt.replace("{}", p.subject))["input_ids"]))
            hits.append(int(logits[-1].argmax()) == m.target_ids(p.target_new)[0])
        return 100.0 * sum(hits) / len(hits)

    def states():  # h^L at the fact token of the bare prompt
        out = []
        for p in probes3:
            ids, fact = m.encode(p.prompt, p.subject)
            _, hs, _ = m.run(ids, hidden=[LAYERS[-1]])
            out.append(hs[LAYERS[-1]][fact].double())
        return torch.stack(out)

    with torch.no_grad():
        acc0, h0 = top1_hits(), states()
    pre = cb.baseline(module, probes3)
    assert pre["l2"] == 0 and pre["relative"] == 0 and pre["cosine"] == pytest.approx(1.0)
    assert pre["probe_accuracy"] == pytest.approx(acc0)
    editor.edit_round([EditRequest(5, "{} plays the", "Toko Yasuda", "violin", "guitar")], 0)
    post = cb.measure(module)
    with torch.no_grad():
        acc1, h1 = top1_hits(), states()
    dist = (h1 - h0).norm(dim=1)
    assert post["l2"] == pytest.approx(float(dist.mean()), rel=1e-4) and post["l2"] > 0
    assert post["relative"] == pytest.approx(float((dist / h0.norm(dim=1)).mean()), rel=1e-4)
    assert post["cosine"] == pytest.approx(float(torch.nn.functional.cosine_similarity(h1, h0, dim=1).mean()), abs=1e-6)
    assert post["probe_accuracy"] == pytest.approx(acc1)
    h = probe_states(editor.model, editor.adapter, editor.tokenizer, cb.probes, LAYERS[-1])
    assert drift_metrics(h, h)["l2"] == 0


def _fake_summary() -> dict:
    return {
        "method": "memit", "strategy": "boundary", "layers": [1, 3], "num_edits": 4, "rounds": 2,
        "edit_seconds": 1.5, "kind": "counterfact",
        "metrics": {"efficacy": {"pre": 10.0, "post": 100.0}, "specificity": {"pre": 90.0, "post": None}},
        "records": {"pre": [{"case_id": i, "efficacy": False} for i in range(4)],
                    "post": [{"case_id": i, "efficacy": True} for i in range(4)]},
    }


def _fake_callbacks() -> list:
    progress = EditProgress()
    progress.history = [{"round": r, "seconds": 0.1, "edits_done": 2 * (r + 1), "update_norms": {1: 0.5},
                         "efficacy": 50.0 + 25 * r} for r in range(3)]
    drift = HiddenStateDrift()
    drift.history = [{"round": r, "l2": 0.1 * (r + 1), "relative": 0.01 * (r + 1), "cosine": 1 - 0.001 * (r + 1),
                      "probe_accuracy": 80.0 - 5 * (r + 1)} for r in range(-1, 3)]
    general = GeneralCapability()
    general.history = [{"round": r, "perplexity": 20.0 + r,
                        "tasks": {t: {"main": 0.5 + 0.01 * r, "accuracy": 0.5} for t in ("sst2", "mmlu")}}
                       for r in (-1, 1, 2)]
    wse = WeightShiftError()
    wse.history = [{"round": r, "layer": l, "target_layer": 3,
                    "metrics": {"relative": 0.1 * (3 - l) * (r + 1), "frobenius": 1.0, "spectral": 0.5,
                                "cosine": 0.5 + 0.1 * l, "contribution_distributed": 0.1,
                                "contribution_computed": 0.9}}
                   for r in range(3) for l in LAYERS]
    return [progress, drift, general, wse]


def test_report_files(tmp_path: Path) -> None:
    paths = write_report(tmp_path, _fake_summary(), _fake_callbacks())
    names = {p.name for p in paths}
    assert names == {"records.jsonl", "metrics.md", "metrics_by_round.png", "weight_shift_error.png",
                     "hidden_state_drift.png"}
    for p in paths:
        assert p.is_file() and p.stat().st_size > 0
        if p.suffix == ".png":
            assert p.read_bytes()[:4] == b"\x89PNG"
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0]) == {"case_id": 0, "pre": {"efficacy": False},
                                                       "post": {"efficacy": True}}
    md = (tmp_path / "metrics.md").read_text()
    for heading in ("Editing metrics", "General capability", "Hidden-state drift", "Weight shift error"):
        assert heading in md


def test_report_without_callbacks_skips_plots(tmp_path: Path) -> None:
    paths = write_report(tmp_path, _fake_summary(), [])
    assert {p.name for p in paths} == {"records.jsonl", "metrics.md"}


# -- Trainer level ------------------------------------------------------------------------------


def _tiny_module(tmp_path: Path, strategy: str = "distribute", evaluate: bool = True):
    from blueedit.editing.statistics import StatsConfig
    from blueedit.models.loading import ModelConfig
    from blueedit.module import EditingModule

    model_dir = tmp_path / "tiny"
    if not model_dir.is_dir():
        make_model("llama").save_pretrained(model_dir)
        make_tokenizer().save_pretrained(model_dir)
    hp = EditingConfig(method="memit", strategy=strategy, layers=list(LAYERS), mom2_update_weight=1.0,
                     target=TargetConfig(v_num_grad_steps=3))
    return EditingModule(
        model=ModelConfig(name_or_path=str(model_dir)), editing=hp, evaluate=evaluate,
        stats=StatsConfig(corpus="model-samples", num_samples=8, max_length=32, cache_dir=str(tmp_path / "cache")),
        cache_dir=str(tmp_path / "cache"),
    )


def _trainer(tmp_path: Path, callbacks=()):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    return L.Trainer(max_epochs=1, num_sanity_val_steps=0, enable_model_summary=False, use_distributed_sampler=False,
                     log_every_n_steps=1, accelerator="cpu", devices=1, enable_checkpointing=False,
                     logger=CSVLogger(tmp_path / "logs", name="run"), callbacks=list(callbacks),
                     default_root_dir=tmp_path, enable_progress_bar=False)


def _records(path: Path, uneven: bool = False) -> Path:
    """The first 4 example records; ``uneven``: records with 1, 4, 2, 2 paraphrases and 1, 3, 3, 3
    neighborhood prompts, so that averaging per record differs from pooling all prompts."""
    src = Path(__file__).resolve().parents[1] / "src/blueedit/data/examples/example_edits.json"
    recs = json.loads(src.read_text())[:4]
    if uneven:
        recs[0]["paraphrases"] = recs[0]["paraphrases"][:1]
        recs[0]["neighborhood"] = recs[0]["neighborhood"][:1]
        recs[1]["paraphrases"] = recs[1]["paraphrases"] + [p.replace(".", "") for p in recs[2]["paraphrases"]]
    path.write_text(json.dumps(recs))
    return path


def test_trainer_smoke_with_callbacks(tmp_path: Path) -> None:
    from blueedit.data.datamodule import EditDataModule

    known = tmp_path / "known.json"
    known.write_text(json.dumps(KNOWN))
    module = _tiny_module(tmp_path)
    dm = EditDataModule(dataset=str(_records(tmp_path / "edits.json")), edits_per_round=2)
    wse, drift, progress = WeightShiftError(every_n_rounds=2), HiddenStateDrift(probe_file=str(known)), EditProgress()
    general = GeneralCapability(every_n_rounds=1, num_examples=4, perplexity_texts=0, data_dir=str(tmp_path / "none"))
    trainer = _trainer(tmp_path, [wse, drift, progress, general])
    with pytest.warns(UserWarning, match="no such|not found|general-capability"):
        trainer.fit(module, datamodule=dm)
    assert module.editor.on_layer is None  # hook removed after the diagnosed round
    assert [h["round"] for h in wse.history] == [0, 0, 0]  # round 0 only, layers 1..3
    assert [h["layer"] for h in wse.history] == LAYERS
    assert [h["round"] for h in drift.history] == [-1, 0, 1]
    assert drift.history[0]["l2"] == 0 and drift.history[-1]["l2"] > 0
    assert [h["round"] for h in progress.history] == [0, 1]
    assert progress.history[-1]["edits_done"] == 4 and progress.history[0]["efficacy"] is not None
    log_dir = Path(trainer.log_dir)
    metrics_csv = (log_dir / "metrics.csv").read_text()
    for key in ("wse/relative/layer1", "drift/relative", "progress/efficacy", "edit/seconds"):
        assert key in metrics_csv
    for name in ("metrics.json", "metrics.md", "records.jsonl", "metrics_by_round.png",
                 "weight_shift_error.png", "hidden_state_drift.png"):
        assert (log_dir / name).stat().st_size > 0, name


def test_validate_saved_model_writes_eval_metrics(tmp_path: Path) -> None:
    """``validate`` / ``test`` on the loaded model, evaluated in chunks of 3 prompts, give the metrics
    of the independent scorer in tests/oracle.py (one unpadded forward pass per prompt, each metric
    averaged per record first, then over records)."""
    from blueedit.data.datamodule import EditDataModule
    from oracle import counterfact_metrics

    module = _tiny_module(tmp_path, evaluate=False)
    records = _records(tmp_path / "edits.json", uneven=True)
    dm = EditDataModule(dataset=str(records))
    dm.eval_chunk_size = 3
    trainer = _trainer(tmp_path)
    out = trainer.validate(module, datamodule=dm)
    path = Path(trainer.log_dir) / "eval_metrics.json"
    saved = json.loads(path.read_text())
    assert saved["num_records"] == 4 and saved["kind"] == "counterfact" and len(saved["records"]) == 4
    requests = [EditRequest(r["case_id"], r["prompt"], r["subject"], r["target_new"], r["target_true"],
                            tuple(r["paraphrases"]), tuple(r["neighborhood"]))
                for r in json.loads(records.read_text())]
    expected = counterfact_metrics(module.lm, module.tokenizer, requests)
    # the data tells the per-record average from pooling all prompts
    pooled = counterfact_metrics(module.lm, module.tokenizer, requests, pooled=True)
    assert abs(pooled["generalization"] - expected["generalization"]) > 1
    assert abs(pooled["specificity"] - expected["specificity"]) > 1
    for k, v in expected.items():
        assert saved["metrics"][k] == pytest.approx(v), k
        assert out[0][f"val/{k}"] == pytest.approx(v), k
    trainer = _trainer(tmp_path)
    out = trainer.test(module, datamodule=dm)
    for k, v in expected.items():
        assert out[0][f"test/{k}"] == pytest.approx(v), k
