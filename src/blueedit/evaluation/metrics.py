"""Accumulating metrics that sum their state over batches and across processes (torchmetrics)."""

from __future__ import annotations

import torch
from torchmetrics import Metric

__all__ = ["SuccessRate", "MeanValue"]


class SuccessRate(Metric):
    """Percentage of successes: ``100 · Σ correct / Σ count`` (``nan`` before any update).

    ``update(correct)`` takes a bool (or 0/1) tensor of any shape; every element is one trial.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("hits", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, correct: torch.Tensor) -> None:
        c = torch.as_tensor(correct).detach().reshape(-1).to(self.hits.device)
        self.hits += c.to(torch.float64).sum()
        self.total += c.numel()

    def compute(self) -> torch.Tensor:
        if self.total == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return 100.0 * self.hits / self.total


class MeanValue(Metric):
    """Mean of all values seen: ``Σ v / n`` (``nan`` before any update).

    ``update(values)`` takes a float tensor of any shape; every element is one value.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor) -> None:
        v = torch.as_tensor(values).detach().reshape(-1).to(self.total.device)
        self.total += v.to(torch.float64).sum()
        self.count += v.numel()

    def compute(self) -> torch.Tensor:
        if self.count == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return self.total / self.count
