"""Editing metrics: CounterFact efficacy / generalization / specificity and zsRE token accuracy.

See ``docs/algorithms.md`` §8 (Evaluation). Every metric is averaged per record first and then
over records, as the published summary (``experiments/summarize.py``) does.

CounterFact (ROME/MEMIT convention). With ``NLL(y | x)`` the mean-token negative log-likelihood
of target ``y`` after prompt ``x`` and ``P(y | x) = exp(-NLL(y | x))``, for record ``r``:

    eff_r  = 1[NLL(o* | rewrite) < NLL(o | rewrite)]
    gen_r  = mean_{paraphrases p of r}    1[NLL(o* | p) < NLL(o | p)]
    spec_r = mean_{neighborhood n of r}   1[NLL(a | n) < NLL(o* | n)]

    efficacy = 100 · mean_r eff_r,  generalization = 100 · mean_r gen_r,  specificity = 100 · mean_r spec_r

where ``a`` is the neighborhood answer (``o`` unless the record gives ``neighborhood_targets``)
and a record without prompts of a kind does not count for that kind. The ``*_margin`` versions
average ``P(o* | x) - P(o | x)`` (rewrite, paraphrases) and ``P(a | n) - P(o* | n)``
(neighborhood) the same way (per record, then over records) instead of the indicator.

zsRE (MEMIT convention): ``acc(y | x)`` is the teacher-forced top-1 token accuracy of ``y``
after ``x``; for each record the token hits of all its prompts of one kind are pooled, and

    efficacy       = 100 · mean_records acc(o* | rewrite)
    generalization = 100 · mean_records acc(o* | paraphrases)
    specificity    = 100 · mean_records acc(loc_ans | loc + "?")

Locality (WISE's Loc, any method): agreement with the *pre-edit* model on the neighborhood
prompts (zsRE ``loc``, CounterFact neighborhood). Every evaluation stores, per neighborhood
prompt, the top-1 token ids the model predicts at the answer's positions (teacher forcing on the
answer); with ``pred_0`` those of the pre-edit model and ``pred_T`` after editing,

    locality_r = (# positions where pred_T = pred_0) / (# positions), pooled over r's prompts
    locality   = 100 · mean_r locality_r                                  (:func:`add_locality`)

Every prompt of every record is scored in one flat list (see :mod:`.scoring`), so a whole
evaluation costs ``ceil(#pairs / batch_size)`` forward passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from blueedit.data.records import EditRequest
from blueedit.evaluation.metrics import EditMetrics
from blueedit.evaluation.scoring import score_continuations
from blueedit.models.tokens import tokenize_target

__all__ = [
    "EvaluationResult",
    "EDIT_KINDS",
    "record_values",
    "metric_names",
    "edit_metrics",
    "evaluation_kind",
    "evaluate_counterfact",
    "evaluate_zsre",
    "evaluate_requests",
    "add_locality",
    "locality_agreement",
]

EDIT_KINDS: tuple[str, ...] = ("efficacy", "generalization", "specificity")


@dataclass
class EvaluationResult:
    """Aggregated metrics and per-record details of one evaluation.

    Attributes:
        metrics: ``efficacy``, ``generalization``, ``specificity`` in percent (``nan`` when no
            record had the prompts needed), plus ``*_margin`` for CounterFact.
        records: one dict per record (``case_id`` and its per-prompt outcomes).
        kind: ``"counterfact"`` or ``"zsre"``.
        num_records: number of requests evaluated.
        skipped: reason -> number of records left out of some metric
            (``"no_target_true"``: left out of efficacy and generalization).
    """

    metrics: dict[str, float]
    records: list[dict[str, Any]]
    kind: str
    num_records: int
    skipped: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "num_records": self.num_records,
            "metrics": dict(self.metrics),
            "skipped": dict(self.skipped),
            "records": [dict(r) for r in self.records],
        }


class _PairList:
    """A flat list of (prompt, continuation ids) pairs; ``add`` returns the pair's index."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.continuations: list[list[int]] = []

    def add(self, prompt: str, ids: list[int]) -> int:
        self.prompts.append(prompt)
        self.continuations.append(ids)
        return len(self.prompts) - 1


def _mean(values: list) -> float | None:
    return float(sum(float(v) for v in values)) / len(values) if values else None


def record_values(rec: dict[str, Any], kind: str) -> dict[str, float]:
    """The per-record values that are averaged over records, from one entry of
    :attr:`EvaluationResult.records`.

    CounterFact (``kind="counterfact"``): ``efficacy`` = ``100 · eff_r``, ``generalization`` /
    ``specificity`` = ``100 ·`` the mean of the record's per-prompt successes, and the matching
    ``*_margin`` means (probability differences, not scaled). zsRE: ``100 ·`` the record's pooled
    token accuracy of each kind. A kind the record has no prompt for is absent.
    """
    out: dict[str, float] = {}
    for name in EDIT_KINDS:
        v = rec.get(name)
        if kind == "zsre":
            if v is not None:
                out[name] = 100.0 * float(v)
            continue
        values = v if isinstance(v, list) else ([] if v is None else [v])
        m = _mean(values)
        if m is None:
            continue
        out[name] = 100.0 * m
        mv = rec.get(f"{name}_margin")
        margins = mv if isinstance(mv, list) else ([] if mv is None else [mv])
        mm = _mean(margins)
        if mm is not None:
            out[f"{name}_margin"] = mm
    return out


