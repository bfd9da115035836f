"""Context templates, target hidden states (the "z" optimization), keys and current values
(docs/algorithms.md: "Context templates", "Target hidden states", "Keys")."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from typing import Literal

import torch

from blueedit.data.records import EditRequest
from blueedit.editing.hse import fisher_penalty
from blueedit.models.adapters import ModelAdapter
from blueedit.models.forward import _StopForward, forward, traced
from blueedit.models.tokens import (
    PromptBatch,
    encode_prompt,
    gather_positions,
    pad_batch,
    pad_token_id,
    tokenize_target,
)

CONTEXT_SEEDS = ("The", "Therefore", "Because", "I", "You")
FisherEstimator = Literal["diagonal", "full"]
#: Where a target's δ is added inside block ``layer``: its output (``block``, MEMIT and the
#: others), the attention output projection's output (``attn``) or ``W_out``'s output (``mlp``);
#: PMET optimizes ``("attn", "mlp")`` together (docs/algorithms.md, "PMET").
Site = Literal["block", "attn", "mlp"]
#: Where the single target of the MEMIT-family methods lives (``editing.target.site``): the block
#: output (``block``, as published) or ``W_out``'s output (``mlp``, before any post-MLP norm).
TargetSite = Literal["block", "mlp"]


@torch.no_grad()
def generate_context_templates(
    model, tokenizer, seeds: tuple[str, ...] = CONTEXT_SEEDS, length: int = 10, top_k: int = 5, seed: int = 0
) -> list[str]:
    """``C = ["{}"] + ["<prefix>. {}" ...]``: one prefix per seed word, ``length`` tokens long
    *counting the seed word's own tokens* (the published ``generate_fast(max_out_len=10)``: for a
    one-token seed, 9 new tokens), top-``k`` sampled (greedy when ``top_k`` is 0) under a fixed RNG
    seed, so the templates are reproducible and the global RNG state is left untouched.

    Braces and newlines in generated text are removed so each template keeps exactly one ``{}``
    (docs/algorithms.md, "Context templates").
    """
    device = next(model.parameters()).device
    templates = ["{}"]
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for word in seeds:
            ids = tokenizer(word, return_tensors="pt")["input_ids"].to(device)
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max(1, length - ids.shape[1]),
                do_sample=top_k > 0, top_k=top_k if top_k > 0 else None, top_p=None, temperature=None,
                pad_token_id=pad_token_id(tokenizer),
            )
            text = tokenizer.decode(out[0], skip_special_tokens=True)
            text = " ".join(text.replace("{", " ").replace("}", " ").split())
            templates.append(f"{text}. {{}}")
    return templates


@dataclass
class TargetConfig:
    """Hyperparameters of the target optimization (docs/algorithms.md, "Target hidden states").

    ``loss_layer`` ``None`` means the last block. ``kl_prompt`` has one ``{}`` for the subject.

    HSE options (docs/algorithms.md, "HSE"), all off by default:

    - ``forget_weight`` ``w``: memory-directed forgetting, the unlikelihood term
      ``w · mean_c −log(1 − p(o | c(p)))`` on the old answer ``o`` (``target_true``, required for
      every record when ``w > 0``); HSE's balance α is ``1 / (1 + w)``.
    - ``fisher_weight`` ``λ_F``: Fisher-guided stability, ``½ δᵀ (λ_F Σ_j F_j) δ`` with ``F_j`` the
      Fisher estimate of earlier round ``j`` at the same layer (``fisher_estimator``: ``diagonal``
      or ``full``, the empirical Fisher of the edits' log-likelihood with respect to δ).

    ``site``: where δ is added in block ``layer`` and the residual ``R = z − (value at the site)``
    is read: ``block`` (the block output ``h^l``, as every published method) or ``mlp`` (the output
    of ``W_out^l`` itself, ``m^l``). They differ on models that normalize the MLP output before
    adding it to the residual stream (Gemma 2 / 3's ``post_feedforward_layernorm``): there a
    block-output residual written into ``W_out`` passes through that norm and is not the change
    the target asked for, while an ``mlp`` residual is exactly the change ``W_out`` makes. Only
    with ``strategy: boundary`` (the residual distribution spreads a block-output δ) and not for
    PMET (its own two sites) or WISE (docs/algorithms.md, "Targets at the MLP output").

    PMET's published early exit: with ``top1_nll_factor`` set (published: 0.1), once ``o*`` is the
    top-1 token at every target position of every rewriting prompt of a request, the NLL term of
    its next step is weighted by that factor, and the request stops when its KL term is below
    ``top1_kl_stop``.
    """

    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 0.75
    early_stop_loss: float = 0.05
    loss_layer: int | None = None
    kl_prompt: str = "{} is a"
    forget_weight: float = 0.0
    fisher_weight: float = 0.0
    fisher_estimator: FisherEstimator = "diagonal"
    top1_nll_factor: float | None = None
    top1_kl_stop: float = 0.01
    site: TargetSite = "block"

    def __post_init__(self) -> None:
        from blueedit.config import check_choice

        check_choice("editing.target.site", self.site, TargetSite)
        check_choice("editing.target.fisher_estimator", self.fisher_estimator, FisherEstimator)
        for name in ("forget_weight", "fisher_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"editing.target.{name} must be >= 0, got {getattr(self, name)}")
        if self.v_num_grad_steps < 1:
            raise ValueError(f"editing.target.v_num_grad_steps must be >= 1, got {self.v_num_grad_steps}")
        if self.kl_prompt.count("{}") != 1:
            raise ValueError(f"editing.target.kl_prompt {self.kl_prompt!r} needs exactly one {{}} for the subject")


@dataclass
class TargetResult:
    """Targets for ``B`` requests at one layer: ``z = h_init + delta`` (``[B, d]``, float32),
    ``steps`` optimizer steps taken per request, ``loss`` the last loss per request.

    With several sites (PMET) ``z``, ``h_init`` and ``delta`` are those of the last site and
    ``site_delta`` holds every site's δ (``[B, S, d]``). ``grad`` (when asked for) is the gradient
    of each request's edit NLL with respect to its δ at the final δ (``[B, d]``; the rows of
    the empirical Fisher)."""

    z: torch.Tensor
    h_init: torch.Tensor
    delta: torch.Tensor
    steps: torch.Tensor
    loss: torch.Tensor
    site_delta: torch.Tensor | None = None
    grad: torch.Tensor | None = None


@dataclass
class _Row:
    ids: list[int]
    fact: int
    target: list[int]  # full target ids (rewriting rows); empty for the KL row
    request: int
    is_kl: bool
    is_old: bool = False  # an unlikelihood row: the target is the old answer o


def _rows(tokenizer, requests: list[EditRequest], templates: list[str], kl_prompt: str,
          forget: bool = False) -> list[_Row]:
    rows = []
    for i, r in enumerate(requests):
        target = tokenize_target(tokenizer, r.target_new)
        for c in templates:
            ids, fact = encode_prompt(tokenizer, c.replace("{}", r.prompt, 1), r.subject)
            rows.append(_Row(ids, fact, target, i, False))
        if forget:
            if not r.target_true:
                raise ValueError(f"edit record {i} (case_id={r.case_id!r}) has no 'target_true', which "
                                 "editing.target.forget_weight > 0 needs")
            old = tokenize_target(tokenizer, r.target_true)
            for c in templates:
                ids, fact = encode_prompt(tokenizer, c.replace("{}", r.prompt, 1), r.subject)
                rows.append(_Row(ids, fact, old, i, False, True))
        ids, fact = encode_prompt(tokenizer, kl_prompt, r.subject)
        rows.append(_Row(ids, fact, [], i, True))
    return rows


def cache_argument(model) -> str:
    """The name of the key/value cache argument of ``model.forward``: ``cache`` in transformers 5
    (which deprecates ``past_key_values``), ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class _PrefixCache:
    """Key/value states of every row's tokens *before* its fact token, computed once per round.

    δ is injected at the fact token, so nothing before it depends on δ: each optimization step
    only runs the suffix (fact token, rest of the prompt, target tokens) on top of this cache.
    Prefixes are left-padded to a common length ``P``; layers above ``loss_layer`` are not run.
    """

    def __init__(self, model, adapter: ModelAdapter, prefixes: list[list[int]], pad: int, loss_layer: int):
        from transformers import DynamicCache

        device = next(model.parameters()).device
        self.cache_arg = cache_argument(model)
        self.P = max(len(p) for p in prefixes)
        self.lengths = torch.tensor([len(p) for p in prefixes], device=device)
        if self.P == 0:
            self.mask = torch.zeros(len(prefixes), 0, dtype=torch.long, device=device)
            self.layers = None
            return
        batch = pad_batch(prefixes, [-1] * len(prefixes), pad_id=pad, padding_side="left").to(device)
        self.mask = batch.attention_mask
        cache = DynamicCache()
        with torch.no_grad(), traced(adapter, stop_after=loss_layer):
            try:
                model(**batch.model_inputs(), **{cache_argument(model): cache}, use_cache=True)
            except _StopForward:
                pass
        self.layers = [(layer.keys, layer.values) for layer in cache.layers[: loss_layer + 1]]

    def inputs(self, rows: torch.Tensor, suffix: PromptBatch) -> dict:
        """Model inputs for the suffixes of ``rows`` (right-padded ``suffix`` batch)."""
        from transformers import DynamicCache

        mask = torch.cat([self.mask[rows], suffix.attention_mask], dim=1)
        pos = (self.lengths[rows].unsqueeze(1) + suffix.position_ids)
        inputs = {"input_ids": suffix.input_ids, "attention_mask": mask, "position_ids": pos}
        if self.layers is not None:
            inputs[self.cache_arg] = DynamicCache(ddp_cache_data=[(k[rows], v[rows]) for k, v in self.layers])
            inputs["use_cache"] = True
        return inputs


_CACHE = object()  # where a captured call had the key/value cache (a fresh one is passed each step)


class _BlockReplay:
    """Run only blocks ``first..last`` of later steps, from inputs captured on the first step.

    Nothing below the edit layer depends on δ, so the input of block ``first`` and the arguments
    every block receives (masks, position embeddings, ...) are recorded once (forward pre-hooks)
    and replayed for the rows still being optimized, with a fresh prefix cache each step.
    """

    def __init__(self, adapter: ModelAdapter, first: int, last: int):
        self.adapter, self.first, self.last = adapter, first, last
        self.calls: dict[int, tuple[tuple, dict]] = {}

    @contextmanager
    def capturing(self):
        """Record the arguments of blocks ``first..last`` during one forward pass."""
        def hook(b):
            def record(module, args, kwargs):
                self.calls[b] = (tuple(args), dict(kwargs))
            return record

        handles = [self.adapter.block(b).register_forward_pre_hook(hook(b), with_kwargs=True)
                   for b in range(self.first, self.last + 1)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self._slim()

    def _slim(self) -> None:
        """Keep only what :meth:`run` reads: block ``first``'s input (detached) and every block's
        other arguments. The later blocks' hidden inputs (which depend on δ) and the key/value
        cache objects (a fresh one is passed each step) would otherwise stay alive for the whole
        optimization, one copy per length group."""
        from transformers import Cache

        def strip(x):
            if isinstance(x, Cache):
                return _CACHE
            if isinstance(x, (tuple, list)):
                return type(x)(strip(v) for v in x)
            return x

        for b, (args, kw) in list(self.calls.items()):
            if b == self.first:
                h = (args[0] if args else kw["hidden_states"]).detach()
            else:
                h = None
            if args:
                args = (h,) + tuple(strip(a) for a in args[1:])
            kw = {k: (h if k == "hidden_states" else strip(v)) for k, v in kw.items()}
            self.calls[b] = (args, kw)

    @staticmethod
    def _select(x, rows: torch.Tensor, n: int, cache):
        from transformers import Cache

        if x is _CACHE or isinstance(x, Cache):
            return cache
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] == n:
            return x[rows].detach()  # masks, position embeddings: independent of δ
        if isinstance(x, (tuple, list)):
            return type(x)(_BlockReplay._select(v, rows, n, cache) for v in x)
        return x

    def run(self, rows: torch.Tensor, n: int, cache) -> None:
        """Blocks ``first..last`` on ``rows`` (of the ``n`` captured); hooks see every block."""
        args0, kw0 = self.calls[self.first]
        h = (args0[0] if args0 else kw0["hidden_states"]).detach()[rows]  # below the edit layer: no δ
        for b in range(self.first, self.last + 1):
            args, kw = self.calls[b]
            args = tuple(self._select(a, rows, n, cache) for a in args[1:])
            kw = {k: self._select(v, rows, n, cache) for k, v in kw.items() if k != "hidden_states"}
            out = self.adapter.block(b)(h, *args, **kw)
            h = out[0] if isinstance(out, tuple) else out


class _RowGroup:
    """Rows of similar suffix length, padded once to a common layout (fast path)."""

    def __init__(self, idx: list[int], rows: list[_Row], pad: int, device, replay: _BlockReplay | None):
        self.rows = torch.tensor(sorted(idx), dtype=torch.long, device=device)
        self.size = len(idx)
        self.local = torch.full((len(rows),), -1, dtype=torch.long, device=device)
        self.local[self.rows] = torch.arange(self.size, device=device)
        self.replay = replay
        members = [rows[k] for k in self.rows.tolist()]
        self.suffixes = pad_batch([r.ids[r.fact :] for r in members], [0] * len(members),
                                  [r.target[:-1] for r in members], pad_id=pad, padding_side="right").to(device)


def _length_groups(lengths: list[int], min_saving: float = 0.15) -> list[list[int]]:
    """Split row indices into at most two groups by length when that saves at least
    ``min_saving`` of the padded positions (``max length × rows`` per group)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sl = [lengths[i] for i in order]
    n = len(sl)
    whole = sl[-1] * n
    best_k, best = n, whole
    for k in range(1, n):
        cost = sl[k - 1] * k + sl[-1] * (n - k)
        if cost < best:
            best_k, best = k, cost
    if whole == 0 or (whole - best) / whole < min_saving:
        return [list(range(n))]
    return [order[:best_k], order[best_k:]]


def request_chunks(costs: list[tuple[int, int]], max_batch_tokens: int | None) -> list[list[int]]:
    """Split requests, in order, into micro-batches under a token budget.

    ``costs[i] = (rows, length)``: request ``i`` contributes ``rows`` prompts whose longest is
    ``length`` tokens. A micro-batch of requests costs ``Σ rows × max length`` padded positions;
    consecutive requests are added while that stays ``≤ max_batch_tokens`` (a request above the
    budget on its own gets a micro-batch of its own). ``None``: one batch with every request.
    """
    if max_batch_tokens is None:
        return [list(range(len(costs)))] if costs else []
    chunks: list[list[int]] = []
    cur: list[int] = []
    n_rows = longest = 0
    for i, (rows, length) in enumerate(costs):
        n2, l2 = n_rows + rows, max(longest, length)
        if cur and n2 * l2 > max_batch_tokens:
            chunks.append(cur)
            cur, n2, l2 = [], rows, length
        cur.append(i)
        n_rows, longest = n2, l2
    if cur:
        chunks.append(cur)
    return chunks


class _Chunk:
    """One micro-batch of requests: its rows, their prefix cache and their length groups."""

    def __init__(self, req: list[int], rows: list[_Row], model, adapter, pad: int, device, layer: int,
                 loss_layer: int, fast: bool):
        wanted = set(req)
        self.req = torch.tensor(req, dtype=torch.long, device=device)
        idx = [k for k, r in enumerate(rows) if r.request in wanted]
        self.rows = torch.tensor(idx, dtype=torch.long, device=device)
        self.local = torch.full((len(rows),), -1, dtype=torch.long, device=device)
        self.local[self.rows] = torch.arange(len(idx), device=device)
        self.prefix = None
        if fast:  # suffixes from the fact token on (fact token = suffix position 0), in length groups
            self.prefix = _PrefixCache(model, adapter, [rows[k].ids[: rows[k].fact] for k in idx], pad, loss_layer)
            lengths = [len(rows[k].ids) - rows[k].fact + max(len(rows[k].target) - 1, 0) for k in idx]
            self.groups = [_RowGroup([idx[j] for j in g], rows, pad, device, _BlockReplay(adapter, layer, loss_layer))
                           for g in _length_groups(lengths)]
        else:
            self.groups = [_RowGroup(idx, rows, pad, device, None)]


def optimize_targets(
    model,
    adapter: ModelAdapter,
    tokenizer,
    requests: list[EditRequest],
    layer: int,
    templates: list[str],
    hp: TargetConfig,
    *,
    fast: bool = True,
    max_batch_tokens: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
    sites: tuple[str, ...] = ("block",),
    fisher: torch.Tensor | None = None,
    return_grad: bool = False,
) -> TargetResult:
    """Optimize one δ per request at the output of block ``layer``, all requests jointly.

    ``sites`` (PMET: ``("attn", "mlp")``) optimizes one δ per request and site, each added at
    the fact token to that site's output inside block ``layer``; the weight decay and the clamp
    apply to each site's δ against its own initial value. ``fisher`` (``[d]`` diagonal or
    ``[d, d]``, already weighted) adds HSE's ``½ δᵀ F δ`` (one site only); ``return_grad`` also
    returns each request's ``∇_δ NLL`` at its final δ (:attr:`TargetResult.grad`).
    ``hp.forget_weight`` adds the unlikelihood rows of the old answer; ``hp.top1_nll_factor``
    PMET's top-1 exit (:class:`TargetConfig`).

    ``on_step(step, loss)``, when given, is called after each loss evaluation with the mean loss
    of the requests evaluated at that step (for progress displays).

    For request ``i`` with rewriting prompts ``c(p_i)`` (+ target tokens but the last) and the KL
    prompt, δ_i is added to ``h^layer`` at each prompt's fact token and minimizes

        L_i = mean_c NLL(o*_i | c(p_i)) / |o*_i|  +  kl_factor · KL(P_δ ‖ P_init)
              +  v_weight_decay · ‖δ_i‖ / ‖h_init,i‖²

    with Adam (lr ``v_lr``): at most ``v_num_grad_steps`` loss evaluations, hence at most
    ``v_num_grad_steps − 1`` Adam updates (as published), stopping request ``i`` once
    ``L_i < early_stop_loss``, and projecting δ_i into ``‖δ_i‖ ≤ clamp_norm_factor · ‖h_init,i‖``
    after each step. The losses are independent, so the batched result equals the one-by-one loop
    (up to floating-point round-off): finished requests are dropped from the batch and their δ
    frozen. Target log-probs are read at ``loss_layer`` through the final norm and ``lm_head``; the KL
    distributions are the model's final next-token distributions, as in the published code
    (docs/algorithms.md, "Target hidden states").

    ``max_batch_tokens`` bounds memory: the requests are split into micro-batches of at most that
    many padded prompt positions (:func:`request_chunks`); each step runs forward and backward
    one micro-batch at a time, accumulating the (disjoint) gradients of δ, then takes one Adam
    step, so the result equals one batch. ``None``: a single batch.

    ``fast`` (the default) runs each step on the suffixes only, from the fact token on, over a
    key/value cache of the prefixes computed once (:class:`_PrefixCache`); after the first step
    it runs only blocks ``layer..loss_layer`` (:class:`_BlockReplay`); it applies ``lm_head``
    only where target tokens are read. ``fast=False`` is
    the straightforward path: whole prompts every step and logits at every position.
    """
    loss_layer = adapter.num_layers - 1 if hp.loss_layer is None else hp.loss_layer
    if not layer <= loss_layer < adapter.num_layers:
        raise ValueError(f"target.loss_layer {loss_layer} must lie in [{layer}, {adapter.num_layers - 1}]")
    if max_batch_tokens is not None and max_batch_tokens < 1:
        raise ValueError(f"editing.max_batch_tokens must be positive or null, got {max_batch_tokens}")
    sites = tuple(sites)
    if not sites or any(x not in ("block", "attn", "mlp") for x in sites) or len(set(sites)) != len(sites):
        raise ValueError(f"target sites {sites} must be distinct names among 'block', 'attn', 'mlp'")
    if fisher is not None and len(sites) != 1:
        raise ValueError("the Fisher penalty (editing.target.fisher_weight) needs a single target site")
    device = next(model.parameters()).device
    side = getattr(tokenizer, "padding_side", "right") or "right"
    pad = pad_token_id(tokenizer)
    forget = hp.forget_weight > 0
    rows = _rows(tokenizer, requests, templates, hp.kl_prompt, forget=forget)
    n_req, d, n_ctx, S = len(requests), adapter.hidden_size(), len(templates), len(sites)
    row_req_all = torch.tensor([r.request for r in rows], device=device)
    is_kl_all = torch.tensor([r.is_kl for r in rows], device=device)
    is_old_all = torch.tensor([r.is_old for r in rows], device=device)
    bare_row = torch.tensor([next(k for k, r in enumerate(rows) if r.request == i and not r.is_kl and not r.is_old)
                             for i in range(n_req)], device=device)
    site_modules = {x: (adapter.attn_out_module(layer) if x == "attn" else adapter.w_out_module(layer))
                    for x in sites if x != "block"}
    J = max(len(r.target) for r in rows)
    tids_all = torch.zeros(len(rows), J, dtype=torch.long, device=device)
    tmask_all = torch.zeros(len(rows), J, device=device)
    for k, r in enumerate(rows):
        if r.target:
            tids_all[k, : len(r.target)] = torch.tensor(r.target, device=device)
            tmask_all[k, : len(r.target)] = 1

    def row_length(r: _Row) -> int:
        return (len(r.ids) - r.fact if fast else len(r.ids)) + max(len(r.target) - 1, 0)

    costs = [(0, 0)] * n_req
    for r in rows:
        n, m = costs[r.request]
        costs[r.request] = (n + 1, max(m, row_length(r)))
    # the KL term compares the model's next-token distributions (its final logits, as the published
    # ``compute_z``); the target log-probs are read at ``loss_layer``. Both come from one pass that
    # runs up to the last block when ``loss_layer`` is below it.
    final_layer = adapter.num_layers - 1
    chunks = [_Chunk(c, rows, model, adapter, pad, device, layer, final_layer, fast)
              for c in request_chunks(costs, max_batch_tokens)]

    delta = torch.nn.Parameter(torch.zeros(n_req, S, d, device=device, dtype=torch.float32))
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    active = torch.ones(n_req, dtype=torch.bool, device=device)
    steps = torch.zeros(n_req, dtype=torch.long, device=device)
    last_loss = torch.full((n_req,), float("nan"), device=device)
    h_init = torch.zeros(n_req, S, d, device=device)
    nll_weight = torch.ones(n_req, device=device)  # PMET's top-1 exit lowers it
    kl_init: torch.Tensor | None = None  # [n_req, V] log P_init at each KL prompt's fact token

    def run_group(ch: _Chunk, g: _RowGroup, sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs at the read positions (``[n, J, V]``) and ``h^layer`` at the fact token of
        the global rows ``sel`` (all in group ``g`` of chunk ``ch``)."""
        row_req = row_req_all[sel]
        if fast:
            lsel = g.local[sel]
            batch = g.suffixes.select(lsel)
            inputs = ch.prefix.inputs(ch.local[sel], batch)
        else:
            sel_rows = [rows[k] for k in sel.tolist()]
            batch = pad_batch([r.ids for r in sel_rows], [r.fact for r in sel_rows],
                              [r.target[:-1] for r in sel_rows], pad_id=pad, padding_side=side).to(device)
            inputs = {**batch.model_inputs(), "use_cache": False}
        fact = batch.fact_index
        ar = torch.arange(sel.numel(), device=device)

        def injector(j: int) -> Callable[[torch.Tensor], torch.Tensor]:
            def inject(h: torch.Tensor) -> torch.Tensor:  # h + δ at each row's fact token (out of place)
                return h.index_put((ar, fact), delta[row_req, j].to(h.dtype), accumulate=True)
            return inject

        replay = g.replay
        block = "block" in sites
        site_out: dict[str, torch.Tensor] = {}
        with traced(adapter, edit_layer=layer if block else None, edit_fn=injector(0) if block else None,
                    hidden_layers=[loss_layer, final_layer], stop_after=final_layer if fast else None) as tr, \
                _site_hooks(site_modules, {x: injector(sites.index(x)) for x in site_modules}, site_out):
            try:
                if replay is not None and replay.calls:
                    replay.run(lsel, g.size, inputs.get(ch.prefix.cache_arg))
                    logits = None
                else:
                    with replay.capturing() if replay is not None else nullcontext():
                        logits = model(**inputs).logits
            except _StopForward:
                logits = None
        # positions last_prompt_index + j predict target token j; KL rows are read at the fact token.
        # Only the m read positions are scored (target tokens, one per KL row): [m, V], not [n, J, V].
        tmask = tmask_all[sel].bool()
        kl_row = is_kl_all[sel]
        first = torch.zeros_like(tmask)
        first[:, 0] = True
        r_idx, j_idx = torch.nonzero(tmask | (kl_row.unsqueeze(1) & first), as_tuple=True)  # row-major
        at_kl = kl_row[r_idx]
        pos = torch.where(at_kl, fact[r_idx], batch.last_prompt_index[r_idx] + j_idx)
        if logits is None:  # fast path: lm_head only where targets are read
            h = tr.hidden[loss_layer][r_idx, pos]
            if loss_layer != final_layer:  # KL rows: the final block's state
                h = torch.where(at_kl.unsqueeze(1), tr.hidden[final_layer][r_idx, pos], h)
            logp = torch.log_softmax(adapter.lm_head(adapter.final_norm(h)).float(), dim=-1)
        else:  # reference path: logits at every position; targets read at ``loss_layer``, KL at the end
            read_logits = logits[r_idx, pos]
            if loss_layer != final_layer:
                at_loss = adapter.lm_head(adapter.final_norm(tr.hidden[loss_layer][r_idx, pos]))
                read_logits = torch.where(at_kl.unsqueeze(1), read_logits, at_loss)
            logp = torch.log_softmax(read_logits.float(), dim=-1)  # [m, V]
        tgt = ~at_kl
        logp_tgt = logp[tgt]  # [m_target, V]
        tok = logp_tgt.gather(-1, tids_all[sel][r_idx[tgt], j_idx[tgt]].unsqueeze(-1)).squeeze(-1)
        tok_logp = torch.zeros(tmask.shape, dtype=logp.dtype, device=device).index_put((r_idx[tgt], j_idx[tgt]), tok)
        hit = None
        if hp.top1_nll_factor is not None:  # target token is the argmax (positions without one count as hits)
            hit = torch.ones(tmask.shape, dtype=torch.bool, device=device)
            hit[r_idx[tgt], j_idx[tgt]] = tok.detach() >= logp_tgt.detach().max(-1).values
        outs = [tr.hidden[layer] if x == "block" else site_out[x] for x in sites]
        return (tok_logp, hit, logp[at_kl],  # KL rows' [n_kl, V] in ``sel`` order
                torch.stack([gather_positions(o, fact) for o in outs], dim=1))  # [n, S, d]

    def chunk_loss(ch: _Chunk, it: int) -> tuple[torch.Tensor, torch.Tensor, dict] | None:
        """``(requests, loss, parts)`` of the chunk's active requests (in request order) at step
        ``it``; ``parts`` holds the per-request ``nll``, ``kl`` and (PMET's exit) ``top1``."""
        nonlocal kl_init
        row_active = active[row_req_all]
        sels, toks, hits, kls, hfacts = [], [], [], [], []
        for g in ch.groups:
            sel = g.rows[row_active[g.rows]]
            if sel.numel():
                tok_g, hit_g, kl_g, hfact_g = run_group(ch, g, sel)
                sels.append(sel)
                toks.append(tok_g)
                hits.append(hit_g)
                kls.append(kl_g)
                hfacts.append(hfact_g)
        if not sels:
            return None
        sel = torch.cat(sels)
        tok_logp = torch.cat(toks)  # [n, J], 0 where no target token is read
        kl_all = torch.cat(kls)  # [n_kl, V], KL rows in ``sel`` order
        row_req, is_kl = row_req_all[sel], is_kl_all[sel]
        act_idx = ch.req[active[ch.req]]
        if it == 0:
            where = torch.full((len(rows),), -1, dtype=torch.long, device=device)
            where[sel] = torch.arange(sel.numel(), device=device)
            h_init[act_idx] = torch.cat(hfacts)[where[bare_row[act_idx]]].detach().float()

        tmask = tmask_all[sel]
        local = torch.full((n_req,), -1, dtype=torch.long, device=device)
        local[act_idx] = torch.arange(act_idx.numel(), device=device)
        n_act = act_idx.numel()
        is_old = is_old_all[sel]
        rw = ~is_kl & ~is_old
        nll_row = -tok_logp.sum(1) / tmask.sum(1).clamp(min=1)
        nll = torch.zeros(n_act, device=device).index_add(0, local[row_req[rw]], nll_row[rw]) / n_ctx
        parts: dict[str, torch.Tensor] = {"nll": nll}
        if hp.top1_nll_factor is not None:  # o* is the argmax at every target position of every prompt
            hit = torch.cat(hits)
            miss = (~hit.all(1) & rw).float()
            parts["top1"] = torch.zeros(n_act, device=device).index_add(0, local[row_req], miss) == 0

        kl_logp = kl_all[torch.argsort(row_req[is_kl])]  # one KL row per active request, in request order
        if it == 0:
            if kl_init is None:
                kl_init = torch.zeros(n_req, kl_logp.shape[-1], device=device)
            kl_init[act_idx] = kl_logp.detach()
        kl_ref = kl_init[act_idx]
        kl = (kl_logp.exp() * (kl_logp - kl_ref)).sum(-1)  # KL(P_δ ‖ P_init): edited distribution first
        parts["kl"] = kl.detach()

        # per site ‖δ‖ / ‖h_init‖², summed over the sites (one site: exactly MEMIT's term)
        wd = (hp.v_weight_decay * delta[act_idx].norm(dim=-1) / h_init[act_idx].norm(dim=-1).pow(2)).sum(1)
        fit = nll if hp.top1_nll_factor is None else nll_weight[act_idx] * nll
        loss = fit + hp.kl_factor * kl + wd
        if forget:  # unlikelihood of the old answer: −log(1 − p(o | prompt)), p the sequence probability
            old_logp = tok_logp[is_old].sum(1).clamp(max=-1e-6)
            ul_row = -torch.log(-torch.expm1(old_logp))
            ul = torch.zeros(n_act, device=device).index_add(0, local[row_req[is_old]], ul_row) / n_ctx
            parts["forget"] = ul.detach()
            loss = loss + hp.forget_weight * ul
        if fisher is not None:
            loss = loss + fisher_penalty(delta[act_idx, 0], fisher)
        return act_idx, loss, parts

    for it in range(hp.v_num_grad_steps):
        if not active.any():
            break
        last = it == hp.v_num_grad_steps - 1  # the last evaluation takes no step
        opt.zero_grad()
        still_parts = []
        for ch in chunks:
            out = chunk_loss(ch, it)
            if out is None:
                continue
            act_idx, loss, parts = out
            last_loss[act_idx] = loss.detach()
            if last:
                continue
            done = loss.detach() < hp.early_stop_loss
            if hp.top1_nll_factor is not None:  # PMET: relax the NLL term once o* is top-1, exit on small KL
                top1 = parts["top1"]
                nll_weight[act_idx] = torch.where(top1, torch.full_like(top1, hp.top1_nll_factor, dtype=torch.float32),
                                                  torch.ones_like(top1, dtype=torch.float32))
                done = done | (top1 & (parts["kl"] < hp.top1_kl_stop))
            active[act_idx[done]] = False
            if not done.all():
                still_parts.append(act_idx[~done])
                loss[~done].sum().backward()  # frees this micro-batch's activations
        if on_step is not None:
            evaluated = ~torch.isnan(last_loss)
            on_step(it, float(last_loss[evaluated].mean()) if evaluated.any() else float("nan"))
        if last or not still_parts:
            break
        still = torch.cat(still_parts)
        frozen = delta.detach().clone()
        opt.step()
        with torch.no_grad():
            mask = torch.zeros(n_req, dtype=torch.bool, device=device)
            mask[still] = True
            new = torch.where(mask.view(-1, 1, 1), delta, frozen)  # finished requests keep their δ
            max_norm = hp.clamp_norm_factor * h_init.norm(dim=-1)  # [n, S]: each site against its own h_init
            norms = new.norm(dim=-1)
            m = mask.unsqueeze(1)
            scale = torch.where(m & (norms > max_norm), max_norm / norms.clamp(min=1e-12), torch.ones_like(norms))
            delta.copy_(new * scale.unsqueeze(-1))
        steps[still] += 1

    grad = None
    if return_grad:  # ∇_δ NLL_i at each request's final δ (one extra forward/backward, no step)
        active[:] = True
        delta.grad = None
        for ch in chunks:
            _, _, parts = chunk_loss(ch, 1)
            parts["nll"].sum().backward()
        grad = delta.grad[:, -1].detach().clone()
        delta.grad = None
    final = delta.detach()
    z = (h_init[:, -1] + final[:, -1]).float()
    return TargetResult(z=z, h_init=h_init[:, -1].clone(), delta=final[:, -1].clone(), steps=steps.cpu(),
                        loss=last_loss.cpu(), site_delta=final.clone() if S > 1 else None, grad=grad)


