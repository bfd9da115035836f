"""The retention matrix of a ``fit`` run, from the evaluations of ``SequenceEvaluation``."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from blueedit.callbacks.sequence import SequenceEvaluation
from blueedit.evaluation.retention import retention_from_history, write_retention

__all__ = ["RetentionMatrix"]


class RetentionMatrix(L.Callback):
    """After the last round, write the retention matrix of each metric in ``metrics`` that the
    run's :class:`~blueedit.callbacks.sequence.SequenceEvaluation` measured per record
    (``docs/algorithms.md``, "Retention matrix"): ``retention_<metric>.csv``,
    ``retention_<metric>_forgetting.csv`` and ``retention_<metric>.png`` in the run's log
    directory. The evaluation times are those of ``SequenceEvaluation`` (``every_n_edits``: one
    row per evaluation).

    YAML::

        trainer:
          callbacks:
            - class_path: blueedit.callbacks.sequence.SequenceEvaluation
              init_args: {every_n_edits: 50}
            - blueedit.callbacks.retention.RetentionMatrix

    Args:
        metrics: per-record metrics to build a matrix of (those not measured are skipped).
    """

    def __init__(self, metrics: list[str] = ("efficacy", "efficacy_wild")) -> None:
        self.metrics = list(metrics)
        #: the matrices written, by metric
        self.matrices: dict = {}

    @staticmethod
    def _sequence(trainer) -> SequenceEvaluation:
        for cb in trainer.callbacks:
            if isinstance(cb, SequenceEvaluation):
                return cb
        raise RuntimeError("RetentionMatrix needs a SequenceEvaluation callback (its evaluations are the rows)")

    def on_fit_start(self, trainer, pl_module) -> None:
        self._sequence(trainer)  # fail before editing, not after it

    def on_train_end(self, trainer, pl_module) -> None:
        seq = self._sequence(trainer)
        dm = trainer.datamodule
        first = getattr(pl_module, "carried_rounds", 0)
        for metric in self.metrics:
            r = retention_from_history(seq.history, dm.edits_per_round, metric, first_round=first)
            if r is not None:
                self.matrices[metric] = r
        self._write(Path(trainer.log_dir or trainer.default_root_dir))

    @rank_zero_only
    def _write(self, out_dir: Path) -> None:
        for metric, r in self.matrices.items():
            paths = write_retention(r, out_dir, f"retention_{metric}", f"retention of {metric}")
            print(f"retention matrix of {metric} written to {paths[-1]}")
