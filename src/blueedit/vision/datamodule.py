"""The vision track's data module: edit sets from the digits bed (or a file), one per round.

A round is a :class:`VisionEdit`: the images edited together (one for Where-to-Edit's protocol,
2-3 for multi-image editing) with the group they come from. The loader is the language track's
:class:`~blueedit.data.datamodule.RoundLoader` (in order, every rank, resumable mid-epoch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import Dataset

from blueedit.config import UserInputError
from blueedit.data.datamodule import RoundLoader
from blueedit.vision.digits import TRANSFORMS, Bed, Group, build_bed, load_digits_split


@dataclass
class VisionEdit:
    """Round ``index``: edit images ``x`` (``[n, c, h, w]``) with labels ``y``; ``group`` indexes the
    data module's groups (``-1``: no group), ``edited`` marks ``x`` among that group's failures."""

    index: int
    x: torch.Tensor
    y: torch.Tensor
    group: int = -1
    edited: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))

    def to(self, device: Any = None, **kwargs: Any) -> VisionEdit:
        """Lightning's device transfer: the images and labels move, their dtypes stay."""
        return VisionEdit(self.index, self.x.to(device), self.y.to(device), self.group, self.edited)


class EditSetDataset(Dataset[VisionEdit]):
    def __init__(self, edits: list[VisionEdit]) -> None:
        self.edits = edits

    def __len__(self) -> int:
        return len(self.edits)

    def __getitem__(self, index: int) -> VisionEdit:
        return self.edits[index]


def load_edit_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Edit images from a ``torch.save`` file: ``{"images": [n, c, h, w] float, "labels": [n] int}``,
    optionally ``"unrelated"`` (images for ``P``'s ``U`` and mean ablation) and ``"locality"``
    (images whose predictions must hold), both ``[m, c, h, w]``; required for a ViT other than the
    digits bed's. Checked (keys, shapes, types, finite values) before any model is loaded."""
    path = Path(path).expanduser()
    where = f"--edits {str(path)!r}"
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserInputError(f"{where}: not a torch.save file of tensors ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or "images" not in obj or "labels" not in obj:
        raise UserInputError(f"{where}: expected a dict with 'images' and 'labels'")
    unknown = sorted(set(obj) - {"images", "labels", "unrelated", "locality"})
    if unknown:
        raise UserInputError(f"{where}: unknown keys {unknown} (known: images, labels, unrelated, locality)")
    x, y = obj["images"], obj["labels"]
    if not (isinstance(y, torch.Tensor) and y.dim() == 1 and not y.is_floating_point() and len(y) > 0):
        raise UserInputError(f"{where}: 'labels' must be a non-empty integer tensor [n]")
    out = {"labels": y.long()}
    for key in ("images", "unrelated", "locality"):
        t = obj.get(key)
        if t is None:
            continue
        if not (isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_floating_point() and len(t) > 0):
            raise UserInputError(f"{where}: '{key}' must be a non-empty float tensor [n, c, h, w]")
        if t.shape[1:] != x.shape[1:]:
            raise UserInputError(f"{where}: '{key}' images are {tuple(t.shape[1:])}, the edit images {tuple(x.shape[1:])}")
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).flatten(1).any(1).nonzero()[0])
            raise UserInputError(f"{where}: '{key}' image {bad} has non-finite values")
        out[key] = t.float()
    if len(out["images"]) != len(y):
        raise UserInputError(f"{where}: {len(out['images'])} images but {len(y)} labels")
    return out


