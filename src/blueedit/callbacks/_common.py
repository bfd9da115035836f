"""Helpers shared by the diagnostic callbacks."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only


def loggable(metrics: dict[str, Any]) -> dict[str, float]:
    """Finite-or-nan floats only (drops non-numeric values)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool):
            v = float(v)
        if isinstance(v, (int, float)):
            out[k] = float(v)
        elif isinstance(v, torch.Tensor) and v.numel() == 1:
            out[k] = float(v.item())
    return out


@rank_zero_only
def log_to_loggers(trainer, metrics: dict[str, Any], step: int | None = None) -> None:
    """Write ``metrics`` straight to every logger of ``trainer`` at ``step`` (default: the global
    step), on rank zero. Works from any hook, including ``on_train_start`` / ``on_train_end`` where
    ``LightningModule.log`` is not allowed."""
    if trainer is None:
        return
    values = loggable(metrics)
    if not values:
        return
    step = trainer.global_step if step is None else step
    for logger in trainer.loggers:
        logger.log_metrics(values, step=step)


def evaluation_context(pl_module):
    """The editor's evaluation weights (PRUNE restrained) when there is an editor, else nothing."""
    editor = getattr(pl_module, "editor", None)
    if editor is not None:
        return editor.evaluation_weights()
    return contextlib.nullcontext()


def resolve_data_dir(trainer, pl_module) -> Path | None:
    """``pl_module.data_dir``, else the datamodule's ``resolved_data_dir``."""
    d = getattr(pl_module, "data_dir", None)
    if d is None and trainer is not None:
        dm = getattr(trainer, "datamodule", None)
        d = getattr(dm, "resolved_data_dir", None) if dm is not None else None
    return Path(d).expanduser() if d else None


def is_nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)
