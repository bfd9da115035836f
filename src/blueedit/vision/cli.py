"""``blueedit fit`` / ``edit`` for the vision track: LightningCLI over
:class:`~blueedit.vision.module.VisionEditingModule` and
:class:`~blueedit.vision.datamodule.DigitsEditDataModule`.

:func:`blueedit.cli.run_cli` hands a command over when its config's ``model.class_path`` names a
class of ``blueedit.vision`` (:func:`is_vision_command`), so ``blueedit fit --config
configs/vit-digits/refinevit.yaml`` runs here and every language-model config is unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI

from blueedit.vision.datamodule import DigitsEditDataModule
from blueedit.vision.module import VisionEditingModule

PACKAGE = "blueedit.vision."


def _config_paths(args: list[str]) -> list[str]:
    out = []
    for i, a in enumerate(args):
        if a in ("--config", "-c") and i + 1 < len(args):
            out.append(args[i + 1])
        elif a.startswith("--config="):
            out.append(a.split("=", 1)[1])
    return out


def is_vision_command(args: list[str]) -> bool:
    """Whether a config given by ``--config`` names a ``blueedit.vision`` model class."""
    for path in _config_paths(args):
        try:
            cfg = yaml.safe_load(Path(path).expanduser().read_text())
        except (OSError, yaml.YAMLError):
            continue  # LightningCLI reports an unreadable config
        model = cfg.get("model") if isinstance(cfg, dict) else None
        if isinstance(model, dict) and str(model.get("class_path", "")).startswith(PACKAGE):
            return True
    return False


class VisionTrainer(Trainer):
    """A Trainer with an ``edit`` entry point for ViTs (its signature defines ``blueedit edit``'s options)."""

    def edit(self, model: VisionEditingModule, edits: str, output: str,
             datamodule: DigitsEditDataModule | None = None, ckpt_path: str | None = None,
             overwrite: bool = False) -> Path:
        """Edit the ViT on the images in ``edits`` (``torch.save`` of ``{"images", "labels"}``, one
        round with all of them) and save it to ``output``: the unchanged model, the head mask and
        ``P`` (:mod:`blueedit.vision.state`; load with ``load_edited``, undo with ``blueedit revert``).

        Args:
            model: the editing module.
            edits: the edit images and labels.
            output: directory for the edited model; written beside it and renamed into place.
            datamodule: its ``edits`` is replaced by ``edits``.
            ckpt_path: resume from this checkpoint.
            overwrite: replace ``output`` when it already holds a model.
        """
        from blueedit.cli import check_output_dir

        check_output_dir(output, overwrite)
        dm = datamodule or DigitsEditDataModule()
        dm.edits, dm._file = edits, None
        dm.setup("fit")  # the file is read and checked before any editing
        self.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        if self.is_global_zero:
            labels = dm._file["labels"]
            rounds = [{"index": 0, "images": len(labels), "labels": labels.tolist(), "edits": str(edits)}]
            model.save(output, rounds, overwrite=overwrite)
        self.strategy.barrier("blueedit-vision-edit-saved")
        return Path(output)


class VisionCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        commands = LightningCLI.subcommands()
        for name in ("predict", "validate", "test"):  # editing rounds only: nothing to predict or validate
            commands.pop(name, None)
        commands["edit"] = {"model", "datamodule"}
        return commands


def run_vision_cli(args: list[str] | None, run: bool = True, **kwargs: Any) -> VisionCLI:
    return VisionCLI(VisionEditingModule, DigitsEditDataModule, subclass_mode_model=True, subclass_mode_data=True,
                     auto_configure_optimizers=False, trainer_class=VisionTrainer, args=args, run=run, **kwargs)
