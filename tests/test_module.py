"""Lightning-level editing runs on a tiny saved llama model (no SmolLM2): fit, metrics.json,
and checkpoint-resume giving the same weights as an uninterrupted run."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from blueedit.data.datamodule import EditDataModule
from blueedit.editing.editor import EditingConfig
from blueedit.editing.statistics import StatsConfig
from blueedit.editing.targets import TargetConfig
from blueedit.models.loading import ModelConfig
from blueedit.module import EditingModule
from conftest import make_model, make_tokenizer

RECORDS = [
    {"case_id": 0, "prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": "violin",
     "target_true": "guitar", "paraphrases": ["Toko Yasuda is known for playing the"],
     "neighborhood": ["Danielle Darrieux plays the"]},
    {"case_id": 1, "prompt": "The mother tongue of {} is", "subject": "Thomas Joannes Stieltjes",
     "target_new": "French", "target_true": "Dutch", "paraphrases": ["Thomas Joannes Stieltjes spoke"],
     "neighborhood": ["The mother tongue of Danielle Darrieux is"]},
    {"case_id": 2, "prompt": "{} is located in", "subject": "Autonomous University of Madrid",
     "target_new": "Tokyo", "target_true": "Spain", "paraphrases": ["Autonomous University of Madrid is in"],
     "neighborhood": ["The Eiffel Tower is located in"]},
    {"case_id": 3, "prompt": "{} is in", "subject": "The Eiffel Tower", "target_new": "Rome",
     "target_true": "Paris", "paraphrases": ["The Eiffel Tower stands in"],
     "neighborhood": ["Berlin is in"]},
    {"case_id": 4, "prompt": "{} follows the religion of", "subject": "Edwin of Northumbria",
     "target_new": "Android", "target_true": "Christianity", "paraphrases": ["Edwin of Northumbria believes in"],
     "neighborhood": ["Danielle Darrieux follows the religion of"]},
    {"case_id": 5, "prompt": "{} was created by", "subject": "Apple A5", "target_new": "Google",
     "target_true": "Apple", "paraphrases": ["Apple A5 is made by"],
     "neighborhood": ["Android was created by"]},
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A saved tiny llama model + tokenizer, the edits file, and a shared statistics cache."""
    root = tmp_path_factory.mktemp("module")
    model_dir = root / "tiny-llama"
    make_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    (root / "edits.json").write_text(json.dumps(RECORDS))
    return root


def _module(root: Path, strategy: str = "boundary", method: str = "memit", evaluate: bool = False) -> EditingModule:
    """``method`` ``hse``: MEMIT with HSE's three options on (forgetting, full Fisher, inverse schedule)."""
    hse = method == "hse"
    editing = EditingConfig(method="memit" if hse else method, strategy=strategy, layers=[1, 2, 3],
                            history_schedule="inverse" if hse else "constant",
                            target=TargetConfig(v_num_grad_steps=3, v_lr=0.5, **(
                                {"forget_weight": 0.5, "fisher_weight": 10.0, "fisher_estimator": "full"} if hse else {})))
    stats = StatsConfig(corpus="model-samples", num_samples=4, max_length=32, batch_size=4,
                      cache_dir=str(root / "cache"))
    return EditingModule(model=ModelConfig(name_or_path=str(root / "tiny-llama")), editing=editing, stats=stats,
                         evaluate=evaluate, eval_batch_size=8)


def _data(root: Path, num_edits: int | None = None) -> EditDataModule:
    return EditDataModule(dataset=str(root / "edits.json"), format="user", num_edits=num_edits, edits_per_round=2)


def _trainer(**kw) -> L.Trainer:
    opts = dict(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False)
    opts.update(kw)
    return L.Trainer(**opts)