class DigitsEditDataModule(L.LightningDataModule):
    """Edit rounds on the digits bed (:mod:`blueedit.vision.digits`), or the images of a file.

    Args:
        transforms: the unseen transforms whose failures make the groups.
        groups_per_transform: the largest failure groups of each transform (``null``: all).
        min_group_size: a (transform, class) needs this many failures to be a group.
        edits_per_group: edit sets per group (disjoint, from the group's start).
        images_per_edit: images edited together in one round (1: Where-to-Edit's protocol).
        sensitive_gap: locality images with top-2 probability gap below it form the sensitive subset.
        split_seed: the digits' train / held-out split.
        edits: a file of edit images (:func:`load_edit_file`): one round with all of them, no
            groups (what ``blueedit edit --edits FILE`` sets).
    """

    def __init__(self, transforms: list[str] = list(TRANSFORMS), groups_per_transform: int | None = 3,
                 min_group_size: int = 4, edits_per_group: int = 4, images_per_edit: int = 1,
                 sensitive_gap: float = 0.5, split_seed: int = 0, edits: str | None = None) -> None:
        super().__init__()
        bad = [t for t in transforms if t not in TRANSFORMS]
        if bad:
            raise UserInputError(f"data.transforms {bad} are not among {', '.join(TRANSFORMS)}")
        for name, value in (("min_group_size", min_group_size), ("edits_per_group", edits_per_group),
                            ("images_per_edit", images_per_edit)):
            if value < 1:
                raise UserInputError(f"data.{name} must be >= 1, got {value}")
        if images_per_edit >= min_group_size:
            raise UserInputError(f"data.images_per_edit {images_per_edit} must be below data.min_group_size "
                             f"{min_group_size} (a group needs images left over for GR)")
        self.transforms = list(transforms)
        self.groups_per_transform = groups_per_transform
        self.min_group_size = min_group_size
        self.edits_per_group = edits_per_group
        self.images_per_edit = images_per_edit
        self.sensitive_gap = sensitive_gap
        self.split_seed = split_seed
        self.edits = edits
        self.split = None
        self.bed: Bed | None = None
        self._file: dict[str, torch.Tensor] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.edits is not None and self._file is None:
            self._file = load_edit_file(self.edits)
        if self.split is None:
            self.split = load_digits_split(seed=self.split_seed)

    def build(self, module) -> Bed:
        """The bed of the base model of ``module`` (a
        :class:`~blueedit.vision.module.VisionEditingModule`: its failures make the groups, with
        no edit in place, also when resuming); built once."""
        if self.bed is None:
            self.setup()
            config = module.vit.config
            if (getattr(config, "image_size", None), getattr(config, "num_channels", None)) != (8, 1):
                raise UserInputError(f"the digits bed needs a ViT of 8x8 one-channel images ({module.model_spec.name_or_path} "
                                 f"takes {config.image_size}x{config.image_size}x{config.num_channels}): give "
                                 "'unrelated' and 'locality' images in the --edits file")
            with module.hooks_cleared():
                self.bed = build_bed(module.vit, self.split, tuple(self.transforms), self.min_group_size,
                                     self.groups_per_transform, self.sensitive_gap)
        return self.bed

    def rounds(self, module) -> list[VisionEdit]:
        if self._file is not None:
            return [VisionEdit(0, self._file["images"], self._file["labels"])]
        bed = self.build(module)
        out = []
        k = self.images_per_edit
        for gi, g in enumerate(bed.groups):
            for start in range(0, min(len(g.y) - k, self.edits_per_group * k - 1) + 1, k):
                if len([e for e in out if e.group == gi]) == self.edits_per_group:
                    break
                edited = torch.zeros(len(g.y), dtype=torch.bool)
                edited[start:start + k] = True
                out.append(VisionEdit(len(out), g.x[start:start + k], g.y[start:start + k], gi, edited))
        return out

    def unrelated(self, module) -> torch.Tensor:
        """``U``: the file's ``unrelated`` images, else the bed's training images."""
        if self._file is not None and "unrelated" in self._file:
            return self._file["unrelated"]
        return self.build(module).unrelated_x

    def locality(self, module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The locality images and their sensitive subset (None for a file's ``locality``)."""
        if self._file is not None and "locality" in self._file:
            return self._file["locality"], None
        bed = self.build(module)
        return bed.locality_x, bed.sensitive

    def group(self, index: int) -> Group | None:
        return None if index < 0 or self.bed is None else self.bed.groups[index]

    def train_dataloader(self) -> RoundLoader:
        return RoundLoader(EditSetDataset(self.rounds(self.trainer.lightning_module)))
