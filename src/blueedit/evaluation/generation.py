"""Generation metrics of edited records: fluency and (with reference texts) consistency.

See ``docs/algorithms.md`` §8 (Evaluation). For record ``r`` with generation prompts
``g_1..g_n`` the model writes one top-5 sampled text ``t_i`` per prompt (100 tokens counting the
prompt, :func:`~blueedit.evaluation.fluency.generate_sampled`), and

    fluency_r     = 100 · mean_i E(t_i)                                (weighted n-gram entropy)
    consistency_r = 100 · cos_tfidf(t_1 ⊕ ... ⊕ t_n, ref_1 ⊕ ... ⊕ ref_m)

where ``ref_j`` are the reference texts about ``o*`` (ROME's ``attribute_snippets.json``, keyed
by the record's ``relation_id`` and ``target_new_id``) and ``⊕`` joins texts with a space. The
reported numbers are means over the records that have them (per record, then over records, as
the published summary does). Records without generation prompts are left out; consistency is
absent, never estimated, when the reference texts are not available.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from blueedit.config import UserInputError
from blueedit.data.records import EditRequest
from blueedit.evaluation.consistency import (
    TfidfModel,
    consistency_score,
    fit_tfidf_on_corpus,
    load_attribute_snippets,
)
from blueedit.evaluation.fluency import generate_sampled, text_ngram_entropy

log = logging.getLogger(__name__)

__all__ = ["GenerationMetricsConfig", "References", "load_references", "generation_records", "generation_summary"]

GENERATION_METRICS: tuple[str, ...] = ("fluency", "consistency")


@dataclass
class GenerationMetricsConfig:
    """How the generation metrics are computed.

    Attributes:
        max_length: tokens per generated text, counting the prompt's (published: 100).
        top_k: sampling keeps the ``top_k`` most likely tokens (published: 5).
        seed: the seed of the sampling; prompt ``i`` of a call draws from ``seed + i``.
        batch_size: prompts generated together.
        num_records: generate for the first ``num_records`` evaluated records only (``None``: all).
        attribute_snippets: ROME's ``attribute_snippets.json`` (the consistency reference texts);
            ``None`` looks for it in the data directory (and its ``rome_eval/`` folder).
        tfidf: a folder with the published ``idf.npy`` and ``tfidf_vocab.json``; ``None`` looks
            beside the snippets file and, when absent, fits the TF-IDF model on the snippets
            themselves (what the published code does when it cannot download the statistics).
    """

    max_length: int = 100
    top_k: int = 5
    seed: int = 0
    batch_size: int = 16
    num_records: int | None = None
    attribute_snippets: str | None = None
    tfidf: str | None = None

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise UserInputError(f"generation.max_length must be >= 1, got {self.max_length}")
        if self.top_k < 1:
            raise UserInputError(f"generation.top_k must be >= 1, got {self.top_k}")
        if self.batch_size < 1:
            raise UserInputError(f"generation.batch_size must be >= 1, got {self.batch_size}")
        if self.num_records is not None and self.num_records < 0:
            raise UserInputError(f"generation.num_records must be >= 0 or null, got {self.num_records}")


@dataclass
class References:
    """Consistency reference texts (``relation_id -> target_id -> [text]``) and the TF-IDF model."""

    snippets: dict[str, dict[str, list[str]]]
    tfidf: TfidfModel

    def texts_for(self, req: EditRequest) -> list[str]:
        """The reference texts about ``req.target_new`` (empty when the record has no ids)."""
        if req.relation_id is None or req.target_new_id is None:
            return []
        return list(self.snippets.get(str(req.relation_id), {}).get(str(req.target_new_id), []))


def _snippets_path(spec: GenerationMetricsConfig, data_dir: str | Path | None) -> Path | None:
    if spec.attribute_snippets is not None:
        path = Path(spec.attribute_snippets).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"generation.attribute_snippets: {path} not found")
        return path
    if data_dir is None:
        return None
    for rel in ("attribute_snippets.json", "rome_eval/attribute_snippets.json"):
        path = Path(data_dir).expanduser() / rel
        if path.is_file():
            return path
    return None


def load_references(spec: GenerationMetricsConfig, data_dir: str | Path | None = None) -> References | None:
    """The consistency references of ``spec``, or ``None`` when no snippets file is available.

    An explicitly given file that does not exist is an error (``FileNotFoundError``).
    """
    path = _snippets_path(spec, data_dir)
    if path is None:
        return None
    snippets = load_attribute_snippets(path)
    if spec.tfidf is not None:
        tfidf = TfidfModel.from_published(Path(spec.tfidf).expanduser())
    elif (path.parent / "idf.npy").is_file() and (path.parent / "tfidf_vocab.json").is_file():
        tfidf = TfidfModel.from_published(path.parent)
    else:
        log.info("no published TF-IDF statistics beside %s: fitting TF-IDF on the snippets", path)
        docs = [t for by_target in snippets.values() for texts in by_target.values() for t in texts]
        tfidf = fit_tfidf_on_corpus(docs, max_features=10**9)
    return References(snippets, tfidf)


def generation_records(
    model: nn.Module,
    tokenizer,
    requests: list[EditRequest],
    spec: GenerationMetricsConfig | None = None,
    references: References | None = None,
    prompt_offset: int = 0,
) -> list[dict[str, Any]]:
    """One dict per request: ``case_id``, ``generations`` (texts), ``fluency`` (``None`` without
    generation prompts) and, when ``references`` holds texts for it, ``consistency``.

    Only the first ``spec.num_records`` requests are generated for. All prompts of all records go
    through :func:`~blueedit.evaluation.fluency.generate_sampled` in one call; prompt ``j`` of
    that flat list samples with seed ``spec.seed + prompt_offset + j`` (so chunks of one list,
    given their offsets, sample exactly as the whole list does).
    """
    spec = spec or GenerationMetricsConfig()
    chosen = requests if spec.num_records is None else requests[: spec.num_records]
    prompts = [p for req in chosen for p in req.generation_prompts]
    texts = generate_sampled(model, tokenizer, prompts, max_length=spec.max_length, top_k=spec.top_k,
                             seed=spec.seed + prompt_offset, batch_size=spec.batch_size) if prompts else []
    out: list[dict[str, Any]] = []
    at = 0
    for req in chosen:
        gens = texts[at : at + len(req.generation_prompts)]
        at += len(req.generation_prompts)
        rec: dict[str, Any] = {"case_id": req.case_id, "generations": gens,
                               "fluency": 100.0 * sum(map(text_ngram_entropy, gens)) / len(gens) if gens else None}
        refs = references.texts_for(req) if references is not None else []
        if gens and refs:
            rec["consistency"] = 100.0 * consistency_score(gens, refs, references.tfidf)
        out.append(rec)
    return out


def generation_summary(records: list[dict[str, Any]]) -> dict[str, float]:
    """``fluency`` (and ``consistency``) averaged over the records that have it; a metric no
    record has is absent."""
    out: dict[str, float] = {}
    for name in GENERATION_METRICS:
        values = [float(r[name]) for r in records if r.get(name) is not None]
        if values:
            out[name] = sum(values) / len(values)
    return out
