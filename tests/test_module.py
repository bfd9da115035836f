"""Lightning-level editing runs on a tiny saved llama model (no SmolLM2): fit, metrics.json,
and checkpoint-resume giving the same weights as an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from helpers import RECORDS, StopAfterRound, write_tiny_workdir
from helpers import fit as _fit
from helpers import tiny_data as _data
from helpers import tiny_module as _module


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A saved tiny llama model + tokenizer, the edits file, and a shared statistics cache."""
    return write_tiny_workdir(tmp_path_factory.mktemp("module"))


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
    tb1 = _fit(b1, _data(workdir), callbacks=[StopAfterRound(ckpt)])
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
