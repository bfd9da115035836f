"""Edit-record formats, the data module's rounds, and the covariance-statistics corpora."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from blueedit.data.corpus import (
    CorpusUnavailable,
    corpus_fingerprint,
    load_corpus_texts,
    resolve_corpus_source,
)
from blueedit.data.datamodule import EditDataModule, EditRound, RoundDataset, RoundLoader, RoundSampler
from blueedit.data.formats import (
    DATA_DIR_ENV,
    default_data_dir,
    detect_format,
    from_easyedit,
    from_zsre,
    load_examples,
    load_requests,
    read_records,
)
from blueedit.data.records import EditRecordError, EditRequest
from blueedit.models.sampling import model_sampled_texts
from helpers import make_model, make_tokenizer

# --------------------------------------------------------------------------------------------
# helpers


def _user(**overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "prompt": "The capital of {} is",
        "subject": "France",
        "target_new": "Rome",
        "target_true": "Paris",
        "paraphrases": ["France's capital city is"],
        "neighborhood": ["The Louvre is in the city of"],
    }
    record.update(overrides)
    return record


def _write(path: Path, rows: list[Any]) -> Path:
    if path.name.endswith(".jsonl"):
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        path.write_text(json.dumps(rows))
    return path


def _requests(n: int) -> list[EditRequest]:
    return [EditRequest(case_id=i, prompt="{} is", subject=f"s{i}", target_new="x") for i in range(n)]


# --------------------------------------------------------------------------------------------
# benchmark formats on the real records


@pytest.mark.parametrize(
    ("name", "count", "source"),
    [
        ("counterfact", 249, "counterfact"),
        ("counterfact_eval", 249, "counterfact"),
        ("counterfact_dev", 296, "counterfact"),
        ("counterfact-easyedit", 10_000, "counterfact-easyedit"),
        ("zsre", 500, "zsre"),
        ("zsre_dev", 500, "zsre"),
    ],
)
def test_known_datasets_load_and_validate(data_dir: Path, name: str, count: int, source: str) -> None:
    requests = load_requests(name, data_dir=data_dir)
    assert len(requests) == count
    assert all(r.source == source and r.prompt.count("{}") == 1 for r in requests)


def test_counterfact_conversion(data_dir: Path) -> None:
    raw = json.loads((data_dir / "counterfact/counterfact_eval.json").read_text())[0]
    req = load_requests("counterfact_eval", data_dir=data_dir)[0]
    rw = raw["requested_rewrite"]
    assert req.case_id == raw["case_id"]
    assert (req.prompt, req.subject) == (rw["prompt"], rw["subject"])
    assert req.target_new == rw["target_new"]["str"] and req.target_true == rw["target_true"]["str"]
    assert list(req.paraphrases) == raw["paraphrase_prompts"]
    assert list(req.neighborhood) == raw["neighborhood_prompts"]
    assert req.neighborhood_targets == ()
    assert req.neighborhood_answers() == [rw["target_true"]["str"]] * len(raw["neighborhood_prompts"])
    assert list(req.generation_prompts) == raw["generation_prompts"]


def test_easyedit_conversion(data_dir: Path) -> None:
    path = data_dir / "counterfact/easyedit/counterfact-edit.json.gz"
    raw = json.loads(gzip.open(path, "rt").read())[0]
    req = load_requests(str(path))[0]
    assert req.source == "counterfact-easyedit"
    assert req.filled_prompt == raw["prompt"]
    assert req.prompt == raw["prompt"].replace(raw["subject"], "{}", 1)
    assert req.target_new == raw["target_new"] and req.target_true == raw["ground_truth"]
    assert req.paraphrases == (raw["rephrase_prompt"],)
    assert req.neighborhood == (raw["locality_prompt"],)
    assert req.neighborhood_targets == (raw["locality_ground_truth"],)


def test_zsre_conversion_and_target_option(data_dir: Path) -> None:
    raw = json.loads((data_dir / "zsre/zsre_eval.json").read_text())
    default = load_requests("zsre_eval", data_dir=data_dir, num_edits=5)
    r0 = raw[0]
    assert default[0].prompt == r0["src"].replace(r0["subject"], "{}", 1)
    assert default[0].target_new == r0["answers"][0] and default[0].target_true == r0["alt"]
    assert default[0].paraphrases == (r0["rephrase"],)
    # the published loc prompt: the NQ question followed by "?" (docs/algorithms.md §8)
    assert default[0].neighborhood == (r0["loc"] + "?",) and default[0].neighborhood_targets == (r0["loc_ans"],)
    assert not r0["loc"].endswith("?")
    assert default[0].case_id == 0
    alt = load_requests("zsre_eval", data_dir=data_dir, num_edits=5, zsre_target="alt")
    assert alt[0].target_new == r0["alt"] and alt[0].target_true == r0["answers"][0]
    # two records of the file have an empty ``alt``: editing towards it fails, naming the record
    with pytest.raises(EditRecordError, match=r"edit record \d+ \(case_id=\d+\): 'target_new' is empty"):
        load_requests("zsre_eval", data_dir=data_dir, zsre_target="alt")
    with pytest.raises(ValueError, match="zsre_target"):
        load_requests("zsre_eval", data_dir=data_dir, zsre_target="pred")


def test_detect_format(data_dir: Path) -> None:
    cf = json.loads((data_dir / "counterfact/counterfact_dev.json").read_text())[0]
    zs = json.loads((data_dir / "zsre/zsre_dev.json").read_text())[0]
    ee = {"case_id": 1, "prompt": "BBC One, by", "subject": "BBC One", "target_new": "Sega",
          "ground_truth": "BBC", "rephrase_prompt": "r", "locality_prompt": "l", "locality_ground_truth": "x"}
    assert detect_format(cf) == "counterfact"
    assert detect_format(zs) == "zsre"
    assert detect_format(ee) == "counterfact-easyedit"
    assert detect_format(_user()) == "user"


def test_num_edits_keeps_first(data_dir: Path) -> None:
    full = load_requests("counterfact", data_dir=data_dir)
    first = load_requests("counterfact", data_dir=data_dir, num_edits=7)
    assert first == full[:7]
    with pytest.raises(ValueError, match="num_edits"):
        load_requests("counterfact", data_dir=data_dir, num_edits=0)
    with pytest.warns(UserWarning, match="num_edits"):
        assert len(load_requests("examples", num_edits=100)) == 16


def test_known_name_without_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert default_data_dir() is None
    with pytest.raises(FileNotFoundError, match=r"counterfact/counterfact_eval\.json.*data_dir"):
        load_requests("counterfact")


def test_data_dir_from_environment(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(data_dir))
    assert default_data_dir() == data_dir
    assert len(load_requests("zsre_dev", num_edits=3)) == 3


def test_unknown_source() -> None:
    with pytest.raises(FileNotFoundError, match="known names"):
        load_requests("no-such-dataset")


# --------------------------------------------------------------------------------------------
# user files


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".json.gz", ".jsonl.gz"])
def test_user_files_all_suffixes(tmp_path: Path, suffix: str) -> None:
    rows = [_user(), _user(subject="Spain", target_new={"str": "Lisbon"}, case_id="es")]
    text = "\n".join(json.dumps(r) for r in rows) if "jsonl" in suffix else json.dumps(rows)
    path = tmp_path / f"edits{suffix}"
    if suffix.endswith(".gz"):
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    reqs = load_requests(str(path))
    assert [r.case_id for r in reqs] == [0, "es"]
    assert reqs[1].target_new == "Lisbon" and reqs[0].source == "user"
    assert reqs[0].paraphrases == ("France's capital city is",)


def test_jsonl_under_json_name(tmp_path: Path) -> None:
    path = tmp_path / "edits.json"
    path.write_text(json.dumps(_user()) + "\n" + json.dumps(_user(subject="Peru")) + "\n")
    assert len(read_records(path)) == 2


@pytest.mark.parametrize(
    ("bad", "pattern"),
    [
        (_user(prompt="The capital of France is"), r"edit record 1 \(case_id=1\): 'prompt'.*\{\}"),
        (_user(target_new=""), r"edit record 1 \(case_id=1\): 'target_new' is empty"),
        (_user(target_new=3), r"edit record 1 \(case_id=1\): 'target_new' must be a string"),
        (_user(paraphrases="France's capital"), r"edit record 1 \(case_id=1\): 'paraphrases' must be a list"),
        (_user(paraphrase=["x"]), r"edit record 1 \(case_id=1\): unknown key.*'paraphrase'"),
        (_user(case_id="c-7", subject=None), r"edit record 1 \(case_id='c-7'\): 'subject' must be a string"),
        (_user(target_new={"text": "Rome"}), r"edit record 1 .*'target_new'.*'str'"),
        (["The capital of {} is", "France"], r"edit record 1: expected a JSON object"),
        ({"prompt": "{} is", "subject": "x"}, r"edit record 1 \(case_id=1\): missing field 'target_new'"),
    ],
)
def test_bad_user_records(tmp_path: Path, bad: Any, pattern: str) -> None:
    path = _write(tmp_path / "edits.jsonl", [_user(), bad, _user()])
    with pytest.raises(EditRecordError, match=pattern):
        load_requests(str(path))


def test_bad_easyedit_record_subject_not_in_prompt() -> None:
    rec = {
        "case_id": 42, "prompt": "BBC Two, by", "subject": "BBC One", "target_new": "Sega",
        "ground_truth": "BBC", "rephrase_prompt": "r", "locality_prompt": "l", "locality_ground_truth": "x",
    }
    expected = r"edit record 3 \(case_id=42\): subject 'BBC One' does not occur in 'prompt'"
    with pytest.raises(EditRecordError, match=expected):
        from_easyedit(rec, 3)


def test_bad_zsre_record_subject_not_in_src(tmp_path: Path) -> None:
    good = {"subject": "WEFS", "src": "When was WEFS established?", "answers": ["1987"], "alt": "1997",
            "rephrase": "r", "loc": "nq question: q", "loc_ans": "a"}
    bad = dict(good, src="When was it established?")
    expected = r"edit record 1 \(case_id=1\): subject 'WEFS' does not occur in 'src'"
    with pytest.raises(EditRecordError, match=expected):
        load_requests(str(_write(tmp_path / "z.json", [good, bad])))
    with pytest.raises(EditRecordError, match="'answers'"):
        from_zsre(dict(good, answers=[]), 0)


# --------------------------------------------------------------------------------------------
# the embedded example set


def test_examples_set() -> None:
    examples = load_examples()
    assert len(examples) == 16
    assert load_requests("examples") == examples
    assert len({r.case_id for r in examples}) == 16
    for r in examples:
        assert r.source == "user" and r.target_true and r.target_new != r.target_true
        assert r.subject in r.filled_prompt
        assert len(r.paraphrases) == 2 and len(r.neighborhood) == 3
        assert 1 <= len(r.generation_prompts) <= 2
        assert all(r.subject in p for p in r.paraphrases)
        assert all(r.subject not in p for p in r.neighborhood)


# --------------------------------------------------------------------------------------------
# rounds and the data module


def test_round_dataset_splits() -> None:
    ds = RoundDataset(_requests(25), edits_per_round=10)
    assert len(ds) == 3
    assert [len(ds[i].requests) for i in range(3)] == [10, 10, 5]
    assert [r.case_id for r in ds[2].requests] == list(range(20, 25))
    with pytest.raises(IndexError):
        ds[3]
    assert list(RoundSampler(ds)) == [0, 1, 2] and len(RoundSampler(ds)) == 3


def test_round_loader_resumes_at_saved_round() -> None:
    ds = RoundDataset(_requests(25), edits_per_round=5)  # rounds 0..4
    loader = RoundLoader(ds)
    it = iter(loader)
    assert [next(it).index for _ in range(2)] == [0, 1]
    state = loader.state_dict()
    assert state == {"next_round": 2}
    fresh = RoundLoader(RoundDataset(_requests(25), edits_per_round=5))
    fresh.load_state_dict(state)
    assert len(fresh) == 5  # Lightning counts the steps of the whole epoch
    assert [r.index for r in fresh] == [2, 3, 4]
    assert fresh.state_dict() == {"next_round": 5}
    assert [r.index for r in fresh] == [0, 1, 2, 3, 4]  # the next epoch starts at round 0
    with pytest.raises(ValueError, match="next_round 6"):
        fresh.load_state_dict({"next_round": 6})


def test_datamodule_rounds_in_order(tmp_path: Path) -> None:
    rows = [_user(subject=f"Country{i}", prompt="The capital of {} is", case_id=f"c{i}") for i in range(25)]
    path = _write(tmp_path / "edits.json", rows)
    dm = EditDataModule(dataset=str(path), edits_per_round=10)
    dm.setup("fit")
    assert len(dm.requests) == 25 and dm.num_rounds == 3
    rounds = list(dm.train_dataloader())
    assert all(isinstance(r, EditRound) for r in rounds)
    assert [r.index for r in rounds] == [0, 1, 2]
    assert [len(r.requests) for r in rounds] == [10, 10, 5]
    assert [q.case_id for r in rounds for q in r.requests] == [f"c{i}" for i in range(25)]
    assert dm.eval_requests() == dm.requests


def test_datamodule_options(data_dir: Path) -> None:
    dm = EditDataModule(dataset="counterfact", data_dir=str(data_dir), num_edits=12, edits_per_round=5,
                        eval_dataset="examples")
    assert dm.num_rounds == 3 and len(dm.requests) == 12
    assert len(dm.eval_requests()) == 16
    assert EditDataModule().num_rounds == 2  # the 16 examples, 10 per round
    with pytest.raises(ValueError, match="edits_per_round"):
        EditDataModule(edits_per_round=0)
    with pytest.raises(ValueError, match="num_edits"):
        EditDataModule(num_edits=0)


def test_sampler_survives_lightning_distributed_check() -> None:
    """Lightning only leaves DistributedSampler instances alone under DDP; ours must be one."""
    from torch.utils.data import DistributedSampler

    dl = EditDataModule().train_dataloader()
    assert isinstance(dl.sampler, DistributedSampler)
    assert list(dl.sampler) == [0, 1]


# --------------------------------------------------------------------------------------------
# corpora


def test_wikipedia_sample_corpus(data_dir: Path) -> None:
    start = time.perf_counter()
    texts = load_corpus_texts("wikipedia-sample", data_dir=data_dir, num_samples=200)
    assert time.perf_counter() - start < 5
    assert len(texts) == 200 and all(len(t) >= 200 for t in texts)
    assert load_corpus_texts("auto", data_dir=data_dir, num_samples=3) == texts[:3]


def test_wikitext2_corpus(data_dir: Path) -> None:
    texts = load_corpus_texts("wikitext-2", data_dir=data_dir, num_samples=50, min_chars=300)
    assert len(texts) == 50 and all(len(t) >= 300 for t in texts)
    assert not any(" @-@ " in t for t in texts)


def test_corpus_unavailable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(CorpusUnavailable, match="data_dir"):
        load_corpus_texts("auto", num_samples=3)
    with pytest.raises(CorpusUnavailable, match="not found"):
        load_corpus_texts("wikipedia-sample", data_dir=tmp_path, num_samples=3)
    with pytest.raises(ValueError, match="unknown corpus source"):
        resolve_corpus_source("books")


def test_corpus_fingerprint() -> None:
    a = corpus_fingerprint("wikipedia-sample", 1000, 200)
    assert a == corpus_fingerprint("wikipedia-sample", 1000, 200)
    assert a != corpus_fingerprint("wikipedia-sample", 1001, 200)
    assert a != corpus_fingerprint("wikitext-2", 1000, 200)
    assert "/" not in corpus_fingerprint("hub:wikipedia", 10, 200, seed=3) and len(a) < 64


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_model_sampled_texts(arch: str) -> None:
    model, tok = make_model(arch), make_tokenizer()
    rng_before = torch.random.get_rng_state()
    a = model_sampled_texts(model, tok, num_samples=5, max_new_tokens=8, seed=1, batch_size=2)
    assert torch.equal(rng_before, torch.random.get_rng_state())
    assert tok.padding_side == "right"
    assert len(a) == 5 and all(isinstance(t, str) and t.strip() for t in a)
    assert a == model_sampled_texts(model, tok, num_samples=5, max_new_tokens=8, seed=1, batch_size=2)
    assert a != model_sampled_texts(model, tok, num_samples=5, max_new_tokens=8, seed=2, batch_size=2)


@pytest.mark.filterwarnings("ignore:.*configure_optimizers")
def test_trainer_fit_receives_rounds() -> None:
    """Lightning moves each round to the device and hands it to ``training_step`` unchanged."""
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.anchor = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[tuple[int, int, int]] = []

        def training_step(self, batch: EditRound, batch_idx: int) -> None:
            assert isinstance(batch, EditRound)
            self.seen.append((batch_idx, batch.index, len(batch.requests)))

        def configure_optimizers(self) -> None:
            return None

    module = Recorder()
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=EditDataModule(edits_per_round=5))
    assert module.seen == [(0, 0, 5), (1, 1, 5), (2, 2, 5), (3, 3, 1)]


def test_hub_source_is_parsed_and_sliced(monkeypatch: pytest.MonkeyPatch) -> None:
    """``hub:<id>[:<config>][@<split>]`` goes to ``datasets.load_dataset`` (stubbed: no network)."""
    import datasets

    calls: list[tuple[Any, ...]] = []

    def fake_load_dataset(path: str, name: str | None = None, split: str | None = None) -> list[dict]:
        calls.append((path, name, split))
        return [_user(subject="Chile", case_id="h0")]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    reqs = load_requests("hub:org/edits:cfg@validation", num_edits=1)
    assert calls == [("org/edits", "cfg", "validation[:1]")]
    assert reqs[0].case_id == "h0" and reqs[0].subject == "Chile"
    load_requests("hub:org/edits")
    assert calls[-1] == ("org/edits", None, "train")


def test_explicit_format_mismatch(tmp_path: Path) -> None:
    path = _write(tmp_path / "edits.json", [_user()])
    with pytest.raises(EditRecordError, match=r"edit record 0 \(case_id=0\): missing field 'src'"):
        load_requests(str(path), format="zsre")
    with pytest.raises(ValueError, match="format"):
        load_requests(str(path), format="csv")


def test_model_sampled_texts_progress_changes_nothing(capsys) -> None:
    model, tok = make_model("llama"), make_tokenizer()
    quiet = model_sampled_texts(model, tok, num_samples=3, max_new_tokens=6, seed=1, batch_size=2)
    shown = model_sampled_texts(model, tok, num_samples=3, max_new_tokens=6, seed=1, batch_size=2, progress=True)
    assert shown == quiet
    assert "sampling 3 texts for C_0" in capsys.readouterr().err
