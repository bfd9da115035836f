"""Where the editable parts of a Hugging Face causal LM live.

A :class:`ModelAdapter` finds the transformer blocks, each block's MLP output projection
``W_out`` (the matrix a locate-then-edit method rewrites), the final norm and the ``lm_head``.
Weights are always exchanged in the math orientation of docs/algorithms.md: ``W_out`` is ``[d, d_k]``
and maps a key ``k`` (``d_k``) to a value ``m = W_out k`` (``d``). GPT-2's ``Conv1D`` stores the
transpose (``[d_k, d]``); the adapter hides that.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from blueedit.config import UserInputError


class UnknownArchitectureError(UserInputError):
    """The model's layout could not be found; the message names the options to set."""


@dataclass(frozen=True)
class ModelLayout:
    """Module paths of a causal LM, relative to the model (``blocks``, ``final_norm``,
    ``lm_head``) or to one block (``w_out``, ``attn_out``). ``transposed`` is True for ``Conv1D``
    weights. ``attn_out`` is the attention block's output projection (only PMET reads it; found
    among common names when ``None``)."""

    blocks: str
    w_out: str
    final_norm: str
    lm_head: str
    transposed: bool = False
    attn_out: str | None = None


_LLAMA_LIKE = ModelLayout("model.layers", "mlp.down_proj", "model.norm", "lm_head", attn_out="self_attn.o_proj")

#: Layouts by ``config.model_type``.
KNOWN_LAYOUTS: dict[str, ModelLayout] = {
    "gpt2": ModelLayout("transformer.h", "mlp.c_proj", "transformer.ln_f", "lm_head", transposed=True,
                       attn_out="attn.c_proj"),
    "gptj": ModelLayout("transformer.h", "mlp.fc_out", "transformer.ln_f", "lm_head", attn_out="attn.out_proj"),
    "gpt_neox": ModelLayout("gpt_neox.layers", "mlp.dense_4h_to_h", "gpt_neox.final_layer_norm", "embed_out",
                            attn_out="attention.dense"),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,  # Gemma3ForCausalLM (text only; e.g. Gemma 3 270M)
    "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "phi3": ModelLayout("model.layers", "mlp.down_proj", "model.norm", "lm_head", attn_out="self_attn.o_proj"),
}

# Candidate names for each part, tried in order when the model type is not known.
_BLOCK_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.layers")
_W_OUT_NAMES = ("mlp.down_proj", "mlp.c_proj", "mlp.fc_out", "mlp.dense_4h_to_h", "mlp.fc2", "fc2")
_ATTN_OUT_NAMES = ("self_attn.o_proj", "attn.out_proj", "attn.c_proj", "attention.dense", "self_attn.out_proj",
                   "self_attn.dense", "attention.o_proj")
_NORM_PATHS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.decoder.final_layer_norm")
_HEAD_PATHS = ("lm_head", "embed_out")

_OVERRIDE_HINT = (
    "set the module paths in the config: model.blocks (e.g. 'model.layers'), model.w_out (relative to a "
    "block, e.g. 'mlp.down_proj'), model.final_norm (e.g. 'model.norm') and model.lm_head (e.g. 'lm_head')"
)


