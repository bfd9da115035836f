"""One forward pass of a row group with δ injected, and the log-probabilities the loss reads
(docs/algorithms.md, "Target hidden states").

Row ``k`` of request ``i`` gets ``δ_i`` added at its fact token, at each target site of block
``layer``. Positions ``last_prompt_index + j`` predict target token ``j`` (read at ``loss_layer``
through the final norm and ``lm_head``); a KL row is read at its fact token from the final block.
Only the read positions are scored.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from blueedit.editing.targets.batching import Chunk, RowGroup, RowTensors, TargetRow
from blueedit.models.adapters import ModelAdapter
from blueedit.models.forward import _StopForward, traced
from blueedit.models.tokens import gather_positions, pad_batch


@dataclass
class Setup:
    """What every step of one target optimization reads; fixed for the optimization."""

    model: object
    adapter: ModelAdapter
    rows: list[TargetRow]
    tensors: RowTensors
    layer: int
    loss_layer: int
    final_layer: int
    sites: tuple[str, ...]
    site_modules: dict
    fast: bool
    pad: int
    side: str
    device: torch.device
    #: PMET's top-1 exit is on (the scores include ``hit``)
    top1: bool
    #: the number of context templates (rewriting rows per request)
    n_ctx: int


@dataclass
class GroupScores:
    """``tok_logp`` ``[n, J]`` (``log p`` of each target token, 0 where none is read), ``hit``
    (``[n, J]``: the target token is the argmax; PMET's exit only), ``kl_logp`` (``[n_kl, V]``, the
    KL rows in ``sel`` order) and ``h_fact`` (``[n, S, d]``: each site's output at the fact token)."""

    tok_logp: torch.Tensor
    hit: torch.Tensor | None
    kl_logp: torch.Tensor
    h_fact: torch.Tensor


@contextmanager
def site_hooks(modules: dict, fns: dict, record: dict):
    """Forward hooks replacing each module's output ``y`` by ``fns[name](y)`` (δ injection at an
    attention or MLP output); the edited output is kept in ``record[name]``."""
    def hook(name):
        def run(module, args, out):
            new = fns[name](out)
            record[name] = new
            return new
        return run

    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _group_inputs(st: Setup, ch: Chunk, g: RowGroup, sel: torch.Tensor):
    """The padded batch of the global rows ``sel`` and the model inputs (suffixes over the prefix
    cache on the fast path; whole prompts otherwise); ``lsel``: ``sel`` within the group."""
    if st.fast:
        lsel = g.local[sel]
        batch = g.suffixes.select(lsel)
        return batch, ch.prefix.inputs(ch.local[sel], batch), lsel
    sel_rows = [st.rows[k] for k in sel.tolist()]
    batch = pad_batch([r.ids for r in sel_rows], [r.fact for r in sel_rows],
                      [r.target[:-1] for r in sel_rows], pad_id=st.pad, padding_side=st.side).to(st.device)
    return batch, {**batch.model_inputs(), "use_cache": False}, None


def _forward(st: Setup, delta: torch.Tensor, ch: Chunk, g: RowGroup, sel: torch.Tensor, batch, inputs, lsel):
    """Run the group with ``δ`` injected: ``(trace, logits or None, site outputs)``."""
    row_req = st.tensors.request[sel]
    fact = batch.fact_index
    ar = torch.arange(sel.numel(), device=st.device)

    def injector(j: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def inject(h: torch.Tensor) -> torch.Tensor:  # h + δ at each row's fact token (out of place)
            return h.index_put((ar, fact), delta[row_req, j].to(h.dtype), accumulate=True)
        return inject

    replay = g.replay
    block = "block" in st.sites
    site_out: dict[str, torch.Tensor] = {}
    with traced(st.adapter, edit_layer=st.layer if block else None, edit_fn=injector(0) if block else None,
                hidden_layers=[st.loss_layer, st.final_layer], stop_after=st.final_layer if st.fast else None) as tr, \
            site_hooks(st.site_modules, {x: injector(st.sites.index(x)) for x in st.site_modules}, site_out):
        try:
            if replay is not None and replay.calls:
                replay.run(lsel, g.size, inputs.get(ch.prefix.cache_arg))
                logits = None
            else:
                with replay.capturing() if replay is not None else nullcontext():
                    logits = st.model(**inputs).logits
        except _StopForward:
            logits = None
    return tr, logits, site_out


def _read_logprobs(st: Setup, tr, logits, batch, tmask: torch.Tensor, kl_row: torch.Tensor):
    """``log_softmax`` at the read positions (``[m, V]``, row-major) with their row and target
    index and whether each is a KL read."""
    first = torch.zeros_like(tmask)
    first[:, 0] = True
    r_idx, j_idx = torch.nonzero(tmask | (kl_row.unsqueeze(1) & first), as_tuple=True)  # row-major
    at_kl = kl_row[r_idx]
    pos = torch.where(at_kl, batch.fact_index[r_idx], batch.last_prompt_index[r_idx] + j_idx)
    if logits is None:  # fast path: lm_head only where targets are read
        h = tr.hidden[st.loss_layer][r_idx, pos]
        if st.loss_layer != st.final_layer:  # KL rows: the final block's state
            h = torch.where(at_kl.unsqueeze(1), tr.hidden[st.final_layer][r_idx, pos], h)
        logp = torch.log_softmax(st.adapter.lm_head(st.adapter.final_norm(h)).float(), dim=-1)
    else:  # reference path: logits at every position; targets read at ``loss_layer``, KL at the end
        read_logits = logits[r_idx, pos]
        if st.loss_layer != st.final_layer:
            at_loss = st.adapter.lm_head(st.adapter.final_norm(tr.hidden[st.loss_layer][r_idx, pos]))
            read_logits = torch.where(at_kl.unsqueeze(1), read_logits, at_loss)
        logp = torch.log_softmax(read_logits.float(), dim=-1)  # [m, V]
    return logp, r_idx, j_idx, at_kl


def score_group(st: Setup, delta: torch.Tensor, ch: Chunk, g: RowGroup, sel: torch.Tensor) -> GroupScores:
    """:class:`GroupScores` of the global rows ``sel`` (all in group ``g`` of chunk ``ch``) at ``δ``."""
    batch, inputs, lsel = _group_inputs(st, ch, g, sel)
    tr, logits, site_out = _forward(st, delta, ch, g, sel, batch, inputs, lsel)
    tmask = st.tensors.target_mask[sel].bool()
    logp, r_idx, j_idx, at_kl = _read_logprobs(st, tr, logits, batch, tmask, st.tensors.is_kl[sel])
    tgt = ~at_kl
    logp_tgt = logp[tgt]  # [m_target, V]
    tok = logp_tgt.gather(-1, st.tensors.target_ids[sel][r_idx[tgt], j_idx[tgt]].unsqueeze(-1)).squeeze(-1)
    tok_logp = torch.zeros(tmask.shape, dtype=logp.dtype, device=st.device).index_put((r_idx[tgt], j_idx[tgt]), tok)
    hit = None
    if st.top1:  # target token is the argmax (positions without one count as hits)
        hit = torch.ones(tmask.shape, dtype=torch.bool, device=st.device)
        hit[r_idx[tgt], j_idx[tgt]] = tok.detach() >= logp_tgt.detach().max(-1).values
    outs = [tr.hidden[st.layer] if x == "block" else site_out[x] for x in st.sites]
    return GroupScores(tok_logp, hit, logp[at_kl],
                       torch.stack([gather_positions(o, batch.fact_index) for o in outs], dim=1))
