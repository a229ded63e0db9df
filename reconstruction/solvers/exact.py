"""Exact solvers for the methods whose best fit is a linear least-squares problem
(PMSS, MiSS: closed forms) or an alternation of exact ones (VeRA, LoKr: exact ALS).

Every solver takes the targets M (b, m, n) at once (no loop over targets), runs on
M's device, solves in float64 and returns the factors in M's dtype. Only linear
solves (Cholesky), least squares and SVDs are used, never an explicit inverse; a
pseudo-inverse A⁺ B is applied through the thin SVD A = U Σ Vᵀ with the singular
values below rcond·σ_max dropped (rcond = max(p, q)·eps_64, numpy's rule), which is
the minimum-norm least-squares solution also when A is rank-deficient.

(1) PMSS, ΔW = C (U − U0) R with C (m, r), R (r, n), U0 (r, r) frozen. Write
X = U − U0; vec ΔW = (Rᵀ ⊗ C) vec X and (Rᵀ ⊗ C)⁺ = (R⁺)ᵀ ⊗ C⁺, so

    U* = U0 + C⁺ M R⁺                                                     (P1)
       = U0 + V_C Σ_C⁺ (U_Cᵀ M V_R) Σ_R⁺ U_Rᵀ,   C = U_C Σ_C V_Cᵀ, R = U_R Σ_R V_Rᵀ,

one (r, m)·(m, n)·(n, r) product per target; ΔW* = P_C M P_R, the projection of
M on the column space of C and the row space of R.

(2) MiSS (``theory.methods.miss``). Every mode is linear in the shard D:

  balance  ΔW[i, j] = D[j mod r, i]: entry D[k, i] is the only parameter of the
           entries (i, j), j ∈ J_k = {j < n : j ≡ k (mod r)}, so
               D*[k, i] = (1/|J_k|) Σ_{j ∈ J_k} M[i, j],  |J_k| = ⌈(n − k)/r⌉ >= 1   (M1)
           (pad M with zero columns to a multiple of r, sum the column tiles).
  mini     ΔW[i, j] = D[j mod r, i mod ρ] (ρ = mini_r divides m): likewise
               D*[k, l] = mean of M[i, j] over i ≡ l (mod ρ), j ≡ k (mod r).     (M2)
  bat      ΔW_pq = (W0_pq + I) D_p for the r×r blocks (p < m/r, q < n/r): D_p
           enters row block p only, min_{D_p} Σ_q ‖M_pq − G_pq D_p‖², G_pq = W0_pq + I,
               D_p* = G_p⁺ M_p,  G_p = [G_p0; ...; G_p,Q−1] (Q r, r),
                                 M_p = [M_p0; ...; M_p,Q−1] (Q r, r),            (M3)
           a least squares per row block with r right-hand sides (the columns of D_p).

(3) VeRA, ΔW = diag(b) B diag(d) A, A (r, n), B (m, r) frozen: bilinear in (b, d).
With P = M Aᵀ (m, r) and S = A Aᵀ (r, r), formed once, and K = B diag(d) A,

    ⟨M_i, K_i⟩ = Σ_k P_ik B_ik d_k,    ‖K_i‖² = (B_i ⊙ d) S (B_i ⊙ d)ᵀ,

  b-step (d fixed; the rows decouple)   b_i = ⟨M_i, K_i⟩ / ‖K_i‖²           (V1)
  d-step (b fixed; ΔW = Σ_k d_k (b ⊙ B_:k) A_k:, with B̃ = diag(b) B)
      G d = h,  G = (B̃ᵀ B̃) ⊙ S (r, r),  h_k = Σ_i P_ik B̃_ik,               (V2)
  error  e = (‖M‖² − 2 Σ_i b_i ⟨M_i, K_i⟩ + Σ_i b_i² ‖K_i‖²) / ‖M‖²,       (V3)

so after the one GEMM P = M Aᵀ a sweep costs O(m r²) and forms nothing m×n. G is
solved by Cholesky with a tiny ridge (1e-12·tr G / r; SVD pseudo-solve where the
factorization fails); a step is kept per target only if it does not raise (V3), so
the error never increases. Each sweep is b then d; stopping as the other ALS: a
target stops when its error improved by less than ``tol`` (relative) over
``window`` sweeps. Bilinear, hence non-convex, with genuine local minima (their
errors differ by up to ~1e-3): the ALS runs several starting d's at once (the
given one, d = 1, Gaussian d's; ``VERA_STARTS``, fewer where a sweep is costly),
sharing P and S, and keeps the best stationary point per target. On large problems
(m r² > ``VERA_WORK``) one start, stopped at a relative tolerance of at least
``VERA_LARGE_TOL`` (measured there to cost < 2e-4 of error).

(4) LoKr, ΔW = s W1 ⊗ W2, W1 (a, c), W2 (bb, d), m = a·bb, n = c·d (PEFT layout;
W2 = B2 A2 of rank r when low-rank, W1 = B1 A1 with ``decompose_both``). The Van
Loan-Pitsianis (1993) rearrangement 𝓡(M) (a c, bb d), row (i, j) = vec of block
M_ij = M[i bb:(i+1) bb, j d:(j+1) d], turns the Kronecker product into a rank one:

    ‖M − s W1 ⊗ W2‖_F = ‖𝓡(M) − w1 w2ᵀ‖_F,   w1 = vec(s W1), w2 = vec(W2).     (K1)

  both factors free: (w1, w2) = (√σ1 u1, √σ1 v1), the top singular triplet of 𝓡(M). (K2)
  with a rank constraint, exact ALS started from (K2) (the free W1 = u1, cut to
  rank r if decomposed):
    W2-step  W2 = [Z2]_r,  Z2 = Σ_ij (sW1)_ij M_ij / ‖sW1‖² = mat(𝓡ᵀ w1)/‖w1‖²  (K3)
    W1-step  sW1 = [Z1]_r (or Z1 if W1 free),  Z1 = mat(𝓡 w2)/‖w2‖²,         (K4)
  [·]_r the truncated SVD (Eckart-Young: ‖w − z‖ = ‖W − Z‖_F, so each step is the
  exact minimizer given the other factor, and the error is monotone). Error
  e = (‖M‖² − 2 w1ᵀ 𝓡 w2 + ‖w1‖² ‖w2‖²)/‖M‖². The start (sweep 0) is (K2) cut to
  the constraint and followed by (K3); with both factors free it is the optimum.
  With a constraint the problem has local minima: the ALS also runs, batched, the
  starts W1 = u_2, u_3, u_4 (the next left singular vectors of 𝓡(M)) and Gaussian
  W1's (``LOKR_STARTS`` in all, fewer where the SVDs are costly) and keeps the best
  per target.
  The factors are returned balanced (‖sW1‖ = ‖W2‖), low-rank ones as
  (U_r √Σ_r, √Σ_r V_rᵀ), zero-padded to r columns when r > the smaller side.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import (
    Params,
    bmm,
    finish_step,
    per_target_steps,
    truncated_factors,
    truncated_product,
)

#: the closed forms (``Method.closed_form``) solved here: PMSS's core, MiSS's shard
CLOSED_FORMS = ("core", "shard")
#: the exact alternating solvers (``Method.exact_als``) here: VeRA's scalings, LoKr's
#: Kronecker factors
EXACT_ALS = ("scalings", "kronecker")

F64 = torch.float64


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def pinv_solve(A: Tensor, Bm: Tensor, rcond: float | None = None) -> Tensor:
    """A⁺ Bm through the thin SVD of A (..., p, q), Bm (..., p, k) -> (..., q, k):
    the minimum-norm least-squares solution; singular values <= rcond·σ_max are
    dropped (default rcond = max(p, q)·eps of float64)."""
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)  # (..., p, t), (..., t), (..., t, q)
    return Vh.mT @ (_sinv(S, A.shape[-2:], rcond)[..., :, None] * (U.mT @ Bm))  # (..., q, k)


def _sinv(S: Tensor, shape, rcond: float | None = None) -> Tensor:
    """Σ⁺ of singular values S (..., t) (descending) of a ``shape`` matrix: 1/σ above
    rcond·σ_max (default rcond = max(shape)·eps), 0 below (all 0 when σ_max = 0)."""
    if rcond is None:
        rcond = max(shape) * torch.finfo(S.dtype).eps
    keep = S > rcond * S[..., :1]
    return torch.where(keep, 1.0 / torch.where(keep, S, torch.ones_like(S)), torch.zeros_like(S))


def _balance(x: Tensor, y: Tensor) -> Tensor:
    """t (b,) with ‖x t‖ = ‖y / t‖ for the rows x (b, p), y (b, q); 1 where either is 0."""
    nx, ny = torch.linalg.vector_norm(x, dim=-1), torch.linalg.vector_norm(y, dim=-1)
    ok = (nx > 0) & (ny > 0)
    return torch.where(ok, (ny / nx.clamp_min(1e-300)).sqrt(), torch.ones_like(nx))


def _rel(num: Tensor, nM: Tensor) -> Tensor:
    return num.clamp_min(0) / nM


def _bar(steps: int, progress: bool, label: str):
    from tqdm.auto import tqdm

    return tqdm(total=steps, disable=not progress, desc=label, leave=False)


# --------------------------------------------------------------------------- #
# closed forms: PMSS (P1), MiSS (M1-M3)
# --------------------------------------------------------------------------- #
def pmss_core(M: Tensor, C: Tensor, R: Tensor) -> Tensor:
    """X = C⁺ M R⁺ (P1), M (b, m, n), C (b, m, r), R (b, r, n) -> (b, r, r) float64."""
    Md, Cd, Rd = M.to(F64), C.to(F64), R.to(F64)
    Uc, Sc, Vch = torch.linalg.svd(Cd, full_matrices=False)  # (b, m, r), (b, r), (b, r, r)
    Ur, Sr, Vrh = torch.linalg.svd(Rd, full_matrices=False)  # (b, r, r), (b, r), (b, r, n)
    core = (Uc.mT @ Md) @ Vrh.mT  # (b, r, r): U_Cᵀ M V_R
    core = _sinv(Sc, C.shape[-2:])[..., :, None] * core * _sinv(Sr, R.shape[-2:])[..., None, :]
    return Vch.mT @ core @ Ur.mT  # (b, r, r)


def fit_pmss(M: Tensor, p0: Params) -> Params:
    out = dict(p0)
    X = pmss_core(M, p0["C"], p0["R"])
    out["U"] = (p0["U0"].to(F64) + X).to(p0["U"])
    return out


def miss_shard(M: Tensor, w0: Tensor | None, config) -> Tensor:
    """The least-squares shard D of MiSS (M1-M3) for the targets M (b, m, n), float64."""
    Bn, m, n = M.shape
    r = config.r
    Md = M.to(F64)
    if config.mode == "bat":
        if w0 is None:
            raise ValueError("miss: bat mode needs W0")
        P, Q = m // r, n // r
        # blocks (b, P, Q, r, r) -> stacked over q: (b, P, Q r, r)
        G = w0.to(F64).reshape(Bn, P, r, Q, r).transpose(2, 3)
        G = G + torch.eye(r, dtype=F64, device=M.device)
        T = Md.reshape(Bn, P, r, Q, r).transpose(2, 3)
        return pinv_solve(G.reshape(Bn, P, Q * r, r), T.reshape(Bn, P, Q * r, r))  # (b, P, r, r)
    T = -(-n // r)  # column tiles
    Mp = torch.nn.functional.pad(Md, (0, T * r - n))  # (b, m, T r), zero columns appended
    cnt = torch.full((r,), float(T), dtype=F64, device=M.device)
    cnt[(n - (T - 1) * r):] -= 1  # residues missing from the last (cut) tile
    S = Mp.reshape(Bn, m, T, r).sum(2)  # (b, m, r): Σ over the columns j ≡ k
    if config.mode == "mini":
        rho = config.mini_r
        S = S.reshape(Bn, m // rho, rho, r).sum(1)  # (b, ρ, r): Σ over rows i ≡ l
        return (S / (cnt * (m // rho))).mT  # (b, r, ρ)
    return (S / cnt).mT  # (b, r, m)


def fit_miss(M: Tensor, w0: Tensor | None, config, p0: Params) -> Params:
    out = dict(p0)
    out["D"] = miss_shard(M, w0, config).to(p0["D"])
    return out


def closed_form(method, M: Tensor, w0: Tensor | None, config, p0: Params) -> Params:
    """The optimal factors of PMSS or MiSS for the targets M (b, m, n); ``p0``: the
    method's init (its frozen factors and the shapes)."""
    if method.closed_form == "core":
        return fit_pmss(M, p0)
    if method.closed_form == "shard":
        return fit_miss(M, w0, config, p0)
    raise ValueError(f"{method.name}: no closed form here "
                     f"(exact closed forms: {', '.join(CLOSED_FORMS)})")


