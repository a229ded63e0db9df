"""Effective-rank measures of a matrix, batched over leading dimensions.

All take ``W`` of shape (..., m, n) (or precomputed singular values ``(..., k)``
through the ``*_from_sv`` forms) and return one value per matrix.

- numerical rank: #{σ_k > tol}, tol = σ_max · max(m, n) · eps (numpy's default)
- stable rank: ‖W‖_F² / ‖W‖_2² = Σσ² / σ_max²
- entropy effective rank (Roy & Vetterli 2007): exp(-Σ p_k ln p_k), p_k = σ_k / Σσ
- energy rank r_q: the smallest k with Σ_{j<=k} σ_j² >= q Σσ²
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import check_matrix


def singular_values(W: Tensor) -> Tensor:
    """σ_1 >= σ_2 >= ... of each matrix, shape (..., min(m, n))."""
    check_matrix(W, "W")
    return torch.linalg.svdvals(W)


def numerical_rank(W: Tensor, rtol: float | None = None) -> Tensor:
    """Number of singular values above σ_max · rtol (rtol default max(m, n) · eps)."""
    m, n = check_matrix(W, "W")
    s = torch.linalg.svdvals(W)
    if rtol is None:
        rtol = max(m, n) * torch.finfo(W.dtype).eps
    tol = s[..., :1] * rtol
    return (s > tol).sum(-1)


def stable_rank_from_sv(s: Tensor) -> Tensor:
    top = s[..., 0] ** 2
    return torch.where(top > 0, (s**2).sum(-1) / top.clamp_min(torch.finfo(s.dtype).tiny), 0.0)


def stable_rank(W: Tensor) -> Tensor:
    """‖W‖_F² / ‖W‖_2² (0 for the zero matrix)."""
    return stable_rank_from_sv(singular_values(W))


def entropy_rank_from_sv(s: Tensor) -> Tensor:
    total = s.sum(-1, keepdim=True)
    p = s / total.clamp_min(torch.finfo(s.dtype).tiny)
    h = -(torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))).sum(-1)
    return torch.where(total[..., 0] > 0, torch.exp(h), 0.0)


def entropy_rank(W: Tensor) -> Tensor:
    """Roy & Vetterli's effective rank exp(H(σ/Σσ)) (0 for the zero matrix)."""
    return entropy_rank_from_sv(singular_values(W))


def energy_rank_from_sv(s: Tensor, q: float = 0.9) -> Tensor:
    if not 0.0 < q <= 1.0:
        raise ValueError(f"energy fraction q must be in (0, 1], got {q}")
    e = torch.cumsum(s**2, -1)
    total = e[..., -1:]
    # a relative slack guards against round-off at q = 1
    slack = 8 * torch.finfo(s.dtype).eps * s.shape[-1]
    k = (e < (q - slack) * total).sum(-1) + 1
    return torch.where(total[..., 0] > 0, k, 0)


def energy_rank(W: Tensor, q: float = 0.9) -> Tensor:
    """Smallest k whose top-k singular values hold a fraction q of Σσ²."""
    return energy_rank_from_sv(singular_values(W), q)


def summary(W: Tensor, q: float = 0.9) -> dict[str, Tensor]:
    """All four measures from one SVD."""
    m, n = check_matrix(W, "W")
    s = torch.linalg.svdvals(W)
    tol = s[..., :1] * max(m, n) * torch.finfo(W.dtype).eps
    return {
        "numerical_rank": (s > tol).sum(-1),
        "stable_rank": stable_rank_from_sv(s),
        "entropy_rank": entropy_rank_from_sv(s),
        f"energy_rank_{q:g}": energy_rank_from_sv(s, q),
    }
