"""The error and gradient of a modulated update, for L-BFGS (SMoA, HiRA, HUT).

Every term is one low-rank pair times a fixed modulator F_t (HiRA's and HUT's W0, SMoA's
spectral slices M_t of W0), less a fixed offset O (HUT's W0, else 0):

    ΔW = s Σ_t F_t ⊙ (B_t A_t) − O,    e = ‖M − ΔW‖² / ‖M‖²,
    B_t: (m, r_t)   A_t: (r_t, n)   F_t, O, M: (m, n)

With the residual R = M + O − s Σ_t F_t ⊙ (B_t A_t) and W_t = F_t ⊙ R,

    ∂e/∂B_t = −2 s W_t A_tᵀ / ‖M‖²,     ∂e/∂A_t = −2 s B_tᵀ W_t / ‖M‖²:

three GEMMs of m n r_t flops per term and a few element-wise passes, no autograd graph
(the L-BFGS of ``fit`` for these methods, with the Gauss-Newton H⁰ of
``precondition.gauss_newton_modulated``). On a CPU with one thread (each worker of a
sweep) it runs target by target, ``ROW_BLOCK`` rows at a time, with every intermediate in
cache and no m×n tensor allocated (as ``als_kr.dense_value_and_grad``); elsewhere batched.
Each target's numbers use its own slices alone, so a target's error and gradient are the
same in any batch."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .common import ROW_BLOCK, Params, Structure, Term, bmm, row_blocked


def applies(st: Structure | None) -> bool:
    """Whether ``st`` is a modulated update: every term one pair with a fixed F_t."""
    return st is not None and bool(st.terms) and all(
        len(t.pairs) == 1 and t.fixed is not None for t in st.terms)


def subset(st: Structure, rows: Tensor) -> Structure:
    """The structure of the targets ``rows`` alone (their modulators and offset)."""
    return Structure([Term(list(t.pairs), t.fixed.index_select(0, rows)) for t in st.terms],
                     st.scale, None if st.offset is None else st.offset.index_select(0, rows))


def value_and_grad(M: Tensor, st: Structure) -> Callable[[Params], tuple[Tensor, Params]]:
    """fn(params) -> (errors (b,) float64, {B_t, A_t: gradient}) for targets M (b, m, n)."""
    s = float(st.scale)
    base = M if st.offset is None else M + st.offset  # (b, m, n) the form's own target
    nrm = M.pow(2).sum((-2, -1), dtype=torch.float64).clamp_min(1e-300)  # (b,)
    c = (-2 * s / nrm).to(M.dtype)[:, None, None]  # (b, 1, 1)
    if row_blocked(M):
        return _blocked(base, st, s, nrm, c, min(ROW_BLOCK, M.shape[-2]))

    def fn(p: Params) -> tuple[Tensor, Params]:
        R = base.clone()
        for t in st.terms:
            (bn, an), = t.pairs
            R.sub_(torch.matmul(p[bn], p[an]).mul_(t.fixed), alpha=s)  # − s F_t ⊙ (B_t A_t)
        e = R.pow(2).sum((-2, -1), dtype=torch.float64) / nrm
        grads = {}
        for t in st.terms:
            (bn, an), = t.pairs
            W = R * t.fixed  # (b, m, n)
            grads[bn] = bmm(W, p[an].mT).mul(c)  # (b, m, r)
            grads[an] = bmm(p[bn].mT, W).mul(c)  # (b, r, n)
        return e, grads

    return fn


def _blocked(base: Tensor, st: Structure, s: float, nrm: Tensor, c: Tensor, rows: int):
    """``value_and_grad`` target by target, ``rows`` rows at a time, into buffers allocated
    once: for rows I, R = (M + O)[I] − s Σ_t F_t[I] ⊙ (B_t[I] A_t), then W_t = F_t[I] ⊙ R,
    ∂e/∂B_t[I] = c W_t A_tᵀ and ∂e/∂A_t += c B_t[I]ᵀ W_t."""
    b, m, n = base.shape
    buf = torch.empty(3, rows, n, dtype=base.dtype, device=base.device)  # R, P (then W), R ⊙ R
    pairs = [(t.pairs[0][0], t.pairs[0][1], t.fixed) for t in st.terms]

    def fn(p: Params) -> tuple[Tensor, Params]:
        gB = {bn: torch.empty_like(p[bn]) for bn, _, _ in pairs}  # (b, m, r_t)
        gA = {an: torch.zeros_like(p[an]) for _, an, _ in pairs}  # (b, r_t, n)
        row_sq = torch.empty(b, m, dtype=base.dtype, device=base.device)
        for t in range(b):
            for i in range(0, m, rows):
                k = min(rows, m - i)
                R, P, sq = (x[:k] for x in buf)
                R.copy_(base[t, i:i + k])
                for bn, an, F in pairs:
                    torch.mm(p[bn][t, i:i + k], p[an][t], out=P)  # (k, n)
                    R.addcmul_(P, F[t, i:i + k], value=-s)
                torch.sum(torch.mul(R, R, out=sq), -1, out=row_sq[t, i:i + k])
                for bn, an, F in pairs:
                    W = torch.mul(R, F[t, i:i + k], out=P)
                    torch.mm(W, p[an][t].mT, out=gB[bn][t, i:i + k])
                    gA[an][t].addmm_(p[bn][t, i:i + k].mT, W)
        e = row_sq.sum(-1, dtype=torch.float64) / nrm  # (b,)
        return e, {**{k: v.mul_(c) for k, v in gB.items()}, **{k: v.mul_(c) for k, v in gA.items()}}

    return fn
