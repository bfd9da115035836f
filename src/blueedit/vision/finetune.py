"""The fine-tuning baselines of subpopulation editing: gradient steps on chosen weights of the ViT
(the last MLPs, or the attention output projections) with an L1 penalty on their change.

Objective for the edit images ``E`` and the tuned weights ``θ`` (initially ``θ₀``):
``mean_i CE(f_θ(x_i), y_i) + c · Σ |θ − θ₀|`` (``c``: the L1 weight, swept into a GR-LR curve).
RMSprop, at most ``max_steps`` steps, stopping once every edit image is predicted right and the
cross-entropy is at most ``stop_loss``. The weights are written in place; :func:`snapshot` /
:func:`restore` put them back.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from blueedit.vision.vit import ViTAdapter

Site = Literal["mlp", "attention"]


def tuned_parameters(adapter: ViTAdapter, site: Site, layers: list[int]) -> list[torch.nn.Parameter]:
    """The weights and biases of ``mlp_in``/``mlp_out`` (``mlp``) or ``o_proj`` (``attention``) of ``layers``."""
    if site not in ("mlp", "attention"):
        raise ValueError(f"fine-tuning site {site!r} is not 'mlp' or 'attention'")
    modules = [m for l in layers for m in ((adapter.mlp_in(l), adapter.mlp_out(l)) if site == "mlp" else (adapter.o_proj(l),))]
    return [p for m in modules for p in m.parameters()]


def snapshot(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


@torch.no_grad()
def restore(params: list[torch.nn.Parameter], saved: list[torch.Tensor]) -> None:
    for p, s in zip(params, saved):
        p.copy_(s)


def finetune_edit(model, params: list[torch.nn.Parameter], x: torch.Tensor, y: torch.Tensor, l1: float = 0.0,
                  lr: float = 1e-3, max_steps: int = 100, stop_loss: float = 0.01) -> int:
    """Fine-tune ``params`` of ``model`` on ``(x, y)`` (see the module docstring); returns the
    steps taken."""
    start = snapshot(params)
    opt = torch.optim.RMSprop(params, lr=lr)
    for step in range(max_steps):
        logits = model(pixel_values=x).logits
        ce = F.cross_entropy(logits, y)
        if bool((logits.argmax(-1) == y).all()) and float(ce.detach()) <= stop_loss:
            return step
        loss = ce + l1 * sum((p - p0).abs().sum() for p, p0 in zip(params, start)) if l1 else ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return max_steps
