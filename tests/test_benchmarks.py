"""Smoke tests of the benchmarks (blueedit.bench) on a tiny random Llama."""

from __future__ import annotations

import math

import pytest
import torch

from blueedit.data.records import EditRequest
from helpers import CORPUS, benchmark, make_model, make_tokenizer

REQUESTS = [
    EditRequest(1, "{} plays the", "Toko Yasuda", "violin", "guitar",
                paraphrases=("Toko Yasuda is a musician. Toko Yasuda plays the",),
                neighborhood=("Danielle Darrieux plays the",), generation_prompts=("Toko Yasuda is",)),
    EditRequest(2, "The mother tongue of {} is", "Thomas Joannes Stieltjes", "French", "Dutch",
                paraphrases=("Thomas Joannes Stieltjes spoke",), neighborhood=("The mother tongue of Danielle Darrieux is",)),
    EditRequest(3, "{} is in", "The Eiffel Tower", "Rome", "Paris",
                paraphrases=("Where is The Eiffel Tower? It is in",), neighborhood=("Berlin is in",)),
]


def _fresh():
    return make_model("llama"), make_tokenizer()


def test_speed_benchmark_both_modes(tmp_path):
    speed = benchmark("speed")
    out = tmp_path / "speed.json"
    res = speed.main(["--layers", "1,2,3", "--num-edits", "3", "--edits-per-round", "2", "--steps", "2",
                      "--stats-samples", "4", "--stats-max-length", "32", "--flops",
                      "--modes", "optimized,reference,optimized-bf16", "--out", str(out)],
                     make_model=_fresh, requests=REQUESTS, texts=CORPUS[:4])
    assert set(res["modes"]) == {"optimized", "reference", "optimized-bf16"}
    for mode in res["modes"].values():
        assert mode["stats_seconds"] > 0 and mode["edit_seconds"] > 0 and mode["seconds_per_edit"] > 0
        assert mode["rounds"] == 2 and mode["mean_target_steps"] == 1  # 2 evaluations: one update
        assert mode["stats_tokens"] > 0
    assert res["ratios"]["reference/optimized"]["edit_seconds"] > 0
    assert res["checks"]["reference/optimized"]["c0_max_relative_difference"] < 1e-5
    assert res["checks"]["reference/optimized"]["metrics_max_abs_difference"] <= 1.0 + 1e-9
    flops = res["modes"]["optimized"]
    assert flops["step_gflops"] > 0 and 0 < flops["fraction_of_fp32_peak"] and flops["bf16_peak_gflops_per_s"] > 0
    assert "optimized / optimized-bf16" in out.with_suffix(".md").read_text()
    assert res["modes"]["reference"]["stats_passes"] == 3 and res["modes"]["optimized"]["stats_passes"] == 1
    assert out.is_file() and out.with_suffix(".md").is_file()
    assert "reference / optimized" in res["table"] and res["versions"]["torch"] == torch.__version__


def test_speed_profile_splits_the_round_into_phases(tmp_path):
    speed = benchmark("speed")
    res = speed.main(["--layers", "1,2,3", "--num-edits", "2", "--edits-per-round", "2", "--steps", "3",
                      "--strategy", "boundary", "--stats-samples", "4", "--stats-max-length", "32", "--profile",
                      "--modes", "optimized", "--out", ""], make_model=_fresh, requests=REQUESTS, texts=CORPUS[:4])
    prof = res["modes"]["optimized"]["profile"]
    rows = {r["phase"]: r for r in prof["rows"]}
    for layer in (1, 3):  # BLUE: targets at l_1 and l_m
        fwd, bwd = rows[f"target {layer}: forward"], rows[f"target {layer}: backward"]
        assert fwd["gflop"] > 0 and bwd["gflop"] == fwd["gflop"] and fwd["calls"] >= 1 and bwd["calls"] >= 1
        assert f"target {layer}: prefix cache" in rows
    assert rows["solve and write"]["calls"] == 2 and rows["keys and values"]["calls"] >= 2
    assert abs(sum(r["share"] for r in prof["rows"]) - 1) < 1e-9 and rows["rest of the rounds"]["cpu_seconds"] >= 0
    assert prof["bf16_peak_gflops_per_s"] > 0 and "| target 1: forward |" in prof["table"]


