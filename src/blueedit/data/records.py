"""Edit requests: the one record type every loader produces and every editor consumes."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from blueedit.config import UserInputError


class EditRecordError(UserInputError):
    """A bad edit record. The message names the record (index and ``case_id``) and the field."""


@dataclass(frozen=True)
class EditRequest:
    """One fact edit ``(s, r, o) -> (s, r, o*)``.

    Attributes:
        case_id: identifier of the record in its source (CounterFact ``case_id``, row index, ...).
        prompt: template with exactly one ``{}`` slot where the subject goes, e.g. ``"{} plays the"``.
        subject: the subject string ``s``; the fact token is its last token inside the prompt.
        target_new: the new object ``o*`` (tokenized with a leading space).
        target_true: the current object ``o`` (``None`` when unknown).
        paraphrases: filled prompts that state the same fact in other words (generalization).
        neighborhood: filled prompts about other subjects whose answers must not change (specificity).
        neighborhood_targets: the answer of each neighborhood prompt; empty means ``target_true``
            (CounterFact), one per prompt otherwise (zsRE's ``loc_ans``).
        generation_prompts: filled prompts for fluency / consistency generations.
        relation_id: the relation's Wikidata id (CounterFact ``relation_id``, e.g. ``"P103"``);
            with ``target_new_id`` it finds the consistency reference texts about ``o*``.
        target_new_id: the Wikidata id of ``target_new`` (CounterFact ``target_new.id``).
        source: the format it was read from (``counterfact``, ``counterfact-easyedit``, ``zsre``, ``user``).
    """

    case_id: Any
    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = field(default_factory=tuple)
    neighborhood: tuple[str, ...] = field(default_factory=tuple)
    neighborhood_targets: tuple[str, ...] = field(default_factory=tuple)
    generation_prompts: tuple[str, ...] = field(default_factory=tuple)
    source: str = "user"
    relation_id: str | None = None
    target_new_id: str | None = None

    @property
    def filled_prompt(self) -> str:
        """The rewrite prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject, 1)

    def neighborhood_answers(self) -> list[str]:
        """The answer expected for each neighborhood prompt."""
        if self.neighborhood_targets:
            return list(self.neighborhood_targets)
        return [self.target_true or ""] * len(self.neighborhood)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EditRequest:
        kw = dict(d)
        for k in ("paraphrases", "neighborhood", "neighborhood_targets", "generation_prompts"):
            if k in kw and kw[k] is not None:
                kw[k] = tuple(kw[k])
        return cls(**kw)


def _where(index: int | None, case_id: Any) -> str:
    name = "edit record" if index is None else f"edit record {index}"
    return name if case_id is None else f"{name} (case_id={case_id!r})"


def validate_request(req: EditRequest, index: int | None = None) -> EditRequest:
    """Check one request and return it; raise :class:`EditRecordError` naming the record otherwise.

    Rules: ``prompt`` is a string with exactly one ``{}``; ``subject`` and ``target_new`` are
    non-empty strings; ``target_true`` is a string or ``None`` and, except for zsRE records, differs
    from ``target_new`` (an edit towards what the model should already say is a mistake in the
    data; zsRE's ``alt`` is a label, not the model's belief, and equals the answer in a few
    published records); the list fields hold strings; ``neighborhood_targets`` is empty or as long
    as ``neighborhood``.
    """
    where = _where(index, req.case_id)
    for name in ("prompt", "subject", "target_new"):
        value = getattr(req, name)
        if not isinstance(value, str):
            raise EditRecordError(f"{where}: '{name}' must be a string, got {type(value).__name__}")
        if not value.strip():
            raise EditRecordError(f"{where}: '{name}' is empty")
    if req.target_true is not None and not isinstance(req.target_true, str):
        raise EditRecordError(
            f"{where}: 'target_true' must be a string or null, got {type(req.target_true).__name__}"
        )
    if (req.source != "zsre" and isinstance(req.target_true, str)
            and req.target_true.strip() == req.target_new.strip()):
        raise EditRecordError(
            f"{where}: 'target_new' equals 'target_true' ({req.target_new!r}); an edit must change the answer"
        )
    n_slots = req.prompt.count("{}")
    if n_slots == 0:
        hint = " (write the subject's place as '{}')" if req.subject in req.prompt else ""
        raise EditRecordError(f"{where}: 'prompt' {req.prompt!r} has no '{{}}' slot for the subject{hint}")
    if n_slots > 1:
        raise EditRecordError(f"{where}: 'prompt' {req.prompt!r} has {n_slots} '{{}}' slots, expected one")
    for name in ("paraphrases", "neighborhood", "neighborhood_targets", "generation_prompts"):
        values = getattr(req, name)
        if not isinstance(values, (list, tuple)):
            raise EditRecordError(f"{where}: '{name}' must be a list of strings, got {type(values).__name__}")
        for j, v in enumerate(values):
            if not isinstance(v, str):
                raise EditRecordError(f"{where}: '{name}[{j}]' must be a string, got {type(v).__name__}")
    if req.neighborhood_targets and len(req.neighborhood_targets) != len(req.neighborhood):
        raise EditRecordError(
            f"{where}: 'neighborhood_targets' has {len(req.neighborhood_targets)} entries for "
            f"{len(req.neighborhood)} neighborhood prompts"
        )
    return req


