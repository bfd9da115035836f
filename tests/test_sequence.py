"""blueedit.bench.sequence on a tiny random llama: 3 rounds uninterrupted, and 3 rounds interrupted
after round 2 then resumed by the same command, give the same CSV, histories and weights; and
the SequenceEvaluation schedule."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from blueedit.callbacks.sequence import SequenceEvaluation, checkpoints_in_round
from helpers import RECORDS, benchmark, make_model, make_tokenizer


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
    bench = benchmark("sequence")
    full = bench.main(_argv(tiny, "full"))
    assert full["finished"] == ["memit_distribute"] and not full["pending"]

    first = bench.main(_argv(tiny, "resumed") + ["--stop-after-rounds", "2"])
    assert first["pending"] == ["memit_distribute"] and not first["finished"]
    last = tiny / "work" / "resumed" / "memit_distribute" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2 and saved["blueedit"]["editor"]["rounds_done"] == 2
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"next_round": 2}]
    assert not (tiny / "results" / "resumed" / "runs").exists()  # an interrupted run is not a result

    # --report-partial reports the unfinished run from its checkpoint, marked partial
    part = bench.main(_argv(tiny, "resumed") + ["--report-only", "--report-partial"])
    rec = json.loads((tiny / "results" / "resumed" / "runs" / "memit_distribute.json").read_text())
    assert rec["partial"] and rec["num_edits"] == 4 and [h["round"] for h in rec["sequence"]] == [-1, 0, 1]
    assert "4 of 6 (partial)" in part["table"]

    second = bench.main(_argv(tiny, "resumed"))  # the same command continues it (a partial record is no result)
    assert second["finished"] == ["memit_distribute"]

    a, b = _csv(tiny / "results" / "full" / "sequence.csv"), _csv(tiny / "results" / "resumed" / "sequence.csv")
    assert a == b
    metrics = {row["metric"] for row in a}
    assert {"efficacy", "generalization", "specificity", "general/sst2", "drift/relative",
            "weight_shift/relative/layer1", "update_norm/layer3", "update_norm/total"} <= metrics
    for rnd in {r["round"] for r in a if r["metric"] == "update_norm/total"}:
        per_layer = [float(r["value"]) for r in a if r["round"] == rnd and r["metric"].startswith("update_norm/layer")]
        total = next(float(r["value"]) for r in a if r["round"] == rnd and r["metric"] == "update_norm/total")
        assert abs(total - sum(v * v for v in per_layer) ** 0.5) <= 1e-9 * max(total, 1.0)
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
    # each evaluation's per-record values, the run's command and its code commit are kept
    assert [len(h["records"]) for h in rec_b["sequence"]] == [6, 2, 4, 6]
    assert rec_b["command"].startswith("python -m blueedit.bench.sequence --name resumed")
    assert set(rec_b["git"]) == {"commit", "dirty"} and rec_b["finished"]
    run = json.loads((tiny / "results" / "resumed" / "run.json").read_text())
    assert run["command"].startswith("python -m blueedit.bench.sequence") and run["runs_finished"] == ["memit_distribute"]

    full_ckpt = tiny / "work" / "full" / "memit_distribute" / "checkpoints" / "last.ckpt"
    wa = torch.load(full_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    wb = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)

    out = tiny / "results" / "resumed"
    assert (out / "curves.png").stat().st_size > 0 and "| memit | distribute | 6 |" in (out / "table.md").read_text()

    again = bench.main(_argv(tiny, "resumed"))  # finished runs are skipped
    assert again["finished"] == ["memit_distribute"] and again["rows"] == second["rows"]


def test_changed_command_is_refused(tiny):
    bench = benchmark("sequence")
    bench.main(_argv(tiny, "changed") + ["--stop-after-rounds", "1"])
    with pytest.raises(SystemExit, match="different command"):
        bench.main(_argv(tiny, "changed") + ["--eval-every", "4"])
    run_dir = tiny / "work" / "changed" / "memit_distribute"
    with bench.run_lock(run_dir, "memit_distribute"):  # as if another process were running it
        with pytest.raises(SystemExit, match="another process"):
            bench.main(_argv(tiny, "changed"))


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


def _wse_record(strategy: str, E: int, rounds: list[int], rel) -> dict:
    """A finished-run record with a weight shift history: ``rel(round, layer)`` per written layer."""
    layers = [4, 5, 6, 7, 8] if strategy == "distribute" else [4, 5, 6, 7, 8]
    hist = [{"round": r, "layer": l, "target_layer": 8 if strategy == "distribute" else l,
             "metrics": {"relative": rel(r, l), "frobenius": 1.0, "cosine": 0.5}} for r in rounds for l in layers]
    return {"name": f"x_e{E}", "method": "memit", "strategy": strategy, "edits_per_round": E,
            "layers": [4, 5, 6, 7, 8], "weight_shift": hist}


def _close(got, want) -> bool:
    """Lists of tuples equal up to float round-off."""
    return len(got) == len(want) and all(
        len(g) == len(w) and all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a, b in zip(g, w))
        for g, w in zip(got, want))


def test_weight_shift_figures_points(tmp_path):
    ws = benchmark("weight_shift")
    records = [_wse_record("distribute", E, [0, 2], lambda r, l, E=E: (8 - l) * 0.1 + E * 0.001 + r * 0.01)
               for E in (10, 50)]
    records.append(_wse_record("boundary", 50, [0, 2], lambda r, l: 0.0))
    rows = ws.points(records)
    assert {(r["layer"], r["distance"]) for r in rows} == {(4, 4), (5, 3), (6, 2), (7, 1), (8, 0)}
    assert {r["edits_before"] for r in rows if r["edits_per_round"] == 50} == {0, 100}
    fig = ws.figures(rows, tmp_path, distance_E=50, measure="relative")
    by = lambda name, strategy: [(p["x"], p["y"]) for p in fig  # noqa: E731
                                 if p["figure"] == name and p["strategy"] == strategy]
    # distance: mean over the diagnosed rounds 0 and 2 of E = 50: 0.1 d + 0.05 + 0.01
    assert _close(by("distance", "distribute"), [(d, 0.1 * d + 0.06) for d in range(5)])
    assert by("distance", "boundary") == [(d, 0.0) for d in range(5)]
    # batch size: round 0, mean over layers 0.2 + 0.001 E
    assert _close(by("batch_size", "distribute"), [(10, 0.21), (50, 0.25)])
    # sequence: edits before the round (round * E), mean over layers
    seq = [(p["edits_per_round"], p["x"], p["y"]) for p in fig if p["figure"] == "sequence" and p["strategy"] == "distribute"]
    assert _close(seq, [(10, 0, 0.21), (10, 20, 0.23), (50, 0, 0.25), (50, 100, 0.27)])
    for png in ("wse_vs_distance.png", "wse_vs_batch_size.png", "wse_vs_sequence.png"):
        assert (tmp_path / png).stat().st_size > 0
    assert (tmp_path / "weight_shift.csv").read_text().count("\n") == len(fig) + 1
    # the default measure is the paper's ‖Δ* − Δ‖_F (1.0 in every record here)
    frob = ws.figures(rows, tmp_path, distance_E=50)
    assert {p["y"] for p in frob if p["strategy"] == "distribute"} == {1.0}
    assert {p["measure"] for p in frob} == {"frobenius"}
    with pytest.raises(ValueError, match="measure"):
        ws.figures(rows, tmp_path, distance_E=50, measure="cosine")


def test_weight_shift_runs_batch_sizes(tiny):
    ws = benchmark("weight_shift")
    argv = _argv(tiny, "unused")
    rest = argv[argv.index("--dataset"):]
    for opt in ("--num-edits", "--edits-per-round", "--eval-every", "--general-every", "--wse-every", "--out"):
        i = rest.index(opt)
        del rest[i:i + 2]
    res = ws.main(["--name", "wse", "--batch-sizes", "2", "3", "--sequence-batch-size", "2", "--sequence-edits", "6",
                   "--sequence-wse-every", "4", "--out", str(tiny / "results"), *rest])
    fig = res["figure_rows"]
    assert sorted({p["x"] for p in fig if p["figure"] == "batch_size"}) == [2, 3]
    # batch-size runs: round 0 only; the sequence run (E = 2): every ceil(4 / 2) = 2 rounds -> rounds 0, 2
    assert sorted((p["edits_per_round"], p["x"]) for p in fig if p["figure"] == "sequence") == [
        (2, 0), (2, 4), (3, 0)]
    assert sorted(p["x"] for p in fig if p["figure"] == "distance") == [0, 1, 2]  # layers 1..3, at E = 3
    assert all(p["y"] > 0 for p in fig)  # distribute: a real error
    assert (tiny / "results" / "wse" / "wse_vs_sequence.png").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--runs", "memit:sideways"], "STRATEGY one of"),
    (["--num-edits", "7"], "has only 6 records"),
    (["--config", "configs/nope.yaml"], "no such file"),
])
def test_bad_options_fail_before_any_run(tiny, extra, message):
    bench = benchmark("sequence")
    argv = _argv(tiny, "bad") + extra
    with pytest.raises(SystemExit, match=message):
        bench.main(argv)
    assert not (tiny / "work" / "bad").exists()


def test_joined_datasets(tiny, tmp_path):
    bench = benchmark("sequence")
    edits = str(tiny / "edits.json")
    # other edits (a repeat of a record under another case_id would be dropped as a duplicate)
    more_records = [{**r, "case_id": r["case_id"] + 100, "target_new": r["target_new"] + "s"} for r in RECORDS]
    more = tmp_path / "more.json"
    more.write_text(json.dumps(more_records))
    joined_name = f"{edits}+{more}"
    args = bench.parse_args(["--dataset", joined_name, "--num-edits", "12", "--workdir", str(tmp_path)])
    bench.check_inputs(args, tiny / "data")
    joined = json.loads(Path(args.dataset_source).read_text())
    assert joined == RECORDS + more_records
    config = bench.run_config(args, "memit:boundary", tmp_path / "run", tiny / "data")
    assert config["data"]["dataset"] == args.dataset_source
    assert bench.run_identity(args, config)["generated"]["data"]["dataset"] == joined_name
    with pytest.raises(SystemExit, match="has only 12 records"):
        bench.check_inputs(bench.parse_args(["--dataset", joined_name, "--num-edits", "13",
                                             "--workdir", str(tmp_path)]), tiny / "data")


def test_report_names_a_non_default_target_site():
    """A run whose ``--set`` chose ``editing.target.site`` is told apart in the table and the legend;
    a run at the default site (and an older record without ``blueedit_args``) is not."""
    bench = benchmark("sequence")
    rounds = [{"index": 0, "seconds": 10.0, "num_edits": 2, "update_norms": {"4": 1.0}}]
    base = {"method": "memit", "num_edits": 2, "edits_per_round": 2, "dataset": "d", "edit_seconds": 10.0,
            "rounds": rounds, "sequence": [],
            "general": None, "drift": None, "weight_shift": None}
    mlp = {**base, "strategy": "boundary", "blueedit_args": ["fit", "--model.editing.target.site=mlp"]}
    block = {**base, "strategy": "distribute", "blueedit_args": ["fit", "--model.editing.compute_dtype=bfloat16"]}
    old = {**base, "strategy": "boundary"}
    assert [bench.target_site(r) for r in (mlp, block, old)] == ["mlp", "block", "block"]
    assert [bench._label(r) for r in (mlp, block, old)] == ["MEMIT + BLUE (site mlp)", "MEMIT", "MEMIT + BLUE"]
    table = bench.markdown_table([block, mlp, old], "t")
    assert "| memit | boundary, site mlp | 2 |" in table
    assert "| memit | distribute | 2 |" in table and "| memit | boundary | 2 |" in table


def test_report_keeps_a_run_known_only_from_the_csv(tmp_path):
    """``--keep-csv-runs``: a run of ``--runs`` whose record is gone but whose rows are in the
    existing sequence.csv is reported from those rows (same CSV rows, a table row without edit
    time); a run not named is dropped, and a record wins over old rows of the same run."""
    bench = benchmark("sequence")
    rounds = [{"index": 0, "seconds": 10.0, "num_edits": 2, "update_norms": {"4": 3.0}}]
    seq = [{"round": -1, "metrics": {"efficacy": 10.0}}, {"round": 0, "metrics": {"efficacy": 90.0}}]
    rec = {"method": "memit", "num_edits": 2, "edits_per_round": 2, "dataset": "d", "edit_seconds": 10.0,
           "rounds": rounds, "sequence": seq, "general": None, "drift": None, "weight_shift": None}
    out = tmp_path / "name"
    (out / "runs").mkdir(parents=True)
    old = {**rec, "strategy": "distribute", "sequence": [seq[0], {"round": 0, "metrics": {"efficacy": 70.0}}]}
    stale = {**rec, "strategy": "boundary", "sequence": [seq[0], {"round": 0, "metrics": {"efficacy": 1.0}}]}
    gone = {**rec, "method": "alphaedit", "strategy": "distribute"}
    bench.write_csv([old, stale, gone], out / "sequence.csv")
    old_rows = bench.rows_of(old)
    (out / "runs" / "memit_boundary.json").write_text(json.dumps({**rec, "strategy": "boundary"}))

    result = bench.assemble(out, "t", ["memit_distribute", "memit_boundary"])
    kept = [r for r in result["records"] if r.get("from_csv")]
    assert [(r["method"], r["strategy"], r["num_edits"]) for r in kept] == [("memit", "distribute", 2)]
    rows = [r for r in result["rows"] if r["method"] == "memit" and r["strategy"] == "distribute"]
    assert rows == old_rows
    assert {r["value"] for r in result["rows"] if r["strategy"] == "boundary" and r["metric"] == "efficacy"} == {10.0, 90.0}
    assert not any(r["method"] == "alphaedit" for r in result["rows"])
    table = (out / "table.md").read_text()
    assert "| memit | distribute | 2 | 10.00 → 70.00 |" in table and "| - | - |" in table
    assert "earlier `sequence.csv`" in table and (out / "curves.png").is_file()
    # written again from its own output, the report is the same
    bench.assemble(out, "t", ["memit_distribute", "memit_boundary"])
    assert (out / "table.md").read_text() == table


def test_keep_csv_runs_needs_report_only():
    with pytest.raises(SystemExit):
        benchmark("sequence").parse_args(["--runs", "memit:boundary", "--keep-csv-runs"])


def test_wild_protocol_and_retention_matrices(tiny):
    """--wild: both protocols per evaluation, neighborhood answers compared with the unedited
    model's, and a retention matrix per protocol."""
    bench = benchmark("sequence")
    argv = _argv(tiny, "wild")
    for opt in ("--general-every", "--wse-every", "--num-edits"):
        argv[argv.index(opt) + 1] = {"--general-every": "0", "--wse-every": "0", "--num-edits": "4"}[opt]
    out = bench.main(argv + ["--wild", "--wild-max-new-tokens", "5", "--drift-every", "0",
                             "--health-gate", "update_norm:1e-9"])  # round 1 crosses: refused
    assert out["finished"] == ["memit_distribute"]
    rows = _csv(tiny / "results" / "wild" / "sequence.csv")
    by = {(r["metric"], int(r["round"])) for r in rows}
    assert {("efficacy", 1), ("efficacy_wild", -1), ("efficacy_wild", 1), ("locality_wild", 0),
            ("specificity_wild", 1)} <= by
    assert ("locality_wild", -1) not in by  # the unedited model is the reference
    rec = json.loads((tiny / "results" / "wild" / "runs" / "memit_distribute.json").read_text())
    last = rec["sequence"][-1]
    assert len(last["records"]) == 4 and all("efficacy_wild" in r and "efficacy" in r for r in last["records"])
    assert [h["refused"] for h in rec["health"]] == [False, True]
    assert {("health/refused", 1)} <= by
    table = (tiny / "results" / "wild" / "table.md").read_text()
    assert "refused and undid round(s) 1 (2 edits" in table
    assert "Eff. TF" in table and "Eff. wild" in table and "Loc. wild" in table
    for metric in ("efficacy", "efficacy_wild"):
        cells = _csv(tiny / "results" / "wild" / f"retention_memit_distribute_{metric}.csv")
        assert {(c["eval_round"], c["origin_round"]) for c in cells} == {("0", "0"), ("1", "0"), ("1", "1")}
        assert (tiny / "results" / "wild" / f"retention_memit_distribute_{metric}.png").stat().st_size > 0
