"""Closed-form weight updates and post-processing (docs/algorithms.md: "Closed-form updates", "Post-processing", "Weight shift error").

All functions are pure: tensors in, tensors out, nothing is written to a model. Shapes:
``d`` hidden size, ``d_k`` key size (MLP width), ``B`` edits in the round.
Linear algebra runs in float64; results are returned in float64 unless stated otherwise.
"""

from __future__ import annotations

import torch


class SolveError(RuntimeError):
    """A solve failed or produced non-finite values."""


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64)


def _check_finite(name: str, x: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(x).all():
        raise SolveError(f"{name} has non-finite values")
    return x


def memit_system(keys: torch.Tensor, mom2: torch.Tensor, history: torch.Tensor | None, lam: float) -> torch.Tensor:
    """The MEMIT normal-equation matrix ``A = λ C_0 + H + K Kᵀ`` (``[d_k, d_k]``, float64).

    Args:
        keys: ``K``, ``[d_k, B]``.
        mom2: ``C_0 = E[k kᵀ]``, ``[d_k, d_k]``.
        history: ``H``, the sum of ``K Kᵀ`` of earlier rounds (``None`` = zero).
        lam: ``λ`` (``mom2_update_weight``).
    """
    K = _f64(keys)
    A = lam * _f64(mom2) + K @ K.T
    if history is not None:
        A = A + _f64(history)
    return A


def memit_solve_operator(keys: torch.Tensor, mom2: torch.Tensor, history: torch.Tensor | None, lam: float) -> torch.Tensor:
    """``Q = Kᵀ (λ C_0 + H + K Kᵀ)^{-1}`` (``[B, d_k]``), so that ``ΔW = R Q``.

    Computed with a Cholesky factorization of the symmetric positive definite system
    (falling back to an LU solve if it is not numerically positive definite); no inverse is formed.
    """
    A = memit_system(keys, mom2, history, lam)
    K = _f64(keys)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        X = torch.cholesky_solve(K, L)  # A^{-1} K, [d_k, B]
    else:
        X = torch.linalg.solve(A, K)
    return _check_finite("MEMIT solve", X.T)


def memit_update(
    residuals: torch.Tensor, keys: torch.Tensor, mom2: torch.Tensor, history: torch.Tensor | None, lam: float
) -> torch.Tensor:
    """MEMIT: ``ΔW = R Kᵀ (λ C_0 + H + K Kᵀ)^{-1}``, ``[d, d_k]``.

    ``ΔW`` solves the normal equations ``ΔW (λ C_0 + H + K Kᵀ) = R Kᵀ`` of
    ``min ‖ΔW K − R‖² + λ tr(ΔW C_0 ΔWᵀ) + tr(ΔW H ΔWᵀ)``.

    Args:
        residuals: ``R``, ``[d, B]``; keys ``K``, ``[d_k, B]``; mom2 ``C_0``; history ``H``.
    """
    left, right = memit_factors(residuals, keys, mom2, history, lam)
    return _check_finite("MEMIT update", left @ right)


def memit_factors(
    residuals: torch.Tensor, keys: torch.Tensor, mom2: torch.Tensor, history: torch.Tensor | None, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """MEMIT's update as rank-``B`` factors: ``(R, Q)`` with ``Q = Kᵀ (λ C_0 + H + K Kᵀ)^{-1}``,
    so ``ΔW = R Q`` (``R`` ``[d, B]``, ``Q`` ``[B, d_k]``, both float64); see :func:`memit_update`."""
    return _f64(residuals), memit_solve_operator(keys, mom2, history, lam)


def nullspace_projection(mom2: torch.Tensor, threshold: float) -> torch.Tensor:
    """AlphaEdit's projection ``P = U_s U_sᵀ`` onto the (approximate) null space of ``C_0``.

    ``U_s`` are the eigenvectors of the symmetric ``C_0`` whose eigenvalues are below
    ``threshold``. ``P C_0 ≈ 0``, so an update ``ΔW = Δ P`` leaves ``W k`` unchanged for the
    preserved keys ``k`` that span ``C_0``. Returns ``[d_k, d_k]`` float64.
    """
    C = _f64(mom2)
    C = (C + C.T) / 2
    evals, evecs = torch.linalg.eigh(C)
    U = evecs[:, evals < threshold]
    return U @ U.T


def alphaedit_update(
    residuals: torch.Tensor, keys: torch.Tensor, projection: torch.Tensor, history: torch.Tensor | None, alpha: float
) -> torch.Tensor:
    """AlphaEdit: ``(ΔW)ᵀ = (P (H + K Kᵀ) + α I)^{-1} P K Rᵀ``; returns ``ΔW`` as ``[d, d_k]``.

    The result lies in the row space of ``P`` (``ΔW = ΔW P`` up to round-off), so keys
    annihilated by ``P`` produce the same output before and after the update.
    """
    left, right = alphaedit_factors(residuals, keys, projection, history, alpha)
    return _check_finite("AlphaEdit update", left @ right)


def alphaedit_factors(
    residuals: torch.Tensor, keys: torch.Tensor, projection: torch.Tensor, history: torch.Tensor | None, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """AlphaEdit's update as rank-``B`` factors: ``(R, Q)`` with ``Q = ((P (H + K Kᵀ) + α I)^{-1} P K)ᵀ``
    (``[B, d_k]``), so ``ΔW = R Q`` equals :func:`alphaedit_update`'s
    ``((P (H + K Kᵀ) + α I)^{-1} P K Rᵀ)ᵀ`` (the solve is linear in its right-hand side)."""
    K, P = _f64(keys), _f64(projection)
    M = K @ K.T
    if history is not None:
        M = M + _f64(history)
    A = P @ M + alpha * torch.eye(P.shape[0], dtype=torch.float64, device=P.device)
    Y = torch.linalg.solve(A, P @ K)  # [d_k, B]
    return _f64(residuals), _check_finite("AlphaEdit solve", Y.T)


def prune_restrain(original: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """PRUNE: bound the large singular values of the accumulated edit ``Δ = W − W_0``.

    ``Δ = U S Vᵀ``; with ``σ`` the largest singular value of ``W_0``, each ``s > σ`` becomes
    ``log s − log σ + σ``; returns ``W_0 + U S' Vᵀ`` (same dtype as ``edited``).
    """
    W0 = _f64(original)
    delta = _f64(edited) - W0
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    sigma = torch.linalg.matrix_norm(W0, ord=2)
    S2 = torch.where(S > sigma, torch.log(S) - torch.log(sigma) + sigma, S)
    return (W0 + (U * S2) @ Vh).to(edited.dtype)


def prune_postprocess(original: torch.Tensor, edited: torch.Tensor, base: str = "original") -> torch.Tensor:
    """The weights PRUNE writes after the last round: ``W_0 + restrain(W − W_0)`` (``base="original"``,
    the PRUNE paper) or ``W + restrain(W − W_0)`` (``base="current"``, the published BLUE code);
    see :func:`prune_restrain`. Same dtype as ``edited``."""
    restrained = prune_restrain(original, edited)
    if base == "current":
        restrained = (edited.double() + (restrained.double() - original.double())).to(edited.dtype)
    return restrained


def rect_sparsify(delta: torch.Tensor, weight: torch.Tensor, keep: float = 0.4) -> torch.Tensor:
    """RECT: keep the top ``keep`` fraction of ``ΔW`` entries ranked by ``|ΔW| / (|W| + 1e-8)``.

    ``delta`` and ``weight`` are ``[d, d_k]``; the other entries are set to zero.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"editing.rect_keep must be in (0, 1], got {keep}")
    score = (delta.abs() / (weight.to(delta.dtype).abs() + 1e-8)).flatten()
    k = max(1, int(round(keep * score.numel())))
    idx = torch.topk(score, k).indices
    mask = torch.zeros_like(score, dtype=torch.bool)
    mask[idx] = True
    return delta * mask.view_as(delta)


def weight_shift_error(applied: torch.Tensor, ideal: torch.Tensor) -> dict[str, float]:
    """Weight shift error ``e = ‖Δ* − Δ‖`` (Frobenius, spectral, and Frobenius relative to ``‖Δ*‖``)."""
    diff = _f64(ideal) - _f64(applied)
    fro = torch.linalg.matrix_norm(diff).item()
    ideal_norm = torch.linalg.matrix_norm(_f64(ideal)).item()
    return {
        "frobenius": fro,
        "spectral": torch.linalg.matrix_norm(diff, ord=2).item(),
        "relative": fro / ideal_norm if ideal_norm > 0 else float("nan"),
    }
