"""Consistency of generations (ROME's "reference score"): TF-IDF cosine to reference texts.

See ``docs/algorithms.md`` §8 (Evaluation). A :class:`TfidfModel` is either the published
statistics (``idf.npy`` and ``tfidf_vocab.json``, :meth:`TfidfModel.from_published`) or fitted on
a corpus of ``D`` documents: the vocabulary is the ``N`` most frequent words (total count, ties
broken alphabetically) and, with ``df(w)`` the number of documents containing ``w``,

    idf(w) = ln((1 + D) / (1 + df(w))) + 1

(scikit-learn's smoothed idf, with which the published statistics were computed).

A text becomes ``v_w = tf(w) · idf(w)`` with ``tf(w)`` the raw count of ``w`` in the text, and

    cos(a, b) = <v_a, v_b> / (|v_a| · |v_b|)                    (0 when either vector is 0)

For one CounterFact record, consistency is the cosine between all its generations joined by
spaces and all reference texts about ``o*`` joined by spaces (ROME's
``attribute_snippets.json``: Wikipedia snippets per ``relation_id`` and target ``id``); tables
print ``100 · mean_records cos``. When the reference texts are not available the metric is not
computed (reported as absent), never estimated.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "TfidfModel",
    "tfidf_tokenize",
    "fit_tfidf_on_corpus",
    "load_corpus_texts",
    "consistency_score",
    "mean_consistency",
    "load_attribute_snippets",
]

_TOKEN_RE = re.compile(r"(?u)\b\w\w+\b")


def tfidf_tokenize(text: str) -> list[str]:
    """Lower-cased words of two or more word characters (scikit-learn's default pattern)."""
    return _TOKEN_RE.findall(text.lower())


@dataclass
class TfidfModel:
    """A fitted TF-IDF model.

    Attributes:
        vocab: word -> column index, ``V`` entries.
        idf: ``[V]`` float64 inverse document frequencies ``log(D / df)``.
    """

    vocab: dict[str, int]
    idf: torch.Tensor

    @classmethod
    def fit(cls, texts: Iterable[str], max_features: int = 50_000) -> TfidfModel:
        """Fit on documents ``texts``: top-``max_features`` words by count,
        ``idf = ln((1 + D) / (1 + df)) + 1``."""
        counts: Counter[str] = Counter()
        df: Counter[str] = Counter()
        n_docs = 0
        for text in texts:
            words = tfidf_tokenize(text)
            counts.update(words)
            df.update(set(words))
            n_docs += 1
        if n_docs == 0:
            raise ValueError("cannot fit a TF-IDF model on no documents")
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max_features]
        words = sorted(w for w, _ in top)
        vocab = {w: i for i, w in enumerate(words)}
        idf = torch.tensor([math.log((1 + n_docs) / (1 + df[w])) + 1.0 for w in words], dtype=torch.float64)
        return cls(vocab, idf)

    @classmethod
    def from_published(cls, directory: str | Path) -> TfidfModel:
        """The published TF-IDF statistics: ``idf.npy`` (``[V]`` idf values) and
        ``tfidf_vocab.json`` (word -> column) in ``directory``."""
        import numpy as np

        d = Path(directory)
        idf_path, vocab_path = d / "idf.npy", d / "tfidf_vocab.json"
        for path in (idf_path, vocab_path):
            if not path.is_file():
                raise FileNotFoundError(f"TF-IDF statistics file {path} not found")
        vocab = {str(w): int(i) for w, i in json.loads(vocab_path.read_text(encoding="utf-8")).items()}
        idf = torch.from_numpy(np.asarray(np.load(idf_path), dtype=np.float64))
        if idf.ndim != 1 or (vocab and max(vocab.values()) >= idf.numel()):
            raise ValueError(f"{idf_path} holds {tuple(idf.shape)} idf values for a vocabulary of {len(vocab)} words")
        return cls(vocab, idf)

    def transform(self, texts: Sequence[str]) -> torch.Tensor:
        """``[N, V]`` dense TF-IDF vectors ``v[i, w] = count_i(w) · idf(w)``."""
        out = torch.zeros(len(texts), self.idf.numel(), dtype=torch.float64)
        for i, text in enumerate(texts):
            for word, c in Counter(tfidf_tokenize(text)).items():
                j = self.vocab.get(word)
                if j is not None:
                    out[i, j] = c
        return out * self.idf

    def similarity(self, a: str, b: str) -> float:
        """Cosine of the TF-IDF vectors of ``a`` and ``b`` (0 when either is empty)."""
        v = self.transform([a, b])
        na, nb = v[0].norm(), v[1].norm()
        if na == 0 or nb == 0:
            return 0.0
        return float(v[0] @ v[1] / (na * nb))

    def save(self, path: str | Path) -> None:
        """Write the vocabulary and idf as JSON."""
        words = sorted(self.vocab, key=self.vocab.__getitem__)
        Path(path).write_text(json.dumps({"vocab": words, "idf": self.idf.tolist()}))

    @classmethod
    def load(cls, path: str | Path) -> TfidfModel:
        """Read a model written by :meth:`save`."""
        d = json.loads(Path(path).read_text())
        return cls({w: i for i, w in enumerate(d["vocab"])}, torch.tensor(d["idf"], dtype=torch.float64))


