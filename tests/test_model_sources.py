"""GGUF de-quantization under a race and after a crash; the prompt-length check reads the tokenizer
alone, before any weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import blueedit.module
from blueedit.cli import main
from blueedit.models.loading import ModelConfig, fill_once, local_model_dir
from helpers import RECORDS, make_model, make_tokenizer
from tiny_gguf import write_tiny_gguf

SRC = str(Path(__file__).resolve().parents[1] / "src")
TESTS = str(Path(__file__).resolve().parent)


def _run_together(script: str, n: int, tmp_path: Path) -> list[subprocess.CompletedProcess]:
    """Run ``script`` in ``n`` processes that wait for each other before its main part (the
    script calls ``ready()``), and return their results."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    prelude = textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        def ready():
            Path({str(barrier)!r}, str(os.getpid())).touch()
            while len(os.listdir({str(barrier)!r})) < {n}:
                time.sleep(0.01)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, TESTS, os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(script)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def test_fill_once_writes_once_under_a_race_and_clears_crashed_runs(tmp_path):
    target = tmp_path / "models" / "m-123"
    target.parent.mkdir()
    crashed = target.with_name(target.name + ".tmp999999-deadbeef")  # a run killed while converting
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"half")
    log = tmp_path / "writes.log"
    results = _run_together(f"""
        from blueedit.models.loading import fill_once
        def write(tmp):
            with open({str(log)!r}, "a") as fh:
                fh.write(f"{{os.getpid()}}\\n")
            tmp.mkdir()
            (tmp / "config.json").write_text("{{}}")
            time.sleep(1.0)  # the other process asks meanwhile
            (tmp / "model.safetensors").write_bytes(b"weights")
        ready()
        print(fill_once(Path({str(target)!r}), write))
    """, 2, tmp_path)
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    assert [r.stdout.strip() for r in results] == [str(target)] * 2
    assert len(log.read_text().split()) == 1, "converted twice"
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["m-123", "m-123.lock"]


def test_fill_once_clears_crashed_runs_beside_a_complete_directory(tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    (target / "config.json").write_text("{}")
    crashed = [tmp_path / "m.tmp999999", tmp_path / "m.tmp999998-0badf00d"]  # processes that are gone
    running = tmp_path / f"m.tmp{os.getpid()}"  # a process still converting (this one)
    for d in (*crashed, running):
        d.mkdir()
    assert fill_once(target, lambda tmp: pytest.fail("converted again")) == target
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m", "m.lock", running.name])


def test_fill_once_removes_its_directory_when_writing_fails(tmp_path):
    target = tmp_path / "m"

    def dies(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        fill_once(target, dies)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.lock"]


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gguf")
    write_tiny_gguf(root / "tiny.gguf")
    return root


def test_two_concurrent_gguf_conversions_leave_one_model_directory(gguf_dir, tmp_path):
    cache = tmp_path / "cache"
    results = _run_together(f"""
        from blueedit.models.loading import ModelConfig, load_model_and_tokenizer
        ready()
        model, tok = load_model_and_tokenizer(ModelConfig(name_or_path={str(gguf_dir / 'tiny.gguf')!r}), {str(cache)!r})
        print(type(model).__name__, sum(p.numel() for p in model.parameters()))
    """, 2, tmp_path)
    assert all(r.returncode == 0 for r in results), [r.stderr[-2000:] for r in results]
    assert len({r.stdout for r in results}) == 1 and results[0].stdout.startswith("LlamaForCausalLM")
    entries = sorted(p.name for p in (cache / "models").iterdir())
    converted = local_model_dir(ModelConfig(name_or_path=str(gguf_dir / "tiny.gguf")), cache)
    assert converted is not None and entries == [converted.name, converted.name + ".lock"], entries


# -- the prompt-length check before any weights ----------------------------------------------------------
@pytest.fixture
def no_weights(monkeypatch):
    """Fails the test when a model's weights are loaded or a GGUF is de-quantized."""
    import transformers

    def refuse(*a, **k):
        pytest.fail(f"weights were loaded: {a} {k}")

    monkeypatch.setattr(blueedit.module, "load_model_and_tokenizer", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr("sys.argv", ["blueedit"])


def _too_long(tmp_path: Path, model: str, capsys) -> str:
    edits = tmp_path / "edits.json"
    edits.write_text(json.dumps([RECORDS[0], {**RECORDS[1], "prompt": "word " * 600 + "{} is"}]))
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as exc:
        main(["edit", f"--model.model.name_or_path={model}", "--model.editing.layers=[0,1]",
              f"--model.cache_dir={tmp_path / 'cache'}", f"--model.stats.cache_dir={tmp_path / 'cache'}",
              "--trainer.accelerator=cpu", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
              f"--edits={edits}", f"--output={tmp_path / 'edited'}"])
    assert exc.value.code == 2 and time.perf_counter() - t0 < 60
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "edit record 1 (case_id=1): 'prompt' is" in last and "over the limit of" in last, last
    assert not (tmp_path / "edited").exists()
    return last


def test_too_long_prompt_fails_without_reading_a_weight_file(tmp_path, capsys, no_weights):
    model = tmp_path / "model"
    make_model("llama", n_layer=2).save_pretrained(model)
    make_tokenizer().save_pretrained(model)
    weights = model / "model.safetensors"
    weights.write_bytes(b"\0" * 64)  # unreadable as weights, and unreadable at all for a non-root user
    weights.chmod(0)
    try:
        _too_long(tmp_path, str(model), capsys)
    finally:
        weights.chmod(0o644)


def test_too_long_prompt_fails_before_a_gguf_is_dequantized(gguf_dir, tmp_path, capsys, no_weights):
    _too_long(tmp_path, str(gguf_dir / "tiny.gguf"), capsys)
    assert not (tmp_path / "cache" / "models").exists(), "the GGUF was de-quantized before the check"
