"""RefineViT: locate the attention heads behind a wrong prediction, remove them, and learn a
projection ``P`` of the final representation that keeps the correction and holds the rest.

Notation. An edit set ``E = {(x_i, y_i)}`` that the model gets wrong, predicting ``ŷ_i``;
logits ``z(x) = W r(x) + b`` with ``r(x)`` the final CLS representation (the classifier's
input, after the final LayerNorm) and ``W`` (``[C, d]``) the classifier; the margin
``μ(x) = z_y(x) − z_ŷ(x)``. Choices marked (R) are reconstructions (``docs/algorithms.md``).

Stage 1, locate (R). The score of head ``(l, h)``:

- total effect: ``s_lh = mean_i [ μ_{¬(l,h)}(x_i) − μ(x_i) ]``, the margin gained when the head is
  removed (one forward per head: ``L·H`` forwards);
- direct effect: the first-order estimate of the same gain through the head's direct path to the
  CLS state only, ``s_lh = −mean_i ⟨c_lh(x_i), g(x_i)⟩`` with ``c_lh = W_O^{(l,h)} o^{(l,h)}_CLS``
  the head's term in the final CLS state ``h_L`` and ``g = J_LNᵀ (w_y − w_ŷ)`` the gradient of the
  margin with respect to ``h_L`` (one forward).

Selection: the top ``k`` heads with ``s_lh > 0``, or greedily in decreasing score until every
``x_i`` is corrected. Stage 1, remove: the selected heads are ablated (:mod:`~blueedit.vision.heads`).

Stage 2, refine (R). With ``r̃`` the representation after removal and ``U`` unrelated images,

    min_P  Σ_i CE(W P r̃(x_i) + b, y_i) + λ · mean_{u∈U} ‖P r̃(u) − r(u)‖² + ρ ‖P − I‖_F²,

Adam from ``P = I``. Without the CE term the minimizer has a closed form
(:func:`projection_closed_form`), the check of the optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from blueedit.config import UserInputError
from blueedit.vision.heads import Ablation, EditHooks, head_input_means
from blueedit.vision.vit import ViTAdapter

Score = Literal["total", "direct", "random", "none"]
Selection = Literal["topk", "greedy"]


def margin(logits: torch.Tensor, y: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    """``μ = z_y − z_ŷ`` per row of ``logits`` (``[n, C]``) -> ``[n]``."""
    return logits.gather(1, y[:, None])[:, 0] - logits.gather(1, wrong[:, None])[:, 0]


def total_effect_scores(margins: Callable[[torch.Tensor], torch.Tensor], num_layers: int, num_heads: int) -> torch.Tensor:
    """``s_lh = mean_i [μ_{¬(l,h)}(x_i) − μ(x_i)]`` (``[L, H]``). ``margins(mask)`` returns
    ``μ(x_i)`` (``[n]``) with the heads of the ``[L, H]`` bool ``mask`` removed; it is called once
    with no head removed and once per head."""
    none = torch.zeros(num_layers, num_heads, dtype=torch.bool)
    base = margins(none)
    scores = torch.empty(num_layers, num_heads)
    for l in range(num_layers):
        for h in range(num_heads):
            one = none.clone()
            one[l, h] = True
            scores[l, h] = (margins(one) - base).mean()
    return scores


def head_contributions(z_cls: torch.Tensor, w_o: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Each head's term in an attention output at one token: ``c_h = W_O[:, h d_h:(h+1) d_h] z_h``.

    ``z_cls``: ``[n, d]`` the ``o_proj`` input at the CLS token; ``w_o``: ``[d, d]``.
    Returns ``[n, H, d]``; ``c.sum(1) + b_O`` is the attention output at that token.
    """
    n, d = z_cls.shape
    d_h = d // num_heads
    z = z_cls.reshape(n, num_heads, d_h)
    w = w_o.reshape(w_o.shape[0], num_heads, d_h)  # [d_out, H, d_h]
    return torch.einsum("nhk,ohk->nho", z, w)


def layer_norm_vjp(h: torch.Tensor, weight: torch.Tensor, eps: float, v: torch.Tensor) -> torch.Tensor:
    """``J_LN(h)ᵀ v`` for ``LN(h) = γ ⊙ (h − m)/σ + β`` (``m``, ``σ² + eps``: mean and variance
    over the last dimension): with ``u = γ ⊙ v`` and ``ĥ = (h − m)/σ``,
    ``Jᵀ v = (u − mean(u) − ĥ · mean(u ⊙ ĥ)) / σ``. ``h``, ``v``: ``[n, d]``."""
    mu = h.mean(-1, keepdim=True)
    sigma = torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + eps)
    hat = (h - mu) / sigma
    u = weight * v
    return (u - u.mean(-1, keepdim=True) - hat * (u * hat).mean(-1, keepdim=True)) / sigma


