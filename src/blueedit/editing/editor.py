"""One editing round, atomically: targets, keys, residuals, solves, writes (docs/algorithms.md).

:class:`Editor` is plain PyTorch (no Lightning); :class:`blueedit.module.EditingModule` wraps it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import get_args

import torch

from blueedit import distributed
from blueedit.config import EditingConfig, Strategy, UserInputError
from blueedit.data.records import EditRecordError, EditRequest, validate_requests
from blueedit.editing import hse, solvers
from blueedit.editing import strategy as strategies
from blueedit.editing.targets import TargetResult, fact_states, optimize_targets, optimize_targets_one_by_one
from blueedit.editing.updates import LayerUpdate, RoundUpdates
from blueedit.methods.registry import SolveInputs, get_method, method_names
from blueedit.models.adapters import ModelAdapter
from blueedit.models.tokens import tokenize_target

#: the built-in method names (:func:`blueedit.methods.registry.method_names` also lists registered ones)
METHODS: tuple[str, ...] = tuple(method_names())
STRATEGIES: tuple[str, ...] = get_args(Strategy)


@dataclass
class LayerStep:
    """What a round is about to write at one layer (passed to :attr:`Editor.on_layer`).

    ``residuals`` ``R^l`` (``[d, B]``), ``keys`` ``K^l`` (``[d_k, B]``), ``delta`` ``ΔW^l``
    (``[d, d_k]``); ``target_layer`` is the layer whose ``z`` produced ``R^l`` (``l_m`` under
    ``distribute``, ``l`` under ``boundary``)."""

    round_index: int
    layer: int
    target_layer: int
    requests: list[EditRequest]
    residuals: torch.Tensor
    keys: torch.Tensor
    delta: torch.Tensor


def check_stream_options(hp: EditingConfig, requests: list[EditRequest], total_rounds: int | None) -> None:
    """Fail before any slow work when HSE's options cannot run on this stream: forgetting needs
    ``target_true`` in every record; the ``inverse`` schedule needs the number of rounds."""
    if hp.target.forget_weight > 0:
        for i, r in enumerate(requests):
            if not r.target_true:
                raise EditRecordError(f"edit record {i} (case_id={r.case_id!r}) has no 'target_true', which "
                                      "editing.target.forget_weight > 0 (HSE's forgetting of the old answer) needs")
    if hp.history_schedule == "inverse":
        hse.history_weight(hp.history_schedule, 0, total_rounds)  # raises when n is unknown


class EditRoundError(RuntimeError):
    """A round failed; the model was restored to its state before the round."""


@dataclass
class RoundReport:
    """What a round did: per written layer the update's Frobenius norm, the target steps."""

    index: int
    case_ids: list
    update_norms: dict[int, float]
    target_steps: dict[int, list[int]]
    target_loss: dict[int, list[float]]
    seconds: float
    residual_norms: dict[int, float] = field(default_factory=dict)


def check_round(tokenizer, requests: list[EditRequest], index: int, fields: tuple[str, ...] = ("target_new",)) -> None:
    """Raise, naming the round or the record and field, when round ``index`` is empty, a record is
    invalid, or one of its ``fields`` tokenizes to nothing (before anything is edited)."""
    if not requests:
        raise EditRoundError(f"round {index} has no edit requests")
    validate_requests(requests)
    for i, r in enumerate(requests):
        for name in fields:
            if getattr(r, name) is None:
                continue  # a missing optional field: the option that needs it names the record
            try:
                tokenize_target(tokenizer, getattr(r, name))
            except ValueError as e:
                raise EditRecordError(f"edit record {i} (case_id={r.case_id!r}): '{name}' {e}") from None


