"""Khatri-Rao ALS for ΔW = s (B1 A1) ⊙ (B2 A2) (ABBA, LoHa), batched over targets:
a sweep reads the (b, m, n) targets in two GEMMs and forms no m×n intermediate.

With the row-wise Khatri-Rao products (Singhal et al. 2025, §3)

    K_A = A1 ⊙_r A2   (r1 r2, n),  K_A[(k, p), j] = A1[k, j] A2[p, j]
    K_B = B1 ⊙_r B2   (m, r1 r2),  K_B[i, (k, p)] = B1[i, k] B2[i, p]
    ΔW  = s K_B K_A,

row i of B1 (B2, A1, A2 fixed) solves G_i b = rhs_i / s with

    G_i[k, l] = Σ_j A1[k, j] A1[l, j] (B2 A2)[i, j]² = Σ_{p, q} B2[i, p] B2[i, q] H_A[(k, p), (l, q)]
    rhs_i[k]  = Σ_j M[i, j] A1[k, j] (B2 A2)[i, j]   = Σ_p B2[i, p] P[i, (k, p)]

    H_A = K_A K_Aᵀ  (r1 r2, r1 r2),    P = M K_Aᵀ  (m, r1 r2: the one GEMM over M).

B2 given the new B1 reuses P and H_A. The A half-sweep is the transposed problem
with Q = Mᵀ K_Bᵀ and H_B = K_Bᵀ K_B. The error needs no m×n work either:

    ‖M − ΔW‖² = ‖M‖² − 2 s ⟨K_B, P⟩ + s² ⟨K_B H_A, K_B⟩.

Cost per sweep ≈ 4 m n r1 r2 + 6 (m + n)(r1 r2)² flops, nearly all GEMM, against
≈ m n (2 r1² + 2 r2² + 8 (r1 + r2)) plus a dozen element-wise passes over m×n for
the generic ALS of ``als.py`` (whose per-row Grams come from (B2 A2)²): this one
wins while r1 r2 is small against min(m, n), and ``applies`` picks it then.

The safeguards are those of ``als.py``: the A's (B's) get orthonormal rows
(columns) before the B (A) half, the row solves are guarded (the error never
increases), the two pairs are rebalanced after each sweep, and the line-search
extrapolation of Bro (1998) is tried per target; its candidate's P is the next
sweep's P when it is accepted, so an accepted step costs no extra GEMM.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
from torch import Tensor

from .als import pair_norm, solve_rows
from .common import ROW_BLOCK, Params, Structure, bmm, finish_step, per_target_steps, row_blocked

#: the names the solver uses inside; a method's own names (its ``product_terms``) are
#: mapped onto them at the entry and back at the exit
NAMES = ("B1", "A1", "B2", "A2")


def applies(st: Structure, params: Params, m: int, n: int) -> bool:
    """True for one term s (B1 A1) ⊙ (B2 A2) with no fixed matrix, when this solver
    costs fewer than twice the flops of the generic ALS (its flops are all GEMM)."""
    if not _is_pair(st):
        return False
    _, a1, _, a2 = names(st)
    return cheaper(params[a1].shape[-2], params[a2].shape[-2], m, n)


def gradient_applies(st: Structure, params: Params, m: int, n: int) -> bool:
    """Whether ``value_and_grad`` is the faster gradient for Adam and L-BFGS: the same
    single-term structure as ``applies``, and (``gradient_cheaper``) its flops against
    autograd through ΔW."""
    if not _is_pair(st):
        return False
    _, a1, _, a2 = names(st)
    return gradient_cheaper(params[a1].shape[-2], params[a2].shape[-2], m, n)


def _is_pair(st: Structure) -> bool:
    """One term s (B1 A1) ⊙ (B2 A2) with no fixed matrix."""
    return (len(st.terms) == 1 and st.terms[0].fixed is None and len(st.terms[0].pairs) == 2
            and st.offset is None)


def names(st: Structure) -> tuple[str, str, str, str]:
    """The method's names of (B1, A1, B2, A2)."""
    (b1, a1), (b2, a2) = st.terms[0].pairs
    return b1, a1, b2, a2


