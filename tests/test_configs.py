"""Every YAML under ``configs/`` is parsed and instantiated through the CLI (the Trainer is not
run, and no weights are loaded: the model loader is replaced by a tiny random model)."""

from __future__ import annotations

from pathlib import Path

import pytest

import blueedit.module
from blueedit.cli import run_cli
from blueedit.data.datamodule import EditDataModule
from blueedit.module import EditingModule
from conftest import REPO, make_model, make_tokenizer

CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml"))
#: Configs that are not complete runs: combined with a method config, as their header says.
PARTIAL = {"configs/diagnostics.yaml": "configs/smollm2-135m/memit.yaml"}


def test_every_config_is_listed():
    assert len(CONFIGS) >= 20, CONFIGS  # the glob found the config tree


@pytest.fixture(scope="module")
def tiny_deep():
    return make_model("llama", n_layer=48), make_tokenizer()


@pytest.fixture
def no_weights(monkeypatch, tiny_deep):
    """``load_model_and_tokenizer`` returns a tiny random Llama deep enough for any config's
    layers; records which models the configs asked for."""
    asked = []

    def fake(spec, cache_dir=None):
        asked.append(spec)
        return tiny_deep

    monkeypatch.setattr(blueedit.module, "load_model_and_tokenizer", fake)
    return asked


@pytest.mark.parametrize("config", CONFIGS)
def test_config_instantiates(config, no_weights, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr("sys.argv", ["blueedit"])
    configs = [PARTIAL[config], config] if config in PARTIAL else [config]
    args = [a for c in configs for a in ("--config", c)] + [f"--trainer.default_root_dir={tmp_path}"]
    cli = run_cli(args, run=False)
    assert isinstance(cli.model, EditingModule) and isinstance(cli.datamodule, EditDataModule)
    assert len(no_weights) == 1 and no_weights[0].name_or_path
    text = (REPO / config).read_text()
    hp = cli.model.hp
    if "method:" in text:  # the config's choices reached the module
        assert f"method: {hp.method}" in text
    if "strategy:" in text:
        assert f"strategy: {hp.strategy}" in text
    assert cli.trainer is not None
    if config in PARTIAL:
        assert len(cli.trainer.callbacks) > 3


def test_evaluated_model_dir_name(tmp_path):
    from blueedit.cli import evaluated_model_dir_name

    (tmp_path / "edited").mkdir()
    assert evaluated_model_dir_name(f"{tmp_path / 'edited'}/") == "edited"
    assert evaluated_model_dir_name("gpt2-xl") == "gpt2-xl"
    assert evaluated_model_dir_name("meta-llama/Meta-Llama-3-8B") == "meta-llama--Meta-Llama-3-8B"
