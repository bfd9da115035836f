"""The README's Python example runs (on a tiny random model), and ``blueedit`` exports what it uses."""

from __future__ import annotations

import re

import pytest

import blueedit
from helpers import REPO, make_model, make_tokenizer


def _python_api_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the Python API section has no python block"
    return match.group(1)


def test_public_names_resolve():
    assert len(blueedit.__all__) == len(set(blueedit.__all__))
    for name in blueedit.__all__:
        assert getattr(blueedit, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        blueedit.nope  # noqa: B018


def test_readme_python_example_runs(tmp_path, capsys):
    model_dir = tmp_path / "tiny-llama"
    make_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    code = _python_api_example()
    imported = re.search(r"from blueedit import \((.*?)\)", code, re.S).group(1)
    assert {n.strip() for n in imported.split(",") if n.strip()} <= set(blueedit.__all__)
    # the same program on the tiny model: its path, three of its six blocks, fewer and shorter texts
    for real, tiny in [('"smollm2-135m"', repr(str(model_dir))), ("[4, 5, 6, 7, 8]", "[1, 2, 3]"),
                       ("num_samples=64", "num_samples=4"), ("max_new_tokens=128", "max_new_tokens=16")]:
        assert real in code, real
        code = code.replace(real, tiny)
    scope: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), scope)
    report, requests = scope["report"], scope["requests"]
    assert len(requests) == 8 and report.case_ids == [r.case_id for r in requests]
    assert set(report.update_norms) == {1, 3} and all(n > 0 for n in report.update_norms.values())
    assert "efficacy" in capsys.readouterr().out


def test_readme_quickstart_output_is_the_measured_one():
    """The quick start's printed table and time are those of ``benchmarks/results/quickstart.md``."""
    readme = (REPO / "README.md").read_text()
    measured = (REPO / "benchmarks" / "results" / "quickstart.md").read_text()
    printed = re.search(r"```\n(memit .*?)```", measured, re.S).group(1)
    shown = re.search(r"```\n(memit .*?)```", readme.split("## Quick start", 1)[1], re.S).group(1)
    assert shown.strip() == "\n".join(printed.strip().splitlines()[:-1]).strip()  # all but the run directory line
    wall = float(re.search(r"time: ([\d.]+) s wall", measured).group(1))
    assert f"took {wall:.1f} s" in readme


def test_readme_is_a_manual():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 350
    assert "../shared" not in readme and "/work/" not in readme
    for heading in ("## Quick start", "## Editing your model", "### Data", "## Continuing, undoing and seeing edits",
                    "## What blueedit refuses", "## Monitoring", "## Scaling out", "## Docker", "## Python API",
                    "## Architecture", "## Results"):
        assert heading in readme, heading


def test_readme_names_only_files_that_exist():
    """Every repository path and relative link the README names exists (user paths such as
    ``my_edits.jsonl`` or ``edited/`` are not repository paths)."""
    readme = (REPO / "README.md").read_text()
    paths = set(re.findall(r"(?<![\w/.-])((?:configs|benchmarks|docs|docker|examples|src|tests)/[\w./-]*[\w])", readme))
    paths |= {p.split("#")[0] for p in re.findall(r"\]\(([^)#:]+(?:#[^)]*)?)\)", readme)}
    missing = sorted(p for p in paths if p and not (REPO / p).exists())
    assert not missing, missing
    assert len(paths) > 20
