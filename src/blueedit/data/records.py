"""Edit requests: the one record type every loader produces and every editor consumes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


class EditRecordError(ValueError):
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
    def from_dict(cls, d: dict[str, Any]) -> "EditRequest":
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
    non-empty strings; ``target_true`` is a string or ``None``; the list fields hold strings;
    ``neighborhood_targets`` is empty or as long as ``neighborhood``.
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
