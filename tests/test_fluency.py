"""Fluency: hand-computed n-gram entropies and batched greedy generation."""

from __future__ import annotations

import math

import pytest

from blueedit.evaluation.fluency import (
    fluency_score,
    generate_greedy,
    ngram_entropy,
    text_ngram_entropy,
    word_tokenize,
)
from fake_lm import BigramLM, word_level_tokenizer
from helpers import make_model, make_tokenizer


def test_word_tokenize_splits_words_numbers_and_punctuation():
    words = ["Do", "n't", "stop", ",", "it", "'s", "3.14", "now", "..."]
    assert word_tokenize("Don't stop, it's 3.14 now...") == words
    assert word_tokenize("well-known  Paris!") == ["well-known", "Paris", "!"]


def test_ngram_entropy_by_hand():
    # bigrams of a b a b: (a,b) x2, (b,a) x1
    h = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy(["a", "b", "a", "b"], 2) == pytest.approx(h)
    assert ngram_entropy("a b a b", 2) == pytest.approx(h)
    assert ngram_entropy("one two three four five", 2) == pytest.approx(2.0)  # 4 distinct bigrams
    assert ngram_entropy("the the the the", 3) == 0.0
    assert ngram_entropy("short", 2) == 0.0


def test_weighted_entropy_and_fluency_score():
    # "a b c d": 3 distinct bigrams (log2 3 bits), 2 distinct trigrams (1 bit)
    e = (2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2
    assert text_ngram_entropy("a b c d") == pytest.approx(e)
    assert fluency_score(["a b c d", "x x x x x"]) == pytest.approx(100 * (e + 0.0) / 2)
    assert math.isnan(fluency_score([]))


WORDS = ["<pad>", "<s>", "</s>", "a", "b", "c", "d"]


def test_greedy_loop_on_a_fixed_chain():
    tok = word_level_tokenizer(WORDS)
    model = BigramLM.from_words(WORDS, {"a": {"b": 5}, "b": {"c": 5}, "c": {"d": 5}, "d": {"</s>": 5}})
    prompts = ["a", "b c", "c"]
    expected = ["a b c d", "b c d", "c d"]
    assert generate_greedy(model, tok, prompts, max_new_tokens=10, batch_size=2) == expected
    assert generate_greedy(model, tok, prompts, max_new_tokens=1) == ["a b", "b c d", "c d"]
    assert generate_greedy(model, tok, ["a"], max_new_tokens=10, include_prompt=False) == [" b c d"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hf_generation_batched_equals_one_by_one(arch):
    tok, model = make_tokenizer(), make_model(arch, n_layer=2)
    prompts = ["The Eiffel Tower is in", "Berlin", "Toko Yasuda plays the guitar and the"]
    batched = generate_greedy(model, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [generate_greedy(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    assert all(b.startswith(p) for b, p in zip(batched, prompts))
