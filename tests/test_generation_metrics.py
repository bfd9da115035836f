"""Generation metrics: top-k sampling by hand, the published generation length, reproducible seeds
that leave the global random state alone, and fluency / consistency from ``fit`` and ``validate``."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from blueedit.data.records import EditRequest
from blueedit.evaluation import fluency as fluency_mod
from blueedit.evaluation.consistency import TfidfModel
from blueedit.evaluation.fluency import generate_sampled, sample_top_k, text_ngram_entropy
from blueedit.evaluation.generation import (
    GenerationMetricsConfig,
    References,
    generation_records,
    generation_summary,
    load_references,
)
from fake_lm import BigramLM, word_level_tokenizer
from helpers import make_model, make_tokenizer

WORDS = ["<pad>", "<s>", "</s>", "a", "b", "c", "d"]


def test_sample_top_k_by_hand():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 4))
    # top-2 renormalized: token 3 with 0.4/0.7 = 0.5714, token 2 with 0.3/0.7
    u = torch.tensor([0.0, 0.57, 0.572, 0.999])
    assert sample_top_k(logits, 2, u).tolist() == [3, 3, 2, 2]
    assert sample_top_k(logits, 1, u).tolist() == [3, 3, 3, 3]
    # all four tokens: cumulative 0.4, 0.7, 0.9, 1.0 over tokens 3, 2, 1, 0
    assert sample_top_k(logits, 4, torch.tensor([0.39, 0.41, 0.89, 0.95])).tolist() == [3, 2, 1, 0]
    with pytest.raises(ValueError, match="top_k"):
        sample_top_k(logits, 0, u)


def test_sampled_generation_counts_the_prompt_and_does_not_stop_at_eos():
    tok = word_level_tokenizer(WORDS)
    chain = {"a": {"b": 9}, "b": {"c": 9}, "c": {"d": 9}, "d": {"</s>": 9}, "</s>": {"a": 9}}
    model = BigramLM.from_words(WORDS, chain)
    # top-1 sampling follows the chain; 5 tokens counting the prompt's; </s> is dropped when decoding
    out = generate_sampled(model, tok, ["a", "b c", "a b c d a"], max_length=5, top_k=1, batch_size=2)
    assert out == ["a b c d", "b c d a", "a b c d a"]
    assert generate_sampled(model, tok, ["a"], max_length=7, top_k=1) == ["a b c d a b"]


def test_sampled_generation_follows_top_k_probabilities():
    tok = word_level_tokenizer(WORDS)
    row = {w: 10 + math.log(p) for w, p in zip(["a", "b", "c", "d"], [0.1, 0.2, 0.3, 0.4])}  # others: 0
    model = BigramLM.from_words(WORDS, {"a": row})
    texts = generate_sampled(model, tok, ["a"] * 400, max_length=2, top_k=2, batch_size=100)
    second = [t.split()[1] for t in texts]
    assert set(second) == {"c", "d"}  # only the two most likely tokens
    assert second.count("d") / 400 == pytest.approx(4 / 7, abs=0.1)  # 4 standard deviations


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sampling_is_seeded_batch_independent_and_leaves_the_global_rng(arch, monkeypatch):
    tok, model = make_tokenizer(), make_model(arch, n_layer=2)
    prompts = ["The Eiffel Tower is in", "Berlin", "Toko Yasuda plays the guitar and the"]
    state = torch.random.get_rng_state()
    batched = generate_sampled(model, tok, prompts, max_length=24, seed=7, batch_size=3)
    assert torch.equal(state, torch.random.get_rng_state())
    assert generate_sampled(model, tok, prompts, max_length=24, seed=7, batch_size=3) == batched
    single = [generate_sampled(model, tok, [p], max_length=24, seed=7 + i)[0] for i, p in enumerate(prompts)]
    assert single == batched
    assert generate_sampled(model, tok, prompts, max_length=24, seed=8, batch_size=3) != batched
    assert all(b.startswith(p) for b, p in zip(batched, prompts))
    # the key/value-cache loop equals re-running the whole sequence at every step
    monkeypatch.setattr(fluency_mod, "_is_hf_generator", lambda m: False)
    assert generate_sampled(model, tok, prompts, max_length=24, seed=7, batch_size=2) == batched


CHAIN_WORDS = ["<pad>", "<s>", "</s>", "ab", "bc", "ca", "dd"]  # TF-IDF needs words of 2+ characters


def _chain_model():
    tok = word_level_tokenizer(CHAIN_WORDS)
    chain = {"ab": {"bc": 9}, "bc": {"ca": 9}, "ca": {"ab": 9}, "dd": {"dd": 9}}
    return tok, BigramLM.from_words(CHAIN_WORDS, chain)


def test_generation_records_and_summary_by_hand():
    tok, model = _chain_model()
    reqs = [
        EditRequest(1, "{} x", "a", "b", generation_prompts=("ab", "dd"), relation_id="P1", target_new_id="Q1"),
        EditRequest(2, "{} x", "b", "c", generation_prompts=("bc",), relation_id="P1", target_new_id="Q2"),
        EditRequest(3, "{} x", "c", "d"),  # no generation prompts: left out
    ]
    tfidf = TfidfModel({"ab": 0, "bc": 1, "ca": 2, "dd": 3}, torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    refs = References({"P1": {"Q1": ["ab ab", "ca"]}}, tfidf)
    spec = GenerationMetricsConfig(max_length=6, top_k=1)
    recs = generation_records(model, tok, reqs, spec, refs)
    assert [r["generations"] for r in recs] == [["ab bc ca ab bc ca", "dd dd dd dd dd dd"], ["bc ca ab bc ca ab"], []]
    # "ab bc ca ab bc ca": bigrams x2, x2, x1 -> H2; trigrams x2, x1, x1 -> H3 (same for "bc ca ab ...")
    h2 = -(2 * (2 / 5) * math.log2(2 / 5) + (1 / 5) * math.log2(1 / 5))
    h3 = -((2 / 4) * math.log2(2 / 4) + 2 * (1 / 4) * math.log2(1 / 4))
    e_abc = (2 / 3 * h2 + 4 / 3 * h3) / 2
    assert text_ngram_entropy("ab bc ca ab bc ca") == pytest.approx(e_abc)
    assert recs[0]["fluency"] == pytest.approx(100 * (e_abc + 0.0) / 2)  # "dd dd dd ..." has entropy 0
    assert recs[1]["fluency"] == pytest.approx(100 * e_abc)
    assert recs[2]["fluency"] is None
    # consistency: generations (ab:2 bc:2 ca:2 dd:6) against references "ab ab ca" (ab:2 ca:1), times idf
    g = torch.tensor([2 * 1.0, 2 * 2.0, 2 * 3.0, 6 * 4.0], dtype=torch.float64)
    r = torch.tensor([2 * 1.0, 0.0, 1 * 3.0, 0.0], dtype=torch.float64)
    assert recs[0]["consistency"] == pytest.approx(100 * float(g @ r / (g.norm() * r.norm())))
    assert "consistency" not in recs[1]  # no reference texts for Q2
    summary = generation_summary(recs)
    assert summary["fluency"] == pytest.approx((recs[0]["fluency"] + recs[1]["fluency"]) / 2)
    assert summary["consistency"] == pytest.approx(recs[0]["consistency"])
    assert generation_summary([{"fluency": None}]) == {}
    # a chunk with its prompt offset samples exactly like the whole list
    tok2, lm = make_tokenizer(), make_model("llama", n_layer=2)
    many = [EditRequest(i, "{} x", "a", "b", generation_prompts=("Berlin", "The Eiffel")) for i in range(3)]
    spec = GenerationMetricsConfig(max_length=12)
    whole = generation_records(lm, tok2, many, spec)
    parts = generation_records(lm, tok2, many[:1], spec) + generation_records(lm, tok2, many[1:], spec, None, 2)
    assert [r["generations"] for r in parts] == [r["generations"] for r in whole]
    assert len(generation_records(lm, tok2, many, GenerationMetricsConfig(max_length=12, num_records=1))) == 1
    with pytest.raises(ValueError, match="generation.top_k"):
        generation_records(lm, tok2, many, GenerationMetricsConfig(top_k=0))


def test_load_references(tmp_path):
    assert load_references(GenerationMetricsConfig(), tmp_path) is None
    snips = [{"relation_id": "P1", "target_id": "Q1", "samples": [{"text": "apple banana"}, {"text": "apple"}]}]
    (tmp_path / "attribute_snippets.json").write_text(json.dumps(snips))
    refs = load_references(GenerationMetricsConfig(), tmp_path)
    assert refs.texts_for(EditRequest(0, "{}", "s", "t", relation_id="P1", target_new_id="Q1")) == \
        ["apple banana", "apple"]
    assert refs.texts_for(EditRequest(0, "{}", "s", "t")) == []
    # fitted on the snippets (2 documents): idf(apple) = ln(3/3) + 1, idf(banana) = ln(3/2) + 1
    assert float(refs.tfidf.idf[refs.tfidf.vocab["banana"]]) == pytest.approx(math.log(1.5) + 1)
    with pytest.raises(FileNotFoundError, match="attribute_snippets"):
        load_references(GenerationMetricsConfig(attribute_snippets=str(tmp_path / "missing.json")))


# -- fit / validate -----------------------------------------------------------------------------

RECORDS = [
    {"case_id": 0, "prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": "violin",
     "target_true": "guitar", "paraphrases": ["Toko Yasuda is known for playing the"],
     "neighborhood": ["Danielle Darrieux plays the"], "generation_prompts": ["Toko Yasuda is", "Toko Yasuda"]},
    {"case_id": 1, "prompt": "The mother tongue of {} is", "subject": "Thomas Joannes Stieltjes",
     "target_new": "French", "target_true": "Dutch", "paraphrases": ["Thomas Joannes Stieltjes spoke"],
     "neighborhood": ["The mother tongue of Danielle Darrieux is"], "generation_prompts": ["Thomas Joannes"]},
]


@pytest.fixture
def run_dir(tmp_path) -> Path:
    model_dir = tmp_path / "tiny-llama"
    make_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    (tmp_path / "edits.json").write_text(json.dumps(RECORDS))
    return tmp_path


def _cli_args(root: Path, command: str) -> list[str]:
    return [
        command, f"--model.model.name_or_path={root / 'tiny-llama'}", "--model.editing.layers=[1,2]",
        "--model.editing.target.v_num_grad_steps=2", "--model.stats.corpus=model-samples",
        "--model.stats.num_samples=4", "--model.stats.max_length=16", f"--model.cache_dir={root / 'cache'}",
        "--model.generation_metrics=true", "--model.generation.max_length=16",
        f"--data.dataset={root / 'edits.json'}", "--data.format=user", "--data.edits_per_round=2",
        f"--trainer.default_root_dir={root / 'run'}", "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false", "--trainer.logger=false",
    ]


def _expected_fluency(model, tok, seed_texts: list[list[str]]) -> float:
    """100 · mean over records of the mean entropy of each record's texts (independent sum)."""
    per = [sum(text_ngram_entropy(t) for t in texts) / len(texts) for texts in seed_texts]
    return 100 * sum(per) / len(per)


