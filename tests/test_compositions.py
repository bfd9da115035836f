"""Compositional records (format, validation, the MAC / MQC builder, the data module) and the
compositional metrics (SR-S, SR-1, GSR, LSR via an LCS Rouge-L, failure counters, bootstrap)."""

from __future__ import annotations

import json

import pytest

from blueedit.data.compositions import (
    CompositionDataModule,
    CompositionRecordError,
    build_cme,
    build_mac,
    build_mqc,
    composition_from_dict,
    load_compositions,
    save_compositions,
    split_of,
)
from blueedit.evaluation.compositional import (
    CompositionOutputs,
    all_present,
    any_present,
    bootstrap_ci,
    lcs_length,
    normalize,
    rouge_l,
    score,
    summarize,
)

RECORD = {"id": "c1", "task": "mac", "query": "Turkey shares border with",
          "edits": [{"prompt": "{} shares border with", "subject": "Turkey", "target_new": "Syria"},
                    {"prompt": "{} shares border with", "subject": "Turkey", "target_new": "Iraq"}],
          "answers": ["Syria", "Iraq"], "ordered": False, "rephrased_queries": ["Turkey is adjacent to"],
          "unrelated_prompts": ["Vasif Talibov is a citizen of"]}


# -- metrics ------------------------------------------------------------------------------------------
def test_normalized_presence_on_word_boundaries_and_order():
    assert normalize("  Syria,  and IRAQ! ") == "syria and iraq"
    assert all_present("Syria, Iraq.", ["Iraq", "Syria"])
    assert not all_present("Syria, Iraq.", ["Iraq", "Syria"], ordered=True)
    assert all_present("Syria, Iraq.", ["Syria", "Iraq"], ordered=True)
    assert not any_present("Iraniana and Syrians", ["Iran", "Syria"])  # no partial words
    assert all_present("Georgia (country) and more", ["Georgia (country)"])


@pytest.mark.parametrize("a, b, n", [("", "abc", 0), ("abc", "abc", 3), ("abcbdab", "bdcaba", 4), ("axbycz", "abc", 3),
                                     ("abc", "def", 0)])
def test_lcs_length(a, b, n):
    assert lcs_length(list(a), list(b)) == n


def test_rouge_l_f1_by_hand():
    # candidate 4 words, reference 5 words, LCS "the cat on mat" = 4 -> P 1, R 0.8, F 8/9
    assert abs(rouge_l("the cat on mat", "the cat sat on mat") - 2 * 1 * 0.8 / 1.8) < 1e-12
    assert rouge_l("same words", "Same words.") == 1.0
    assert rouge_l("", "") == 1.0 and rouge_l("a", "") == 0.0


def test_score_counts_each_failure_type():
    out = CompositionOutputs(query="Iraq and more", rephrased=["Syria, Iraq", "nothing"],
                             unrelated_post=["Syria is here", "x y"], unrelated_pre=["Turkey is here", "x y"],
                             alone=["Syria", "Iraq"], first_ranks=[3, 1])
    s = score(["Syria", "Iraq"], False, out)
    assert s["sr_s"] == 0.0 and s["sr_1"] == 1.0 and s["gsr"] == 0.5
    assert abs(s["lsr"] - (rouge_l("Syria is here", "Turkey is here") + 1.0) / 2) < 1e-12
    assert s["loss"] == 1.0  # Syria alone yes, composed no
    assert s["preceding"] == 1.0  # Syria leaked into an unrelated prompt
    assert s["sinking"] == 1.0  # Syria ranked 3 but not generated
    ordered = CompositionOutputs("B then A", [], [], [], ["A", "B"], [1, 1])
    s = score(["A", "B"], True, ordered)
    assert s["sr_s"] == 0.0 and s["sr_1"] == 1.0 and s["preceding"] == 1.0 and s["loss"] == 0.0


def test_bootstrap_interval():
    assert bootstrap_ci([1.0] * 10) == (1.0, 1.0, 1.0)
    v = [0.0] * 30 + [1.0] * 10
    m, lo, hi = bootstrap_ci(v, seed=3)
    assert m == 0.25 and lo < 0.25 < hi and 0.05 < lo and hi < 0.45
    assert bootstrap_ci(v, seed=3) == (m, lo, hi)
    rows = [{"sr_s": x, "sr_1": 1.0, "gsr": x, "lsr": 1.0, "loss": 1.0, "preceding": 0.0, "sinking": 2.0} for x in v]
    s = summarize(rows)
    assert s["sr_s"]["mean"] == 25.0 and s["sr_1"]["low"] == 100.0 and s["sinking"]["total"] == 80.0


