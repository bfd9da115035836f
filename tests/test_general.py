"""General capability: classification metrics by hand, zero-shot tasks on a fixed-logit LM, perplexity."""

from __future__ import annotations

import math

import pytest
import torch

from blueedit.evaluation.general import (
    TASKS,
    GlueTask,
    classification_metrics,
    evaluate_general,
    evaluate_task,
    load_task_examples,
    perplexity,
)
from fake_lm import BigramLM, word_level_tokenizer
from helpers import make_model, make_tokenizer


def test_classification_metrics_by_hand():
    # TP=2 TN=1 FP=1 FN=1
    m = classification_metrics([1, 1, 0, 0, 1], [1, 0, 0, 1, 1], binary=True)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["mcc"] == pytest.approx(1 / 6)
    assert classification_metrics([1, 1], [1, 0], binary=True)["mcc"] == 0.0  # constant prediction
    # torchmetrics alone gives 0.58 here (an epsilon in the zero denominator); GLUE's convention is 0
    assert classification_metrics([1, 1, 1, 1], [1, 0, 1, 1], binary=True)["mcc"] == 0.0
    assert classification_metrics([0, 0], [1, 1], binary=True) == {"accuracy": 0.0, "f1": 0.0, "mcc": 0.0}
    assert classification_metrics([2, 0, 3], [2, 1, 3], binary=False) == {"accuracy": pytest.approx(2 / 3)}


def test_custom_task_on_bigram_model():
    words = ["<pad>", "<s>", "</s>", "good", "bad", "meh", "pos", "neg"]
    model = BigramLM.from_words(words, {"good": {"pos": 3}, "bad": {"neg": 3}, "meh": {"neg": 1}})
    tok = word_level_tokenizer(words)
    task = GlueTask("toy", lambda ex: ex["text"], lambda ex: (" neg", " pos"), lambda ex: ex["label"])
    examples = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}, {"text": "meh", "label": 1}]
    m = evaluate_task(model, tok, task, examples, batch_size=4)  # predictions 1, 0, 0
    assert m["accuracy"] == pytest.approx(2 / 3) and m["main"] == m["accuracy"]
    assert m["f1"] == pytest.approx(2 / 3) and m["num_examples"] == 3


def test_published_tasks_with_a_constant_answer_model(data_dir):
    # unknown words map to <pad>; every row prefers positive / Yes / True / B
    words = ["<pad>", "<s>", "</s>", "positive", "negative", "Yes", "No", "True", "False", "A", "B", "C", "D"]
    table = torch.zeros(len(words), len(words))
    for w in ("positive", "Yes", "True", "B"):
        table[:, words.index(w)] = 5.0
    model, tok = BigramLM(table), word_level_tokenizer(words)
    n = 20
    res = evaluate_general(model, tok, data_dir, n=n, batch_size=16)
    assert set(res) == {"sst2", "mrpc", "cola", "rte", "mmlu", "nli"}
    for name in res:
        gold = [TASKS[name].label(ex) for ex in load_task_examples(data_dir, name, n)]
        expected = sum(g == (0 if name in ("rte", "nli") else 1) for g in gold) / n
        assert res[name]["accuracy"] == pytest.approx(expected), name
        assert res[name]["num_examples"] == n
    mrpc_pos = sum(TASKS["mrpc"].label(ex) for ex in load_task_examples(data_dir, "mrpc", n))
    assert res["mrpc"]["main"] == pytest.approx(2 * mrpc_pos / (2 * mrpc_pos + (n - mrpc_pos)))
    assert res["cola"]["main"] == 0.0  # MCC of a constant prediction
    assert "f1" not in res["mmlu"]


def test_prompts_of_each_task(data_dir):
    for name, task in TASKS.items():
        ex = load_task_examples(data_dir, name, 1)[0]
        prompt = task.build_prompt(ex)
        assert prompt.endswith(":") and 0 <= task.label(ex) < len(task.choices(ex))
        assert all(c.startswith(" ") for c in task.choices(ex))
    mmlu = TASKS["mmlu"].build_prompt(load_task_examples(data_dir, "mmlu", 1)[0])
    assert "\nA. " in mmlu and "\nD. " in mmlu and mmlu.endswith("Answer:")


def test_perplexity_of_uniform_model_is_vocab_size():
    words = ["<pad>", "<s>", "</s>", "a", "b", "c", "d", "e"]
    model, tok = BigramLM(torch.zeros(len(words), len(words))), word_level_tokenizer(words)
    assert perplexity(model, tok, ["a b c", "d e a b c d", "a"], batch_size=2) == pytest.approx(len(words))
    assert math.isnan(perplexity(model, tok, ["a"]))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@torch.no_grad()
def test_perplexity_matches_direct_computation(arch):
    tok, model = make_tokenizer(bos=True), make_model(arch, n_layer=2)
    texts = ["The Eiffel Tower is in Paris.", "Berlin London Rome", "Apple A5 was created by Apple."]
    nll, count = 0.0, 0
    for t in texts:
        ids = torch.tensor([tok(t)["input_ids"]])
        logits = model(input_ids=ids).logits[0, :-1]
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    assert perplexity(model, tok, texts, batch_size=2) == pytest.approx(math.exp(nll / count), rel=1e-4)
    ids = tok(texts[0])["input_ids"]
    short = perplexity(model, tok, [texts[0]], max_length=4)
    logits = model(input_ids=torch.tensor([ids[:4]])).logits[0, :-1]
    direct = float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:4])))
    assert short == pytest.approx(math.exp(direct), rel=1e-4)