def load_corpus_texts(path: str | Path, *, min_chars: int = 200, limit: int | None = None) -> list[str]:
    """Texts of a JSON-lines corpus (``.jsonl`` or ``.jsonl.gz``, one ``{"text": ...}`` per line).

    Pages shorter than ``min_chars`` (stubs) are skipped; at most ``limit`` texts are returned.
    """
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    texts: list[str] = []
    with opener(p, "rt", encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(texts) >= limit:
                break
            line = line.strip()
            if not line:
                continue
            text = json.loads(line).get("text", "")
            if len(text) >= min_chars:
                texts.append(text)
    return texts


def fit_tfidf_on_corpus(texts: Iterable[str], max_features: int = 50_000) -> TfidfModel:
    """Fit a :class:`TfidfModel` on ``texts`` (e.g. :func:`load_corpus_texts` of a Wikipedia sample)."""
    return TfidfModel.fit(texts, max_features=max_features)


def consistency_score(
    generations: str | Sequence[str], references: str | Sequence[str], tfidf: TfidfModel
) -> float:
    """TF-IDF cosine in ``[0, 1]`` between the joined generations and the joined references."""
    gen = generations if isinstance(generations, str) else " ".join(generations)
    ref = references if isinstance(references, str) else " ".join(references)
    return tfidf.similarity(gen, ref)


def mean_consistency(
    pairs: Iterable[tuple[Sequence[str], Sequence[str]]], tfidf: TfidfModel
) -> float:
    """``100 · mean`` of :func:`consistency_score` over ``(generations, references)`` records.

    Records with no reference text are skipped; ``nan`` when none is left.
    """
    scores = [consistency_score(g, r, tfidf) for g, r in pairs if len(r) > 0]
    return 100.0 * sum(scores) / len(scores) if scores else float("nan")


def load_attribute_snippets(path: str | Path) -> dict[str, dict[str, list[str]]]:
    """Read ROME's ``attribute_snippets.json``: ``relation_id -> target_id -> [snippet text]``.

    The file is a list of ``{"relation_id", "target_id", "samples": [{"text", ...}, ...]}``;
    entries with the same keys are merged. Raises ``FileNotFoundError`` when it is absent, so
    the caller can report consistency as not computed.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"attribute snippets file {p} not found (consistency needs it)")
    out: dict[str, dict[str, list[str]]] = {}
    for entry in json.loads(p.read_text(encoding="utf-8")):
        texts = out.setdefault(str(entry["relation_id"]), {}).setdefault(str(entry["target_id"]), [])
        texts.extend(str(s["text"]) for s in entry.get("samples", []))
    return out
