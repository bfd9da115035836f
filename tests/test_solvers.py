"""Closed-form solvers and post-processing (ALGORITHM.md sections 3, 5, 6) on small float64 tensors."""

from __future__ import annotations

import math

import pytest
import torch

from blueedit.editing.solvers import (
    SolveError,
    alphaedit_update,
    memit_solve_operator,
    memit_system,
    memit_update,
    nullspace_projection,
    prune_restrain,
    rect_sparsify,
    weight_shift_error,
)

D, DK, B = 6, 10, 3


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spd(n: int, g: torch.Generator) -> torch.Tensor:
    A = torch.randn(n, 2 * n, generator=g, dtype=torch.float64)
    return A @ A.T / (2 * n)


def _problem(seed: int = 0, with_history: bool = True):
    g = _gen(seed)
    R = torch.randn(D, B, generator=g, dtype=torch.float64)
    K = torch.randn(DK, B, generator=g, dtype=torch.float64)
    C0 = _spd(DK, g)
    H = None
    if with_history:
        Kh = torch.randn(DK, 4, generator=g, dtype=torch.float64)
        H = Kh @ Kh.T
    return R, K, C0, H


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(x) / torch.linalg.matrix_norm(ref))


# -- MEMIT -----------------------------------------------------------------------------------
@pytest.mark.parametrize("with_history", [False, True])
@pytest.mark.parametrize("lam", [0.5, 15.0])
def test_memit_normal_equations(with_history, lam):
    R, K, C0, H = _problem(1, with_history)
    dW = memit_update(R, K, C0, H, lam)
    assert dW.shape == (D, DK) and dW.dtype == torch.float64
    A = lam * C0 + K @ K.T + (H if H is not None else 0)
    rhs = R @ K.T
    assert _rel(dW @ A - rhs, rhs) < 1e-10
    # the explicit-inverse formula of the paper
    explicit = R @ K.T @ torch.linalg.inv(A)
    assert torch.allclose(dW, explicit, rtol=1e-8, atol=1e-10)
    assert torch.allclose(memit_system(K, C0, H, lam), A)


def test_memit_solve_operator():
    R, K, C0, H = _problem(2)
    Q = memit_solve_operator(K, C0, H, 3.0)
    assert Q.shape == (B, DK)
    assert torch.allclose(R @ Q, memit_update(R, K, C0, H, 3.0), rtol=1e-12, atol=1e-12)
    A = 3.0 * C0 + H + K @ K.T
    assert torch.allclose(Q, K.T @ torch.linalg.inv(A), rtol=1e-8, atol=1e-10)


