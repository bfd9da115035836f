"""SR / GR / LR, the metrics of subpopulation editing ("Learning Where to Edit Vision Transformers").

An edit uses ``E``, images of a group ``G`` (the model's failures on one subpopulation) that the
model gets wrong; after the edit:

- SR (success rate): the share of ``E`` predicted right;
- GR (generalization rate): the share of the group's other failures ``G \\ E`` predicted right;
- LR (locality rate): the share of a locality set (images the model got right, unrelated to the
  group) whose prediction is unchanged.

All three are in ``[0, 1]``; a group with no image besides ``E`` has GR ``nan``.
"""

from __future__ import annotations

import torch


def success_rate(pred: torch.Tensor, y: torch.Tensor) -> float:
    """``mean_i [pred_i = y_i]`` over the edit images."""
    return float((pred == y).float().mean())


def generalization_rate(pred: torch.Tensor, y: torch.Tensor, edited: torch.Tensor) -> float:
    """``Σ_{j ∉ E} [pred_j = y_j] / |G \\ E|`` over a group's failures; ``edited`` (``[|G|]`` bool)
    marks the edit images ``E`` among them. ``nan`` when ``G = E``."""
    others = ~edited.bool()
    if not bool(others.any()):
        return float("nan")
    return float((pred[others] == y[others]).float().mean())


def locality_rate(pred_before: torch.Tensor, pred_after: torch.Tensor) -> float:
    """``mean_j [pred_after_j = pred_before_j]`` over the locality images."""
    if pred_before.shape != pred_after.shape:
        raise ValueError(f"locality predictions differ in shape: {tuple(pred_before.shape)} vs {tuple(pred_after.shape)}")
    return float((pred_before == pred_after).float().mean())


def top2_gap(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 softmax probability per row (``[n]``): small gaps mark sensitive images."""
    p = logits.softmax(-1).topk(2, dim=-1).values
    return p[:, 0] - p[:, 1]
