"""Scoring and editing metrics: hand-computed cases on a fixed-logit bigram LM, padding invariance."""

from __future__ import annotations

import math

import pytest
import torch

from blueedit.data.records import EditRequest
from blueedit.evaluation.editing_metrics import (
    evaluate_counterfact,
    evaluate_requests,
    evaluate_zsre,
    record_values,
)
from blueedit.evaluation.metrics import mean_meter
from blueedit.evaluation.scoring import (
    _target_logits,
    continuation_logprobs,
    mean_token_nll,
    score_continuations,
    token_accuracy,
)
from blueedit.models.tokens import encode_batch, gather_positions, tokenize_target
from fake_lm import BigramLM, word_level_tokenizer
from helpers import make_model, make_tokenizer

WORDS = ["<pad>", "<s>", "</s>", "A", "B", "C", "D", "is", "in", "lives", "speaks",
         "Rome", "Paris", "New", "York", "French", "English"]  # fmt: skip
# bigram logits: TABLE[prev][next]; every other entry is 0
TABLE = {
    "is": {"Rome": 4.0, "Paris": 2.0},
    "in": {"Paris": 4.0, "Rome": 1.0},
    "speaks": {"English": 3.0, "French": 1.0},
    "New": {"York": 10.0},
}


def word_tokenizer():
    return word_level_tokenizer(WORDS)


def bigram() -> BigramLM:
    return BigramLM.from_words(WORDS, TABLE)


def logp(prev: str, nxt: str) -> float:
    """``log softmax(table[prev])[nxt]`` by hand."""
    row = TABLE.get(prev, {})
    z = sum(math.exp(row.get(w, 0.0)) for w in WORDS)
    return row.get(nxt, 0.0) - math.log(z)


def nll(last: str, target: str) -> float:
    """Mean-token NLL of the words of ``target`` after a prompt ending in ``last``."""
    words = target.split()
    prevs = [last] + words[:-1]
    return -sum(logp(p, w) for p, w in zip(prevs, words)) / len(words)


def prob(last: str, target: str) -> float:
    return math.exp(-nll(last, target))


# ----------------------------------------------------------------------------- scoring


def test_bigram_scoring_matches_hand_values():
    tok, model = word_tokenizer(), bigram()
    prompts = ["A is", "B lives in", "C speaks", "D is"]
    targets = ["Rome", "New York", "French", "Paris"]
    conts = [tokenize_target(tok, t) for t in targets]
    lps = continuation_logprobs(model, tok, prompts, conts, batch_size=3)
    assert [lp.dtype for lp in lps] == [torch.float32] * 4
    assert torch.allclose(lps[1], torch.tensor([logp("in", "New"), logp("New", "York")]), atol=1e-6)
    expected_nll = torch.tensor([nll(p.split()[-1], t) for p, t in zip(prompts, targets)])
    assert torch.allclose(mean_token_nll(model, tok, prompts, conts), expected_nll, atol=1e-6)
    # argmax after is/in/speaks is Rome/Paris/English; after New it is York
    assert token_accuracy(model, tok, prompts, conts).tolist() == [1.0, 0.5, 0.0, 0.0]


def test_scoring_uses_few_forward_passes():
    tok, model = word_tokenizer(), bigram()
    prompts = ["A is"] * 10
    score_continuations(model, tok, prompts, [tokenize_target(tok, "Rome")] * 10, batch_size=4)
    assert model.calls == 3


def test_empty_continuation_is_an_error():
    tok, model = word_tokenizer(), bigram()
    with pytest.raises(ValueError, match="empty"):
        continuation_logprobs(model, tok, ["A is"], [[]])


def _random_pairs(tok, n: int = 7):
    prompts = [
        "The Eiffel Tower is in",
        "Danielle Darrieux spoke",
        "Toko Yasuda plays the guitar and the",
        "Apple A5 was created by",
        "Berlin",
        "The mother tongue of Thomas Joannes Stieltjes is",
        "Edwin of Northumbria follows the religion of",
    ][:n]
    targets = ["Paris", "French and English", "piano", "Google", "London Rome", "Dutch", "Christianity"][:n]
    return prompts, [tokenize_target(tok, t) for t in targets]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("bos", [False, True])
