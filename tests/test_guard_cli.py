"""``blueedit edit`` checks everything it can before the slow work, writes atomically, and
reports user errors as one line with exit status 2."""

from __future__ import annotations

import codecs
import json
import os
import time
from pathlib import Path

import pytest
import torch

import blueedit.module
from blueedit.cli import check_output_dir, main
from blueedit.data.formats import load_requests
from blueedit.data.records import EditRecordError, check_prompt_lengths
from helpers import RECORDS, make_model, make_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    make_model("llama").save_pretrained(root / "tiny-llama")
    make_tokenizer().save_pretrained(root / "tiny-llama")
    (root / "edits.json").write_text(json.dumps(RECORDS))
    return root


def _args(root: Path, run: Path, *extra: str, edits: str | None = None, output: str | None = None,
          model: str | None = None) -> list[str]:
    return [
        "edit",
        f"--model.model.name_or_path={model or root / 'tiny-llama'}",
        "--model.editing.layers=[1,2,3]", "--model.editing.strategy=boundary",
        "--model.editing.target.v_num_grad_steps=3",
        "--model.stats.corpus=model-samples", "--model.stats.num_samples=4", "--model.stats.max_length=32",
        f"--model.stats.cache_dir={root / 'cache'}", "--model.evaluate=false",
        "--trainer.accelerator=cpu", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={run}", "--data.edits_per_round=2",
        f"--edits={edits or root / 'edits.json'}", f"--output={output or run / 'edited'}",
        *extra,
    ]


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["blueedit"])  # arguments come from main(args)


@pytest.fixture
def loads(monkeypatch):
    """Counts model loads (the weights are loaded only through this function)."""
    calls = []
    real = blueedit.module.load_model_and_tokenizer

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(blueedit.module, "load_model_and_tokenizer", counting)
    return calls


def _fails(args, capsys, loads, match: str, seconds: float = 20.0) -> str:
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as exc:
        main(args)
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2
    assert not loads, "the model was loaded before the error"
    assert elapsed < seconds, elapsed
    last = err[-1]
    assert last.startswith("blueedit: error: ") and match in last, err
    assert "Traceback" not in "\n".join(err)
    return last


def _write(tmp_path, records) -> str:
    path = tmp_path / "bad.json"
    path.write_text(records if isinstance(records, str) else json.dumps(records))
    return str(path)


R0, R1 = RECORDS[0], RECORDS[1]


@pytest.mark.parametrize("records, match", [
    ("[{not json", "not valid JSON"),
    ([], "holds no edit records"),
    ([R0, {**R1, "target_new": "Dutch"}], "edit record 1 (case_id=1): 'target_new' equals 'target_true'"),
    ([R0, {**R1, "case_id": 0}], "edit records 0 and 1 share case_id=0"),
    ([R0, {k: v for k, v in R1.items() if k != "subject"}], "edit record 1 (case_id=1): missing field 'subject'"),
    ([R0, {**R1, "prompt": "word " * 600 + "{} is"}], "edit record 1 (case_id=1): 'prompt' is"),
])
def test_bad_edit_file_fails_before_the_model_is_loaded(tiny, tmp_path, capsys, loads, records, match):
    _fails(_args(tiny, tmp_path, edits=_write(tmp_path, records)), capsys, loads, match)
    assert not (tmp_path / "edited").exists()


def test_output_checks_fail_before_the_model_is_loaded(tiny, tmp_path, capsys, loads):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    _fails(_args(tiny, tmp_path, output=str(a_file)), capsys, loads, "is a file")
    model_dir = tmp_path / "old-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    _fails(_args(tiny, tmp_path, output=str(model_dir)), capsys, loads, "pass --overwrite")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    _fails(_args(tiny, tmp_path, "--overwrite=true", output=str(other)), capsys, loads, "not a saved model")
    assert (other / "notes.txt").read_text() == "mine"


def _read_only_dir(tmp_path) -> Path:
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        return d / "edited"
    return Path("/sys/blueedit-test/edited")  # root writes anywhere but here


