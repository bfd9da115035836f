"""A³E (Piao et al., NeurIPS 2025; docs/algorithms.md, "A³E"): compositional editing with one
rank-1 adapter per edit on the up projection of one layer, routed by a key store, instead of a
closed-form write of ``W_out``.

Its editor is :class:`blueedit.memory.a3e.A3EEditor`; its settings are ``editing.a3e``.
``strategy`` does not apply (no least-squares write).
"""

from __future__ import annotations

import torch

from blueedit.config import UserInputError
from blueedit.methods.registry import EditMethod


class A3E(EditMethod):
    name = "a3e"
    carries_state = False
    config_field = "a3e"

    def check(self, hp) -> None:
        if hp.target.site != "block":
            raise UserInputError(f"editing.target.site {hp.target.site!r} does not apply to editing.method 'a3e' "
                                 "(A³E has no target); leave it at 'block'")
        if hp.target.stop_after != "none":
            raise UserInputError("editing.target.stop_after does not apply to editing.method 'a3e' (A³E has no "
                                 "target vector); leave it at 'none'")
        if hp.strategy == "boundary":
            raise UserInputError("editing.strategy 'boundary' (BLUE) does not apply to editing.method 'a3e': A³E "
                                 "trains per-edit adapters at one layer and writes no weights; remove the strategy "
                                 "or set it to 'distribute'")
        if len(hp.layers) != 1:
            raise UserInputError(f"editing.method 'a3e' edits one layer: set editing.layers to [L], got {hp.layers}")
        if hp.compute_dtype is not None or hp.autocast is not None:
            raise UserInputError("editing.compute_dtype / editing.autocast are not supported with editing.method "
                                 "'a3e' (it trains in the model's dtype)")

    def create_editor(self, module):
        """The A³E editor of an :class:`~blueedit.module.EditingModule`: adapters on the up
        projection of ``editing.layers[0]``."""
        from blueedit.memory.a3e import A3EEditor

        return A3EEditor(module.lm, module.tokenizer, module.hp.a3e, layer=module.hp.layers[0],
                         adapter=module.adapter)

    def load_state(self, d: dict, device: torch.device | str = "cpu"):
        from blueedit.memory.a3e import A3EState

        return A3EState.from_dict(d, device)

    def save_model(self, module, directory) -> None:
        """The original weights as a standard model, the adapters beside them."""
        module.lm.save_pretrained(directory)
        module.editor.save(directory)
