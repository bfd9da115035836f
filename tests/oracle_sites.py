"""An independent oracle for the PMET and HSE target optimizations of one request, written from
docs/algorithms.md ("PMET", "HSE"). Like ``oracle.py`` it shares nothing with ``blueedit``: every
prompt is run alone on the whole sequence, δ's are added with forward hooks.

* ``sites``: ``block`` (output of block ``l``), ``attn`` (output of the attention output projection
  of block ``l``), ``mlp`` (output of ``W_out^l``); one δ per site, each added at the fact token of
  every rewriting prompt and of the KL prompt;
* loss = w_nll · mean_c NLL(o* | c(p)) / |o*| + kl_factor · KL(P_δ ‖ P_init)
  + v_weight_decay · Σ_sites ‖δ_s‖ / ‖init_s‖²  [+ forget_weight · mean_c −log(1 − p(o | c(p)))]
  [+ ½ δᵀ F δ]; Adam; the last iteration and a loss below ``early_stop_loss`` take no step; each
  δ_s is clamped to ``clamp_norm_factor`` · ‖init_s‖;
* PMET's exit (``top1_factor``): when o* is the argmax at every target position of every rewriting
  prompt, w_nll becomes ``top1_factor`` for the next step and the loop ends if KL < ``top1_kl``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oracle import Model, _NoParamGrads

ATTN = {"llama": "self_attn.o_proj", "gpt2": "attn.c_proj"}


@dataclass
class SiteTarget:
    z: torch.Tensor  # last site's init + δ
    deltas: torch.Tensor  # [S, d]
    inits: torch.Tensor  # [S, d]
    updates: int
    loss: float
    grad: torch.Tensor  # ∇_δ NLL at the final δ of the last site


def site_module(m: Model, site: str, layer: int):
    if site == "attn":
        return m.blocks[layer].get_submodule(ATTN[m.model.config.model_type])
    if site == "mlp":
        return m.w_out(layer)
    return m.blocks[layer]


def run_with(m: Model, ids: list[int], layer: int, sites, deltas, fact: int, read_layers=()):
    """Logits ``[T, V]``, the site outputs at ``fact`` (after δ) and block outputs of ``read_layers``."""
    outs, hs, handles = {}, {}, []

    def hook(j, site):
        def f(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            if deltas is not None:
                onehot = torch.zeros(h.shape[1], 1, dtype=h.dtype)
                onehot[fact] = 1
                h = h + onehot * deltas[j].to(h.dtype)
            outs[site] = h[0, fact]
            return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h
        return f

    def read(l):
        def f(module, args, output):
            hs[l] = (output[0] if isinstance(output, tuple) else output)[0]
        return f

    for j, site in enumerate(sites):
        handles.append(site_module(m, site, layer).register_forward_hook(hook(j, site)))
    for l in read_layers:
        handles.append(m.blocks[l].register_forward_hook(read(l)))
    try:
        logits = m.model(input_ids=torch.tensor([ids])).logits[0]
    finally:
        for h in handles:
            h.remove()
    return logits, outs, hs


def site_target(model, tok, req, layer: int, templates, *, sites=("block",), steps=4, v_lr=0.5, v_weight_decay=0.5,
                kl_factor=0.0625, clamp=0.75, early_stop=0.05, forget_weight=0.0, fisher=None, top1_factor=None,
                top1_kl=0.01, kl_prompt="{} is a") -> SiteTarget:
    m = Model(model, tok)
    loss_layer = m.num_layers - 1
    target = m.target_ids(req.target_new)
    old = m.target_ids(req.target_true) if forget_weight > 0 else []
    rows = []  # (ids, fact, prompt length, target ids, is_old)
    for c in templates:
        ids, fact = m.encode(c.replace("{}", req.prompt, 1), req.subject)
        rows.append((ids + target[:-1], fact, len(ids), target, False))
        if forget_weight > 0:
            rows.append((ids + old[:-1], fact, len(ids), old, True))
    kl_ids, kl_fact = m.encode(kl_prompt, req.subject)
    bare_ids, bare_fact = m.encode(req.prompt, req.subject)
    with torch.no_grad():
        _, outs, _ = run_with(m, bare_ids, layer, sites, None, bare_fact)
        inits = torch.stack([outs[s].float() for s in sites])
        p_init = torch.log_softmax(m.model(input_ids=torch.tensor([kl_ids])).logits[0, kl_fact].float(), -1)
    deltas = torch.zeros_like(inits, requires_grad=True)
    opt = torch.optim.Adam([deltas], lr=v_lr)
    w_nll, updates, loss_value = 1.0, 0, float("nan")

    def terms():
        nlls, uls, top1 = [], [], True
        for ids, fact, plen, tgt, is_old in rows:
            _, _, hs = run_with(m, ids, layer, sites, deltas, fact, read_layers=[loss_layer])
            logp = torch.log_softmax(m.head(m.norm(hs[loss_layer])).float(), -1)
            lp = torch.stack([logp[plen - 1 + j, t] for j, t in enumerate(tgt)])
            if is_old:
                uls.append(-torch.log(1 - lp.sum().exp()))
            else:
                nlls.append(-lp.sum() / len(tgt))
                top1 = top1 and all(bool(logp[plen - 1 + j, t] >= logp[plen - 1 + j].max()) for j, t in enumerate(tgt))
        return torch.stack(nlls).mean(), (torch.stack(uls).mean() if uls else None), top1

    with _NoParamGrads(m.model):
        for it in range(steps):
            nll, ul, top1 = terms()
            logits, _, _ = run_with(m, kl_ids, layer, sites, deltas, kl_fact)
            p_d = torch.log_softmax(logits[kl_fact].float(), -1)
            kl = (p_d.exp() * (p_d - p_init)).sum()
            wd = sum(v_weight_decay * deltas[j].norm() / inits[j].norm() ** 2 for j in range(len(sites)))
            loss = w_nll * nll + kl_factor * kl + wd
            if ul is not None:
                loss = loss + forget_weight * ul
            if fisher is not None:
                dl = deltas[0]
                loss = loss + 0.5 * (dl @ (torch.diag(fisher) if fisher.dim() == 1 else fisher) @ dl)
            loss_value = float(loss.detach())
            if it == steps - 1 or loss_value < early_stop:
                break
            if top1_factor is not None:
                w_nll = top1_factor if top1 else 1.0
                if top1 and float(kl.detach()) < top1_kl:
                    break
            opt.zero_grad()
            loss.backward()
            opt.step()
            updates += 1
            with torch.no_grad():
                for j in range(len(sites)):
                    bound = clamp * inits[j].norm()
                    if deltas[j].norm() > bound:
                        deltas[j].mul_(bound / deltas[j].norm())
        deltas.grad = None
        nll, _, _ = terms()
        grad = torch.autograd.grad(nll, deltas)[0][-1]
    d = deltas.detach().clone()
    return SiteTarget(inits[-1] + d[-1], d, inits, updates, loss_value, grad)


@torch.no_grad()
def p_answer(model, tok, req, answer: str, layer: int | None = None, sites=("block",), deltas=None) -> float:
    """p(answer | bare prompt) as a sequence probability, optionally with δ's injected."""
    m = Model(model, tok)
    ids, fact = m.encode(req.prompt, req.subject)
    tgt = m.target_ids(answer)
    logits, _, _ = run_with(m, ids + tgt[:-1], layer if layer is not None else 0, sites if deltas is not None else (),
                            deltas, fact)
    logp = torch.log_softmax(logits.float(), -1)
    return float(torch.stack([logp[len(ids) - 1 + j, t] for j, t in enumerate(tgt)]).sum().exp())


@torch.no_grad()
def mlp_output(model, tok, req, layer: int) -> torch.Tensor:
    """``m^l``: the output of ``W_out^l`` at the fact token of the bare prompt (float64)."""
    m = Model(model, tok)
    ids, fact = m.encode(req.prompt, req.subject)
    _, outs, _ = run_with(m, ids, layer, ("mlp",), None, fact)
    return outs["mlp"].double()
