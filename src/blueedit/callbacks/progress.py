"""Per-round progress (running efficacy) and periodic general-capability evaluation."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from blueedit.callbacks._common import evaluation_context, log_to_loggers, resolve_data_dir
from blueedit.config import UserInputError
from blueedit.data.corpus import CorpusUnavailable, load_corpus_texts
from blueedit.evaluation.editing_metrics import evaluate_requests
from blueedit.evaluation.general import DEFAULT_TASKS, TASKS, evaluate_general, perplexity

log = logging.getLogger(__name__)

__all__ = ["EditProgress", "GeneralCapability", "RoundProgressBar"]


class RoundProgressBar(TQDMProgressBar):
    """The training bar of an editing run: it counts rounds (``editing rounds 1/2``), shows the
    metrics logged with ``prog_bar=True`` (edits done, the target loss, ``eff`` with
    :class:`EditProgress`) without Lightning's version number, and, during a round, the target
    optimization's layer, step and loss. ``blueedit`` uses it unless the progress bar is off."""

    def init_train_tqdm(self):
        bar = super().init_train_tqdm()
        bar.unit = "round"
        return bar

    def on_train_epoch_start(self, trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description("editing rounds")

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        if isinstance(items.get("edits"), float):
            items["edits"] = int(items["edits"])
        return items

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        editor = getattr(pl_module, "editor", None)
        if editor is not None and not self.is_disabled:
            shown = lambda: self.get_metrics(trainer, pl_module)  # noqa: E731
            editor.on_target_step = lambda layer, step, loss: self.train_progress_bar.set_postfix(
                {**shown(), "z": f"layer {layer} step {step + 1} loss {loss:.3f}"})

    def on_train_end(self, trainer, pl_module) -> None:
        editor = getattr(pl_module, "editor", None)
        if editor is not None:
            editor.on_target_step = None
        super().on_train_end(trainer, pl_module)


class EditProgress(L.Callback):
    """Per round: seconds, update norm per written layer, edits done, and (``running_efficacy``)
    the efficacy of the round's own records evaluated right after the round.

    Logged as ``progress/seconds``, ``progress/edits_done``, ``progress/update_norm/layer<l>``,
    ``progress/efficacy`` (also ``progress/generalization``, ``progress/specificity``, which the
    same evaluation gives); ``edits`` and ``eff`` are shown on the progress bar. :attr:`history`
    holds one dict per round (``round``, ``seconds``, ``edits_done``, ``update_norms``,
    ``efficacy``, ...).

    YAML::

        trainer:
          callbacks:
            - class_path: blueedit.callbacks.progress.EditProgress
              init_args: {running_efficacy: true}
    """

    def __init__(self, running_efficacy: bool = True) -> None:
        self.running_efficacy = running_efficacy
        self.history: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        reports = getattr(pl_module, "reports", [])
        index = getattr(batch, "index", batch_idx)
        if not reports or reports[-1].index != index:
            return  # nothing applied this step (resumed run)
        report = reports[-1]
        edits_done = sum(len(r.case_ids) for r in reports)
        entry: dict[str, Any] = {"round": index, "seconds": report.seconds, "edits_done": edits_done,
                                 "update_norms": dict(report.update_norms)}
        logs = {"progress/seconds": report.seconds, "progress/edits_done": float(edits_done)}
        for l, n in report.update_norms.items():
            logs[f"progress/update_norm/layer{l}"] = n
        if self.running_efficacy and getattr(batch, "requests", None):
            with torch.no_grad(), evaluation_context(pl_module):
                res = evaluate_requests(pl_module.lm, pl_module.tokenizer, list(batch.requests),
                                        batch_size=getattr(pl_module, "eval_batch_size", 32))
            for k in ("efficacy", "generalization", "specificity"):
                v = res.metrics.get(k)
                entry[k] = v
                if v is not None:
                    logs[f"progress/{k}"] = v
        self.history.append(entry)
        pl_module.log_dict(logs, on_step=True, on_epoch=False, batch_size=1)
        if entry.get("efficacy") is not None:  # the module shows the edits done
            pl_module.log("eff", entry["efficacy"], on_step=True, on_epoch=False, prog_bar=True, logger=False,
                          batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))