def test_padding_side_and_batching_do_not_change_scores(arch, bos):
    tok, model = make_tokenizer(bos=bos), make_model(arch, n_layer=2)
    prompts, conts = _random_pairs(tok)
    left = continuation_logprobs(model, tok, prompts, conts, batch_size=7, padding_side="left")
    right = continuation_logprobs(model, tok, prompts, conts, batch_size=7, padding_side="right")
    single = [continuation_logprobs(model, tok, [p], [c])[0] for p, c in zip(prompts, conts)]
    for a, b, c, cont in zip(left, right, single, conts):
        assert a.shape == (len(cont),)
        assert torch.allclose(a, c, atol=1e-5)
        assert torch.allclose(b, c, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gathered_head_equals_full_logits(arch):
    tok, model = make_tokenizer(), make_model(arch, n_layer=2)
    prompts, conts = _random_pairs(tok)
    batch = encode_batch(tok, prompts, [None] * len(prompts), conts, padding_side="left")
    full = gather_positions(model(**batch.model_inputs()).logits, batch.target_index)
    assert torch.allclose(_target_logits(model, batch), full.float(), atol=1e-5)


# ----------------------------------------------------------------------------- metrics


def test_mean_meter_accumulates_in_float64():
    mv = mean_meter()
    with pytest.warns(UserWarning):
        assert math.isnan(float(mv.compute()))
    mv.update(torch.tensor([1.0, 2.0], dtype=torch.float64))
    mv.update(torch.tensor([6.0 + 1e-12], dtype=torch.float64))
    assert mv.compute().dtype == torch.float64
    assert float(mv.compute()) == (9.0 + 1e-12) / 3


# ----------------------------------------------------------------------------- CounterFact


def _counterfact_requests() -> list[EditRequest]:
    return [
        EditRequest(1, "{} is", "A", "Rome", "Paris", paraphrases=("A lives in", "B is"),
                    neighborhood=("C is", "D lives in"), source="counterfact"),
        EditRequest(2, "{} speaks", "B", "French", "English", paraphrases=("B speaks",),
                    neighborhood=("C speaks", "D speaks"), source="counterfact"),
        EditRequest(3, "{} is", "C", "New York", None, paraphrases=("C in",),
                    neighborhood=("D is",), neighborhood_targets=("Paris",), source="counterfact"),
    ]  # fmt: skip


def test_counterfact_metrics_match_hand_values():
    tok, model = word_tokenizer(), bigram()
    res = evaluate_counterfact(model, tok, _counterfact_requests(), batch_size=5)
    # efficacy: after "is" Rome beats Paris (yes); after "speaks" French beats English (no)
    # generalization: rec 1 "in" -> Paris wins (no), "is" -> Rome (yes); rec 2 "speaks" -> English (no)
    # specificity (answer vs new): rec 1 "is" Paris vs Rome (no), "in" Paris vs Rome (yes);
    #   rec 2 "speaks" English vs French (yes) twice; rec 3 "is" Paris vs "New York" (no, see below)
    ny_beats_paris = nll("is", "New York") < nll("is", "Paris")
    assert ny_beats_paris  # the mean over two tokens favours "New York"
    m = res.metrics
    # averaged per record first, then over records (the published summary)
    assert m["efficacy"] == pytest.approx(50.0)
    assert m["generalization"] == pytest.approx(100.0 * (0.5 + 0.0) / 2)  # pooled per prompt: 33.3
    assert m["specificity"] == pytest.approx(100.0 * (0.5 + 1.0 + 0.0) / 3)  # pooled per prompt: 60
    d_is = prob("is", "Rome") - prob("is", "Paris")
    d_in = prob("in", "Rome") - prob("in", "Paris")
    d_speaks = prob("speaks", "French") - prob("speaks", "English")
    assert m["efficacy_margin"] == pytest.approx((d_is + d_speaks) / 2, abs=1e-6)
    assert m["generalization_margin"] == pytest.approx(((d_in + d_is) / 2 + d_speaks) / 2, abs=1e-6)
    spe = [(-d_is - d_in) / 2, -d_speaks, prob("is", "Paris") - prob("is", "New York")]
    assert m["specificity_margin"] == pytest.approx(sum(spe) / 3, abs=1e-6)
    assert res.skipped == {"no_target_true": 1}
    assert res.num_records == 3 and res.kind == "counterfact"
    r1, r2, r3 = res.records
    assert (r1["case_id"], r1["efficacy"]) == (1, True)
    assert (r1["generalization"], r1["specificity"]) == ([False, True], [False, True])
    assert (r2["efficacy"], r2["generalization"], r2["specificity"]) == (False, [False], [True, True])
    assert (r3["efficacy"], r3["generalization"], r3["specificity"]) == (None, [], [False])
    assert r1["rewrite_nll_new"] == pytest.approx(nll("is", "Rome"), abs=1e-5)
    assert record_values(r1, "counterfact") == pytest.approx(
        {"efficacy": 100.0, "efficacy_margin": d_is, "generalization": 50.0,
         "generalization_margin": (d_in + d_is) / 2, "specificity": 50.0, "specificity_margin": spe[0]}, abs=1e-6)
    assert record_values(r3, "counterfact") == pytest.approx({"specificity": 0.0, "specificity_margin": spe[2]},
                                                             abs=1e-6)  # fmt: skip
    # 2 + 4 + 4 pairs for record 1, 2 + 2 + 4 for record 2, 2 for record 3: 20 pairs / 5 per pass
    assert model.calls == 4
    d = res.to_dict()
    assert d["metrics"] == m and len(d["records"]) == 3


# ----------------------------------------------------------------------------- zsRE


def _zsre_requests() -> list[EditRequest]:
    return [
        EditRequest("a", "{} is", "A", "New York", None, paraphrases=("B is", "C in"),
                    neighborhood=("C speaks",), neighborhood_targets=("English",), source="zsre"),
        EditRequest("b", "{} in", "B", "Paris", None, paraphrases=("D is",),
                    neighborhood=("A is", "A in"), neighborhood_targets=("Rome", "New York"), source="zsre"),
    ]  # fmt: skip


def test_zsre_token_accuracy_matches_hand_values():
    tok, model = word_tokenizer(), bigram()
    reqs = _zsre_requests()
    res = evaluate_zsre(model, tok, reqs, batch_size=4)
    # rewrite: "is"->New (miss), New->York (hit) = 0.5; "in"->Paris (hit) = 1.0
    # paraphrases: rec a pools [miss, hit, miss, hit] = 0.5; rec b "is"->Paris miss = 0.0
    # neighborhood: rec a "speaks"->English hit = 1.0; rec b pools [hit] + [miss, hit] = 2/3
    assert res.metrics["efficacy"] == pytest.approx(75.0)
    assert res.metrics["generalization"] == pytest.approx(25.0)
    assert res.metrics["specificity"] == pytest.approx(100.0 * (1.0 + 2.0 / 3.0) / 2)
    assert res.records[1]["specificity_per_prompt"] == [1.0, 0.5]
    assert res.kind == "zsre" and "efficacy_margin" not in res.metrics
    assert evaluate_requests(model, tok, reqs).metrics == res.metrics


def test_evaluate_requests_dispatch():
    tok, model = word_tokenizer(), bigram()
    reqs = _counterfact_requests()
    assert evaluate_requests(model, tok, reqs).kind == "counterfact"
    assert evaluate_requests(model, tok, reqs, kind="zsre").kind == "zsre"
    empty = evaluate_counterfact(model, tok, [EditRequest(9, "{} is", "A", "Rome", None)])
    assert all(math.isnan(v) for v in empty.metrics.values())
    with pytest.raises(ValueError):
        evaluate_requests(model, tok, reqs, kind="nope")


def test_validate_steps_average_per_record(tmp_path):
    """``validate`` / ``test`` accumulate over chunks the same per-record means as above."""
    from blueedit.data.datamodule import EditRound
    from blueedit.editing.editor import EditingConfig
    from blueedit.models.loading import ModelConfig
    from blueedit.module import EditingModule

    make_model("llama", n_layer=2).save_pretrained(tmp_path / "tiny")
    make_tokenizer().save_pretrained(tmp_path / "tiny")
    module = EditingModule(model=ModelConfig(name_or_path=str(tmp_path / "tiny")), editing=EditingConfig(layers=[0, 1]),
                           evaluate=False, cache_dir=str(tmp_path / "cache"))
    module.lm, module.tokenizer = bigram(), word_tokenizer()  # the hand-checkable bigram LM
    reqs = _counterfact_requests()
    module._eval_meters("val")
    module._eval_step(EditRound(0, reqs[:1]), "val")
    module._eval_step(EditRound(1, reqs[1:]), "val")
    metrics = module._eval_epoch_end("val")  # no trainer: the numbers only
    assert metrics["efficacy"] == pytest.approx(50.0)
    assert metrics["generalization"] == pytest.approx(25.0)  # pooled per prompt: 33.3
    assert metrics["specificity"] == pytest.approx(50.0)  # pooled per prompt: 60


def test_evaluation_progress_bar_shows_and_changes_nothing(capsys):
    tok, model = word_tokenizer(), bigram()
    quiet = evaluate_counterfact(model, tok, _counterfact_requests(), batch_size=2)
    assert "scoring" not in capsys.readouterr().err
    shown = evaluate_counterfact(model, tok, _counterfact_requests(), batch_size=2, progress="scoring the edits")
    err = capsys.readouterr().err
    assert "scoring the edits" in err and "prompt" in err  # tqdm writes to stderr
    assert shown.metrics == quiet.metrics and shown.records == quiet.records


def test_edit_metrics_accumulate_over_calls():
    """One collection over two calls gives the mean over all records (the validate/test epoch)."""
    from blueedit.evaluation.editing_metrics import edit_metrics

    tok, model = word_tokenizer(), bigram()
    reqs = _counterfact_requests()
    whole = evaluate_counterfact(model, tok, reqs).metrics
    acc = edit_metrics("counterfact")
    evaluate_counterfact(model, tok, reqs[:1], metrics=acc)
    running = evaluate_counterfact(model, tok, reqs[1:], metrics=acc).metrics
    assert running == pytest.approx(whole, nan_ok=True)
    assert acc.results() == running
