"""Paired comparisons of two arms evaluated on the same records.

Two arms (for example MEMIT and MEMIT + BLUE) are scored on the same records ``r = 1 … n``. With
``a_r`` and ``b_r`` a record's value of one metric in arm A and arm B (the per-record values of
:func:`blueedit.evaluation.editing_metrics.record_values`, in percent):

    d_r        = b_r − a_r                                  (the paired difference of record r)
    difference = mean_r d_r  = mean_r b_r − mean_r a_r      (percentage points)

**Bootstrap interval.** ``num_resamples`` times, draw ``n`` records with replacement (indices from a
seeded ``torch.Generator``, so the interval is reproducible) and take the mean of their ``d_r``; the
``confidence`` interval is the ``(1 − c)/2`` and ``(1 + c)/2`` quantiles of those means (percentile
bootstrap). Records are the unit that is resampled: prompts of one record are not independent.

**Per-record success** (for McNemar's test): a record succeeds in a metric when its value is above
``50`` (``success_threshold``). CounterFact efficacy is one comparison per record (values 0 or 100),
so this is the record's outcome itself; CounterFact generalization and specificity average a record's
prompts, so a record succeeds when more than half of its prompts do; zsRE metrics are token
accuracies, so a record succeeds when more than half of its answer tokens are right.

**McNemar's exact test.** With ``n_a`` the records that succeed in A only and ``n_b`` those that
succeed in B only (the discordant pairs, ``m = n_a + n_b``), under the null hypothesis that both
arms succeed equally often each discordant pair is A's or B's with probability ½:

    p = min(1, 2 · Σ_{i=0}^{min(n_a, n_b)} C(m, i) / 2^m)       (two-sided; p = 1 when m = 0)

**Verdict.** A lead counts only when the interval excludes zero: ``"B"`` when ``low > 0``, ``"A"``
when ``high < 0``, otherwise ``"tie"`` (an interval that contains 0 does not separate the arms).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

import torch

__all__ = [
    "PairedDifference",
    "align_records",
    "bootstrap_interval",
    "compare_records",
    "mcnemar_exact",
    "paired_difference",
    "record_success",
    "verdict",
]

DEFAULT_METRICS: tuple[str, ...] = ("efficacy", "generalization", "specificity")


@dataclass(frozen=True)
class PairedDifference:
    """One metric of arm B against arm A over ``n`` paired records.

    ``difference``, ``low`` and ``high`` are in the metric's units (percentage points);
    ``a_only`` / ``b_only`` count the records that succeed in one arm only; ``verdict`` is ``"A"``,
    ``"B"`` or ``"tie"`` (:func:`verdict`).
    """

    metric: str
    n: int
    mean_a: float
    mean_b: float
    difference: float
    low: float
    high: float
    confidence: float
    a_only: int
    b_only: int
    p_value: float
    verdict: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def align_records(records_a: Sequence[dict[str, Any]], records_b: Sequence[dict[str, Any]],
                  what_a: str = "A", what_b: str = "B") -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Pairs ``(record of A, record of B)`` with the same ``case_id``, in A's order.

    Raises ``ValueError`` naming the arm and the ``case_id`` when a record has no ``case_id``, a
    ``case_id`` occurs twice in one arm, or the two arms do not hold the same records.
    """
    def by_id(records: Sequence[dict[str, Any]], what: str) -> dict[Any, dict[str, Any]]:
        out: dict[Any, dict[str, Any]] = {}
        for i, rec in enumerate(records):
            cid = rec.get("case_id")
            if cid is None:
                raise ValueError(f"{what}: record {i} has no case_id; records can only be paired by case_id")
            if cid in out:
                raise ValueError(f"{what}: case_id {cid!r} occurs twice")
            out[cid] = rec
        return out

    a, b = by_id(records_a, what_a), by_id(records_b, what_b)
    only_a = [c for c in a if c not in b]
    only_b = [c for c in b if c not in a]
    if only_a or only_b:
        raise ValueError(f"{what_a} and {what_b} were not evaluated on the same records: case_ids only in "
                         f"{what_a}: {only_a[:5]}{' …' if len(only_a) > 5 else ''}, only in {what_b}: "
                         f"{only_b[:5]}{' …' if len(only_b) > 5 else ''}")
    return [(a[c], b[c]) for c in a]