@dataclass
class EditorState:
    """Everything a resumed run needs besides the weights: edit history ``H^l`` (float32),
    AlphaEdit projections ``P^l``, the weights ``W_0^l`` before the first round (PRUNE's
    original weights; kept for every method), rounds done, the context templates, and each
    round's update as low-rank factors (:mod:`blueedit.editing.updates`: what ``blueedit
    revert`` undoes)."""

    history: dict[int, torch.Tensor] = field(default_factory=dict)
    projection: dict[int, torch.Tensor] = field(default_factory=dict)
    original: dict[int, torch.Tensor] = field(default_factory=dict)
    rounds_done: int = 0
    context_templates: list[str] = field(default_factory=list)
    #: post-processing (PRUNE's restraint) has been written into the weights
    finalized: bool = False
    #: per finished round, its update of each edited layer
    updates: list[RoundUpdates] = field(default_factory=list)
    #: HSE: per target layer, the sum of the earlier rounds' Fisher estimates ``Σ_j F_j``
    fisher: dict[int, torch.Tensor] = field(default_factory=dict)
    #: HSE: ``n``, the number of rounds of the stream (``history_schedule: inverse``)
    total_rounds: int | None = None

    def to_dict(self) -> dict:
        return {
            "fisher": {str(k): v.cpu() for k, v in self.fisher.items()},
            "total_rounds": self.total_rounds,
            "history": {str(k): v.cpu() for k, v in self.history.items()},
            "projection": {str(k): v.cpu() for k, v in self.projection.items()},
            "original": {str(k): v.cpu() for k, v in self.original.items()},
            "rounds_done": self.rounds_done,
            "context_templates": list(self.context_templates),
            "finalized": self.finalized,
            "updates": [{str(l): {"left": u.left.cpu(), "right": None if u.right is None else u.right.cpu(),
                                  "keys": u.keys.cpu()} for l, u in r.items()} for r in self.updates],
        }

    @classmethod
    def from_dict(cls, d: dict, device: torch.device | str = "cpu") -> EditorState:
        conv = lambda m: {int(k): v.to(device) for k, v in m.items()}  # noqa: E731
        updates = [{int(l): LayerUpdate(u["left"], u["right"], u["keys"]) for l, u in r.items()}
                   for r in d.get("updates", [])]
        total = d.get("total_rounds")
        return cls(conv(d["history"]), conv(d["projection"]), conv(d["original"]), int(d["rounds_done"]),
                   list(d["context_templates"]), bool(d.get("finalized", False)), updates,
                   conv(d.get("fisher", {})), None if total is None else int(total))


