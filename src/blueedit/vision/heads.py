"""Ablation of attention heads and of whole block outputs, as hooks on a :class:`ViTAdapter`.

The input ``z`` of block ``l``'s attention output projection is the concatenation of its heads'
outputs, ``z = [o^{(l,1)}, ..., o^{(l,H)}]`` (``[n, T, d]``, ``d = H * d_h``), and the projection
is ``a = W_O z + b_O = sum_h W_O[:, h d_h:(h+1) d_h] o^{(l,h)} + b_O``. Removing head ``h``
replaces its slice ``z[..., h d_h:(h+1) d_h]`` by zero (``zero`` ablation: the head's term
``W_O^{(l,h)} o^{(l,h)}`` leaves the sum) or by its mean over a reference set at the same token
position (``mean`` ablation), at every token, for every input. Nothing else changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch

from blueedit.vision.vit import ViTAdapter

Ablation = Literal["zero", "mean"]
BlockPart = Literal["attention", "mlp"]


def ablate_heads(z: torch.Tensor, removed: torch.Tensor, head_dim: int, mean: torch.Tensor | None = None) -> torch.Tensor:
    """``z`` (``[..., T, H*d_h]``) with the slices of the ``removed`` heads (``[H]`` bool) set to
    zero, or to ``mean`` (``[T, H*d_h]``, the reference mean at each token) when given. A new tensor."""
    heads = removed.shape[-1]
    if z.shape[-1] != heads * head_dim:
        raise ValueError(f"input width {z.shape[-1]} is not {heads} heads x {head_dim}")
    keep = (~removed.bool()).repeat_interleave(head_dim).to(z.dtype)  # [d]: 1 for kept columns
    if mean is None:
        return z * keep
    return z * keep + mean.to(z.dtype) * (1 - keep)


class EditHooks:
    """The edit state of a ViT applied by hooks, leaving every weight untouched:

    - ``mask`` (``[L, H]`` bool): removed heads (pre-hooks on every ``o_proj``, :func:`ablate_heads`);
    - ``means`` (``[L, T, d]`` or None): the references of ``mean`` ablation;
    - ``projection`` (``[d, d]`` or None): ``P``, applied to the classifier's input
      (``logits = W P r + b``, a pre-hook on the classifier).

    Attributes can be reassigned between forwards; :meth:`remove` takes every hook off.
    """

    def __init__(self, adapter: ViTAdapter) -> None:
        self.adapter = adapter
        self.mask = torch.zeros(adapter.num_layers, adapter.num_heads, dtype=torch.bool)
        self.means: torch.Tensor | None = None
        self.projection: torch.Tensor | None = None
        self._handles = [adapter.o_proj(l).register_forward_pre_hook(self._head_hook(l))
                         for l in range(adapter.num_layers)]
        self._handles.append(adapter.classifier.register_forward_pre_hook(self._projection_hook))

    def _head_hook(self, layer: int):
        def hook(module, args):
            if not bool(self.mask[layer].any()):
                return None
            mean = None if self.means is None else self.means[layer]
            return (ablate_heads(args[0], self.mask[layer].to(args[0].device), self.adapter.head_dim, mean),) + args[1:]
        return hook

    def _projection_hook(self, module, args):
        if self.projection is None:
            return None
        return (args[0] @ self.projection.to(args[0]).T,) + args[1:]

    def clear(self) -> None:
        self.mask = torch.zeros_like(self.mask)
        self.means = None
        self.projection = None

    @contextmanager
    def masked(self, mask: torch.Tensor) -> Iterator[None]:
        """Forwards inside use ``mask`` (no ``P``); the previous state is restored after."""
        saved = (self.mask, self.projection)
        self.mask, self.projection = mask.bool(), None
        try:
            yield
        finally:
            self.mask, self.projection = saved

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@torch.no_grad()
def head_input_means(adapter: ViTAdapter, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Mean of every ``o_proj`` input over the reference images ``x``: ``[L, T, d]``."""
    sums: list[torch.Tensor | None] = [None] * adapter.num_layers

    def capture(layer):
        def hook(module, args):
            s = args[0].detach().sum(0)
            sums[layer] = s if sums[layer] is None else sums[layer] + s
        return hook

    handles = [adapter.o_proj(l).register_forward_pre_hook(capture(l)) for l in range(adapter.num_layers)]
    try:
        for i in range(0, len(x), batch_size):
            adapter.model(pixel_values=x[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()
    return torch.stack(sums) / len(x)


@contextmanager
def zeroed_block_output(adapter: ViTAdapter, layer: int, part: BlockPart) -> Iterator[None]:
    """Inside, block ``layer``'s attention output (``o_proj``'s output) or MLP output
    (``mlp_out``'s output) is zero: the block only passes its residual stream on."""
    if part not in ("attention", "mlp"):
        raise ValueError(f"part {part!r} is not 'attention' or 'mlp'")
    module = adapter.o_proj(layer) if part == "attention" else adapter.mlp_out(layer)
    handle = module.register_forward_hook(lambda m, args, out: torch.zeros_like(out))
    try:
        yield
    finally:
        handle.remove()
