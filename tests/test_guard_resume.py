"""Resume refuses to mix runs: another data stream or other settings is an error naming them."""

from __future__ import annotations

import json

import pytest
import torch

from blueedit.data.datamodule import EditDataModule, ResumeMismatchError
from helpers import RECORDS, StopAfterRound, write_tiny_workdir
from helpers import fit as _fit
from helpers import tiny_data as _data
from helpers import tiny_module as _module


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return write_tiny_workdir(tmp_path_factory.mktemp("resume-workdir"))


@pytest.fixture(scope="module")
def checkpoint(workdir, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("resume") / "mid.ckpt"
    _fit(_module(workdir), _data(workdir), callbacks=[StopAfterRound(ckpt, batch_idx=0)])
    assert ckpt.is_file()
    return ckpt


def _resume(module, data, ckpt):
    return _fit(module, data, ckpt_path=str(ckpt))


def test_resume_with_another_dataset_fails(workdir, checkpoint, tmp_path):
    other = tmp_path / "other.json"
    other.write_text(json.dumps(list(reversed(RECORDS))))  # same records, another order
    data = EditDataModule(dataset=str(other), format="user", edits_per_round=2)
    with pytest.raises(ResumeMismatchError, match="data.dataset"):
        _resume(_module(workdir), data, checkpoint)
    same_name = workdir / "edits.json"
    original = same_name.read_text()
    try:  # the same file name with other content
        same_name.write_text(json.dumps(RECORDS[:1] + [{**RECORDS[1], "target_new": "German"}] + RECORDS[2:]))
        with pytest.raises(ResumeMismatchError, match="differ in content or order"):
            _resume(_module(workdir), _data(workdir), checkpoint)
    finally:
        same_name.write_text(original)


def test_resume_with_other_rounds_fails(workdir, checkpoint):
    data = EditDataModule(dataset=str(workdir / "edits.json"), format="user", edits_per_round=3)
    with pytest.raises(ResumeMismatchError, match="data.edits_per_round: 2 in the checkpoint, 3 now"):
        _resume(_module(workdir), data, checkpoint)
    with pytest.raises(ResumeMismatchError, match="data.num_edits: None in the checkpoint, 4 now"):
        _resume(_module(workdir), _data(workdir, num_edits=4), checkpoint)


def test_resume_with_other_settings_fails(workdir, checkpoint):
    module = _module(workdir)
    module.hp.mom2_update_weight = 100.0
    with pytest.raises(ResumeMismatchError, match=r"editing.mom2_update_weight: 1500.0 in the checkpoint, 100.0 now"):
        _resume(module, _data(workdir), checkpoint)
    module = _module(workdir, strategy="distribute")
    with pytest.raises(ResumeMismatchError, match="editing.strategy: 'boundary' in the checkpoint, 'distribute' now"):
        _resume(module, _data(workdir), checkpoint)


def test_resume_with_the_same_stream_and_a_speed_setting_changed(workdir, checkpoint):
    module = _module(workdir)
    module.hp.key_batch_size = 3  # changes speed, not results
    trainer = _resume(module, _data(workdir), checkpoint)
    assert trainer.global_step == 3 and module.editor.state.rounds_done == 3


def test_resume_with_another_memory_budget_and_an_older_checkpoint(workdir, checkpoint):
    # checkpoints written before editing.max_batch_tokens became a speed setting recorded it
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["blueedit"]["settings"]["editing"]["max_batch_tokens"] = 2048
    older = workdir / "older.ckpt"
    torch.save(ckpt, older)
    module = _module(workdir)
    module.hp.max_batch_tokens = 64  # changes memory, not results
    trainer = _resume(module, _data(workdir), older)
    assert trainer.global_step == 3 and module.editor.state.rounds_done == 3