def optimize_targets_one_by_one(model, adapter, tokenizer, requests, layer, templates, hp, *, fast: bool = True,
                                **kw) -> TargetResult:
    """The reference loop: :func:`optimize_targets` on each request alone, results stacked
    (``kw``: ``sites``, ``fisher``, ``return_grad``)."""
    parts = [optimize_targets(model, adapter, tokenizer, [r], layer, templates, hp, fast=fast, **kw) for r in requests]
    return TargetResult(**{f.name: None if getattr(parts[0], f.name) is None
                           else torch.cat([getattr(p, f.name) for p in parts]) for f in fields(TargetResult)})


@contextmanager
def _site_hooks(modules: dict, fns: dict, record: dict):
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


@torch.no_grad()
def fact_states(
    model,
    adapter: ModelAdapter,
    tokenizer,
    requests: list[EditRequest],
    templates: list[str],
    key_layers: list[int],
    hidden_layers: list[int],
    batch_size: int = 64,
    value_layers: list[int] | None = None,
):
    """Keys and current values at the fact token, in one forward pass per chunk.

    Returns ``(keys, hidden)``: ``keys[l]`` is ``K^l`` (``[d_k, B]``, the input of ``W_out^l`` at
    the fact token, averaged as the published ``compute_ks`` does: first within each group of
    templates, then across the groups, i.e. ``k = ½·k("{}") + ½·mean of the generated templates``;
    :func:`template_weights`) and ``hidden[l]`` is ``h^l`` (``[d, B]``, block
    ``l``'s output at the fact token of the bare prompt). float32.

    With ``value_layers`` it returns ``(keys, hidden, values)``: ``values[l]`` is the output of
    ``W_out^l`` (``[d, B]``, the MLP output) at the fact token of the bare prompt (PMET's
    residuals are measured there).
    """
    if "{}" not in templates:
        raise ValueError("context templates must include the bare template '{}'")
    device = next(model.parameters()).device
    side = getattr(tokenizer, "padding_side", "right") or "right"
    weights = template_weights(templates)
    items = []  # (request, is_bare, ids, fact, weight)
    for i, r in enumerate(requests):
        for c, w in zip(templates, weights):
            ids, fact = encode_prompt(tokenizer, c.replace("{}", r.prompt, 1), r.subject)
            items.append((i, c == "{}", ids, fact, w))
    keys = {l: torch.zeros(adapter.key_size(l), len(requests), device=device) for l in key_layers}
    hidden = {l: torch.zeros(adapter.hidden_size(), len(requests), device=device) for l in hidden_layers}
    value_layers = list(value_layers or [])
    values = {l: torch.zeros(adapter.hidden_size(), len(requests), device=device) for l in value_layers}
    stop = max(list(key_layers) + list(hidden_layers) + value_layers)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = pad_batch([c[2] for c in chunk], [c[3] for c in chunk], pad_id=pad_token_id(tokenizer), padding_side=side)
        batch = batch.to(device)
        outputs: dict = {}
        with traced(adapter, key_layers=key_layers, hidden_layers=hidden_layers, stop_after=stop) as tr, \
                _site_hooks({l: adapter.w_out_module(l) for l in value_layers}, {l: (lambda y: y) for l in value_layers},
                            outputs):
            forward(model, batch)
        req = torch.tensor([c[0] for c in chunk], device=device)
        bare = torch.tensor([c[1] for c in chunk], device=device)
        w = torch.tensor([c[4] for c in chunk], device=device, dtype=torch.float32)
        for l in key_layers:
            keys[l].index_add_(1, req, (gather_positions(tr.keys[l], batch.fact_index).float() * w.unsqueeze(1)).T)
        for l in hidden_layers:
            h = gather_positions(tr.hidden[l], batch.fact_index).float()
            hidden[l][:, req[bare]] = h[bare].T
        for l in value_layers:
            v = gather_positions(outputs[l], batch.fact_index).float()
            values[l][:, req[bare]] = v[bare].T
    if value_layers:
        return keys, hidden, values
    return keys, hidden


def template_weights(templates: list[str]) -> list[float]:
    """Weights of each template in a key average: the bare template ``"{}"`` is one group and the
    generated templates another; each group is averaged, then the groups are averaged
    (``½·k("{}") + ½·mean(generated)``; with only the bare template its weight is 1)."""
    generated = sum(1 for c in templates if c != "{}")
    groups = 1 + (generated > 0)
    return [1.0 / groups if c == "{}" else 1.0 / (groups * generated) for c in templates]