def gradient_cheaper(r1: int, r2: int, m: int, n: int) -> bool:
    """The Khatri-Rao gradient costs 4 m n R + 8 (m + n) R² flops (R = r1 r2), nearly all
    GEMM; the one through ΔW (``dense_value_and_grad``) six m n r GEMMs and four
    element-wise passes over m×n, about m n (6 (r1 + r2) + 250) flop-equivalents. The
    constant 250 is this 2-core CPU's, measured with the row-blocked dense gradient
    (float32, one thread, 1000×1000 × 4 targets, 100 L-BFGS iterations each way, seconds
    Khatri-Rao / dense): 3.5 / 4.9 at r1 = r2 = 4, 5.4 / 5.3 at 8, 9.8 / 6.0 at 12."""
    R = r1 * r2
    return 4 * m * n * R + 8 * (m + n) * R * R <= m * n * (6 * (r1 + r2) + 250)


def cheaper(r1: int, r2: int, m: int, n: int) -> bool:
    """Whether a Khatri-Rao sweep at (r1, r2) on m×n targets costs fewer than twice the
    flops of a generic ALS sweep (true up to r1 = r2 ≈ 20 at 1000×1000)."""
    kr = 4 * m * n * r1 * r2 + 6 * (m + n) * (r1 * r2) ** 2
    generic = m * n * (2 * r1 * r1 + 2 * r2 * r2 + 8 * (r1 + r2) + 24)
    return kr <= 2 * generic


def _kr_rows(X: Tensor, Y: Tensor) -> Tensor:
    """Row-wise Khatri-Rao: X (b, N, r1), Y (b, N, r2) -> (b, N, r1 r2)."""
    return (X[..., :, None] * Y[..., None, :]).flatten(-2)


def _orth(X: Tensor, Y: Tensor) -> tuple[Tensor, Tensor]:
    """X (b, N, r) = Q R -> (Q, R Y): same product X Y, X with orthonormal columns."""
    Q, R = torch.linalg.qr(X)
    return Q, R @ Y


