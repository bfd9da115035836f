"""A³E: compositional editing with per-edit adapters (docs/algorithms.md, "A³E").

Piao, Wang, Wu, Wei, *A³E: Towards Compositional Model Editing*, NeurIPS 2025 (OpenReview
``OwU0mgfKUi``). The paper's equations were not available; the pieces below are reconstructed from
its abstract and its released code, and every open choice is an option (docs/algorithms.md lists
them).

One MLP at layer ``ℓ``, ``h = W_down (σ(W_gate x) ⊙ (W_up x))`` with ``x ∈ R^d`` its input and
width ``d_k``. Edit ``e`` owns a rank-1 adapter on ``W_up``:

    Δu_e(x)  = cos(x, a_e) · (m_e ⊙ b_e)                 a_e ∈ R^d, b_e ∈ R^{d_k} (starts at 0)
    u(x)     = W_up x + merge_{e ∈ S(q)} Δu_e(x)          at positions ≥ the prompt's last token
    m_e      = 1[j ∈ ∪_{y ∈ answer tokens} pick_k(s_j(y))],
    s_j(y)   = ⟨norm_final(W_down[:, j]), E_out[y]⟩        (adaptive combination: the mask)
    L        = L_e + α L_c + β L_o                         (adaptive regularization)
    L_e      = − mean_i log P(y_i | prompt, y_<i)
    L_c      = |cos(x_[la], a_e)|                           x_[la]: the MLP input at the last answer token
    L_o      = 1 / (|Y| (V − 1)) Σ_i Σ_{v ≠ y_i} ReLU(z_{i,v})   (against incorrect preceding)
    S(q)     = top-m {e : max_t cos(h_t(q), k_e) > τ}        (routing ``retrieve``; ``oracle``: given)
    merge    = Σ_e Δu_e, zeroing coordinates where the non-zero Δu_{e,j} differ in sign (``sign``)

``k_e`` is the output of the MLP at an early layer at the subject's last token of the edit prompt.
The pieces are pure functions (:func:`cosine_gate`, :func:`adapter_deltas`, :func:`merge_deltas`,
:func:`unit_answer_scores`, :func:`answer_mask`, :func:`preceding_regularizer`,
:func:`state_regularizer`, :func:`retrieve`), one module hook (:class:`AdapterHook`) and the
editor (:class:`A3EEditor`). The model's weights are never written: removing the hooks gives the
original model back bit for bit.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from blueedit.config import A3EConfig, MaskRule, MergeRule
from blueedit.data.records import EditRequest
from blueedit.models.adapters import ModelAdapter
from blueedit.models.loading import tensor_digest
from blueedit.models.tokens import encode_prompt, gather_positions, pad_batch, pad_token_id, tokenize_target

#: The file a saved A³E state goes to (tensors in safetensors, settings in its metadata).
ADAPTERS_FILE = "a3e_adapters.safetensors"


# -- pure functions -------------------------------------------------------------------------------
def cosine_gate(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``cos(x, a_e)`` for every edit: ``x`` ``[..., d]``, ``a`` ``[E, d]`` → ``[..., E]``."""
    return F.normalize(x.float(), dim=-1) @ F.normalize(a.float(), dim=-1).T


