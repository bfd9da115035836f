"""Context templates, target hidden states (the "z" optimization), keys and current values
(docs/algorithms.md: "Context templates", "Target hidden states", "Keys").

The target optimizer is in parts: :mod:`.batching` (rows, micro-batches, prefix cache, block
replay), :mod:`.scoring` (one forward pass with δ injected, the log-probs read), :mod:`.losses`
(one function per loss term and exit), :mod:`.objective` (the terms assembled per micro-batch)
and :mod:`.loop` (Adam, clamp, exits); :func:`optimize_targets` joins them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Literal

import torch

from blueedit.config import TargetConfig, UserInputError
from blueedit.data.records import EditRequest
from blueedit.editing.targets.batching import (
    BlockReplay,
    Chunk,
    PrefixCache,
    cache_argument,
    request_chunks,
    request_costs,
    row_tensors,
    target_rows,
)
from blueedit.editing.targets.loop import optimize
from blueedit.editing.targets.objective import TargetState, chunk_loss
from blueedit.editing.targets.scoring import Setup, site_hooks
from blueedit.models.adapters import ModelAdapter
from blueedit.models.forward import forward, traced
from blueedit.models.tokens import encode_fact_prompt, gather_positions, pad_batch, pad_token_id

__all__ = ["CONTEXT_SEEDS", "BlockReplay", "Chunk", "PrefixCache", "TargetConfig", "TargetResult", "cache_argument",
           "fact_states", "generate_context_templates", "optimize_targets", "optimize_targets_one_by_one",
           "request_chunks", "template_weights"]

CONTEXT_SEEDS = ("The", "Therefore", "Because", "I", "You")
#: Where a target's δ is added inside block ``layer``: its output (``block``, MEMIT and the
#: others), the attention output projection's output (``attn``) or ``W_out``'s output (``mlp``);
#: PMET optimizes ``("attn", "mlp")`` together (docs/algorithms.md, "PMET").
Site = Literal["block", "attn", "mlp"]


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
    key/value cache of the prefixes computed once (:class:`~.batching.PrefixCache`); after the first step
    it runs only blocks ``layer..loss_layer`` (:class:`~.batching.BlockReplay`); it applies ``lm_head``
    only where target tokens are read. ``fast=False`` is
    the straightforward path: whole prompts every step and logits at every position.
    """
    loss_layer = _check_target_args(adapter, layer, hp, max_batch_tokens, sites, fisher)
    sites = tuple(sites)
    device = next(model.parameters()).device
    rows = target_rows(tokenizer, requests, templates, hp.kl_prompt, forget=hp.forget_weight > 0,
                       stop_after=hp.stop_after, anchor=hp.anchor_position0)
    n_req, S = len(requests), len(sites)
    # the KL term compares the model's next-token distributions (its final logits, as the published
    # ``compute_z``); the target log-probs are read at ``loss_layer``. Both come from one pass that
    # runs up to the last block when ``loss_layer`` is below it.
    final_layer = adapter.num_layers - 1
    setup = Setup(model, adapter, rows, row_tensors(rows, n_req, device), layer, loss_layer, final_layer, sites,
                  {x: (adapter.attn_out_module(layer) if x == "attn" else adapter.w_out_module(layer))
                   for x in sites if x != "block"},
                  fast, pad_token_id(tokenizer), getattr(tokenizer, "padding_side", "right") or "right", device,
                  hp.top1_nll_factor is not None, len(templates))
    chunks = [Chunk(c, rows, model, adapter, setup.pad, device, layer, final_layer, fast)
              for c in request_chunks(request_costs(rows, n_req, fast), max_batch_tokens)]
    state = TargetState.zeros(n_req, S, adapter.hidden_size(), device)
    optimize(state, hp, lambda c, it: chunk_loss(setup, state, hp, fisher, chunks[c], it), len(chunks), on_step)
    grad = _nll_gradient(setup, state, hp, chunks) if return_grad else None
    final = state.delta.detach()
    z = (state.h_init[:, -1] + final[:, -1]).float()
    return TargetResult(z=z, h_init=state.h_init[:, -1].clone(), delta=final[:, -1].clone(), steps=state.steps.cpu(),
                        loss=state.last_loss.cpu(), site_delta=final.clone() if S > 1 else None, grad=grad)


