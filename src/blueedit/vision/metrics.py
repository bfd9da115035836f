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


@torch.no_grad()
def edit_metrics(model, group_x: torch.Tensor, group_y: torch.Tensor, edited: torch.Tensor, locality_x: torch.Tensor,
                 locality_before: torch.Tensor, sensitive: torch.Tensor | None = None,
                 batch_size: int = 512) -> dict[str, float]:
    """SR, GR and LR (and ``lr_sensitive`` on the ``sensitive`` subset of the locality images) of
    ``model`` as it is now: ``group_x`` / ``group_y`` the group's failures with ``edited`` marking
    the edit images, ``locality_before`` the base model's predictions on ``locality_x``."""
    def pred(x):
        return torch.cat([model(pixel_values=x[i:i + batch_size]).logits.argmax(-1) for i in range(0, len(x), batch_size)])

    g = pred(group_x)
    after = pred(locality_x)
    out = {"sr": success_rate(g[edited], group_y[edited]), "gr": generalization_rate(g, group_y, edited),
           "lr": locality_rate(locality_before, after)}
    if sensitive is not None and bool(sensitive.any()):
        out["lr_sensitive"] = locality_rate(locality_before[sensitive], after[sensitive])
    return out