def test_fit_and_validate_report_fluency(run_dir):
    from blueedit.cli import run_cli

    prompts = [p for r in RECORDS for p in r["generation_prompts"]]
    tok, unedited = make_tokenizer(), make_model("llama")
    pre_texts = generate_sampled(unedited, tok, prompts, max_length=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = run_cli(_cli_args(run_dir, "fit"))
    log_dir = Path(cli.trainer.log_dir or cli.trainer.default_root_dir)
    summary = json.loads((log_dir / "metrics.json").read_text())
    fl = summary["metrics"]["fluency"]
    # pre: the unedited model's generations, sampled with the default seed, as computed here
    pre = summary["records"]["pre"]
    assert [r["generations"] for r in pre] == [pre_texts[:2], pre_texts[2:]]
    assert fl["pre"] == pytest.approx(_expected_fluency(unedited, tok, [pre_texts[:2], pre_texts[2:]]))
    post_texts = generate_sampled(cli.model.lm, tok, prompts, max_length=16)
    assert [r["generations"] for r in summary["records"]["post"]] == [post_texts[:2], post_texts[2:]]
    assert fl["post"] == pytest.approx(_expected_fluency(None, tok, [post_texts[:2], post_texts[2:]]))
    assert "consistency" not in summary["metrics"]  # no reference texts: absent, not estimated

    # validate on the unedited model: the same numbers as the pre-edit evaluation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = run_cli(_cli_args(run_dir, "validate"))
    root = Path(cli.trainer.default_root_dir)
    assert root == run_dir / "run" / "validate" / "tiny-llama"  # named for the evaluated model
    saved = json.loads((root / "eval_metrics.json").read_text())
    assert saved["metrics"]["fluency"] == pytest.approx(fl["pre"])
    assert [r["generations"] for r in saved["records"]] == [pre_texts[:2], pre_texts[2:]]
    for k in ("efficacy", "generalization", "specificity"):
        assert saved["metrics"][k] == pytest.approx(summary["metrics"][k]["pre"]), k
