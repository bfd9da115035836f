"""WISE (Wang et al., "WISE: Rethinking the Knowledge Memory for Lifelong Model Editing of Large
Language Models", NeurIPS 2024; docs/algorithms.md, "WISE"): a side memory at one layer, trained
edit by edit and routed by activation, instead of a closed-form write of ``W_out``.

Its editor is :class:`blueedit.editing.wise.WiseEditor`; its settings are ``editing.wise``.
``strategy`` does not apply (no least-squares write).
"""

from __future__ import annotations

import torch

from blueedit.config import UserInputError
from blueedit.methods.registry import SideMemoryMethod


class Wise(SideMemoryMethod):
    name = "wise"
    config_field = "wise"
    label = "WISE"
    trains = "trains a side memory at one layer"

    def create_editor(self, module):
        """The WISE editor of an :class:`~blueedit.module.EditingModule`: side memory at
        ``editing.layers[0]``, irrelevant inputs from ``editing.wise.irrelevant_dataset`` (minus the
        evaluated locality prompts)."""
        from blueedit.data.formats import load_requests
        from blueedit.editing.wise import SideMemoryLayer, WiseEditor, irrelevant_inputs, wise_context_templates

        hp = module.hp
        if isinstance(module.adapter.w_out_module(hp.layers[0]), SideMemoryLayer):
            raise UserInputError(f"{module.model_spec.name_or_path} already holds a WISE side memory; continuing it is "
                             "not supported: edit its base model with all the records instead")
        trainer = module._trainer
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        data_dir = module.data_dir or getattr(dm, "resolved_data_dir", None)
        exclude = {p for r in (module.eval_requests() if dm is not None else []) for p in r.neighborhood}
        pool = load_requests(hp.wise.irrelevant_dataset, data_dir=data_dir)
        templates = wise_context_templates(module.lm, module.tokenizer, hp.wise.context_lengths)
        return WiseEditor(module.lm, module.tokenizer, module.adapter, hp, templates, irrelevant_inputs(pool, exclude))

    def load_state(self, d: dict, device: torch.device | str = "cpu"):
        from blueedit.editing.wise import WiseState

        return WiseState.from_dict(d, device)

    def save_model(self, module, directory) -> None:
        """The original weights as a standard model, the side memory beside them."""
        from blueedit.editing.wise import save_wise_model

        save_wise_model(module.editor, directory)