def metric_names(kind: str) -> list[str]:
    """The metric names of an evaluation of ``kind`` (CounterFact adds the ``*_margin`` means)."""
    return list(EDIT_KINDS) + ([] if kind == "zsre" else [f"{k}_margin" for k in EDIT_KINDS])


def edit_metrics(kind: str, sync: bool = False, device: torch.device | str = "cpu") -> EditMetrics:
    """The accumulators of an evaluation of ``kind``: one mean over records per metric name; with
    ``sync`` their states live on ``device`` (the model's) and are summed over all processes at
    ``compute`` (sharded evaluation)."""
    return EditMetrics(metric_names(kind), sync).to(device)


def _aggregate(records: list[dict[str, Any]], kind: str, sync: bool, model: nn.Module,
               metrics: EditMetrics | None) -> dict[str, float]:
    """``mean over records`` of :func:`record_values` for every metric name (``nan`` when no
    record has it), added to ``metrics`` when given (running values over several calls)."""
    if metrics is None:
        metrics = edit_metrics(kind, sync, next(model.parameters()).device if sync else "cpu")
    metrics.update_records(records, lambda rec: record_values(rec, kind))
    return metrics.results()


@torch.no_grad()
def evaluate_counterfact(
    model: nn.Module, tokenizer, requests: list[EditRequest], *, batch_size: int = 32, sync: bool = False,
    metrics: EditMetrics | None = None, progress: str | None = None,
) -> EvaluationResult:
    """CounterFact efficacy, generalization, specificity (and probability margins), in percent.

    Records without ``target_true`` are left out of efficacy and generalization (counted in
    ``skipped["no_target_true"]``); their neighborhood prompts still count when the record gives
    ``neighborhood_targets``, otherwise they are left out of specificity too.
    """
    pairs = _PairList()
    # per record: (kind, prompt, pair index of a, pair index of b); success = NLL(a) < NLL(b)
    plans: list[list[tuple[str, str, int, int]]] = []
    skipped_true = 0
    cache: dict[str, list[int]] = {}

    def ids_of(text: str) -> list[int]:
        if text not in cache:
            cache[text] = tokenize_target(tokenizer, text)
        return cache[text]

    for req in requests:
        plan: list[tuple[str, str, int, int]] = []
        new = ids_of(req.target_new)
        if req.target_true is None or not req.target_true.strip():
            skipped_true += 1
        else:
            true = ids_of(req.target_true)
            groups = (("efficacy", [req.filled_prompt]), ("generalization", list(req.paraphrases)))
            for kind, prompts in groups:
                for p in prompts:
                    plan.append((kind, p, pairs.add(p, new), pairs.add(p, true)))
        answers = req.neighborhood_answers()
        for p, a in zip(req.neighborhood, answers):
            if not a.strip():
                continue
            plan.append(("specificity", p, pairs.add(p, ids_of(a)), pairs.add(p, new)))
        plans.append(plan)

    scores = score_continuations(model, tokenizer, pairs.prompts, pairs.continuations, batch_size=batch_size,
                                 progress=progress)
    nll = scores.mean_nll.double()  # [n_pairs]
    prob = torch.exp(-nll)

    records: list[dict[str, Any]] = []
    for req, plan in zip(requests, plans):
        rec: dict[str, Any] = {"case_id": req.case_id}
        # kind -> [(success, margin, nll of first, nll of second)] in prompt order
        per: dict[str, list[tuple[bool, float, float, float]]] = {k: [] for k in EDIT_KINDS}
        for kind, _, ia, ib in plan:
            outcome = (bool(nll[ia] < nll[ib]), float(prob[ia] - prob[ib]), float(nll[ia]), float(nll[ib]))
            per[kind].append(outcome)
        eff = per["efficacy"][0] if per["efficacy"] else None
        rec["efficacy"] = eff[0] if eff else None
        rec["efficacy_margin"] = eff[1] if eff else None
        rec["rewrite_nll_new"] = eff[2] if eff else None
        rec["rewrite_nll_true"] = eff[3] if eff else None
        for kind in ("generalization", "specificity"):
            rec[kind] = [o[0] for o in per[kind]]
            rec[f"{kind}_margin"] = [o[1] for o in per[kind]]
        rec["neighborhood_predictions"] = [scores.predicted[ia].tolist() for kind, _, ia, _ in plan
                                           if kind == "specificity"]
        records.append(rec)

    values = _aggregate(records, "counterfact", sync, model, metrics)
    skipped = {"no_target_true": skipped_true} if skipped_true else {}
    return EvaluationResult(values, records, "counterfact", len(requests), skipped)