def test_read_only_output_fails_before_the_model_is_loaded(tiny, tmp_path, capsys, loads):
    target = _read_only_dir(tmp_path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        (target.parent / "probe").write_text("x")
        pytest.skip("no read-only location available")
    except OSError:
        pass
    _fails(_args(tiny, tmp_path, output=str(target)), capsys, loads, "cannot write in")


def test_missing_model_directory_is_named(tiny, tmp_path, capsys, loads):
    _fails(_args(tiny, tmp_path, model=str(tmp_path / "no-such-model")), capsys, loads, "no such directory")


def test_unknown_general_capability_task_fails_before_loading(tiny, tmp_path, capsys, loads):
    args = _args(tiny, tmp_path, "--trainer.callbacks+=blueedit.callbacks.progress.GeneralCapability",
                 "--trainer.callbacks.tasks=[sst2,../../etc/passwd]")
    _fails(args, capsys, loads, "GeneralCapability tasks ['../../etc/passwd'] are unknown")
    from blueedit.callbacks.progress import GeneralCapability

    with pytest.raises(ValueError, match="unknown"):
        GeneralCapability(tasks=["sst2", "nope"])


def test_verbose_shows_the_traceback(tiny, tmp_path, loads, monkeypatch):
    monkeypatch.setenv("BLUEEDIT_VERBOSE", "1")
    with pytest.raises(EditRecordError, match="holds no edit records"):
        main(_args(tiny, tmp_path, edits=_write(tmp_path, [])))
    monkeypatch.delenv("BLUEEDIT_VERBOSE")
    with pytest.raises(EditRecordError):
        main(_args(tiny, tmp_path, "--verbose", edits=_write(tmp_path, [])))


def test_prompt_length_limit_names_the_record(tiny):
    tok = make_tokenizer()
    reqs = load_requests(str(tiny / "edits.json"))
    check_prompt_lengths(reqs, tok, 64)
    with pytest.raises(EditRecordError, match=r"edit record 0 \(case_id=0\): 'prompt' is \d+ tokens, over the limit of 5"):
        check_prompt_lengths(reqs, tok, 5)


def test_module_checks_prompt_lengths_before_statistics(tiny, tmp_path, monkeypatch):
    """Without a cheap tokenizer (e.g. a hub model), the module checks after loading, before C_0."""
    import lightning as L

    from helpers import tiny_data as _data
    from helpers import tiny_module as _module

    module = _module(tiny)
    module.max_prompt_tokens = 5
    import blueedit.editing.setup as setup

    monkeypatch.setattr(setup, "cached_key_statistics", lambda *a, **k: pytest.fail("statistics before the check"))
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(EditRecordError, match="over the limit of 5 tokens"):
        trainer.fit(module, datamodule=_data(tiny))  # tiny is laid out like test_module's workdir


def test_check_output_dir_accepts_new_and_empty(tmp_path):
    assert check_output_dir(tmp_path / "new" / "deeper") == (tmp_path / "new" / "deeper").absolute()
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty")


def _w_out(model_dir: Path) -> dict[int, torch.Tensor]:
    from safetensors.torch import load_file

    sd = load_file(str(model_dir / "model.safetensors"))
    return {l: sd[f"model.layers.{l}.mlp.down_proj.weight"] for l in range(6)}


def test_edit_writes_no_checkpoint_unless_asked_and_overwrites_only_when_told(tiny, tmp_path, capsys):
    out = tmp_path / "edited"
    capsys.readouterr()
    main(_args(tiny, tmp_path / "run", output=str(out)))
    printed = capsys.readouterr().out.splitlines()
    # the plan before the first round, the estimate of the rest after it
    plan = printed.index("plan: 6 edit records in 3 rounds of 2 edits (memit + boundary)")
    estimate = [i for i, line in enumerate(printed) if line.startswith("round 1 of 3 took ")]
    assert estimate and estimate[0] > plan, printed
    assert printed[estimate[0]].endswith("s (estimated from round 1)") and "the remaining 2 rounds take about" in \
        printed[estimate[0]]
    assert (out / "edits.json").is_file() and (out / "model.safetensors").is_file()
    assert not list((tmp_path / "run").rglob("*.ckpt")), "a checkpoint was written without being asked for"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directories left behind"
    first = _w_out(out)
    capsys.readouterr()
    main(_args(tiny, tmp_path / "run2", "--overwrite=true", "--trainer.enable_checkpointing=true", output=str(out)))
    assert "replacing the model in" in capsys.readouterr().out
    assert list((tmp_path / "run2").rglob("*.ckpt")), "checkpointing was asked for"
    for l, w in _w_out(out).items():
        assert torch.equal(w, first[l]), l


def test_interrupted_save_leaves_no_half_written_model_and_names_the_checkpoint(tiny, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    reference = tmp_path / "reference"
    main(_args(tiny, tmp_path / "run0", output=str(reference)))
    real = PreTrainedModel.save_pretrained

    def dies_halfway(self, directory, *a, **k):
        real(self, directory, *a, **k)
        Path(directory, "model.safetensors").write_bytes(b"half")  # a torn write, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", dies_halfway)
    out = tmp_path / "edited"
    with pytest.raises(OSError, match="No space left on device") as exc:
        main(_args(tiny, tmp_path / "run", output=str(out)))
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", real)
    assert not out.exists(), "a half-written model is in place"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".edited")], "temporary directory left behind"
    message = str(exc.value)
    assert "--ckpt_path" in message
    ckpt = message.rsplit("--ckpt_path ", 1)[1].split()[0]
    assert Path(ckpt).is_file()
    # the editing is not lost: resuming from the checkpoint saves the same model
    main(_args(tiny, tmp_path / "run", f"--ckpt_path={ckpt}", output=str(out)))
    for l, w in _w_out(out).items():
        assert torch.equal(w, _w_out(reference)[l]), l


