"""The per-round ΔW of every method × strategy on a tiny random model equals the pinned digests
(``tests/fixtures/pinned_deltas.json``, written by ``python tests/pinned_deltas.py``) to float
round-off: a refactoring of the engine must not change any edit."""

from __future__ import annotations

import json
import math

import pytest

from pinned_deltas import CASES, FIXTURE, case_digests

RTOL = 1e-6


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_deltas_match_pinned(name):
    pinned = json.loads(FIXTURE.read_text())[name]
    got = case_digests(name)
    assert sorted(got) == sorted(pinned)
    for key, want in pinned.items():
        norm = want[0]
        assert math.isclose(got[key][0], norm, rel_tol=RTOL, abs_tol=1e-12), (key, got[key][0], norm)
        # the sum and the projections move by about ‖E‖ for a change E of the tensor
        for g, w in zip(got[key][1:], want[1:]):
            assert abs(g - w) <= 4 * RTOL * norm + 1e-12, (key, g, w, norm)