@torch.no_grad()
def evaluate_zsre(
    model: nn.Module, tokenizer, requests: list[EditRequest], *, batch_size: int = 32, sync: bool = False,
    metrics: EditMetrics | None = None, progress: str | None = None,
) -> EvaluationResult:
    """zsRE teacher-forced token accuracy (percent, mean over records of the per-record accuracy).

    Specificity uses ``neighborhood_answers()`` (zsRE's ``loc_ans``); neighborhood prompts with
    no answer are left out. A record with no prompt of some kind does not count for that metric.
    """
    pairs = _PairList()
    plans: list[dict[str, list[int]]] = []
    for req in requests:
        new = tokenize_target(tokenizer, req.target_new)
        plan: dict[str, list[int]] = {
            "efficacy": [pairs.add(req.filled_prompt, new)],
            "generalization": [pairs.add(p, new) for p in req.paraphrases],
            "specificity": [
                pairs.add(p, tokenize_target(tokenizer, a))
                for p, a in zip(req.neighborhood, req.neighborhood_answers())
                if a.strip()
            ],
        }
        plans.append(plan)

    scores = score_continuations(model, tokenizer, pairs.prompts, pairs.continuations, batch_size=batch_size,
                                 progress=progress)
    records: list[dict[str, Any]] = []
    for req, plan in zip(requests, plans):
        rec: dict[str, Any] = {"case_id": req.case_id}
        for kind in EDIT_KINDS:
            idx = plan[kind]
            if not idx:
                rec[kind] = None
                continue
            hits = torch.cat([scores.correct[i] for i in idx]).double()  # pooled token hits
            rec[kind] = float(hits.mean())
            rec[f"{kind}_per_prompt"] = [float(scores.correct[i].double().mean()) for i in idx]
        rec["neighborhood_predictions"] = [scores.predicted[i].tolist() for i in plan["specificity"]]
        records.append(rec)
    values = _aggregate(records, "zsre", sync, model, metrics)
    return EvaluationResult(values, records, "zsre", len(requests))


def evaluation_kind(requests: list[EditRequest]) -> str:
    """``"zsre"`` when the records come from zsRE (``requests[0].source``), else ``"counterfact"``."""
    return "zsre" if requests and requests[0].source == "zsre" else "counterfact"


def evaluate_requests(
    model: nn.Module,
    tokenizer,
    requests: list[EditRequest],
    kind: str = "auto",
    batch_size: int = 32,
    sync: bool = False,
    metrics: EditMetrics | None = None,
    progress: str | None = None,
) -> EvaluationResult:
    """Dispatch to :func:`evaluate_zsre` or :func:`evaluate_counterfact`.

    ``kind="auto"`` picks ``"zsre"`` when ``requests[0].source == "zsre"``, else ``"counterfact"``.
    With ``sync`` (sharded evaluation) the metrics are summed over all processes; every process
    must call this the same way. ``metrics`` (from :func:`edit_metrics`): accumulate into this
    collection, e.g. over the batches of an epoch; the result's metrics are then its running
    values. ``progress``: a progress bar over the scored prompts with this description.
    """
    if kind == "auto":
        kind = evaluation_kind(requests)
    if kind == "zsre":
        return evaluate_zsre(model, tokenizer, requests, batch_size=batch_size, sync=sync, metrics=metrics,
                             progress=progress)
    if kind in ("counterfact", "counterfact-easyedit"):
        return evaluate_counterfact(model, tokenizer, requests, batch_size=batch_size, sync=sync, metrics=metrics,
                             progress=progress)
    raise ValueError(f"unknown evaluation kind {kind!r}; expected 'auto', 'counterfact' or 'zsre'")


def locality_agreement(pre: list[list[int]], post: list[list[int]]) -> float | None:
    """The fraction of answer positions, pooled over a record's neighborhood prompts, where the
    top-1 token after editing equals the pre-edit one; ``None`` without prompts."""
    if len(pre) != len(post):
        raise ValueError(f"{len(pre)} pre-edit but {len(post)} post-edit neighborhood predictions")
    same = total = 0
    for a, b in zip(pre, post):
        if len(a) != len(b):
            raise ValueError("pre- and post-edit predictions cover different answer tokens")
        same += sum(int(x == y) for x, y in zip(a, b))
        total += len(a)
    return same / total if total else None


def add_locality(result: EvaluationResult, pre: dict[str, Any] | EvaluationResult | None) -> None:
    """Add ``locality`` (per record and ``metrics["locality"]``, percent) to a post-edit
    ``result`` from the pre-edit evaluation ``pre`` (its ``to_dict()`` or itself), matching
    records by ``case_id``. Nothing is added without pre-edit predictions."""
    if pre is None:
        return
    pre_records = pre.records if isinstance(pre, EvaluationResult) else (pre.get("records") or [])
    by_id = {r["case_id"]: r.get("neighborhood_predictions") for r in pre_records}
    values = []
    for rec in result.records:
        before, after = by_id.get(rec["case_id"]), rec.get("neighborhood_predictions")
        if before is None or after is None:
            continue
        agreement = locality_agreement(before, after)
        rec["locality"] = agreement
        if agreement is not None:
            values.append(agreement)
    if values:
        result.metrics["locality"] = 100.0 * sum(values) / len(values)
