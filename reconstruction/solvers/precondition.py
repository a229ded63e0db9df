"""A Gauss-Newton preconditioner for one Hadamard pair, ΔW = s (B1 A1) ⊙ (B2 A2) (ABBA,
LoHa): the H⁰ of L-BFGS's two-loop recursion in place of γ I.

With e = ‖M − ΔW‖² / ‖M‖², c = 2 s² / ‖M‖² and the partner's product P2 = B2 A2 (m, n),
the Gauss-Newton curvature of e in row i of B1 (everything else fixed) and in column
j of A1 is

    G_i = c A1 diag(P2[i, :]²) A1ᵀ   (r1, r1),     G_j = c B1ᵀ diag(P2[:, j]²) B1   (r1, r1),

the Grams that ALS solves with (``als.py``), m + n of them, m n r1² flops to form.
Approximating the squared partner by its rank-one part, P2[i, j]² ≈ u_i v_j / S with

    u_i = Σ_j P2[i, j]² = B2[i] (A2 A2ᵀ) B2[i]ᵀ,   v_j = Σ_i P2[i, j]² = A2[:, j]ᵀ (B2ᵀ B2) A2[:, j],
    S = Σ_i u_i,

(Kronecker-factored, as K-FAC approximates a layer's curvature; exact where P2² has
rank one, e.g. P2 constant at the ``lora-warm`` start: a test), every block is one of two r1×r1 matrices
scaled per row or column, and

    H⁰ g_B1[i] = S / (c ũ_i) · g_B1[i] (A1 diag(v) A1ᵀ)⁻¹,
    H⁰ g_A1[:, j] = S / (c ṽ_j) · (B1ᵀ diag(u) B1)⁻¹ g_A1[:, j],

ũ = u + ε mean(u) (a zero row of P2 has no curvature), and the same for pair 2 with
P1. Everything comes from the factors, in their dtype (the r×r inverses in float64):
(m + n) r² flops per iteration, nothing m×n, about 15% of an iteration at 1000×1000,
r1 = r2 = 64. It makes the steps invariant to the factors' scale and to the gauge
B → B G, A → G⁻¹ A up to the approximation, which is what slows plain L-BFGS on these
products: at 1000×1000 from ``lora-warm`` the preconditioned run reaches the error of
1000 plain iterations in 325-484 (r1 = r2 = 36, ``reconstruction.bench --only j``), and
600 end within +0.0013 of 1000 plain ones on Figure 2's cells, lower on about half
(README, "Sweeps at scale").
Each target's H⁰ uses its own factors alone, and on a CPU is computed target by
target: the same numbers, bit for bit, alone or in a batch.

``gauss_newton_modulated`` is the same H⁰ for the modulated updates s Σ_t F_t ⊙ (B_t A_t)
(SMoA, HiRA, HUT), where each pair's partner is a fixed matrix F_t: u and v are the row
and column sums of F_t², computed once."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .common import Params, Structure

#: ε of ũ = u + ε mean(u); λ of the r×r Grams' ridge, relative to their mean diagonal
EPS = 1e-3
RIDGE = 1e-6
TINY = 1e-30


def gauss_newton(M: Tensor, st: Structure, own: tuple[str, str, str, str]
                 ) -> Callable[[Params], Callable[[Params], Params]]:
    """For targets M (b, m, n) and the pair ``own`` = (B1, A1, B2, A2) (the method's
    names): at(params) -> apply(g) -> H⁰ g, for g a dict of gradients like the params."""
    s = float(st.scale)
    nrm = M.pow(2).sum((-2, -1), dtype=torch.float64).clamp_min(1e-300)  # (b,)
    c = 2 * s * s / nrm  # (b,)
    b1, a1, b2, a2 = own

    def side(B: Tensor, A: Tensor, Bp: Tensor, Ap: Tensor, c: Tensor):
        """The row and column maps of the pair (B, A) whose partner is Bp Ap."""
        u = ((Bp @ (Ap @ Ap.mT)) * Bp).sum(-1)  # (b, m) row sums of (Bp Ap)²
        v = ((Ap.mT @ (Bp.mT @ Bp)) * Ap.mT).sum(-1)  # (b, n) column sums
        return _maps(B, A, u, v, c)

    def maps(p: Params, rows: slice) -> Callable[[Params], Params]:
        fB1, fA1 = side(p[b1], p[a1], p[b2], p[a2], c[rows])
        fB2, fA2 = side(p[b2], p[a2], p[b1], p[a1], c[rows])
        f = {b1: fB1, a1: fA1, b2: fB2, a2: fA2}
        return lambda g: {k: f[k](v) if k in f else v for k, v in g.items()}

    return _per_target(maps, c.shape[0], M.device.type == "cuda")


def _maps(B: Tensor, A: Tensor, u: Tensor, v: Tensor, c: Tensor):
    """H⁰'s maps of the pair (B, A) (b, m, r), (b, r, n) whose squared partner has row
    sums u (b, m) and column sums v (b, n): g_B -> S/(c ũ) g_B (A diag(v) Aᵀ)⁻¹ and
    g_A -> S/(c ṽ) (Bᵀ diag(u) B)⁻¹ g_A, with c (b,)."""
    S = u.sum(-1, keepdim=True)  # (b, 1)
    cc = c.to(u)[:, None]
    ru = S / (cc * (u + EPS * u.mean(-1, keepdim=True))).clamp_min(TINY)  # (b, m)
    rv = S / (cc * (v + EPS * v.mean(-1, keepdim=True))).clamp_min(TINY)  # (b, n)
    GA = _inverse((A * v.to(A)[:, None, :]) @ A.mT).to(A)  # (b, r, r) (A diag(v) Aᵀ)⁻¹
    GB = _inverse((B.mT * u.to(B)[:, None, :]) @ B).to(B)  # (b, r, r) (Bᵀ diag(u) B)⁻¹
    return ((lambda g: (g * ru.to(g)[..., None]) @ GA.to(g)),
            (lambda g: (GB.to(g) @ g) * rv.to(g)[:, None, :]))


def _per_target(maps: Callable[[Params, slice], Callable[[Params], Params]], b: int, cuda: bool
                ) -> Callable[[Params], Callable[[Params], Params]]:
    """at(params) from maps(params of some targets, their slice): on a CPU target by target
    (the BLAS picks other kernels for other batch sizes, and a target's steps must not
    depend on its batch, bit for bit), on a GPU batched."""
    def at(p: Params) -> Callable[[Params], Params]:
        if cuda or b == 1:
            return maps(p, slice(None))
        one = [maps({k: v[t:t + 1] for k, v in p.items()}, slice(t, t + 1)) for t in range(b)]

        def apply(g: Params) -> Params:
            outs = [one[t]({k: v[t:t + 1] for k, v in g.items()}) for t in range(b)]
            return {k: torch.cat([o[k] for o in outs]) for k in g}

        return apply

    return at


def gauss_newton_modulated(M: Tensor, st: Structure) -> Callable[[Params], Callable[[Params], Params]]:
    """The same H⁰ for a modulated update s Σ_t F_t ⊙ (B_t A_t) (``modulated.applies``:
    SMoA, HiRA, HUT): each pair's partner is its fixed F_t, so u, v are the row and column
    sums of F_t², computed once, and F_t² ≈ u vᵀ / S (exact where F_t² has rank one, a
    test); the curvature across terms is left to L-BFGS's pairs. For targets M (b, m, n):
    at(params) -> apply(g) -> H⁰ g."""
    s = float(st.scale)
    nrm = M.pow(2).sum((-2, -1), dtype=torch.float64).clamp_min(1e-300)  # (b,)
    c = 2 * s * s / nrm  # (b,)
    sums = []  # (B name, A name, u (b, m), v (b, n)) float64, per term
    for term in st.terms:
        (bn, an), = term.pairs
        F2 = term.fixed * term.fixed
        sums.append((bn, an, F2.sum(-1, dtype=torch.float64), F2.sum(-2, dtype=torch.float64)))

    def maps(p: Params, rows: slice) -> Callable[[Params], Params]:
        f = {}
        for bn, an, u, v in sums:
            f[bn], f[an] = _maps(p[bn], p[an], u[rows], v[rows], c[rows])
        return lambda g: {k: f[k](x) if k in f else x for k, x in g.items()}

    return _per_target(maps, c.shape[0], M.device.type == "cuda")


def _inverse(G: Tensor) -> Tensor:
    """(G + λ mean(diag G) I)⁻¹ for symmetric positive semi-definite G (b, r, r), in float64;
    a Gram that is still not positive definite (a zero factor) gets its pseudo-inverse."""
    G = G.double()
    lam = RIDGE * G.diagonal(dim1=-2, dim2=-1).mean(-1)  # (b,)
    G = G + lam[:, None, None] * torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    L, info = torch.linalg.cholesky_ex(G)
    bad = info != 0  # (b,)
    if not bool(bad.any()):
        return torch.cholesky_inverse(L)
    # per target, so the others keep their Cholesky inverse
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device).expand_as(G)
    inv = torch.cholesky_inverse(torch.linalg.cholesky(torch.where(bad[:, None, None], eye, G)))
    return torch.where(bad[:, None, None], torch.linalg.pinv(G, hermitian=True), inv)
