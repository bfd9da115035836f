"""A³E (Piao et al., NeurIPS 2025; docs/algorithms.md, "A³E"): compositional editing with one
rank-1 adapter per edit on the up projection of one layer, routed by a key store, instead of a
closed-form write of ``W_out``.

Its editor is :class:`blueedit.memory.a3e.A3EEditor`; its settings are ``editing.a3e``.
``strategy`` does not apply (no least-squares write).
"""

from __future__ import annotations

import torch

from blueedit.methods.registry import SideMemoryMethod


class A3E(SideMemoryMethod):
    name = "a3e"
    config_field = "a3e"
    label = "A³E"
    trains = "trains per-edit adapters at one layer and writes no weights"

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