def _fit(module, data, **kw):
    trainer = _trainer(**{k: v for k, v in kw.items() if k != "ckpt_path"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=data, ckpt_path=kw.get("ckpt_path"))
    return trainer


def test_fit_writes_metrics(workdir, tmp_path, capsys):
    from blueedit.data.records import EditRequest
    from oracle import counterfact_metrics

    module = _module(workdir, "boundary", evaluate=True)
    before = {l: module.adapter.get_w_out(l) for l in range(6)}
    requests = [EditRequest(r["case_id"], r["prompt"], r["subject"], r["target_new"], r["target_true"],
                            tuple(r["paraphrases"]), tuple(r["neighborhood"])) for r in RECORDS]
    expected = {"pre": counterfact_metrics(module.lm, module.tokenizer, requests)}  # independent scorer
    data = _data(workdir)
    trainer = _fit(module, data, logger=CSVLogger(str(tmp_path), name="run"))
    assert trainer.global_step == 3 == data.num_rounds
    assert module.editor.state.rounds_done == 3
    assert len(module.reports) == 3
    for l in range(6):
        changed = not torch.equal(before[l], module.adapter.get_w_out(l))
        assert changed == (l in (1, 3)), l
    path = Path(trainer.log_dir) / "metrics.json"
    assert path.is_file()
    printed = capsys.readouterr().out  # the table reaches the terminal after the progress bars close
    assert "| metric | protocol | pre | post |" in printed and f"metrics written to {path}" in printed
    summary = json.loads(path.read_text())
    assert summary["num_edits"] == 6 and summary["rounds"] == 3
    assert summary["strategy"] == "boundary" and summary["layers"] == [1, 3]
    expected["post"] = counterfact_metrics(module.lm, module.tokenizer, requests)
    for name in ("efficacy", "generalization", "specificity"):
        assert set(summary["metrics"][name]) == {"pre", "post", "protocol"}
        assert summary["metrics"][name]["protocol"] == "teacher forcing"
        for when in ("pre", "post"):
            assert summary["metrics"][name][when] == pytest.approx(expected[when][name]), (name, when)
    # the statistics were cached on disk
    assert list((workdir / "cache" / "stats").rglob("*.safetensors"))


class _StopAfterRound(Callback):
    def __init__(self, path: Path, batch_idx: int = 1):
        self.path, self.batch_idx = path, batch_idx

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.batch_idx:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


class _SeenRounds(Callback):
    def __init__(self):
        self.rounds = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rounds.append((batch.index, batch_idx))


@pytest.mark.parametrize("strategy, method", [("boundary", "memit"), ("distribute", "alphaedit"), ("boundary", "hse"),
                                              ("distribute", "pmet")])
def test_checkpoint_resume_gives_identical_weights(workdir, tmp_path, strategy, method):
    # A: uninterrupted, 3 rounds
    a = _module(workdir, strategy, method)
    ta = _fit(a, _data(workdir))
    assert ta.global_step == 3

    # B: stopped after round 1 (0-based) with a checkpoint, then resumed in a fresh process-like setup
    ckpt = tmp_path / "mid.ckpt"
    b1 = _module(workdir, strategy, method)
    tb1 = _fit(b1, _data(workdir), callbacks=[_StopAfterRound(ckpt)])
    assert ckpt.is_file()
    assert b1.editor.state.rounds_done == 2
    assert tb1.global_step == 2
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert set(saved["state_dict"]) == {f"w_out.{l}" for l in a.hp.edited_layers}
    assert saved["blueedit"]["editor"]["rounds_done"] == 2

    b2 = _module(workdir, strategy, method)
    seen = _SeenRounds()
    tb2 = _fit(b2, _data(workdir), ckpt_path=str(ckpt), callbacks=[seen])
    assert tb2.global_step == 3
    assert seen.rounds == [(2, 2)]  # the resumable loader hands over round 2 at step 2, to callbacks too
    assert b2.editor.state.rounds_done == 3
    assert len(b2.reports) == 3

    for l in range(a.adapter.num_layers):
        wa, wb = a.adapter.get_w_out(l), b2.adapter.get_w_out(l)
        assert torch.allclose(wa, wb, rtol=0, atol=1e-6), l
    # the rest of the model is untouched in both
    sa, sb = a.lm.state_dict(), b2.lm.state_dict()
    for k in sa:
        assert torch.allclose(sa[k], sb[k], rtol=0, atol=1e-6), k
    assert sorted(a.editor.state.history) == sorted(b2.editor.state.history)
    for l, H in a.editor.state.history.items():
        assert torch.allclose(H, b2.editor.state.history[l], rtol=1e-6, atol=1e-9), l
    for l, P in a.editor.state.projection.items():
        assert torch.equal(P, b2.editor.state.projection[l])
    assert a.editor.state.context_templates == b2.editor.state.context_templates
    # HSE's state: the Fisher sums per target layer and n
    assert sorted(a.editor.state.fisher) == sorted(b2.editor.state.fisher) == ([1, 3] if method == "hse" else [])
    for l, F in a.editor.state.fisher.items():
        assert torch.allclose(F, b2.editor.state.fisher[l], rtol=1e-5, atol=1e-9), l
    assert a.editor.state.total_rounds == b2.editor.state.total_rounds == 3
