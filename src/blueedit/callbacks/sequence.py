"""Editing metrics of every record edited so far, measured along a long edit sequence.

After the round that brings the number of edited records ``n`` past a multiple of
``every_n_edits`` (and after the last round), the model as it is then is evaluated on the first
``n`` records of the data module, in editing order (requests ``[0, n)``): efficacy,
generalization and specificity (plus the probability margins on CounterFact) from
:func:`blueedit.evaluation.editing_metrics.evaluate_requests`, through
:meth:`blueedit.module.EditingModule.run_evaluation` (PRUNE's restrained weights, sharded under
DDP). This is the long-sequence protocol of ``docs/algorithms.md``: a metric at ``n`` edits says
how well the model still holds all ``n`` edits, not only the last round's. With the module's
``wild_metrics`` each evaluation also has the in-the-wild metrics, ``locality_wild`` against the
unedited model's answers of the evaluation before editing (``evaluate_pre``).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L

from blueedit.callbacks._common import log_to_loggers
from blueedit.config import UserInputError
from blueedit.evaluation.editing_metrics import record_values
from blueedit.evaluation.wild import add_wild_locality, wild_summary, wild_values

__all__ = ["SequenceEvaluation", "checkpoints_in_round"]


def checkpoints_in_round(round_index: int, edits_per_round: int, num_edits: int, every_n_edits: int) -> bool:
    """Whether round ``round_index`` (0-based) ends an evaluation interval.

    With ``a = round_index * edits_per_round`` records edited before the round and
    ``b = min(a + edits_per_round, num_edits)`` after it, it does when ``⌊b / K⌋ > ⌊a / K⌋``
    (``K = every_n_edits``: the round crosses a multiple of ``K``) or when ``b = num_edits``.
    """
    before = round_index * edits_per_round
    after = min(before + edits_per_round, num_edits)
    return after // every_n_edits > before // every_n_edits or after >= num_edits


class SequenceEvaluation(L.Callback):
    """Evaluate all records edited so far every ``every_n_edits`` edits.

    Logged through the Trainer's loggers at the step of the round as ``sequence/<metric>`` and
    ``sequence/edits``. :attr:`history` holds one entry per evaluation: ``{"edits": n, "round":
    i, "num_records": n, "kind": ..., "metrics": {...}, "records": [...]}``, where ``records``
    holds each evaluated record's own values (``case_id`` and the per-record values of
    :func:`blueedit.evaluation.editing_metrics.record_values`), for paired comparisons of two runs
    on the same records; with ``evaluate_pre`` the first entry
    (``edits`` 0, ``round`` -1) is the unedited model on *all* the records that will be edited.
    The history is saved in checkpoints (``state_dict``), so a resumed run continues the curve.

    YAML::

        trainer:
          callbacks:
            - class_path: blueedit.callbacks.sequence.SequenceEvaluation
              init_args: {every_n_edits: 100}

    Args:
        every_n_edits: evaluate after the rounds that cross a multiple of this number of edits,
            and after the last round.
        evaluate_pre: also evaluate all records on the unedited model before the first round.
    """

    def __init__(self, every_n_edits: int = 100, evaluate_pre: bool = True) -> None:
        if isinstance(every_n_edits, bool) or not isinstance(every_n_edits, int) or every_n_edits < 1:
            raise UserInputError(f"every_n_edits must be an integer >= 1, got {every_n_edits!r}")
        self.every_n_edits = every_n_edits
        self.evaluate_pre = evaluate_pre
        self.history: list[dict[str, Any]] = []
        #: the unedited model's in-the-wild neighborhood answers, by case id (``locality_wild``)
        self.pre_answers: list[dict[str, Any]] = []

    @staticmethod
    def _datamodule(trainer):
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "requests") or not hasattr(dm, "edits_per_round"):
            raise RuntimeError("SequenceEvaluation needs the EditDataModule (trainer.fit(..., datamodule=...))")
        return dm

    def _evaluate(self, trainer, pl_module, num_edited: int, round_index: int) -> None:
        dm = self._datamodule(trainer)
        requests = list(dm.requests) if round_index < 0 else list(dm.requests[:num_edited])
        res = pl_module.run_evaluation(requests)  # a collective under DDP: every rank calls it
        if round_index < 0:
            self.pre_answers = [{"case_id": r.get("case_id"), "answers_neighborhood": r["answers_neighborhood"]}
                                for r in res.records if "answers_neighborhood" in r]
        elif self.pre_answers:
            add_wild_locality(res.records, self.pre_answers)
            res.metrics.update(wild_summary(res.records))
        entry = {"edits": num_edited, "round": round_index, "num_records": len(requests), "kind": res.kind,
                 "metrics": {k: float(v) for k, v in res.metrics.items()},
                 "records": [{"case_id": rec.get("case_id"), **record_values(rec, res.kind), **wild_values(rec)}
                             for rec in res.records]}
        self.history.append(entry)
        logs = {f"sequence/{k}": v for k, v in entry["metrics"].items() if not math.isnan(v)}
        logs["sequence/edits"] = float(num_edited)
        log_to_loggers(trainer, logs)
        shown = ", ".join(f"{k} {entry['metrics'][k]:.2f}" for k in ("efficacy", "generalization", "specificity")
                          if k in entry["metrics"])
        what = "before editing, all records" if round_index < 0 else f"after round {round_index}"
        pl_module.print(f"[sequence] {num_edited} edits ({what}, {len(requests)} records): {shown}")

    def on_train_start(self, trainer, pl_module) -> None:
        self._datamodule(trainer)
        if self.evaluate_pre and not any(h["round"] == -1 for h in self.history):
            self._evaluate(trainer, pl_module, 0, -1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        dm = self._datamodule(trainer)
        index = getattr(batch, "index", batch_idx)
        editor = getattr(pl_module, "editor", None)
        if editor is not None and editor.state.rounds_done != index + 1:
            return  # the round was not applied in this step (a replayed round after a resume)
        if any(h["round"] == index for h in self.history):
            return
        n, k = len(dm.requests), dm.edits_per_round
        if checkpoints_in_round(index, k, n, self.every_n_edits):
            self._evaluate(trainer, pl_module, min((index + 1) * k, n), index)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "every_n_edits": self.every_n_edits, "pre_answers": self.pre_answers}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.pre_answers = list(state_dict.get("pre_answers", []))

    def curve(self, metric: str) -> list[tuple[int, float]]:
        """``(edits, value)`` of ``metric`` for every evaluation after editing began."""
        return [(h["edits"], h["metrics"].get(metric, float("nan"))) for h in self.history if h["round"] >= 0]