def bootstrap_interval(differences: torch.Tensor, *, num_resamples: int = 10_000, confidence: float = 0.95,
                       seed: int = 0, chunk: int = 1_000) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``differences`` (shape ``[n]``, ``n ≥ 1``).

    Resamples records with replacement ``num_resamples`` times from ``torch.Generator().manual_seed(
    seed)`` (``chunk`` resamples at a time, to bound memory) and returns the ``(1 − c)/2`` and
    ``(1 + c)/2`` quantiles of the resampled means, as floats.
    """
    d = torch.as_tensor(differences, dtype=torch.float64).flatten()
    if d.numel() == 0:
        raise ValueError("bootstrap_interval: no records to resample")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be at least 1, got {num_resamples}")
    n = d.numel()
    gen = torch.Generator().manual_seed(seed)
    means = []
    for start in range(0, num_resamples, chunk):
        k = min(chunk, num_resamples - start)
        idx = torch.randint(0, n, (k, n), generator=gen)
        means.append(d[idx].mean(dim=1))
    all_means = torch.cat(means)
    q = torch.tensor([(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0], dtype=torch.float64)
    low, high = torch.quantile(all_means, q).tolist()
    return float(low), float(high)


def mcnemar_exact(success_a: torch.Tensor, success_b: torch.Tensor) -> tuple[int, int, float]:
    """McNemar's exact two-sided test on paired binary outcomes (shape ``[n]`` each).

    Returns ``(a_only, b_only, p)``: the records that succeed in A only and in B only, and
    ``p = min(1, 2 · Σ_{i ≤ min(a_only, b_only)} C(m, i) / 2^m)`` with ``m = a_only + b_only``
    (computed in exact rational arithmetic; ``p = 1`` when ``m = 0``).
    """
    sa = torch.as_tensor(success_a, dtype=torch.bool).flatten()
    sb = torch.as_tensor(success_b, dtype=torch.bool).flatten()
    if sa.shape != sb.shape:
        raise ValueError(f"mcnemar_exact: {sa.numel()} outcomes in A against {sb.numel()} in B")
    a_only = int((sa & ~sb).sum())
    b_only = int((~sa & sb).sum())
    m = a_only + b_only
    if m == 0:
        return a_only, b_only, 1.0
    tail = sum(math.comb(m, i) for i in range(min(a_only, b_only) + 1))
    p = min(Fraction(1), Fraction(2 * tail, 2 ** m))
    return a_only, b_only, float(p)


def record_success(values: torch.Tensor, threshold: float = 50.0) -> torch.Tensor:
    """Per-record success: ``values > threshold`` (values in percent; see the module docstring)."""
    return torch.as_tensor(values, dtype=torch.float64) > threshold


def verdict(low: float, high: float) -> str:
    """``"B"`` when the interval of ``B − A`` lies above 0, ``"A"`` when below, else ``"tie"``."""
    if low > 0.0:
        return "B"
    if high < 0.0:
        return "A"
    return "tie"


def paired_difference(values_a: Iterable[float], values_b: Iterable[float], metric: str = "", *,
                      num_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0,
                      success_threshold: float = 50.0) -> PairedDifference:
    """B against A on one metric, from the two arms' per-record values (same order, same records)."""
    a = torch.as_tensor(list(values_a), dtype=torch.float64)
    b = torch.as_tensor(list(values_b), dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"{metric or 'metric'}: {a.numel()} values in A against {b.numel()} in B")
    if a.numel() == 0:
        raise ValueError(f"{metric or 'metric'}: no paired records")
    d = b - a
    low, high = bootstrap_interval(d, num_resamples=num_resamples, confidence=confidence, seed=seed)
    a_only, b_only, p = mcnemar_exact(record_success(a, success_threshold), record_success(b, success_threshold))
    return PairedDifference(metric=metric, n=int(a.numel()), mean_a=float(a.mean()), mean_b=float(b.mean()),
                            difference=float(d.mean()), low=low, high=high, confidence=confidence,
                            a_only=a_only, b_only=b_only, p_value=p, verdict=verdict(low, high))


def compare_records(records_a: Sequence[dict[str, Any]], records_b: Sequence[dict[str, Any]],
                    metrics: Sequence[str] = DEFAULT_METRICS, *, what_a: str = "A", what_b: str = "B",
                    **kwargs: Any) -> list[PairedDifference]:
    """:func:`paired_difference` for each of ``metrics`` over records paired by ``case_id``.

    ``records_*`` hold per-record values (``{"case_id": …, "efficacy": 100.0, …}``). A metric is
    compared over the records that have it in both arms; a record that has it in one arm only is an
    error naming it. A metric no record has is left out. ``kwargs`` go to :func:`paired_difference`.
    """
    pairs = align_records(records_a, records_b, what_a, what_b)
    out = []
    for metric in metrics:
        va, vb = [], []
        for ra, rb in pairs:
            has_a, has_b = ra.get(metric) is not None, rb.get(metric) is not None
            if has_a != has_b:
                raise ValueError(f"case_id {ra['case_id']!r}: {metric} is in "
                                 f"{what_a if has_a else what_b} only")
            if has_a:
                va.append(float(ra[metric]))
                vb.append(float(rb[metric]))
        if va:
            out.append(paired_difference(va, vb, metric, **kwargs))
    return out