def _check_target_args(adapter: ModelAdapter, layer: int, hp: TargetConfig, max_batch_tokens: int | None,
                       sites, fisher) -> int:
    """Validate :func:`optimize_targets`' arguments; returns the loss layer."""
    loss_layer = adapter.num_layers - 1 if hp.loss_layer is None else hp.loss_layer
    if not layer <= loss_layer < adapter.num_layers:
        raise UserInputError(f"target.loss_layer {loss_layer} must lie in [{layer}, {adapter.num_layers - 1}]")
    if max_batch_tokens is not None and max_batch_tokens < 1:
        raise UserInputError(f"editing.max_batch_tokens must be positive or null, got {max_batch_tokens}")
    sites = tuple(sites)
    if not sites or any(x not in ("block", "attn", "mlp") for x in sites) or len(set(sites)) != len(sites):
        raise UserInputError(f"target sites {sites} must be distinct names among 'block', 'attn', 'mlp'")
    if fisher is not None and len(sites) != 1:
        raise UserInputError("the Fisher penalty (editing.target.fisher_weight) needs a single target site")
    return loss_layer


def _nll_gradient(setup: Setup, state: TargetState, hp: TargetConfig, chunks: list[Chunk]) -> torch.Tensor:
    """``∇_δ NLL_i`` at each request's final δ (``[B, d]``, the last site): one extra forward and
    backward, no step (the rows of HSE's empirical Fisher)."""
    state.active[:] = True
    state.delta.grad = None
    for ch in chunks:
        _, _, parts = chunk_loss(setup, state, hp, None, ch, 1)
        parts["nll"].sum().backward()
    grad = state.delta.grad[:, -1].detach().clone()
    state.delta.grad = None
    return grad


def optimize_targets_one_by_one(model, adapter, tokenizer, requests, layer, templates, hp, *, fast: bool = True,
                                **kw) -> TargetResult:
    """The reference loop: :func:`optimize_targets` on each request alone, results stacked
    (``kw``: ``sites``, ``fisher``, ``return_grad``)."""
    parts = [optimize_targets(model, adapter, tokenizer, [r], layer, templates, hp, fast=fast, **kw) for r in requests]
    return TargetResult(**{f.name: None if getattr(parts[0], f.name) is None
                           else torch.cat([getattr(p, f.name) for p in parts]) for f in fields(TargetResult)})


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
    anchor: bool = False,
):
    """Keys and current values at the fact token, in one forward pass per chunk.

    Returns ``(keys, hidden)``: ``keys[l]`` is ``K^l`` (``[d_k, B]``, the input of ``W_out^l`` at
    the fact token, averaged as the published ``compute_ks`` does: first within each group of
    templates, then across the groups, i.e. ``k = ½·k("{}") + ½·mean of the generated templates``;
    :func:`template_weights`) and ``hidden[l]`` is ``h^l`` (``[d, B]``, block
    ``l``'s output at the fact token of the bare prompt). float32.

    With ``value_layers`` it returns ``(keys, hidden, values)``: ``values[l]`` is the output of
    ``W_out^l`` (``[d, B]``, the MLP output) at the fact token of the bare prompt (PMET's
    residuals are measured there). ``anchor``: a fact token at position 0 is read at position 1,
    behind :func:`~blueedit.models.tokens.anchor_token` (``editing.target.anchor_position0``).
    """
    if "{}" not in templates:
        raise UserInputError("context templates must include the bare template '{}'")
    device = next(model.parameters()).device
    side = getattr(tokenizer, "padding_side", "right") or "right"
    weights = template_weights(templates)
    items = []  # (request, is_bare, ids, fact, weight)
    for i, r in enumerate(requests):
        for c, w in zip(templates, weights):
            ids, fact = encode_fact_prompt(tokenizer, c.replace("{}", r.prompt, 1), r.subject, anchor)
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
                site_hooks({l: adapter.w_out_module(l) for l in value_layers}, {l: (lambda y: y) for l in value_layers},
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