# --------------------------------------------------------------------------- #
# VeRA: exact ALS (V1-V3)
# --------------------------------------------------------------------------- #
#: VeRA's ALS runs up to this many starts at once (the given one, d constant,
#: Gaussian d's) and keeps the best per target: the problem has local minima. Fewer
#: where a sweep is expensive: starts · m r² <= VERA_WORK (at least 2 up to m r² =
#: VERA_WORK, one beyond: on the four Fig. 2 targets at 300×300 (r = 300) the second
#: start never won, and 8 starts gained at most 1e-4).
VERA_STARTS = 8
VERA_WORK = 8 * 256 * 256 ** 2
#: beyond VERA_WORK a target also stops once its error improves by less than this
#: (relative) over the window: the bilinear problem's valley is flat there (at 300×300
#: sweeps 50-200 lowered the errors, about 0.98, by less than 2e-4), and a sweep
#: costs 2 m r² + r³/3 float64 flops (7 GFLOP at 1000×1000, r = 1000)
VERA_LARGE_TOL = 1e-5


class _Vera:
    """Sufficient statistics of one batch, float64: P = M Aᵀ (b, m, r), S = A Aᵀ
    (b, r, r), ‖M‖² (b,), B (b, m, r). The variables carry a leading starts axis:
    b (k, b, m), d (k, b, r)."""

    def __init__(self, M: Tensor, A: Tensor, B: Tensor, ridge: float = 1e-12):
        Md = M.to(F64)
        Ad = A.to(F64)
        self.B = B.to(F64)  # (b, m, r)
        self.P = Md @ Ad.mT  # (b, m, r)
        self.S = Ad @ Ad.mT  # (b, r, r)
        self.nM = (Md * Md).sum((-2, -1)).clamp_min(1e-300)  # (b,)
        self.ridge = ridge

    def rows(self, d: Tensor) -> tuple[Tensor, Tensor]:
        """(⟨M_i, K_i⟩, ‖K_i‖²), each (k, b, m), for K = B diag(d) A."""
        Bd = self.B * d[..., None, :]  # (k, b, m, r)
        return (self.P * Bd).sum(-1), ((Bd @ self.S) * Bd).sum(-1)

    def err(self, b: Tensor, num: Tensor, q: Tensor) -> Tensor:  # (V3) -> (k, b)
        return _rel(self.nM - 2 * (b * num).sum(-1) + (b * b * q).sum(-1), self.nM)

    @staticmethod
    def b_step(b: Tensor, num: Tensor, q: Tensor) -> Tensor:  # (V1)
        ok = q > 1e-300
        return torch.where(ok, num / torch.where(ok, q, torch.ones_like(q)), b)

    def d_step(self, b: Tensor) -> Tensor:  # (V2) -> (k, b, r)
        Bt = self.B * b[..., :, None]  # (k, b, m, r): B̃ = diag(b) B
        G = (Bt.mT @ Bt) * self.S  # (k, b, r, r)
        h = (self.P * Bt).sum(-2)  # (k, b, r)
        r = G.shape[-1]
        tr = torch.diagonal(G, dim1=-2, dim2=-1).sum(-1)  # (k, b)
        lam = self.ridge * tr / r + 1e-300
        Greg = G + lam[..., None, None] * torch.eye(r, dtype=F64, device=G.device)
        L, info = torch.linalg.cholesky_ex(Greg)
        dn = torch.cholesky_solve(h[..., None], L)[..., 0]
        bad = (info != 0) | ~torch.isfinite(dn).all(-1)
        if bool(bad.any()):
            dn = torch.where(bad[..., None], pinv_solve(G, h[..., None])[..., 0], dn)
        return dn


