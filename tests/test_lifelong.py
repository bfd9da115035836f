"""blueedit.bench.lifelong on a tiny random llama: a run stopped after 2 of 4 edits and continued by
the same command gives the metrics of an uninterrupted run; the table marks a lower-bound CPU time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from helpers import RECORDS, REPO, benchmark, make_model, make_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lifelong")
    make_model("llama").save_pretrained(root / "tiny-llama")
    make_tokenizer().save_pretrained(root / "tiny-llama")
    (root / "edits.json").write_text(json.dumps(RECORDS))
    config = {
        "trainer": {"accelerator": "cpu", "devices": 1},
        "model": {"model": {"name_or_path": str(root / "tiny-llama"), "dtype": "float32"},
                  "editing": {"method": "memit", "strategy": "distribute", "layers": [1, 2, 3],
                              "target": {"v_num_grad_steps": 3}},
                  "stats": {"corpus": "model-samples", "num_samples": 4, "max_length": 32, "batch_size": 4},
                  "cache_dir": str(root / "cache"), "eval_batch_size": 8},
        "data": {"format": "user"},
    }
    (root / "memit.yaml").write_text(yaml.safe_dump(config))
    return root


def _argv(root: Path, out: str) -> list[str]:
    # BLUE as the method config followed by the overlay
    return ["--runs", f"MEMIT + BLUE={root / 'memit.yaml'},{REPO / 'configs' / 'blue.yaml'}", "--dataset", str(root / "edits.json"),
            "--num-edits", "4", "--checkpoint-every", "1", "--workdir", str(root / f"work_{out}"),
            "--out", str(root / out)]


def _row(root: Path, out: str) -> dict:
    return json.loads((root / out / "lifelong_T4.json").read_text())["runs"][0]


def test_stopped_and_continued_run_equals_uninterrupted(tiny):
    bench = benchmark("lifelong")
    bench.main(_argv(tiny, "full"))
    full = _row(tiny, "full")
    assert full["num_edits"] == 4 and full["cpu_complete"] and full["processes"] == 1
    assert (full["method"], full["strategy"]) == ("memit", "boundary")
    outcomes = json.loads((tiny / "full" / full["outcomes"]).read_text())  # per-record, for paired comparisons
    assert full["outcomes"] == "lifelong_T4/MEMIT_plus_BLUE.json"
    assert len(outcomes["records"]["post"]) == 4 and outcomes["metrics"] == full["metrics"]
    record = json.loads((tiny / "full" / "lifelong_T4" / "run.json").read_text())  # the directory's command
    assert record["commands"] == [json.loads((tiny / "full" / "lifelong_T4.json").read_text())["command"]]

    bench.main(_argv(tiny, "resumed") + ["--stop-after-rounds", "2"])
    assert not (tiny / "resumed" / "lifelong_T4.json").exists()  # a stopped run is no row
    assert (tiny / "work_resumed" / "MEMIT_plus_BLUE_T4" / "checkpoints" / "last.ckpt").is_file()
    bench.main(_argv(tiny, "resumed"))
    resumed = _row(tiny, "resumed")
    assert resumed["num_edits"] == 4 and resumed["processes"] == 2 and resumed["cpu_complete"]
    assert "--ckpt_path" in resumed["argv"]
    for name, values in full["metrics"].items():
        assert resumed["metrics"][name] == pytest.approx(values, abs=1e-6), name


def test_a_killed_part_makes_the_cpu_time_a_lower_bound(tiny):
    bench = benchmark("lifelong")
    bench.main(_argv(tiny, "killed") + ["--stop-after-rounds", "2"])
    ledger = tiny / "work_killed" / "MEMIT_plus_BLUE_T4" / "process_seconds.json"
    spent = json.loads(ledger.read_text())
    spent["started"] += 1  # as if a second process had been killed before its end
    ledger.write_text(json.dumps(spent))
    bench.main(_argv(tiny, "killed"))
    row = _row(tiny, "killed")
    assert not row["cpu_complete"]
    assert "| ≥ " in (tiny / "killed" / "lifelong_T4.md").read_text()


@pytest.mark.parametrize("change, message", [
    ({"--num-edits": "999"}, "--num-edits 999"),
    ({"--runs": "no config"}, "NAME=CONFIG"),
    ({"--runs": "MEMIT=missing.yaml"}, "no such config file"),
])
def test_bad_input_fails_before_any_model_loads(tiny, change, message):
    argv = _argv(tiny, "bad")
    for option, value in change.items():
        argv[argv.index(option) + 1] = value
    with pytest.raises(SystemExit, match=message):
        benchmark("lifelong").main(argv)
    assert not (tiny / "work_bad").exists()


def _payload(name: str, T: int = 4, dataset: str = "zsre_eval") -> dict:
    row = {"name": name, "layers": [1], "metrics": {"efficacy": {"pre": 10.0, "post": 90.0}},
           "edit_seconds_per_edit": 1.0, "cpu_seconds_per_edit": 2.0, "cpu_complete": True}
    return {"command": f"python -m blueedit.bench.lifelong --runs {name}=x.yaml", "dataset": dataset,
            "num_edits": T, "versions": {}, "device": "cpu", "runs": [row]}


def test_combine_joins_rows_of_separate_processes(tmp_path):
    paths = []
    for name in ("WISE", "MEMIT"):
        path = tmp_path / name / "lifelong_T4.json"
        path.parent.mkdir()
        path.write_text(json.dumps(_payload(name)))
        paths.append(str(path))
    benchmark("lifelong").main(["--combine", *paths, "--out", str(tmp_path / "joined")])
    joined = json.loads((tmp_path / "joined" / "lifelong_T4.json").read_text())
    assert [r["name"] for r in joined["runs"]] == ["WISE", "MEMIT"]
    assert joined["commands"] == [_payload("WISE")["command"], _payload("MEMIT")["command"]]
    table = (tmp_path / "joined" / "lifelong_T4.md").read_text()
    assert "| WISE | [1] | 90.0 (10.0) |" in table and "--runs MEMIT=x.yaml" in table


def test_combine_replace_takes_the_rerun_row_and_its_outcomes(tmp_path):
    old, new = _payload("WISE"), _payload("MEMIT")
    old["runs"].append(dict(_payload("MEMIT")["runs"][0], edit_seconds_per_edit=9.0))
    new["runs"][0]["outcomes"] = "lifelong_T4/MEMIT.json"
    (tmp_path / "old").mkdir()
    (tmp_path / "new" / "lifelong_T4").mkdir(parents=True)
    (tmp_path / "old" / "lifelong_T4.json").write_text(json.dumps(old))
    (tmp_path / "new" / "lifelong_T4.json").write_text(json.dumps(new))
    (tmp_path / "new" / "lifelong_T4" / "MEMIT.json").write_text('{"records": {"post": []}}')
    argv = ["--combine", str(tmp_path / "old" / "lifelong_T4.json"), str(tmp_path / "new" / "lifelong_T4.json"),
            "--out", str(tmp_path / "joined")]
    with pytest.raises(SystemExit, match="--replace"):
        benchmark("lifelong").main(argv)
    benchmark("lifelong").main(argv + ["--replace"])
    joined = json.loads((tmp_path / "joined" / "lifelong_T4.json").read_text())
    assert [(r["name"], r["edit_seconds_per_edit"]) for r in joined["runs"]] == [("WISE", 1.0), ("MEMIT", 1.0)]
    assert (tmp_path / "joined" / "lifelong_T4" / "MEMIT.json").read_text() == '{"records": {"post": []}}'
    record = json.loads((tmp_path / "joined" / "lifelong_T4" / "run.json").read_text())
    assert record["commands"] == [joined["run"]["command"]] and "--combine" in record["commands"][0]
    (tmp_path / "new" / "lifelong_T4" / "MEMIT.json").unlink()  # a row whose outcomes are gone is refused
    with pytest.raises(SystemExit, match="outcomes .* are missing"):
        benchmark("lifelong").main(argv + ["--replace", "--out", str(tmp_path / "again")])
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("second, message", [
    (_payload("MEMIT", T=8), "num_edits 8 differs"),
    (_payload("MEMIT", dataset="zsre_dev"), "dataset 'zsre_dev' differs"),
    (_payload("WISE"), "a row named 'WISE' is already"),
])
def test_combine_refuses_rows_that_do_not_belong_together(tmp_path, second, message):
    (tmp_path / "a.json").write_text(json.dumps(_payload("WISE")))
    (tmp_path / "b.json").write_text(json.dumps(second))
    with pytest.raises(SystemExit, match=message):
        benchmark("lifelong").main(["--combine", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                                         "--out", str(tmp_path / "joined")])
    assert not (tmp_path / "joined").exists()