def test_quality_benchmark_grid_and_restore(tmp_path):
    quality = benchmark("quality")
    model, tok = _fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = quality.main(["--layers", "1,2,3", "--num-edits", "3", "--edits-per-round", "2", "--steps", "2",
                        "--methods", "memit,alphaedit", "--strategies", "distribute,boundary",
                        "--config-overrides", "alphaedit:boundary.L2=1", "*.kl_factor=0.1",
                        "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "quality"), "--fluency"],
                       model=model, tokenizer=tok, requests=REQUESTS, texts=CORPUS[:4])
    assert [(r["method"], r["strategy"]) for r in res["runs"]] == [
        ("memit", "distribute"), ("memit", "boundary"), ("alphaedit", "distribute"), ("alphaedit", "boundary")]
    for r in res["runs"]:
        assert "error" not in r, r.get("error")
        assert r["seconds"] > 0 and all(0 <= r[k] <= 100 for k in ("efficacy", "generalization", "specificity"))
        assert not math.isnan(r["fluency"])
    assert res["runs"][3]["hparams"]["L2"] == 1 and res["runs"][2]["hparams"]["L2"] == 10
    assert "pre_edit" in res and "0.02" in res["nullspace"]
    assert all(0 <= v["fraction_below"] <= 1 for v in res["nullspace"]["0.02"].values())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # original weights restored
    assert (tmp_path / "quality.md").is_file() and (tmp_path / "quality.json").is_file()
    assert any((tmp_path / "cache" / "stats").rglob("*.safetensors"))  # C_0 cached once


def test_quality_benchmark_pmet_hse_and_combine(tmp_path):
    """``pmet`` and ``hse`` rows (HSE = MEMIT with the preset options, the schedule's n from the
    rounds), one file per run, then ``--combine`` into one table."""
    from blueedit.editing import hse

    quality = benchmark("quality")
    files = []
    for m in ("pmet", "hse"):
        model, tok = _fresh()
        out = tmp_path / m
        res = quality.main(["--layers", "1,2,3", "--num-edits", "3", "--edits-per-round", "2", "--steps", "2",
                            "--methods", m, "--strategies", "distribute,boundary",
                            "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
                           + (["--no-pre-edit"] if m == "hse" else []),
                           model=model, tokenizer=tok, requests=REQUESTS, texts=CORPUS[:4])
        assert [(r["method"], r["strategy"]) for r in res["runs"]] == [(m, "distribute"), (m, "boundary")]
        for r in res["runs"]:
            assert "error" not in r, r.get("error")
        hp = res["runs"][0]["hparams"]
        if m == "pmet":
            assert hp["top1_nll_factor"] == 0.1 and hp["forget_weight"] == 0
        else:
            assert hp["forget_weight"] == hse.PRESET["target"]["forget_weight"] > 0
            assert hp["fisher_weight"] == hse.PRESET["target"]["fisher_weight"] > 0
            assert hp["history_schedule"] == "inverse"
        files.append(str(out.with_suffix(".json")))
    comb = quality.main(["--combine", *files, "--out", str(tmp_path / "table")])
    assert [r["method"] for r in comb["runs"]] == ["pmet", "pmet", "hse", "hse"]
    table = (tmp_path / "table.md").read_text()
    assert table.count("| pre-edit |") == 1 and "| hse | boundary |" in table and "| pmet | distribute |" in table
    assert not math.isnan(comb["pre_edit"]["efficacy"])  # from the first file


def test_quality_dev_grid_picks_best(tmp_path):
    quality = benchmark("quality")
    model, tok = _fresh()
    res = quality.main(["--dev", "--layers", "1,2,3", "--num-edits", "2", "--edits-per-round", "2", "--steps", "1",
                        "--methods", "memit", "--strategies", "boundary", "--lams", "10,1500", "--v-lrs", "0.5",
                        "--cache-dir", str(tmp_path / "cache"), "--out", ""],
                       model=model, tokenizer=tok, requests=REQUESTS, texts=CORPUS[:4])
    assert [r["hparams"]["lam"] for r in res["runs"]] == [10, 1500]
    assert len(res["best"]) == 1
    assert res["best"][0]["score"] == pytest.approx(max(r["score"] for r in res["runs"]))


def test_memory_estimate_counts_saved_activations():
    """One Llama block saves roughly 8·d + 4·f values per token for backward (norm inputs, q/k/v,
    attention output, the MLP's gate/up/product), plus the attention probabilities: the measured
    number must lie in that range, and the budget must bound the activation term."""
    memory = benchmark("memory")
    d, f = 64, 128  # llama-tiny
    per_token = memory.saved_bytes_per_token("llama-tiny", torch.float32, tokens=16)
    assert 4 * (6 * d + 3 * f) <= per_token <= 4 * (12 * d + 6 * f + 4 * 16)
    small = memory.main(["--shape", "llama-tiny", "--max-batch-tokens", "256", "--layers", "4,5,6,7,8"])
    large = memory.main(["--shape", "llama-tiny", "--max-batch-tokens", "0", "--layers", "4,5,6,7,8"])
    assert small["tokens"] == 256 and large["tokens"] == 100 * 7 * 12
    assert small["parts"]["activations"] * (large["tokens"] / 256) == pytest.approx(large["parts"]["activations"])


def test_layer_sweep_windows_choice_and_restore(tmp_path):
    sweep = benchmark("layer_sweep")
    model, tok = _fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "sweep"
    res = sweep.main(["--windows", "1-2", "3-4", "--num-edits", "3", "--edits-per-round", "2", "--steps", "2",
                      "--cache-dir", str(tmp_path / "cache"), "--out", str(out)],
                     model=model, tokenizer=tok, requests=REQUESTS, texts=CORPUS[:4])
    assert [r["layers"] for r in res["runs"]] == [[1, 2], [3, 4]]
    for r in res["runs"]:
        assert "error" not in r, r.get("error")
        assert r["seconds"] > 0 and all(0 <= r[k] <= 100 for k in ("efficacy", "generalization", "specificity"))
        assert r["score"] == pytest.approx(sum(r[k] for k in ("efficacy", "generalization", "specificity")) / 3)
    best = max(res["runs"], key=lambda r: r["score"])
    assert res["chosen"]["layers"] == best["layers"]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # original weights restored
    rows = out.with_suffix(".csv").read_text().splitlines()
    assert rows[0].startswith("window,layers,efficacy") and rows[1].startswith("pre-edit") and len(rows) == 4
    assert "python -m blueedit.bench.layer_sweep --windows 1-2 3-4" in out.with_suffix(".md").read_text()


def test_layer_sweep_windows_from_starts_and_bad_input():
    sweep = benchmark("layer_sweep")
    args = sweep.build_parser().parse_args(["--starts", "2,4", "--window-size", "3"])
    assert sweep.candidate_windows(args) == [[2, 3, 4], [4, 5, 6]]
    with pytest.raises(SystemExit, match="FIRST-LAST"):
        sweep.candidate_windows(sweep.build_parser().parse_args(["--windows", "2:6"]))
    nan = float("nan")
    runs = [{"score": 50.0, "layers": [1]}, {"score": nan, "layers": [2]}, {"score": 50.0, "layers": [3]}]
    assert sweep.choose(runs)["layers"] == [1]  # ties: the earlier window; failed runs never chosen
    assert sweep.choose([{"score": nan}]) is None


# -- the package's benchmarks: entry points and run records ---------------------------------------
def test_every_benchmark_runs_as_a_module_and_lists_its_options(capsys):
    """``python -m blueedit.bench NAME --help`` for every benchmark, and the list without a name."""
    from blueedit.bench import BENCHMARKS
    from blueedit.bench.__main__ import main

    main([])
    listed = capsys.readouterr().out
    for name in BENCHMARKS:
        assert name in listed
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "--out" in capsys.readouterr().out, name
    with pytest.raises(SystemExit, match="unknown benchmark 'nope'"):
        main(["nope"])
    from blueedit.cli import main as blueedit_main  # `blueedit bench` is the same entry point

    blueedit_main(["bench"])
    assert "wise_sweep" in capsys.readouterr().out


def test_run_record_holds_command_versions_commit_and_times(tmp_path):
    import json

    from blueedit.bench.harness import RunRecord

    record = RunRecord("quality", ["--num-edits", "3", "--out", "a b"])
    path = record.write(tmp_path / "out", note="x")
    data = json.loads(path.read_text())
    assert path.name == "run.json"
    assert data["command"] == "python -m blueedit.bench.quality --num-edits 3 --out 'a b'"
    assert set(data["versions"]) >= {"python", "torch", "transformers", "blueedit"}
    assert set(data["git"]) == {"commit", "dirty"}
    if data["git"]["commit"] is not None:  # a source checkout
        assert len(data["git"]["commit"]) == 40
    assert data["started"] <= data["finished"] and data["wall_seconds"] >= 0 and data["note"] == "x"


def test_a_shared_result_directory_keeps_every_command(tmp_path):
    """Several invocations writing tables into one directory: run.json lists each command once, the
    latest record of each, and keeps an older record's commands."""
    import json

    from blueedit.bench.harness import RunRecord

    (tmp_path / "run.json").write_text(json.dumps({"reconstructed": True, "commands": ["python old.py"]}))
    RunRecord("cme", ["--name", "t1"]).write(tmp_path, shared=True)
    RunRecord("cme", ["--name", "t2"]).write(tmp_path, shared=True)
    RunRecord("cme", ["--name", "t1"]).write(tmp_path, shared=True, note="again")
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["commands"] == ["python old.py", "python -m blueedit.bench.cme --name t2",
                                "python -m blueedit.bench.cme --name t1"]
    assert [r["command"] for r in data["runs"]] == data["commands"][1:]
    assert data["runs"][-1]["note"] == "again" and data["reconstructed"] is True


def test_harness_records_a_shell_benchmark(tmp_path):
    """``python -m blueedit.bench.harness record``: the record of a command another process ran."""
    import json

    from blueedit.bench.harness import main

    main(["record", str(tmp_path), "--command", "bash benchmarks/x.sh a", "--started", "2020-01-01T00:00:00+00:00"])
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["command"] == "bash benchmarks/x.sh a" and data["started"].startswith("2020-01-01")
    assert data["wall_seconds"] > 3600 * 24 * 365 and data["cpu_seconds"] is None


def test_every_result_directory_has_a_run_record():
    """Each directory of benchmarks/results/ holds run.json naming the command(s) that wrote it."""
    import json

    from helpers import REPO

    results = REPO / "benchmarks" / "results"
    dirs = [d for d in sorted(results.iterdir()) if d.is_dir()]
    assert dirs
    for d in dirs:
        path = d / "run.json"
        assert path.is_file(), f"{d.name} has no run.json"
        record = json.loads(path.read_text())
        commands = record.get("commands") or [record.get("command")]
        assert all(isinstance(c, str) and c for c in commands), d.name
    for path in sorted(results.glob("*.json")):  # a result file beside them names its command itself
        data = json.loads(path.read_text())
        command = data.get("command") or data.get("commands") or (data.get("run") or {}).get("command")
        assert command, f"{path.name} names no command"


def test_split_options_keeps_the_rest_for_another_benchmark():
    from blueedit.bench.harness import plain_parser, split_options

    p = plain_parser("x")
    p.add_argument("--name")
    p.add_argument("--batch-sizes", nargs="*", type=int)
    own, rest = split_options(["--name", "a", "--runs", "m:d", "--batch-sizes", "1", "-2", "--set", "k=v"], p)
    assert own == ["--name", "a", "--batch-sizes", "1", "-2"]
    assert rest == ["--runs", "m:d", "--set", "k=v"]


def test_speed_ab_alternates_a_baseline_revision_and_the_current_code(tmp_path):
    """Both sides run the speed benchmark in their own process, alternating; the baseline is a git
    revision checked out into a temporary worktree (removed afterwards)."""
    import subprocess

    from blueedit.bench.harness import default_data_dir
    from helpers import REPO

    if not (default_data_dir() / "counterfact").is_dir():
        pytest.skip("needs the benchmark data (BLUEEDIT_DATA_DIR)")
    def worktrees():
        return subprocess.run(["git", "-C", str(REPO), "worktree", "list"], capture_output=True, text=True).stdout

    before = worktrees()
    speed_ab = benchmark("speed_ab")
    res = speed_ab.main(["--baseline", "HEAD", "--repeats", "1", "--out", str(tmp_path / "ab.json"), "--",
                         "--random-init-config", "llama-tiny", "--layers", "1,2", "--num-edits", "2",
                         "--edits-per-round", "2", "--steps", "2", "--stats-samples", "4", "--stats-max-length", "32",
                         "--modes", "optimized", "--dataset", "counterfact_eval", "--threads", "1"])
    assert [r["side"] for r in res["runs"]] == ["baseline", "current"]
    assert res["baseline"]["revision"] == "HEAD" and len(res["baseline"]["commit"]) == 40
    s = res["summary"]["optimized"]
    assert s["cpu_ratio"] > 0 and s["wall_ratio"] > 0 and s["metrics_max_abs_difference"] >= 0
    assert all(len(r["load_average_1min_before_after"]) == 2 for r in res["runs"])
    assert "| optimized |" in (tmp_path / "ab.md").read_text()
    assert worktrees() == before  # the baseline's worktree is gone
    with pytest.raises(SystemExit, match="--baseline 'no-such-revision'"):
        speed_ab.main(["--baseline", "no-such-revision", "--out", str(tmp_path / "x.json"), "--", "--num-edits", "1"])
    assert not (tmp_path / "x.json").exists()
