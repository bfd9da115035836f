"""The retention matrix and forgetting curve, from a scripted sequence of per-record successes."""

from __future__ import annotations

import csv
import math

import pytest

from blueedit.evaluation.retention import (
    forgetting_curve,
    retention_from_history,
    retention_matrix,
    write_retention,
)

# 3 rounds of 2 records (rounds of origin 0, 0, 1, 1, 2, 2); after each round the records edited so far
SCRIPT = [
    (0, [100, 100]),
    (1, [100, 0, 100, 100]),
    (2, [0, 0, 100, None, 100, 0]),  # record 3 has no value at t = 2
]
ORIGIN = [0, 0, 1, 1, 2, 2]


def test_retention_matrix_of_a_scripted_sequence():
    r = retention_matrix(SCRIPT, ORIGIN)
    assert r.eval_rounds == [0, 1, 2] and r.origin_rounds == [0, 1, 2]
    want = [[100, None, None],
            [50, 100, None],
            [0, 100, 50]]
    for row, expected in zip(r.values, want):
        assert [None if math.isnan(v) else v for v in row] == expected
    assert r.counts == [[2, 0, 0], [2, 2, 0], [2, 1, 2]]


def test_forgetting_curve_pools_cells_of_one_age_by_records():
    r = retention_matrix(SCRIPT, ORIGIN)
    # age 0: (0,0) 100 x2, (1,1) 100 x2, (2,2) 50 x2 -> 500/6; age 1: (1,0) 50 x2, (2,1) 100 x1 -> 200/3; age 2: 0
    curve = forgetting_curve(r)
    assert [a for a, _, _ in curve] == [0, 1, 2]
    assert curve[0][1] == pytest.approx(500 / 6) and curve[0][2] == 6
    assert curve[1][1] == pytest.approx(200 / 3) and curve[1][2] == 3
    assert curve[2] == (2, 0.0, 2)


def test_retention_from_a_sequence_history_and_its_files(tmp_path):
    history = [{"round": -1, "records": [{"efficacy": 0.0}] * 6}]  # before editing: not a row
    history += [{"round": t, "records": [{"case_id": i, "efficacy": v} for i, v in enumerate(vals)]}
                for t, vals in SCRIPT]
    r = retention_from_history(history, edits_per_round=2, metric="efficacy")
    assert r.eval_rounds == [0, 1, 2] and r.values[2][1] == 100 and r.counts[2][1] == 1
    assert retention_from_history(history, 2, "efficacy_wild") is None  # not measured
    shifted = retention_from_history(history, 2, "efficacy", first_round=5)  # continuing 5 earlier rounds
    assert shifted.origin_rounds == [5, 6, 7]
    paths = write_retention(r, tmp_path, "retention_efficacy", "test")
    assert [p.name for p in paths] == ["retention_efficacy.csv", "retention_efficacy_forgetting.csv",
                                       "retention_efficacy.png"]
    rows = list(csv.DictReader(paths[0].open()))
    assert len(rows) == 6 and rows[-1] == {"eval_round": "2", "origin_round": "2", "age": "0", "value": "50.0000",
                                           "records": "2"}
    assert paths[2].stat().st_size > 0


def test_more_records_than_origins_is_an_error():
    with pytest.raises(ValueError, match="round of origin"):
        retention_matrix([(0, [1, 1, 1])], [0, 0])
