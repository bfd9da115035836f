"""Forward passes with hooks: read ``W_out`` inputs (keys) and block outputs (hidden states),
inject a δ into a block's output, and stop the forward after a given block."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from blueedit.models.adapters import ModelAdapter
from blueedit.models.tokens import PromptBatch


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once everything needed was read."""


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out


def _with_hidden(out, hidden):
    return (hidden,) + tuple(out[1:]) if isinstance(out, tuple) else hidden


@dataclass
class Trace:
    """What one traced forward pass read: ``keys[l]`` is the input of ``W_out^l`` (``[B, T, d_k]``)
    and ``hidden[l]`` the output of block ``l`` (``[B, T, d]``)."""

    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)


@contextmanager
def traced(
    adapter: ModelAdapter,
    *,
    key_layers: tuple[int, ...] | list[int] = (),
    hidden_layers: tuple[int, ...] | list[int] = (),
    edit_layer: int | None = None,
    edit_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    stop_after: int | None = None,
) -> Iterator[Trace]:
    """Hooks for one or more forward passes.

    ``edit_fn`` maps block ``edit_layer``'s output hidden state to a new one (δ injection);
    ``hidden[edit_layer]`` records the edited state. With ``stop_after`` the pass ends after that
    block (use :func:`forward` to run it, which swallows the stop).
    """
    trace = Trace()
    handles = []

    def key_hook(layer):
        def hook(module, args):
            trace.keys[layer] = args[0]
        return hook

    def block_hook(layer):
        def hook(module, args, out):
            result = None
            if edit_fn is not None and layer == edit_layer:
                result = _with_hidden(out, edit_fn(_hidden(out)))
                out = result
            if layer in hidden_layers or layer == edit_layer:
                trace.hidden[layer] = _hidden(out)
            if stop_after is not None and layer == stop_after:
                raise _StopForward
            return result
        return hook

    try:
        for l in set(key_layers):
            handles.append(adapter.w_out_module(l).register_forward_pre_hook(key_hook(l)))
        block_layers = set(hidden_layers) | ({edit_layer} if edit_layer is not None else set())
        if stop_after is not None:
            block_layers.add(stop_after)
        for l in block_layers:
            handles.append(adapter.block(l).register_forward_hook(block_hook(l)))
        yield trace
    finally:
        for h in handles:
            h.remove()


def forward(model: torch.nn.Module, batch: PromptBatch) -> torch.Tensor | None:
    """Run ``model`` on ``batch`` (with its position ids); return logits, or ``None`` when a hook
    stopped the pass early. Moves the batch to the model's device."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.model_inputs().items()}
    try:
        return model(**inputs, use_cache=False).logits
    except _StopForward:
        return None


def base_forward_until(model: torch.nn.Module, adapter: ModelAdapter, batch: PromptBatch, layers: list[int]) -> Trace:
    """Read the keys and hidden states of ``layers`` without gradients, stopping after the deepest."""
    with torch.no_grad(), traced(adapter, key_layers=layers, hidden_layers=layers, stop_after=max(layers)) as tr:
        forward(model, batch)
    return tr
