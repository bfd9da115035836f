"""Health-gated rounds: a round that makes the model sick is undone, and its edits are refused.

After every round a cheap health signal is compared with its value on the unedited model (or
the first round):

- ``perplexity``: ``ratio = PPL_t / PPL_0``, the perplexity of a fixed set of text chunks after
  round ``t`` over the unedited model's (``texts``, else the first ``num_texts`` chunks of
  ``corpus`` in the data directory);
- ``update_norm``: ``ratio = ‖ΔW_t‖ / ‖ΔW_a‖`` with ``‖ΔW‖ = sqrt(Σ_l ‖ΔW^l‖_F²)`` the round's
  whole update and ``a`` the first accepted round (which is never refused by this signal).

When ``ratio > max_ratio`` the round is undone exactly (:func:`blueedit.carry.refuse_last_round`:
the weights and edit history are rebuilt from ``W_0`` and the other rounds' stored factors, the
round stays as an empty one) and its records are refused: logged, listed in :attr:`refused` and
in ``refused_edits.json`` in the run's log directory; editing goes on with the next round. The
records of a refused round are still evaluated (``SequenceEvaluation`` scores every record of
the stream), so nothing is silently dropped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from blueedit import carry
from blueedit.callbacks._common import evaluation_context, log_to_loggers, resolve_data_dir
from blueedit.config import UserInputError, check_choice

__all__ = ["HealthGate", "HealthSignal", "crosses"]

HealthSignal = Literal["perplexity", "update_norm"]


def crosses(value: float, reference: float, max_ratio: float) -> tuple[bool, float]:
    """``(value / reference > max_ratio, value / reference)``; a non-finite value always crosses."""
    ratio = value / reference if reference > 0 else math.inf
    return (not math.isfinite(ratio)) or ratio > max_ratio, ratio


class HealthGate(L.Callback):
    """Undo (refuse) a round whose health signal crosses ``max_ratio``; off unless configured.

    YAML::

        trainer:
          callbacks:
            - class_path: blueedit.callbacks.health.HealthGate
              init_args: {signal: perplexity, max_ratio: 1.5, num_texts: 10}

    It acts before every other callback's end-of-round hook (it moves itself first), so
    evaluations and checkpoints see the round undone. Not for WISE (no per-round factors) nor
    HSE's Fisher penalty (its Fisher sum is not kept per round): refused before editing starts.

    Args:
        signal: ``perplexity`` or ``update_norm``.
        max_ratio: the largest accepted ratio to the reference (> 0).
        num_texts, max_length, corpus, texts: the perplexity chunks (``texts`` given: those).
    """

    def __init__(self, signal: HealthSignal = "perplexity", max_ratio: float = 1.5, num_texts: int = 10,
                 max_length: int = 128, corpus: str = "wikitext-2", texts: list[str] | None = None) -> None:
        check_choice("HealthGate signal", signal, HealthSignal)
        if not max_ratio > 0:
            raise UserInputError(f"HealthGate max_ratio must be > 0, got {max_ratio}")
        if num_texts < 1 or max_length < 2:
            raise UserInputError("HealthGate num_texts must be >= 1 and max_length >= 2")
        self.signal, self.max_ratio = signal, float(max_ratio)
        self.num_texts, self.max_length, self.corpus = num_texts, max_length, corpus
        self.texts = list(texts) if texts is not None else None
        self.reference: float | None = None
        #: one entry per checked round: ``{"round", "value", "ratio", "refused"}``
        self.history: list[dict[str, Any]] = []
        #: one entry per refused round: ``{"round", "case_ids", "signal", "value", "ratio", "max_ratio", "reason"}``
        self.refused: list[dict[str, Any]] = []

    # -- the signal ------------------------------------------------------------------------------
    def _texts(self, trainer, pl_module) -> list[str]:
        if self.texts is None:
            from blueedit.data.corpus import load_corpus_texts

            self.texts = load_corpus_texts(self.corpus, data_dir=resolve_data_dir(trainer, pl_module),
                                           num_samples=self.num_texts)
        return self.texts

    @torch.no_grad()
    def _perplexity(self, trainer, pl_module) -> float:
        from blueedit.evaluation.general import perplexity

        with evaluation_context(pl_module):
            return perplexity(pl_module.lm, pl_module.tokenizer, self._texts(trainer, pl_module),
                              max_length=self.max_length)

    # -- hooks -----------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        from blueedit.methods.registry import get_method

        hp = getattr(pl_module, "hp", None)
        if hp is not None and not get_method(hp.method).least_squares:
            raise UserInputError(f"HealthGate cannot undo a {hp.method} round (it writes no per-round factors of "
                                 "W_out); remove the callback")
        if hp is not None and hp.target.fisher_weight > 0:
            raise UserInputError("HealthGate cannot undo a round under HSE's Fisher penalty (editing.target."
                                 "fisher_weight > 0: its Fisher sum is not kept per round); remove the callback or "
                                 "the penalty")
        if self in trainer.callbacks:  # act before the evaluations and checkpoints of the round
            trainer.callbacks.remove(self)
            trainer.callbacks.insert(0, self)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.signal == "perplexity" and self.reference is None:
            self.reference = self._perplexity(trainer, pl_module)
            pl_module.print(f"[health] perplexity before editing: {self.reference:.2f}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        index = getattr(batch, "index", batch_idx)
        editor = pl_module.editor
        if editor is None or editor.state.rounds_done != index + 1 or any(h["round"] == index for h in self.history):
            return  # not applied in this step (a replayed round after a resume), or already checked
        report = next((r for r in reversed(pl_module.reports) if r.index == index), None)
        if self.signal == "perplexity":
            value = self._perplexity(trainer, pl_module)
        else:
            value = math.sqrt(sum(n * n for n in (report.update_norms.values() if report is not None else [])))
        if self.reference is None:  # update_norm: the first applied round is the reference, accepted
            self.reference = value
            refused, ratio = False, 1.0
        else:
            refused, ratio = crosses(value, self.reference, self.max_ratio)
        self.history.append({"round": index, "value": value, "ratio": ratio, "refused": refused})
        log_to_loggers(trainer, {f"health/{self.signal}": value, "health/ratio": ratio, "health/refused": refused})
        if not refused:
            return
        carry.refuse_last_round(editor.state, pl_module.adapter)
        case_ids = list(report.case_ids) if report is not None else []
        reason = (f"{self.signal} {value:.4g} is {ratio:.3g} x the reference {self.reference:.4g} "
                  f"(max_ratio {self.max_ratio:g})")
        self.refused.append({"round": index, "case_ids": case_ids, "signal": self.signal, "value": value,
                             "ratio": ratio, "max_ratio": self.max_ratio, "reason": reason})
        pl_module.print(f"[health] round {index} refused and undone ({len(case_ids)} edits): {reason}")

    def on_train_end(self, trainer, pl_module) -> None:
        self._write(Path(trainer.log_dir or trainer.default_root_dir))

    @rank_zero_only
    def _write(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        payload = {"signal": self.signal, "max_ratio": self.max_ratio, "reference": self.reference,
                   "refused": self.refused, "checked": self.history,
                   "refused_case_ids": [c for r in self.refused for c in r["case_ids"]]}
        (out_dir / "refused_edits.json").write_text(json.dumps(payload, indent=1, default=str))

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "history": self.history, "refused": self.refused}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reference = state_dict.get("reference")
        self.history = list(state_dict.get("history", []))
        self.refused = list(state_dict.get("refused", []))
