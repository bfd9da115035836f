"""The Adam loop of the target optimization with the norm clamp and the exits
(docs/algorithms.md, "Target hidden states").

At most ``v_num_grad_steps`` loss evaluations, hence at most ``v_num_grad_steps − 1`` Adam updates
(as published). Each step evaluates every micro-batch (forward and backward one after the other,
accumulating the disjoint gradients of δ), then takes one Adam step for the requests still being
optimized and projects each of their δ into the ball ``‖δ_{i,s}‖ ≤ clamp_norm_factor · ‖h_init,{i,s}‖``;
requests that exited keep their δ.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from blueedit.editing.targets import losses
from blueedit.editing.targets.objective import TargetState


def clamp_update(delta: torch.Tensor, frozen: torch.Tensor, still: torch.Tensor, h_init: torch.Tensor,
                 factor: float) -> torch.Tensor:
    """``δ`` after a step (``[B, S, d]``): requests not in ``still`` (``[B]`` bool) back at ``frozen``,
    the others scaled into ``‖δ_{i,s}‖ ≤ factor · ‖h_init,{i,s}‖`` (each site against its own)."""
    new = torch.where(still.view(-1, 1, 1), delta, frozen)  # finished requests keep their δ
    max_norm = factor * h_init.norm(dim=-1)  # [n, S]
    norms = new.norm(dim=-1)
    m = still.unsqueeze(1)
    scale = torch.where(m & (norms > max_norm), max_norm / norms.clamp(min=1e-12), torch.ones_like(norms))
    return new * scale.unsqueeze(-1)


def adam_clamp_step(opt: torch.optim.Optimizer, state: TargetState, still: torch.Tensor, factor: float) -> None:
    """One Adam step for the requests ``still`` (indices), then :func:`clamp_update`."""
    frozen = state.delta.detach().clone()
    opt.step()
    with torch.no_grad():
        mask = torch.zeros(state.delta.shape[0], dtype=torch.bool, device=state.delta.device)
        mask[still] = True
        state.delta.copy_(clamp_update(state.delta, frozen, mask, state.h_init, factor))
    state.steps[still] += 1


def _exits(hp, state: TargetState, act_idx: torch.Tensor, loss: torch.Tensor, parts: dict) -> torch.Tensor:
    """Which of the evaluated requests stop now: :func:`~.losses.early_stop`, and PMET's
    :func:`~.losses.top1_exit` (which also sets their next NLL weight)."""
    done = losses.early_stop(loss, hp.early_stop_loss)
    if hp.top1_nll_factor is not None:
        weight, top1_done = losses.top1_exit(parts["top1"], parts["kl"], hp.top1_nll_factor, hp.top1_kl_stop)
        state.nll_weight[act_idx] = weight
        done = done | top1_done
    return done


def optimize(state: TargetState, hp, chunk_loss: Callable, n_chunks: int,
             on_step: Callable[[int, float], None] | None = None) -> None:
    """Run the loop on ``state`` in place; ``chunk_loss(c, it)`` gives ``(requests, loss, parts)``
    of micro-batch ``c`` at step ``it`` (``None`` when none of its requests is active)."""
    opt = torch.optim.Adam([state.delta], lr=hp.v_lr)
    for it in range(hp.v_num_grad_steps):
        if not state.active.any():
            break
        last = it == hp.v_num_grad_steps - 1  # the last evaluation takes no step
        opt.zero_grad()
        still_parts = []
        for c in range(n_chunks):
            out = chunk_loss(c, it)
            if out is None:
                continue
            act_idx, loss, parts = out
            state.last_loss[act_idx] = loss.detach()
            if last:
                continue
            done = _exits(hp, state, act_idx, loss, parts)
            state.active[act_idx[done]] = False
            if not done.all():
                still_parts.append(act_idx[~done])
                loss[~done].sum().backward()  # frees this micro-batch's activations
        if on_step is not None:
            evaluated = ~torch.isnan(state.last_loss)
            on_step(it, float(state.last_loss[evaluated].mean()) if evaluated.any() else float("nan"))
        if last or not still_parts:
            break
        adam_clamp_step(opt, state, torch.cat(still_parts), hp.clamp_norm_factor)
