"""Every YAML under ``configs/`` and ``examples/`` is parsed and instantiated through the CLI, as
its header's ``# Run:`` line combines it (the Trainer is not run, and no weights are loaded: the
model loader is replaced by a tiny random model). The composed settings are checked against a
plain merge of the YAML files, the headers against the provenance rules, and the ``needs-locate``
warning through ``blueedit fit``."""

from __future__ import annotations

import itertools
import shlex
import warnings
from pathlib import Path

import pytest
import yaml

import blueedit.module
from blueedit.cli import main, run_cli
from blueedit.config_headers import (
    PUBLISHED,
    PlaceholderLayersWarning,
    header,
    placeholder_layers,
    placeholder_warnings,
)
from blueedit.data.datamodule import EditDataModule
from blueedit.module import EditingModule
from helpers import REPO, make_model, make_tokenizer

ALL_CONFIGS = sorted(p.relative_to(REPO).as_posix()
                     for folder in ("configs", "examples") for p in (REPO / folder).rglob("*.yaml"))
#: Configs of the vision track (``model.class_path`` in ``blueedit.vision``): their own test below.
VISION_CONFIGS = [c for c in ALL_CONFIGS if c.startswith("configs/vit-")]
CONFIGS = [c for c in ALL_CONFIGS if c not in VISION_CONFIGS]
MODEL_CONFIGS = [c for c in CONFIGS if c.count("/") == 2 and c.startswith("configs/")]


def run_line(config: str) -> list[str]:
    """The arguments of the config's ``# Run: blueedit fit ...`` header line (after ``fit``), or
    ``--config CONFIG`` when it has none."""
    for line in header((REPO / config).read_text()):
        if line.startswith("# Run: blueedit fit "):
            return shlex.split(line.removeprefix("# Run: blueedit fit "))
    return ["--config", config]


def config_files(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == "--config"]


def merged(files: list[str]) -> dict:
    """The YAML files merged key by key, later files winning (what jsonargparse should build)."""
    def merge(into: dict, new: dict) -> dict:
        for key, value in new.items():
            into[key] = merge(dict(into.get(key) or {}), value) if isinstance(value, dict) else value
        return into

    out: dict = {}
    for f in files:
        merge(out, yaml.safe_load((REPO / f).read_text()) or {})
    return out


