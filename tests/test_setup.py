"""One setup path: ``build_editor`` (used by ``EditingModule`` and the benchmarks) and the
benchmarks' jsonargparse options over ``EditingConfig`` / ``StatsConfig``."""

from __future__ import annotations

import pytest
import torch

import blueedit.editing.setup as setup
from blueedit.editing.editor import EditingConfig
from blueedit.editing.statistics import StatisticsCache, StatsConfig
from blueedit.editing.targets import TargetConfig
from helpers import CORPUS, make_model, make_tokenizer


def test_build_editor_collects_once_then_reads_the_cache(tmp_path, monkeypatch):
    model, tok = make_model("llama"), make_tokenizer()
    editing = EditingConfig(layers=[1, 2, 3], strategy="boundary")
    stats = StatsConfig(num_samples=4, max_length=32, cache_dir=str(tmp_path))
    first = setup.build_editor(model, tok, editing, stats, model_id="tiny", texts=CORPUS[:4],
                               context_templates=["{}"], progress=False)
    assert sorted(first.mom2) == [1, 3]  # BLUE: C_0 of the two boundary layers only
    assert first.state.context_templates == ["{}"]
    # the same settings read the cached C_0: the corpus is never asked for again
    monkeypatch.setattr(StatisticsCache, "_collect", lambda *a, **k: pytest.fail("C_0 collected twice"))
    again = setup.cached_key_statistics(model, tok, [1, 3], stats, model_id="tiny", texts=CORPUS[:4],
                                        progress=False)
    assert all(torch.equal(again[l], first.mom2[l].cpu()) for l in (1, 3))


def test_build_editor_with_given_statistics_checks_the_layers():
    model, tok = make_model("llama"), make_tokenizer()
    editing = EditingConfig(layers=[1, 2, 3])
    d_k = 128
    with pytest.raises(ValueError, match=r"no key statistics C_0 for layers \[3\]"):
        setup.build_editor(model, tok, editing, mom2={1: torch.eye(d_k), 2: torch.eye(d_k)}, context_templates=["{}"])


def test_statistics_corpus_auto_falls_back_with_an_actionable_warning(tmp_path):
    with pytest.warns(UserWarning, match="data.data_dir or stats.corpus"):
        assert setup.statistics_corpus(StatsConfig(corpus="auto"), tmp_path) == "model-samples"
    assert setup.statistics_corpus(StatsConfig(corpus="model-samples"), None) == "model-samples"


def test_scoped_overrides_are_typed_and_ordered():
    from blueedit.bench import harness as C
    base = EditingConfig(target=TargetConfig(v_lr=0.5))
    overrides = C.parse_scoped_overrides(["*.kl_factor=0.1", "alphaedit.L2=3", "alphaedit:boundary.L2=1",
                                          '{"memit": {"v_lr": 0.25, "layers": [2, 3]}}'])
    ab = C.scoped_editing_config(base, "alphaedit", "boundary", overrides)
    assert (ab.method, ab.strategy, ab.L2, ab.target.kl_factor) == ("alphaedit", "boundary", 1.0, 0.1)
    assert C.scoped_editing_config(base, "alphaedit", "distribute", overrides).L2 == 3.0
    memit = C.scoped_editing_config(base, "memit", "distribute", overrides, {"mom2_update_weight": 10})
    assert (memit.target.v_lr, memit.layers, memit.mom2_update_weight, memit.L2) == (0.25, [2, 3], 10, base.L2)
    assert base.method == "memit" and base.target.kl_factor != 0.1  # the base is not changed


@pytest.mark.parametrize("item, message", [
    ("*.strategy=sideways", "editing.strategy"),
    ("memit.v_num_grad_steps=many", "v_num_grad_steps"),
    ("memit.no_such_key=1", "unknown hyperparameter 'no_such_key'"),
    ("memit=1", "expected SCOPE.KEY=VALUE"),
])
def test_bad_overrides_name_the_option(item, message):
    from blueedit.bench import harness as C
    with pytest.raises(SystemExit, match=message):
        C.scoped_editing_config(EditingConfig(), "memit", "distribute", C.parse_scoped_overrides([item]))


def test_benchmark_shorthands_and_groups_are_the_same_option(capsys):
    from blueedit.bench import harness as C
    shorthands = {"--lam": ("editing.mom2_update_weight", "λ"), "--layers": ("editing.layers", "layers"),
                  "--v-lr": ("editing.target.v_lr", "lr"), "--stats-samples": ("stats.num_samples", "n")}
    p = C.benchmark_parser("doc", shorthands=shorthands, stats_defaults={"num_samples": 300})
    short, s_stats = C.benchmark_configs(p, p.parse_args(["--lam", "5", "--layers", "2,3", "--v-lr", "0.1"]))
    long, l_stats = C.benchmark_configs(p, p.parse_args(["--editing.mom2_update_weight=5", "--editing.layers=[2,3]",
                                                         "--editing.target.v_lr=0.1"]))
    assert short == long and short.layers == [2, 3] and short.target.v_lr == 0.1
    assert s_stats == l_stats and s_stats.num_samples == 300  # the script's default
    # a method outside the registry is refused, naming the option, when the configs are built
    with pytest.raises(SystemExit):
        C.benchmark_configs(p, p.parse_args(["--editing.method=rome"]))
    assert "editing.method 'rome'" in capsys.readouterr().err
