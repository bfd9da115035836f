"""PRUNE (Ma et al., "Perturbation-Restrained Sequential Model Editing", ICLR 2025;
docs/algorithms.md, "Post-processing"): MEMIT rounds, then the accumulated edit's large singular
values restrained once, after the last round.

    W_final = B + restrain(W − W_0)      B = W_0 (``prune_base: original``) or W (``current``)

Evaluations during editing see the restrained weights (:meth:`Prune.final_weights`) without
writing them.
"""

from __future__ import annotations

import torch

from blueedit.editing import solvers
from blueedit.methods.memit import Memit


class Prune(Memit):
    name = "prune"
    post_processing = True

    def final_weights(self, editor) -> dict[int, torch.Tensor]:
        """``W_final^l`` per edited layer (``[d, d_k]``), ``{}`` once the editor is finalized."""
        if editor.state.finalized:
            return {}
        return {l: solvers.prune_postprocess(editor.state.original[l], editor.adapter.get_w_out(l).cpu(),
                                             editor.hp.prune_base)
                for l in editor.hp.edited_layers}
