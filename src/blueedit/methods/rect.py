"""RECT (Gu et al., "Model Editing Harms General Abilities of Large Language Models:
Regularization to the Rescue", EMNLP 2024; docs/algorithms.md, "Post-processing"): MEMIT rounds
whose update is sparsified against the weights before the round.

    ΔW_sparse = ΔW ⊙ top_k(|ΔW| / |W_before|)     (``rect_keep``: the fraction kept)

As published, the round first writes the full updates of every layer (each later layer computed on
the model with the earlier layers' full updates); :meth:`Rect.post_round` then writes the sparse
ones instead.
"""

from __future__ import annotations

import torch

from blueedit.editing import solvers
from blueedit.methods.memit import Memit
from blueedit.methods.registry import Factors


class Rect(Memit):
    name = "rect"

    def post_round(self, editor, before: dict[int, torch.Tensor], report) -> dict[int, Factors]:
        """Replace each layer's full update ``W − W_before`` with its sparsified one; the recorded
        update is the sparse ``ΔW`` itself (not low rank), in the precision it is added in."""
        factors: dict[int, Factors] = {}
        for l, w0 in before.items():
            full = editor.adapter.get_w_out(l).to(torch.float64) - w0.to(torch.float64)
            sparse = solvers.rect_sparsify(full, w0.to(full.device), editor.hp.rect_keep)
            editor.adapter.set_w_out(l, w0)
            editor.adapter.add_to_w_out(l, sparse)
            editor.sync_compute_copy([l])
            factors[l] = (sparse.to(torch.promote_types(w0.dtype, torch.float32)).cpu(), None)
            report.update_norms[l] = float(torch.linalg.matrix_norm(sparse))
        return factors
