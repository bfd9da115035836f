"""PMET (Li et al., "PMET: Precise Model Editing in a Transformer", AAAI 2024; docs/algorithms.md,
"PMET"): targets optimized at the attention and MLP outputs together, only the MLP one written,
with the MEMIT solve, its residual measured in the MLP-output space and spread by a square root.

    R^{l_i} = (z_mlp − m^{l_m}) / sqrt(m − i)       (``distribute``; undivided under ``boundary``)
"""

from __future__ import annotations

import torch

from blueedit.config import UserInputError
from blueedit.editing.pmet import pmet_residuals
from blueedit.methods.memit import Memit


class Pmet(Memit):
    name = "pmet"

    def check(self, hp) -> None:
        if hp.target.fisher_weight > 0:
            raise UserInputError("editing.target.fisher_weight (HSE's Fisher penalty on one target vector) is not "
                             "defined for method 'pmet', which optimizes two vectors per layer")
        if hp.target.site != "block":
            raise UserInputError(f"editing.target.site {hp.target.site!r} does not apply to editing.method 'pmet' "
                             "(PMET optimizes its own two sites); leave it at 'block'")

    def target_sites(self, hp) -> tuple[str, ...]:
        return ("attn", "mlp")

    def residuals_at_mlp(self, hp) -> bool:
        return True

    def spread(self, z: torch.Tensor, values: torch.Tensor, position: int, num_layers: int) -> torch.Tensor:
        return pmet_residuals(z, values, position, num_layers)
