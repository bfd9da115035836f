"""MEMIT (Meng et al., "Mass-Editing Memory in a Transformer", ICLR 2023; docs/algorithms.md,
"Closed-form updates"): the least-squares write every MEMIT-family method shares.

    ΔW = R Kᵀ (λ C_0 + α_i H + K Kᵀ)^{-1}        (H left out with ``use_history: false``)

``R`` residuals ``[d, B]``, ``K`` keys ``[d_k, B]``, ``C_0`` key statistics, ``H`` the edit history,
``α_i`` HSE's history weight (1 unless ``history_schedule: inverse``). Under ``distribute`` the
``i``-th of ``m`` critical layers gets ``R = (z − h^{l_m}) / (m − i)``.
"""

from __future__ import annotations

import torch

from blueedit.editing import solvers
from blueedit.methods.registry import EditMethod, Factors, SolveInputs


class Memit(EditMethod):
    """MEMIT: targets at the block output, the residual divided evenly, the MEMIT solve."""

    name = "memit"
    least_squares = True
    history_replay = True

    def spread(self, z: torch.Tensor, values: torch.Tensor, position: int, num_layers: int) -> torch.Tensor:
        """``(z − v) / (m − i)`` (``[d, B]``)."""
        return (z - values) / (num_layers - position)

    def solve(self, hp, inputs: SolveInputs, residuals: torch.Tensor, keys: torch.Tensor) -> Factors:
        """``(R, Kᵀ (λ C_0 + α_i H + K Kᵀ)^{-1})``; ``H`` omitted when ``hp.use_history`` is off."""
        history = None
        if hp.use_history:
            history = inputs.history
            if inputs.history_weight != 1.0:  # HSE's parameter replay: α_i H
                history = inputs.history_weight * history.to(torch.float64)
        return solvers.memit_factors(residuals, keys, inputs.mom2, history, hp.mom2_update_weight)
