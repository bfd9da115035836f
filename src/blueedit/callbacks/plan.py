"""The plan of an editing run, printed before its first round, with a time estimate after it.

A sequential run can take hours (1,000 rounds of a few tens of seconds each); the plan says what
was asked for before anything is edited: records, edits per round, rounds. After the first round
the estimate of the whole run is printed from that round's measured time:

    plan: 1000 edit records in 100 rounds of 10 edits (memit + boundary)
    round 1 of 100 took 41.0 s: the remaining 99 rounds take about 1 h 8 min (estimated from round 1)

``blueedit fit`` / ``edit`` add :class:`EditPlan` to the trainer's callbacks.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

__all__ = ["EditPlan", "describe_duration", "describe_estimate", "describe_plan"]


def describe_duration(seconds: float) -> str:
    """``seconds`` in words people read at a glance: ``45 s``, ``12 min 5 s``, ``3 h 20 min``."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"a duration must be finite and >= 0, got {seconds!r}")
    s = round(seconds)
    if s < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def describe_plan(records: int, rounds: int, per_round: int, method: str | None = None) -> str:
    """The line printed before the first round."""
    what = f" ({method})" if method else ""
    return f"plan: {records} edit records in {rounds} rounds of {per_round} edits{what}"


def describe_estimate(done: int, rounds: int, seconds: float) -> str:
    """The line printed after round ``done`` (counted from 1) of ``rounds`` took ``seconds``: the
    rest of the run at that pace, ``(rounds - done) * seconds``."""
    left = rounds - done
    head = f"round {done} of {rounds} took {describe_duration(seconds)}"
    if left <= 0:
        return head
    return (f"{head}: the remaining {left} rounds take about {describe_duration(left * seconds)} "
            f"(estimated from round {done})")


class EditPlan(L.Callback):
    """Print :func:`describe_plan` when training starts and :func:`describe_estimate` after the
    first round this run applies (rank zero only)."""

    def __init__(self) -> None:
        self._started: float | None = None
        self._estimated = False

    @rank_zero_only
    def on_train_start(self, trainer, pl_module) -> None:
        dm = getattr(trainer, "datamodule", None)
        requests = getattr(dm, "requests", None)
        per_round = getattr(dm, "edits_per_round", None)
        if requests is None or not per_round:
            return
        hp = getattr(pl_module, "hp", None)
        method = f"{hp.method} + {hp.strategy}" if hp is not None else None
        print(describe_plan(len(requests), math.ceil(len(requests) / per_round), per_round, method), flush=True)

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        if not self._estimated:
            self._started = time.perf_counter()

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        if self._estimated or self._started is None:
            return
        self._estimated = True
        rounds = trainer.num_training_batches
        if isinstance(rounds, int) and rounds > 0:
            print(describe_estimate(batch_idx + 1, rounds, time.perf_counter() - self._started), flush=True)