def adapter_deltas(gate: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``Δu_e = gate_e · (m_e ⊙ b_e)``: ``gate`` ``[..., E]``, ``b`` and ``mask`` ``[E, d_k]`` →
    ``[..., E, d_k]``."""
    return gate.unsqueeze(-1) * (mask.to(b.dtype) * b)


def merge_deltas(deltas: torch.Tensor, rule: MergeRule) -> torch.Tensor:
    """Merge ``[..., E, d_k]`` over ``E`` into ``[..., d_k]``.

    ``sum``: ``Σ_e Δu_e``. ``sign``: the same sum, with coordinate ``j`` set to 0 where two
    non-zero ``Δu_{e,j}`` have opposite signs (coordinates where at most one edit is non-zero,
    or where all agree, keep their sum)."""
    total = deltas.sum(-2)
    if rule == "sum":
        return total
    positive = (deltas > 0).any(-2)
    negative = (deltas < 0).any(-2)
    return torch.where(positive & negative, torch.zeros_like(total), total)


def unit_answer_scores(w_down: torch.Tensor, norm: Callable[[torch.Tensor], torch.Tensor],
                       unembed_rows: torch.Tensor) -> torch.Tensor:
    """``s_j(y) = ⟨norm(W_down[:, j]), E_out[y]⟩``: how unit ``j``'s output direction, passed
    through the final norm, reads out as answer token ``y``.

    Args:
        w_down: ``[d, d_k]`` (math orientation).
        norm: the model's final norm, applied to each column as a ``[d]`` vector.
        unembed_rows: ``E_out[y]`` of the answer tokens, ``[n, d]``.

    Returns:
        ``[n, d_k]`` float32.
    """
    columns = norm(w_down.T.to(unembed_rows.dtype)).float()  # [d_k, d]
    return unembed_rows.float() @ columns.T


def answer_mask(scores: torch.Tensor, k: int, rule: MaskRule) -> torch.Tensor:
    """``m = 1[j ∈ ∪_y pick_k(s_j(y))]`` over the answer tokens (rows of ``scores``, ``[n, d_k]``):
    ``lowest`` picks the ``k`` smallest ``s_j(y)`` per token, ``highest`` the ``k`` largest, ``abs``
    the ``k`` largest ``|s_j(y)|``; ``none`` keeps every unit. Returns ``[d_k]`` bool."""
    if rule == "none":
        return torch.ones(scores.shape[-1], dtype=torch.bool, device=scores.device)
    k = min(max(int(k), 1), scores.shape[-1])
    values = scores.abs() if rule == "abs" else scores
    idx = torch.topk(values, k, dim=-1, largest=rule != "lowest").indices  # [n, k]
    m = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
    m[idx.reshape(-1)] = True
    return m


def preceding_regularizer(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``L_o = 1 / (|Y| (V − 1)) Σ_i Σ_{v ≠ y_i} ReLU(z_{i,v})``: the positive logits of every
    token but the answer's, at the answer positions. ``logits`` ``[n, V]``, ``targets`` ``[n]``."""
    n, v = logits.shape
    others = torch.ones_like(logits, dtype=torch.bool)
    others[torch.arange(n, device=logits.device), targets] = False
    return (torch.relu(logits.float()) * others).sum() / (n * (v - 1))


def state_regularizer(x_last_answer: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``L_c = |cos(x_[la], a_e)|``: the gate at the last answer token, pushed to 0 so the adapter
    falls silent once its answer is out. ``x_last_answer`` and ``a`` ``[d]``."""
    return cosine_gate(x_last_answer[None], a[None]).abs().squeeze()


def retrieve(states: torch.Tensor, keys: torch.Tensor, tau: float, top_m: int,
             token_mask: torch.Tensor | None = None) -> list[int]:
    """``S(q) = top-m {e : max_t cos(h_t(q), k_e) > τ}``, best first.

    Args:
        states: ``h_t(q)``, ``[T, d]``; ``token_mask``: ``[T]``, 1 for real tokens.
        keys: ``k_e``, ``[E, d]``.
    """
    if keys.shape[0] == 0:
        return []
    cos = cosine_gate(states, keys)  # [T, E]
    if token_mask is not None:
        cos = cos.masked_fill(~token_mask.bool()[:, None], -2.0)
    best = cos.max(0).values  # [E]
    order = torch.argsort(best, descending=True, stable=True)
    return [int(e) for e in order[:top_m] if best[e] > tau]


# -- state ----------------------------------------------------------------------------------------
@dataclass
class A3EState:
    """Everything A³E adds to a model: per edit ``a_e`` ``[E, d]``, ``b_e`` and ``m_e``
    ``[E, d_k]``, ``k_e`` ``[E, d]``, its ``case_id``; the layers, and a digest of the model the
    adapters were trained on (checked on load)."""

    layer: int
    key_layer: int
    a: torch.Tensor
    b: torch.Tensor
    mask: torch.Tensor
    keys: torch.Tensor
    case_ids: list = field(default_factory=list)
    model_digest: str = ""
    rounds_done: int = 0
    finalized: bool = False  # never set: A³E has no post-processing (kept for the Editor interface)

    @property
    def num_edits(self) -> int:
        return int(self.b.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"a": self.a, "b": self.b, "mask": self.mask.to(torch.uint8), "keys": self.keys}

    def to_dict(self) -> dict:
        return {"method": "a3e", "layer": self.layer, "key_layer": self.key_layer,
                **{k: v.detach().cpu().clone() for k, v in self.tensors().items()},
                "case_ids": list(self.case_ids), "model_digest": self.model_digest, "rounds_done": self.rounds_done}

    @classmethod
    def from_dict(cls, d: dict, device: torch.device | str = "cpu") -> A3EState:
        return cls(int(d["layer"]), int(d["key_layer"]), d["a"].to(device), d["b"].to(device),
                   d["mask"].to(device).bool(), d["keys"].to(device), list(d["case_ids"]), str(d["model_digest"]),
                   int(d.get("rounds_done", 0)))

    @staticmethod
    def is_a3e(d: dict | None) -> bool:
        return bool(d) and d.get("method") == "a3e"


def model_digest(model) -> str:
    """SHA-256 over every parameter's name and :func:`tensor_digest` (the weights A³E was trained on)."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(f"{name}:{tensor_digest(p)};".encode())
    return h.hexdigest()


# -- the hooks ------------------------------------------------------------------------------------
class AdapterHook:
    """Adds the merged adapters to the output of ``W_up`` at layer ``ℓ`` (a forward hook), and
    keeps the key-layer states and the attention mask of the same call for routing.

    Which edits act on row ``r`` of a call: in training, the one adapter being trained
    (``training``); with ``selection`` set (oracle routing, or a retrieval frozen for generation),
    ``selection[r]``; otherwise :func:`retrieve` on this call's key-layer states. Which positions:
    ``position_mask`` ``[B, T]`` when set; else positions ``≥ start[r]`` when ``start`` is set and
    the call passed ``position_ids``; else all.
    """

    def __init__(self, editor: A3EEditor):
        self.editor = editor
        self.training: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (a, b, m)
        self.selection: list[int] | list[list[int]] | None = None  # one list for all rows, or one per row
        self.position_mask: torch.Tensor | None = None
        self.start: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.token_mask: torch.Tensor | None = None
        self.key_states: torch.Tensor | None = None
        self.last_selection: list[list[int]] = []
        self.handles: list = []

    # the three hooks
    def on_model(self, module, args, kwargs):
        self.token_mask = kwargs.get("attention_mask")
        self.positions = kwargs.get("position_ids")
        self.key_states = None

    def on_key_layer(self, module, args, output):
        self.key_states = output.detach()

    def on_up_proj(self, module, args, output):
        x = args[0]
        if self.training is not None:
            a, b, m = self.training
            delta = adapter_deltas(cosine_gate(x, a[None]), b[None], m[None]).squeeze(-2)
        else:
            delta = self._routed_delta(x)
            if delta is None:
                return output
        return output + (delta * self._positions_for(x)[..., None]).to(output.dtype)

    def _routed_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        st, cfg = self.editor.state, self.editor.cfg
        selection = self._retrieve(x.shape[0]) if self.selection is None else _per_row(self.selection, x.shape[0])
        self.last_selection = selection
        if not any(selection):
            return None
        delta = torch.zeros(*x.shape[:-1], st.b.shape[-1], device=x.device)
        for r, ids in enumerate(selection):
            if ids:
                i = torch.tensor(ids, device=x.device)
                d = adapter_deltas(cosine_gate(x[r], st.a[i]), st.b[i].float(), st.mask[i])
                delta[r] = merge_deltas(d, cfg.merge)
        return delta

    def _retrieve(self, batch: int) -> list[list[int]]:
        st, cfg = self.editor.state, self.editor.cfg
        if self.key_states is None or st.num_edits == 0:
            return [[] for _ in range(batch)]
        mask = self._token_mask(self.key_states)
        return [retrieve(self.key_states[r], st.keys, cfg.tau, cfg.top_m, None if mask is None else mask[r])
                for r in range(batch)]

    def _token_mask(self, h: torch.Tensor) -> torch.Tensor | None:
        m = self.token_mask
        if m is None or m.dim() != 2 or m.shape[0] != h.shape[0] or m.shape[1] < h.shape[1]:
            return None
        return m[:, -h.shape[1]:].to(h.device)

    def _positions_for(self, x: torch.Tensor) -> torch.Tensor:
        B, T = x.shape[:2]
        pm = self.position_mask
        if pm is not None and tuple(pm.shape) == (B, T):
            return pm.to(x.device, torch.float32)
        if self.start is not None and self.positions is not None and tuple(self.positions.shape[-1:]) == (T,):
            return (self.positions.expand(B, T) >= self.start.to(self.positions.device)[:, None]).float()
        return torch.ones(B, T, device=x.device)


def _per_row(selection: list, batch: int) -> list[list[int]]:
    """One list of edits per row from a routing given for every row or per row."""
    if selection and isinstance(selection[0], list):
        if len(selection) != batch:
            raise ValueError(f"A³E routing names edits for {len(selection)} rows, the call has {batch}")
        return selection
    return [list(selection)] * batch


# -- editing --------------------------------------------------------------------------------------
@dataclass
class EditTrace:
    """What training one adapter did: the final loss and its three terms, seconds, mask size."""

    case_id: object
    loss: float
    loss_e: float
    loss_c: float
    loss_o: float
    seconds: float
    mask_units: int


class A3EEditor:
    """A³E on one Hugging Face causal LM: trains one adapter per edit, routes, merges, generates,
    saves and loads. Also the ``editing.method: a3e`` counterpart of
    :class:`~blueedit.editing.editor.Editor` (``edit_round`` / ``state``).

    Per edit (one at a time; the other adapters are off): the prompt followed by the answer; the
    residual entering block ``ℓ`` is captured once, and each of ``cfg.steps`` Adam steps runs the
    blocks from ``ℓ`` up, the final norm and the output head (``L`` in the module docstring).
    """

    def __init__(self, model, tokenizer, cfg: A3EConfig, layer: int | None = None,
                 adapter: ModelAdapter | None = None, state: A3EState | None = None):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.adapter = adapter or ModelAdapter(model)
        self.layer = self.adapter.num_layers - 1 if layer is None else int(layer)
        self.adapter.check_layers([self.layer, cfg.key_layer])
        if cfg.routing == "retrieve" and cfg.key_layer >= self.layer:
            raise ValueError(f"editing.a3e.key_layer ({cfg.key_layer}) must be below the adapted layer "
                             f"{self.layer}: the keys are read before the adapters act")
        self.up_proj = self._up_proj_module()
        self.device = next(model.parameters()).device
        self.on_layer = None  # Editor interface (diagnostic callbacks): A³E writes no weights
        self.on_target_step: Callable[[int, int, float], None] | None = None
        self.traces: list[EditTrace] = []
        self.hook = AdapterHook(self)
        self.state = state or self._empty_state()
        self.check_state(self.state)
        self.attach()

    def _up_proj_module(self):
        try:
            return self.adapter.block(self.layer).get_submodule(self.cfg.up_proj)
        except AttributeError:
            raise ValueError(f"editing.a3e.up_proj {self.cfg.up_proj!r}: block {self.layer} has no such module "
                             "(A³E adapts a gated MLP's up projection, e.g. 'mlp.up_proj')") from None

    def _empty_state(self) -> A3EState:
        d, d_k = self.up_proj.weight.shape[1], self.up_proj.weight.shape[0]
        d_key = self.adapter.hidden_size()
        z = lambda *s: torch.zeros(*s, device=self.device)  # noqa: E731
        return A3EState(self.layer, self.cfg.key_layer, z(0, d), z(0, d_k), z(0, d_k).bool(), z(0, d_key),
                        model_digest=model_digest(self.model))

    def check_state(self, state: A3EState) -> None:
        if (state.layer, state.key_layer) != (self.layer, self.cfg.key_layer):
            raise ValueError(f"the A³E state is for layer {state.layer} (keys at {state.key_layer}); the editor "
                             f"is set to layer {self.layer} (keys at {self.cfg.key_layer})")
        if state.model_digest and state.model_digest != model_digest(self.model):
            raise ValueError("the A³E state was made on other weights than the loaded model's (model digest differs)")

    # -- installing and removing ----------------------------------------------------------------
    def attach(self) -> None:
        """Install the hooks (idempotent)."""
        if self.hook.handles:
            return
        backbone = getattr(self.model, "base_model", self.model)
        self.hook.handles = [
            backbone.register_forward_pre_hook(self.hook.on_model, with_kwargs=True),
            self.adapter.w_out_module(self.cfg.key_layer).register_forward_hook(self.hook.on_key_layer),
            self.up_proj.register_forward_hook(self.hook.on_up_proj),
        ]

    def remove(self) -> None:
        """Remove the hooks: the model computes exactly what it did before editing."""
        for h in self.hook.handles:
            h.remove()
        self.hook.handles = []

    @contextmanager
    def routed(self, selection: Sequence[int] | Sequence[Sequence[int]] | None):
        """Route every row to the edits ``selection`` (indices into the store; one list for all
        rows or one per row) instead of retrieving; ``None``: retrieve."""
        before = self.hook.selection
        if selection is None:
            self.hook.selection = None
        elif not selection or not isinstance(selection[0], (list, tuple)):
            self.hook.selection = list(selection)
        else:
            self.hook.selection = [list(s) for s in selection]
        try:
            yield
        finally:
            self.hook.selection = before

    @contextmanager
    def disabled(self):
        """No adapter acts (the pre-edit model) while inside."""
        with self.routed([]):
            yield

    # -- editing ----------------------------------------------------------------------------------
    def check_requests(self, requests: list[EditRequest], index: int = 0) -> None:
        from blueedit.editing.editor import check_round

        check_round(self.tokenizer, requests, index)

    def edit(self, requests: list[EditRequest]) -> list[int]:
        """Train one adapter per request and add it to the store; returns their indices. Atomic:
        on an error nothing is added."""
        self.check_requests(requests)
        snapshot = self.state.to_dict()
        first = self.state.num_edits
        try:
            for r in requests:
                self._edit_one(r)
        except Exception:
            self.state = A3EState.from_dict(snapshot, self.device)
            raise
        finally:
            self.hook.training = None
            self.hook.position_mask = None
        return list(range(first, self.state.num_edits))

    def _edit_one(self, request: EditRequest) -> None:
        from blueedit.editing.wise import _UpperBlocks

        t0 = time.perf_counter()
        cfg, tok = self.cfg, self.tokenizer
        ids, fact = encode_prompt(tok, request.prompt, request.subject)
        target = tokenize_target(tok, request.target_new)
        batch = pad_batch([ids], [fact], [target], pad_id=pad_token_id(tok)).to(self.device)
        last_prompt, last_answer = len(ids) - 1, len(ids) + len(target) - 1
        upper = _UpperBlocks(self.adapter, self.layer)
        captured: dict[str, torch.Tensor] = {}
        grab = self.up_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0].detach()))
        try:
            with self.disabled():
                upper.capture(self.model, batch)
        finally:
            grab.remove()
        x = captured["x"][0]  # [T, d], the MLP input at layer ℓ (no adapter acts below it)
        key = self.hook.key_states[0, fact].float()
        a = x[last_prompt].float().clone().requires_grad_(cfg.train_key)
        b = torch.zeros(self.state.b.shape[-1], device=self.device, requires_grad=True)
        m = self._mask_for(target)
        self.hook.training = (a, b, m)
        self.hook.position_mask = (torch.arange(batch.input_ids.shape[1], device=self.device) >= last_prompt)[None]
        params = [b, a] if cfg.train_key else [b]
        opt = torch.optim.Adam(params, lr=cfg.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
        targets = batch.target_ids[0]
        for step in range(cfg.steps):
            opt.zero_grad()
            with torch.enable_grad():
                h = gather_positions(upper.hidden(), batch.target_index)[0]  # [J, d]
                logits = self.adapter.lm_head(h).float()
                loss_e = F.cross_entropy(logits, targets)
                loss_c = state_regularizer(x[last_answer], a) if cfg.alpha else torch.zeros((), device=self.device)
                loss_o = preceding_regularizer(logits, targets) if cfg.beta else torch.zeros((), device=self.device)
                loss = loss_e + cfg.alpha * loss_c + cfg.beta * loss_o
            if not math.isfinite(float(loss.detach())):
                raise RuntimeError(f"A³E loss is not finite at step {step} (case_id={request.case_id!r})")
            loss.backward()
            opt.step()
            sched.step()
            if self.on_target_step is not None:
                self.on_target_step(self.layer, step, float(loss))
        st = self.state
        st.a = torch.cat([st.a, a.detach()[None].to(st.a.dtype)])
        st.b = torch.cat([st.b, b.detach()[None].to(st.b.dtype)])
        st.mask = torch.cat([st.mask, m[None]])
        st.keys = torch.cat([st.keys, key[None].to(st.keys.dtype)])
        st.case_ids.append(request.case_id)
        self.traces.append(EditTrace(request.case_id, float(loss.detach()), float(loss_e.detach()), float(loss_c.detach()), float(loss_o.detach()),
                                     time.perf_counter() - t0, int(m.sum())))

    @torch.no_grad()
    def _mask_for(self, target: list[int]) -> torch.Tensor:
        if self.cfg.mask == "none":
            return torch.ones(self.state.b.shape[-1], dtype=torch.bool, device=self.device)
        head = self.adapter.lm_head.weight
        scores = unit_answer_scores(self.adapter.get_w_out(self.layer), self.adapter.final_norm,
                                    head[torch.tensor(target, device=head.device)])
        k = max(1, round(self.cfg.mask_fraction * scores.shape[-1]))
        return answer_mask(scores, k, self.cfg.mask).to(self.device)

    # -- inference --------------------------------------------------------------------------------
    def generate(self, prompt: str, max_new_tokens: int = 40, stop: str | None = "\n",
                 edits: Sequence[int] | None = None, first_logits: list | None = None) -> str:
        """Greedy continuation of ``prompt``
        (:func:`~blueedit.evaluation.compositional.greedy_generate`), the adapters acting from the
        prompt's last token on. ``edits``: oracle routing to those store indices; ``None``: the
        routing of ``cfg.routing`` (``oracle`` without ``edits`` means none). A retrieval is made
        on the prompt and kept for the decoding steps."""
        from blueedit.evaluation.compositional import greedy_generate

        hook = self.hook
        selection = edits if edits is not None else (None if self.cfg.routing == "retrieve" else [])

        def keep_retrieval():
            if hook.selection is None:
                hook.selection = hook.last_selection

        hook.start = torch.tensor([len(self.tokenizer(prompt)["input_ids"]) - 1], device=self.device)
        try:
            with self.routed(selection):
                return greedy_generate(self.model, self.tokenizer, prompt, max_new_tokens, stop,
                                       after_prompt=keep_retrieval, first_logits=first_logits)
        finally:
            hook.start = None

    @torch.no_grad()
    def retrieved(self, prompt: str) -> list[int]:
        """The store indices :func:`retrieve` picks for ``prompt``."""
        enc = self.tokenizer(prompt, return_tensors="pt").to(self.device)
        with self.routed(None):
            self.model(**enc)
        return list(self.hook.last_selection[0]) if self.hook.last_selection else []

    # -- saving and loading ----------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write the store to ``directory/a3e_adapters.safetensors`` (the config, layers, case ids,
        the model digest and each tensor's digest in its metadata); atomic (temporary file, rename)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state.tensors().items()}
        meta = {"config": asdict(self.cfg), "layer": self.state.layer, "key_layer": self.state.key_layer,
                "case_ids": self.state.case_ids, "model_digest": self.state.model_digest,
                "rounds_done": self.state.rounds_done,
                "tensor_digests": {k: tensor_digest(v) for k, v in tensors.items()}}
        path = directory / ADAPTERS_FILE
        tmp = path.with_suffix(".tmp")
        save_file(tensors, tmp, metadata={"a3e": json.dumps(meta)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, model, tokenizer, directory: str | Path, adapter: ModelAdapter | None = None,
             **overrides) -> A3EEditor:
        """An editor over ``model`` with the store saved in ``directory`` (checked: every tensor's
        digest, and the model's digest against the one the adapters were trained on). ``overrides``
        change inference-time settings (``routing``, ``merge``, ``tau``, ``top_m``)."""
        from safetensors import safe_open

        path = Path(directory) / ADAPTERS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no saved A³E adapters")
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("a3e", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        for k, digest in meta.get("tensor_digests", {}).items():
            if k not in tensors or tensor_digest(tensors[k]) != digest:
                raise ValueError(f"{path}: tensor {k!r} does not match its recorded digest (corrupt file)")
        bad = set(overrides) - {"routing", "merge", "tau", "top_m"}
        if bad:
            raise ValueError(f"A3EEditor.load: {sorted(bad)} decide the trained adapters and cannot be overridden")
        cfg = A3EConfig(**{**meta["config"], **overrides})
        device = next(model.parameters()).device
        state = A3EState.from_dict({**meta, **tensors}, device)
        return cls(model, tokenizer, cfg, layer=state.layer, adapter=adapter, state=state)

    # -- Editor interface (editing.method: a3e under Lightning) -----------------------------------
    def load_state(self, state: A3EState) -> None:
        self.check_state(state)
        self.state = state

    def evaluation_weights(self):
        return nullcontext()

    def finalize(self) -> None:
        """A³E has no post-processing."""

    def edit_round(self, requests: list[EditRequest], index: int | None = None):
        """:meth:`edit` as one round of a stream; raises
        :class:`~blueedit.editing.editor.EditRoundError` naming the round on failure."""
        from blueedit.editing.editor import EditRoundError, RoundReport

        index = self.state.rounds_done if index is None else index
        self.check_requests(requests, index)
        t0 = time.perf_counter()
        n0 = len(self.traces)
        try:
            self.edit(requests)
        except Exception as e:
            raise EditRoundError(f"round {index} (case_ids {[r.case_id for r in requests]}) failed, "
                                 f"model left unchanged: {e}") from e
        self.state.rounds_done = index + 1
        new = self.traces[n0:]
        return RoundReport(index, [r.case_id for r in requests], {self.layer: float(self.state.b[-len(new):].norm())},
                           {self.layer: [self.cfg.steps] * len(new)}, {self.layer: [t.loss for t in new]},
                           time.perf_counter() - t0)
