"""Pieces every solver shares: batched initial factors, the "linear structure" of
a method (what ALS and the reconstruction inits need), homogeneity probes, and
the optimal rescaling of an update.

Structure. Methods linear in each factor declare (``Method.product_terms`` and
``Method.product_modulator``, read here; no solver looks a method up by name)

    ΔW = s · Σ_t F_t ⊙ Π_{(B, A) in t} (B A)                       (*)

with F_t a fixed matrix (all-ones, W0, or a frozen SMoA mask M_k):

    lora   ((B, A),)                        F = 1
    hira   ((B, A),)                        F = W0      (modulator "w0")
    abba   ((B1, A1), (B2, A2))             F = 1       (one term, two pairs)
    loha   ((B1, A1), (B2, A2))             F = 1
    smoa   ((B_{k}, A_{k}),) for k < K      F_k = M_k   (modulator "M", K terms)

The scale s is not read from the config: it is measured by comparing (*) with
``method.delta`` on random factors, which also checks that the declaration is
right (a method whose ``delta`` does not match it is then simply not offered to ALS).
Derived kinds: a *Hadamard pair* is one term of two pairs with F = 1 (ABBA, LoHa:
``lora-warm`` and ``spectral`` starts, the Khatri-Rao solvers); a *low-rank* method one
term of one pair with F = 1 (LoRA: the ``svd`` start). A method with a ``lora_term``
(DoRA, α-LoRA) gets the ``lora-warm`` start ``lora_contained_init``.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import Tensor

import theory

Params = dict[str, Tensor]


def _method(method):
    return theory.get_method(method) if isinstance(method, str) else method


def is_hadamard_pair(method) -> bool:
    """ΔW = s (B1 A1) ⊙ (B2 A2): one term of two pairs, no fixed matrix (ABBA, LoHa)."""
    meth = _method(method)
    t = meth.product_terms
    return (t is not None and len(t) == 1 and len(t[0]) == 2 and meth.product_modulator is None
            and meth.product_offset is None)


def is_modulated(method) -> bool:
    """ΔW = s Σ_t F_t ⊙ (B_t A_t) (− W0): terms of one pair each, times a fixed matrix
    (HiRA, HUT: W0; SMoA: its spectral slices)."""
    meth = _method(method)
    t = meth.product_terms
    return (t is not None and all(len(pairs) == 1 for pairs in t)
            and meth.product_modulator is not None)


def is_low_rank(method) -> bool:
    """ΔW = s B A: one term of one pair, no fixed matrix (LoRA)."""
    meth = _method(method)
    t = meth.product_terms
    return (t is not None and len(t) == 1 and len(t[0]) == 1 and meth.product_modulator is None
            and meth.product_offset is None)


def has_als(method) -> bool:
    """An ALS applies: the generic one (a product form) or an exact one of ``solvers.exact``."""
    meth = _method(method)
    return meth.product_terms is not None or meth.exact_als is not None


def stalled(hist: Tensor, k: int, window: int, tol: float) -> Tensor:
    """The stopping rule every iterative solver shares: per target, whether the error
    hist[k] (hist: (iterations + 1, ..., b)) improved by less than ``tol``
    (relative) over the last ``window`` iterations; all False before that."""
    if k < window:
        return torch.zeros_like(hist[k], dtype=torch.bool)
    old = hist[k - window]
    return (old - hist[k]) <= tol * old


def per_target_steps(its: Tensor, k: int) -> Tensor:
    """The iterations each target ran, as a fit of that target alone reports them: ``its``
    holds, per target, the last iteration it entered active (``its.masked_fill_(active, k)``
    at the top of each iteration; (..., b), the best start's are the largest); a target
    inactive from the start still counts the one pass its lone loop would make. (b,) long cpu."""
    its = its.reshape(-1, its.shape[-1]).amax(0) if its.ndim > 1 else its
    return its.clamp_min(min(k, 1)).long().cpu()


def finish_step(bar, hist: Tensor, k: int, active: Tensor, window: int, tol: float) -> bool:
    """The end of iteration k of every solver loop: tick the progress bar, drop the
    targets that ``stalled`` from ``active`` (in place); True when none is left. A target
    that stops is left exactly as it is while the others go on, so a target's result does
    not depend on the rest of the batch."""
    bar.update(1)
    active &= ~stalled(hist, k, window, tol)
    return not bool(active.any())


#: rows of M per block of the one-thread CPU evaluations (``als_kr.dense_value_and_grad``,
#: ``als.structure_error``, ``rowscale``): a block's few (rows, n) intermediates stay in a
#: core's cache (n = 1000, float32: 0.5 MB each), where the batched expressions stream
#: (b, m, n) tensors through memory in every pass (``reconstruction.bench --only gi``)
ROW_BLOCK = 128


def row_blocked(M: Tensor) -> bool:
    """Whether M's evaluations go row block by row block, target by target: on a CPU
    with one thread (each worker of a sweep); a GPU, or several threads, run the batched
    expressions."""
    return M.device.type == "cpu" and torch.get_num_threads() == 1


#: the widest Y that ``bmm`` puts on the left: above it (r = 72, the 136-171 columns of
#: the Gram products at r = 16-18) the plain product was as fast or faster (an A/B of
#: ALS half-steps at 1000×1000, four targets, one thread, in one process)
NARROW = 64


def bmm(X: Tensor, Y: Tensor) -> Tensor:
    """X @ Y, (..., p, k) @ (..., k, q), with one matrix's numbers independent of the rest
    of the batch: the BLAS sums a product with one output column (q = 1, k > 1: a GEMV)
    in another order for one matrix than for several, so that case is a row-wise
    reduction here (a sweep's cell then has the numbers of a fit of it alone).

    A large X times a narrow Y (q <= ``NARROW`` and at most a quarter of p and of k: the
    ALS normal equations, (C ⊙ C) KR(A)ᵀ and (C ⊙ T) Aᵀ) is computed as (Yᵀ Xᵀ)ᵀ, with
    the narrow operand on the left: on one CPU thread up to 10× faster for a transposed X
    (the A half-steps, q <= 10; a B and an A half-step of ALS at r = 2-4 2.5× faster, at
    r = 36 1.3×), the same product rounded in another order; the result is a transposed
    view."""
    if Y.shape[-1] == 1 and Y.shape[-2] > 1:
        return (X * Y.mT).sum(-1, keepdim=True)
    if Y.shape[-1] <= NARROW and 4 * Y.shape[-1] <= min(X.shape[-2], X.shape[-1]):
        return (Y.mT @ X.mT).mT
    return X @ Y


@dataclasses.dataclass
class Term:
    pairs: list[tuple[str, str]]  # factor names (B, A) of each low-rank pair
    fixed: Tensor | None  # (b, m, n) F_t, None = all ones


@dataclasses.dataclass
class Structure:
    terms: list[Term]
    scale: float
    offset: Tensor | None = None  # (b, m, n) subtracted from the form (HUT's W0), None = 0

    def product(self, params: Params, t: int, skip: int | None = None) -> Tensor | None:
        """F_t ⊙ Π_{pairs q != skip} B_q A_q (None when that is all-ones)."""
        term, out = self.terms[t], self.terms[t].fixed
        for q, (b, a) in enumerate(term.pairs):
            if q == skip:
                continue
            p = params[b] @ params[a]  # (b, m, n)
            out = p if out is None else out * p
        return out

    def delta(self, params: Params) -> Tensor:
        out = None
        for t in range(len(self.terms)):
            p = self.product(params, t)
            out = p if out is None else out + p
        out = self.scale * out
        return out if self.offset is None else out - self.offset


#: the last few ``method.init`` results, [(key, w0, params)]: a sweep fits many targets
#: with the same W0 (the stand-in depends on the seed alone), and some inits cost seconds
#: at 1000×1000 (PMSS's pivoted QR, SMoA's SVD)
_INITS: list[tuple[tuple, Tensor, Params]] = []
_INITS_KEEP = 4


def _init_one(method, w0: Tensor, config, seed: int, scheme: str) -> Params:
    """``method.init(w0, config, seed, scheme)`` (w0 (m, n)), remembered for the last few
    W0 (compared exactly): an init is a function of these alone."""
    key = (type(method), method.name, config, int(seed), scheme, w0.dtype, w0.device, tuple(w0.shape))
    for k, w, p in _INITS:
        if k == key and torch.equal(w, w0):
            return {name: v.clone() for name, v in p.items()}
    p = method.init(w0, config, int(seed), scheme=scheme)
    _INITS.append((key, w0.clone(), {name: v.clone() for name, v in p.items()}))
    del _INITS[:-_INITS_KEEP]
    return p


def stack_init(method, w0: Tensor, config, seed: int, scheme: str) -> Params:
    """``method.init`` on each target separately with the same seed, stacked on dim 0:
    a target's starting point does not depend on the rest of the batch (targets with the
    same W0 share one call)."""
    per = [_init_one(method, w0[b], config, seed, scheme) for b in range(w0.shape[0])]
    return {k: torch.stack([p[k] for p in per]) for k in per[0]}


def _declared_terms(method, params: Params, w0: Tensor | None) -> list[Term] | None:
    """The terms of (*) as ``method`` declares them, for these factors (None: none)."""
    decl, mod = method.product_terms, method.product_modulator
    if decl is None:
        return None
    if mod == "w0":
        if w0 is None:
            return None
        fixed_all = w0
    elif mod is not None:
        if mod not in params:
            return None
        fixed_all = params[mod]
    else:
        fixed_all = None
    terms = []
    for pairs in decl:
        if any("{k}" in x for pair in pairs for x in pair):  # one term per slice k of F
            if mod is None or mod == "w0":
                return None
            for k in range(fixed_all.shape[-3]):
                terms.append(Term([(b.format(k=k), a.format(k=k)) for b, a in pairs],
                                  fixed_all[..., k, :, :]))
        else:
            terms.append(Term(list(pairs), fixed_all))
    return terms


def structure(method, params: Params, w0: Tensor | None, config) -> Structure | None:
    """The (*) form of ``method`` for these factors, or None if it has none (or the
    declaration does not reproduce ``method.delta``)."""
    terms = _declared_terms(method, params, w0)
    if not terms:
        return None
    offset = None
    if method.product_offset == "w0":
        if w0 is None:
            return None
        offset = w0
    elif method.product_offset is not None:
        return None
    if any(k not in params for t in terms for pair in t.pairs for k in pair):
        return None
    st = Structure(terms, 1.0, offset)
    # measure s and check the form in float64 on random factors, W0 and modulator drawn
    # from a fixed seed: s is a function of the method, config and shape alone, never of
    # the batch's first target (HUT's W0 ⊙ (B A) − W0 + W0 rounds differently per W0)
    g = torch.Generator().manual_seed(12345)
    mod = method.product_modulator
    probe = {k: v[:1].double() for k, v in params.items()}
    for k in [x for t in terms for pair in t.pairs for x in pair] + ([mod] if mod in params else []):
        probe[k] = torch.randn(probe[k].shape, generator=g, dtype=torch.float64)
    w0_1 = None if w0 is None else torch.randn(w0[:1].shape, generator=g, dtype=torch.float64)
    sub = Structure(_declared_terms(method, probe, w0_1), 1.0)
    try:
        ref = method.delta(probe, w0_1, config).double()
    except Exception:  # noqa: BLE001 - a method that cannot take these factors
        return None
    if offset is not None:
        ref = ref + w0_1
    mine = sub.delta(probe).double()
    nrm = float((mine * mine).sum())
    if nrm == 0.0:
        return None
    s = float((ref * mine).sum()) / nrm
    resid = float(((ref - s * mine) ** 2).sum()) / max(float((ref * ref).sum()), 1e-300)
    eps = torch.finfo(params[terms[0].pairs[0][0]].dtype).eps
    if not resid < 1e3 * eps or s == 0.0:
        return None
    st.scale = s
    return st


def _group(name: str) -> str:
    return re.sub(r"[_\d]+$", "", name)


def homogeneous_factors(method, params: Params, w0: Tensor | None, config) -> list[str] | None:
    """Trainable factors ``fs`` such that ΔW is linear in them jointly
    (ΔW(c·fs) = c ΔW): a single factor, else a group such as all ``B_k``.
    Checked on random factors; None if there is none (DoRA, HUT, α-LoRA...)."""
    trainable = [k for k in params if k not in method.frozen]
    groups: list[list[str]] = [[k] for k in trainable]
    by: dict[str, list[str]] = {}
    for k in trainable:
        by.setdefault(_group(k), []).append(k)
    groups += [v for v in by.values() if len(v) > 1]
    g = torch.Generator().manual_seed(54321)
    probe = {k: v[:1].double().clone() for k, v in params.items()}
    for k in trainable:
        probe[k] = torch.randn(probe[k].shape, generator=g, dtype=torch.float64)
    w0_1 = None if w0 is None else w0[:1].double()
    try:
        d1 = method.delta(probe, w0_1, config)
    except Exception:  # noqa: BLE001
        return None
    n1 = float((d1 * d1).sum())
    if not n1 > 0:
        return None
    for grp in groups:
        p2 = dict(probe)
        for k in grp:
            p2[k] = 2.0 * probe[k]
        try:
            d2 = method.delta(p2, w0_1, config)
        except Exception:  # noqa: BLE001, S112 - this group cannot be scaled alone
            continue
        if float(((d2 - 2.0 * d1) ** 2).sum()) <= 1e-20 * n1:
            return grp
    return None


def scale_factors(params: Params, names: list[str], c: Tensor) -> Params:
    """Multiply factors ``names`` of each target b by c[b] (c: (b,))."""
    out = dict(params)
    for k in names:
        v = params[k]
        out[k] = v * c.to(v).reshape(-1, *([1] * (v.ndim - 1)))
    return out


def optimal_rescale(M: Tensor, D: Tensor) -> Tensor:
    """c = <M, D> / ‖D‖² per target (1 where D = 0): the best multiple of D,
    whose error 1 − cos²(M, D) is never above 1 (the zero update)."""
    num = (M * D).sum((-2, -1)).double()
    den = (D * D).sum((-2, -1)).double()
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.ones_like(num))


def rescale_start(method, M: Tensor, w0: Tensor | None, config, params: Params,
                  hom: list[str] | None) -> Params:
    """A start moved to its best multiple c·ΔW (c = ``optimal_rescale``), so a
    gradient solver never starts above error 1, and, for a Hadamard pair, put in a
    balanced gauge first: each rank-one component (B[:, k], A[k, :]) of each pair
    gets equal norms (ΔW unchanged; the ``spectral`` start's A's can be 10⁵ times
    its B's, which ruins float32 gradients), then the four factors are scaled by
    |c|^(1/4) each (A2 also by sign c). Another method's ``hom`` group is scaled by
    c. Nothing is rescaled where ΔW = 0 or c = 0 (no direction to keep)."""
    pair = is_hadamard_pair(method)
    if not pair and not hom:
        return params
    with torch.no_grad():
        out = dict(params)
        if pair:
            (b1, a1), (b2, a2) = method.product_terms[0]
            for b, a in ((b1, a1), (b2, a2)):
                nb = torch.linalg.vector_norm(out[b], dim=-2)  # (batch, r) column norms
                na = torch.linalg.vector_norm(out[a], dim=-1)  # (batch, r) row norms
                ok = (nb > 0) & (na > 0)
                g = torch.where(ok, (na / torch.where(ok, nb, torch.ones_like(nb))).sqrt(),
                                torch.ones_like(nb))
                out[b], out[a] = out[b] * g[..., None, :], out[a] / g[..., :, None]
        c = optimal_rescale(M, method.delta(out, w0, config))  # (b,)
        c = torch.where(torch.isfinite(c) & (c != 0), c, torch.ones_like(c))
        if not pair:
            return scale_factors(out, hom, c)
        q = c.abs() ** 0.25
        out = scale_factors(out, [b1, a1, b2], q)
        return scale_factors(out, [a2], q * c.sign())


#: the last few decompositions of a target (``remembered``): a sweep fits each target with
#: every method and rank, and their starts decompose the same M again (the LoRA-warm start
#: of ABBA and DoRA an eigh of M Mᵀ, about 0.9 s per 1000×1000 batch of four on one
#: thread; the spectral start an SVD per target)
_DECOMP: list[tuple[str, Tensor, object]] = []
_DECOMP_KEEP = 8
_DECOMP_MAX_BYTES = 64 * 2 ** 20  # inputs larger than this are not kept


def remembered(name: str, Z: Tensor, fn):
    """``fn(Z)``, remembered for the last few Z (compared exactly, so the result is the one
    ``fn`` gives, bit for bit). Callers must not modify the result in place."""
    if Z.numel() * Z.element_size() > _DECOMP_MAX_BYTES:
        return fn(Z)
    for key, z, out in _DECOMP:
        if key == name and z.shape == Z.shape and z.dtype == Z.dtype and z.device == Z.device \
                and torch.equal(z, Z):
            return out
    out = fn(Z)
    _DECOMP.append((name, Z.clone(), out))
    del _DECOMP[:-_DECOMP_KEEP]
    return out


#: matrices with a smaller side at least this long get their top singular triplets from
#: the eigenvectors of the smaller Gram matrix (``top_singular``): on this 2-core CPU a
#: float64 1000×1000 ``linalg.svd`` took 10-35× as long as ``eigh`` of Z Zᵀ (and 8× at
#: 500×500, measured in one run); the rank-k projection agrees to ~1e-13 relative
EIGH_FROM = 256


def top_singular(Z: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top-k singular triplets of Z (..., p, q): U (..., p, k), S (..., k) descending,
    Vh (..., k, q). Small matrices: ``linalg.svd``. Large ones (min(p, q) >= EIGH_FROM,
    float64): eigenvectors U_k of the smaller Gram Z Zᵀ, then S = row norms of U_kᵀ Z
    and Vh = (U_kᵀ Z) / S, so U S Vh = U_k U_kᵀ Z is the projection on the top-k
    subspace exactly; directions with σ <= max(p, q)·eps·σ_1 get S = 0 and Vh = 0."""
    p, q = Z.shape[-2:]
    if min(p, q) < EIGH_FROM or Z.dtype != torch.float64:
        U, S, Vh = torch.linalg.svd(Z, full_matrices=False)
        return U[..., :, :k], S[..., :k], Vh[..., :k, :]
    if p > q:  # the smaller Gram is q×q: the triplets of Zᵀ, transposed back
        V, S, Uh = top_singular(Z.mT, k)
        return Uh.mT, S, V.mT
    k = min(k, p)
    E = remembered("eigh ZZt", Z, lambda Z: torch.linalg.eigh(Z @ Z.mT)[1])  # ascending eigenvalues
    U = E[..., :, p - k:].flip(-1)  # (..., p, k), largest first
    X = U.mT @ Z  # (..., k, q) = S Vh
    S = torch.linalg.vector_norm(X, dim=-1)  # (..., k)
    keep = S > max(p, q) * torch.finfo(Z.dtype).eps * S[..., :1]
    Vh = torch.where(keep[..., None], X / torch.where(keep, S, torch.ones_like(S))[..., None],
                     torch.zeros_like(X))
    S, order = torch.where(keep, S, torch.zeros_like(S)).sort(-1, descending=True)
    return (torch.take_along_dim(U, order[..., None, :], -1), S,
            torch.take_along_dim(Vh, order[..., :, None], -2))


def truncated_product(Z: Tensor, r: int) -> Tensor:
    """[Z]_r, the best rank-r approximation of Z (..., p, q) (``top_singular``)."""
    B, A = truncated_factors(Z, r)
    return B @ A


def truncated_factors(Z: Tensor, r: int, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Best rank-r factors of Z (..., p, q) (Eckart-Young) with s·B A = [Z]_r:
    B = sign(s) U_r √(Σ_r/|s|) (..., p, r), A = √(Σ_r/|s|) V_rᵀ (..., r, q), in Z's
    dtype, zero-padded to r when r > min(p, q) (``top_singular``: an SVD, or for large
    float64 matrices the eigenvectors of the smaller Gram)."""
    U, S, Vh = top_singular(Z, min(r, *Z.shape[-2:]))
    k = min(r, S.shape[-1])
    sq = (S[..., :k] / abs(scale)).sqrt()
    B = (1.0 if scale > 0 else -1.0) * U[..., :, :k] * sq[..., None, :]
    A = sq[..., :, None] * Vh[..., :k, :]
    if k < r:
        B = torch.cat([B, B.new_zeros(*B.shape[:-1], r - k)], -1)
        A = torch.cat([A, A.new_zeros(*A.shape[:-2], r - k, A.shape[-1])], -2)
    return B, A


def lora_warm(method, M: Tensor, params: Params, st: Structure, seed: int, eps: float = 0.1) -> Params:
    """The "lora-warm" start of a Hadamard pair s·(B1 A1) ⊙ (B2 A2):

    B1 A1 = (rank-r1 truncated SVD of M) / s, B2 = [1, ε·N], A2 = [1; ε·N]
    (first column / row all ones, the others small Gaussian), so that B2 A2 ≈ 1
    and ΔW starts at ≈ the rank-r1 LoRA optimum: the Hadamard family then starts
    where rank-r1 LoRA ends. ε = 0.1 keeps the other directions alive for Adam
    (their contribution to B2 A2 is O(ε²)).
    """
    (b1, a1), (b2, a2) = st.terms[0].pairs
    r1, r2 = params[b1].shape[-1], params[b2].shape[-1]
    B, A = truncated_factors(M.double(), r1, st.scale)
    out = dict(params)
    out[b1], out[a1] = B.to(params[b1]), A.to(params[a1])
    Bn, m, n = M.shape
    g = torch.Generator().manual_seed(int(seed))
    B2 = torch.randn(m, r2, generator=g, dtype=torch.float64) * eps
    A2 = torch.randn(r2, n, generator=g, dtype=torch.float64) * eps
    B2[:, 0], A2[0, :] = 1.0, 1.0
    out[b2] = B2.expand(Bn, m, r2).to(params[b2]).clone()
    out[a2] = A2.expand(Bn, r2, n).to(params[a2]).clone()
    return out


def lstsq_driver(A: Tensor) -> str | None:
    """``torch.linalg.lstsq``'s driver: gelsd on a CPU (SVD-based, minimum norm, and the
    same bits whatever the workspace's alignment, unlike the default gelsy), the
    default (gels, the only one) on a GPU."""
    return "gelsd" if A.device.type == "cpu" else None


def _rank1_split(Z: Tensor, r1: int, r2: int) -> tuple[Tensor, Tensor]:
    """Rows of Z (..., k, r1 r2) reshaped to r1×r2 and cut to their best rank-1
    u√σ ⊗ v√σ: returns (..., k, r1) and (..., k, r2)."""
    u, sv, vh = torch.linalg.svd(Z.reshape(*Z.shape[:-1], r1, r2), full_matrices=False)
    sq = sv[..., :1].sqrt()  # (..., k, 1)
    return u[..., :, 0] * sq, vh[..., 0, :] * sq


def _rank1_track(Z: Tensor, r1: int, r2: int, v: Tensor | None,
                 power: int = 2) -> tuple[Tensor, Tensor]:
    """The rank-1 projection of each row of Z (..., k, r1 r2), reshaped r1×r2, by
    ``power`` steps of the power method from the previous right vectors v (..., k, r2)
    (unit rows; None: the exact top ones, by SVD): the projected rows u ⊗ v
    (..., k, r1 r2) and the new v. Inside alternating projections the rows change
    little per step, so a warm power step tracks the top singular pair at a fraction
    of a batched SVD's cost."""
    Zr = Z.reshape(*Z.shape[:-1], r1, r2)
    if v is None:
        v = torch.linalg.svd(Zr, full_matrices=False)[2][..., 0, :]
    for _ in range(power):
        v = (Zr.mT @ (Zr @ v[..., None]))[..., 0]
        v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(1e-300)
    u = (Zr @ v[..., None])[..., 0]  # (..., k, r1): σ times the left vector
    return (u[..., :, None] * v[..., None, :]).flatten(-2), v


def _one_target(st: Structure, i: int) -> Structure:
    """The structure of target i of the batch alone."""
    one = lambda x: None if x is None else x[i:i + 1]  # noqa: E731
    return Structure([Term(t.pairs, one(t.fixed)) for t in st.terms], st.scale, one(st.offset))


def spectral_init(method, M: Tensor, params: Params, st: Structure, seed: int,
                  iters: int = 300, warm: int = 100) -> Params:
    """The "spectral" start of a Hadamard pair s·(B1 A1) ⊙ (B2 A2), for r1 r2 <= min(m, n).

    By the Khatri-Rao identity ΔW = L Rᵀ with L = B1 ⊙_r B2 (m, K), R = A1ᵀ ⊙_r A2ᵀ
    (n, K), K = r1 r2: the rows of L are Kronecker products b1_i ⊗ b2_i (rank one once
    reshaped r1×r2) and span the top-K left singular space U_K of the target. We look
    for L = U_K X with rank-one rows by alternating projections (X random from
    ``seed``; project each row of U_K X on the rank-one r1×r2 matrices, then back on
    the span of U_K: X = U_Kᵀ P), read B1, B2 off the rank-one rows, solve
    M ≈ L Rᵀ for R by least squares and cut each row of R to rank one for A1, A2.
    On an exact Hadamard target this lands (for most seeds) on the exact factors,
    where plain ALS from random starts mostly stalls in local minima; ALS polishes.
    """
    if M.shape[0] > 1:  # one target at a time: the small (K×m)(m×K) products of the
        # iteration round differently in a batch than alone, and the start's errors differ
        one = [spectral_init(method, M[i:i + 1], {k: v[i:i + 1] for k, v in params.items()},
                             _one_target(st, i), seed, iters, warm) for i in range(M.shape[0])]
        return {k: torch.cat([o[k] for o in one]) for k in params}
    (b1, a1), (b2, a2) = st.terms[0].pairs
    r1, r2 = params[b1].shape[-1], params[b2].shape[-1]
    Bn, m, n = M.shape
    K = r1 * r2
    if K > min(m, n):
        raise ValueError(f"{method.name}: the spectral init needs r1·r2 <= min(m, n) "
                         f"({r1}·{r2} > {min(m, n)})")
    Md = M.double()
    U = remembered("svd U", Md, lambda Z: torch.linalg.svd(Z, full_matrices=False)[0])[..., :K]  # (b, m, K)
    g = torch.Generator().manual_seed(int(seed))
    X = torch.randn(K, K, generator=g, dtype=torch.float64).to(U.device).expand(Bn, K, K)
    v = None
    for it in range(iters):
        P = U @ X  # (b, m, K)
        P, v = _rank1_track(P, r1, r2, v)  # exact at first, then tracked by power steps
        X = bmm(U.mT, P)
        if it < warm:  # keep X away from the rank-one collapse: its orthogonal polar factor
            uu, _, vv = torch.linalg.svd(X)
            X = uu @ vv
        X = X * (K ** 0.5 / torch.linalg.matrix_norm(X).clamp_min(1e-300))[..., None, None]
    L = U @ X  # (b, m, K), rows ≈ b1_i ⊗ b2_i
    B1, B2 = _rank1_split(L, r1, r2)
    L = (B1[..., :, None] * B2[..., None, :]).reshape(Bn, m, K)
    # gelsd (SVD) on a CPU: LAPACK's default gelsy rounds differently with the memory
    # alignment of its workspace, so the start would change from call to call
    Rt = torch.linalg.lstsq(L, Md, driver=lstsq_driver(L)).solution  # (b, K, n):  M ≈ L Rᵀ
    A1t, A2t = _rank1_split(Rt.mT, r1, r2)  # (b, n, r1), (b, n, r2)
    s = st.scale
    out = dict(params)
    out[b1] = (B1 / s).to(params[b1])
    out[a1] = A1t.mT.to(params[a1])
    out[b2] = B2.to(params[b2])
    out[a2] = A2t.mT.to(params[a2])
    return out


def svd_init(method, M: Tensor, params: Params, st: Structure) -> Params:
    """LoRA at its optimum: B A = truncated SVD of M / s."""
    (b, a), = st.terms[0].pairs
    r = params[b].shape[-1]
    B, A = truncated_factors(M.double(), r, st.scale)
    out = dict(params)
    out[b], out[a] = B.to(params[b]), A.to(params[a])
    return out


def lora_contained_init(method, M: Tensor, w0: Tensor, params: Params, config) -> Params:
    """The "lora-warm" start of a method that contains rank-r LoRA (``Method.lora_term``:
    DoRA, α-LoRA): the rank-r LoRA optimum itself, L = U_r Σ_r V_rᵀ (truncated SVD of M
    (b, m, n)), written in the method's LoRA factors with s = ``config.scale`` (B: (b, m, r),
    A: (b, r, n), s B A = L), the other factors set by ``method.embed_lora``:

    α-LoRA   ΔW = (α − 1) ⊙_rows W0 + s B A:   α = 1                       => ΔW = L
    DoRA     ΔW = mag ⊙ V / ‖V‖_row − W0, V = W0 + s B A:
             magnitude = ‖V‖_row (norm of each output row, dim=-1)  => W' = V, ΔW = L

    so the start has LoRA's optimal error Σ_{k>r} σ_k² / Σ σ_k² (to rounding; DoRA
    needs no row of W0 + L to vanish) and Adam, which keeps its best iterate, can only
    improve on rank-r LoRA. The gradient there is not zero: for DoRA, ∂e/∂mag_i ∝
    −⟨R_i, W0_i⟩ / ‖V_i‖ and for α-LoRA ∂e/∂α_i ∝ −⟨R_i, W0_i⟩ (R = M − L, whose rows
    are orthogonal to those of L), so the extra row parameters start moving at once.
    """
    if method.lora_term is None:
        raise ValueError(f"{method.name}: no lora-warm start (it does not contain LoRA)")
    bn, an = method.lora_term
    r = params[bn].shape[-1]
    s = float(getattr(config, "scale", 1.0))
    if s == 0.0:
        raise ValueError(f"{method.name}: lora-warm needs a nonzero LoRA scale s")
    B, A = truncated_factors(M.double(), r, s)  # (b, m, r), (b, r, n)
    out = dict(params)
    out[bn], out[an] = B.to(params[bn]), A.to(params[an])
    return method.embed_lora(out, w0, config)


def extra_inits(method) -> tuple[str, ...]:
    """Reconstruction inits offered on top of the method's own (``method``: a Method or a
    registry name)."""
    method = _method(method)
    if is_hadamard_pair(method):
        return ("lora-warm", "spectral")
    if method.lora_term is not None:
        return ("lora-warm",)
    if is_low_rank(method):
        return ("svd",)
    return ()


def initial_params(method, M: Tensor, w0: Tensor, config, seed: int, scheme: str) -> Params:
    """Batched starting factors (b, ...) for ``scheme``: one of ``method.inits``
    or a reconstruction init (``lora-warm``, ``spectral`` for a Hadamard pair, ``lora-warm``
    for a method with a LoRA term, ``svd`` for a low-rank one)."""
    if scheme in method.inits:
        return stack_init(method, w0, config, seed, scheme)
    extra = extra_inits(method)
    if scheme not in extra:
        known = ", ".join((*method.inits, *extra))
        raise ValueError(f"{method.name}: unknown init {scheme!r}; known: {known}")
    base = stack_init(method, w0, config, seed, method.inits[0])
    if method.lora_term is not None:  # no product form needed: ΔW = L exactly
        return lora_contained_init(method, M, w0, base, config)
    st = structure(method, base, w0, config)
    if st is None:
        raise ValueError(f"{method.name}: init {scheme!r} needs the method's product form")
    if scheme == "lora-warm":
        return lora_warm(method, M, base, st, seed)
    if scheme == "spectral":
        return spectral_init(method, M, base, st, seed)
    return svd_init(method, M, base, st)
