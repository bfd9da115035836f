"""HSE's pieces on the MEMIT round (docs/algorithms.md, "HSE"; Fang et al., "Hippocampal-like
Sequential Editing for Continual Knowledge Updates in LLMs", NeurIPS 2025,
https://openreview.net/forum?id=tqriGodQ79).

- memory-directed forgetting: an unlikelihood term in the target loss
  (``editing.target.forget_weight``; in :func:`blueedit.editing.targets.optimize_targets`);
- Fisher-guided stability: ``½ δᵀ (λ_F Σ_{j<i} F_j) δ`` in the target loss, ``F_j`` estimated
  here from the per-request gradients of round ``j`` (:func:`fisher_estimate`);
- parameter replay: the history term of the solve weighted by ``α_i`` (:func:`history_weight`),
  ``ΔW = R Kᵀ (λ C_0 + α_i H + K Kᵀ)^{-1}``.

All functions are pure.
"""

from __future__ import annotations

import torch

from blueedit.config import UserInputError

#: HSE as MEMIT with these options (``configs/smollm2-135m/hse.yaml`` sets the same, with either
#: strategy; the benchmarks' method name ``hse``). The published values were not retrievable
#: (docs/algorithms.md, "HSE"): the forgetting weight 0.25 is α = 0.8 in the paper's
#: ``α·NLL + (1 − α)·UL``; the Fisher weight 1 is the Laplace approximation's own weight (the
#: earlier edits' log-likelihood as a prior); neither value has been tuned.
PRESET: dict[str, dict] = {
    "editing": {"history_schedule": "inverse"},
    "target": {"forget_weight": 0.25, "fisher_weight": 1.0, "fisher_estimator": "full"},
}


def fisher_estimate(grads: torch.Tensor, estimator: str = "diagonal") -> torch.Tensor:
    """The empirical Fisher of one round at one layer: ``F = Σ_b g_b g_bᵀ`` (``full``, ``[d, d]``)
    or its diagonal ``Σ_b g_b ⊙ g_b`` (``diagonal``, ``[d]``), float64.

    ``grads`` is ``[B, d]``: row ``b`` is ``∇_δ (−log p(o*_b | prompts))`` (the mean target NLL over
    the rewriting prompts) of request ``b`` at its optimized δ. The sum over the batch is the
    Fisher of the batch's joint log-likelihood.
    """
    g = grads.to(torch.float64)
    if estimator == "diagonal":
        return (g * g).sum(0)
    if estimator == "full":
        return g.T @ g
    raise UserInputError(f"editing.target.fisher_estimator must be 'diagonal' or 'full', got {estimator!r}")


def fisher_penalty(delta: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    """``½ δᵀ F δ`` per row of ``delta`` (``[B, d]``); ``fisher`` is ``[d]`` (diagonal) or ``[d, d]``."""
    if fisher.dim() == 1:
        return 0.5 * (delta * delta * fisher).sum(-1)
    return 0.5 * ((delta @ fisher) * delta).sum(-1)


def history_weight(schedule: str, round_index: int, total_rounds: int | None) -> float:
    """``α_i``, the weight of the edit history ``H`` in round ``i = round_index + 1`` (1-based).

    ``constant``: 1 (MEMIT). ``inverse``: ``n / (i − 1)`` with ``n = total_rounds``, the number of
    rounds of the stream. In the first round ``i − 1 = 0`` and ``H = 0``, so ``α_1`` cannot change
    the update; it is set to 1.
    """
    if schedule == "constant":
        return 1.0
    if schedule != "inverse":
        raise UserInputError(f"editing.history_schedule must be 'constant' or 'inverse', got {schedule!r}")
    if total_rounds is None or total_rounds < 1:
        raise UserInputError("editing.history_schedule 'inverse' (α_i = n / (i − 1)) needs n, the number of rounds of "
                         "the edit stream, which is unknown here: give the editor total_rounds (blueedit fit sets it "
                         "from the data's num_edits / edits_per_round)")
    if round_index < 1:
        return 1.0
    return total_rounds / round_index
