"""Methods as components: a method defined and registered in this file alone runs through
``blueedit fit`` with either strategy; the engine names no method."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch

from blueedit.cli import run_cli
from blueedit.editing.editor import EditingConfig
from blueedit.editing.updates import replay_weights
from blueedit.methods.registry import EditMethod, SolveInputs, get_method, method_names, register, unregister
from helpers import RECORDS, make_model, make_tokenizer

SRC = Path(__file__).resolve().parents[1] / "src" / "blueedit"


class Ridge(EditMethod):
    """A toy least-squares method: ``ΔW = R Kᵀ (K Kᵀ + μ I)^{-1}`` (no ``C_0``, no history),
    the residual divided evenly under ``distribute``."""

    name = "toy_ridge"
    least_squares = True
    mu = 2.0

    def __init__(self) -> None:
        self.solved: list[int] = []

    def spread(self, z, values, position, num_layers):
        return (z - values) / (num_layers - position)

    def solve(self, hp, inputs: SolveInputs, residuals, keys):
        self.solved.append(keys.shape[1])
        K = keys.to(torch.float64)
        A = K @ K.T + self.mu * torch.eye(K.shape[0], dtype=torch.float64)
        return residuals.to(torch.float64), torch.linalg.solve(A, K).T


@pytest.fixture
def toy():
    method = register(Ridge())
    yield method
    unregister(method.name)


@pytest.fixture
def tiny(tmp_path) -> Path:
    make_model("llama").save_pretrained(tmp_path / "tiny-llama")
    make_tokenizer().save_pretrained(tmp_path / "tiny-llama")
    (tmp_path / "edits.json").write_text(json.dumps(RECORDS))
    return tmp_path


@pytest.mark.parametrize("strategy", ["distribute", "boundary"])
def test_a_method_registered_in_a_test_runs_through_fit(toy, tiny, strategy, monkeypatch):
    monkeypatch.setattr("sys.argv", ["blueedit"])
    cli = run_cli(["fit", f"--model.model.name_or_path={tiny / 'tiny-llama'}", "--model.editing.method=toy_ridge",
                   f"--model.editing.strategy={strategy}", "--model.editing.layers=[1,2,3]",
                   "--model.editing.target.v_num_grad_steps=2", "--model.stats.corpus=model-samples",
                   "--model.stats.num_samples=4", "--model.stats.max_length=16",
                   f"--model.stats.cache_dir={tiny / 'cache'}", "--model.evaluate=false", "--trainer.accelerator=cpu",
                   "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                   "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={tiny / 'run'}",
                   "--data.edits_per_round=2", f"--data.dataset={tiny / 'edits.json'}"])
    editor = cli.model.editor
    layers = [1, 2, 3] if strategy == "distribute" else [1, 3]
    assert editor.method is toy and editor.state.rounds_done == 3
    assert toy.solved == [2] * (3 * len(layers))  # one solve per written layer and round, B = 2
    assert sorted(editor.state.updates[0]) == layers
    for l in layers:  # the written weights are the base plus the toy's recorded updates
        assert torch.equal(replay_weights(editor.state.original[l], editor.state.updates, l),
                           editor.adapter.get_w_out(l).cpu()), l
        assert not torch.equal(editor.state.original[l], editor.adapter.get_w_out(l).cpu()), l


def test_unknown_method_names_the_option_and_the_choices():
    with pytest.raises(ValueError, match=r"editing.method 'nope' is not one of 'memit', 'alphaedit'.*'wise'"):
        EditingConfig(method="nope")
    assert {"memit", "alphaedit", "prune", "rect", "pmet", "wise"} <= set(method_names())
    assert get_method("rect").least_squares and not get_method("wise").least_squares


def test_no_method_is_named_outside_the_method_modules():
    """``method == "..."`` (or ``!=``, ``in (...)``) appears only in ``blueedit/methods/``. The
    benchmarks (``blueedit/bench/``) are users of the engine, not part of it: a benchmark that
    reproduces a published script's per-method settings may name methods."""
    pattern = re.compile(r"""method\s*(==|!=|in|not in)\s*[("'\[]""")
    found = []
    for path in SRC.rglob("*.py"):
        if path.parent.name in ("methods", "bench"):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) and not line.lstrip().startswith("#"):
                found.append(f"{path.relative_to(SRC)}:{i}: {line.strip()}")
    assert not found, found


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, long


def test_no_private_lightning_api_is_used():
    """Lightning's public mechanisms only: no private trainer, connector or parser methods."""
    pattern = re.compile(r"\._checkpoint_connector|_prepare_subcommand_parser|\bself\._get\(|\._fit_loop|\._run\(")
    found = [f"{path.relative_to(SRC)}:{i}: {line.strip()}" for path in SRC.rglob("*.py")
             for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, found


def test_readme_adding_a_method_example_registers_and_edits():
    from blueedit.editing.editor import Editor
    from blueedit.models.adapters import ModelAdapter
    from pinned_deltas import TEMPLATES, _mom2, _requests

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"### Adding a method.*?```python\n(.*?)```", text, re.S).group(1)
    try:
        exec(compile(code, "README.md", "exec"), {})
        model, tok = make_model("llama"), make_tokenizer()
        adapter = ModelAdapter(model)
        for strategy in ("distribute", "boundary"):
            hp = EditingConfig(method="ridge", strategy=strategy, layers=[1, 2, 3])
            hp.target.v_num_grad_steps = 2
            editor = Editor(model, tok, adapter, hp, _mom2(model, adapter, tok, hp.edited_layers), TEMPLATES)
            report = editor.edit_round(_requests()[:2])
            assert sorted(report.update_norms) == hp.edited_layers and all(report.update_norms.values())
    finally:
        unregister("ridge")