def validate_requests(requests: list[EditRequest]) -> list[EditRequest]:
    """Validate a whole batch before anything is edited (a round is atomic)."""
    return [validate_request(r, i) for i, r in enumerate(requests)]


class DuplicateRecordsWarning(UserWarning):
    """Edit records that repeat an earlier record were dropped."""


def drop_duplicate_records(requests: list[EditRequest], source: str = "the edit records") -> list[EditRequest]:
    """``requests`` without the records that repeat an earlier one in everything but ``case_id``
    (the same edit of the same fact, evaluated on the same prompts: editing it again only adds
    rounds), in their order; the first of each is kept. A :class:`DuplicateRecordsWarning` gives
    the number dropped. Records that share the prompt, subject and ``target_new`` but differ in
    their evaluation prompts or ``target_true`` are different benchmark records and are kept (the
    EasyEdit CounterFact set holds four such pairs)."""
    seen: set[tuple] = set()
    kept, dropped = [], []
    for i, r in enumerate(requests):
        key = tuple(getattr(r, name) for name in r.__dataclass_fields__ if name != "case_id")
        if key in seen:
            dropped.append(i)
        else:
            seen.add(key)
            kept.append(r)
    if dropped:
        shown = ", ".join(map(str, dropped[:5])) + (", ..." if len(dropped) > 5 else "")
        warnings.warn(f"{source}: {len(dropped)} edit records repeat an earlier record in everything but case_id "
                      f"and are dropped (records {shown}); {len(kept)} distinct records remain",
                      DuplicateRecordsWarning, stacklevel=2)
    return kept


def check_unique_case_ids(requests: list[EditRequest], source: str = "the edit records") -> list[EditRequest]:
    """Raise :class:`EditRecordError` when two requests share a ``case_id``: per-record results
    (``metrics.json``, ``edits.json``) are keyed by it, so duplicates could not be told apart.
    Records without an explicit ``case_id`` get their row index, which is unique."""
    first: dict[str, int] = {}
    for i, r in enumerate(requests):
        key = repr(r.case_id)
        if key in first:
            raise EditRecordError(
                f"{source}: edit records {first[key]} and {i} share case_id={r.case_id!r}; "
                "give every record its own case_id"
            )
        first[key] = i
    return requests


def effective_prompt_limit(max_prompt_tokens: int | None, context: int | None) -> int | None:
    """The prompt-length limit in force: ``max_prompt_tokens`` capped by the model's context
    ``context`` (either may be ``None``: no limit from that side)."""
    if max_prompt_tokens is not None and (isinstance(max_prompt_tokens, bool) or not isinstance(max_prompt_tokens, int)
                                          or max_prompt_tokens < 1):
        raise UserInputError(f"model.max_prompt_tokens must be a positive integer or null, got {max_prompt_tokens!r}")
    limits = [n for n in (max_prompt_tokens, context) if n is not None]
    return min(limits) if limits else None


def check_prompt_lengths(requests: list[EditRequest], tokenizer, limit: int | None,
                         source: str = "edit records", option: str = "model.max_prompt_tokens") -> None:
    """Raise :class:`EditRecordError` naming the first record whose text is longer than ``limit``
    tokens: the rewrite prompt with its new target, a paraphrase, a neighborhood or a generation
    prompt. (A 5,000-token prompt otherwise runs for many minutes and tens of GB before failing.)"""
    if limit is None or not requests:
        return
    texts: list[str] = []
    where: list[tuple[int, str]] = []
    for i, r in enumerate(requests):
        texts.append(f"{r.filled_prompt} {r.target_new}")
        where.append((i, "prompt"))
        for name in ("paraphrases", "neighborhood", "generation_prompts"):
            for j, t in enumerate(getattr(r, name)):
                texts.append(t)
                where.append((i, f"{name}[{j}]"))
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    for (i, name), x in zip(where, ids):
        if len(x) > limit:
            raise EditRecordError(
                f"{source}: {_where(i, requests[i].case_id)}: '{name}' is {len(x)} tokens, over the limit of "
                f"{limit} tokens (raise {option}, or shorten the record)"
            )
