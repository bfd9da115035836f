"""Evaluation in the wild: the stopping rule, normalization, the scores, and greedy generation
(against hand-made generations of a fixed bigram LM, and against a plain unbatched loop)."""

from __future__ import annotations

import pytest
import torch

from blueedit.config import UserInputError
from blueedit.data.records import EditRequest
from blueedit.evaluation.wild import (
    WildConfig,
    add_wild_locality,
    answer_end,
    contains_answer,
    cut_answer,
    exact_match,
    generate_answers,
    normalize_answer,
    wild_records,
    wild_summary,
    wild_values,
)
from fake_lm import BigramLM, word_level_tokenizer
from helpers import make_model, make_tokenizer


# -- the stopping rule ---------------------------------------------------------------------------
@pytest.mark.parametrize("text, final, end", [
    (" Paris, France. It is big", False, len(" Paris, France.")),
    (" Paris\nFrance", False, len(" Paris")),
    ("\n\n Paris\nx", False, len("\n\n Paris")),           # leading whitespace does not end it
    (" Paris", False, None),
    (" Paris.", False, None),                                # could still become "Paris.com"
    (" Paris.", True, len(" Paris.")),
    (" J. K. Rowling wrote it. Then", False, len(" J. K. Rowling wrote it.")),  # initials
    (" the U.S. Army. Yes", False, len(" the U.S. Army.")),  # an abbreviation
    (" Mr. Smith. Yes", False, len(" Mr. Smith.")),
    (" version 3.5 of it. x", False, len(" version 3.5 of it.")),  # a decimal point
])
def test_answer_end(text, final, end):
    assert answer_end(text, final=final) == end


def test_cut_answer_strips_and_keeps_an_unfinished_text_whole():
    assert cut_answer("  Paris, France. It is") == "Paris, France."
    assert cut_answer(" the capital of") == "the capital of"
    assert cut_answer("\nParis") == "Paris"
    assert cut_answer("") == ""


