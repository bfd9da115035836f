"""Health-gated rounds: a round whose signal crosses the threshold is undone bit for bit and its
edits are listed as refused; the next rounds go on."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from blueedit import carry
from blueedit.callbacks.health import HealthGate, crosses
from blueedit.config import UserInputError
from blueedit.editing.editor import EditorState
from helpers import fit as _fit
from helpers import tiny_data as _data
from helpers import tiny_module as _module
from helpers import write_tiny_workdir


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A saved tiny llama model + tokenizer, the edits file, and a shared statistics cache."""
    return write_tiny_workdir(tmp_path_factory.mktemp("health"))


def test_crosses():
    assert crosses(3.0, 2.0, 1.4) == (True, 1.5)
    assert crosses(3.0, 2.0, 1.5) == (False, 1.5)
    assert crosses(math.nan, 2.0, 10.0)[0] and crosses(math.inf, 2.0, 10.0)[0]


class _Weights(Callback):
    """The edited weights and edit history before and after every round."""

    def __init__(self):
        self.before, self.after, self.history = {}, {}, {}

    @staticmethod
    def _w(pl_module):
        return {l: pl_module.adapter.get_w_out(l).clone() for l in pl_module.hp.edited_layers}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[batch.index] = self._w(pl_module)
        self.history[batch.index] = {l: h.clone() for l, h in pl_module.editor.state.history.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[batch.index] = self._w(pl_module)


def _same(a, b) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_refused_rounds_are_undone_bit_for_bit_and_listed(workdir, tmp_path):
    module = _module(workdir, strategy="distribute")
    weights = _Weights()
    gate = HealthGate(signal="update_norm", max_ratio=1e-9)  # round 0 is the reference; every later round crosses
    _fit(module, _data(workdir), callbacks=[weights, gate], default_root_dir=str(tmp_path))
    assert [h["refused"] for h in gate.history] == [False, True, True]
    assert not _same(weights.before[0], weights.after[0])  # round 0 did edit
    for r in (1, 2):
        assert _same(weights.after[r], weights.before[r])  # undone exactly
        assert _same(module.editor.state.history, weights.history[r])
    state = module.editor.state
    assert state.rounds_done == 3 and state.updates[1] == {} and state.updates[2] == {} and state.updates[0]
    assert [r["case_ids"] for r in gate.refused] == [[2, 3], [4, 5]]
    saved = json.loads((tmp_path / "refused_edits.json").read_text())
    assert saved["refused_case_ids"] == [2, 3, 4, 5] and "update_norm" in saved["refused"][0]["reason"]


def test_perplexity_gate_keeps_the_unedited_model_when_every_round_crosses(workdir, tmp_path):
    module = _module(workdir, strategy="boundary")
    original = {l: module.adapter.get_w_out(l).clone() for l in module.hp.edited_layers}
    texts = ["The Eiffel Tower is in Paris, the capital of France.", "Toko Yasuda plays the guitar and the piano."]
    gate = HealthGate(signal="perplexity", max_ratio=1e-9, texts=texts)
    _fit(module, _data(workdir, num_edits=4), callbacks=[gate], default_root_dir=str(tmp_path))
    assert gate.reference > 1 and [h["refused"] for h in gate.history] == [True, True]
    assert _same({l: module.adapter.get_w_out(l) for l in original}, original)
    assert all(torch.count_nonzero(h) == 0 for h in module.editor.state.history.values())


def test_a_state_with_refused_rounds_is_saved_and_read_back(tmp_path):
    from blueedit.editing.updates import LayerUpdate

    def update(v: float) -> LayerUpdate:
        return LayerUpdate(torch.full((3, 1), v, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64),
                           torch.ones(2, 1))

    u = update(2.0)
    state = EditorState(history={0: torch.ones(2, 2)}, original={0: torch.zeros(3, 2)}, rounds_done=3,
                        updates=[{0: update(1.0)}, {}, {0: u}])
    (tmp_path / "d").mkdir()
    carry.write_state(carry.state_path(tmp_path / "d"), state, {})
    back, _ = carry.read_state(tmp_path / "d")
    assert back.rounds_done == 3 and back.updates[1] == {} and torch.equal(back.updates[2][0].left, u.left)


def test_gate_refuses_what_it_cannot_undo(workdir):
    module = _module(workdir, method="hse")
    with pytest.raises(UserInputError, match="Fisher"):  # the CLI prints it on one line
        HealthGate().setup(SimpleNamespace(callbacks=[]), module, "fit")
    with pytest.raises(UserInputError, match="max_ratio"):
        HealthGate(max_ratio=0)
    with pytest.raises(ValueError, match="signal"):
        HealthGate(signal="loss")