@pytest.mark.parametrize("option, match", [
    ("--model.editing.method=foo", "editing.method 'foo' is not one of"),
    ("--model.editing.layers=[4,5,6]", "editing.layers [6] out of range: the model has blocks 0..5"),
    ("--model.max_prompt_tokens=0", "model.max_prompt_tokens must be a positive integer"),
])
def test_bad_option_is_one_line_and_status_2(tiny, tmp_path, capsys, loads, option, match):
    _fails(_args(tiny, tmp_path, option), capsys, loads, match)


def test_resume_from_another_run_is_one_line_and_status_2(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    main(_args(tiny, run, "--trainer.enable_checkpointing=true", output=str(tmp_path / "a")))
    ckpt = next(run.rglob("*.ckpt"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(_args(tiny, run, f"--ckpt_path={ckpt}", "--data.edits_per_round=3", output=str(tmp_path / "b")))
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "refusing to resume" in last and "data.edits_per_round: 2 in the checkpoint, 3 now" in last
    assert not (tmp_path / "b").exists()


def test_an_engine_value_error_keeps_its_traceback(tiny, tmp_path, monkeypatch):
    """Only user input (:class:`blueedit.config.UserInputError`) becomes a one-line error: a
    ``ValueError`` from inside the engine propagates with its traceback."""
    from blueedit.editing.editor import Editor

    def broken(self, *args, **kwargs):
        raise ValueError("an internal failure")

    monkeypatch.setattr(Editor, "edit_round", broken)
    with pytest.raises(ValueError, match="an internal failure"):
        main(_args(tiny, tmp_path / "run", output=str(tmp_path / "out")))


# -- edit files that are empty, not UTF-8, repeated or too long; a missing directory for generate ---------
_TAIL = " (--verbose or BLUEEDIT_VERBOSE=1 for the traceback)"


def test_unreadable_edit_files_are_named_with_what_is_wrong(tiny, tmp_path, capsys, loads):
    text = json.dumps([R0, {**R1, "subject": "Café Central"}], ensure_ascii=False)
    cases = {
        "empty.json": (b"", "{} is empty: it holds no edit records"),
        "blank.jsonl": (b"\n \n", "{} is empty: it holds no edit records"),
        "latin1.json": (text.encode("latin-1"), "{} is not UTF-8 text (byte 0xe9 at offset "
                        + str(text.encode("latin-1").index(b"\xe9"))
                        + " is not valid UTF-8); edit files must be UTF-8: save it as UTF-8"),
        "utf16.json": (text.encode("utf-16"), "{} is UTF-16 text; edit files must be UTF-8: save it as UTF-8"),
        "utf16le.json": (text.encode("utf-16-le"), "{} holds NUL bytes: it is UTF-16 or UTF-32 text without a byte "
                         "order mark, or not text; edit files must be UTF-8: save it as UTF-8"),
    }
    for name, (raw, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(raw)
        last = _fails(_args(tiny, tmp_path, edits=str(path)), capsys, loads, str(path))
        assert last == "blueedit: error: " + message.format(path) + _TAIL
    # a UTF-8 byte order mark is not an error
    (tmp_path / "bom.json").write_bytes(codecs.BOM_UTF8 + text.encode())
    assert [r.subject for r in load_requests(str(tmp_path / "bom.json"))][1] == "Café Central"


def test_generate_names_a_missing_directory(tmp_path, capsys, loads):
    missing = tmp_path / "no-such-edited-model"
    for extra in ([], ["--base", str(tmp_path)]):
        last = _fails(["generate", str(missing), *extra], capsys, loads, str(missing))
        assert last == f"blueedit: error: blueedit generate: {missing} does not exist" + _TAIL


def test_repeated_records_are_dropped_with_their_count_in_seconds(tmp_path):
    from blueedit.data.datamodule import EditDataModule
    from blueedit.data.records import DuplicateRecordsWarning

    path = tmp_path / "same.json"
    path.write_text(json.dumps([{k: v for k, v in R0.items() if k != "case_id"}] * 10_000))
    t0 = time.perf_counter()
    with pytest.warns(DuplicateRecordsWarning) as caught:
        dm = EditDataModule(dataset=str(path), edits_per_round=100)
        dm.setup()
    assert time.perf_counter() - t0 < 10
    assert len(dm.requests) == 1 and dm.num_rounds == 1 and dm.requests[0].case_id == 0
    assert str(caught[0].message) == (f"{str(path)!r}: 9999 edit records repeat an earlier record in everything but "
                                      "case_id and are dropped (records 1, 2, 3, 4, 5, ...); 1 distinct records "
                                      "remain")
    # a repeat under another case_id is dropped; records that differ in any other field are kept, in order
    variants = [R0, {**R0, "case_id": 7, "target_new": "Latin"}, {**R0, "case_id": 8, "subject": "Someone"},
                {**R0, "case_id": 9, "paraphrases": ["Another paraphrase of {}".format(R0["subject"])]},
                {**R0, "case_id": 10}, R1]
    path.write_text(json.dumps(variants))
    with pytest.warns(DuplicateRecordsWarning, match="1 edit records repeat .* \\(records 4\\); 5 distinct"):
        assert [r.case_id for r in load_requests(str(path))] == [0, 7, 8, 9, 1]


def test_max_edits_refuses_a_longer_stream_before_the_model_is_loaded(tiny, tmp_path, capsys, loads):
    from blueedit.data.datamodule import EditDataModule

    last = _fails(_args(tiny, tmp_path, "--data.max_edits=5"), capsys, loads, "data.max_edits")
    assert last == (f"blueedit: error: data.dataset {str(tiny / 'edits.json')!r} holds 6 edit records (3 rounds), more "
                    "than data.max_edits=5; raise data.max_edits, or edit fewer with data.num_edits" + _TAIL)
    dm = EditDataModule(dataset=str(tiny / "edits.json"), max_edits=6)
    dm.setup()
    assert len(dm.requests) == 6
    with pytest.raises(ValueError, match="data.max_edits must be an integer >= 1 or None, got 0"):
        EditDataModule(max_edits=0)


def test_plan_and_estimate_lines():
    from blueedit.callbacks.plan import describe_duration, describe_estimate, describe_plan

    assert [describe_duration(s) for s in (3.25, 45.4, 725, 12_000, 3600)] == \
        ["3.2 s", "45 s", "12 min 5 s", "3 h 20 min", "1 h 0 min"]
    assert describe_plan(10_000, 1000, 10, "memit + boundary") == \
        "plan: 10000 edit records in 1000 rounds of 10 edits (memit + boundary)"
    assert describe_estimate(1, 1000, 45.0) == \
        "round 1 of 1000 took 45 s: the remaining 999 rounds take about 12 h 29 min (estimated from round 1)"
    assert describe_estimate(1, 1, 2.0) == "round 1 of 1 took 2.0 s"
    with pytest.raises(ValueError, match="finite"):
        describe_duration(float("nan"))