@dataclass
class ClsDecomposition:
    """The final CLS state split into its additive terms (before the final LayerNorm):
    ``final = embedding + Σ_l Σ_h heads[:, l, h] + Σ_l attention_bias[l] + Σ_l mlp[:, l]``."""

    embedding: torch.Tensor  # [n, d]
    heads: torch.Tensor  # [n, L, H, d]
    attention_bias: torch.Tensor  # [L, d]
    mlp: torch.Tensor  # [n, L, d]
    final: torch.Tensor  # [n, d]
    logits: torch.Tensor  # [n, C]

    def total(self) -> torch.Tensor:
        return self.embedding + self.heads.sum((1, 2)) + self.attention_bias.sum(0) + self.mlp.sum(1)


@torch.no_grad()
def cls_decomposition(adapter: ViTAdapter, x: torch.Tensor) -> ClsDecomposition:
    """One forward of ``x`` recording every term of the final CLS state (hooks at block 0's input,
    every ``o_proj`` input, every MLP output and the final norm's input)."""
    seen: dict[str, torch.Tensor] = {}
    L = adapter.num_layers
    blocks = [adapter.o_proj(l) for l in range(L)]
    handles = [adapter.final_norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("final", a[0][:, 0]))]
    handles.append(adapter.block(0).register_forward_pre_hook(_embedding_hook(seen), with_kwargs=True))
    for l in range(L):
        handles.append(blocks[l].register_forward_pre_hook(lambda m, a, l=l: seen.__setitem__(f"z{l}", a[0][:, 0])))
        handles.append(adapter.mlp_out(l).register_forward_hook(lambda m, a, o, l=l: seen.__setitem__(f"m{l}", o[:, 0])))
    try:
        logits = adapter.model(pixel_values=x).logits
    finally:
        for h in handles:
            h.remove()
    heads = torch.stack([head_contributions(seen[f"z{l}"], blocks[l].weight, adapter.num_heads) for l in range(L)], 1)
    bias = torch.stack([blocks[l].bias if blocks[l].bias is not None else torch.zeros(adapter.hidden_size)
                        for l in range(L)])
    return ClsDecomposition(seen["embedding"], heads, bias, torch.stack([seen[f"m{l}"] for l in range(L)], 1),
                            seen["final"], logits)


def _embedding_hook(seen: dict[str, torch.Tensor]):
    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen["embedding"] = hidden[:, 0]
    return hook


