"""Hidden-state drift on a fixed probe set of known, unedited facts (docs/algorithms.md §8).

Probes are the first ``num_probes`` records of ROME's ``known_1000.json``. Each probe's template
is its ``prompt`` with the subject replaced by ``{}`` (so it ends right before the attribute:
"{} is located in the continent of"); records whose prompt does not contain the subject use their
``template`` field. At the start of training the callback reads ``h_0 = h^L`` (block ``L``'s output
at the fact token, the last subject token, of the bare prompt) for every probe; every
``every_n_rounds`` rounds it reads ``h_t`` again and logs

- ``drift/l2``: mean ``‖h_t − h_0‖``;
- ``drift/relative``: mean ``‖h_t − h_0‖ / ‖h_0‖``;
- ``drift/cosine``: mean cosine(``h_t``, ``h_0``);
- ``drift/probe_accuracy``: % of probes whose top-1 next token after the prompt is the *first*
  token of ``" " + attribute`` (the first-token accuracy; the attribute's other tokens are not
  scored), with ``drift/probe_accuracy_pre`` its value before editing.

``L`` defaults to the last critical layer ``editing.layers[-1]``. Under PRUNE the model is read
with the restrained weights it would be evaluated with.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch

from blueedit.callbacks._common import evaluation_context, log_to_loggers, resolve_data_dir
from blueedit.config import UserInputError
from blueedit.data.records import EditRequest
from blueedit.editing.targets import fact_states
from blueedit.evaluation.scoring import score_continuations
from blueedit.models.tokens import tokenize_target

log = logging.getLogger(__name__)

__all__ = ["HiddenStateDrift", "load_probes", "probe_states", "probe_accuracy", "drift_metrics"]

KNOWN_FACTS = "rome_eval/known_1000.json"


def load_probes(path: str | Path, num_probes: int = 50) -> list[EditRequest]:
    """The first ``num_probes`` records of a ``known_1000.json``-style file as requests whose
    ``target_new`` is the known attribute (nothing is edited with them)."""
    records = json.loads(Path(path).read_text(encoding="utf-8"))
    probes = []
    for rec in records[:num_probes]:
        subject, prompt = rec["subject"], rec.get("prompt") or ""
        template = prompt.replace(subject, "{}", 1) if subject in prompt else rec["template"]
        probes.append(EditRequest(case_id=rec.get("known_id", len(probes)), prompt=template, subject=subject,
                                  target_new=rec["attribute"], target_true=rec["attribute"], source="known"))
    return probes


def probe_states(model, adapter, tokenizer, probes: list[EditRequest], layer: int, batch_size: int = 64) -> torch.Tensor:
    """``h^layer`` at the fact token of each probe's bare prompt: ``[N, d]`` float32."""
    _, hidden = fact_states(model, adapter, tokenizer, probes, ["{}"], [], [layer], batch_size=batch_size)
    return hidden[layer].T.contiguous()


def probe_accuracy(model, tokenizer, probes: list[EditRequest], batch_size: int = 32) -> float:
    """% of probes whose first attribute token is the top-1 prediction after the prompt."""
    firsts = [tokenize_target(tokenizer, p.target_new)[:1] for p in probes]
    scores = score_continuations(model, tokenizer, [p.filled_prompt for p in probes], firsts, batch_size=batch_size)
    return 100.0 * float(torch.stack([c[0] for c in scores.correct]).double().mean())


def drift_metrics(h0: torch.Tensor, ht: torch.Tensor) -> dict[str, float]:
    """Mean L2 / relative distance and mean cosine between rows of ``h0`` and ``ht`` (``[N, d]``)."""
    h0, ht = h0.double(), ht.double()
    dist = (ht - h0).norm(dim=1)
    return {
        "l2": float(dist.mean()),
        "relative": float((dist / h0.norm(dim=1).clamp(min=1e-12)).mean()),
        "cosine": float(torch.nn.functional.cosine_similarity(ht, h0, dim=1).mean()),
    }


