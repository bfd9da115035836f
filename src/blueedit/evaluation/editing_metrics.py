"""Editing metrics: CounterFact efficacy / generalization / specificity and zsRE token accuracy.

CounterFact (ROME/MEMIT convention). With ``NLL(y | x)`` the mean-token negative log-likelihood
of target ``y`` after prompt ``x`` and ``P(y | x) = exp(-NLL(y | x))``:

    efficacy       = 100 · mean_records  1[NLL(o* | rewrite) < NLL(o | rewrite)]
    generalization = 100 · mean_{all paraphrase prompts}  1[NLL(o* | p) < NLL(o | p)]
    specificity    = 100 · mean_{all neighborhood prompts} 1[NLL(a | n) < NLL(o* | n)]

where ``a`` is the neighborhood answer (``o`` unless the record gives ``neighborhood_targets``).
The ``*_margin`` versions average ``P(o* | x) - P(o | x)`` (rewrite, paraphrases) and
``P(a | n) - P(o* | n)`` (neighborhood) instead of the indicator.

zsRE (MEMIT convention): ``acc(y | x)`` is the teacher-forced top-1 token accuracy of ``y``
after ``x``; for each record the token hits of all its prompts of one kind are pooled, and

    efficacy       = 100 · mean_records acc(o* | rewrite)
    generalization = 100 · mean_records acc(o* | paraphrases)
    specificity    = 100 · mean_records acc(loc_ans | loc prompt)

Every prompt of every record is scored in one flat list (see :mod:`.scoring`), so a whole
evaluation costs ``ceil(#pairs / batch_size)`` forward passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from blueedit.data.records import EditRequest
from blueedit.editing.tokens import tokenize_target
from blueedit.evaluation.metrics import MeanValue, SuccessRate
from blueedit.evaluation.scoring import score_continuations

__all__ = ["EvaluationResult", "evaluate_counterfact", "evaluate_zsre", "evaluate_requests"]


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


def _value(metric: SuccessRate | MeanValue) -> float:
    """The metric's value as a float; ``nan`` when it was never updated (no such prompts).

    A metric made with ``sync_on_compute`` is always computed, so every process joins the sync.
    """
    if metric.update_count == 0 and not metric.sync_on_compute:
        return float("nan")
    return float(metric.compute().item())


def _meters(cls, kinds, sync: bool, model: nn.Module) -> dict:
    """One metric per kind; with ``sync`` their states live on the model's device and are summed
    over all processes at ``compute`` (torchmetrics synchronization, for sharded evaluation)."""
    device = next(model.parameters()).device if sync else torch.device("cpu")
    return {k: cls(sync_on_compute=sync).to(device) for k in kinds}


@torch.no_grad()
def evaluate_counterfact(
    model: nn.Module, tokenizer, requests: list[EditRequest], *, batch_size: int = 32, sync: bool = False
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

    scores = score_continuations(model, tokenizer, pairs.prompts, pairs.continuations, batch_size=batch_size)
    nll = scores.mean_nll.double()  # [n_pairs]
    prob = torch.exp(-nll)

    kinds = ("efficacy", "generalization", "specificity")
    rate = _meters(SuccessRate, kinds, sync, model)
    margin = _meters(MeanValue, kinds, sync, model)
    records: list[dict[str, Any]] = []
    for req, plan in zip(requests, plans):
        rec: dict[str, Any] = {"case_id": req.case_id}
        # kind -> [(success, margin, nll of first, nll of second)] in prompt order
        per: dict[str, list[tuple[bool, float, float, float]]] = {k: [] for k in kinds}
        for kind, _, ia, ib in plan:
            outcome = (bool(nll[ia] < nll[ib]), float(prob[ia] - prob[ib]), float(nll[ia]), float(nll[ib]))
            per[kind].append(outcome)
        for kind in kinds:
            if per[kind]:
                rate[kind].update(torch.tensor([o[0] for o in per[kind]], dtype=torch.bool))
                margin[kind].update(torch.tensor([o[1] for o in per[kind]], dtype=torch.float64))
        eff = per["efficacy"][0] if per["efficacy"] else None
        rec["efficacy"] = eff[0] if eff else None
        rec["efficacy_margin"] = eff[1] if eff else None
        rec["rewrite_nll_new"] = eff[2] if eff else None
        rec["rewrite_nll_true"] = eff[3] if eff else None
        for kind in ("generalization", "specificity"):
            rec[kind] = [o[0] for o in per[kind]]
            rec[f"{kind}_margin"] = [o[1] for o in per[kind]]
        records.append(rec)

    metrics: dict[str, float] = {}
    for kind in kinds:
        metrics[kind] = _value(rate[kind])
    for kind in kinds:
        metrics[f"{kind}_margin"] = _value(margin[kind])
    skipped = {"no_target_true": skipped_true} if skipped_true else {}
    return EvaluationResult(metrics, records, "counterfact", len(requests), skipped)


@torch.no_grad()
def evaluate_zsre(
    model: nn.Module, tokenizer, requests: list[EditRequest], *, batch_size: int = 32, sync: bool = False
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

    scores = score_continuations(model, tokenizer, pairs.prompts, pairs.continuations, batch_size=batch_size)
    kinds = ("efficacy", "generalization", "specificity")
    acc = _meters(MeanValue, kinds, sync, model)
    records: list[dict[str, Any]] = []
    for req, plan in zip(requests, plans):
        rec: dict[str, Any] = {"case_id": req.case_id}
        for kind in kinds:
            idx = plan[kind]
            if not idx:
                rec[kind] = None
                continue
            hits = torch.cat([scores.correct[i] for i in idx]).double()  # pooled token hits
            a = float(hits.mean())
            acc[kind].update(torch.tensor([100.0 * a], dtype=torch.float64))
            rec[kind] = a
            rec[f"{kind}_per_prompt"] = [float(scores.correct[i].double().mean()) for i in idx]
        records.append(rec)
    metrics = {k: _value(acc[k]) for k in kinds}
    return EvaluationResult(metrics, records, "zsre", len(requests))


def evaluate_requests(
    model: nn.Module,
    tokenizer,
    requests: list[EditRequest],
    kind: str = "auto",
    batch_size: int = 32,
    sync: bool = False,
) -> EvaluationResult:
    """Dispatch to :func:`evaluate_zsre` or :func:`evaluate_counterfact`.

    ``kind="auto"`` picks ``"zsre"`` when ``requests[0].source == "zsre"``, else ``"counterfact"``.
    With ``sync`` (sharded evaluation) the metrics are summed over all processes; every process
    must call this the same way.
    """
    if kind == "auto":
        kind = "zsre" if requests and requests[0].source == "zsre" else "counterfact"
    if kind == "zsre":
        return evaluate_zsre(model, tokenizer, requests, batch_size=batch_size, sync=sync)
    if kind in ("counterfact", "counterfact-easyedit"):
        return evaluate_counterfact(model, tokenizer, requests, batch_size=batch_size, sync=sync)
    raise ValueError(f"unknown evaluation kind {kind!r}; expected 'auto', 'counterfact' or 'zsre'")
