"""`.ci/run` itself: it runs under `set -euo pipefail`, so an unset variable after the suite fails CI.

The script is run with `make` replaced by a stub that records its arguments, so the test checks the
whole script (not the suite it calls) in a second.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("docker", [None, "0"])
def test_ci_script_runs_to_the_end_with_docker_off(tmp_path, docker):
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir()
    calls = tmp_path / "make-calls"
    make = stub_dir / "make"
    make.write_text(f'#!/usr/bin/env bash\necho "$@" >> {calls}\n')
    make.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "BLUEEDIT_CI_DOCKER"}
    env["PATH"] = f"{stub_dir}:{env['PATH']}"
    if docker is not None:
        env["BLUEEDIT_CI_DOCKER"] = docker
    proc = subprocess.run(
        ["bash", str(ROOT / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert calls.read_text().split() == ["lint", "test"]
    assert "docker smoke test: off" in proc.stdout


def test_ci_script_lints_with_ruff():
    """`make lint` runs ruff over the checkout, with the rules in pyproject.toml; ruff is a test extra."""
    import tomllib

    makefile = (ROOT / "Makefile").read_text()
    lint = makefile.split("\nlint:", 1)[1].split("\n\n", 1)[0]
    assert "ruff check ." in lint
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert any(d.startswith("ruff") for d in project["project"]["optional-dependencies"]["test"])
    assert project["tool"]["ruff"]["lint"]["select"]


def test_ci_script_calls_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