class HiddenStateDrift(L.Callback):
    """Track how far editing moves the hidden states of known, unedited facts.

    YAML::

        trainer:
          callbacks:
            - class_path: blueedit.callbacks.drift.HiddenStateDrift
              init_args: {num_probes: 50, every_n_rounds: 1}

    Args:
        probe_file: a ``known_1000.json``-style file (default
            ``<data_dir>/rome_eval/known_1000.json``; missing: a warning, and the callback does nothing).
        num_probes: the first ``num_probes`` records are the probes.
        every_n_rounds: measure after rounds ``n-1, 2n-1, ...`` (and after the last round).
        layer: the block read (default: the last critical layer).

    :attr:`history` holds ``{"round", "l2", "relative", "cosine", "probe_accuracy"}`` per measurement
    (``round`` -1 is the pre-edit baseline).
    """

    def __init__(self, probe_file: str | None = None, num_probes: int = 50, every_n_rounds: int = 1,
                 layer: int | None = None) -> None:
        if every_n_rounds < 1:
            raise UserInputError(f"every_n_rounds must be >= 1, got {every_n_rounds}")
        if num_probes < 1:
            raise UserInputError(f"num_probes must be >= 1, got {num_probes}")
        self.probe_file = probe_file
        self.num_probes = num_probes
        self.every_n_rounds = every_n_rounds
        self.layer = layer
        self.history: list[dict[str, Any]] = []
        self.probes: list[EditRequest] | None = None
        self.h0: torch.Tensor | None = None
        self.enabled = True
        self._last_round: int | None = None

    def _layer(self, pl_module) -> int:
        return self.layer if self.layer is not None else pl_module.hp.layers[-1]

    def _resolve_probes(self, trainer, pl_module) -> list[EditRequest] | None:
        path = Path(self.probe_file).expanduser() if self.probe_file else None
        if path is None:
            d = resolve_data_dir(trainer, pl_module)
            path = d / KNOWN_FACTS if d is not None else None
        if path is None or not path.is_file():
            warnings.warn(f"HiddenStateDrift: probe file {path or KNOWN_FACTS!r} not found; drift is not measured",
                          stacklevel=2)
            return None
        return load_probes(path, self.num_probes)

    @torch.no_grad()
    def measure(self, pl_module) -> dict[str, float]:
        """Drift and probe accuracy of the model as it is now (needs :meth:`baseline` first)."""
        assert self.probes is not None and self.h0 is not None
        with evaluation_context(pl_module):
            ht = probe_states(pl_module.lm, pl_module.adapter, pl_module.tokenizer, self.probes, self._layer(pl_module))
            acc = probe_accuracy(pl_module.lm, pl_module.tokenizer, self.probes)
        out = drift_metrics(self.h0.to(ht.device), ht)
        out["probe_accuracy"] = acc
        return out

    @torch.no_grad()
    def baseline(self, pl_module, probes: list[EditRequest]) -> dict[str, float]:
        self.probes = probes
        with evaluation_context(pl_module):
            self.h0 = probe_states(pl_module.lm, pl_module.adapter, pl_module.tokenizer, probes, self._layer(pl_module))
        return self.measure(pl_module)

    def on_train_start(self, trainer, pl_module) -> None:
        probes = self._resolve_probes(trainer, pl_module)
        if probes is None:
            self.enabled = False
            return
        if self.h0 is not None and len(self.h0) == len(probes):  # restored from a checkpoint
            self.probes = probes
            return
        editor = getattr(pl_module, "editor", None)
        if editor is not None and editor.state.rounds_done > 0:
            warnings.warn("HiddenStateDrift: resumed run, the baseline is the model after "
                          f"{editor.state.rounds_done} rounds, not the unedited one", stacklevel=2)
        m = self.baseline(pl_module, probes)
        self._record(trainer, -1, m)

    def _record(self, trainer, round_index: int, m: dict[str, float]) -> None:
        pre = self.history[0]["probe_accuracy"] if self.history else m["probe_accuracy"]
        self.history.append({"round": round_index, **m})
        self._last_round = round_index
        logs = {f"drift/{k}": v for k, v in m.items()}
        logs["drift/probe_accuracy_pre"] = pre
        logs["drift/round"] = float(round_index)
        log_to_loggers(trainer, logs)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self.enabled or self.h0 is None:
            return
        index = getattr(batch, "index", batch_idx)
        last = trainer.num_training_batches is not None and batch_idx + 1 >= trainer.num_training_batches
        if (index + 1) % self.every_n_rounds == 0 or last:
            self._record(trainer, index, self.measure(pl_module))

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "h0": None if self.h0 is None else self.h0.cpu()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.h0 = state_dict.get("h0")

    def summary(self) -> dict[str, Any] | None:
        """The pre-edit and the last measurement."""
        if not self.history:
            return None
        return {"pre": self.history[0], "last": self.history[-1]}