def _get(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def detect_layout(model: nn.Module, **overrides: str | bool | None) -> ModelLayout:
    """Find the layout of ``model``; ``overrides`` (non-None) replace detected fields.

    Raises :class:`UnknownArchitectureError` naming the options to set when a part is not found.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    layout = KNOWN_LAYOUTS.get(model_type)
    if layout is None:
        found = {
            "blocks": next((p for p in _BLOCK_PATHS if isinstance(_get(model, p), nn.ModuleList)), None),
            "final_norm": next((p for p in _NORM_PATHS if _get(model, p) is not None), None),
            "lm_head": next((p for p in _HEAD_PATHS if _get(model, p) is not None), None),
        }
        blocks_path = overrides.get("blocks", found["blocks"])
        blocks = _get(model, blocks_path) if blocks_path else None
        if blocks is not None and len(blocks) > 0:
            found["w_out"] = next((n for n in _W_OUT_NAMES if _get(blocks[0], n) is not None), None)
        else:
            found["w_out"] = None
        found.update(overrides)
        missing = [k for k in ("blocks", "w_out", "final_norm", "lm_head") if not found.get(k)]
        if missing:
            raise UnknownArchitectureError(
                f"cannot find {', '.join(missing)} in model type {model_type!r}: {_OVERRIDE_HINT}"
            )
        w_out = _get(blocks[0], found["w_out"])
        found.setdefault("transposed", type(w_out).__name__ == "Conv1D")
        layout = ModelLayout(**found)
    else:
        # names move between transformers versions (GPT-NeoX's head: embed_out -> lm_head)
        fixes = {}
        for name, candidates in (("blocks", _BLOCK_PATHS), ("final_norm", _NORM_PATHS), ("lm_head", _HEAD_PATHS)):
            if name not in overrides and _get(model, getattr(layout, name)) is None:
                found = next((p for p in candidates if _get(model, p) is not None), None)
                if found:
                    fixes[name] = found
        layout = replace(layout, **fixes, **overrides)
    for name, path in (("blocks", layout.blocks), ("final_norm", layout.final_norm), ("lm_head", layout.lm_head)):
        if _get(model, path) is None:
            raise UnknownArchitectureError(f"model has no module {path!r} for {name}: {_OVERRIDE_HINT}")
    return layout


class ModelAdapter:
    """Access to the blocks and ``W_out`` matrices of a causal LM, in math orientation."""

    def __init__(self, model: nn.Module, layout: ModelLayout | None = None, **overrides):
        self.model = model
        self.layout = layout or detect_layout(model, **overrides)
        blocks = model.get_submodule(self.layout.blocks)
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            raise UnknownArchitectureError(f"{self.layout.blocks!r} is not a list of blocks: {_OVERRIDE_HINT}")
        self.blocks = blocks
        if _get(blocks[0], self.layout.w_out) is None:
            raise UnknownArchitectureError(f"block 0 has no module {self.layout.w_out!r}: {_OVERRIDE_HINT}")
        self.final_norm = model.get_submodule(self.layout.final_norm)
        self.lm_head = model.get_submodule(self.layout.lm_head)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def check_layers(self, layers: list[int]) -> None:
        bad = [l for l in layers if not 0 <= l < self.num_layers]
        if bad:
            raise UserInputError(f"editing.layers {bad} out of range: the model has blocks 0..{self.num_layers - 1}")

    def block(self, layer: int) -> nn.Module:
        return self.blocks[layer]

    def w_out_module(self, layer: int) -> nn.Module:
        return self.blocks[layer].get_submodule(self.layout.w_out)

    def attn_out_module(self, layer: int) -> nn.Module:
        """The attention block's output projection in block ``layer`` (its output is the attention
        output added to the residual stream; PMET optimizes a δ there)."""
        names = (self.layout.attn_out,) if self.layout.attn_out else _ATTN_OUT_NAMES
        for name in names:
            module = _get(self.blocks[layer], name)
            if module is not None:
                return module
        raise UnknownArchitectureError(
            f"block {layer} has no attention output projection (tried {', '.join(names)}): set model.attn_out "
            "(relative to a block, e.g. 'self_attn.o_proj')")

    def w_out_param(self, layer: int) -> nn.Parameter:
        return self.w_out_module(layer).weight

    def get_w_out(self, layer: int) -> torch.Tensor:
        """A detached copy of ``W_out^layer`` as ``[d, d_k]``."""
        w = self.w_out_param(layer).detach()
        return (w.t() if self.layout.transposed else w).clone()

    @torch.no_grad()
    def set_w_out(self, layer: int, weight: torch.Tensor) -> None:
        """Overwrite ``W_out^layer`` with ``weight`` given as ``[d, d_k]`` (cast to the param's dtype)."""
        p = self.w_out_param(layer)
        w = weight.t() if self.layout.transposed else weight
        if w.shape != p.shape:
            raise UserInputError(f"layer {layer}: weight of shape {tuple(w.shape)} for a parameter {tuple(p.shape)}")
        p.copy_(w.to(device=p.device, dtype=p.dtype))

    @torch.no_grad()
    def add_to_w_out(self, layer: int, delta: torch.Tensor) -> None:
        """``W_out^layer += delta`` with ``delta`` given as ``[d, d_k]``; the sum is formed in float32+."""
        p = self.w_out_param(layer)
        d = delta.t() if self.layout.transposed else delta
        if d.shape != p.shape:
            raise UserInputError(f"layer {layer}: update of shape {tuple(d.shape)} for a parameter {tuple(p.shape)}")
        acc = torch.promote_types(p.dtype, torch.float32)
        p.copy_((p.to(acc) + d.to(device=p.device, dtype=acc)).to(p.dtype))

    def key_size(self, layer: int) -> int:
        """``d_k``: the input size of ``W_out^layer``."""
        return self._shape(layer)[1]

    def hidden_size(self) -> int:
        return self._shape(0)[0]

    def _shape(self, layer: int) -> tuple[int, int]:
        s = tuple(self.w_out_param(layer).shape)
        return (s[1], s[0]) if self.layout.transposed else s
