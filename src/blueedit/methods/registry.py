"""The method registry: every editing method is one small object, found here by its name.

A method is an :class:`EditMethod` (or a subclass of :class:`~blueedit.methods.memit.Memit` for a
least-squares writer of ``W_out``). The engine (:class:`blueedit.editing.editor.Editor`, its
strategies in :mod:`blueedit.editing.strategy`, :class:`blueedit.module.EditingModule` and the
CLI) calls only these hooks, never a method by name:

==========================  =====================================================================
``check(hp)``               reject an :class:`~blueedit.config.EditingConfig` the method cannot run
                            (a ``ValueError`` naming the option), before any slow work
``least_squares``           ``True``: writes ``W_out`` with a closed-form solve, so ``strategy``
                            (``distribute`` / ``boundary``, BLUE) applies to it
``history_replay``          ``True``: HSE's ``α_i`` may weigh the edit history in its solve
``target_sites(hp)``        where the target optimizer adds δ (``("block",)``, PMET's
                            ``("attn", "mlp")``)
``residuals_at_mlp(hp)``    residuals in the ``W_out``-output space instead of the block output
``spread(z, v, i, m)``      the ``distribute`` residual of the ``i``-th of ``m`` layers
``prepare_layer(ed, l)``    add what the solve needs to the editor state (AlphaEdit's ``P^l``)
``solve(hp, inputs, R, K)`` pure: the factors ``(left, right)`` of ``ΔW = left @ right``
                            (``right`` ``None``: ``left`` is ``ΔW``); stores nothing
``post_round(ed, before)``  after a round's writes: rewrite them (RECT); returns per layer the
                            factors that replace the round's recorded update
``final_weights(ed)``       post-processing weights per layer (PRUNE), ``{}`` for none;
                            ``post_processing`` says whether there is any
``create_editor(module)``   an editor of its own (WISE's side memory) or ``None`` for
                            :class:`~blueedit.editing.editor.Editor`
``load_state(d, device)``   the editor state from a checkpoint's dictionary
``save_model(module, dir)`` write the edited model; ``carries_state``: save the editor state
                            beside it (``blueedit edit`` continuing, ``blueedit revert``)
``config_field``            the :class:`~blueedit.config.EditingConfig` field holding the
                            method's own settings (``wise``), left out of other methods'
                            settings fingerprint
==========================  =====================================================================

Adding a method is one module and one line: write the class, then either add it to
:data:`BUILTIN` (``name -> "module:Class"``, imported on first use) or call :func:`register`
with an instance (from anywhere, e.g. a test or a plugin, before the config is built).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from blueedit.config import UserInputError

#: The built-in methods: name -> ``"module:Class"``, imported when first asked for.
BUILTIN: dict[str, str] = {
    "memit": "blueedit.methods.memit:Memit",
    "alphaedit": "blueedit.methods.alphaedit:AlphaEdit",
    "prune": "blueedit.methods.prune:Prune",
    "rect": "blueedit.methods.rect:Rect",
    "pmet": "blueedit.methods.pmet:Pmet",
    "wise": "blueedit.methods.wise:Wise",
    "a3e": "blueedit.methods.a3e:A3E",
}

_REGISTERED: dict[str, EditMethod] = {}


@dataclass
class SolveInputs:
    """What a least-squares solve at one layer reads (float32/float64 tensors on one device).

    ``mom2``: ``C_0`` (``[d_k, d_k]``); ``history``: ``H``, the sum of earlier rounds' ``K Kᵀ``
    (``[d_k, d_k]``); ``history_weight``: HSE's ``α_i`` (1 without HSE); ``projection``: AlphaEdit's
    null-space projection ``P`` (``[d_k, d_k]``) or ``None``."""

    mom2: torch.Tensor
    history: torch.Tensor
    history_weight: float = 1.0
    projection: torch.Tensor | None = None


Factors = tuple[torch.Tensor, torch.Tensor | None]


class EditMethod:
    """A method's hooks with neutral defaults (see the module docstring for each)."""

    #: the ``editing.method`` value
    name: str = ""
    least_squares: bool = False
    history_replay: bool = False
    post_processing: bool = False
    carries_state: bool = True
    config_field: str | None = None

    def check(self, hp) -> None:
        """Raise a ``ValueError`` naming the option when ``hp`` does not apply to this method."""

    def target_sites(self, hp) -> tuple[str, ...]:
        return (hp.target.site,)

    def residuals_at_mlp(self, hp) -> bool:
        return hp.target.site == "mlp"

    def spread(self, z: torch.Tensor, values: torch.Tensor, position: int, num_layers: int) -> torch.Tensor:
        raise NotImplementedError(f"method {self.name!r} has no residual distribution")

    def prepare_layer(self, editor, layer: int) -> None:
        """Nothing to prepare."""

    def solve(self, hp, inputs: SolveInputs, residuals: torch.Tensor, keys: torch.Tensor) -> Factors:
        raise NotImplementedError(f"method {self.name!r} has no closed-form solve")

    def post_round(self, editor, before: dict[int, torch.Tensor], report) -> dict[int, Factors]:
        """Nothing to rewrite: the round's solves are its update."""
        return {}

    def final_weights(self, editor) -> dict[int, torch.Tensor]:
        return {}

    def create_editor(self, module):
        """``None``: the locate-then-edit :class:`~blueedit.editing.editor.Editor`."""
        return None

    def load_state(self, d: dict, device: torch.device | str = "cpu"):
        from blueedit.editing.editor import EditorState

        return EditorState.from_dict(d, device)

    def save_model(self, module, directory) -> None:
        module.lm.save_pretrained(directory)

    def config_settings(self, hp) -> dict[str, object]:
        """Extra ``editing`` settings a written config (``blueedit locate``) should state."""
        return {}


