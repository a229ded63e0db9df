"""PMSS: ΔW = C (U − U0) R, a skeleton (CUR) of W0 whose small core is trained.

Wang et al., "PMSS: Pretrained Matrices Skeleton Selection for LLM Fine-tuning",
2024 (arXiv:2409.16722).

    C = W0[:, J]  (m, r)   r columns of W0      (frozen)
    R = W0[I, :]  (r, n)   r rows of W0         (frozen)
    U0 = C⁺ W0 R⁺ (r, r)   the best core, W0 ≈ C U0 R   (frozen)
    U             (r, r)   trainable
    ΔW = C (U − U0) R      params r²     rank ΔW <= min(r, rank W0)
    init ("paper"): U = U0, so ΔW = 0 and W' = W0 at the start.

The paper selects the skeleton "by a pivoted selection"; this module implements two
readings (config ``select``): ``"qr"`` (default) takes the first r pivots of a
column-pivoted QR of W0 for the columns J and of W0ᵀ for the rows I (the pivots of
``scipy.linalg.qr(..., pivoting=True)``, computed here in torch, batched, on W0's
device); ``"deim"`` applies the discrete empirical interpolation method (Sorensen &
Embree 2016) to the leading r left / right singular vectors. The selection runs in
float64 once, at ``init``; C, R and U0 are returned as the frozen factors ``"C"``,
``"R"``, ``"U0"`` in W0's dtype.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from ..base import (Config, Method, Params, check_matrix, check_params, check_rank, gaussian,
                    make_generator)


@dataclasses.dataclass(frozen=True)
class PmssConfig(Config):
    r: int = 8
    #: how the skeleton is chosen: "qr" (column-pivoted QR) or "deim"
    select: str = "qr"


def pivoted_columns(W: Tensor, r: int) -> Tensor:
    """Indices (..., r) of the first r pivots of a column-pivoted QR of each W (..., m, n).

    Businger-Golub pivoting, the rule of LAPACK's geqp3 / ``scipy.linalg.qr(pivoting=True)``:
    take the column of largest residual norm, project it out of every column, repeat."""
    Res = W.clone()  # (..., m, n) residual after projecting out the chosen columns
    chosen = torch.zeros(W.shape[:-2] + W.shape[-1:], dtype=torch.bool, device=W.device)  # (..., n)
    picks = []
    for _ in range(r):
        norms = (Res * Res).sum(-2).masked_fill(chosen, -1.0)  # (..., n)
        p = norms.argmax(-1)  # (...,)
        picks.append(p)
        chosen = chosen | torch.nn.functional.one_hot(p, W.shape[-1]).bool()
        q = torch.take_along_dim(Res, p[..., None, None], dim=-1)  # (..., m, 1)
        q = q / torch.linalg.vector_norm(q, dim=-2, keepdim=True).clamp_min(torch.finfo(W.dtype).tiny)
        Res = Res - q @ (q.mT @ Res)  # (..., m, n)
    return torch.stack(picks, -1)


def deim_indices(V: Tensor) -> Tensor:
    """DEIM (Sorensen & Embree 2016) indices (..., r) of a basis V (..., p, r): one
    interpolation row per column, the row where the interpolation residual is largest."""
    idx = V[..., :, 0].abs().argmax(-1, keepdim=True)  # (..., 1)
    for j in range(1, V.shape[-1]):
        Vi = torch.take_along_dim(V[..., :, :j], idx[..., :, None], dim=-2)  # (..., j, j)
        vj = torch.take_along_dim(V[..., :, j], idx, dim=-1)  # (..., j)
        c = torch.linalg.lstsq(Vi, vj[..., None]).solution  # (..., j, 1)
        res = (V[..., :, j : j + 1] - V[..., :, :j] @ c)[..., 0].abs()  # (..., p)
        res = res.scatter(-1, idx, -1.0)  # never pick a row twice
        idx = torch.cat([idx, res.argmax(-1, keepdim=True)], -1)
    return idx


def skeleton_indices(w0: Tensor, r: int, select: str = "qr") -> tuple[Tensor, Tensor]:
    """(rows I (..., r), columns J (..., r)) of each matrix of a stack (..., m, n)."""
    if select == "qr":
        return pivoted_columns(w0.mT, r), pivoted_columns(w0, r)
    U, _, Vh = torch.linalg.svd(w0, full_matrices=False)
    return deim_indices(U[..., :, :r]), deim_indices(Vh[..., :r, :].mT)


def skeleton(w0: Tensor, r: int, select: str = "qr") -> tuple[Tensor, Tensor, Tensor]:
    """C (..., m, r), R (..., r, n), U0 = C⁺ W0 R⁺ (..., r, r) of every matrix of a stack.

    Computed in float64 on W0's device, returned in W0's dtype."""
    w = w0.detach().to(torch.float64)  # (..., m, n)
    rows, cols = skeleton_indices(w, r, select)  # (..., r), (..., r)
    C = torch.take_along_dim(w, cols[..., None, :], dim=-1)  # (..., m, r)
    R = torch.take_along_dim(w, rows[..., :, None], dim=-2)  # (..., r, n)
    U0 = torch.linalg.pinv(C) @ w @ torch.linalg.pinv(R)  # (..., r, r)
    return tuple(t.to(w0.dtype) for t in (C, R, U0))


class PMSS(Method):
    name = "pmss"
    description = "CUR skeleton of W0 with a trainable r×r core: C (U − U0) R"
    citation = ("Wang et al., PMSS: Pretrained Matrices Skeleton Selection for LLM "
                "Fine-tuning, 2024")
    Config = PmssConfig
    inits = ("paper", "gaussian")
    needs_w0 = True
    frozen = ("C", "R", "U0")
    closed_form = "core"

    def validate(self, m, n, config):
        check_rank(self.name, config.r, min(m, n), "r", m, n)
        if config.select not in ("qr", "deim"):
            raise ValueError(f"{self.name}: select must be 'qr' or 'deim', got {config.select!r}")

    def init(self, w0: Tensor, config: PmssConfig, generator=None, scheme="paper") -> Params:
        m, n = check_matrix(w0, "W0")
        self.validate(m, n, config)
        if scheme not in self.inits:
            raise ValueError(f"{self.name}: unknown init {scheme!r}; known: {', '.join(self.inits)}")
        C, R, U0 = skeleton(w0, config.r, config.select)
        if scheme == "paper":  # U = U0: ΔW = 0
            U = U0.clone()
        else:  # "gaussian": U − U0 random, at the scale of U0's entries
            g, r = make_generator(generator), config.r
            rms = float(U0.double().pow(2).mean().sqrt()) if U0.numel() else 1.0
            U = U0 + gaussian(tuple(U0.shape), rms if rms > 0 else 1.0 / math.sqrt(r), g, w0)
        return {"U": U, "C": C, "R": R, "U0": U0}

    def delta(self, params: Params, w0: Tensor | None = None, config: PmssConfig | None = None) -> Tensor:
        C, R = params["C"], params["R"]  # (..., m, r), (..., r, n)
        r = C.shape[-1]
        check_params(params, {"U": (r, r), "U0": (r, r), "R": (r, R.shape[-1])}, self.name)
        if w0 is not None and tuple(w0.shape[-2:]) != (C.shape[-2], R.shape[-1]):
            raise ValueError(f"{self.name}: W0 has shape {tuple(w0.shape)} but the skeleton C R is "
                             f"{C.shape[-2]}x{R.shape[-1]}")
        return C @ (params["U"] - params["U0"]) @ R  # (..., m, n)

    def forward(self, x, params, w0, config=None):
        core = (params["U"] - params["U0"]).mT  # (..., r, r)
        return x @ w0.mT + ((x @ params["R"].mT) @ core) @ params["C"].mT

    def n_params(self, m, n, config):
        return config.r ** 2

    def rank_bound(self, m, n, rank_w0, config):
        return min(config.r, rank_w0, m, n)

    def candidate_configs(self, m, n, budget):
        r = min(math.isqrt(budget), min(m, n))
        return [PmssConfig(r=r)] if r >= 1 else []


METHOD = PMSS()
