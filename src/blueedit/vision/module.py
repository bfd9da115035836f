"""``VisionEditingModule``: RefineViT as a Lightning training loop, one edit per training step.

Each training step receives one :class:`~blueedit.vision.datamodule.VisionEdit` and runs
:func:`~blueedit.vision.refine.refine_edit` on it: score the heads, remove the selected ones, fit
``P``. Every round starts from the base model (Where-to-Edit's protocol: edits are measured one
at a time), so after the run the model holds the last round's edit; edit several images together
by putting them in one round (``data.images_per_edit`` or ``blueedit edit --edits FILE``).

No weight of the ViT is written: the edit lives in hooks (:class:`~blueedit.vision.heads.EditHooks`),
and the module's ``state_dict`` (what checkpoints hold) is that state only: the head mask, ``P``
and the mean-ablation references, plus the last round's index.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import torch

from blueedit.config import UserInputError
from blueedit.vision.datamodule import VisionEdit
from blueedit.vision.digits import TrainConfig, default_cache_root, load_or_train
from blueedit.vision.heads import EditHooks
from blueedit.vision.refine import EditState, RefineConfig, refine_edit
from blueedit.vision.vit import ViTAdapter, load_vit


@dataclass
class VisionModelConfig:
    """Which ViT to edit.

    Args:
        name_or_path: ``digits`` (the test bed's ViT, read from the cache or trained there: a few
            minutes on one core) or a ``ViTForImageClassification`` directory or hub id
            (``google/vit-base-patch16-224``; its images must fit its config).
        train: how the digits ViT is trained (only for ``digits``).
        cache_dir: the cache root (default ``$BLUEEDIT_CACHE`` or ``~/.cache/blueedit``).
    """

    name_or_path: str = "digits"
    train: TrainConfig = field(default_factory=TrainConfig)
    cache_dir: str | None = None


def load_model(spec: VisionModelConfig):
    if spec.name_or_path == "digits":
        model, _ = load_or_train(spec.train, spec.cache_dir or default_cache_root())
        return model
    from blueedit.vision.state import is_edited_vit

    if is_edited_vit(spec.name_or_path):
        raise UserInputError(f"model.name_or_path {spec.name_or_path!r} is an edited ViT: an edit starts from the base "
                         "model and would drop its head mask and P; edit the base model (blueedit revert DIR gives it "
                         "back) with all images in one --edits file")
    return load_vit(spec.name_or_path)


class VisionEditingModule(L.LightningModule):
    """RefineViT editing rounds as training steps (see the module docstring).

    Args:
        model: the ViT (:class:`VisionModelConfig`).
        refine: RefineViT's settings (:class:`~blueedit.vision.refine.RefineConfig`).
    """

    def __init__(self, model: VisionModelConfig = VisionModelConfig(), refine: RefineConfig = RefineConfig()) -> None:
        super().__init__()
        self.model_spec = deepcopy(model or VisionModelConfig())
        self.refine = deepcopy(refine or RefineConfig())
        self.save_hyperparameters({"model": asdict(self.model_spec), "refine": asdict(self.refine)})
        self.automatic_optimization = False
        self._round_counter = torch.nn.Parameter(torch.zeros(()))
        self.vit = load_model(self.model_spec)
        for p in self.vit.parameters():
            p.requires_grad_(False)
        self.adapter = ViTAdapter.of(self.vit)
        self.hooks = EditHooks(self.adapter)
        self.last_round = -1

    # -- Lightning plumbing ----------------------------------------------------------------
    def train(self, mode: bool = True):
        """The ViT stays in eval mode: editing never trains it."""
        super().train(mode)
        self.vit.eval()
        return self

    def configure_optimizers(self):
        return torch.optim.SGD([self._round_counter], lr=0.0)

    def edit_state(self) -> EditState:
        h = self.hooks
        return EditState(h.mask.clone(), None if h.projection is None else h.projection.clone(),
                         None if h.means is None else h.means.clone())

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """The edit state only (the ViT's weights never change)."""
        from blueedit.vision.state import state_tensors

        return {**state_tensors(self.edit_state()), "last_round": torch.tensor(self.last_round)}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        from blueedit.vision.state import apply_state

        if strict and "mask" not in state_dict:
            raise KeyError(f"checkpoint holds {sorted(state_dict)}: no head mask, not a vision editing checkpoint")
        apply_state(self.hooks, EditState(state_dict["mask"].bool(), state_dict.get("projection"), state_dict.get("means")))
        self.last_round = int(state_dict.get("last_round", -1))

    @contextmanager
    def hooks_cleared(self) -> Iterator[None]:
        """Forwards inside see the base model; the edit is back after."""
        saved = self.edit_state()
        self.hooks.clear()
        try:
            yield
        finally:
            self.hooks.mask, self.hooks.projection, self.hooks.means = saved.mask, saved.projection, saved.means

    # -- the editing loop ------------------------------------------------------------------
    def training_step(self, batch: VisionEdit, batch_idx: int) -> None:
        if batch.index <= self.last_round:  # already done before a resume
            return None
        state = refine_edit(self.hooks, batch.x, batch.y, self.trainer.datamodule.unrelated(self), self.refine)
        self.last_round = batch.index
        self.optimizers().step()  # advances global_step: one step per round
        self.log_dict({"edit/heads_removed": float(state.mask.sum())}, batch_size=len(batch.y), on_step=True,
                      on_epoch=False)
        return None

    def save(self, output: str | Path, rounds: list[dict], overwrite: bool = False) -> Path:
        from blueedit.vision.state import save_edited

        record = {"base_model": self.model_spec.name_or_path, "model": asdict(self.model_spec),
                  "method": "refinevit", "refine": asdict(self.refine), "rounds": rounds}
        return save_edited(self.vit, self.edit_state(), output, record, overwrite=overwrite)
