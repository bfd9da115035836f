"""AlphaEdit (Fang et al., "AlphaEdit: Null-Space Constrained Knowledge Editing", ICLR 2025;
docs/algorithms.md, "Closed-form updates"): the update projected on the null space of ``C_0``.

    ΔW = R Kᵀ P (P (H + K Kᵀ) + α I)^{-1}        P = null-space projection of C_0

``P^l`` is computed once per layer from ``C_0`` (eigenvalues below ``nullspace_threshold``) and kept
in the editor state; ``α`` is ``L2``. The history is always used and never weighted.
"""

from __future__ import annotations

import torch

from blueedit.editing import solvers
from blueedit.methods.memit import Memit
from blueedit.methods.registry import Factors, SolveInputs


class AlphaEdit(Memit):
    name = "alphaedit"
    history_replay = False

    def prepare_layer(self, editor, layer: int) -> None:
        """``P^layer`` into ``editor.state.projection`` (kept when resumed)."""
        if layer not in editor.state.projection:
            editor.state.projection[layer] = solvers.nullspace_projection(
                editor.mom2[layer], editor.hp.nullspace_threshold).float()

    def solve(self, hp, inputs: SolveInputs, residuals: torch.Tensor, keys: torch.Tensor) -> Factors:
        return solvers.alphaedit_factors(residuals, keys, inputs.projection, inputs.history, hp.L2)

    def config_settings(self, hp) -> dict[str, object]:
        return {"L2": hp.L2, "nullspace_threshold": hp.nullspace_threshold}