def test_memit_accepts_float32_and_returns_float64():
    R, K, C0, H = _problem(3)
    dW = memit_update(R.float(), K.float(), C0.float(), H.float(), 2.0)
    assert dW.dtype == torch.float64
    assert torch.allclose(dW, memit_update(R, K, C0, H, 2.0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("c0", ["rank3", "zero"])
def test_memit_singular_system_solves_the_normal_equations(c0):
    """``A = λ C_0 + K Kᵀ`` singular (rank-deficient ``C_0``, no history, 3 keys in 10 dimensions).
    The system is still consistent (``R Kᵀ`` lies in the row space of ``A``), so blueedit must either
    return a finite ``ΔW`` that satisfies ``ΔW A = R Kᵀ`` or raise :class:`SolveError`; any other
    exception, or an update that does not solve the equations, fails. With ``C_0 = 0`` the solution
    also writes every key exactly: ``ΔW K = R``."""
    g = _gen(4)
    R = torch.randn(D, B, generator=g, dtype=torch.float64)
    K = torch.randn(DK, B, generator=g, dtype=torch.float64)
    if c0 == "rank3":
        A3 = torch.randn(DK, 3, generator=g, dtype=torch.float64)
        C0 = A3 @ A3.T
    else:
        C0 = torch.zeros(DK, DK, dtype=torch.float64)
    A = C0 + K @ K.T
    assert int(torch.linalg.matrix_rank(A)) < DK  # the premise: singular
    try:
        dW = memit_update(R, K, C0, None, 1.0)
    except SolveError as e:
        assert "MEMIT" in str(e)
        return
    assert torch.isfinite(dW).all()
    assert _rel(dW @ A - R @ K.T, R @ K.T) < 1e-8
    if c0 == "zero":
        assert _rel(dW @ K - R, R) < 1e-8


@pytest.mark.parametrize("bad", ["residuals", "keys", "mom2", "history"])
def test_memit_non_finite_inputs_raise(bad):
    R, K, C0, H = _problem(5)
    args = {"residuals": R.clone(), "keys": K.clone(), "mom2": C0.clone(), "history": H.clone()}
    args[bad][0, 0] = float("nan")
    with pytest.raises(SolveError):
        memit_update(args["residuals"], args["keys"], args["mom2"], args["history"], 1.0)


# -- AlphaEdit ---------------------------------------------------------------------------------
def _low_rank_c0(r: int = 4, seed: int = 6):
    g = _gen(seed)
    A = torch.randn(DK, r, generator=g, dtype=torch.float64)
    return A @ A.T, A


def test_nullspace_projection_properties():
    C0, A = _low_rank_c0()
    P = nullspace_projection(C0, 1e-8)
    assert P.shape == (DK, DK) and P.dtype == torch.float64
    assert torch.allclose(P, P.T, atol=1e-12)
    assert torch.allclose(P @ P, P, atol=1e-10)
    assert torch.linalg.matrix_norm(P @ C0) < 1e-8 * torch.linalg.matrix_norm(C0)
    assert torch.linalg.matrix_norm(P @ A) < 1e-8 * torch.linalg.matrix_norm(A)
    # rank of the projection is the null-space dimension
    assert abs(float(torch.trace(P)) - (DK - A.shape[1])) < 1e-8


def test_nullspace_projection_threshold():
    g = _gen(7)
    Q, _ = torch.linalg.qr(torch.randn(DK, DK, generator=g, dtype=torch.float64))
    evals = torch.tensor([1e-3, 1e-2, 0.5, 1, 2, 3, 4, 5, 6, 7], dtype=torch.float64)
    C0 = Q @ torch.diag(evals) @ Q.T
    P = nullspace_projection(C0, 2e-2)
    expected = Q[:, :2] @ Q[:, :2].T
    assert torch.allclose(P, expected, atol=1e-10)
    assert torch.allclose(nullspace_projection(C0, 1e-6), torch.zeros(DK, DK, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("with_history", [False, True])
def test_alphaedit_preserves_and_solves(with_history):
    C0, A = _low_rank_c0()
    P = nullspace_projection(C0, 1e-8)
    g = _gen(8)
    R = torch.randn(D, B, generator=g, dtype=torch.float64)
    K = torch.randn(DK, B, generator=g, dtype=torch.float64)
    H = None
    if with_history:
        Kh = torch.randn(DK, 2, generator=g, dtype=torch.float64)
        H = Kh @ Kh.T
    alpha = 0.7
    dW = alphaedit_update(R, K, P, H, alpha)
    assert dW.shape == (D, DK)
    # preserved keys (column space of C0) give the same outputs
    kp = A @ torch.randn(A.shape[1], 5, generator=g, dtype=torch.float64)
    assert torch.linalg.matrix_norm(dW @ kp) < 1e-8 * torch.linalg.matrix_norm(kp)
    assert torch.allclose(dW @ P, dW, atol=1e-10)
    # its equation
    M = K @ K.T + (H if H is not None else 0)
    lhs = (P @ M + alpha * torch.eye(DK, dtype=torch.float64)) @ dW.T
    rhs = P @ K @ R.T
    assert _rel(lhs - rhs, rhs) < 1e-10


def test_alphaedit_non_finite_raises():
    C0, _ = _low_rank_c0()
    P = nullspace_projection(C0, 1e-8)
    R, K, _, _ = _problem(9)
    R[1, 1] = float("inf")
    with pytest.raises(SolveError):
        alphaedit_update(R, K, P, None, 1.0)


# -- PRUNE -------------------------------------------------------------------------------------
def _with_singular_values(s: list[float], seed: int) -> torch.Tensor:
    g = _gen(seed)
    U, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(DK, DK, generator=g, dtype=torch.float64))
    S = torch.zeros(D, DK, dtype=torch.float64)
    S[: len(s), : len(s)] = torch.diag(torch.tensor(s, dtype=torch.float64))
    return U @ S @ V.T


def _rotation(n: int, i: int, j: int, angle: float) -> torch.Tensor:
    Q = torch.eye(n, dtype=torch.float64)
    c, s = math.cos(angle), math.sin(angle)
    Q[i, i], Q[i, j], Q[j, i], Q[j, j] = c, -s, s, c
    return Q


def test_prune_restrains_large_singular_values():
    """A hand-computed case. ``W_0 = diag(2, 1.5, 1, 0.5, 0.2, 0.1)`` (σ = 2) and
    ``Δ = U diag(50, 9, 3, 2, 0.3, 0.01) Vᵀ`` with known rotations ``U``, ``V``. Singular values above
    σ become ``log s − log 2 + 2``: 50 → 5.218875824868201, 9 → 3.504077396776274,
    3 → 2.405465108108164; 2 (= σ, not above) and the smaller ones stay. The result is
    ``W_0 + U diag(s') Vᵀ`` with the same ``U`` and ``V`` (checked entrywise)."""
    W0 = torch.zeros(D, DK, dtype=torch.float64)
    W0[range(6), range(6)] = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.2, 0.1], dtype=torch.float64)
    U = _rotation(D, 0, 3, 0.7) @ _rotation(D, 1, 2, -0.4)
    V = _rotation(DK, 0, 9, 1.1) @ _rotation(DK, 2, 5, 0.3)
    def embed(s):
        S = torch.zeros(D, DK, dtype=torch.float64)
        S[range(6), range(6)] = torch.tensor(s, dtype=torch.float64)
        return U @ S @ V.T
    out = prune_restrain(W0, W0 + embed([50.0, 9.0, 3.0, 2.0, 0.3, 0.01]))
    assert out.dtype == torch.float64
    expected = W0 + embed([5.218875824868201, 3.504077396776274, 2.405465108108164, 2.0, 0.3, 0.01])
    assert torch.allclose(out, expected, atol=1e-12, rtol=0)
    # the restraint is not idempotent (5.22 is still above σ): applying it twice is visible
    twice = prune_restrain(W0, out)
    assert not torch.allclose(twice, out, atol=1e-6)
    assert torch.allclose(twice, W0 + embed([math.log(5.218875824868201 / 2) + 2, math.log(3.504077396776274 / 2) + 2,
                                             math.log(2.405465108108164 / 2) + 2, 2.0, 0.3, 0.01]), atol=1e-12)


def test_prune_small_update_unchanged_and_dtype():
    W0 = _with_singular_values([3.0, 1.0, 0.5, 0.2, 0.1, 0.05], 12)
    delta = _with_singular_values([2.9, 1.0, 0.3, 0.2, 0.1, 0.0], 13)
    out = prune_restrain(W0, W0 + delta)
    assert torch.allclose(out, W0 + delta, atol=1e-12)
    out32 = prune_restrain(W0.float(), (W0 + delta).float())
    assert out32.dtype == torch.float32
    assert torch.allclose(out32.double(), W0 + delta, atol=1e-5)


# -- RECT --------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [0.4, 0.1, 1.0, 0.33])
def test_rect_keeps_top_relative_entries(keep):
    """Properties that define the top-``keep`` selection without re-implementing it: the number of
    kept entries is ``round(keep · n)`` (n = 60: 24, 6, 60, 20), kept entries are unchanged, and
    every kept score is at least every dropped score."""
    g = _gen(14)
    delta = torch.randn(D, DK, generator=g, dtype=torch.float64)
    W = torch.randn(D, DK, generator=g, dtype=torch.float64)
    out = rect_sparsify(delta, W, keep)
    nz = out != 0
    assert int(nz.sum()) == {0.4: 24, 0.1: 6, 1.0: 60, 0.33: 20}[keep]
    assert torch.equal(out[nz], delta[nz])
    score = delta.abs() / (W.abs() + 1e-8)
    if keep < 1.0:
        assert score[nz].min() >= score[~nz].max()


def test_rect_hand_computed():
    """ΔW = [[1, 2, 3, 4], [5, 6, 7, 8]] over W = [[1, 1, 1, 1], [10, 10, 10, 10]]: scores
    [[1, 2, 3, 4], [.5, .6, .7, .8]]; 40% of 8 entries is round(3.2) = 3: keep 4, 3, 2."""
    delta = torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]], dtype=torch.float64)
    W = torch.tensor([[1.0, 1, 1, 1], [10, 10, 10, 10]], dtype=torch.float64)
    out = rect_sparsify(delta, W, 0.4)
    assert torch.equal(out, torch.tensor([[0.0, 2, 3, 4], [0, 0, 0, 0]], dtype=torch.float64))
    # negative weights rank by their magnitude: W = -10 in the first row makes row 2 win
    out = rect_sparsify(delta, torch.tensor([[-10.0] * 4, [1.0] * 4], dtype=torch.float64), 0.25)
    assert torch.equal(out, torch.tensor([[0.0, 0, 0, 0], [0, 0, 7, 8]], dtype=torch.float64))


