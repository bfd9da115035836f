"""``blueedit --help`` names every method and subcommand; ``edit --help`` / ``fit --help`` fit in
250 lines with the editing options and only the Trainer options that matter for editing;
``--help-all`` lists everything."""

from __future__ import annotations

import pytest

from blueedit.cli import main
from blueedit.cli_help import EDITING_TRAINER_OPTIONS, PLAIN_COMMANDS, method_names, summary

LIMIT = 250


def _help(args, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "80")  # the narrowest usual terminal: the most lines
    monkeypatch.setattr("sys.argv", ["blueedit"])
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_names_every_method_and_subcommand(capsys, monkeypatch):
    text = " ".join(_help(["--help"], capsys, monkeypatch).split())
    assert set(method_names()) >= {"memit", "alphaedit", "prune", "rect", "pmet", "wise"}
    for name in (*method_names(), "HSE", "boundary", "fit", "validate", "test", "edit", *PLAIN_COMMANDS):
        assert name in text, name


@pytest.mark.parametrize("command", ["edit", "fit"])
def test_short_help(command, capsys, monkeypatch):
    text = _help([command, "--help"], capsys, monkeypatch)
    lines = text.splitlines()
    assert len(lines) <= LIMIT, len(lines)
    options = {line.split()[0].split("=")[0].rstrip(",") for line in lines if line.startswith("  --")}
    for wanted in ("--model.editing.method", "--model.editing.strategy", "--model.editing.layers",
                   "--model.editing.target.loss_layer", "--model.model.name_or_path", "--model.stats.num_samples",
                   "--data.dataset", "--data.edits_per_round", "--help-all"):
        assert wanted in options, wanted
    trainer = {o.removeprefix("--trainer.") for o in options if o.startswith("--trainer.")}
    assert trainer == EDITING_TRAINER_OPTIONS, trainer ^ EDITING_TRAINER_OPTIONS
    assert ("--edits" in options) == (command == "edit")
    assert "``" not in text and ":class:" not in text  # the docstrings' markup is plain text here


def test_help_all_lists_every_option(capsys, monkeypatch):
    text = _help(["edit", "--help-all"], capsys, monkeypatch)
    for wanted in ("--trainer.max_epochs", "--trainer.gradient_clip_val", "--trainer.accumulate_grad_batches",
                   "--model.editing.method", "--edits", "(type: float, default: 0.0625)"):
        assert wanted in text, wanted
    assert len(text.splitlines()) > 3 * LIMIT


def test_summary_is_the_first_sentence_in_plain_text():
    assert summary("λ, weight of ``C_0`` in the MEMIT solve. More text.") == "λ, weight of C_0 in the MEMIT solve."
    assert summary("see :class:`~blueedit.models.loading.ModelConfig` here") == "see ModelConfig here."
    assert summary("ℛ = ``[l_1 .. l_m]``.") == "ℛ = [l_1 .. l_m]."
    assert summary("a projection (e.g. ``o_proj``). Next.") == "a projection (e.g. o_proj)."
    assert summary(None) == "" and summary("") == ""
