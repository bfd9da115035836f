"""benchmarks/sequence.py on a tiny random llama: 3 rounds uninterrupted, and 3 rounds interrupted
after round 2 then resumed by the same command, give the same CSV, histories and weights; and
the SequenceEvaluation schedule."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from blueedit.callbacks.sequence import SequenceEvaluation, checkpoints_in_round
from conftest import REPO, make_model, make_tokenizer
from test_module import RECORDS


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_sequence", REPO / "benchmarks" / "sequence.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A saved tiny llama + tokenizer, six edit records, and a data directory with a few drift
    probes and one GLUE-style task."""
    root = tmp_path_factory.mktemp("sequence")
    make_model("llama").save_pretrained(root / "tiny-llama")
    make_tokenizer().save_pretrained(root / "tiny-llama")
    (root / "edits.json").write_text(json.dumps(RECORDS))
    (root / "data" / "rome_eval").mkdir(parents=True)
    (root / "data" / "glue_eval").mkdir(parents=True)
    known = [{"known_id": i, "subject": s, "attribute": a, "template": "{} is in", "prompt": f"{s} is in"}
             for i, (s, a) in enumerate([("The Eiffel Tower", "Paris"), ("Berlin", "Germany"), ("Madrid", "Spain")])]
    (root / "data" / "rome_eval" / "known_1000.json").write_text(json.dumps(known))
    sst2 = [{"sentence": "a fine piano", "label": 1}, {"sentence": "a bad guitar", "label": 0}]
    (root / "data" / "glue_eval" / "sst2.json").write_text(json.dumps(sst2))
    return root


def _argv(root: Path, name: str) -> list[str]:
    return [
        "--name", name, "--dataset", str(root / "edits.json"), "--num-edits", "6", "--edits-per-round", "2",
        "--eval-every", "2", "--general-every", "4", "--general-tasks", "sst2", "--general-perplexity-texts", "0",
        "--wse-every", "2", "--drift-probes", "3", "--data-dir", str(root / "data"),
        "--workdir", str(root / "work"), "--out", str(root / "results"), "--runs", "memit:distribute",
        "--set", f"model.model.name_or_path={root / 'tiny-llama'}", "model.stats.corpus=model-samples",
        "model.stats.num_samples=4", "model.stats.max_length=32", "model.stats.batch_size=4",
        "model.editing.layers=[1,2,3]", "model.editing.target.v_num_grad_steps=3", "model.eval_batch_size=8",
        f"model.cache_dir={root / 'cache'}", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
    ]


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_interrupted_and_resumed_run_equals_uninterrupted(tiny):
    bench = _load_benchmark()
    full = bench.main(_argv(tiny, "full"))
    assert full["finished"] == ["memit_distribute"] and not full["pending"]

    first = bench.main(_argv(tiny, "resumed") + ["--stop-after-rounds", "2"])
    assert first["pending"] == ["memit_distribute"] and not first["finished"]
    last = tiny / "work" / "resumed" / "memit_distribute" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 2 and saved["blueedit"]["editor"]["rounds_done"] == 2
    assert not (tiny / "results" / "resumed" / "runs").exists()  # an interrupted run is not a result

    second = bench.main(_argv(tiny, "resumed"))  # the same command continues it
    assert second["finished"] == ["memit_distribute"]

    a, b = _csv(tiny / "results" / "full" / "sequence.csv"), _csv(tiny / "results" / "resumed" / "sequence.csv")
    assert a == b
    metrics = {row["metric"] for row in a}
    assert {"efficacy", "generalization", "specificity", "general/sst2", "drift/relative",
            "weight_shift/relative/layer1", "update_norm/layer3"} <= metrics
    # every K = 2 edits, the records edited so far: 2, 4, 6 (and the pre-edit evaluation at 0)
    assert sorted({int(r["edits"]) for r in a if r["metric"] == "efficacy"}) == [0, 2, 4, 6]
    rec_a = json.loads((tiny / "results" / "full" / "runs" / "memit_distribute.json").read_text())
    rec_b = json.loads((tiny / "results" / "resumed" / "runs" / "memit_distribute.json").read_text())
    for key in ("sequence", "general", "drift", "weight_shift"):
        assert rec_a[key] == rec_b[key], key
    assert [h["round"] for h in rec_b["sequence"]] == [-1, 0, 1, 2]
    assert [h["round"] for h in rec_b["general"]] == [-1, 1, 2]
    assert [r["index"] for r in rec_b["rounds"]] == [0, 1, 2]
    assert sorted({h["round"] for h in rec_b["weight_shift"]}) == [0, 1, 2]  # every 2 edits: every round
    assert [h["round"] for h in rec_b["drift"]] == [-1, 0, 1, 2]

    wa = torch.load(tiny / "work" / "full" / "memit_distribute" / "checkpoints" / "last.ckpt", map_location="cpu",
                    weights_only=False)["state_dict"]
    wb = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)

    out = tiny / "results" / "resumed"
    assert (out / "curves.png").stat().st_size > 0 and "| memit | distribute | 6 |" in (out / "table.md").read_text()

    again = bench.main(_argv(tiny, "resumed"))  # finished runs are skipped
    assert again["finished"] == ["memit_distribute"] and again["rows"] == second["rows"]


def test_changed_command_is_refused(tiny):
    bench = _load_benchmark()
    bench.main(_argv(tiny, "changed") + ["--stop-after-rounds", "1"])
    with pytest.raises(SystemExit, match="different command"):
        bench.main(_argv(tiny, "changed") + ["--eval-every", "4"])


@pytest.mark.parametrize("E, N, K, expected", [
    (2, 6, 2, [0, 1, 2]),
    (2, 7, 4, [1, 3]),          # 4 edits after round 1, 7 (the last) after round 3
    (100, 1000, 100, list(range(10))),
    (10, 95, 30, [2, 5, 8, 9]),  # 30, 60, 90 crossed; 95 is the end
    (50, 200, 500, [3]),
])
def test_checkpoints_in_round(E, N, K, expected):
    rounds = -(-N // E)
    assert [i for i in range(rounds) if checkpoints_in_round(i, E, N, K)] == expected


def test_sequence_evaluation_rejects_bad_interval():
    with pytest.raises(ValueError, match="every_n_edits"):
        SequenceEvaluation(every_n_edits=0)
