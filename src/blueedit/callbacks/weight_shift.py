"""Weight shift error (docs/algorithms.md §9) measured during real editing rounds.

For every layer ``l`` a diagnosed round writes, just before the write (through
:attr:`blueedit.editing.editor.Editor.on_layer`, on the model as it is at that moment):

- ``z*`` is optimized directly at layer ``l`` (``editor.targets(requests, l)``), and
  ``R^{l*} = z*ᵀ − h^l`` with ``h^l`` the current block output at the fact token (the output of
  ``W_out^l`` where the residuals live there: PMET, ``editing.target.site: mlp``);
- the ideal update ``Δ^{l*} = editor.solve(l, R^{l*}, K^l)`` uses the method's own solve (same
  ``C_0``, history ``H``, projection, RECT sparsification) and the keys of that moment;
- the applied update is the ``Δ^l`` the editor is about to write.

Recorded per layer (see :func:`layer_diagnostics`):

- ``frobenius`` / ``spectral`` / ``relative``: ``‖Δ^{l*} − Δ^l‖`` (relative to ``‖Δ^{l*}‖_F``);
- ``cosine``: cosine similarity of the flattened ``R^l`` and ``R^{l*}``;
- ``contribution_distributed`` / ``contribution_computed`` / ``contribution_base``: the mean over
  the round's records of ``P(o* | p) = exp(−Σ_j NLL_j)`` (the probability of the *whole* target,
  the product over its tokens) on the bare rewrite prompt ``p`` after adding, at layer ``l`` alone
  and at the fact token, the distributed δ (the column of ``R^l``), the computed δ* (the column of
  ``R^{l*}``), or nothing.

Under BLUE (``strategy: boundary``) the editor's own target is optimized at ``l`` on the same model,
so the error is zero up to round-off; under ``distribute`` it grows with ``L − l``.

Nothing is written to the model: target optimization only adds hooks (its backward pass may leave
``.grad`` on parameters, which are cleared again), and the RNG state is restored, so the edit is
exactly the one a run without the callback makes.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

from blueedit.config import UserInputError
from blueedit.editing.editor import Editor, LayerStep
from blueedit.editing.solvers import weight_shift_error
from blueedit.models.forward import forward, traced
from blueedit.models.tokens import encode_prompt, gather_positions, pad_batch, pad_token_id, tokenize_target

log = logging.getLogger(__name__)

__all__ = ["WeightShiftError", "layer_diagnostics", "injected_target_prob"]


@torch.no_grad()
def injected_target_prob(model, adapter, tokenizer, requests, layer: int, deltas: torch.Tensor | None,
                         at_mlp: bool = False) -> torch.Tensor:
    """``P(o*_i | p_i)`` (product over target tokens) on each bare rewrite prompt, with
    ``deltas[i]`` (``[B, d]``) added to block ``layer``'s output at the fact token (``at_mlp``: to
    the output of its ``W_out``; none: ``None``). Returns ``[B]`` float64 on the CPU."""
    device = next(model.parameters()).device
    encoded = [encode_prompt(tokenizer, r.prompt, r.subject) for r in requests]
    targets = [tokenize_target(tokenizer, r.target_new) for r in requests]
    side = getattr(tokenizer, "padding_side", "right") or "right"
    batch = pad_batch([e[0] for e in encoded], [e[1] for e in encoded], targets,
                      pad_id=pad_token_id(tokenizer), padding_side=side).to(device)
    fact = batch.fact_index

    def inject(h: torch.Tensor) -> torch.Tensor:
        add = torch.zeros_like(h)
        rows = torch.arange(h.shape[0], device=h.device)
        add = add.index_put((rows, fact), deltas.to(device=h.device, dtype=h.dtype))
        return h + add

    if deltas is None:
        logits = forward(model, batch)
    elif at_mlp:
        handle = adapter.w_out_module(layer).register_forward_hook(lambda mod, args, out: inject(out))
        try:
            logits = forward(model, batch)
        finally:
            handle.remove()
    else:
        with traced(adapter, edit_layer=layer, edit_fn=inject):
            logits = forward(model, batch)
    logp = torch.log_softmax(gather_positions(logits, batch.target_index).double(), dim=-1)
    tok = logp.gather(-1, batch.target_ids.unsqueeze(-1)).squeeze(-1) * batch.target_mask
    return tok.sum(1).exp().cpu()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    denom = a.norm() * b.norm()
    return float((a @ b) / denom) if denom > 0 else float("nan")


def layer_diagnostics(editor: Editor, step: LayerStep, contribution: bool = True) -> dict[str, float]:
    """Weight shift error and companions for one :class:`LayerStep` (see the module docstring).

    Call it on the model as it is right before ``step.delta`` is written (as the ``on_layer``
    hook does). Leaves the weights, parameter gradients and RNG state as they were.
    """
    layer, requests = step.layer, step.requests
    rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    params = [p for p in editor.model.parameters()]
    grads = [p.grad for p in params]
    try:
        res = editor.targets(requests, layer, record=False)
        keys, current = editor.current_values(requests, layer)  # block or MLP-output space (PMET, site mlp)
        r_star = res.z.T.to(current.device) - current  # [d, B]
        ideal = editor.solve(layer, r_star, keys)
        out: dict[str, float] = dict(weight_shift_error(step.delta, ideal))
        out["cosine"] = _cosine(step.residuals, r_star)
        out["residual_norm"] = float(step.residuals.double().norm())
        out["ideal_residual_norm"] = float(r_star.double().norm())
        out["distance"] = float(step.target_layer - layer)
        if contribution:
            args = (editor.model, editor.adapter, editor.tokenizer, requests, layer)
            at_mlp = editor.residuals_at_mlp
            out["contribution_distributed"] = float(injected_target_prob(*args, step.residuals.T.float(), at_mlp).mean())
            out["contribution_computed"] = float(injected_target_prob(*args, r_star.T.float(), at_mlp).mean())
            out["contribution_base"] = float(injected_target_prob(*args, None).mean())
    finally:
        for p, g in zip(params, grads):
            p.grad = g
        torch.random.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return out


class WeightShiftError(L.Callback):
    """Measure the weight shift error of every written layer during editing (docs/algorithms.md §9).

    Every ``every_n_rounds``-th round (round index ``% every_n_rounds == 0``) each layer's write is
    preceded by :func:`layer_diagnostics`: an extra target optimization at that layer plus one
    solve (roughly doubling the round's cost under ``distribute``). Results are logged after the
    round as ``wse/<metric>/layer<l>`` (``frobenius``, ``spectral``, ``relative``, ``cosine``,
    ``contribution_distributed``, ``contribution_computed``, ...) and kept in :attr:`history`
    (``{"round", "layer", "target_layer", "metrics"}``) for reports.

    YAML::

        trainer:
          callbacks:
            - class_path: blueedit.callbacks.weight_shift.WeightShiftError
              init_args: {every_n_rounds: 5}

    Args:
        every_n_rounds: diagnose rounds ``0, n, 2n, ...``.
        contribution: also compute the contribution scores (three forward passes per layer).
    """

    def __init__(self, every_n_rounds: int = 1, contribution: bool = True) -> None:
        if every_n_rounds < 1:
            raise UserInputError(f"every_n_rounds must be >= 1, got {every_n_rounds}")
        self.every_n_rounds = every_n_rounds
        self.contribution = contribution
        self.history: list[dict[str, Any]] = []
        self._pending: list[dict[str, Any]] = []
        self._previous_hook = None
        self._hooked = False

    def _hook(self, editor: Editor):
        def on_layer(step: LayerStep) -> None:
            if self._previous_hook is not None:
                self._previous_hook(step)
            metrics = layer_diagnostics(editor, step, contribution=self.contribution)
            entry = {"round": step.round_index, "layer": step.layer, "target_layer": step.target_layer,
                     "metrics": metrics}
            self._pending.append(entry)
        return on_layer

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        editor = getattr(pl_module, "editor", None)
        index = getattr(batch, "index", batch_idx)
        if editor is None or index % self.every_n_rounds != 0:
            return
        if index < editor.state.rounds_done:  # skipped after a resume
            return
        self._previous_hook = editor.on_layer
        editor.on_layer = self._hook(editor)
        self._hooked = True

    def _unhook(self, pl_module) -> None:
        if self._hooked and getattr(pl_module, "editor", None) is not None:
            pl_module.editor.on_layer = self._previous_hook
        self._hooked, self._previous_hook = False, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._unhook(pl_module)
        if not self._pending:
            return
        logs = {}
        for entry in self._pending:
            for name, value in entry["metrics"].items():
                logs[f"wse/{name}/layer{entry['layer']}"] = value
        self.history.extend(self._pending)
        self._pending = []
        pl_module.log_dict(logs, on_step=True, on_epoch=False, batch_size=1)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._unhook(pl_module)
        self._pending = []

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    def summary(self) -> dict[str, Any]:
        """Per layer: mean relative error and cosine over the diagnosed rounds, and the last round's."""
        out: dict[str, Any] = {}
        for layer in sorted({h["layer"] for h in self.history}):
            rows = [h for h in self.history if h["layer"] == layer]
            rel = [h["metrics"]["relative"] for h in rows]
            cos = [h["metrics"]["cosine"] for h in rows]
            out[layer] = {"rounds": len(rows), "mean_relative": sum(rel) / len(rel),
                          "last_relative": rel[-1], "mean_cosine": sum(cos) / len(cos)}
        return out
