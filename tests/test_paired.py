"""Paired statistics against oracles that share no code with ``blueedit.evaluation.paired``:
McNemar's p by enumerating every assignment of the discordant pairs, by hand on tiny tables, and
the bootstrap interval against the normal approximation and on constant differences."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from blueedit.evaluation.paired import (
    align_records,
    bootstrap_interval,
    compare_records,
    mcnemar_exact,
    paired_difference,
    record_success,
    verdict,
)


def _mcnemar_by_enumeration(a_only: int, b_only: int) -> float:
    """P(an assignment of the m discordant pairs to A or B, each with probability ½, is at least as far
    from m/2 as the one observed): the exact two-sided p, found by listing all 2^m assignments."""
    m = a_only + b_only
    if m == 0:
        return 1.0
    far = abs(a_only - m / 2)
    hits = sum(1 for signs in itertools.product((0, 1), repeat=m) if abs(sum(signs) - m / 2) >= far)
    return hits / 2 ** m


def _outcomes(both: int, a_only: int, b_only: int, neither: int) -> tuple[list[bool], list[bool]]:
    a = [True] * both + [True] * a_only + [False] * b_only + [False] * neither
    b = [True] * both + [False] * a_only + [True] * b_only + [False] * neither
    return a, b


@pytest.mark.parametrize("a_only,b_only", [(0, 0), (0, 5), (5, 0), (1, 6), (3, 3), (2, 9), (7, 4), (0, 12)])
def test_mcnemar_matches_enumeration(a_only, b_only):
    sa, sb = _outcomes(4, a_only, b_only, 3)
    got_a, got_b, p = mcnemar_exact(torch.tensor(sa), torch.tensor(sb))
    assert (got_a, got_b) == (a_only, b_only)
    assert p == pytest.approx(_mcnemar_by_enumeration(a_only, b_only), abs=1e-12)


def test_mcnemar_by_hand():
    # 0 against 5 discordant pairs: both one-sided extremes, 2 · 1/32
    assert mcnemar_exact(*map(torch.tensor, _outcomes(10, 0, 5, 0)))[2] == pytest.approx(0.0625)
    # 1 against 6: 2 · (C(7,0) + C(7,1)) / 2^7 = 16/128, from math.comb written out here
    assert mcnemar_exact(*map(torch.tensor, _outcomes(0, 1, 6, 2)))[2] == pytest.approx(
        2 * (math.comb(7, 0) + math.comb(7, 1)) / 128)
    # no discordant pair: nothing separates the arms
    assert mcnemar_exact(torch.tensor([True, False]), torch.tensor([True, False])) == (0, 0, 1.0)
    with pytest.raises(ValueError, match="3 outcomes in A against 2 in B"):
        mcnemar_exact(torch.tensor([True] * 3), torch.tensor([True] * 2))


def test_bootstrap_constant_differences_give_a_point():
    low, high = bootstrap_interval(torch.full((37,), 2.5), num_resamples=500)
    assert low == pytest.approx(2.5) and high == pytest.approx(2.5)


def test_bootstrap_matches_the_normal_approximation():
    # 400 records, a quarter gain 100 points: mean 25, standard error 100·sqrt(.25·.75/400)
    d = torch.tensor([100.0] * 100 + [0.0] * 300)
    low, high = bootstrap_interval(d, num_resamples=20_000, seed=3)
    se = 100 * math.sqrt(0.25 * 0.75 / 400)
    assert low == pytest.approx(25 - 1.96 * se, abs=0.5)
    assert high == pytest.approx(25 + 1.96 * se, abs=0.5)
    # a narrower confidence gives a narrower interval; the same seed the same interval
    low90, high90 = bootstrap_interval(d, num_resamples=20_000, seed=3, confidence=0.9)
    assert low < low90 < high90 < high
    assert bootstrap_interval(d, num_resamples=2_000, seed=1) == bootstrap_interval(d, num_resamples=2_000, seed=1)


def test_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError, match="no records"):
        bootstrap_interval(torch.tensor([]))
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval(torch.ones(3), confidence=95)


def test_identical_arms_tie():
    rng = random.Random(0)
    values = [rng.choice([0.0, 50.0, 100.0]) for _ in range(60)]
    res = paired_difference(values, values, "generalization", num_resamples=1_000)
    assert (res.difference, res.low, res.high, res.a_only, res.b_only, res.p_value) == (0.0, 0.0, 0.0, 0, 0, 1.0)
    assert res.verdict == "tie" and res.n == 60


def test_verdict_rule():
    assert verdict(0.1, 3.0) == "B"
    assert verdict(-3.0, -0.1) == "A"
    assert verdict(-0.5, 2.0) == "tie"
    assert verdict(0.0, 2.0) == "tie"  # an interval that reaches 0 does not separate the arms


def test_record_success_is_more_than_half():
    # CounterFact efficacy 0/100; generalization of two paraphrases 50 (one of two) is not a success
    assert record_success(torch.tensor([0.0, 100.0, 50.0, 66.7, 33.3])).tolist() == [False, True, False, True, False]


def test_one_sided_lead_and_counts():
    # B wins 8 records A loses, A none: d = 100 on 8 of 40 records
    a = [0.0] * 8 + [100.0] * 32
    b = [100.0] * 40
    res = paired_difference(a, b, "efficacy", num_resamples=4_000)
    assert res.difference == pytest.approx(20.0)
    assert (res.a_only, res.b_only) == (0, 8)
    assert res.p_value == pytest.approx(2 / 2 ** 8)
    assert res.low > 0 and res.verdict == "B"
    assert res.mean_a == pytest.approx(80.0) and res.mean_b == pytest.approx(100.0)


def test_compare_records_pairs_by_case_id():
    ra = [{"case_id": i, "efficacy": 100.0 * (i % 2), "specificity": 50.0} for i in range(10)]
    rb = [{"case_id": i, "efficacy": 100.0, "specificity": 50.0} for i in reversed(range(10))]
    res = {r.metric: r for r in compare_records(ra, rb, ["efficacy", "generalization", "specificity"],
                                                num_resamples=500)}
    assert set(res) == {"efficacy", "specificity"}  # no record has generalization
    assert res["efficacy"].difference == pytest.approx(50.0) and res["efficacy"].b_only == 5
    assert res["specificity"].verdict == "tie"


def test_align_records_names_the_fault():
    with pytest.raises(ValueError, match=r"only in run_a: \[3\]"):
        align_records([{"case_id": 1}, {"case_id": 3}], [{"case_id": 1}], "run_a", "run_b")
    with pytest.raises(ValueError, match="run_b: case_id 1 occurs twice"):
        align_records([{"case_id": 1}], [{"case_id": 1}, {"case_id": 1}], "run_a", "run_b")
    with pytest.raises(ValueError, match="run_a: record 0 has no case_id"):
        align_records([{}], [{"case_id": 1}], "run_a", "run_b")
    with pytest.raises(ValueError, match="case_id 2: efficacy is in B only"):
        compare_records([{"case_id": 2}], [{"case_id": 2, "efficacy": 0.0}], ["efficacy"])


# -- benchmarks/paired.py on a synthetic pair of sequence run records ------------------------------
def _run_record(run: str, efficacy_of, points=(50, 100), with_records=True) -> dict:
    history = [{"edits": 0, "round": -1, "num_records": 100, "kind": "counterfact", "metrics": {},
                "records": [{"case_id": i, "efficacy": 0.0} for i in range(100)]}]
    for edits in points:
        entry = {"edits": edits, "round": edits // 50 - 1, "num_records": edits, "kind": "counterfact",
                 "metrics": {}}
        if with_records:
            entry["records"] = [{"case_id": i, "efficacy": efficacy_of(i, edits), "generalization": 50.0,
                                 "specificity": 100.0 * (i % 3 == 0)} for i in range(edits)]
        history.append(entry)
    return {"run": run, "sequence": history, "versions": {"transformers": "x.y", "torch": "t"}}


def test_paired_cli_compares_every_evaluation_point(tmp_path):
    import csv
    import json

    from blueedit.bench import paired

    runs = tmp_path / "res" / "runs"
    runs.mkdir(parents=True)
    # A fails records 0-9 at 50 edits and 0-19 at 100; B fails none: B leads by 20 points at both points
    (runs / "m_distribute.json").write_text(json.dumps(
        _run_record("m_distribute", lambda i, e: 0.0 if i < e // 5 else 100.0)))
    (runs / "m_boundary.json").write_text(json.dumps(_run_record("m_boundary", lambda i, e: 100.0)))
    payload = paired.main(["--results", str(tmp_path / "res"), "--runs", "m_distribute", "m_boundary",
                           "--resamples", "2000"])
    rows = {(r["edits"], r["metric"]): r for r in payload["rows"]}
    assert set(rows) == {(e, m) for e in (50, 100) for m in ("efficacy", "generalization", "specificity")}
    eff = rows[(100, "efficacy")]
    assert (eff["n"], eff["b_only"], eff["a_only"], eff["verdict"]) == (100, 20, 0, "B")
    assert eff["difference"] == pytest.approx(20.0) and eff["p_value"] == pytest.approx(2 / 2 ** 20)
    assert rows[(50, "efficacy")]["difference"] == pytest.approx(20.0)
    assert rows[(100, "specificity")]["verdict"] == "tie" and rows[(100, "specificity")]["p_value"] == 1.0
    written = list(csv.DictReader(open(tmp_path / "res" / "paired.csv")))
    assert len(written) == 6 and written[0]["edits"] == "50"
    md = (tmp_path / "res" / "paired.md").read_text()
    assert "| 100 | efficacy | 100 | 80.00 | 100.00 | +20.00 |" in md and "m_boundary only" in md
    assert json.loads((tmp_path / "res" / "paired.json").read_text())["versions"]["m_boundary"]["torch"] == "t"


def test_paired_cli_refuses_runs_without_records(tmp_path):
    import json

    from blueedit.bench import paired

    runs = tmp_path / "runs"
    runs.mkdir()
    for name in ("a", "b"):
        (runs / f"{name}.json").write_text(json.dumps(_run_record(name, lambda i, e: 100.0, with_records=False)))
    with pytest.raises(SystemExit, match="share no evaluation point with per-record values"):
        paired.main(["--results", str(tmp_path), "--runs", "a", "b"])
    with pytest.raises(SystemExit, match="no such file"):
        paired.main(["--results", str(tmp_path), "--runs", "a", "missing"])