def direct_effect_scores(decomposition: ClsDecomposition, norm_weight: torch.Tensor, norm_eps: float,
                         classifier_weight: torch.Tensor, y: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    """``s_lh = −mean_i ⟨c_lh(x_i), J_LN(h_L(x_i))ᵀ (w_{y_i} − w_{ŷ_i})⟩`` (``[L, H]``)."""
    v = classifier_weight[y] - classifier_weight[wrong]  # [n, d]
    g = layer_norm_vjp(decomposition.final, norm_weight, norm_eps, v)
    return -torch.einsum("nlhd,nd->lh", decomposition.heads, g) / len(y)


def select_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``[L, H]`` bool mask of the ``k`` highest scores among the positive ones (fewer when
    fewer than ``k`` are positive)."""
    flat = scores.flatten()
    order = torch.argsort(flat, descending=True)[:k]
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[flat[order] > 0]] = True
    return mask.reshape(scores.shape)


def select_greedy(scores: torch.Tensor, corrected: Callable[[torch.Tensor], torch.Tensor], max_heads: int) -> torch.Tensor:
    """Add the positive-score heads in decreasing score until ``corrected(mask)`` (``[n]`` bool,
    the edit images predicted right with the heads of ``mask`` removed) is all true, or
    ``max_heads`` are removed. Returns the mask."""
    flat = scores.flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    for idx in torch.argsort(flat, descending=True)[:max_heads]:
        if flat[idx] <= 0:
            break
        mask[idx] = True
        if bool(corrected(mask.reshape(scores.shape)).all()):
            break
    return mask.reshape(scores.shape)


def select_random(num_layers: int, num_heads: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` heads drawn uniformly without replacement (the random-heads baseline)."""
    mask = torch.zeros(num_layers * num_heads, dtype=torch.bool)
    mask[torch.randperm(num_layers * num_heads, generator=generator)[:k]] = True
    return mask.reshape(num_layers, num_heads)


def projection_objective(P: torch.Tensor, edit_reps: torch.Tensor, y: torch.Tensor, W: torch.Tensor,
                         b: torch.Tensor | None, unrelated_reps: torch.Tensor, unrelated_targets: torch.Tensor,
                         lam: float, rho: float, ce_weight: float = 1.0) -> torch.Tensor:
    """``ce_weight·Σ_i CE(W P r̃_i + b, y_i) + λ·mean_u ‖P r̃_u − r_u‖² + ρ‖P − I‖_F²`` (a scalar).

    ``edit_reps``: ``[n, d]`` the r̃ of the edit images; ``unrelated_reps`` / ``unrelated_targets``:
    ``[m, d]`` r̃(u) and r(u)."""
    eye = torch.eye(P.shape[0], dtype=P.dtype)
    loss = lam * ((unrelated_reps @ P.T - unrelated_targets) ** 2).sum(-1).mean() + rho * ((P - eye) ** 2).sum()
    if ce_weight and len(y):
        logits = edit_reps @ P.T @ W.T + (0 if b is None else b)
        loss = loss + ce_weight * F.cross_entropy(logits, y, reduction="sum")
    return loss


def fit_projection(edit_reps: torch.Tensor, y: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None,
                   unrelated_reps: torch.Tensor, unrelated_targets: torch.Tensor, lam: float, rho: float = 0.0,
                   steps: int = 100, lr: float = 1e-2, ce_weight: float = 1.0) -> torch.Tensor:
    """``P`` (``[d, d]``) minimizing :func:`projection_objective` by ``steps`` Adam steps from ``I``."""
    d = edit_reps.shape[-1]
    P = torch.eye(d, dtype=edit_reps.dtype).requires_grad_(True)
    opt = torch.optim.Adam([P], lr=lr)
    args = [t.detach() for t in (edit_reps, y, W)] + [None if b is None else b.detach()]
    for _ in range(steps):
        loss = projection_objective(P, *args, unrelated_reps.detach(), unrelated_targets.detach(), lam, rho, ce_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return P.detach()


def projection_closed_form(unrelated_reps: torch.Tensor, unrelated_targets: torch.Tensor, lam: float,
                           rho: float) -> torch.Tensor:
    """The minimizer of ``λ·mean_u ‖P r̃_u − r_u‖² + ρ‖P − I‖_F²`` (the CE term left out).

    Setting the gradient ``(2λ/m)(P R̃ᵀR̃ − RᵀR̃) + 2ρ(P − I)`` to zero gives the normal equations
    ``P ((λ/m) R̃ᵀR̃ + ρI) = (λ/m) RᵀR̃ + ρI`` (rows of ``R̃``, ``R``: the ``m`` samples), so
    ``P = ((λ/m) RᵀR̃ + ρI) ((λ/m) R̃ᵀR̃ + ρI)⁻¹``; at ``ρ = 0``, ``P = RᵀR̃ (R̃ᵀR̃)⁻¹``.
    """
    m, d = unrelated_reps.shape
    a = (lam / m) * unrelated_reps.T @ unrelated_reps + rho * torch.eye(d, dtype=unrelated_reps.dtype)
    rhs = (lam / m) * unrelated_targets.T @ unrelated_reps + rho * torch.eye(d, dtype=unrelated_reps.dtype)
    return torch.linalg.solve(a, rhs, left=False)  # X a = rhs


@dataclass
class RefineConfig:
    """RefineViT's hyperparameters (every field decides an edit).

    Args:
        score: how heads are scored: ``total`` (one forward per head), ``direct`` (one forward),
            ``random`` (``k`` heads at random: a baseline) or ``none`` (no head removed: ``P`` only).
        selection: ``topk`` (the ``k`` best positive scores) or ``greedy`` (add heads until every
            edit image is corrected, at most ``max_heads``).
        k: heads removed by ``topk`` / ``random``.
        max_heads: the most heads ``greedy`` removes.
        ablation: a removed head's output becomes ``zero`` or its ``mean`` over the reference images.
        projection: learn ``P`` (stage 2); ``false``: heads only.
        lam: ``λ``, the weight of holding the unrelated images' representations.
        rho: ``ρ``, the weight of ``‖P − I‖²``.
        steps: Adam steps for ``P``.
        lr: Adam's learning rate for ``P``.
        unrelated: how many training images make ``U``.
        seed: draws ``U`` and the random heads.
    """

    score: Score = "total"
    selection: Selection = "topk"
    k: int = 2
    max_heads: int = 4
    ablation: Ablation = "zero"
    projection: bool = True
    lam: float = 1.0
    rho: float = 0.0
    steps: int = 100
    lr: float = 1e-2
    unrelated: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.score not in ("total", "direct", "random", "none"):
            raise UserInputError(f"refine.score {self.score!r} is not one of total, direct, random, none")
        if self.selection not in ("topk", "greedy"):
            raise UserInputError(f"refine.selection {self.selection!r} is not 'topk' or 'greedy'")
        if self.ablation not in ("zero", "mean"):
            raise UserInputError(f"refine.ablation {self.ablation!r} is not 'zero' or 'mean'")
        for name in ("k", "max_heads", "steps", "unrelated"):
            if int(getattr(self, name)) < 0:
                raise UserInputError(f"refine.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lam", "rho", "lr"):
            if float(getattr(self, name)) < 0:
                raise UserInputError(f"refine.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class EditState:
    """What an edit leaves: the removed heads (``[L, H]`` bool), ``P`` (``[d, d]`` or None) and the
    mean-ablation references (``[L, T, d]`` or None)."""

    mask: torch.Tensor
    projection: torch.Tensor | None
    means: torch.Tensor | None
    scores: torch.Tensor | None = None


@torch.no_grad()
def _reps(adapter: ViTAdapter, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``r(x)``: the classifier's input (``[n, d]``) under the hooks in place."""
    out: list[torch.Tensor] = []
    handle = adapter.classifier.register_forward_pre_hook(lambda m, a: out.append(a[0].detach()))
    try:
        for i in range(0, len(x), batch_size):
            adapter.model(pixel_values=x[i:i + batch_size])
    finally:
        handle.remove()
    return torch.cat(out)


def refine_edit(hooks: EditHooks, x: torch.Tensor, y: torch.Tensor, unrelated_x: torch.Tensor,
                cfg: RefineConfig, reference_x: torch.Tensor | None = None) -> EditState:
    """One RefineViT edit of the model behind ``hooks`` (whose state is cleared first) on the edit
    images ``x`` (``[n, c, h, w]``) with labels ``y``: score, select, remove, fit ``P``. The hooks
    hold the new state on return; the model's weights are never written.

    ``unrelated_x``: images for ``U`` (training images, never the locality set);
    ``reference_x``: images for ``mean`` ablation (default ``unrelated_x``)."""
    adapter = hooks.adapter
    hooks.clear()
    L, H = adapter.num_layers, adapter.num_heads
    unrelated_x = unrelated_x.to(x.device)
    reference_x = None if reference_x is None else reference_x.to(x.device)
    with torch.no_grad():
        logits = adapter.model(pixel_values=x).logits
    top2 = logits.topk(2, dim=-1).indices
    wrong = torch.where(top2[:, 0] == y, top2[:, 1], top2[:, 0])  # ŷ: the best wrong class
    means = head_input_means(adapter, reference_x if reference_x is not None else unrelated_x) \
        if cfg.ablation == "mean" else None
    hooks.means = means

    def margins(mask: torch.Tensor) -> torch.Tensor:
        with hooks.masked(mask), torch.no_grad():
            return margin(adapter.model(pixel_values=x).logits, y, wrong)

    def corrected(mask: torch.Tensor) -> torch.Tensor:
        with hooks.masked(mask), torch.no_grad():
            return adapter.model(pixel_values=x).logits.argmax(-1) == y

    scores = None
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.score == "total":
        scores = total_effect_scores(margins, L, H)
    elif cfg.score == "direct":
        norm = adapter.final_norm
        scores = direct_effect_scores(cls_decomposition(adapter, x), norm.weight.detach(), norm.eps,
                                      adapter.classifier.weight.detach(), y, wrong)
    if cfg.score == "random":
        mask = select_random(L, H, cfg.k, gen)
    elif scores is None:
        mask = torch.zeros(L, H, dtype=torch.bool)
    elif cfg.selection == "greedy":
        mask = select_greedy(scores, corrected, cfg.max_heads)
    else:
        mask = select_top_k(scores, cfg.k)
    hooks.mask = mask
    projection = None
    if cfg.projection:
        u = unrelated_x[torch.randperm(len(unrelated_x), generator=gen)[:cfg.unrelated].to(x.device)]
        with hooks.masked(torch.zeros_like(mask)):
            r_u = _reps(adapter, u)
        r_tilde_u, r_tilde_x = _reps(adapter, u), _reps(adapter, x)
        cls = adapter.classifier
        projection = fit_projection(r_tilde_x, y, cls.weight.detach(), None if cls.bias is None else cls.bias.detach(),
                                    r_tilde_u, r_u, cfg.lam, cfg.rho, cfg.steps, cfg.lr)
        hooks.projection = projection
    return EditState(mask, projection, means, scores)
