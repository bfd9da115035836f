"""PMET's residual handling (docs/algorithms.md, "PMET"; Li et al., "PMET: Precise Model Editing
in a Transformer", AAAI 2024, https://arxiv.org/abs/2308.08742).

PMET optimizes two vectors at the fact token of the target layer ``L``: ``δ_attn`` added to the
attention output and ``δ_mlp`` added to the MLP output (``W_out``'s output, ``m = W_out k``)
(:func:`blueedit.editing.targets.optimize_targets` with ``sites=("attn", "mlp")``). Only the MLP
target ``z_mlp = m_init + δ_mlp`` is written: into ``W_out`` with the MEMIT solve
(:func:`blueedit.editing.solvers.memit_update`), its residual measured in the MLP-output space
of ``L`` and spread over the critical layers by a square root instead of MEMIT's division.
"""

from __future__ import annotations

import math

import torch


def pmet_residuals(z_mlp: torch.Tensor, mlp_out: torch.Tensor, position: int, num_layers: int) -> torch.Tensor:
    """``R^{l_i} = (z_mlp − m^L) / sqrt(m − i)``: PMET's residual for the ``i``-th of ``m`` critical
    layers (``i = position``, 0-based) under ``distribute``.

    Args:
        z_mlp: the MLP-output target at ``L``, ``[d, B]``.
        mlp_out: ``m^L``, the current output of ``W_out^L`` at the fact token of the bare prompts
            (re-read after each earlier layer's write), ``[d, B]``.
        position: ``i`` in ``0..m−1``; num_layers: ``m``.

    Returns ``[d, B]``. Under ``boundary`` (BLUE) the residual is ``z_mlp^l − m^l`` at each edited
    layer, i.e. this function with ``position = num_layers − 1`` (no division).
    """
    if not 0 <= position < num_layers:
        raise ValueError(f"layer position {position} outside 0..{num_layers - 1}")
    return (z_mlp - mlp_out) / math.sqrt(num_layers - position)