@functools.lru_cache(maxsize=64)
def _pairs(r: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """The index pairs p <= q of an r×r symmetric matrix and their weights (1 on the
    diagonal, 2 off it), made once per (r, device, dtype)."""
    ip, jp = torch.triu_indices(r, r, device=device)
    return ip, jp, torch.where(ip == jp, 1.0, 2.0).to(device=device, dtype=dtype)


def _row_grams(W: Tensor, H: Tensor) -> Tensor:
    """G_i[k, l] = Σ_{p, q} W[i, p] W[i, q] H[p, q, k, l] for every row i, from the
    distinct p ≤ q only (H is symmetric in (p, q)): one GEMM of (b, N, r(r+1)/2) by
    (b, r(r+1)/2, r'²), about half the full one, whose output is G itself.

    W: (b, N, r) float64; H: (b, r, r, r', r') float64. Returns (b, N, r', r')."""
    b, N, r = W.shape
    ro = H.shape[-1]
    ip, jp, w = _pairs(r, W.device, W.dtype)
    WW = W[..., ip] * W[..., jp] * w  # (b, N, r(r+1)/2)
    return (WW @ H[:, ip, jp].reshape(b, -1, ro * ro)).reshape(b, N, ro, ro)


@dataclasses.dataclass
class Prepared:
    """Factors ready for a B half-sweep: A's with orthonormal rows, and what the
    half-sweep reads: P = M K_Aᵀ, H_A = K_A K_Aᵀ (float64), and the error."""
    p: Params
    P: Tensor  # (b, m, r1 r2) float64
    H: Tensor  # (b, r1 r2, r1 r2) float64
    err: Tensor  # (b,) relative error ‖M − ΔW‖² / ‖M‖², float64


class KRALS:
    """The solver state for targets M (b, m, n) and scale s."""

    def __init__(self, M: Tensor, s: float, ridge: float = 1e-10):
        self.M, self.s, self.ridge = M, float(s), ridge
        self.MT = M.mT  # a view: GEMMs read it transposed, no copy
        self.nrm2 = M.double().pow(2).sum((-2, -1)).clamp_min(1e-300)  # (b,)

    # ---- errors from the half-sweep quantities --------------------------------- #
    def _err(self, K: Tensor, P: Tensor, H: Tensor) -> Tensor:
        """‖M − s K_B K_A‖² / ‖M‖² from K (b, N, r1 r2) float64 (K_B, or K_Aᵀ) and the
        matching P = M K_Aᵀ (or Q = Mᵀ K_B) and H (the other side's Gram)."""
        s = self.s
        inner = (K * P).sum((-2, -1))
        sq = ((K @ H) * K).sum((-2, -1))
        return ((self.nrm2 - 2 * s * inner + s * s * sq) / self.nrm2).clamp_min(0.0)

    def prepare(self, p: Params, err: bool = True) -> Prepared:
        """Orthonormalize the A's (the B's absorb R), form K_A, P (one GEMM), H_A, and
        (``err``) the error of ``p``."""
        A1t, B1t = _orth(p["A1"].mT, p["B1"].mT)  # A1ᵀ = Q R: A1 ← Qᵀ, B1ᵀ ← R B1ᵀ
        A2t, B2t = _orth(p["A2"].mT, p["B2"].mT)
        q = {"B1": B1t.mT, "A1": A1t.mT, "B2": B2t.mT, "A2": A2t.mT}
        KA = _kr_rows(q["A1"].mT, q["A2"].mT)  # (b, n, r1 r2) = K_Aᵀ
        P = bmm(self.M, KA).double()  # (b, m, r1 r2): the GEMM
        KAd = KA.double()
        H = bmm(KAd.mT, KAd)  # (b, r1 r2, r1 r2)
        if not err:
            return Prepared(q, P, H, torch.full_like(self.nrm2, math.nan))
        KB = _kr_rows(q["B1"].double(), q["B2"].double())
        return Prepared(q, P, H, self._err(KB, P, H))

    # ---- one half-sweep: rows X1 (b, N, r1), X2 (b, N, r2) ------------------------ #
    def _half(self, X1: Tensor, X2: Tensor, P: Tensor, H: Tensor) -> tuple[Tensor, Tensor]:
        b, N, r1 = X1.shape
        r2 = X2.shape[-1]
        P4 = P.reshape(b, N, r1, r2)
        H4 = H.reshape(b, r1, r2, r1, r2)

        def first(X2: Tensor, X1_old: Tensor) -> Tensor:  # X1 given X2
            W = X2.double()
            G = _row_grams(W, H4.permute(0, 2, 4, 1, 3))  # H[k,p,l,q] as [p,q,k,l]
            rhs = (P4 @ W[..., None])[..., 0]  # (b, N, r1)
            return solve_rows(G, rhs, X1_old, self.s, self.ridge, overwrite=True)

        def second(X1: Tensor, X2_old: Tensor) -> Tensor:  # X2 given X1
            W = X1.double()
            G = _row_grams(W, H4.permute(0, 1, 3, 2, 4))  # as [k,l,p,q]
            rhs = (W[..., None, :] @ P4)[..., 0, :]  # (b, N, r2)
            return solve_rows(G, rhs, X2_old, self.s, self.ridge, overwrite=True)

        # a zero factor is solved first: solving its partner against it would stall at 0
        if bool((X2 == 0).flatten(1).all(1).any()):
            X2 = second(X1, X2)
            X1 = first(X2, X1)
        else:
            X1 = first(X2, X1)
            X2 = second(X1, X2)
        return X1, X2

    def sweep(self, prep: Prepared) -> tuple[Params, Tensor]:
        """B half (reads prep.P), then A half (one GEMM); pairs rebalanced. Returns the
        new factors (B's with orthonormal columns, up to the balance) and their error."""
        q = prep.p
        B1, B2 = self._half(q["B1"], q["B2"], prep.P, prep.H)
        B1, A1 = _orth(B1, q["A1"])
        B2, A2 = _orth(B2, q["A2"])
        KB = _kr_rows(B1, B2)  # (b, m, r1 r2)
        Q = bmm(self.MT, KB).double()  # (b, n, r1 r2): the GEMM
        KBd = KB.double()
        HB = bmm(KBd.mT, KBd)
        A1t, A2t = self._half(A1.mT, A2.mT, Q, HB)
        err = self._err(_kr_rows(A1t.double(), A2t.double()), Q, HB)
        # rebalance ‖B1 A1‖ = ‖B2 A2‖ (ΔW unchanged)
        n1, n2 = pair_norm(B1, A1t.mT), pair_norm(B2, A2t.mT)
        ok = (n1 > 0) & (n2 > 0) & torch.isfinite(n1) & torch.isfinite(n2)
        geo = (n1 * n2).clamp_min(1e-300).sqrt()
        c1 = torch.where(ok, geo / n1.clamp_min(1e-300), torch.ones_like(n1))[:, None, None]
        c2 = torch.where(ok, geo / n2.clamp_min(1e-300), torch.ones_like(n2))[:, None, None]
        return {"B1": B1 * c1.to(B1), "A1": A1t.mT, "B2": B2 * c2.to(B2), "A2": A2t.mT}, err


def value_and_grad(M: Tensor, st: Structure):
    """The relative errors e_b = ‖M_b − s K_B K_A‖² / ‖M_b‖² and their exact gradients
    with respect to (B1, A1, B2, A2), written out by hand for Adam and L-BFGS (no autograd, no
    m×n intermediate). With P = M K_Aᵀ, Q = Mᵀ K_B, H_A = K_A K_Aᵀ, H_B = K_Bᵀ K_B
    and c = 1 / ‖M‖²:

        e      = 1 − 2 s c ⟨K_B, P⟩ + s² c ⟨K_B H_A, K_B⟩
        ∂e/∂K_B  = 2 s c (s K_B H_A − P)                  (m, r1 r2)
        ∂e/∂K_Aᵀ = 2 s c (s K_Aᵀ H_B − Q)                 (n, r1 r2)
        ∂e/∂B1[i, k] = Σ_p ∂e/∂K_B[i, (k, p)] B2[i, p],   ∂e/∂B2[i, p] = Σ_k ∂e/∂K_B[i, (k, p)] B1[i, k]

    and the same for A1ᵀ, A2ᵀ. Two GEMMs over M per step (P and Q) and four small
    ones, 4 m n r1 r2 + 8 (m + n)(r1 r2)² flops; autograd on the same expansion
    needs the same two big GEMMs plus its bookkeeping and a dozen element-wise
    passes over (m + n) × r1 r2. Float32 rounding of the expansion shows at about
    1e-7 of ‖M‖² (``fit`` reports the final error from ΔW itself, in float64).

    Returns fn(params) -> (e (b,), {name: gradient}), to be called under no_grad."""
    s = float(st.scale)
    c = 1.0 / M.pow(2).sum((-2, -1)).clamp_min(torch.finfo(M.dtype).tiny)  # (b,)
    MT = M.mT  # a view: the GEMM reads M transposed

    def split(G: Tensor, X1: Tensor, X2: Tensor) -> tuple[Tensor, Tensor]:
        """Chain rule through K = X1 ⊙_r X2: G (b, N, r1 r2) -> (∂X1 (b, N, r1), ∂X2 (b, N, r2))."""
        G4 = G.unflatten(-1, (X1.shape[-1], X2.shape[-1]))  # (b, N, r1, r2)
        return (G4 @ X2[..., None])[..., 0], (X1[..., None, :] @ G4)[..., 0, :]

    own = names(st)

    def fn(params: Params) -> tuple[Tensor, Params]:
        p = dict(zip(NAMES, (params[k] for k in own)))
        A1t, A2t = p["A1"].mT, p["A2"].mT  # (b, n, r1), (b, n, r2)
        KA = _kr_rows(A1t, A2t)  # (b, n, R) = K_Aᵀ
        KB = _kr_rows(p["B1"], p["B2"])  # (b, m, R)
        P = M @ KA  # (b, m, R): GEMM over M
        Q = MT @ KB  # (b, n, R): GEMM over Mᵀ
        KBH = KB @ (KA.mT @ KA)  # (b, m, R) = K_B H_A
        KAH = KA @ (KB.mT @ KB)  # (b, n, R) = K_Aᵀ H_B
        inner = (KB * P).sum((-2, -1), dtype=torch.float64)  # (b,)
        sq = (KBH * KB).sum((-2, -1), dtype=torch.float64)  # (b,)
        cd = c.double()
        e = 1.0 - 2 * s * cd * inner + s * s * cd * sq  # (b,)
        w = (2 * s * c)[:, None, None]
        GB = (s * KBH - P).mul_(w)  # (b, m, R) ∂e/∂K_B
        GA = (s * KAH - Q).mul_(w)  # (b, n, R) ∂e/∂K_Aᵀ
        gB1, gB2 = split(GB, p["B1"], p["B2"])
        gA1t, gA2t = split(GA, A1t, A2t)
        return e, dict(zip(own, (gB1, gA1t.mT, gB2, gA2t.mT)))

    return fn


def dense_value_and_grad(M: Tensor, st: Structure, row_block: int | None = ROW_BLOCK):
    """The same errors and gradients through ΔW itself, written out, for r1 r2 too large
    for the Khatri-Rao expansion: with P1 = B1 A1, P2 = B2 A2, N = M − s P1 ⊙ P2 (minus
    the residual) and w = 2 s / ‖M‖²,

        e = ‖N‖² / ‖M‖²,   ∂e/∂B1 = −w (N ⊙ P2) A1ᵀ,  ∂e/∂A1 = −w B1ᵀ (N ⊙ P2),

    and the same for pair 2 with P1: six GEMMs of m n r, as autograd does, and four
    element-wise passes over m×n (N in one fused multiply-add, ‖N‖² as float32 row sums
    added in float64, the two products; w scales the small GEMM outputs), half those of
    the plain expression. On a CPU (``row_block`` rows at a time, per target) every
    intermediate lives in cache, the m×n passes cost what the GEMMs leave and no m×n
    tensor is allocated: 1.11× the batched expression on one thread at 1000×1000, r1 = r2
    = 36 (``reconstruction.bench --only g``), which a GPU runs (``row_block=None``: always). Each target is evaluated on its own, so its
    numbers do not depend on the batch. Returns fn(params) -> (e (b,), {name: gradient}),
    to be called under no_grad."""
    s = float(st.scale)
    nrm = M.pow(2).sum((-2, -1), dtype=torch.float64).clamp_min(1e-300)  # (b,)
    w = (-2 * s / nrm).to(M.dtype)[:, None, None]  # (b, 1, 1), the sign of −N
    own = names(st)
    if row_block is not None and M.device.type == "cpu":
        rows = int(row_block) if row_blocked(M) else M.shape[-2]
        return _blocked_value_and_grad(M, s, nrm, w, own, rows)

    def fn(params: Params) -> tuple[Tensor, Params]:
        B1, A1, B2, A2 = (params[k] for k in own)
        P1, P2 = B1 @ A1, B2 @ A2  # (b, m, n)
        N = torch.addcmul(M, P1, P2, value=-s)  # M − s P1 ⊙ P2
        e = (N * N).sum(-1).sum(-1, dtype=torch.float64) / nrm  # (b,)
        G2 = N * P1  # ∂e/∂P2 / w
        G1 = N.mul_(P2)  # ∂e/∂P1 / w, in place of N
        return e, dict(zip(own, (w * (G1 @ A1.mT), w * (B1.mT @ G1),
                                 w * (G2 @ A2.mT), w * (B2.mT @ G2))))

    return fn


def _blocked_value_and_grad(M: Tensor, s: float, nrm: Tensor, w: Tensor, own, rows: int):
    """``dense_value_and_grad`` target by target, ``rows`` rows of M at a time, into
    buffers allocated once: for rows I, P1 = B1[I] A1, P2 = B2[I] A2, N = M[I] − s P1 ⊙ P2,
    then ∂e/∂B1[I] = −w (N ⊙ P2) A1ᵀ and ∂e/∂A1 += −w B1[I]ᵀ (N ⊙ P2) (pair 2 alike)."""
    b, m, n = M.shape
    rows = max(1, min(rows, m))
    buf = torch.empty(4, rows, n, dtype=M.dtype, device=M.device)  # P1, P2, N, N ⊙ N

    def fn(params: Params) -> tuple[Tensor, Params]:
        B1, A1, B2, A2 = (params[k] for k in own)
        gB1, gB2 = torch.empty_like(B1), torch.empty_like(B2)  # (b, m, r1), (b, m, r2)
        gA1, gA2 = torch.zeros_like(A1), torch.zeros_like(A2)  # (b, r1, n), (b, r2, n)
        row_sq = torch.empty(b, m, dtype=M.dtype, device=M.device)  # ‖N[i, :]‖² per row
        for t in range(b):
            A1t, A2t = A1[t].mT, A2[t].mT  # (n, r1), (n, r2)
            for i in range(0, m, rows):
                k = min(rows, m - i)
                P1, P2, N, sq = (x[:k] for x in buf)
                torch.mm(B1[t, i:i + k], A1[t], out=P1)  # (k, n)
                torch.mm(B2[t, i:i + k], A2[t], out=P2)
                torch.addcmul(M[t, i:i + k], P1, P2, value=-s, out=N)  # M − s P1 ⊙ P2
                torch.sum(torch.mul(N, N, out=sq), -1, out=row_sq[t, i:i + k])
                G2 = P1.mul_(N)  # ∂e/∂P2 / w, in place of P1
                G1 = N.mul_(P2)  # ∂e/∂P1 / w, in place of N
                torch.mm(G1, A1t, out=gB1[t, i:i + k])
                gA1[t].addmm_(B1[t, i:i + k].mT, G1)
                torch.mm(G2, A2t, out=gB2[t, i:i + k])
                gA2[t].addmm_(B2[t, i:i + k].mT, G2)
        e = row_sq.sum(-1, dtype=torch.float64) / nrm  # (b,)
        return e, dict(zip(own, (gB1.mul_(w), gA1.mul_(w), gB2.mul_(w), gA2.mul_(w))))

    return fn


def _where(mask: Tensor, a: Params, b: Params) -> Params:
    return {k: torch.where(mask[:, None, None], a[k], b[k]) for k in a}


def run(M: Tensor, st: Structure, p0: Params, *, steps: int, tol: float, window: int,
        progress: bool, extrapolate: bool = True, label: str = "als"):
    """Sweeps until ``steps`` or every target stalls (error improved by less than
    ``tol`` relatively over ``window`` sweeps). Returns (params, history, sweeps per
    target (b,)) like ``fit._run_als``: history[k] (b,) is the error after sweep k."""
    from tqdm.auto import tqdm

    sol = KRALS(M, st.scale)
    Bn = M.shape[0]
    own = names(st)
    p = dict(zip(NAMES, (p0[k] for k in own)))
    active = torch.ones(Bn, dtype=torch.bool, device=M.device)
    hist = torch.zeros(steps + 1, Bn, dtype=torch.float64, device=M.device)
    prep = sol.prepare(p)
    hist[0] = prep.err
    beta = torch.full((Bn,), 0.5, dtype=torch.float64, device=M.device)
    k = 0
    its = torch.zeros(Bn, dtype=torch.long, device=M.device)
    bar = tqdm(total=steps, disable=not progress, desc=label, leave=False)
    with torch.no_grad():
        for k in range(1, steps + 1):
            its.masked_fill_(active, k)
            new, e = sol.sweep(prep)
            new = _where(active, new, p)
            e = torch.where(active, e, hist[k - 1])
            tried = extrapolate and k >= 2
            if tried:
                bsh = beta.reshape(-1, 1, 1)
                cand = {x: new[x] + bsh.to(new[x]) * (new[x] - p[x]) for x in NAMES}
                pc = sol.prepare(cand)  # its P is the next sweep's if the step is taken
                take = active & torch.isfinite(pc.err) & (pc.err < e)
                beta = torch.where(take, (beta * 1.5).clamp(max=4.0), (beta / 2).clamp(min=0.05))
                use = take | ~active  # inactive targets: cand == new == p
            if tried and bool(use.all()):
                p, prep = cand, pc
                e = torch.where(take, pc.err, e)
            elif tried and bool(take.any()):
                pn = sol.prepare(new, err=False)
                p = _where(take, cand, new)
                t3 = take[:, None, None]
                prep = Prepared(_where(take, pc.p, pn.p), torch.where(t3, pc.P, pn.P),
                                torch.where(t3, pc.H, pn.H), torch.where(take, pc.err, e))
                e = torch.where(take, pc.err, e)
            else:
                p, prep = new, sol.prepare(new, err=False)
            hist[k] = torch.where(active, e, hist[k - 1])
            if finish_step(bar, hist, k, active, window, tol):
                break
    bar.close()
    if not math.isfinite(float(hist[k].max())):
        raise RuntimeError("Khatri-Rao ALS produced a non-finite error; please report")
    return {**p0, **{o: p[x] for x, o in zip(NAMES, own)}}, list(hist[: k + 1]), per_target_steps(its, k)