def test_every_config_is_listed():
    assert len(CONFIGS) >= 30 and "examples/slurm/llama3_8b_ddp.yaml" in CONFIGS, CONFIGS
    assert "configs/blue.yaml" in CONFIGS and len(MODEL_CONFIGS) >= 25


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
    args = run_line(config)
    files = config_files(args)
    assert config in files, f"{config}: its Run line does not name it"
    if merged(files).get("trainer", {}).get("accelerator") == "gpu":  # a cluster example: on this machine's CPU
        args = args + ["--trainer.accelerator=cpu", "--trainer.strategy=auto", "--trainer.devices=1",
                       "--trainer.num_nodes=1"]
    cli = run_cli(args + [f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert isinstance(cli.model, EditingModule) and isinstance(cli.datamodule, EditDataModule)
    assert not no_weights  # the model is loaded in configure_model, not when the module is made
    cli.model.configure_model()  # what Lightning calls first in every stage: loads and checks the layers
    assert len(no_weights) == 1 and no_weights[0].name_or_path
    # the composed settings reached the module: every editing value the files set, the last file winning
    overrides = dict(zip(args[::2], args[1::2]))
    expected = merged(files).get("model", {}).get("editing", {})
    hp = cli.model.hp
    if "--model.editing.strategy" in overrides:
        expected["strategy"] = overrides["--model.editing.strategy"]
    for key in ("method", "strategy", "layers", "mom2_update_weight", "L2"):
        if key in expected:
            assert getattr(hp, key) == expected[key], (config, key)
    for key, value in expected.get("target", {}).items():
        assert getattr(hp.target, key) == value, (config, key)
    assert cli.trainer is not None
    if config == "configs/diagnostics.yaml":
        assert len(cli.trainer.callbacks) > 3


def test_no_config_differs_from_another_only_in_strategy():
    """BLUE is an override or an overlay, never a copy of a method config."""
    def without_strategy(config):
        cfg = yaml.safe_load((REPO / config).read_text())
        cfg.get("model", {}).get("editing", {}).pop("strategy", None)
        cfg.get("trainer", {}).pop("default_root_dir", None)
        return cfg

    whole = {c: without_strategy(c) for c in CONFIGS if len(config_files(run_line(c))) == 1}
    copies = [(a, b) for a, b in itertools.combinations(whole, 2) if whole[a] == whole[b]]
    assert not copies, copies
    assert not [c for c in CONFIGS if c.endswith("_blue.yaml") and len(config_files(run_line(c))) == 1]


@pytest.mark.parametrize("config", MODEL_CONFIGS)
def test_model_config_names_its_source(config):
    """A model config says where its settings come from: a published file (repo, path, commit),
    a search on the real weights, or the needs-locate mark; an overlay builds on a config of its
    own model's folder."""
    text = (REPO / config).read_text()
    lines = header(text)
    files = config_files(run_line(config))
    if len(files) > 1:  # an overlay
        assert all(f.startswith(config.rsplit("/", 1)[0] + "/") for f in files), files
        return
    published = PUBLISHED.findall("\n".join(lines))
    located = [line for line in lines if line.startswith("# Located: ")]
    marked = placeholder_layers(text) is not None
    assert (len(published) == 1) + bool(located) + marked == 1, (config, lines)
    if published:
        assert published[0][0] in {"xpq-tech/BLUE", "zjunlp/EasyEdit", "jianghoucheng/AlphaEdit"}, published


def test_blue_overlays_change_little():
    """``configs/blue.yaml`` sets the strategy only; a model's BLUE overlay sets the strategy and
    what its published BLUE file changes, nothing else."""
    assert yaml.safe_load((REPO / "configs/blue.yaml").read_text()) == {"model": {"editing": {"strategy": "boundary"}}}
    for config in CONFIGS:
        files = config_files(run_line(config))
        if len(files) > 1 and config != "configs/diagnostics.yaml":
            editing = yaml.safe_load((REPO / config).read_text())["model"]["editing"]
            assert editing["strategy"] == "boundary" and len(editing) <= 3, (config, editing)


def test_placeholder_warnings_are_about_unchanged_layers():
    marked = "configs/qwen3-8b/memit.yaml"
    text = (REPO / marked).read_text()
    layers = placeholder_layers(text)
    assert layers and len(layers) == 5
    assert len(placeholder_warnings([(marked, text)], layers)) == 1
    assert placeholder_warnings([(marked, text)], [layer + 1 for layer in layers]) == []
    assert placeholder_warnings([(marked, text)], None) == []
    published = "configs/qwen2.5-7b/memit.yaml"
    assert placeholder_layers((REPO / published).read_text()) is None
    unmarked = text.replace("# needs-locate:", "# Located:")
    assert placeholder_warnings([(marked, unmarked)], layers) == []


@pytest.mark.parametrize("layers, warned", [(None, True), ("[1,2,3,4,5]", False)])
def test_fit_warns_on_placeholder_layers(layers, warned, tmp_path, monkeypatch, capsys):
    """``blueedit fit`` with a needs-locate config: the warning comes before any slow work (here
    the run then stops on a missing records file, before loading the model)."""
    monkeypatch.chdir(REPO)
    args = ["fit", "--config", "configs/qwen3-8b/memit.yaml", f"--trainer.default_root_dir={tmp_path}",
            "--data.dataset", str(tmp_path / "absent.jsonl")]
    if layers:
        args += ["--model.editing.layers", layers]
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit) as e:
        warnings.simplefilter("always")
        main(args)
    assert e.value.code == 2 and "absent.jsonl" in capsys.readouterr().err
    messages = [str(w.message) for w in caught if issubclass(w.category, PlaceholderLayersWarning)]
    assert len(messages) == int(warned), messages
    if warned:
        assert "configs/qwen3-8b/memit.yaml" in messages[0] and "blueedit locate" in messages[0]


def test_published_configs_match_their_files_values():
    """Spot check of values taken from the published files (read from them when writing the
    configs): EasyEdit's Qwen2.5-7B AlphaEdit file and BLUE's GPT-J AlphaEdit + BLUE file."""
    qwen = merged(["configs/qwen2.5-7b/alphaedit.yaml"])["model"]["editing"]
    assert (qwen["layers"], qwen["mom2_update_weight"], qwen["L2"]) == ([4, 5, 6, 7, 8], 15000, 1)
    assert (qwen["target"]["clamp_norm_factor"], qwen["target"]["v_lr"], qwen["target"]["loss_layer"]) == (4, 0.5, 27)
    gptj = merged(["configs/gpt-j-6b/alphaedit.yaml", "configs/gpt-j-6b/alphaedit_blue.yaml"])["model"]["editing"]
    assert (gptj["strategy"], gptj["L2"], gptj["layers"][0], gptj["layers"][-1]) == ("boundary", 95, 3, 8)


def test_evaluated_model_dir_name(tmp_path):
    from blueedit.cli import evaluated_model_dir_name

    (tmp_path / "edited").mkdir()
    assert evaluated_model_dir_name(f"{tmp_path / 'edited'}/") == "edited"
    assert evaluated_model_dir_name("gpt2-xl") == "gpt2-xl"
    assert evaluated_model_dir_name("meta-llama/Meta-Llama-3-8B") == "meta-llama--Meta-Llama-3-8B"


def test_config_paths_exist():
    assert all(Path(REPO / c).is_file() for c in CONFIGS)


def test_the_settings_that_decide_an_edit_come_from_field_metadata():
    """One definition (``blueedit.config.setting``) gives the resume check's free settings, the
    options added later, and the settings free between sittings of an edited model."""
    from blueedit import carry
    from blueedit.config import settings_in_roles
    from blueedit.module import EditingModule

    speed = {"editing.key_batch_size", "editing.max_batch_tokens", "stats.batch_size", "stats.cache_dir"}
    assert EditingModule.RESUMABLE_SETTINGS == settings_in_roles("speed") == speed
    assert carry.FREE_SETTINGS == speed | {"editing.target", "editing.optimize", "editing.autocast",
                                           "editing.compute_dtype", "model.name_or_path", "model.gguf_file",
                                           "model.revision"}
    assert EditingModule.LATER_OPTIONS == {
        "editing.history_schedule": "constant", "editing.target.forget_weight": 0.0,
        "editing.target.fisher_weight": 0.0, "editing.target.fisher_estimator": "diagonal",
        "editing.target.top1_nll_factor": None, "editing.target.top1_kl_stop": 0.01, "editing.target.site": "block",
        "editing.target.stop_after": "none", "editing.target.anchor_position0": False}
    assert "editing.mom2_update_weight" not in carry.FREE_SETTINGS | EditingModule.RESUMABLE_SETTINGS

@pytest.mark.parametrize("config", VISION_CONFIGS)
def test_vision_config_instantiates(config, tmp_path, monkeypatch):
    import blueedit.vision.module
    from blueedit.vision.datamodule import DigitsEditDataModule
    from blueedit.vision.module import VisionEditingModule
    from blueedit.vision.vit import digits_vit_config, load_vit

    asked = []
    monkeypatch.setattr(blueedit.vision.module, "load_model", lambda spec: asked.append(spec) or load_vit(
        config=digits_vit_config(num_layers=2, hidden_size=16, intermediate_size=32)))
    monkeypatch.chdir(REPO)
    monkeypatch.setattr("sys.argv", ["blueedit"])
    cli = run_cli(["--config", config, f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert isinstance(cli.model, VisionEditingModule) and isinstance(cli.datamodule, DigitsEditDataModule)
    assert [a.name_or_path for a in asked] == ["digits"]
    text = (REPO / config).read_text()
    assert f"score: {cli.model.refine.score}" in text and f"k: {cli.model.refine.k}" in text