def vera_starts(p0: Params, starts: int) -> Tensor:
    """Starting d's (k, b, r): the given one, d = 1 (if the given one is not
    constant), then N(0, 1) draws from a fixed seed (the same for every target)."""
    d0 = p0["d"].to(F64)  # (b, r)
    out = [d0]
    const = bool((d0 == d0[..., :1]).all())
    if starts > 1 and not const:
        out.append(torch.ones_like(d0))
    g = torch.Generator().manual_seed(0)
    while len(out) < starts:
        z = torch.randn(d0.shape[-1], generator=g, dtype=F64)
        out.append(z.to(d0.device).expand_as(d0))
    return torch.stack(out)


def run_vera(M: Tensor, p0: Params, *, steps: int, tol: float, window: int,
             progress: bool = False, starts: int | None = None):
    """Exact ALS for VeRA (b, d trainable; A, B frozen), from ``starts`` starting
    d's at once (default VERA_STARTS, fewer on large problems; ``vera_starts``).
    Each sweep: b-step (V1), d-step (V2), a step kept only where it does not raise
    (V3); the best start is kept per target.
    Returns (params, history [(b,) per sweep of the winning start, the start first],
    sweeps per target (b,))."""
    st = _Vera(M, p0["A"], p0["B"])
    Bn = M.shape[0]
    m, r = p0["B"].shape[-2:]
    large = m * r * r > VERA_WORK
    if starts is None:
        starts = 1 if large else max(2, min(VERA_STARTS, VERA_WORK // max(1, m * r * r)))
    if large:
        tol = max(tol, VERA_LARGE_TOL)
    d = vera_starts(p0, max(1, int(starts)))  # (k, b, r)
    K = d.shape[0]
    b = p0["b"].to(F64).expand(K, *p0["b"].shape).clone()  # (k, b, m)
    num, q = st.rows(d)
    active = torch.ones(K, Bn, dtype=torch.bool, device=M.device)
    hist = torch.zeros(steps + 1, K, Bn, dtype=F64, device=M.device)
    hist[0] = st.err(b, num, q)
    k = 0
    its = torch.zeros(K, Bn, dtype=torch.long, device=M.device)
    bar = _bar(steps, progress, "als vera")
    for k in range(1, steps + 1):
        its.masked_fill_(active, k)
        e_old = hist[k - 1]
        b1 = st.b_step(b, num, q)
        e1 = st.err(b1, num, q)
        take = active & torch.isfinite(e1) & (e1 <= e_old)
        b = torch.where(take[..., None], b1, b)
        e = torch.where(take, e1, e_old)
        d1 = st.d_step(b)
        num1, q1 = st.rows(d1)
        e2 = st.err(b, num1, q1)
        take = active & torch.isfinite(e2) & (e2 <= e)
        t3 = take[..., None]
        d = torch.where(t3, d1, d)
        num, q = torch.where(t3, num1, num), torch.where(t3, q1, q)
        e = torch.where(take, e2, e)
        hist[k] = torch.where(active, e, e_old)
        if finish_step(bar, hist, k, active, window, tol):
            break
    bar.close()
    win = hist[k].argmin(0)  # (b,) the best start per target
    ar = torch.arange(Bn, device=M.device)
    b, d = b[win, ar], d[win, ar]  # (b, m), (b, r)
    out = dict(p0)
    # balance ‖b‖ and ‖d‖ (ΔW unchanged): keeps float32 factors well scaled
    t = _balance(b, d)
    out["b"] = (b * t[:, None]).to(p0["b"])
    out["d"] = (d / t[:, None]).to(p0["d"])
    return out, list(hist[: k + 1, win, ar]), per_target_steps(its, k)


# --------------------------------------------------------------------------- #
# LoKr: nearest Kronecker product, exact ALS (K1-K4)
# --------------------------------------------------------------------------- #
def rearrange(M: Tensor, a: int, bb: int, c: int, d: int) -> Tensor:
    """Van Loan-Pitsianis 𝓡(M): (b, a bb, c d) -> (b, a c, bb d), row (i, j) = vec M_ij,
    so that 𝓡(W1 ⊗ W2) = vec(W1) vec(W2)ᵀ (row-major vec, like ``torch.kron``)."""
    Bn = M.shape[0]
    return M.reshape(Bn, a, bb, c, d).permute(0, 1, 3, 2, 4).reshape(Bn, a * c, bb * d)


#: LoKr's ALS (with a rank constraint) runs this many starts at once and keeps the
#: best per target: the leading singular vectors u_1, u_2, ... of 𝓡(M) as W1, then
#: Gaussian W1's (a fixed seed); the constrained problem has local minima. Fewer
#: (at least 2) where the SVDs of a sweep are expensive: starts · Σ p q min(p, q)
#: over the constrained factors (p, q) <= LOKR_WORK.
LOKR_STARTS = 8
LOKR_WORK = 8 * 128 ** 3


def lokr_starts(U: Tensor, starts: int) -> Tensor:
    """Starting vec(s W1) (k, b, a c): u_1, ..., u_j of 𝓡(M) (U (b, a c, t)), then
    N(0, 1) draws from a fixed seed."""
    j = min(starts, U.shape[-1], 4)
    out = [U[..., :, i] for i in range(j)]
    g = torch.Generator().manual_seed(0)
    while len(out) < starts:
        z = torch.randn(U.shape[-2], generator=g, dtype=F64)
        out.append(z.to(U.device).expand_as(out[0]))
    return torch.stack(out)


def run_lokr(method, M: Tensor, config, p0: Params, *, steps: int, tol: float, window: int,
             progress: bool = False, warm: bool = False, starts: int | None = None):
    """Exact ALS for LoKr (K1-K4), started from the nearest Kronecker product (K2)
    and (with a rank constraint) ``starts`` - 1 more W1's (default LOKR_STARTS in all,
    fewer on large problems; ``lokr_starts``), or, with
    ``warm``, from the factors ``p0`` only; the best start is kept per target. Each
    sweep: W1-step (K4), then W2-step (K3), kept where it does not raise the error
    (two passes over 𝓡(M) and one bb×d SVD per start and target).
    Returns (params, history [(b,) per sweep, the start first], sweeps)."""
    Bn, m, n = M.shape
    sh = method.shapes(m, n, config)
    a, bb, c, d = sh.a, sh.b, sh.c, sh.d
    r = int(config.r)
    s = float(config.scale)
    if s == 0.0:  # ΔW = 0 whatever the factors
        return dict(p0), [torch.ones(Bn, dtype=F64, device=M.device)], torch.zeros(Bn, dtype=torch.long)
    Rm = rearrange(M.to(F64), a, bb, c, d)  # (b, a c, bb d)
    nM = (Rm * Rm).sum((-2, -1)).clamp_min(1e-300)  # (b,)
    exact_start = sh.full_w1 and sh.full_w2  # (K2) is the optimum

    def cut1(Z1: Tensor) -> Tensor:  # (..., a, c) -> the W1 constraint
        if sh.full_w1:
            return Z1
        return truncated_product(Z1, r)

    def safe(x: Tensor) -> tuple[Tensor, Tensor]:
        ok = x > 1e-300
        return ok, torch.where(ok, x, torch.ones_like(x))

    def w2_step(w1: Tensor, w2_old: Tensor) -> Tensor:  # (K3): w1 (k, b, a c) = vec(s W1)
        ok, n1 = safe((w1 * w1).sum(-1))  # (k, b)
        Z2 = (bmm(Rm.mT, w1[..., None])[..., 0] / n1[..., None]).reshape(*w1.shape[:-1], bb, d)
        if not sh.full_w2:
            Z2 = truncated_product(Z2, r)
        return torch.where(ok[..., None], Z2.reshape(*w1.shape[:-1], bb * d), w2_old)

    def w1_step(w2: Tensor, Rw2: Tensor, w1_old: Tensor) -> Tensor:  # (K4), Rw2 = 𝓡 w2
        ok, n2 = safe((w2 * w2).sum(-1))
        Z1 = (Rw2 / n2[..., None]).reshape(*w2.shape[:-1], a, c)
        return torch.where(ok[..., None], cut1(Z1).reshape(*w2.shape[:-1], a * c), w1_old)

    def apply(w2: Tensor) -> Tensor:  # 𝓡 w2: (k, b, bb d) -> (k, b, a c)
        return bmm(Rm, w2[..., None])[..., 0]

    def err(w1: Tensor, w2: Tensor, Rw2: Tensor) -> Tensor:
        cross = (w1 * Rw2).sum(-1)
        return _rel(nM - 2 * cross + (w1 * w1).sum(-1) * (w2 * w2).sum(-1), nM)

    if warm:
        w1 = (s * method._factor(p0, 1).to(F64)).reshape(1, Bn, a * c)
        w2 = method._factor(p0, 2).to(F64).reshape(1, Bn, bb * d)
    else:
        # (b, a c, t), (b, t), (b, t, bb d); one target at a time: LAPACK's batched SVD of
        # a wide matrix rounds differently with the batch's size
        U, S, Vh = (torch.cat(x) for x in zip(*(torch.linalg.svd(R, full_matrices=False)
                                                 for R in Rm.split(1))))
        # (K2): start k = 0 is W1 = u_1 (cut to rank), then W2 by (K3)
        if starts is None:
            cost = sum(p * q * min(p, q) for (p, q), full in (((a, c), sh.full_w1), ((bb, d), sh.full_w2))
                       if not full)
            starts = max(2, min(LOKR_STARTS, LOKR_WORK // max(1, cost)))
        K = 1 if exact_start else max(1, int(starts))
        w1 = cut1(lokr_starts(U, K).reshape(K, Bn, a, c)).reshape(K, Bn, a * c)
        w2 = w2_step(w1, (Vh[..., 0, :] * S[..., :1]).expand(K, Bn, bb * d))
    K = w1.shape[0]
    Rw2 = apply(w2)
    active = torch.ones(K, Bn, dtype=torch.bool, device=M.device)
    hist = torch.zeros(steps + 1, K, Bn, dtype=F64, device=M.device)
    hist[0] = err(w1, w2, Rw2)
    k = 0
    its = torch.zeros(K, Bn, dtype=torch.long, device=M.device)
    bar = _bar(steps, progress, "als lokr")
    for k in range(1, steps + 1):
        its.masked_fill_(active, k)
        e_old = hist[k - 1]
        w1n = w1_step(w2, Rw2, w1)
        w2n = w2_step(w1n, w2)
        Rw2n = apply(w2n)
        e = err(w1n, w2n, Rw2n)
        take = (active & torch.isfinite(e) & (e <= e_old))[..., None]
        w1, w2 = torch.where(take, w1n, w1), torch.where(take, w2n, w2)
        Rw2 = torch.where(take, Rw2n, Rw2)
        hist[k] = torch.where(take[..., 0], e, e_old)
        if finish_step(bar, hist, k, active, window, tol):
            break
    bar.close()
    win = hist[k].argmin(0)  # (b,) the best start per target
    ar = torch.arange(Bn, device=M.device)
    w1, w2 = w1[win, ar], w2[win, ar]  # (b, a c), (b, bb d)
    # balance ‖s W1‖ = ‖W2‖ (ΔW unchanged), then write the factors in PEFT's layout
    t = _balance(w1, w2)
    W1 = (w1 * t[:, None] / s).reshape(Bn, a, c)
    W2 = (w2 / t[:, None]).reshape(Bn, bb, d)
    out = dict(p0)
    for i, (W, full) in ((1, (W1, sh.full_w1)), (2, (W2, sh.full_w2))):
        if full:
            out[f"W{i}"] = W.to(p0[f"W{i}"])
        else:
            Bf, Af = truncated_factors(W, r)
            out[f"B{i}"], out[f"A{i}"] = Bf.to(p0[f"B{i}"]), Af.to(p0[f"A{i}"])
    return out, list(hist[: k + 1, win, ar]), per_target_steps(its, k)


def run_als(method, M: Tensor, w0: Tensor | None, config, p0: Params, *, steps: int,
            tol: float = 1e-7, window: int | None = None, progress: bool = False,
            warm: bool = False):
    """The exact ALS of VeRA or LoKr on the targets M (b, m, n). VeRA starts from
    ``p0``; LoKr from the nearest Kronecker product unless ``warm`` (then ``p0``).
    Returns (params, history [(b,) per sweep, the start first], sweeps)."""
    window = window or 5
    with torch.no_grad():
        if method.exact_als == "scalings":
            return run_vera(M, p0, steps=steps, tol=tol, window=window, progress=progress)
        if method.exact_als == "kronecker":
            return run_lokr(method, M, config, p0, steps=steps, tol=tol, window=window,
                            progress=progress, warm=warm)
    raise ValueError(f"{method.name}: no exact ALS here (exact ALS: {', '.join(EXACT_ALS)})")
