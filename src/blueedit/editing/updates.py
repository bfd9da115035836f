"""Each round's update kept compactly, and the weights and history rebuilt from them
(docs/algorithms.md, "Carrying an edited model forward and undoing rounds").

A round writes, at each edited layer ``l``, ``ΔW^l = L^l Rᵀ``-style factors: the closed-form
solves give ``ΔW = R Q`` with ``R`` the residuals (``[d, B]``) and ``Q`` (``[B, d_k]``)

    MEMIT / PRUNE:  Q = Kᵀ (λ C_0 + H + K Kᵀ)^{-1}
    AlphaEdit:      Q = ((P (H + K Kᵀ) + α I)^{-1} P K)ᵀ

so ``ΔW`` has rank at most ``B`` and costs ``8 B (d + d_k)`` bytes (float64) instead of
``4 d d_k``. RECT's sparsified update is not low rank and is kept whole. The round also adds
``K_h K_hᵀ`` to the edit history ``H^l`` (``K_h``: the keys read after the round's writes,
``[d_k, B]``), kept as ``K_h``.

With the weights ``W_0^l`` before the first round, the state after any number of rounds is
rebuilt exactly as the editor built it (the same sums in the same order and precision):

    W_n = (((W_0 + ΔW_1) + ΔW_2) + ... + ΔW_n)      each sum formed in float32 (or wider)
    H_n = ((0 + K_1 K_1ᵀ) + ... + K_n K_nᵀ)

All functions are pure: tensors in, tensors out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerUpdate:
    """One round's update of one layer.

    Attributes:
        left: ``R`` (``[d, r]``, float64), or the whole ``ΔW`` (``[d, d_k]``) when ``right`` is
            ``None`` (RECT).
        right: ``Q`` (``[r, d_k]``, float64), so ``ΔW = left @ right``; ``None``: ``left`` is ``ΔW``.
        keys: ``K_h`` (``[d_k, B]``), the round's term ``K_h K_hᵀ`` of the edit history.
    """

    left: torch.Tensor
    right: torch.Tensor | None
    keys: torch.Tensor

    def delta(self) -> torch.Tensor:
        """``ΔW`` (``[d, d_k]``, float64)."""
        return self.left if self.right is None else self.left.to(torch.float64) @ self.right.to(torch.float64)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.left, self.right, self.keys) if t is not None)

    def to(self, device) -> LayerUpdate:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return LayerUpdate(move(self.left), move(self.right), move(self.keys))


#: One round: its update per edited layer.
RoundUpdates = dict[int, LayerUpdate]


def add_update(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``weight + delta`` formed in float32 (or the weight's dtype when wider) and returned in
    the weight's dtype: how the editor writes an update (``ModelAdapter.add_to_w_out``)."""
    acc = torch.promote_types(weight.dtype, torch.float32)
    return (weight.to(acc) + delta.to(device=weight.device, dtype=acc)).to(weight.dtype)


def replay_weights(original: torch.Tensor, rounds: list[RoundUpdates], layer: int) -> torch.Tensor:
    """``W_n^layer`` (``[d, d_k]``, the dtype of ``original``): ``original`` with the updates of
    ``rounds`` added one after the other."""
    w = original
    for updates in rounds:
        if layer in updates:
            w = add_update(w, updates[layer].delta())
    return w.clone() if w is original else w


def replay_history(rounds: list[RoundUpdates], layer: int, size: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """``H_n^layer = Σ_r K_r K_rᵀ`` (``[size, size]``) summed in the editor's order and dtype."""
    h = torch.zeros(size, size, dtype=dtype, device=device)
    for updates in rounds:
        if layer in updates:
            k = updates[layer].keys.to(device)
            h = h + (k @ k.T)
    return h


def round_nbytes(updates: RoundUpdates) -> int:
    """Bytes one round's stored updates take (factors and history keys of every layer)."""
    return sum(u.nbytes() for u in updates.values())
