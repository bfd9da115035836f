"""The accumulators of the editing metrics: one torchmetrics ``MetricCollection`` of float64
means, one mean per metric name (``docs/algorithms.md`` §8: per record, then over records)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torchmetrics import MetricCollection
from torchmetrics.aggregation import MeanMetric

__all__ = ["EditMetrics", "mean_meter", "metric_protocol"]


def metric_protocol(name: str) -> str:
    """How the metric ``name`` was measured, as every written table shows it: ``wild`` (the
    model's own greedy answer, :mod:`blueedit.evaluation.wild`), ``sampled`` (fluency and
    consistency of sampled texts) or ``teacher forcing`` (the probability of the target tokens
    placed after the prompt: every other editing metric)."""
    if "_wild" in name:
        return "wild"
    if name in ("fluency", "consistency"):
        return "sampled"
    return "teacher forcing"


def mean_meter(sync: bool = False) -> MeanMetric:
    """A mean over every value passed to ``update`` (one value per record), accumulated in
    float64; with ``sync`` the sums are reduced over all processes at ``compute``."""
    return MeanMetric(nan_strategy="error", sync_on_compute=sync).set_dtype(torch.float64)


class EditMetrics(MetricCollection):
    """One mean per metric name, updated record by record.

    ``update_records(records, values)`` adds, for every record, each value of ``values(record)``
    (a ``{name: float}``; a name may be missing for a record) to that name's mean, so a
    collection can run over the batches of a whole epoch. ``results()`` reads every mean as a
    float, ``nan`` for a name no record had (without torchmetrics' compute-before-update warning).
    With ``sync`` the sums are reduced over all processes at ``compute`` and every name is
    computed, so every process joins every reduction.
    """

    def __init__(self, names: Iterable[str], sync: bool = False) -> None:
        names = list(names)
        super().__init__({n: mean_meter(sync) for n in names}, compute_groups=False)
        self.names = names
        self.sync = sync

    def update_records(self, records: Iterable[dict[str, Any]],
                       values: Callable[[dict[str, Any]], dict[str, float]]) -> None:
        for rec in records:
            for name, value in values(rec).items():
                self[name].update(torch.tensor([value], dtype=torch.float64, device=self[name].device))

    def results(self) -> dict[str, float]:
        out = {}
        for name in self.names:
            metric = self[name]
            if metric.update_count == 0 and not self.sync:
                out[name] = float("nan")
            else:
                out[name] = float(metric.compute().item())
        return out
