"""Alternating least squares for updates linear in each factor (LoRA, HiRA, ABBA,
LoHa, SMoA), batched over targets.

With the method written as ΔW = s Σ_t F_t ⊙ Π_pairs (B A) (``common.Structure``),
fixing everything but one factor B (m, r) of one pair leaves

    min_B ‖T − s · C ⊙ (B A)‖_F²,  T = M − (the other terms),  C = F_t ⊙ (other pairs of t),

which splits over the rows of B: row i solves an r×r system

    G_i b_i = rhs_i / s,   G_i = Σ_j A[:, j] A[:, j]ᵀ C[i, j]²,   rhs_i = Σ_j A[:, j] C[i, j] T[i, j].

All G_i come from one matmul, G = (C ⊙ C) @ KR(A), KR(A)[j] = vec(A[:, j] A[:, j]ᵀ)
(n, r²; only its r(r+1)/2 distinct entries are formed), so the (m, r, n) design is never formed (DESIGN §4); rhs = (C ⊙ T) Aᵀ.
The (b·m) systems are solved at once in float64 with a tiny ridge
(λ_i = 1e-10·tr G_i/r + a floor). The A-factor is the transposed problem. For
LoRA (C = 1) every row shares G = A Aᵀ.

Safeguards: before B is solved, A is replaced by orthonormal rows (QR; B absorbs
R, ΔW unchanged), which keeps G as well conditioned as C allows; a row's update is
accepted only if it lowers that row's objective, so the error never increases
from sweep to sweep; the two pairs of a Hadamard term are rebalanced to equal
norms after each sweep (ΔW unchanged).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import ROW_BLOCK, Params, Structure, bmm, lstsq_driver, row_blocked

#: a modulated half-step (C given) with r at least this large is solved by CG_ITERS steps
#: of Jacobi-preconditioned conjugate gradients (``_row_cg``) instead of forming every
#: G_i: (2 CG_ITERS + 4) m n r flops of GEMM against m n r²/2 and a (b, m, r, r) float64
#: tensor (166 MB at 1000×1000, r = 72, 4 targets). Two steps, not four: an inexact
#: half-step still lowers every row's objective; HiRA's and HUT's 72 Figure 2 cells took
#: 470 s of fitting against 577 s with four, no error higher by more than 0.0004
#: (README, "Sweeps at scale")
CG_FROM = 24
CG_ITERS = 2


def _row_solve(T: Tensor, C: Tensor | None, A: Tensor, B_old: Tensor, s: float,
               ridge: float = 1e-10, C2: Tensor | None = None, CT: Tensor | None = None) -> Tensor:
    """argmin_B ‖T − s C ⊙ (B A)‖² row by row; rows that would not improve keep B_old.

    T, C: (b, m, n); A: (b, r, n); B_old: (b, m, r); C2 = C ⊙ C, CT = C ⊙ T when the
    caller has them (they stay the same from sweep to sweep for a fixed C). Returns (b, m, r)."""
    b, r, _n = A.shape
    m = T.shape[-2]
    if C is not None and C2 is None:
        C2 = C * C
    if C is not None and CT is None:
        CT = C * T
    if C is not None and r >= CG_FROM:
        return _row_cg(T, C, A, B_old, s, iters=CG_ITERS, C2=C2, CT=CT)
    if C is None:
        G = (A @ A.mT)[:, None]  # (b, 1, r, r)
        rhs = bmm(T, A.mT)  # (b, m, r)
    else:
        # only the r(r+1)/2 distinct entries of the symmetric G_i: half the flops
        iu, ju = torch.triu_indices(r, r, device=A.device)
        KR = A[:, iu, :] * A[:, ju, :]  # (b, r(r+1)/2, n)
        g = bmm(C2, KR.mT).contiguous()  # (b, m, r(r+1)/2)
        # G[i, j] = g[pos(min(i, j), max(i, j))]: one gather (a scatter into both
        # triangles cost as much as the Cholesky)
        pos = torch.empty(r, r, dtype=torch.long, device=A.device)
        pos[iu, ju] = torch.arange(iu.numel(), device=A.device)
        pos[ju, iu] = pos[iu, ju]
        G = g.index_select(-1, pos.flatten()).double().reshape(b, m, r, r)
        rhs = bmm(CT, A.mT)  # (b, m, r)
        return solve_rows(G, rhs.double(), B_old, s, ridge, overwrite=True)
    return solve_rows(G.double(), rhs.double(), B_old, s, ridge)


def _row_cg(T: Tensor, C: Tensor, A: Tensor, B_old: Tensor, s: float, iters: int = CG_ITERS,
            C2: Tensor | None = None, CT: Tensor | None = None) -> Tensor:
    """``CG_ITERS`` steps of preconditioned conjugate gradients on every row's normal
    equations s² G_i x = s rhs_i at once, from the current rows B_old, each product with
    the G_i as two GEMMs: G X = ((X A) ⊙ C²) Aᵀ; preconditioner diag G_i = (C²)(A²)ᵀ.
    CG from x0 lowers each row's convex objective at every step (in exact arithmetic), so
    the sweep stays monotone without the exact solve; rows that did not improve keep
    B_old all the same. T, C: (b, m, n); A: (b, r, n); B_old: (b, m, r)."""
    C2 = C * C if C2 is None else C2  # (b, m, n)
    At = A.mT  # (b, n, r)
    rhs = bmm(C * T if CT is None else CT, At).double() / s  # (b, m, r): G x = rhs / s
    D = bmm(C2, (A * A).mT).double()  # (b, m, r): diag of every G_i
    D = torch.where(D > 0, D, torch.ones_like(D))

    def G(X: Tensor) -> Tensor:  # (b, m, r) float64 -> G_i x_i for every row
        return bmm((X.to(A.dtype) @ A).mul_(C2), At).double()

    def obj(X: Tensor, GX: Tensor) -> Tensor:  # row objective / s² minus const
        return (X * GX).sum(-1) - 2 * (X * rhs).sum(-1)

    x0 = B_old.double()
    Gx0 = G(x0)
    x, res = x0, rhs - Gx0
    z = res / D
    p, rz = z, (res * z).sum(-1, keepdim=True)
    for _ in range(iters):
        q = G(p)
        pq = (p * q).sum(-1, keepdim=True)
        alpha = torch.where(pq > 0, rz / torch.where(pq > 0, pq, torch.ones_like(pq)), torch.zeros_like(pq))
        x = x + alpha * p
        res = res - alpha * q
        z = res / D
        rz_new = (res * z).sum(-1, keepdim=True)
        beta = torch.where(rz > 0, rz_new / torch.where(rz > 0, rz, torch.ones_like(rz)), torch.zeros_like(rz))
        p, rz = z + beta * p, rz_new
    Gx = rhs - res  # G x, carried by the recursion
    ok = torch.isfinite(x).all(-1) & (obj(x, Gx) <= obj(x0, Gx0))
    return torch.where(ok[..., None], x, x0).to(B_old)


def solve_rows(Gd: Tensor, rd: Tensor, B_old: Tensor, s: float, ridge: float = 1e-10,
               overwrite: bool = False) -> Tensor:
    """Rows x_i = argmin s² xᵀ G_i x − 2 s xᵀ rhs_i (float64 Cholesky, tiny ridge);
    a row that would not lower its objective keeps B_old's.

    Gd: (b, m or 1, r, r) float64; rd, B_old: (b, m, r). ``overwrite``: Gd may be
    used as scratch (saves two (b, m, r, r) temporaries). Returns (b, m, r) like B_old."""
    b, m, r = rd.shape
    diag = torch.diagonal(Gd, dim1=-2, dim2=-1)  # (b, m or 1, r)
    tr = diag.sum(-1)  # (b, m) or (b, 1)
    floor = 1e-13 * tr.mean(-1, keepdim=True) / r + 1e-300  # (b, 1)
    lam = ridge * tr / r + floor
    Greg = Gd if overwrite else Gd.clone()
    torch.diagonal(Greg, dim1=-2, dim2=-1).add_(lam[..., None])  # G + λ I
    L, info = torch.linalg.cholesky_ex(Greg)
    Bn = torch.cholesky_solve(rd[..., None], L.expand(b, m, r, r))[..., 0]  # (b, m, r)
    failed = (info != 0).flatten(1).any(1)  # (b,): a target with a failed factorization
    if bool(failed.any()):  # solves all its rows by least squares (per target: batch-blind)
        ls = torch.linalg.lstsq(Greg.expand(b, m, r, r)[failed], rd[failed][..., None],
                                driver=lstsq_driver(Greg)).solution[..., 0]
        Bn = Bn.index_put((failed.nonzero()[:, 0],), ls)
    Bn = Bn / s

    def obj(X: Tensor) -> Tensor:  # row objective minus const: s² xᵀGx − 2 s xᵀrhs
        xGx = (X * (Greg @ X[..., None])[..., 0]).sum(-1) - lam * (X * X).sum(-1)
        return s * s * xGx - 2 * s * (X * rd).sum(-1)  # (b, m)

    Bo = B_old.double()
    ok = torch.isfinite(Bn).all(-1) & (obj(Bn) <= obj(Bo))
    return torch.where(ok[..., None], Bn, Bo).to(B_old)


def _orth_rows(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """(B Rᵀ, Qᵀ) with Aᵀ = Q R: same product, A with orthonormal rows."""
    Q, R = torch.linalg.qr(A.mT)  # (b, n, r), (b, r, r)
    return B @ R.mT, Q.mT


def _orth_cols(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """(Q, R A) with B = Q R: same product, B with orthonormal columns."""
    Q, R = torch.linalg.qr(B)
    return Q, R @ A


def pair_norm(B: Tensor, A: Tensor) -> Tensor:
    """‖B A‖_F per target without forming B A: sqrt(tr(BᵀB · A Aᵀ)). (b, m, r), (b, r, n) -> (b,)"""
    return (bmm(B.mT, B) * (A @ A.mT)).sum((-2, -1)).clamp_min(0).sqrt()


def unstick(st: Structure, params: Params, seed: int = 0) -> Params:
    """Where a pair's A factor is all zero (e.g. LoHa's A2 = 0 init), make it a random
    Gaussian and zero its B instead: the product (so ΔW) is unchanged, but the first
    solve for B then sees generic directions, not the coordinate axes a QR of zero
    would give (on a sparse target those trap ALS at a poor stationary point)."""
    p = dict(params)
    g = torch.Generator().manual_seed(int(seed) + 99991)
    for term in st.terms:
        for b, a in term.pairs:
            A = p[a]
            zero = (A == 0).flatten(1).all(1)  # (batch,)
            if bool(zero.any()):
                R = torch.randn(A.shape[1:], generator=g, dtype=torch.float64).to(A)
                z = zero.reshape(-1, 1, 1)
                p[a] = torch.where(z, R.expand_as(A), A)
                p[b] = torch.where(z, torch.zeros_like(p[b]), p[b])
    return p


def sweep_order(st: Structure, params: Params) -> list[tuple[int, int]]:
    """(term, pair) update order: within a term, pairs holding an all-zero factor go
    first (updating a pair whose partner is zero would stall at zero)."""
    order = []
    for t, term in enumerate(st.terms):
        zero = [q for q, (b, a) in enumerate(term.pairs)
                if bool((params[b] == 0).all()) or bool((params[a] == 0).all())]
        rest = [q for q in range(len(term.pairs)) if q not in zero]
        order += [(t, q) for q in zero + rest]
    return order


def als_sweep(st: Structure, M: Tensor, params: Params, order, active: Tensor,
              ridge: float = 1e-10, memo: dict | None = None) -> Params:
    """One sweep (every B then its A, pair by pair). Targets with active[b] False
    keep their factors. Returns new params. ``memo`` (a dict the caller keeps from sweep
    to sweep) holds what does not change: the form's target M + offset, and for a term
    of one pair its C ⊙ C (and C ⊙ T when it is the only term). With several terms the
    sweep carries the residual R = M + offset − s Σ_u prod_u: a term's own target is
    T = R + s prod_t (one pass), C ⊙ T is formed once for its B and A steps, and after
    the update R = T − s prod_t(new) (one pass), so the sweep leaves its error
    ‖R‖² / ‖M‖² in ``memo["error"]`` (b,) float64 without another ΔW."""
    memo = {} if memo is None else memo
    p = dict(params)
    s = st.scale
    nt = len(st.terms)
    if "base" not in memo:
        memo["base"] = M if st.offset is None else M + st.offset  # the form's own target
    base = memo["base"]
    memo.pop("error", None)
    prods = R = None
    if nt > 1:
        prods = [st.product(p, u) for u in range(nt)]
        R = base.clone()
        for pr in prods:
            R.add_(pr, alpha=-s)  # (b, m, n) M + offset − s Σ prod_u
    for t, q in order:
        bn, an = st.terms[t].pairs[q]
        T = base if nt == 1 else torch.add(R, prods[t], alpha=s)  # the others' residual
        C = st.product(p, t, skip=q)  # (b, m, n) or None
        fixed = C is not None and C is st.terms[t].fixed  # a one-pair term: C = F_t
        C2 = CT = None
        if fixed:
            C2 = memo.setdefault(("C2", t), C * C)
            if nt == 1:
                CT = memo.setdefault(("CT", t), C * T)
        if C is not None and CT is None:
            CT = C * T  # shared by the B and the A step
        # B step
        B, A = _orth_rows(p[bn], p[an])
        Bn = _row_solve(T, C, A, B, s, ridge, C2=C2, CT=CT)
        # A step (transposed problem)
        Bq, Aq = _orth_cols(Bn, A)
        An = _row_solve(T.mT, None if C is None else C.mT, Bq.mT, Aq.mT, s, ridge,
                        C2=None if C2 is None else C2.mT, CT=None if CT is None else CT.mT).mT
        keep = ~active
        p[bn] = torch.where(keep[:, None, None], params[bn], Bq)
        p[an] = torch.where(keep[:, None, None], params[an], An)
        if nt > 1:  # this term's new product, out of the residual
            prods[t] = st.product(p, t)
            R = torch.add(T, prods[t], alpha=-s, out=T)  # T is this step's own tensor
    if R is not None:
        if "norm" not in memo:
            memo["norm"] = norm2(M)
        memo["error"] = R.pow(2).sum((-2, -1), dtype=torch.float64) / memo["norm"]
    # rebalance the pairs of each Hadamard term to equal Frobenius norms
    for term in st.terms:
        if len(term.pairs) < 2:
            continue
        norms = torch.stack([pair_norm(p[b], p[a]) for b, a in term.pairs])
        ok = active & (norms > 0).all(0) & torch.isfinite(norms).all(0)  # (b,)
        geo = norms.clamp_min(1e-300).log().mean(0).exp()  # (b,)
        for (b, a), nq in zip(term.pairs, norms):
            c = torch.where(ok, geo / nq.clamp_min(1e-300), torch.ones_like(nq))
            p[b] = p[b] * c[:, None, None]
    return p


def rel_error(M: Tensor, D: Tensor) -> Tensor:
    """‖M − D‖² / ‖M‖² per target, summed in float64 (no float64 copy of the m×n tensors)."""
    den = norm2(M)
    return (M - D).pow(2).sum((-2, -1), dtype=torch.float64) / den


def norm2(M: Tensor) -> Tensor:
    """‖M‖² per target (b,), summed in float64, floored away from 0."""
    return M.pow(2).sum((-2, -1), dtype=torch.float64).clamp_min(1e-300)


def structure_error(st: Structure, M: Tensor, params: Params, nrm: Tensor | None = None) -> Tensor:
    """``rel_error(M, st.delta(params))`` (b,) float64, without forming ΔW: on one CPU
    thread, per target and ``ROW_BLOCK`` rows at a time, R = M + offset − s Σ_t F_t ⊙
    Π_q B_q A_q in a cache-resident block, its squared row norms summed in float32 per
    row and in float64 over rows; elsewhere (a GPU, several threads) through ΔW.
    ``nrm``: ‖M‖² (``norm2``) when the caller keeps it."""
    if not row_blocked(M):
        return rel_error(M, st.delta(params))
    b, m, n = M.shape
    s = float(st.scale)
    rows = min(ROW_BLOCK, m)
    R_buf = torch.empty(rows, n, dtype=M.dtype)
    P_buf = torch.empty(rows, n, dtype=M.dtype)
    Q_buf = torch.empty(rows, n, dtype=M.dtype)
    row_sq = torch.empty(b, m, dtype=M.dtype)
    for t in range(b):
        for i in range(0, m, rows):
            k = min(rows, m - i)
            R, P, Q = R_buf[:k], P_buf[:k], Q_buf[:k]
            R.copy_(M[t, i:i + k])
            if st.offset is not None:
                R.add_(st.offset[t, i:i + k])
            for term in st.terms:
                for q, (bn, an) in enumerate(term.pairs):
                    if q == 0:
                        torch.mm(params[bn][t, i:i + k], params[an][t], out=P)
                    else:
                        P.mul_(torch.mm(params[bn][t, i:i + k], params[an][t], out=Q))
                if term.fixed is not None:
                    P.mul_(term.fixed[t, i:i + k])
                R.add_(P, alpha=-s)
            torch.sum(R.mul_(R), -1, out=row_sq[t, i:i + k])
    return row_sq.sum(-1, dtype=torch.float64) / (norm2(M) if nrm is None else nrm)


def extrapolate(st: Structure, M: Tensor, prev: Params, cur: Params, err: Tensor, beta: Tensor,
                active: Tensor, names: list[str], nrm: Tensor | None = None) -> tuple[Params, Tensor, Tensor]:
    """Line-search acceleration (as for CP-ALS, Bro 1998): try cur + β (cur − prev) on
    every factor; keep it for the targets where it lowers the error (β ← 1.5 β, at
    most 4), else keep ``cur`` (β ← β/2, at least 0.05). The gauge (QR, balancing)
    moves continuously between sweeps, so the step is meaningful; monotonicity is
    untouched. ``nrm``: ‖M‖² when the caller keeps it. Returns (params, errors, β), all
    per target."""
    bsh = beta.reshape(-1, 1, 1)
    cand = dict(cur)
    for k in names:
        cand[k] = cur[k] + bsh.to(cur[k]) * (cur[k] - prev[k])
    e2 = structure_error(st, M, cand, nrm)
    ok = active & torch.isfinite(e2) & (e2 < err)
    out = dict(cur)
    for k in names:
        out[k] = torch.where(ok.reshape(-1, 1, 1), cand[k], cur[k])
    beta = torch.where(ok, (beta * 1.5).clamp(max=4.0), (beta / 2).clamp(min=0.05))
    return out, torch.where(ok, e2, err), beta