def test_rect_ranks_relative_not_absolute():
    delta = torch.tensor([[1.0, 0.1], [0.5, 0.2]], dtype=torch.float64)
    W = torch.tensor([[100.0, 0.01], [1.0, 1.0]], dtype=torch.float64)
    out = rect_sparsify(delta, W, 0.5)
    # scores: 0.01, 10, 0.5, 0.2 -> keep (0,1) and (1,0)
    assert torch.equal(out, torch.tensor([[0.0, 0.1], [0.5, 0.0]], dtype=torch.float64))


def test_rect_bad_keep():
    with pytest.raises(ValueError):
        rect_sparsify(torch.ones(2, 2), torch.ones(2, 2), 0.0)
    with pytest.raises(ValueError):
        rect_sparsify(torch.ones(2, 2), torch.ones(2, 2), 1.5)


# -- weight shift error ------------------------------------------------------------------------
def test_weight_shift_error():
    X = torch.randn(D, DK, generator=_gen(15), dtype=torch.float64)
    e = weight_shift_error(X, X)
    assert e["frobenius"] == 0 and e["spectral"] == 0 and e["relative"] == 0
    ideal = torch.diag(torch.tensor([3.0, 4.0], dtype=torch.float64))
    applied = torch.diag(torch.tensor([3.0, 0.0], dtype=torch.float64))
    e = weight_shift_error(applied, ideal)
    assert e["frobenius"] == pytest.approx(4.0)
    assert e["spectral"] == pytest.approx(4.0)
    assert e["relative"] == pytest.approx(4.0 / 5.0)
    applied = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    e = weight_shift_error(applied, torch.zeros(2, 2, dtype=torch.float64))
    assert e["frobenius"] == pytest.approx(2.0)
    assert e["spectral"] == pytest.approx(2.0)
    assert math.isnan(e["relative"])
