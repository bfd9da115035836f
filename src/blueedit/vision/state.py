"""An edited ViT on disk: the unchanged model (``save_pretrained``) plus its edit state, with a
loader and ``revert``.

RefineViT never writes a weight: an edit is the removed heads (an ``[L, H]`` mask), ``P`` and the
mean-ablation references, applied by hooks (:class:`~blueedit.vision.heads.EditHooks`). A saved
directory holds

- the model's own files (``config.json``, ``model.safetensors``): the base model, bit for bit;
- ``refinevit.safetensors``: ``mask`` (uint8 ``[L, H]``), and ``projection`` / ``means`` when present;
- ``refinevit.json``: the base model, the method's settings and the edit rounds (groups, images).

``load_edited`` rebuilds the model with the hooks in place; ``revert`` removes the state, leaving
the base model. Directories are written beside the target and renamed into place.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from blueedit.vision.heads import EditHooks
from blueedit.vision.refine import EditState
from blueedit.vision.vit import ViTAdapter

STATE_FILE = "refinevit.safetensors"
RECORD_FILE = "refinevit.json"


class VisionStateError(ValueError):
    """A directory does not hold an edited ViT as :func:`save_edited` writes it."""


def is_edited_vit(directory: str | Path) -> bool:
    return (Path(directory) / STATE_FILE).is_file()


def state_tensors(state: EditState) -> dict[str, torch.Tensor]:
    out = {"mask": state.mask.to(torch.uint8).contiguous()}
    if state.projection is not None:
        out["projection"] = state.projection.detach().contiguous()
    if state.means is not None:
        out["means"] = state.means.detach().contiguous()
    return out


def _write_atomically(out: Path, write, overwrite: bool) -> Path:
    from blueedit.carry import replace_directory
    from blueedit.cli import check_output_dir

    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir()
        write(tmp)
        if out.exists():
            replace_directory(tmp, out)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def save_edited(model, state: EditState, output: str | Path, record: dict[str, Any], overwrite: bool = False) -> Path:
    """Write ``model`` (its weights untouched by the edit), ``state`` and ``record`` to ``output``."""
    from safetensors.torch import save_file

    ViTAdapter.of(model)  # a ViT classifier, or a clear error before anything is written

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        save_file(state_tensors(state), str(tmp / STATE_FILE))
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1, default=str))

    return _write_atomically(Path(output).expanduser().absolute(), write, overwrite)


def read_state(directory: str | Path) -> tuple[EditState, dict[str, Any]]:
    from safetensors.torch import load_file

    directory = Path(directory)
    if not is_edited_vit(directory):
        raise VisionStateError(f"{directory} holds no {STATE_FILE}: not an edited ViT")
    t = load_file(str(directory / STATE_FILE))
    record = json.loads((directory / RECORD_FILE).read_text()) if (directory / RECORD_FILE).is_file() else {}
    return EditState(t["mask"].bool(), t.get("projection"), t.get("means")), record


def apply_state(hooks: EditHooks, state: EditState) -> None:
    a = hooks.adapter
    if tuple(state.mask.shape) != (a.num_layers, a.num_heads):
        raise VisionStateError(f"head mask of shape {tuple(state.mask.shape)} does not fit the model's "
                               f"{a.num_layers} blocks x {a.num_heads} heads")
    if state.projection is not None and tuple(state.projection.shape) != (a.hidden_size, a.hidden_size):
        raise VisionStateError(f"P of shape {tuple(state.projection.shape)} does not fit d = {a.hidden_size}")
    hooks.mask, hooks.projection, hooks.means = state.mask.bool(), state.projection, state.means


def load_edited(directory: str | Path):
    """``(model, hooks)``: the saved ViT in eval mode with its edit applied by ``hooks``
    (``hooks.remove()`` gives the base model back)."""
    from transformers import ViTForImageClassification

    state, _ = read_state(directory)
    model = ViTForImageClassification.from_pretrained(directory).eval()
    hooks = EditHooks(ViTAdapter.of(model))
    apply_state(hooks, state)
    return model, hooks


def revert(directory: str | Path) -> Path:
    """Remove the edit state of ``directory`` (in place, by a swap): it then holds the base model."""
    from blueedit.carry import replace_directory

    directory = Path(directory).expanduser().absolute()
    read_state(directory)  # an edited ViT, or a clear error
    tmp = directory.with_name(f".{directory.name}.revert-{uuid.uuid4().hex[:8]}")
    try:
        shutil.copytree(directory, tmp, ignore=shutil.ignore_patterns(STATE_FILE, RECORD_FILE))
        replace_directory(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def revert_main(argv: list[str]) -> None:
    """``blueedit revert DIR`` on an edited ViT: its one edit state (the last round's) is removed."""
    import argparse

    parser = argparse.ArgumentParser(prog="blueedit revert", exit_on_error=False,
                                     description="Remove the edit (head mask and P) of an edited ViT directory.")
    parser.add_argument("directory")
    parser.add_argument("--rounds", type=int, default=1, help="must be 1: the directory holds one edit")
    args = parser.parse_args(argv)
    if args.rounds != 1:
        raise VisionStateError(f"--rounds {args.rounds}: an edited ViT holds one edit (its rounds start from the "
                               "base model); revert 1")
    print(f"reverted: {revert(args.directory)} holds the base ViT")
