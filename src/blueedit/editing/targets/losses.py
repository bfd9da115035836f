"""The terms of the target loss, one function each (docs/algorithms.md, "Target hidden states",
"PMET", "HSE"). All are pure; ``n`` requests are evaluated, ``C`` = number of context templates.

For request ``i`` with δ_i (one row per target site ``s``):

    L_i = w_i · NLL_i + kl_factor · KL_i + WD_i  [+ forget_weight · UL_i]  [+ ½ δ_iᵀ F δ_i]

``w_i`` is 1 unless PMET's top-1 exit lowered it (:func:`top1_exit`).
"""

from __future__ import annotations

import torch

from blueedit.editing.hse import fisher_penalty


def per_request_mean(values: torch.Tensor, request: torch.Tensor, n: int, n_ctx: int) -> torch.Tensor:
    """``(1/C) Σ_{rows k of request i} values_k`` for each of ``n`` requests (``[n]``);
    ``request`` is each row's request index in ``0..n−1``."""
    return torch.zeros(n, device=values.device).index_add(0, request, values) / n_ctx


def nll_term(tok_logp: torch.Tensor, target_mask: torch.Tensor, rewrite: torch.Tensor, request: torch.Tensor,
             n: int, n_ctx: int) -> torch.Tensor:
    """``NLL_i = (1/C) Σ_c −Σ_j log p(o*_j | c(p_i), o*_{<j}) / |o*_i|`` (``[n]``).

    ``tok_logp`` ``[R, J]`` (0 past a row's target), ``target_mask`` ``[R, J]``, ``request`` ``[R]``;
    only the rows where ``rewrite`` (``[R]`` bool) count."""
    nll_row = -tok_logp.sum(1) / target_mask.sum(1).clamp(min=1)
    return per_request_mean(nll_row[rewrite], request[rewrite], n, n_ctx)


def kl_term(kl_logp: torch.Tensor, kl_ref: torch.Tensor) -> torch.Tensor:
    """``KL_i = KL(P_δ ‖ P_init) = Σ_v P_δ(v) (log P_δ(v) − log P_init(v))`` at the KL prompt's
    fact token (``[n]``); ``kl_logp``, ``kl_ref``: ``log P_δ``, ``log P_init`` (``[n, V]``)."""
    return (kl_logp.exp() * (kl_logp - kl_ref)).sum(-1)


def weight_decay_term(delta: torch.Tensor, h_init: torch.Tensor, weight: float) -> torch.Tensor:
    """``WD_i = Σ_s v_weight_decay · ‖δ_{i,s}‖ / ‖h_init,{i,s}‖²`` (``[n]``) over the target sites
    (one site: MEMIT's term; PMET's pair: the attention and MLP δ each against its own ``h_init``).
    ``delta``, ``h_init``: ``[n, S, d]``."""
    return (weight * delta.norm(dim=-1) / h_init.norm(dim=-1).pow(2)).sum(1)


def unlikelihood_term(old_tok_logp: torch.Tensor, request: torch.Tensor, n: int, n_ctx: int) -> torch.Tensor:
    """HSE's forgetting: ``UL_i = (1/C) Σ_c −log(1 − p(o_i | c(p_i)))`` with ``p`` the sequence
    probability of the old answer (``[n]``); ``old_tok_logp`` ``[R_old, J]``, the old-answer rows."""
    old_logp = old_tok_logp.sum(1).clamp(max=-1e-6)
    return per_request_mean(-torch.log(-torch.expm1(old_logp)), request, n, n_ctx)


def fisher_term(delta: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    """HSE's Fisher-guided stability ``½ δ_iᵀ F δ_i`` (``[n]``); ``delta`` ``[n, d]``, ``F`` ``[d]``
    (diagonal) or ``[d, d]``, already weighted by ``λ_F``."""
    return fisher_penalty(delta, fisher)


def top1_reached(hit: torch.Tensor, rewrite: torch.Tensor, request: torch.Tensor, n: int) -> torch.Tensor:
    """PMET: whether ``o*_i`` is the argmax at every target position of every rewriting prompt
    (``[n]`` bool); ``hit`` ``[R, J]``, ``rewrite`` ``[R]``, ``request`` ``[R]``."""
    miss = (~hit.all(1) & rewrite).float()
    return torch.zeros(n, device=hit.device).index_add(0, request, miss) == 0


def top1_exit(top1: torch.Tensor, kl: torch.Tensor, factor: float, kl_stop: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PMET's early exit: ``(w, done)`` with ``w_i = factor`` once :func:`top1_reached` (else 1),
    the NLL weight of the next step, and ``done_i = top1_i ∧ KL_i < kl_stop``."""
    weight = torch.where(top1, torch.full_like(top1, factor, dtype=torch.float32),
                         torch.ones_like(top1, dtype=torch.float32))
    return weight, top1 & (kl < kl_stop)


def early_stop(loss: torch.Tensor, threshold: float) -> torch.Tensor:
    """The published exit: request ``i`` stops once ``L_i < early_stop_loss`` (``[n]`` bool)."""
    return loss.detach() < threshold
