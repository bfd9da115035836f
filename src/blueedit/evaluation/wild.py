"""Evaluation in the wild: the edited model writes its answer, and the written answer is scored.

Teacher forcing (:mod:`.editing_metrics`) scores the probability of the target tokens placed after
the prompt; it never asks what the model would *say*. Here the model generates greedily from each
prompt of a record (the rewrite prompt, every paraphrase, every neighborhood prompt) and the
generation is cut by the stopping rule (:func:`answer_end`):

    the answer ends at the first newline, at the first period that ends a sentence (a ``.``
    followed by whitespace or by the end of the text, not after a single letter or a common
    abbreviation), at EOS, or after ``max_new_tokens`` tokens (default 40).

Leading whitespace is not part of the answer (a newline before any word does not end it).
With ``a`` the cut answer, ``y`` an expected answer and ``norm`` the normalization of
:func:`normalize_answer` (lower case, punctuation and the articles *a*, *an*, *the* removed,
whitespace collapsed):

    exact(a, y)    = 1[norm(a) = norm(y)]
    contains(a, y) = 1[norm(y) occurs in norm(a) as whole words]          (first-answer containment)

Per record ``r`` (percent; a record without prompts of a kind does not count for it):

    efficacy_wild_r           = 100 · contains(a(rewrite), o*)
    generalization_wild_r     = 100 · mean_p contains(a(p), o*)           p: paraphrases
    specificity_wild_r        = 100 · mean_n contains(a(n), ans_n)        n: neighborhood prompts
    locality_wild_r           = 100 · mean_n 1[a(n) = a_0(n)]             a_0: the unedited model's answer

and the ``*_wild_exact`` versions with ``exact`` instead of ``contains`` (efficacy and
generalization). The metrics are means over records, as for teacher forcing. ``locality_wild``
needs the unedited model's answers (:func:`add_wild_locality`).

Generation runs in left-padded batches with the model's key/value cache; rows that have stopped
leave the batch (and the cache) at once, and prompts are batched by length, so an evaluation
costs about ``#prompts × (answer length) / batch_size`` single-token forward passes.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from blueedit.config import UserInputError
from blueedit.data.records import EditRequest
from blueedit.editing.targets import cache_argument
from blueedit.models.tokens import encode_prompt, pad_batch, pad_token_id

__all__ = [
    "WildConfig",
    "WILD_METRICS",
    "answer_end",
    "cut_answer",
    "normalize_answer",
    "exact_match",
    "contains_answer",
    "stop_token_ids",
    "generate_answers",
    "wild_records",
    "wild_values",
    "wild_summary",
    "add_wild_locality",
]

#: The metrics this protocol reports (every name carries the protocol).
WILD_METRICS: tuple[str, ...] = (
    "efficacy_wild", "generalization_wild", "specificity_wild", "locality_wild",
    "efficacy_wild_exact", "generalization_wild_exact",
)

#: Words after which a period does not end a sentence.
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "inc", "ltd", "co", "mt", "no",
                            "prof", "gen", "col", "lt", "sgt", "ft", "u.s", "e.g", "i.e"})
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})


@dataclass
class WildConfig:
    """How the in-the-wild metrics are computed (``EditingModule(wild=...)``).

    Attributes:
        max_new_tokens: the token cap of one answer (the stopping rule's last resort).
        batch_size: prompts generated together.
        chat_template: ask each prompt as the user's question in the tokenizer's chat template
            (the model answers as the assistant). Ignored when the model is already prompted
            through its chat template (``model.chat_template``).
        num_records: score only the first ``num_records`` evaluated records (``None``: all).
        neighborhood_prompts: answer only the first this many neighborhood prompts of a record
            (``None``: all; CounterFact has 10, most of the cost).
    """

    max_new_tokens: int = 40
    batch_size: int = 32
    chat_template: bool = False
    num_records: int | None = None
    neighborhood_prompts: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserInputError(f"wild.{name} must be an integer >= 1, got {v!r}")
        for name in ("num_records", "neighborhood_prompts"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise UserInputError(f"wild.{name} must be an integer >= 0 or null, got {v!r}")


# -- the stopping rule and the scores (pure functions on strings) ----------------------------------
def _ends_sentence(text: str, dot: int) -> bool:
    """Whether the ``.`` at ``text[dot]`` ends a sentence (followed by whitespace or the end)."""
    if dot + 1 < len(text) and not text[dot + 1].isspace():
        return False
    start = dot
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    word = text[start:dot].lower()
    if len(word) == 1 and word.isalpha():  # an initial: "J. K. Rowling"
        return False
    return word.strip("(\"'") not in _ABBREVIATIONS


def answer_end(text: str, final: bool = False) -> int | None:
    """The index in ``text`` (a generation without its prompt) where the answer ends, or ``None``
    when it has not ended yet.

    The answer ends before the first newline or at (after) the first period that ends a sentence,
    whichever comes first; leading whitespace is skipped. A period at the very end of ``text``
    ends the answer only when ``final`` (the generation stopped there: the next token could still
    make it ``3.5`` or ``U.S.``).
    """
    begin = len(text) - len(text.lstrip())
    for i in range(begin, len(text)):
        ch = text[i]
        if ch == "\n":
            return i
        if ch == ".":
            if i + 1 == len(text) and not final:
                return None
            if _ends_sentence(text, i):
                return i + 1
    return None


def cut_answer(text: str) -> str:
    """``text`` cut by the stopping rule (a finished generation), without surrounding whitespace."""
    end = answer_end(text, final=True)
    return (text if end is None else text[:end]).strip()


def normalize_answer(text: str) -> str:
    """Lower case, punctuation replaced by spaces, the articles *a*, *an*, *the* removed,
    whitespace collapsed to single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(answer: str, target: str) -> bool:
    """``norm(answer) == norm(target)`` (an empty target matches nothing)."""
    t = normalize_answer(target)
    return bool(t) and normalize_answer(answer) == t


def contains_answer(answer: str, target: str) -> bool:
    """Whether ``norm(target)`` occurs in ``norm(answer)`` as whole words (an empty target
    occurs nowhere)."""
    t = normalize_answer(target)
    return bool(t) and f" {t} " in f" {normalize_answer(answer)} "


# -- batched greedy generation -------------------------------------------------------------------
def stop_token_ids(model: nn.Module, tokenizer) -> set[int]:
    """The ids that end a generation: the tokenizer's EOS and the model's generation EOS ids
    (instruct models end a turn with their own token)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    for i in eos if isinstance(eos, (list, tuple)) else [eos]:
        if i is not None:
            ids.add(int(i))
    return ids


def _cache_of(out) -> Any:
    """The key/value cache a forward pass returned (``None`` for a model without one)."""
    for name in ("past_key_values", "cache"):
        cache = getattr(out, name, None)
        if cache is not None:
            return cache
    return None


@torch.no_grad()
def _generate_batch(model: nn.Module, tokenizer, encoded: list[list[int]], max_new_tokens: int,
                    stops: set[int], pad_id: int, cache_arg: str) -> list[str]:
    """Greedy answers of one batch of token-id prompts (each cut by the stopping rule).

    A model that returns a key/value cache is fed one new token per row and step, and rows that
    stopped are dropped from the cache; any other model is re-run on the whole sequences."""
    device = next(model.parameters()).device
    batch = pad_batch(encoded, [-1] * len(encoded), pad_id=pad_id, padding_side="left").to(device)
    ids, mask, positions = batch.input_ids, batch.attention_mask, batch.position_ids
    step_ids, step_pos = ids, positions
    cache = None
    active = list(range(len(encoded)))  # original row of each row still in the batch
    tokens: list[list[int]] = [[] for _ in encoded]
    for _ in range(max_new_tokens):
        kwargs = {cache_arg: cache} if cache is not None else {}
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True, **kwargs)
        cache = _cache_of(out)
        nxt = out.logits[:, -1].argmax(-1).tolist()  # [b]
        keep: list[int] = []
        for j, (row, tok) in enumerate(zip(active, nxt)):
            if tok in stops:
                continue
            tokens[row].append(tok)
            if answer_end(tokenizer.decode(tokens[row], skip_special_tokens=True)) is None:
                keep.append(j)
        if not keep:
            break
        if len(keep) < len(active):
            index = torch.tensor(keep, device=device)
            if cache is not None:
                cache.batch_select_indices(index)
            ids, mask, positions = ids[index], mask[index], positions[index]
            nxt = [nxt[j] for j in keep]
            active = [active[j] for j in keep]
        new = torch.tensor(nxt, device=device)[:, None]
        new_pos = positions[:, -1:] + 1
        ids = torch.cat([ids, new], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = torch.cat([positions, new_pos], dim=1)
        step_ids, step_pos = (new, new_pos) if cache is not None else (ids, positions)
    return [cut_answer(tokenizer.decode(t, skip_special_tokens=True)) for t in tokens]


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 40,
                     batch_size: int = 32, progress: str | None = None) -> list[str]:
    """The greedy answer to each prompt, cut by the stopping rule (:func:`answer_end`; EOS or
    ``max_new_tokens`` end it too), in the order of ``prompts``.

    Prompts are tokenized as in scoring (:func:`~blueedit.models.tokens.encode_prompt`, BOS kept),
    sorted by length and generated ``batch_size`` at a time, left padded, with the key/value cache.
    """
    encoded = [encode_prompt(tokenizer, p, None)[0] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    stops, pad_id, cache_arg = stop_token_ids(model, tokenizer), pad_token_id(tokenizer), cache_argument(model)
    answers: list[str] = [""] * len(prompts)
    starts = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=progress, unit="batch")
    for s in starts:
        chunk = order[s : s + batch_size]
        for i, a in zip(chunk, _generate_batch(model, tokenizer, [encoded[i] for i in chunk], max_new_tokens,
                                               stops, pad_id, cache_arg)):
            answers[i] = a
    return answers


# -- records -------------------------------------------------------------------------------------
def _prompts_of(req: EditRequest, neighborhood_prompts: int | None) -> dict[str, list[str]]:
    return {"rewrite": [req.filled_prompt], "paraphrases": list(req.paraphrases),
            "neighborhood": list(req.neighborhood)[:neighborhood_prompts]}


def wild_records(model: nn.Module, tokenizer, requests: list[EditRequest], spec: WildConfig | None = None,
                 ask=None, progress: str | None = None) -> list[dict[str, Any]]:
    """One dict per request (the first ``spec.num_records``): ``case_id``, the answers
    (``answer_rewrite``, ``answers_paraphrases``, ``answers_neighborhood``) and the per-prompt
    outcomes (``efficacy_wild``, ``efficacy_wild_exact``: bool or ``None``; ``generalization_wild``,
    ``generalization_wild_exact``, ``specificity_wild``: lists of bool).

    ``ask``: a function applied to every prompt before generation (e.g. the chat template).
    All prompts of all records are generated in one call of :func:`generate_answers`.
    """
    spec = spec or WildConfig()
    chosen = requests if spec.num_records is None else requests[: spec.num_records]
    flat: list[str] = []
    spans: list[dict[str, tuple[int, int]]] = []
    for req in chosen:
        span = {}
        for group, prompts in _prompts_of(req, spec.neighborhood_prompts).items():
            span[group] = (len(flat), len(flat) + len(prompts))
            flat += [ask(p) if ask is not None else p for p in prompts]
        spans.append(span)
    answers = generate_answers(model, tokenizer, flat, max_new_tokens=spec.max_new_tokens,
                               batch_size=spec.batch_size, progress=progress) if flat else []
    out = []
    for req, span in zip(chosen, spans):
        got = {g: answers[a:b] for g, (a, b) in span.items()}
        rewrite = got["rewrite"][0]
        out.append({
            "case_id": req.case_id,
            "answer_rewrite": rewrite,
            "answers_paraphrases": got["paraphrases"],
            "answers_neighborhood": got["neighborhood"],
            "efficacy_wild": contains_answer(rewrite, req.target_new),
            "efficacy_wild_exact": exact_match(rewrite, req.target_new),
            "generalization_wild": [contains_answer(a, req.target_new) for a in got["paraphrases"]],
            "generalization_wild_exact": [exact_match(a, req.target_new) for a in got["paraphrases"]],
            "specificity_wild": [contains_answer(a, y) for a, y in zip(got["neighborhood"], req.neighborhood_answers())
                                 if y.strip()],
        })
    return out


def wild_values(rec: dict[str, Any]) -> dict[str, float]:
    """The per-record values (percent) of the :data:`WILD_METRICS` that ``rec`` has: a bool is
    100 or 0, a list its mean times 100; an empty list or ``None`` is absent."""
    out: dict[str, float] = {}
    for name in WILD_METRICS:
        v = rec.get(name)
        values = v if isinstance(v, list) else ([] if v is None else [v])
        if values:
            out[name] = 100.0 * sum(float(x) for x in values) / len(values)
    return out


def wild_summary(records: list[dict[str, Any]]) -> dict[str, float]:
    """Each of the :data:`WILD_METRICS` averaged over the records that have it (absent if none)."""
    sums: dict[str, list[float]] = {}
    for rec in records:
        for name, v in wild_values(rec).items():
            sums.setdefault(name, []).append(v)
    return {name: sum(v) / len(v) for name in WILD_METRICS if (v := sums.get(name))}


def add_wild_locality(records: list[dict[str, Any]], pre_records: list[dict[str, Any]] | None) -> None:
    """Add ``locality_wild`` (a list of bool: each neighborhood answer equals the unedited
    model's) to each record of ``records`` whose ``case_id`` has answers in ``pre_records``."""
    if not pre_records:
        return
    before = {r.get("case_id"): r.get("answers_neighborhood") for r in pre_records}
    for rec in records:
        pre, now = before.get(rec.get("case_id")), rec.get("answers_neighborhood")
        if pre is None or now is None:
            continue
        if len(pre) != len(now):
            raise ValueError(f"record {rec.get('case_id')!r}: {len(pre)} unedited but {len(now)} edited "
                             "neighborhood answers")
        rec["locality_wild"] = [a == b for a, b in zip(pre, now)]