class GeneralCapability(L.Callback):
    """Zero-shot general capability (GLUE-style tasks, MMLU) and perplexity during editing.

    Runs :func:`~blueedit.evaluation.general.evaluate_general` on the first ``num_examples``
    examples of each task in ``<data_dir>/glue_eval`` and the perplexity of the first
    ``perplexity_texts`` WikiText-2 chunks (``perplexity_texts: 0`` skips it) before editing
    (round ``-1``), after every ``every_n_rounds``-th round and after the last one. Logged as
    ``general/<task>`` (the task's headline metric, in ``[0, 1]``) and ``general/perplexity``;
    :attr:`history` holds ``{"round", "tasks": {task: metrics}, "perplexity"}``.

    YAML::

        trainer:
          callbacks:
            - class_path: blueedit.callbacks.progress.GeneralCapability
              init_args: {every_n_rounds: 10, num_examples: 50}
    """

    def __init__(self, every_n_rounds: int = 10, tasks: Sequence[str] = DEFAULT_TASKS, num_examples: int = 50,
                 perplexity_texts: int = 20, batch_size: int = 16, data_dir: str | None = None) -> None:
        if every_n_rounds < 1:
            raise UserInputError(f"every_n_rounds must be >= 1, got {every_n_rounds}")
        if isinstance(tasks, str):
            tasks = [tasks]
        unknown = [t for t in tasks if t not in TASKS]  # before any path is built from a name
        if unknown:
            raise UserInputError(f"GeneralCapability tasks {unknown} are unknown; known tasks: {', '.join(TASKS)}")
        self.every_n_rounds = every_n_rounds
        self.tasks = list(tasks)
        self.num_examples = num_examples
        self.perplexity_texts = perplexity_texts
        self.batch_size = batch_size
        self.data_dir = data_dir
        self.history: list[dict[str, Any]] = []
        self._texts: list[str] | None = None
        self._enabled = True

    def _data_dir(self, trainer, pl_module):
        from pathlib import Path

        return Path(self.data_dir).expanduser() if self.data_dir else resolve_data_dir(trainer, pl_module)

    @torch.no_grad()
    def evaluate(self, trainer, pl_module, round_index: int) -> dict[str, Any] | None:
        data_dir = self._data_dir(trainer, pl_module)
        if data_dir is None:
            warnings.warn("GeneralCapability: no data directory; general capability is not measured", stacklevel=2)
            self._enabled = False
            return None
        entry: dict[str, Any] = {"round": round_index, "tasks": {}, "perplexity": None}
        with evaluation_context(pl_module):
            if self.tasks:
                try:
                    entry["tasks"] = evaluate_general(pl_module.lm, pl_module.tokenizer, data_dir, self.tasks,
                                                      self.num_examples, batch_size=self.batch_size)
                except FileNotFoundError as e:
                    warnings.warn(f"GeneralCapability: {e}; tasks are not measured", stacklevel=2)
                    self.tasks = []
            if self.perplexity_texts > 0:
                if self._texts is None:
                    try:
                        self._texts = load_corpus_texts("wikitext-2", data_dir=data_dir,
                                                        num_samples=self.perplexity_texts)
                    except CorpusUnavailable as e:
                        warnings.warn(f"GeneralCapability: {e}; perplexity is not measured", stacklevel=2)
                        self.perplexity_texts = 0
                if self._texts:
                    entry["perplexity"] = perplexity(pl_module.lm, pl_module.tokenizer, self._texts,
                                                     batch_size=max(1, self.batch_size // 2))
        self.history.append(entry)
        logs: dict[str, float] = {f"general/{t}": m["main"] for t, m in entry["tasks"].items()}
        if entry["perplexity"] is not None:
            logs["general/perplexity"] = entry["perplexity"]
        logs["general/round"] = float(round_index)
        log_to_loggers(trainer, logs)
        return entry

    def on_train_start(self, trainer, pl_module) -> None:
        if not any(h["round"] == -1 for h in self.history):
            self.evaluate(trainer, pl_module, -1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        index = getattr(batch, "index", batch_idx)
        if self._enabled and (index + 1) % self.every_n_rounds == 0:
            self.evaluate(trainer, pl_module, index)

    def on_train_end(self, trainer, pl_module) -> None:
        reports = getattr(pl_module, "reports", [])
        last = reports[-1].index if reports else -1
        if self._enabled and (not self.history or self.history[-1]["round"] != last):
            self.evaluate(trainer, pl_module, last)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    def summary(self) -> dict[str, Any] | None:
        """The pre-edit and the last evaluation."""
        if not self.history:
            return None
        return {"pre": self.history[0], "last": self.history[-1]}
