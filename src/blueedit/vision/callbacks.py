"""SR / GR / LR after every vision editing round, and their means at the end of the run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback

from blueedit.callbacks._common import log_to_loggers
from blueedit.vision.digits import predict
from blueedit.vision.metrics import edit_metrics, success_rate


class SubpopulationMetrics(Callback):
    """After round ``i`` (its edit in place), log ``edit/sr``, ``edit/gr``, ``edit/lr`` and
    ``edit/lr_sensitive`` (the data module's group and locality set); at the end, their means over
    the rounds go to the loggers and to ``<log dir>/vision_metrics.json``. Rounds from a file
    (no group) report SR and LR (on the file's locality images, else the bed's)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self._base: torch.Tensor | None = None

    def _locality_before(self, trainer, pl_module) -> torch.Tensor:
        if self._base is None:  # the base model's predictions: no edit in place
            x, _ = trainer.datamodule.locality(pl_module)
            with pl_module.hooks_cleared():
                self._base = predict(pl_module.vit, x)
        return self._base

    def on_train_start(self, trainer, pl_module) -> None:
        self._locality_before(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.last_round != batch.index:  # skipped (already done before a resume)
            return
        dm = trainer.datamodule
        loc_x, sensitive = dm.locality(pl_module)
        base = self._locality_before(trainer, pl_module)
        group = dm.group(batch.group)
        if group is not None:
            m = edit_metrics(pl_module.vit, group.x, group.y, batch.edited, loc_x, base, sensitive)
            name = group.name
        else:
            with torch.no_grad():
                pred = predict(pl_module.vit, batch.x)
            m = {"sr": success_rate(pred, batch.y), **{k: v for k, v in edit_metrics(
                pl_module.vit, batch.x, batch.y, torch.ones(len(batch.y), dtype=torch.bool), loc_x, base,
                sensitive).items() if k.startswith("lr")}}
            name = "file"
        self.rows.append({"round": batch.index, "group": name, "images": len(batch.y), **m})
        log_to_loggers(trainer, {f"edit/{k}": v for k, v in m.items()}, step=batch.index)

    def summary(self) -> dict[str, float]:
        out = {}
        for key in ("sr", "gr", "lr", "lr_sensitive"):
            vals = [r[key] for r in self.rows if key in r and not math.isnan(r[key])]
            if vals:
                out[key] = sum(vals) / len(vals)
        out["rounds"] = len(self.rows)
        return out

    def on_train_end(self, trainer, pl_module) -> None:
        summary = self.summary()
        log_to_loggers(trainer, {f"edit/mean_{k}": v for k, v in summary.items()})
        if trainer.is_global_zero:
            out = Path(trainer.log_dir or trainer.default_root_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "vision_metrics.json").write_text(json.dumps({"mean": summary, "rounds": self.rows}, indent=1))
            shown = " / ".join(f"{100 * summary[k]:.1f}" if k in summary else "n/a" for k in ("sr", "gr", "lr"))
            print(f"SR / GR / LR (mean over {summary['rounds']} rounds): {shown}")

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict.get("rows", []))
