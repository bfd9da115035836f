"""Context templates, target hidden states (the "z" optimization), keys and current values
(ALGORITHM.md sections 1-3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blueedit.data.records import EditRequest
from blueedit.editing.forward import forward, traced
from blueedit.editing.tokens import encode_prompt, gather_positions, pad_batch, pad_token_id, tokenize_target
from blueedit.models.adapters import ModelAdapter

CONTEXT_SEEDS = ("The", "Therefore", "Because", "I", "You")


@torch.no_grad()
def generate_context_templates(
    model, tokenizer, seeds: tuple[str, ...] = CONTEXT_SEEDS, length: int = 10, top_k: int = 5, seed: int = 0
) -> list[str]:
    """``C = ["{}"] + ["<prefix>. {}" ...]``: one ``length``-token continuation per seed word,
    top-``k`` sampled (greedy when ``top_k`` is 0) under a fixed RNG seed, so the templates are
    reproducible and the global RNG state is left untouched.

    Braces and newlines in generated text are removed so each template keeps exactly one ``{}``.
    """
    device = next(model.parameters()).device
    templates = ["{}"]
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for word in seeds:
            ids = tokenizer(word, return_tensors="pt")["input_ids"].to(device)
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=length,
                do_sample=top_k > 0, top_k=top_k if top_k > 0 else None, top_p=None, temperature=None,
                pad_token_id=pad_token_id(tokenizer),
            )
            text = tokenizer.decode(out[0], skip_special_tokens=True)
            text = " ".join(text.replace("{", " ").replace("}", " ").split())
            templates.append(f"{text}. {{}}")
    return templates


@dataclass
class TargetHParams:
    """Hyperparameters of the target optimization (ALGORITHM.md section 2).

    ``loss_layer`` ``None`` means the last block. ``kl_prompt`` has one ``{}`` for the subject.
    """

    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 0.75
    early_stop_loss: float = 0.05
    loss_layer: int | None = None
    kl_prompt: str = "{} is a"


@dataclass
class TargetResult:
    """Targets for ``B`` requests at one layer: ``z = h_init + delta`` (``[B, d]``, float32),
    ``steps`` optimizer steps taken per request, ``loss`` the last loss per request."""

    z: torch.Tensor
    h_init: torch.Tensor
    delta: torch.Tensor
    steps: torch.Tensor
    loss: torch.Tensor


@dataclass
class _Row:
    ids: list[int]
    fact: int
    target: list[int]  # full target ids (rewriting rows); empty for the KL row
    request: int
    is_kl: bool


def _rows(tokenizer, requests: list[EditRequest], templates: list[str], kl_prompt: str) -> list[_Row]:
    rows = []
    for i, r in enumerate(requests):
        target = tokenize_target(tokenizer, r.target_new)
        for c in templates:
            ids, fact = encode_prompt(tokenizer, c.replace("{}", r.prompt, 1), r.subject)
            rows.append(_Row(ids, fact, target, i, False))
        ids, fact = encode_prompt(tokenizer, kl_prompt, r.subject)
        rows.append(_Row(ids, fact, [], i, True))
    return rows


def optimize_targets(
    model,
    adapter: ModelAdapter,
    tokenizer,
    requests: list[EditRequest],
    layer: int,
    templates: list[str],
    hp: TargetHParams,
) -> TargetResult:
    """Optimize one δ per request at the output of block ``layer``, all requests jointly.

    For request ``i`` with rewriting prompts ``c(p_i)`` (+ target tokens but the last) and the KL
    prompt, δ_i is added to ``h^layer`` at each prompt's fact token and minimizes

        L_i = mean_c NLL(o*_i | c(p_i)) / |o*_i|  +  kl_factor · KL(P_init ‖ P_δ)
              +  v_weight_decay · ‖δ_i‖ / ‖h_init,i‖²

    with Adam (lr ``v_lr``) for at most ``v_num_grad_steps`` steps, stopping request ``i`` once
    ``L_i < early_stop_loss``, and projecting δ_i into ``‖δ_i‖ ≤ clamp_norm_factor · ‖h_init,i‖``
    after each step. The losses are independent, so the batched result equals the one-by-one loop
    (up to floating-point round-off): finished requests are dropped from the batch and their δ
    frozen. Target log-probs are read at ``loss_layer`` through the final norm and ``lm_head``,
    computed only at the positions that predict target tokens.
    """
    loss_layer = adapter.num_layers - 1 if hp.loss_layer is None else hp.loss_layer
    if not layer <= loss_layer < adapter.num_layers:
        raise ValueError(f"target.loss_layer {loss_layer} must lie in [{layer}, {adapter.num_layers - 1}]")
    device = next(model.parameters()).device
    side = getattr(tokenizer, "padding_side", "right") or "right"
    pad = pad_token_id(tokenizer)
    rows = _rows(tokenizer, requests, templates, hp.kl_prompt)
    n_req = len(requests)
    d = adapter.hidden_size()
    n_ctx = len(templates)

    delta = torch.nn.Parameter(torch.zeros(n_req, d, device=device, dtype=torch.float32))
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    active = torch.ones(n_req, dtype=torch.bool)
    steps = torch.zeros(n_req, dtype=torch.long)
    last_loss = torch.full((n_req,), float("nan"))
    h_init = torch.zeros(n_req, d, device=device)
    kl_init = None

    for it in range(hp.v_num_grad_steps + 1):
        act_idx = active.nonzero().flatten().tolist()
        if not act_idx:
            break
        sel = [r for r in rows if active[r.request]]
        local = {g: j for j, g in enumerate(act_idx)}
        batch = pad_batch(
            [r.ids for r in sel], [r.fact for r in sel], [r.target[:-1] for r in sel],
            pad_id=pad, padding_side=side,
        ).to(device)
        row_req = torch.tensor([r.request for r in sel], device=device)
        is_kl = torch.tensor([r.is_kl for r in sel], device=device)
        fact = batch.fact_index

        def inject(h: torch.Tensor) -> torch.Tensor:
            add = torch.zeros_like(h)
            add = add.index_put((torch.arange(h.shape[0], device=device), fact), delta[row_req].to(h.dtype))
            return h + add

        with traced(adapter, edit_layer=layer, edit_fn=inject, hidden_layers=[loss_layer], stop_after=loss_layer) as tr:
            forward(model, batch)
        if it == 0:
            bare = [k for k, r in enumerate(sel) if not r.is_kl and (k == 0 or sel[k - 1].request != r.request)]
            h_init = gather_positions(tr.hidden[layer], fact)[bare].detach().float()
        h_out = tr.hidden[loss_layer]

        # target log-probs: positions last_prompt_index + j predict target token j
        J = max(len(r.target) for r in sel)
        pos = batch.last_prompt_index.unsqueeze(1) + torch.arange(J, device=device)
        tmask = torch.zeros(len(sel), J, device=device)
        tids = torch.zeros(len(sel), J, dtype=torch.long, device=device)
        for k, r in enumerate(sel):
            tmask[k, : len(r.target)] = 1
            tids[k, : len(r.target)] = torch.tensor(r.target, device=device)
        pos = torch.where(tmask.bool(), pos, batch.last_prompt_index.unsqueeze(1)).clamp(max=h_out.shape[1] - 1)
        rw = (~is_kl).nonzero().flatten()
        kl_rows = is_kl.nonzero().flatten()
        h_t = gather_positions(h_out[rw], pos[rw])  # [R, J, d]
        logp = torch.log_softmax(adapter.lm_head(adapter.final_norm(h_t)).float(), dim=-1)
        tok_logp = logp.gather(-1, tids[rw].unsqueeze(-1)).squeeze(-1) * tmask[rw]
        nll_row = -tok_logp.sum(1) / tmask[rw].sum(1)
        req_rw = torch.tensor([local[int(g)] for g in row_req[rw].tolist()], device=device)
        nll = torch.zeros(len(act_idx), device=device).index_add(0, req_rw, nll_row) / n_ctx

        h_kl = gather_positions(h_out[kl_rows], fact[kl_rows])
        kl_logp = torch.log_softmax(adapter.lm_head(adapter.final_norm(h_kl)).float(), dim=-1)
        if kl_init is None:
            kl_init = kl_logp.detach()
        kl_ref = kl_init[act_idx]
        kl = (kl_ref.exp() * (kl_ref - kl_logp)).sum(-1)

        d_act = delta[act_idx]
        h_act = h_init[act_idx]
        wd = hp.v_weight_decay * d_act.norm(dim=1) / h_act.norm(dim=1).pow(2)
        loss = nll + hp.kl_factor * kl + wd
        last_loss[act_idx] = loss.detach().cpu()

        done = (loss.detach() < hp.early_stop_loss).cpu()
        if it == hp.v_num_grad_steps:
            break
        keep = ~done
        if not keep.any():
            active[act_idx] = False
            break
        frozen = delta.detach().clone()
        opt.zero_grad()
        loss[keep.to(device)].sum().backward()
        opt.step()
        still = torch.tensor(act_idx)[keep]
        with torch.no_grad():
            new = delta.detach()
            mask = torch.zeros(n_req, dtype=torch.bool)
            mask[still] = True
            mask = mask.to(device)
            new.copy_(torch.where(mask.unsqueeze(1), new, frozen))
            max_norm = hp.clamp_norm_factor * h_init.norm(dim=1)
            norms = new.norm(dim=1)
            scale = torch.where(norms > max_norm, max_norm / norms.clamp(min=1e-12), torch.ones_like(norms))
            new.mul_(torch.where(mask, scale, torch.ones_like(scale)).unsqueeze(1))
        steps[still] += 1
        active[torch.tensor(act_idx)[done]] = False

    z = (h_init + delta.detach()).float()
    return TargetResult(z=z, h_init=h_init, delta=delta.detach().clone(), steps=steps, loss=last_loss)


def optimize_targets_one_by_one(model, adapter, tokenizer, requests, layer, templates, hp) -> TargetResult:
    """The reference loop: :func:`optimize_targets` on each request alone, results stacked."""
    parts = [optimize_targets(model, adapter, tokenizer, [r], layer, templates, hp) for r in requests]
    return TargetResult(*(torch.cat([getattr(p, f) for p in parts]) for f in ("z", "h_init", "delta", "steps", "loss")))


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
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Keys and current values at the fact token, in one forward pass per chunk.

    Returns ``(keys, hidden)``: ``keys[l]`` is ``K^l`` (``[d_k, B]``, the input of ``W_out^l`` at
    the fact token averaged over ``templates``) and ``hidden[l]`` is ``h^l`` (``[d, B]``, block
    ``l``'s output at the fact token of the bare prompt). float32.
    """
    if "{}" not in templates:
        raise ValueError("context templates must include the bare template '{}'")
    device = next(model.parameters()).device
    side = getattr(tokenizer, "padding_side", "right") or "right"
    items = []  # (request, is_bare, ids, fact)
    for i, r in enumerate(requests):
        for c in templates:
            ids, fact = encode_prompt(tokenizer, c.replace("{}", r.prompt, 1), r.subject)
            items.append((i, c == "{}", ids, fact))
    keys = {l: torch.zeros(adapter.key_size(l), len(requests), device=device) for l in key_layers}
    hidden = {l: torch.zeros(adapter.hidden_size(), len(requests), device=device) for l in hidden_layers}
    stop = max(list(key_layers) + list(hidden_layers))
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = pad_batch([c[2] for c in chunk], [c[3] for c in chunk], pad_id=pad_token_id(tokenizer), padding_side=side)
        batch = batch.to(device)
        with traced(adapter, key_layers=key_layers, hidden_layers=hidden_layers, stop_after=stop) as tr:
            forward(model, batch)
        req = torch.tensor([c[0] for c in chunk], device=device)
        bare = torch.tensor([c[1] for c in chunk], device=device)
        for l in key_layers:
            keys[l].index_add_(1, req, gather_positions(tr.keys[l], batch.fact_index).float().T)
        for l in hidden_layers:
            h = gather_positions(tr.hidden[l], batch.fact_index).float()
            hidden[l][:, req[bare]] = h[bare].T
    for l in key_layers:
        keys[l] /= len(templates)
    return keys, hidden
