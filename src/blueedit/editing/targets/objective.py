"""The target loss of a micro-batch's active requests, assembled from :mod:`.losses` on the scores
of :mod:`.scoring`, and the optimization's per-request state."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blueedit.editing.targets import losses
from blueedit.editing.targets.batching import Chunk
from blueedit.editing.targets.scoring import Setup, score_group


@dataclass
class TargetState:
    """``δ`` (``[B, S, d]``, the optimized parameter) and per request: ``h_init`` (``[B, S, d]``,
    each site's output at the bare prompt's fact token before any step), ``active`` (still
    optimized), ``steps`` (Adam steps taken), ``last_loss``, ``nll_weight`` (PMET's exit lowers it)
    and ``kl_init`` (``[B, V]``, ``log P_init`` at the KL prompt, set at the first step)."""

    delta: torch.nn.Parameter
    h_init: torch.Tensor
    active: torch.Tensor
    steps: torch.Tensor
    last_loss: torch.Tensor
    nll_weight: torch.Tensor
    kl_init: torch.Tensor | None = None

    @classmethod
    def zeros(cls, n_req: int, n_sites: int, d: int, device) -> TargetState:
        return cls(torch.nn.Parameter(torch.zeros(n_req, n_sites, d, device=device, dtype=torch.float32)),
                   torch.zeros(n_req, n_sites, d, device=device), torch.ones(n_req, dtype=torch.bool, device=device),
                   torch.zeros(n_req, dtype=torch.long, device=device),
                   torch.full((n_req,), float("nan"), device=device), torch.ones(n_req, device=device))


def _chunk_scores(st: Setup, state: TargetState, ch: Chunk):
    """The scores of the chunk's rows of active requests, concatenated over its length groups:
    ``(sel, tok_logp, hit, kl_logp, h_fact)``, or ``None`` when no request is active."""
    row_active = state.active[st.tensors.request]
    sels, scores = [], []
    for g in ch.groups:
        sel = g.rows[row_active[g.rows]]
        if sel.numel():
            scores.append(score_group(st, state.delta, ch, g, sel))
            sels.append(sel)
    if not sels:
        return None
    hit = torch.cat([s.hit for s in scores]) if st.top1 else None
    return (torch.cat(sels), torch.cat([s.tok_logp for s in scores]), hit,
            torch.cat([s.kl_logp for s in scores]), torch.cat([s.h_fact for s in scores]))


def chunk_loss(st: Setup, state: TargetState, hp, fisher: torch.Tensor | None, ch: Chunk, it: int):
    """``(requests, loss, parts)`` of the chunk's active requests (in request order) at step
    ``it``; ``parts`` holds the per-request ``nll``, ``kl``, (forgetting) ``forget`` and (PMET's
    exit) ``top1``. At step 0 ``h_init`` and ``log P_init`` of these requests are recorded."""
    scored = _chunk_scores(st, state, ch)
    if scored is None:
        return None
    sel, tok_logp, hit, kl_all, h_fact = scored
    T = st.tensors
    row_req, is_kl, is_old = T.request[sel], T.is_kl[sel], T.is_old[sel]
    act_idx = ch.req[state.active[ch.req]]
    n_act, n_ctx = act_idx.numel(), st.n_ctx
    if it == 0:
        where = torch.full((len(st.rows),), -1, dtype=torch.long, device=st.device)
        where[sel] = torch.arange(sel.numel(), device=st.device)
        state.h_init[act_idx] = h_fact[where[T.bare[act_idx]]].detach().float()
    local = torch.full((T.bare.numel(),), -1, dtype=torch.long, device=st.device)
    local[act_idx] = torch.arange(n_act, device=st.device)
    request = local[row_req]
    rw = ~is_kl & ~is_old
    nll = losses.nll_term(tok_logp, T.target_mask[sel], rw, request, n_act, n_ctx)
    parts: dict[str, torch.Tensor] = {"nll": nll}
    if hp.top1_nll_factor is not None:
        parts["top1"] = losses.top1_reached(hit, rw, request, n_act)
    kl_logp = kl_all[torch.argsort(row_req[is_kl])]  # one KL row per active request, in request order
    if it == 0:
        if state.kl_init is None:
            state.kl_init = torch.zeros(T.bare.numel(), kl_logp.shape[-1], device=st.device)
        state.kl_init[act_idx] = kl_logp.detach()
    kl = losses.kl_term(kl_logp, state.kl_init[act_idx])
    parts["kl"] = kl.detach()
    wd = losses.weight_decay_term(state.delta[act_idx], state.h_init[act_idx], hp.v_weight_decay)
    fit = nll if hp.top1_nll_factor is None else state.nll_weight[act_idx] * nll
    loss = fit + hp.kl_factor * kl + wd
    if hp.forget_weight > 0:
        ul = losses.unlikelihood_term(tok_logp[is_old], request[is_old], n_act, n_ctx)
        parts["forget"] = ul.detach()
        loss = loss + hp.forget_weight * ul
    if fisher is not None:
        loss = loss + losses.fisher_term(state.delta[act_idx, 0], fisher)
    return act_idx, loss, parts

