"""The face-splitting (row-wise Kronecker) product and the Khatri-Rao identity.

For ``X`` (..., m, p) and ``Y`` (..., m, q), ``X ⊙_r Y`` is (..., m, p q) with row i
equal to ``kron(X[i], Y[i])``. It turns a Hadamard product of two low-rank
matrices into one low-rank product:

    (B1 A1) ⊙ (B2 A2) = (B1 ⊙_r B2) (A1ᵀ ⊙_r A2ᵀ)ᵀ,

so rank((B1A1) ⊙ (B2A2)) <= r1 r2, and ``x ↦ x ((B1A1) ⊙ (B2A2))ᵀ`` costs
O((m + n) r1 r2) memory instead of O(m n).
"""

from __future__ import annotations

from torch import Tensor


def face_split(X: Tensor, Y: Tensor) -> Tensor:
    """Row-wise Kronecker product: (..., m, p), (..., m, q) -> (..., m, p*q)."""
    if X.shape[-2] != Y.shape[-2]:
        raise ValueError(f"face_split: row counts differ ({X.shape[-2]} vs {Y.shape[-2]})")
    out = X[..., :, :, None] * Y[..., :, None, :]  # (..., m, p, q)
    return out.flatten(-2)


def hadamard_lowrank_factors(B1: Tensor, A1: Tensor, B2: Tensor, A2: Tensor) -> tuple[Tensor, Tensor]:
    """``(B1 ⊙_r B2, A1ᵀ ⊙_r A2ᵀ)``: (..., m, r1 r2) and (..., n, r1 r2) with
    (B1A1) ⊙ (B2A2) = L Rᵀ."""
    return face_split(B1, B2), face_split(A1.mT, A2.mT)


def hadamard_lowrank_matmul(x: Tensor, B1: Tensor, A1: Tensor, B2: Tensor, A2: Tensor) -> Tensor:
    """``x ((B1A1) ⊙ (B2A2))ᵀ`` without forming the m x n product.

    x: (..., t, n); B1: (m, r1); A1: (r1, n); B2: (m, r2); A2: (r2, n) (factors may
    carry the same leading batch dimensions as x). Returns (..., t, m).
    """
    L, R = hadamard_lowrank_factors(B1, A1, B2, A2)  # (m, r1 r2), (n, r1 r2)
    return (x @ R) @ L.mT