# -- normalization and scores --------------------------------------------------------------------
@pytest.mark.parametrize("raw, norm", [
    ("The Eiffel Tower.", "eiffel tower"),
    ("  an   APPLE, a pear!", "apple pear"),
    ("Théâtre-Français", "théâtre français"),
    ("theatre", "theatre"),                 # an article only as a whole word
    ("", ""),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_match_and_first_answer_containment():
    assert exact_match("The Paris.", "Paris")
    assert not exact_match("Paris, France.", "Paris")
    assert contains_answer("Paris, France.", "Paris")
    assert contains_answer("It is in the United States.", "United States")
    assert not contains_answer("Parisian food.", "Paris")  # whole words only
    assert not contains_answer("anything", "")
    assert not exact_match("", "")


# -- generation against hand-made answers ----------------------------------------------------------
WORDS = ["<pad>", "</s>", "Q", "R", "S", "N", "Paris", "Rome", "France", ",", ".", "It", "loop", "x"]


def bigram(entries):
    return BigramLM.from_words(WORDS, entries)


def test_generation_follows_the_stopping_rule_on_hand_made_continuations():
    tok = word_level_tokenizer(WORDS)
    # Q -> Paris , France . It   (stops after the period: "It" shows it ended a sentence)
    # R -> Rome </s>             (EOS)
    # S -> loop loop loop ...    (the token cap)
    lm = bigram({"Q": {"Paris": 5}, "Paris": {",": 5}, ",": {"France": 5}, "France": {".": 5}, ".": {"It": 5},
                 "R": {"Rome": 5}, "Rome": {"</s>": 5}, "S": {"loop": 5}, "loop": {"loop": 5}})
    answers = generate_answers(lm, tok, ["Q", "R", "S"], max_new_tokens=6, batch_size=2)
    assert answers == ["Paris, France.", "Rome", " ".join(["loop"] * 6)]


def _records():
    return [EditRequest(case_id=7, prompt="{}", subject="Q", target_new="Paris", target_true="Rome",
                        paraphrases=("R", "S"), neighborhood=("N", "S")),
            EditRequest(case_id=8, prompt="{}", subject="R", target_new="Rome", target_true="Paris",
                        neighborhood=("N",), neighborhood_targets=("France",))]


def test_wild_records_scores_exact_match_first_answer_and_unchanged_neighborhood():
    tok = word_level_tokenizer(WORDS)
    edited = bigram({"Q": {"Paris": 5}, "Paris": {",": 5}, ",": {"France": 5}, "France": {"</s>": 5},
                     "R": {"Paris": 5}, "S": {"Rome": 5}, "Rome": {"</s>": 5}, "N": {"France": 5}})
    unedited = bigram({"Q": {"Rome": 5}, "Rome": {"</s>": 5}, "R": {"Rome": 5}, "S": {"Rome": 5},
                       "N": {"Rome": 5}})
    pre = wild_records(unedited, tok, _records())
    post = wild_records(edited, tok, _records())
    add_wild_locality(post, pre)
    a, b = post
    assert a["answer_rewrite"] == "Paris, France" and a["answers_paraphrases"] == ["Paris, France", "Rome"]
    assert a["efficacy_wild"] is True and a["efficacy_wild_exact"] is False      # Paris first, not alone
    assert a["generalization_wild"] == [True, False] and a["generalization_wild_exact"] == [False, False]
    assert a["answers_neighborhood"] == ["France", "Rome"]
    assert a["specificity_wild"] == [False, True]                              # o = Rome
    assert a["locality_wild"] == [False, True]                                 # N changed, S did not
    assert b["answer_rewrite"] == "Paris, France" and b["efficacy_wild"] is False
    assert b["generalization_wild"] == [] and b["specificity_wild"] == [True]  # loc_ans France
    assert b["locality_wild"] == [False]
    assert wild_values(a) == {"efficacy_wild": 100.0, "generalization_wild": 50.0, "specificity_wild": 50.0,
                              "locality_wild": 50.0, "efficacy_wild_exact": 0.0, "generalization_wild_exact": 0.0}
    summary = wild_summary(post)
    assert summary["efficacy_wild"] == 50.0 and summary["specificity_wild"] == 75.0
    assert summary["locality_wild"] == 25.0 and summary["generalization_wild"] == 50.0  # record 8 has none
    assert "locality_wild" not in wild_summary(wild_records(edited, tok, _records()))  # no unedited answers


def test_wild_records_asks_through_the_given_wrapper_and_limits_records():
    tok = word_level_tokenizer(WORDS)
    lm = bigram({"x": {"Paris": 5}, "Paris": {"</s>": 5}})
    recs = wild_records(lm, tok, _records(), WildConfig(num_records=1, neighborhood_prompts=1), ask=lambda p: f"{p} x")
    assert len(recs) == 1 and recs[0]["answer_rewrite"] == "Paris" and recs[0]["efficacy_wild"]
    assert recs[0]["answers_neighborhood"] == ["Paris"] and recs[0]["specificity_wild"] == [False]


def test_wild_config_rejects_bad_values():
    with pytest.raises(UserInputError, match="wild.max_new_tokens"):
        WildConfig(max_new_tokens=0)
    with pytest.raises(UserInputError, match="wild.batch_size"):
        WildConfig(batch_size=0)
    with pytest.raises(ValueError, match="wild.neighborhood_prompts"):
        WildConfig(neighborhood_prompts=-1)


# -- batched, cached generation equals a plain loop ------------------------------------------------
def _plain_greedy(model, tok, prompt: str, cap: int) -> str:
    """One prompt, no padding, no cache: the whole sequence is re-run for every token."""
    ids = tok(prompt)["input_ids"]
    new: list[int] = []
    for _ in range(cap):
        x = torch.tensor([ids + new])
        nxt = int(model(input_ids=x, attention_mask=torch.ones_like(x),
                        position_ids=torch.arange(x.shape[1])[None]).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        new.append(nxt)
        if answer_end(tok.decode(new, skip_special_tokens=True)) is not None:
            break
    return cut_answer(tok.decode(new, skip_special_tokens=True))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_left_padded_batches_match_a_plain_loop(arch):
    tok = make_tokenizer()
    model = make_model(arch)
    model.generation_config.eos_token_id = tok.eos_token_id
    prompts = ["The Eiffel Tower is in", "Danielle Darrieux spoke", "Toko Yasuda plays the guitar and the",
               "Apple", "The mother tongue of Thomas Joannes Stieltjes is"]
    want = [_plain_greedy(model, tok, p, 12) for p in prompts]
    got = generate_answers(model, tok, prompts, max_new_tokens=12, batch_size=3)
    assert got == want
    assert len(set(want)) > 1  # the prompts do lead to different answers


# -- in fit and validate ----------------------------------------------------------------------------
def test_fit_and_validate_report_both_protocols(tmp_path, capsys):
    import json
    import warnings
    from pathlib import Path

    from blueedit.module import EditingModule
    from helpers import RECORDS
    from helpers import fit as _fit
    from helpers import tiny_data as _data
    from helpers import tiny_module as _module
    from helpers import trainer as _trainer

    root = tmp_path
    make_model("llama").save_pretrained(root / "tiny-llama")
    make_tokenizer().save_pretrained(root / "tiny-llama")
    (root / "edits.json").write_text(json.dumps(RECORDS))
    base = _module(root, "boundary", evaluate=True)
    module = EditingModule(model=base.model_spec, editing=base.hp, stats=base.stats_spec, evaluate=True,
                           eval_batch_size=8, wild_metrics=True, wild=WildConfig(max_new_tokens=6, batch_size=4))
    trainer = _fit(module, _data(root), default_root_dir=str(root / "run"))
    summary = json.loads((Path(trainer.log_dir or trainer.default_root_dir) / "metrics.json").read_text())
    m = summary["metrics"]
    assert m["efficacy"]["protocol"] == "teacher forcing" and m["efficacy_wild"]["protocol"] == "wild"
    assert m["locality_wild"]["pre"] is None and m["locality_wild"]["post"] is not None  # against the pre answers
    post = summary["records"]["post"][0]
    assert isinstance(post["answer_rewrite"], str) and len(post["locality_wild"]) == 1
    assert "| efficacy_wild | wild |" in capsys.readouterr().out

    val = _trainer(default_root_dir=str(root / "val"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = val.validate(module, datamodule=_data(root))
    saved = json.loads((Path(val.log_dir or val.default_root_dir) / "eval_metrics.json").read_text())
    assert saved["protocols"]["efficacy_wild"] == "wild" and saved["protocols"]["efficacy"] == "teacher forcing"
    assert saved["metrics"]["efficacy_wild"] == pytest.approx(m["efficacy_wild"]["post"])  # the same edited model
    assert "val/efficacy_wild" in out[0] and "locality_wild" not in saved["metrics"]