# -- records ------------------------------------------------------------------------------------------
def test_record_round_trip(tmp_path):
    c = composition_from_dict(RECORD, 0)
    assert c.k == 2 and c.edits[1].target_new == "Iraq" and c.edits[1].case_id == "c1:1"
    path = save_compositions([c], tmp_path / "c.json")
    assert load_compositions(path) == [c]


@pytest.mark.parametrize("change, message", [
    ({"answers": ["Syria"]}, "'answers' has 1 entries for 2 edits"),
    ({"ordered": "yes"}, "'ordered' must be true or false"),
    ({"query": ""}, "'query' must be a non-empty string"),
    ({"edits": []}, "'edits' must be a non-empty list"),
    ({"edits": [{"prompt": "no slot", "subject": "Turkey", "target_new": "Syria"}] * 2}, "'edits\\[0\\]'.*slot"),
    ({"colour": 1}, "unknown field"),
])
def test_bad_records_are_named(tmp_path, change, message):
    bad = {**RECORD, "id": "c2", **change}
    path = tmp_path / "c.json"
    path.write_text(json.dumps([RECORD, bad]))
    with pytest.raises(CompositionRecordError, match=f"composition record 1 \\(id='c2'\\).*{message}"):
        load_compositions(path)


def test_duplicate_ids_are_refused(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps([RECORD, RECORD]))
    with pytest.raises(CompositionRecordError, match="share id='c1'"):
        load_compositions(path)


# -- the builder ----------------------------------------------------------------------------------------
def _peak(n: int = 60) -> list[dict]:
    return [{"case_id": i,
             "requested_rewrite": {"prompt": "{} borders", "subject": f"Land{i}", "target_new": {"str": f"New{i}"},
                                   "target_true": {"str": f"Old{i}a"}},
             "postive_list": [f"Old{i}a", f"Old{i}b", f"old{i}B", f"Old{i}c"], "negtive_list": [],
             "para_add_prompts": [f"Land{i} is next to"], "neighborhood_prompts": [[f"Other{i} is in", "X"]]}
            for i in range(n)]


def test_builder_is_deterministic_split_and_filtered():
    peak = _peak()
    mac = build_mac(peak, 3, 5, "report", seed=1, missed=lambda q, a: not a.endswith("b"))
    assert mac == build_mac(peak, 3, 5, "report", seed=1, missed=lambda q, a: not a.endswith("b"))
    assert len(mac) == 5
    for c in mac:
        i = int(c.id.split("-")[1])
        assert split_of(i) == "report" and c.answers == (f"Old{i}a", f"old{i}B", f"Old{i}c")
        assert c.query.endswith(f"Land{i} borders") and c.query.count("\n") == 3 and not c.ordered
        assert c.rephrased_queries[0].endswith(f"Land{i} is next to") and c.unrelated_prompts == (f"Other{i} is in",)
    dev = build_mac(peak, 2, 50, "dev")
    assert {c.edits[0].subject for c in dev}.isdisjoint({c.edits[0].subject for c in build_mac(peak, 2, 50, "report")})
    assert all(len({a.lower() for a in c.answers}) == 2 for c in dev)


def test_mqc_pairs_two_subjects_in_order():
    mqc = build_mqc(_peak(), 4, "dev")
    assert len(mqc) == 4
    for c in mqc:
        s1, s2 = (e.subject for e in c.edits)
        assert s1 != s2 and c.ordered and c.answers == tuple(e.target_new for e in c.edits)
        assert c.query.endswith(f'The answers of the questions "{s1} borders", "{s2} borders" are')
        assert c.query.count("respectively.\n") == 3


def test_build_cme_writes_both_splits_and_the_data_module_streams_rounds(tmp_path):
    (tmp_path / "peak").mkdir()
    (tmp_path / "peak" / "PEAK_counter.json").write_text(json.dumps(_peak()))
    written = build_cme(tmp_path, tmp_path / "cme", {"dev": 3, "report": 4})
    assert sorted(written) == sorted(f"{t}_{s}" for t in ("mac_k2", "mac_k3", "mqc") for s in ("dev", "report"))
    dm = CompositionDataModule(written["mac_k3_report"])
    dm.setup("fit")
    assert dm.num_rounds == 4 and len(dm.requests) == 12
    assert [len(r) for r in dm.train_dataloader()] == [3, 3, 3, 3]
