"""Consistency: TF-IDF fitted by hand-checkable rules, cosine similarities, snippet loading."""

from __future__ import annotations

import gzip
import json
import math

import pytest
import torch

from blueedit.evaluation.consistency import (
    TfidfModel,
    consistency_score,
    fit_tfidf_on_corpus,
    load_attribute_snippets,
    load_corpus_texts,
    mean_consistency,
    tfidf_tokenize,
)

DOCS = ["apple banana", "apple cherry", "banana durian", "apple banana cherry the"]


def test_fit_vocabulary_and_idf():
    model = fit_tfidf_on_corpus(DOCS)
    assert sorted(model.vocab) == ["apple", "banana", "cherry", "durian", "the"]
    idf = {w: float(model.idf[i]) for w, i in model.vocab.items()}
    # scikit-learn's smoothed idf ln((1 + D) / (1 + df)) + 1 with D = 4 documents
    assert idf["apple"] == pytest.approx(math.log(5 / 4) + 1)
    assert idf["durian"] == pytest.approx(math.log(5 / 2) + 1)
    assert idf["cherry"] == pytest.approx(math.log(5 / 3) + 1)
    small = TfidfModel.fit(DOCS, max_features=2)  # apple (3) and banana (3) are the most frequent
    assert sorted(small.vocab) == ["apple", "banana"]
    assert tfidf_tokenize("The I a Apple's x1") == ["the", "apple", "x1"]


def test_cosine_identical_disjoint_and_by_hand():
    model = fit_tfidf_on_corpus(DOCS)
    assert consistency_score("apple cherry", "Apple, cherry!", model) == pytest.approx(1.0)
    assert consistency_score("apple", "durian cherry", model) == 0.0
    assert consistency_score("nothing known", "apple", model) == 0.0
    a, c, b = math.log(5 / 4) + 1, math.log(5 / 3) + 1, math.log(5 / 4) + 1  # idf of apple, cherry, banana
    expected = (a * a) / (math.sqrt(a * a + c * c) * math.sqrt(a * a + b * b))
    assert consistency_score(["apple", "cherry"], ["apple banana"], model) == pytest.approx(expected)
    v = model.transform(["apple apple"])
    assert float(v[0, model.vocab["apple"]]) == pytest.approx(2 * a)
    pairs = [(["apple cherry"], ["apple cherry"]), (["apple"], ["durian"]), (["apple"], [])]
    assert mean_consistency(pairs, model) == pytest.approx(50.0)


def test_save_load_roundtrip(tmp_path):
    model = fit_tfidf_on_corpus(DOCS)
    model.save(tmp_path / "tfidf.json")
    back = TfidfModel.load(tmp_path / "tfidf.json")
    assert back.vocab == model.vocab and torch.allclose(back.idf, model.idf)


def test_load_attribute_snippets(tmp_path):
    snips = [
        {"relation_id": "P103", "target_id": "Q150", "samples": [{"text": "French is a language."}]},
        {"relation_id": "P103", "target_id": "Q150", "samples": [{"text": "Paris speaks French."}]},
        {"relation_id": "P17", "target_id": "Q30", "samples": []},
    ]
    path = tmp_path / "attribute_snippets.json"
    path.write_text(json.dumps(snips))
    out = load_attribute_snippets(path)
    assert out["P103"]["Q150"] == ["French is a language.", "Paris speaks French."]
    assert out["P17"]["Q30"] == []
    with pytest.raises(FileNotFoundError):
        load_attribute_snippets(tmp_path / "missing.json")


def test_load_corpus_texts(tmp_path, data_dir):
    path = tmp_path / "c.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for text in ["stub", "x" * 300, "y" * 250]:
            f.write(json.dumps({"id": 1, "text": text}) + "\n")
    assert len(load_corpus_texts(path)) == 2
    assert load_corpus_texts(path, min_chars=0, limit=1) == ["stub"]
    wiki = data_dir / "corpus" / "enwiki_wikiextractor_sample.jsonl.gz"
    texts = load_corpus_texts(wiki, limit=20)
    assert len(texts) == 20 and all(len(t) >= 200 for t in texts)
    model = fit_tfidf_on_corpus(texts, max_features=500)
    assert len(model.vocab) == 500
    the = sum("the" in tfidf_tokenize(t) for t in texts)  # documents that contain "the"
    assert float(model.idf[model.vocab["the"]]) == pytest.approx(math.log(21 / (1 + the)) + 1)


def test_published_statistics(tmp_path):
    import numpy as np

    (tmp_path / "tfidf_vocab.json").write_text(json.dumps({"cherry": 1, "apple": 0, "durian": 2}))
    np.save(tmp_path / "idf.npy", np.array([2.0, 3.0, 5.0]))
    model = TfidfModel.from_published(tmp_path)
    assert model.vocab == {"apple": 0, "cherry": 1, "durian": 2}
    # "apple cherry" -> (2, 3, 0); "cherry cherry durian" -> (0, 6, 5)
    expected = (3 * 6) / (math.sqrt(2**2 + 3**2) * math.sqrt(6**2 + 5**2))
    assert consistency_score("apple cherry", "cherry cherry durian", model) == pytest.approx(expected)
    (tmp_path / "idf.npy").unlink()
    with pytest.raises(FileNotFoundError, match="idf.npy"):
        TfidfModel.from_published(tmp_path)
