"""The accumulator of the editing metrics: a torchmetrics mean in float64."""

from __future__ import annotations

import torch
from torchmetrics.aggregation import MeanMetric

__all__ = ["mean_meter"]


def mean_meter(sync: bool = False) -> MeanMetric:
    """A mean over every value passed to ``update`` (one value per record), accumulated in
    float64; with ``sync`` the sums are reduced over all processes at ``compute`` (``nan`` when
    nothing was seen anywhere)."""
    return MeanMetric(nan_strategy="error", sync_on_compute=sync).set_dtype(torch.float64)
