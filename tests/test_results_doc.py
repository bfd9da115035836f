"""``docs/results.md``: what ``benchmarks/results_doc.py`` makes from the committed result files, and
every number in each of its sections found in a result file that the section links."""

from __future__ import annotations

import re
from pathlib import Path

from helpers import REPO

DOC = REPO / "docs" / "results.md"
NUMBER = re.compile(r"^[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?$")
FILE_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
LINK = re.compile(r"\]\((\.\./benchmarks/results/[^)]+)\)")


def sections(text: str) -> list[tuple[str, str]]:
    """``(heading, body)`` for each heading of the page, fenced code blocks removed."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    parts = re.split(r"^(#{1,4} .*)$", text, flags=re.M)
    return [(parts[i], parts[i] + "\n" + parts[i + 1]) for i in range(1, len(parts) - 1, 2)]


def numbers_in(body: str) -> list[str]:
    """The numbers a reader sees: inline code and link targets left out."""
    body = re.sub(r"`[^`]*`", " ", body)
    body = re.sub(r"\]\([^)]*\)", "]", body)
    out = []
    for token in body.split():
        token = token.strip("|()[]{},;:*\"'").rstrip(".")
        if NUMBER.match(token):
            out.append(token)
    return out


def file_numbers(path: Path) -> list[float]:
    if path.is_dir():
        return [v for p in sorted(path.rglob("*")) if p.is_file() for v in file_numbers(p)]
    if path.suffix in (".png", ".jpg"):
        return []
    return [float(m) for m in FILE_NUMBER.findall(path.read_text())]


def shown_as(token: str, values: list[float]) -> bool:
    """Whether some file value, rounded to the token's decimals (or as a percentage of a fraction),
    is the number shown."""
    x = float(token.replace(",", ""))
    decimals = len(token.split(".")[1]) if "." in token else 0
    tol = 0.5 * 10 ** -decimals + 1e-9
    return any(abs(v - x) <= tol or abs(100 * v - x) <= tol for v in values)


def unsupported_numbers(text: str) -> list[str]:
    """``"heading: number"`` for every number that no file linked in its section holds."""
    bad = []
    for heading, body in sections(text):
        cited = {(REPO / "docs" / target).resolve() for target in LINK.findall(body)}
        values = [v for path in sorted(cited) for v in file_numbers(path)]
        bad += [f"{heading}: {tok}" for tok in numbers_in(body) if not shown_as(tok, values)]
    return bad


def test_results_doc_is_what_the_generator_makes():
    from blueedit.bench import results_doc

    assert results_doc.main(["--check"]) == 0, "stale: run python benchmarks/results_doc.py"


def test_every_number_is_in_a_result_file_its_section_cites():
    text = DOC.read_text()
    assert len(sections(text)) > 10 and len(numbers_in(text)) > 300
    assert unsupported_numbers(text) == []


def test_the_number_check_can_fail():
    text = DOC.read_text()
    heading = "## Claim (b): the weight shift error"
    assert heading in text
    # a number no cited file holds, and a section that cites nothing
    tampered = text.replace(heading, heading + "\n\nThe error grew by 31.4159 points.", 1)
    assert unsupported_numbers(tampered) == [f"{heading}: 31.4159"]
    assert unsupported_numbers("## A section\n\nIt took 12.5 s.\n") == ["## A section: 12.5"]


def test_results_doc_names_no_path_outside_the_repository():
    text = DOC.read_text()
    assert "../shared" not in text and "/work/" not in text


def test_a_long_pair_with_per_record_values_is_picked_up(tmp_path, monkeypatch):
    """A 2,000-edit pair's run records (runs/memit_{distribute,boundary}.json with per-record values)
    appear as a paired table and in the verdict of claim (a)."""
    import json

    from blueedit.bench import results_doc

    real = results_doc.RESULTS
    for entry in real.iterdir():
        if entry.name not in ("counterfact_memit_2000", "zsre_memit_1000"):  # replaced below
            (tmp_path / entry.name).symlink_to(entry)
    (tmp_path / "zsre_memit_1000").mkdir()  # the aggregate files, and a rerun's per-record values beside them
    for entry in (real / "zsre_memit_1000").iterdir():
        (tmp_path / "zsre_memit_1000" / entry.name).symlink_to(entry)
    for name in ("counterfact_memit_2000", "zsre_memit_1000"):
        runs = tmp_path / name / "runs"
        runs.mkdir(parents=True)
        for strategy, failed in (("distribute", 30), ("boundary", 10)):
            history = [{"edits": e, "round": e // 100 - 1, "kind": "counterfact", "metrics": {},
                        "records": [{"case_id": i, "efficacy": 0.0 if i < failed * e // 1000 else 100.0,
                                     "generalization": 50.0, "specificity": 100.0} for i in range(e)]}
                       for e in (500, 1000)]
            (runs / f"memit_{strategy}.json").write_text(json.dumps(
                {"command": f"python benchmarks/sequence.py --name {name} --runs memit:{strategy}",
                 "sequence": history, "versions": {"torch": "t"}}))
    monkeypatch.setattr(results_doc, "RESULTS", tmp_path)
    with results_doc.contextlib.chdir(REPO):
        page = results_doc.build_page(set(results_doc.paired_outputs()))
    assert "### MEMIT + BLUE against MEMIT, CounterFact, 1,000 edits, paired" in page
    assert "| 1000 | efficacy | 1000 | 97.00 | 99.00 | +2.00 |" in page
    assert "Paired, MEMIT at 1,000 CounterFact edits" in page and "BLUE leads: efficacy +2.00 [" in page
    assert "a tie: generalization +0.00 [+0.00, +0.00]" in page
    assert "--runs memit:boundary" in page
    assert "at 1,000 edits record by record for MEMIT" in page and "so untested" not in page
    # a rerun with per-record values is paired too, and leaves the table of aggregates
    assert "### MEMIT + BLUE against MEMIT, zsRE, 1,000 edits, paired" in page
    assert "Paired, MEMIT at 1,000 zsRE edits" in page
    aggregates = page.split("(aggregates only)", 1)[1].split("### 500 sequential edits", 1)[0]
    assert "zsRE, memit" not in aggregates and "CounterFact, memit" in aggregates


def test_recorded_commands_drop_machine_paths_whole():
    from blueedit.bench.results_doc import sanitize

    shown = sanitize("python benchmarks/lifelong.py --num-edits 100 --workdir /work/runs/lifelong/workF "
                     "--out /work/runs/lifelong/F --data-dir /work/shared/data --published /tmp/x/BLUE --runs A=a.yaml")
    assert "/work" not in shown and "/tmp" not in shown and "--num-edits 100 --out runs/lifelong/F" in shown
    assert "--data-dir $BLUEEDIT_DATA_DIR --published ../published-BLUE --runs A=a.yaml" in shown
