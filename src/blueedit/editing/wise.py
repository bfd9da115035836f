"""WISE: lifelong editing in a routed side memory (docs/algorithms.md, "WISE").

Wang et al., *WISE: Rethinking the Knowledge Memory for Lifelong Model Editing of Large Language
Models*, NeurIPS 2024, https://arxiv.org/abs/2405.14768.

One layer's MLP value matrix ``W_v`` (``W_out``, ``[d, d_k]``) gets a side copy ``W_v'``. With
``a`` the input of ``W_out`` at a token (``[d_k]``):

    Δact(x)  = mean over the tokens of x of ‖ a·(W_v' − W_v)ᵀ ‖₂                    (routing indicator)
    FFN_out  = a·W_v'ᵀ  if Δact(x) > ε,  else a·W_vᵀ                                  (eq. 6)
    L_edit   = −log P_{W_v'}(y_e | x_e) + L_a,
    L_a      = max(0, Δact(x_i) − α) + max(0, β − Δact(x_e)) + max(0, γ − (Δact(x_e) − Δact(x_i)))
    W_v'     ← W_v' − η · (M_i ⊙ ∇)                                                   (masked SGD)
    W_v'     ← W_v + TIES({W_v'^i − W_v}_i ; W_v)                                     (shard merge)

``ε`` is the smallest Δact of an edit after its training. The pieces are pure functions
(:func:`activation_distance`, :func:`routing_margin_loss`, :func:`random_mask`,
:func:`ties_merge`), a module wrapper (:class:`SideMemoryLayer`) and the editing loop
(:class:`WiseEditor`, the ``editing.method: wise`` counterpart of
:class:`~blueedit.editing.editor.Editor`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from blueedit.config import RepeatedMerge, UserInputError, WiseConfig
from blueedit.data.records import EditRecordError, EditRequest, validate_requests
from blueedit.models.adapters import ModelAdapter
from blueedit.models.tokens import encode_prompt, gather_positions, pad_batch, pad_token_id, tokenize_target

#: The file beside a saved model that holds its side memory (:func:`save_side_memory`).
SIDE_MEMORY_FILE = "wise_side_memory.pt"

#: Seed words and prefix lengths of the published context prefixes (EasyEdit ``get_context_templates``).
WISE_CONTEXT_SEEDS = ("I", "You", "Because", "Yes", "Q: ")


# -- pure functions -------------------------------------------------------------------------------
def activation_distance(keys: torch.Tensor, w_side: torch.Tensor, w_orig: torch.Tensor,
                        token_mask: torch.Tensor | None = None,
                        activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """Δact per sequence: the mean over its tokens of ``‖a·W_sideᵀ − a·W_origᵀ‖₂``.

    Args:
        keys: ``a``, the inputs of ``W_out``: ``[B, T, d_k]``.
        w_side, w_orig: ``[d, d_k]`` (math orientation).
        token_mask: ``[B, T]``, 1 for the tokens to average over (padding 0); ``None``: all.
        activation: ``σ`` applied to both outputs first (the published code's distance); ``None``:
            the paper's ``‖a·(W_side − W_orig)ᵀ‖``.
        bias: the layer's output bias ``[d]`` (matters only under ``activation``).

    Returns:
        ``[B]`` float32.
    """
    keys = keys.float()
    if activation is None:
        per_token = (keys @ (w_side.float() - w_orig.float()).T).norm(dim=-1)  # [B, T]
    else:
        b = 0.0 if bias is None else bias.float()
        per_token = (activation(keys @ w_side.float().T + b) - activation(keys @ w_orig.float().T + b)).norm(dim=-1)
    if token_mask is None:
        return per_token.mean(dim=-1)
    m = token_mask.to(per_token.dtype)
    return (per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)


def routing_margin_loss(d_edit: torch.Tensor, d_irr: torch.Tensor, alpha: float, beta: float,
                        gamma: float) -> torch.Tensor:
    """``L_a = max(0, Δ_i − α) + max(0, β − Δ_e) + max(0, γ − (Δ_e − Δ_i))`` (paper eq. 5).

    With several edit inputs (``d_edit``, ``[n]``: the augmented prompts of one edit) and
    irrelevant inputs (``d_irr``, ``[m]``), each term is the mean over its inputs (the third
    over all ``n·m`` pairs); with one of each it is the equation as written.
    """
    irr = torch.relu(d_irr - alpha).mean()
    edit = torch.relu(beta - d_edit).mean()
    gap = torch.relu(gamma - (d_edit[:, None] - d_irr[None, :])).mean()
    return irr + edit + gap


def random_mask(shape: tuple[int, ...], ratio: float, seed: int) -> torch.Tensor:
    """A boolean mask with each entry 1 independently with probability ``ratio``
    (``M_i``, one per shard), drawn from its own generator so the global RNG is untouched."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.rand(shape, generator=g) < ratio


def trim_to_density(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the ``int(density · numel)`` entries of largest magnitude, zero the rest."""
    if density >= 1.0:
        return tau.clone()
    k = int(density * tau.numel())
    if k <= 0:
        return torch.zeros_like(tau)
    flat = tau.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat.abs().float(), k).indices] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(tau.shape)


def ties_merge(base: torch.Tensor, tuned: list[torch.Tensor], weights: list[float],
               density: float) -> torch.Tensor:
    """``base + TIES({τ_i = tuned_i − base})`` (Yadav et al. 2023, as WISE uses it).

    With ``τ̂_i = λ_i · trim(τ_i)`` (trim: :func:`trim_to_density`), the elected sign
    ``s = sign(Σ_i τ̂_i)`` (``+1`` where the sum is 0) and ``A_i = [sign(τ̂_i) = s]`` (zeros never
    agree), the merged task vector is the disjoint weighted mean

        τ = Σ_i A_i ⊙ τ̂_i / Σ_i A_i λ_i      (entries where no τ̂_i agrees: 0).

    Computed in float64; returned in ``base``'s dtype.
    """
    if len(tuned) != len(weights) or not tuned:
        raise UserInputError(f"ties_merge needs one weight per tensor, got {len(tuned)} tensors and {len(weights)} weights")
    b = base.double()
    lam = torch.tensor(weights, dtype=torch.float64, device=base.device).reshape(-1, *([1] * base.dim()))
    taus = torch.stack([trim_to_density(t.double() - b, density) for t in tuned]) * lam
    elected = torch.where(taus.sum(0) >= 0, 1.0, -1.0).to(taus.dtype)
    agree = (torch.sign(taus) == elected).to(taus.dtype)
    divisor = (agree * lam).sum(0)
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return (b + (taus * agree).sum(0) / divisor).to(base.dtype)


def merge_weights(n_new: int, has_previous: bool, mode: RepeatedMerge) -> list[float]:
    """TIES weights for ``n_new`` shards (and the previous merged memory last, when there is one):
    ``equal`` gives every task vector ``1/n``; ``published`` gives ``1/k`` each on a first merge
    and ``0.4/k`` each plus ``0.6`` for the previous memory on a repeated one (EasyEdit)."""
    if not has_previous:
        return [1.0 / n_new] * n_new
    if mode == "published":
        return [0.4 / n_new] * n_new + [0.6]
    return [1.0 / (n_new + 1)] * (n_new + 1)


# -- the layer wrapper ----------------------------------------------------------------------------
@dataclass
class SideMemory:
    """One candidate side weight at inference and its routing threshold ``ε`` (before ``act_ratio``)."""

    weight: torch.Tensor
    threshold: float


class SideMemoryLayer(nn.Module):
    """Replaces one layer's ``W_out`` module: the frozen original, the side memories and the router.

    ``original`` is the untouched module (its weight is ``W_v``; deleting this wrapper and putting
    ``original`` back restores the model bit for bit). Modes:

    - ``route`` (inference): per sequence, each candidate side memory's Δact is computed
      (:func:`activation_distance`, masked by the attention mask the model was called with); the
      top-1 candidate answers if its Δact exceeds ``act_ratio ·`` its threshold, else the original
      (eq. 6; with one candidate this is the Merge rule).
    - ``edit`` (training): every sequence goes through ``edit_weight`` (the shard being trained).
    - ``original``: the original module only.

    Shapes: inputs ``[B, T, d_k]``, outputs ``[B, T, d]``; weights ``[d, d_k]``.
    """

    def __init__(self, original: nn.Module, transposed: bool, activation: Callable | None, act_ratio: float):
        super().__init__()
        self.original = original
        self.transposed = transposed
        self.activation = activation
        self.act_ratio = act_ratio
        self.mode = "route"
        self.edit_weight: torch.Tensor | None = None
        self.candidates: list[SideMemory] = []
        self.token_mask: torch.Tensor | None = None  # set by the model's pre-hook (attention mask)
        self.last_routes: torch.Tensor | None = None  # [B] index of the answering memory, -1: original
        self.last_distances: torch.Tensor | None = None  # [C, B] Δact of each candidate (diagnostics)

    @property
    def weight(self) -> nn.Parameter:
        """The original module's weight (so code that reads ``W_out`` sees ``W_v``)."""
        return self.original.weight

    def w_orig(self) -> torch.Tensor:
        w = self.original.weight
        return w.t() if self.transposed else w

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.original, "bias", None)

    def side_output(self, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(a, w.to(a.dtype), None if self.bias is None else self.bias.to(a.dtype))

    def _mask_for(self, a: torch.Tensor) -> torch.Tensor | None:
        m = self.token_mask
        if m is None or m.dim() != 2 or m.shape[0] != a.shape[0] or m.shape[1] < a.shape[1]:
            return None
        return m[:, -a.shape[1]:].to(a.device)  # with a key/value cache: the newest positions

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if self.mode == "original":
            return self.original(a)
        if self.mode == "edit":
            assert self.edit_weight is not None
            return self.side_output(a, self.edit_weight)
        out = self.original(a)
        if not self.candidates:
            self.last_routes = torch.full((a.shape[0],), -1, dtype=torch.long)
            return out
        keys = a  # [B, T, d_k]
        mask = self._mask_for(keys)
        w0 = self.w_orig()
        dists = torch.stack([activation_distance(keys, c.weight.to(a.device), w0, mask, self.activation, self.bias)
                             for c in self.candidates])  # [C, B]
        self.last_distances = dists.detach().cpu()
        best = dists.argmax(0)  # [B]
        thresholds = torch.tensor([c.threshold * self.act_ratio for c in self.candidates], device=dists.device)
        routed = dists.gather(0, best[None]).squeeze(0) > thresholds[best]
        self.last_routes = torch.where(routed, best, torch.full_like(best, -1)).cpu()
        for i, c in enumerate(self.candidates):
            rows = routed & (best == i)
            if rows.any():
                side = self.side_output(a, c.weight.to(a.device))
                out = torch.where(rows.view(-1, *([1] * (out.dim() - 1))), side, out)
        return out


def _activation_of(model) -> Callable | None:
    from transformers.activations import ACT2FN

    cfg = getattr(model, "config", None)
    name = getattr(cfg, "hidden_act", None) or getattr(cfg, "activation_function", None)
    if name is None:
        raise UserInputError("editing.wise.distance_activation: model has no hidden_act in its config")
    return ACT2FN[name]


# -- state ----------------------------------------------------------------------------------------
@dataclass
class WiseState:
    """Everything WISE adds to the model, for checkpoints and saved models.

    ``original``: ``W_v`` (checked against the model on load); ``current`` / ``current_mask``:
    the shard being trained and its mask ``M_i``; ``current_threshold``: the least Δact of its
    edits (``inf`` before the first); ``shards`` / ``shard_thresholds``: finished shards not yet
    merged; ``memories`` / ``memory_thresholds``: merged side memories (one for Merge); counters.
    """

    layer: int = -1
    original: torch.Tensor | None = None
    current: torch.Tensor | None = None
    current_mask: torch.Tensor | None = None
    current_threshold: float = math.inf
    current_edits: int = 0
    shards: list[torch.Tensor] = field(default_factory=list)
    shard_thresholds: list[float] = field(default_factory=list)
    memories: list[torch.Tensor] = field(default_factory=list)
    memory_thresholds: list[float] = field(default_factory=list)
    edits_done: int = 0
    merges_done: int = 0
    shards_started: int = 0
    rounds_done: int = 0
    context_templates: list[str] = field(default_factory=list)
    finalized: bool = False  # never set: WISE has no post-processing (kept for the Editor interface)

    def to_dict(self) -> dict:
        cpu = lambda t: None if t is None else t.detach().cpu().clone()  # noqa: E731
        return {
            "method": "wise", "layer": self.layer, "original": cpu(self.original), "current": cpu(self.current),
            "current_mask": cpu(self.current_mask), "current_threshold": self.current_threshold,
            "current_edits": self.current_edits, "shards": [cpu(s) for s in self.shards],
            "shard_thresholds": list(self.shard_thresholds), "memories": [cpu(m) for m in self.memories],
            "memory_thresholds": list(self.memory_thresholds), "edits_done": self.edits_done,
            "merges_done": self.merges_done, "shards_started": self.shards_started,
            "rounds_done": self.rounds_done, "context_templates": list(self.context_templates),
        }

    @classmethod
    def from_dict(cls, d: dict, device: torch.device | str = "cpu") -> WiseState:
        to = lambda t: None if t is None else t.to(device)  # noqa: E731
        return cls(int(d["layer"]), to(d["original"]), to(d["current"]), to(d["current_mask"]),
                   float(d["current_threshold"]), int(d["current_edits"]), [to(s) for s in d["shards"]],
                   [float(x) for x in d["shard_thresholds"]], [to(m) for m in d["memories"]],
                   [float(x) for x in d["memory_thresholds"]], int(d["edits_done"]), int(d["merges_done"]),
                   int(d["shards_started"]), int(d["rounds_done"]), list(d["context_templates"]))

    @staticmethod
    def is_wise(d: dict | None) -> bool:
        return bool(d) and d.get("method") == "wise"


def candidates(state: WiseState, cfg: WiseConfig) -> list[SideMemory]:
    """The side memories inference routes between.

    Merge: one memory, ``W_v + TIES`` of the merged memory (if any) and every shard not yet merged
    (the in-progress one included when it holds edits), so inference between merges sees every
    edit; its threshold is the least over all edits (ε). Retrieve: every merged memory, every
    finished shard and the in-progress shard, each with the threshold of its own edits.
    """
    assert state.original is not None
    pending = list(zip(state.shards, state.shard_thresholds))
    if state.current is not None and state.current_edits > 0:
        pending.append((state.current, state.current_threshold))
    if cfg.variant == "retrieve":
        mems = list(zip(state.memories, state.memory_thresholds)) + pending
        return [SideMemory(w, t) for w, t in mems]
    if not pending:
        return [SideMemory(w, t) for w, t in zip(state.memories, state.memory_thresholds)]
    thresholds = [t for _, t in pending] + list(state.memory_thresholds)
    if len(pending) == 1 and not state.memories:
        return [SideMemory(pending[0][0], min(thresholds))]
    weight = merge_shards(state.original, [w for w, _ in pending], state.memories[0] if state.memories else None, cfg)
    return [SideMemory(weight, min(thresholds))]


def merge_shards(original: torch.Tensor, shards: list[torch.Tensor], previous: torch.Tensor | None,
                 cfg: WiseConfig) -> torch.Tensor:
    """``W_v + TIES`` of ``shards`` (and the previous merged memory, weighted per
    ``cfg.repeated_merge``)."""
    tuned = list(shards) + ([previous] if previous is not None else [])
    return ties_merge(original, tuned, merge_weights(len(shards), previous is not None, cfg.repeated_merge),
                      cfg.ties_density)


# -- editing --------------------------------------------------------------------------------------
class _UpperBlocks:
    """Runs blocks ``first..`` of a model again from their inputs captured on one forward pass.

    ``W_v'`` sits in block ``first``; nothing below it depends on ``W_v'``, so each SGD step only
    runs the blocks from ``first`` up, then the final norm and the output head at the target
    positions."""

    def __init__(self, adapter: ModelAdapter, first: int):
        self.adapter, self.first = adapter, first
        self.calls: dict[int, tuple[tuple, dict]] = {}
        self.keys: torch.Tensor | None = None  # the W_out inputs of block ``first`` [B, T, d_k]

    @torch.no_grad()
    def capture(self, model, batch) -> None:
        def record(b):
            def hook(module, args, kwargs):
                self.calls[b] = (tuple(args), dict(kwargs))
            return hook

        def record_keys(module, args):
            self.keys = args[0].detach()

        handles = [self.adapter.block(b).register_forward_pre_hook(record(b), with_kwargs=True)
                   for b in range(self.first, self.adapter.num_layers)]
        handles.append(self.adapter.w_out_module(self.first).register_forward_pre_hook(record_keys))
        try:
            model(**batch.model_inputs(), use_cache=False)
        finally:
            for h in handles:
                h.remove()

    def hidden(self) -> torch.Tensor:
        """The final hidden states ``[B, T, d]`` (after the final norm)."""
        args0, kw0 = self.calls[self.first]
        h = (args0[0] if args0 else kw0["hidden_states"]).detach()
        for b in range(self.first, self.adapter.num_layers):
            args, kw = self.calls[b]
            kw = {k: v for k, v in kw.items() if k != "hidden_states"}
            out = self.adapter.block(b)(h, *args[1:], **kw)
            h = out[0] if isinstance(out, tuple) else out
        return self.adapter.final_norm(h)


@dataclass
class _EditBatch:
    batch: object  # PromptBatch; the last row is the irrelevant input x_i
    n_edit: int


class WiseEditor:
    """WISE editing on one model: the ``editing.method: wise`` counterpart of
    :class:`~blueedit.editing.editor.Editor` (same ``edit_round`` / ``state`` interface).

    It installs a :class:`SideMemoryLayer` at ``hparams.layers[0]`` and trains one edit at a time
    (a round of several requests is that many edits in order). Per edit: the prompt under every
    context prefix plus the bare prompt, each followed by the target (loss on target tokens only),
    and one irrelevant input ``x_i`` as the last row; masked SGD on the current shard's ``W_v'``
    with ``−log P + L_a`` (:func:`routing_margin_loss`); then the shard's threshold is updated to
    the least Δact of its edits, a full shard is stored, and every ``merge_every`` edits the shards
    are TIES-merged (:func:`merge_shards`).
    """

    def __init__(self, model, tokenizer, adapter: ModelAdapter, hparams, context_templates: list[str],
                 irrelevant: list[str], state: WiseState | None = None):
        if len(hparams.layers) != 1:
            raise UserInputError(f"editing.method wise edits one layer: set editing.layers to [L], got {hparams.layers}")
        adapter.check_layers(hparams.layers)
        if not irrelevant:
            raise UserInputError("editing.wise.irrelevant_dataset gave no irrelevant inputs (records with a "
                             "neighborhood prompt and answer)")
        self.model, self.tokenizer, self.adapter, self.hp = model, tokenizer, adapter, hparams
        self.cfg: WiseConfig = hparams.wise
        self.layer = hparams.layers[0]
        self.device = next(model.parameters()).device
        self.irrelevant = list(irrelevant)
        self.on_layer = None  # Editor interface (diagnostic callbacks): WISE has no closed-form writes
        self.on_target_step: Callable[[int, int, float], None] | None = None
        self.wrapper = attach(model, adapter, self.layer, self.cfg)
        self.state = state or WiseState(context_templates=list(context_templates))
        self._init_state()

    # -- state -----------------------------------------------------------------------------------
    def _init_state(self) -> None:
        w0 = self.wrapper.w_orig().detach()
        st = self.state
        if st.original is None:
            st.layer = self.layer
            st.original = w0.clone()
        self.check_original()

    def check_original(self) -> None:
        st = self.state
        if st.layer != self.layer:
            raise UserInputError(f"the WISE state is for layer {st.layer}, editing.layers is [{self.layer}]")
        if not torch.equal(st.original.to(self.device), self.wrapper.w_orig().detach()):
            raise UserInputError(f"the WISE state was made on another model: its original W_out of layer {self.layer} "
                             "differs from the loaded model's")

    def load_state(self, state: WiseState) -> None:
        """Adopt ``state`` (a resumed checkpoint) and route with it."""
        self.state = state
        self.check_original()
        self.refresh()

    def refresh(self) -> None:
        """Rebuild the router's candidates from the state (after every edit and on load)."""
        self.wrapper.candidates = [SideMemory(m.weight.to(self.device), m.threshold)
                                   for m in candidates(self.state, self.cfg)]

    def remove(self) -> None:
        """Delete the side memory: put the original module back (the model is the pre-edit one)."""
        detach(self.model, self.adapter, self.layer)

    # -- Editor interface ------------------------------------------------------------------------
    def evaluation_weights(self):
        return nullcontext()

    def finalize(self) -> None:
        """WISE has no post-processing."""

    def check_requests(self, requests: list[EditRequest], index: int) -> None:
        from blueedit.editing.editor import EditRoundError

        if not requests:
            raise EditRoundError(f"round {index} has no edit requests")
        validate_requests(requests)
        for i, r in enumerate(requests):
            try:
                tokenize_target(self.tokenizer, r.target_new)
            except ValueError as e:
                raise EditRecordError(f"edit record {i} (case_id={r.case_id!r}): 'target_new' {e}") from None

    def edit_round(self, requests: list[EditRequest], index: int | None = None):
        """Edit ``requests`` one after the other. Atomic: on any error the state before the round
        is restored and :class:`~blueedit.editing.editor.EditRoundError` names the round."""
        from blueedit.editing.editor import EditRoundError, RoundReport

        index = self.state.rounds_done if index is None else index
        self.check_requests(requests, index)
        t0 = time.perf_counter()
        snapshot = self.state.to_dict()
        report = RoundReport(index, [r.case_id for r in requests], {}, {self.layer: []}, {self.layer: []}, 0.0)
        try:
            for r in requests:
                steps, loss = self._edit_one(r)
                report.target_steps[self.layer].append(steps)
                report.target_loss[self.layer].append(loss)
        except Exception as e:
            self.state = WiseState.from_dict(snapshot, self.device)
            self.refresh()
            raise EditRoundError(f"round {index} (case_ids {report.case_ids}) failed, model left unchanged: {e}") from e
        finally:
            self.wrapper.mode = "route"
            self.wrapper.edit_weight = None
        self.state.rounds_done = index + 1
        w = self.state.current if self.state.current_edits else None
        if w is not None:
            report.update_norms[self.layer] = float((w - self.state.original).norm())
        report.seconds = time.perf_counter() - t0
        return report

    def _rows(self, request: EditRequest, irrelevant: str) -> _EditBatch:
        tok = self.tokenizer
        target = tokenize_target(tok, request.target_new)
        prompts, conts = [], []
        for c in self.state.context_templates:
            ids, _ = encode_prompt(tok, c.replace("{}", request.prompt, 1), request.subject)
            prompts.append(ids)
            conts.append(target)
        ids, _ = encode_prompt(tok, irrelevant, None)
        prompts.append(ids)
        conts.append([])
        batch = pad_batch(prompts, [-1] * len(prompts), conts, pad_id=pad_token_id(tok), padding_side="right")
        return _EditBatch(batch.to(self.device), len(prompts) - 1)

    def _start_shard(self) -> None:
        st = self.state
        st.current = st.original.clone()
        st.current_mask = random_mask(tuple(st.original.shape), self.cfg.mask_ratio,
                                      self.cfg.seed + st.shards_started).to(self.device)
        st.current_threshold = math.inf
        st.current_edits = 0
        st.shards_started += 1

    def _distances(self, keys: torch.Tensor, w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        act = self.wrapper.activation
        return activation_distance(keys, w, self.state.original, mask, act, self.wrapper.bias)

    def _edit_one(self, request: EditRequest) -> tuple[int, float]:
        cfg, st = self.cfg, self.state
        if st.current is None or st.current_edits >= cfg.shard_size:
            self._start_shard()
        eb = self._rows(request, self.irrelevant[st.edits_done % len(self.irrelevant)])
        batch, n = eb.batch, eb.n_edit
        upper = _UpperBlocks(self.adapter, self.layer)
        self.wrapper.mode = "original"
        upper.capture(self.model, batch)
        keys, mask = upper.keys, batch.attention_mask
        w = st.current.detach().clone().float().requires_grad_(True)
        w0 = st.original.float()
        m = st.current_mask.to(w.dtype)
        self.wrapper.mode = "edit"
        self.wrapper.edit_weight = w
        edit_rows = torch.arange(n, device=self.device)
        tgt = batch.select(edit_rows)
        prev, loss_value, steps = math.inf, math.inf, 0
        for it in range(cfg.n_iter):
            with torch.enable_grad():
                hidden = upper.hidden()[:n]
                h = gather_positions(hidden, tgt.target_index)  # [n, J, d]
                logits = self.adapter.lm_head(h).float()
                lp = torch.log_softmax(logits, -1).gather(-1, tgt.target_ids.unsqueeze(-1)).squeeze(-1)
                tm = tgt.target_mask.to(lp.dtype)
                nll = (-(lp * tm).sum(-1) / tm.sum(-1)).mean()
                d = self._distances(keys, w, mask)
                loss = nll + routing_margin_loss(d[:n], d[n:], cfg.alpha, cfg.beta, cfg.gamma)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise RuntimeError(f"WISE loss is not finite at step {it}")
            if abs(loss_value - prev) <= cfg.early_stop_delta and loss_value <= cfg.early_stop_loss:
                break
            prev = loss_value
            (grad,) = torch.autograd.grad(loss, w)
            with torch.no_grad():
                w -= cfg.lr * m * (grad + cfg.weight_decay * w)
                if cfg.norm_constraint is not None:
                    w.copy_(torch.clamp(w, w0 - cfg.norm_constraint, w0 + cfg.norm_constraint))
            steps = it + 1
            if self.on_target_step is not None:
                self.on_target_step(self.layer, it, loss_value)
        with torch.no_grad():
            eps = float(self._distances(keys[:n], w, mask[:n]).mean())
        st.current = w.detach().to(st.original.dtype)
        st.current_threshold = min(st.current_threshold, eps)
        st.current_edits += 1
        st.edits_done += 1
        if st.current_edits >= cfg.shard_size:
            st.shards.append(st.current)
            st.shard_thresholds.append(st.current_threshold)
            st.current, st.current_mask, st.current_edits, st.current_threshold = None, None, 0, math.inf
        if st.edits_done % cfg.merge_every == 0 and st.shards:
            self._merge()
        self.refresh()
        return steps, loss_value

    def _merge(self) -> None:
        st, cfg = self.state, self.cfg
        threshold = min(st.shard_thresholds)
        if cfg.variant == "retrieve":
            st.memories.append(merge_shards(st.original, st.shards, None, cfg))
            st.memory_thresholds.append(threshold)
        else:
            previous = st.memories[0] if st.memories else None
            st.memories = [merge_shards(st.original, st.shards, previous, cfg)]
            st.memory_thresholds = [min([threshold] + st.memory_thresholds)]
        st.shards, st.shard_thresholds = [], []
        st.merges_done += 1


# -- installing, removing, saving, loading --------------------------------------------------------
def attach(model, adapter: ModelAdapter, layer: int, cfg: WiseConfig) -> SideMemoryLayer:
    """Put a :class:`SideMemoryLayer` in place of ``W_out`` of ``layer`` (or return the one there),
    and a pre-hook on the model's backbone that hands it the attention mask of every call."""
    module = adapter.w_out_module(layer)
    if isinstance(module, SideMemoryLayer):
        return module
    activation = _activation_of(model) if cfg.distance_activation == "model" else None
    wrapper = SideMemoryLayer(module, adapter.layout.transposed, activation, cfg.act_ratio)
    parent, _, name = adapter.layout.w_out.rpartition(".")
    block = adapter.block(layer)
    setattr(block.get_submodule(parent) if parent else block, name, wrapper)

    def hand_mask(mod, args, kwargs):
        wrapper.token_mask = kwargs.get("attention_mask")

    backbone = getattr(model, "base_model", model)
    wrapper._hook = backbone.register_forward_pre_hook(hand_mask, with_kwargs=True)
    return wrapper


def detach(model, adapter: ModelAdapter, layer: int) -> None:
    """Put the original ``W_out`` module back (deleting the side memory)."""
    module = adapter.w_out_module(layer)
    if not isinstance(module, SideMemoryLayer):
        return
    module._hook.remove()
    parent, _, name = adapter.layout.w_out.rpartition(".")
    block = adapter.block(layer)
    setattr(block.get_submodule(parent) if parent else block, name, module.original)


def side_memory_entries(saved: dict) -> dict[str, torch.Tensor | str]:
    """What the saved side memory's checksums cover: each tensor of its state by name
    (``original``, ``shards.0``, ...), and, as JSON text, its config (``config``) and the rest of
    its state (``counters``: thresholds, counts, context templates)."""
    out: dict[str, torch.Tensor | str] = {"config": json.dumps(saved["config"], sort_keys=True)}
    rest = {}
    for key, value in saved["state"].items():
        if isinstance(value, torch.Tensor):
            out[key] = value
        elif isinstance(value, list) and any(isinstance(t, torch.Tensor) for t in value):
            out.update({f"{key}.{i}": t for i, t in enumerate(value)})
        else:
            rest[key] = value
    out["counters"] = json.dumps(rest, sort_keys=True)
    return out


def save_side_memory(editor: WiseEditor, directory: str | Path) -> Path:
    """Write the side memory beside a saved model (``wise_side_memory.pt``: the config, the state
    and the SHA-256 of each of its tensors), to a temporary file renamed into place. The model
    directory itself holds the *original* weights, a standard checkpoint."""
    from dataclasses import asdict

    from blueedit.editing.statistics import atomic_write
    from blueedit.models.loading import entry_digests

    path = Path(directory) / SIDE_MEMORY_FILE
    saved = {"config": asdict(editor.cfg), "state": editor.state.to_dict()}
    saved["sha256"] = entry_digests(side_memory_entries(saved))
    atomic_write(path, lambda tmp: torch.save(saved, tmp))
    return path


def save_wise_model(editor: WiseEditor, directory: str | Path) -> None:
    """``save_pretrained`` of the model with its original ``W_out`` module in place (a standard
    checkpoint of the pre-edit model) and :func:`save_side_memory` beside it; the wrapper is put
    back afterwards."""
    editor.remove()
    try:
        editor.model.save_pretrained(directory)
    finally:
        editor.wrapper = attach(editor.model, editor.adapter, editor.layer, editor.cfg)
        editor.refresh()
    save_side_memory(editor, directory)


def load_side_memory(model, directory: str | Path, adapter: ModelAdapter | None = None) -> SideMemoryLayer | None:
    """Re-attach the side memory saved in ``directory`` to ``model`` (loaded from that directory),
    routing as it did when saved; ``None`` when the directory has none. Every tensor is verified
    against its recorded SHA-256 first (:class:`~blueedit.models.loading.ChecksumError` names the
    tensor at fault, and nothing is attached)."""
    from blueedit.models.loading import verify_digests

    path = Path(directory) / SIDE_MEMORY_FILE
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, or not a torch file
        raise UserInputError(f"{path} is unreadable ({type(e).__name__}: {e}); nothing was used") from None
    verify_digests(path, side_memory_entries(saved), saved.get("sha256"), kind="entry")
    cfg = WiseConfig(**{k: v for k, v in saved["config"].items()})
    adapter = adapter or ModelAdapter(model)
    device = next(model.parameters()).device
    state = WiseState.from_dict(saved["state"], device)
    wrapper = attach(model, adapter, state.layer, cfg)
    if not torch.equal(state.original.to(wrapper.w_orig().dtype), wrapper.w_orig().detach()):
        raise UserInputError(f"{path}: the side memory was made on other weights than the model in {directory}")
    wrapper.candidates = [SideMemory(m.weight.to(device), m.threshold) for m in candidates(state, cfg)]
    return wrapper


def irrelevant_inputs(requests: list[EditRequest], exclude: set[str] = frozenset()) -> list[str]:
    """``x_i`` texts: each record's first neighborhood prompt followed by its answer (zsRE
    ``loc? loc_ans``), skipping prompts in ``exclude`` (the evaluated locality prompts)."""
    out = []
    for r in requests:
        answers = r.neighborhood_answers()
        for p, a in zip(r.neighborhood, answers):
            if p not in exclude and a.strip():
                out.append(f"{p} {a.strip()}")
                break
    return out


def wise_context_templates(model, tokenizer, lengths: list[int]) -> list[str]:
    """``["{}"]`` plus one generated prefix per seed word (:data:`WISE_CONTEXT_SEEDS`) and length."""
    from blueedit.editing.targets import generate_context_templates

    out = ["{}"]
    for n in lengths:
        out.extend(generate_context_templates(model, tokenizer, seeds=WISE_CONTEXT_SEEDS, length=n)[1:])
    return out