class SideMemoryMethod(EditMethod):
    """A method that trains weights beside the model at one layer (WISE's side memory, A³E's
    adapters) instead of writing ``W_out`` by a least-squares solve: no target vector, no
    ``strategy``, no compute dtype of its own, and no carried locate-then-edit state.

    Subclasses set ``label`` (the method as the papers write it) and ``trains`` (what it trains,
    for the messages)."""

    carries_state = False
    label: str = ""
    trains: str = "weights beside the model at one layer"

    def check(self, hp) -> None:
        name, label = self.name, self.label or self.name
        if hp.target.site != "block":
            raise UserInputError(f"editing.target.site {hp.target.site!r} does not apply to editing.method "
                                 f"{name!r} ({label} has no target); leave it at 'block'")
        if hp.target.stop_after != "none":
            raise UserInputError(f"editing.target.stop_after does not apply to editing.method {name!r} ({label} has "
                                 "no target vector); leave it at 'none'")
        if hp.strategy == "boundary":
            raise UserInputError(f"editing.strategy 'boundary' (BLUE) does not apply to editing.method {name!r}: "
                                 f"{label} {self.trains}; remove the strategy or set it to 'distribute'")
        if len(hp.layers) != 1:
            raise UserInputError(f"editing.method {name!r} edits one layer: set editing.layers to [L], got {hp.layers}")
        if hp.compute_dtype is not None or hp.autocast is not None:
            raise UserInputError("editing.compute_dtype / editing.autocast are not supported with editing.method "
                                 f"{name!r} (it trains in the model's dtype)")


def register(method: EditMethod) -> EditMethod:
    """Make ``method`` available as ``editing.method: <method.name>`` (replacing one of that name)."""
    if not method.name:
        raise UserInputError(f"{type(method).__name__} has no name")
    _REGISTERED[method.name] = method
    return method


def unregister(name: str) -> None:
    """Forget a method added with :func:`register` (built-ins come back on next use)."""
    _REGISTERED.pop(name, None)


def method_names() -> list[str]:
    """Every method name: the built-ins, then the registered ones."""
    return list(BUILTIN) + [n for n in _REGISTERED if n not in BUILTIN]


def get_method(name: str) -> EditMethod:
    """The method registered as ``name``; a ``ValueError`` naming ``editing.method`` and the choices
    when there is none."""
    if name not in _REGISTERED and name in BUILTIN:
        module, cls = BUILTIN[name].split(":")
        register(getattr(importlib.import_module(module), cls)())
    if name not in _REGISTERED:
        shown = ", ".join(repr(n) for n in method_names())
        raise UserInputError(f"editing.method {name!r} is not one of {shown}")
    return _REGISTERED[name]