class Editor:
    """Sequential locate-then-edit on one model.

    Args:
        model, tokenizer: the Hugging Face causal LM being edited (in place) and its tokenizer.
        adapter: where ``W_out`` lives.
        hparams: :class:`EditingConfig`.
        mom2: ``C_0^l`` for every edited layer (``[d_k, d_k]``).
        context_templates: ``C`` (section 1).
        total_rounds: the number of rounds of the edit stream (HSE's ``n``; needed by
            ``history_schedule: inverse``, kept in the state).
    """

    def __init__(self, model, tokenizer, adapter: ModelAdapter, hparams: EditingConfig,
                 mom2: dict[int, torch.Tensor], context_templates: list[str], state: EditorState | None = None,
                 total_rounds: int | None = None):
        adapter.check_layers(hparams.layers)
        missing = [l for l in hparams.edited_layers if l not in mom2]
        if missing:
            raise UserInputError(f"no key statistics C_0 for layers {missing}")
        self.model, self.tokenizer, self.adapter, self.hp = model, tokenizer, adapter, hparams
        #: the method's hooks (:mod:`blueedit.methods.registry`)
        self.method = get_method(hparams.method)
        self.device = next(model.parameters()).device
        self.mom2 = {l: mom2[l].to(self.device) for l in hparams.edited_layers}
        self.state = state or EditorState(context_templates=list(context_templates))
        #: Optional diagnostic called with a :class:`LayerStep` before each layer's write
        #: (on the model as it is at that moment); used by the weight-shift-error callback.
        self.on_layer: Callable[[LayerStep], None] | None = None
        #: Optional progress hook called as ``on_target_step(layer, step, mean_loss)`` during the
        #: target optimization (fast path); used by the round progress bar.
        self.on_target_step: Callable[[int, int, float], None] | None = None
        self.compute_model, self.compute_adapter = self._compute_copy()
        #: the factors of the round in progress, per layer (see :meth:`solve`)
        self._factors: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._init_state()
        if total_rounds is not None:
            self.set_total_rounds(total_rounds)
        #: this round's Fisher estimates per target layer (added to the state when the round succeeds)
        self._round_fisher: dict[int, torch.Tensor] = {}
        self._alpha = 1.0

    def set_total_rounds(self, n: int) -> None:
        """Record ``n``, the number of rounds of the stream (HSE's schedule). A resumed state keeps
        its ``n``; with the ``inverse`` schedule a different one is an error (the schedule would
        change mid-stream); otherwise ``n`` is only recorded."""
        if (self.hp.history_schedule == "inverse" and self.state.total_rounds is not None
                and self.state.total_rounds != int(n)):
            raise UserInputError(f"the editor state was written for a stream of {self.state.total_rounds} rounds, "
                             f"this one has {n}: editing.history_schedule would change mid-stream")
        self.state.total_rounds = int(n)

    def _compute_copy(self):
        """The model the forward passes run on: the model itself, or a copy in
        ``editing.compute_dtype`` whose edited layers mirror the original's (:meth:`_sync`)."""
        if self.hp.compute_dtype is None:
            return self.model, self.adapter
        dtype = getattr(torch, self.hp.compute_dtype)
        if next(self.model.parameters()).dtype == dtype:
            return self.model, self.adapter
        if getattr(self.model, "hf_device_map", None):
            raise UserInputError("editing.compute_dtype cannot copy a model dispatched with model.device_map; "
                             "load the model in that dtype instead (model.dtype)")
        import copy

        work = copy.deepcopy(self.model).to(dtype)
        work.requires_grad_(False)
        work.eval()
        if self.device.type == "cpu" and dtype != torch.float32 and hasattr(work, "set_attn_implementation"):
            work.set_attn_implementation("eager")
        return work, ModelAdapter(work, layout=self.adapter.layout)

    def sync_compute_copy(self, layers) -> None:
        """Mirror the original's ``W_out`` of ``layers`` into the compute copy."""
        if self.compute_model is not self.model:
            for l in layers:
                self.compute_adapter.set_w_out(l, self.adapter.get_w_out(l))

    def _init_state(self) -> None:
        for l in self.hp.edited_layers:
            dk = self.adapter.key_size(l)
            self.state.history.setdefault(l, torch.zeros(dk, dk, device=self.device))
            self.method.prepare_layer(self, l)
            if l not in self.state.original:  # W_0: PRUNE's original weights, and where revert replays from
                self.state.original[l] = self.adapter.get_w_out(l).cpu()

    # -- one round -------------------------------------------------------------------------
    def check_requests(self, requests: list[EditRequest], index: int) -> None:
        """Validate records and their tokenization before anything is edited."""
        fields_ = ("target_new",) + (("target_true",) if self.hp.target.forget_weight > 0 else ())
        check_round(self.tokenizer, requests, index, fields_)
        check_stream_options(self.hp, requests, self.state.total_rounds)

    def autocast(self):
        """The forward-pass autocast context (a no-op unless ``editing.autocast`` is set)."""
        if self.hp.autocast is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, self.hp.autocast))

    def targets(self, requests: list[EditRequest], layer: int, *, record: bool = True) -> TargetResult:
        """Targets ``z`` at ``layer`` for every request. Under DDP each rank optimizes its shard
        of the requests and the results are gathered, so every rank holds all targets.
        ``record=False`` (diagnostics) leaves the round's HSE Fisher estimates alone."""
        idx = distributed.shard_indices(len(requests))
        local = [requests[i] for i in idx]
        d = self.adapter.hidden_size()
        args = (self.compute_model, self.compute_adapter, self.tokenizer, local, layer, self.state.context_templates,
                self.hp.target)
        tp = self.hp.target
        fisher_on = tp.fisher_weight > 0
        kw = {"sites": self.method.target_sites(self.hp), "return_grad": fisher_on,
              "fisher": (tp.fisher_weight * self.state.fisher[layer]).float().to(self.device)
              if fisher_on and layer in self.state.fisher else None}
        if not local:
            empty = torch.zeros(0, d, device=self.device)
            res = TargetResult(empty, empty, empty, torch.zeros(0, dtype=torch.long), torch.zeros(0),
                               grad=empty if fisher_on else None)
        else:
            with torch.enable_grad(), self.autocast():
                if self.hp.optimize:
                    hook = self.on_target_step
                    on_step = None if hook is None else (lambda step, loss: hook(layer, step, loss))
                    res = optimize_targets(*args, fast=True, max_batch_tokens=self.hp.max_batch_tokens, on_step=on_step,
                                           **kw)
                else:
                    res = optimize_targets_one_by_one(*args, fast=False, **kw)
        if distributed.is_distributed():
            n = len(requests)
            gather = lambda t: distributed.gather_rows(t.to(self.device), n)  # noqa: E731
            res = TargetResult(gather(res.z), gather(res.h_init), gather(res.delta),
                               gather(res.steps).cpu(), gather(res.loss.float()).cpu(),
                               grad=None if res.grad is None else gather(res.grad))
        if not torch.isfinite(res.z).all():
            raise solvers.SolveError(f"target optimization at layer {layer} produced non-finite values")
        if res.grad is not None and record:  # HSE: this round's Fisher at this layer, added after the round
            self._round_fisher[layer] = hse.fisher_estimate(res.grad, tp.fisher_estimator).float()
        return res

    def solve_inputs(self, layer: int) -> SolveInputs:
        """What the method's solve reads at ``layer`` this round: ``C_0``, ``H``, ``α_i``, ``P``."""
        return SolveInputs(self.mom2[layer], self.state.history[layer], self._alpha,
                           self.state.projection.get(layer))

    def solve(self, layer: int, residuals: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """The method's update ``ΔW^layer`` (``[d, d_k]``, float64) for ``R`` (``[d, B]``), ``K``
        (``[d_k, B]``). Pure: nothing is written or recorded (diagnostics call it freely)."""
        left, right = self.method.solve(self.hp, self.solve_inputs(layer), residuals, keys)
        delta = left @ right
        if not torch.isfinite(delta).all():
            raise solvers.SolveError(f"update of layer {layer} has non-finite values")
        return delta

    @property
    def residuals_at_mlp(self) -> bool:
        """Whether a round's residuals live in the ``W_out``-output space (PMET, or
        ``editing.target.site: mlp``) rather than the block-output space."""
        return self.method.residuals_at_mlp(self.hp)

    def keys_and_values(self, requests: list[EditRequest], key_layer: int,
                        value_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys ``K^key_layer`` (``[d_k, B]``) and the values a residual at ``value_layer`` is taken
        from (``[d, B]``): the MLP outputs ``m`` when :attr:`residuals_at_mlp`, else the block
        outputs ``h``; read in one pass on the model as it is now."""
        if self.residuals_at_mlp:
            keys, _, values = self.fact_states(requests, [key_layer], [], value_layers=[value_layer])
        else:
            keys, values = self.fact_states(requests, [key_layer], [value_layer])
        return keys[key_layer], values[value_layer]

    def current_values(self, requests: list[EditRequest], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`keys_and_values` at one layer."""
        return self.keys_and_values(requests, layer, layer)

    def fact_states(self, requests: list[EditRequest], key_layers: list[int], hidden_layers: list[int],
                    value_layers: list[int] | None = None):
        """Keys ``K^l`` (``[d_k, B]``) and values ``h^l`` (``[d, B]``) at the fact tokens of
        ``requests`` on the model as it is now (through the compute copy, under the editor's
        autocast), as a round reads them; under DDP each rank reads its shard and the columns are
        gathered back in request order. Public for diagnostics (the weight-shift-error callback).
        With ``value_layers`` also the MLP outputs ``m^l`` (``[d, B]``): ``(keys, hidden, values)``."""
        local = distributed.shard(requests)
        with self.autocast():
            out = fact_states(self.compute_model, self.compute_adapter, self.tokenizer, local,
                              self.state.context_templates, key_layers, hidden_layers,
                              batch_size=self.hp.key_batch_size, value_layers=value_layers,
                              anchor=self.hp.target.anchor_position0)
        if distributed.is_distributed():
            n = len(requests)
            out = tuple({l: distributed.gather_rows(x.T.contiguous(), n).T for l, x in part.items()} for part in out)
        return out

    def write(self, requests: list[EditRequest], layer: int, target_layer: int, residuals: torch.Tensor,
              keys: torch.Tensor, report: RoundReport) -> None:
        """Solve for ``ΔW^layer`` from ``R`` and ``K`` with the method, show it to :attr:`on_layer`,
        add it to ``W_out^layer`` and keep its factors for the round's recorded update."""
        report.residual_norms[layer] = float(residuals.norm())
        left, right = self.method.solve(self.hp, self.solve_inputs(layer), residuals, keys)
        delta = left @ right
        if not torch.isfinite(delta).all():
            raise solvers.SolveError(f"update of layer {layer} has non-finite values")
        self._factors[layer] = (left.cpu(), None if right is None else right.cpu())
        if self.on_layer is not None:
            self.on_layer(LayerStep(report.index, layer, target_layer, requests, residuals, keys, delta))
        self.adapter.add_to_w_out(layer, delta)
        self.sync_compute_copy([layer])
        report.update_norms[layer] = float(torch.linalg.matrix_norm(delta))

    def round_target(self, requests: list[EditRequest], layer: int, report: RoundReport) -> torch.Tensor:
        """The round's targets ``z`` at ``layer`` (``[B, d]``), their steps and losses recorded in ``report``."""
        res = self.targets(requests, layer)
        report.target_steps[layer] = res.steps.tolist()
        report.target_loss[layer] = res.loss.tolist()
        return res.z

    def edit_round(self, requests: list[EditRequest], index: int | None = None) -> RoundReport:
        """Apply one round of edits. Atomic: on any error (bad record, failed or non-finite
        optimization or solve) every layer is restored and :class:`EditRoundError` (or
        :class:`EditRecordError` for a bad record) names the round and its records."""
        index = self.state.rounds_done if index is None else index
        self.check_requests(requests, index)
        t0 = time.perf_counter()
        snapshot = {l: self.adapter.get_w_out(l) for l in self.hp.edited_layers}
        report = RoundReport(index, [r.case_id for r in requests], {}, {}, {}, 0.0)
        if self.state.finalized:
            raise EditRoundError(f"round {index}: the editor was finalized (post-processing applied); "
                                 "no further rounds can be added")
        self._factors = {}
        self._round_fisher = {}
        self._alpha = hse.history_weight(self.hp.history_schedule, index, self.state.total_rounds)
        try:
            self.sync_compute_copy(self.hp.edited_layers)  # the weights may have been set from outside (resume)
            strategies.STRATEGIES[self.hp.strategy](self, requests, report)
            self._factors.update(self.method.post_round(self, snapshot, report))
            keys, _ = self.fact_states(requests, self.hp.edited_layers, [])
            new_history = {l: self.state.history[l] + (keys[l] @ keys[l].T) for l in self.hp.edited_layers}
            for l, H in new_history.items():
                if not torch.isfinite(H).all():
                    raise solvers.SolveError(f"edit history of layer {l} has non-finite values")
        except Exception as e:
            for l, w in snapshot.items():
                self.adapter.set_w_out(l, w)
            ids = [r.case_id for r in requests]
            raise EditRoundError(f"round {index} (case_ids {ids}) failed, model left unchanged: {e}") from e
        self.state.history.update(new_history)
        self.state.updates.append({l: LayerUpdate(*self._factors[l], keys[l].detach().cpu())
                                   for l in self.hp.edited_layers})
        self._factors = {}
        for l, F in self._round_fisher.items():  # HSE: Σ_j F_j, used from the next round on
            self.state.fisher[l] = self.state.fisher[l] + F if l in self.state.fisher else F
        self._round_fisher = {}
        self.state.rounds_done = index + 1
        report.seconds = time.perf_counter() - t0
        return report

    # -- post-processing -------------------------------------------------------------------
    def restrained_weights(self) -> dict[int, torch.Tensor]:
        """The post-processed weights the method gives now (PRUNE's restraint; ``{}`` for methods
        without post-processing, and once finalized: it is applied exactly once)."""
        return self.method.final_weights(self)

    @contextmanager
    def evaluation_weights(self):
        """Temporarily apply post-processing (PRUNE) for an evaluation, then restore. After
        :meth:`finalize` the weights already are the post-processed ones: nothing is applied."""
        restrained = self.restrained_weights()
        saved = {l: self.adapter.get_w_out(l) for l in restrained}
        try:
            for l, w in restrained.items():
                self.adapter.set_w_out(l, w)
            yield
        finally:
            for l, w in saved.items():
                self.adapter.set_w_out(l, w)

    def finalize(self) -> None:
        """Apply post-processing permanently (PRUNE after the last round), exactly once."""
        for l, w in self.restrained_weights().items():
            self.adapter.set_w_out(l, w)
        if self.method.post_processing:
            self.state.finalized = True

    def load_state(self, state: EditorState) -> None:
        """Adopt ``state`` (a resumed checkpoint)."""
        self.state = state
