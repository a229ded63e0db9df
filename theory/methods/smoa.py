"""SMoA: ΔW = Σ_k M_k ⊙ (B_k A_k), low-rank branches modulated by spectral slices of W0.

Liu et al., "High-Rank Structured Modulation for Parameter-Efficient Fine-Tuning"
(SMoA), arXiv:2601.07507, 2026.

    W0 = U Σ Vᵀ (economy SVD), singular indices split into K groups I_1..I_K
    M_k = U_{I_k} Σ_{I_k} V_{I_k}ᵀ            (frozen; Σ_k M_k = W0)
    ΔW  = Σ_k M_k ⊙ (B_k A_k),  B_k: (m, r_k)  A_k: (r_k, n)
    params Σ_k r_k (m + n)
    rank ΔW <= min(m, n, Σ_k |I_k ∩ supp σ| · r_k) <= min(m, n, rank W0 · max_k r_k)
    init ("paper"): A_k Kaiming-uniform, B_k = 0 (so ΔW = 0 at the start)

The paper specifies the split loosely; this module implements the following reading.
Let E(i) = Σ_{j<=i} σ_j / Σ_j σ_j be the cumulative spectral mass (``energy="sigma"``,
the paper's E(i); ``energy="sigma2"`` uses σ² instead). Group k (0-based) starts at the
first index whose *preceding* cumulative mass reaches k/K, i.e. index i joins group
⌊K · E(i-1)⌋: group boundaries are the K-quantiles of E. Where one singular value
carries more than 1/K of the mass, that rule would leave a group empty; boundaries
are then pushed right so that every group holds at least one singular index (this
needs K <= min(m, n)). A zero W0 is split into K equal index ranges.

The K masks M_k are frozen: ``init`` returns them stacked as the factor ``"M"``
of shape (..., K, m, n) (listed in ``frozen``, so ``n_params`` counts only the
B_k, A_k); ``delta`` recomputes them from ``w0`` when ``"M"`` is absent.
Trainable factors are named ``B_0, A_0, ..., B_{K-1}, A_{K-1}``.

At a parameter budget (``candidate_configs``), the ranks r_k sum to budget // (m + n)
and K = 4 is preferred (then 2, 1, 8): every such split has the same count and, for a
full-rank W0, the same bound min(m, n).

``rank_bound`` only knows rank W0, so it returns the bound valid for every split,
min(m, n, rank W0 · max_k r_k); :func:`exact_rank_bound` computes the bound of the
actual split of a given W0.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..base import (Config, Method, Params, check_matrix, check_rank, gaussian,
                    kaiming_uniform, make_generator, zeros)


@dataclasses.dataclass(frozen=True)
class SmoaConfig(Config):
    #: number of spectral groups
    K: int = 4
    #: rank of every group's branch, or one rank per group (a tuple of length K)
    r: int | tuple[int, ...] = 4
    #: cumulative mass used for the quantiles: "sigma" (paper) or "sigma2" (energy)
    energy: str = "sigma"

    @property
    def ranks(self) -> tuple[int, ...]:
        """(r_0, ..., r_{K-1})."""
        if isinstance(self.r, (tuple, list)):
            return tuple(self.r)
        return (self.r,) * self.K


def _split_ranks(R: int, K: int) -> int | tuple[int, ...]:
    """R split into K near-equal positive parts, larger first (an int when equal)."""
    q, rem = divmod(R, K)
    if rem == 0:
        return q
    return tuple(q + 1 if k < rem else q for k in range(K))


def smoa_groups(s: Tensor, K: int, energy: str = "sigma") -> Tensor:
    """Group index (0..K-1) of each singular value, shape (..., p) from s (..., p).

    Index i joins group ⌊K·E(i-1)⌋ (E the cumulative mass), with boundaries then
    moved so that no group is empty (requires K <= p)."""
    p = s.shape[-1]
    if not 1 <= K <= p:
        raise ValueError(f"smoa: K={K} groups need between 1 and {p} singular values")
    if K == 1:
        return torch.zeros(s.shape, dtype=torch.long, device=s.device)
    mass = s.double() if energy == "sigma" else s.double() ** 2
    total = mass.sum(-1, keepdim=True)  # (..., 1)
    equal = torch.arange(1, p + 1, dtype=torch.float64, device=s.device) / p
    c = torch.where(total > 0, mass.cumsum(-1) / total.clamp_min(1e-300), equal)  # (..., p)
    q = torch.arange(1, K, dtype=torch.float64, device=s.device) / K  # (K-1,)
    # start of group k: 1 + #{j : E(j) < k/K}  (E(j) nondecreasing); small slack for round-off
    starts = 1 + (c[..., None, :] < q[:, None] - 1e-12).sum(-1)  # (..., K-1)
    fixed, prev = [], torch.zeros_like(starts[..., 0])
    for k in range(1, K):  # every group non-empty: start_{k-1} < start_k <= p - (K - k)
        st = torch.clamp(torch.maximum(starts[..., k - 1], prev + 1), max=p - (K - k))
        fixed.append(st)
        prev = st
    bounds = torch.stack(fixed, -1)  # (..., K-1)
    idx = torch.arange(p, device=s.device)
    return (idx[..., None] >= bounds[..., None, :]).sum(-1)  # (..., p)


def spectral_masks(w0: Tensor, config: SmoaConfig) -> Tensor:
    """The frozen M_k = U_{I_k} Σ_{I_k} V_{I_k}ᵀ, stacked: (..., K, m, n); Σ_k M_k = W0."""
    U, S, Vh = torch.linalg.svd(w0, full_matrices=False)  # (..., m, p), (..., p), (..., p, n)
    groups = smoa_groups(S, config.K, config.energy)  # (..., p)
    onehot = groups[..., None, :] == torch.arange(config.K, device=w0.device)[:, None]  # (..., K, p)
    Sk = S[..., None, :] * onehot.to(S.dtype)  # (..., K, p)
    return (U[..., None, :, :] * Sk[..., :, None, :]) @ Vh[..., None, :, :]  # (..., K, m, n)


def exact_rank_bound(w0: Tensor, config: SmoaConfig) -> Tensor:
    """The rank bound of the actual split of ``w0``: min(m, n, Σ_k n_k r_k) where n_k
    counts the numerically nonzero singular values in group k. One value per matrix."""
    m, n = check_matrix(w0, "W0")
    S = torch.linalg.svdvals(w0)  # (..., p)
    groups = smoa_groups(S, config.K, config.energy)
    tol = S[..., :1] * max(m, n) * torch.finfo(S.dtype).eps
    nz = S > tol  # (..., p)
    ranks = torch.tensor(config.ranks, device=w0.device)
    per = ranks[groups] * nz  # (..., p): r_k for each nonzero σ in group k
    return per.sum(-1).clamp(max=min(m, n))


class SMoA(Method):
    name = "smoa"
    description = "low-rank branches modulated by K spectral slices of W0: Σ_k M_k ⊙ (B_k A_k)"
    citation = ("Liu et al., High-Rank Structured Modulation for Parameter-Efficient "
                "Fine-Tuning (SMoA), arXiv:2601.07507, 2026")
    Config = SmoaConfig
    inits = ("paper", "gaussian")
    needs_w0 = True
    frozen = ("M",)
    product_terms = ((("B_{k}", "A_{k}"),),)  # one term per mask M_k
    product_modulator = "M"

    def validate(self, m, n, config):
        p = min(m, n)
        check_rank(self.name, config.K, p, "K (number of groups)", m, n)
        if isinstance(config.r, (tuple, list)):
            if len(config.r) != config.K:
                raise ValueError(
                    f"{self.name}: r has {len(config.r)} ranks but K={config.K} groups")
            for k, rk in enumerate(config.r):
                check_rank(self.name, rk, p, f"r[{k}]", m, n)
        else:
            check_rank(self.name, config.r, p, "r", m, n)
        if config.energy not in ("sigma", "sigma2"):
            raise ValueError(f"{self.name}: energy must be 'sigma' or 'sigma2', got {config.energy!r}")

    def init(self, w0: Tensor, config: SmoaConfig, generator=None, scheme="paper") -> Params:
        m, n = check_matrix(w0, "W0")
        self.validate(m, n, config)
        if scheme not in self.inits:
            raise ValueError(f"{self.name}: unknown init {scheme!r}; known: {', '.join(self.inits)}")
        g, lead = make_generator(generator), tuple(w0.shape[:-2])
        params: Params = {}
        for k, rk in enumerate(config.ranks):
            if scheme == "paper":  # A_k Kaiming-uniform, B_k = 0
                params[f"B_{k}"] = zeros((*lead, m, rk), w0)
                params[f"A_{k}"] = kaiming_uniform((*lead, rk, n), n, g, w0)
            else:  # "gaussian": B_k A_k has O(1) entries, a generic point
                params[f"B_{k}"] = gaussian((*lead, m, rk), rk ** -0.5, g, w0)
                params[f"A_{k}"] = gaussian((*lead, rk, n), 1.0, g, w0)
        params["M"] = spectral_masks(w0, config)  # (..., K, m, n), frozen
        return params

    def delta(self, params: Params, w0: Tensor | None = None, config: SmoaConfig | None = None) -> Tensor:
        K = sum(1 for key in params if key.startswith("B_"))
        if K == 0:
            raise ValueError(f"{self.name}: no factors B_0, A_0, ... in params (have {sorted(params)})")
        M = params.get("M")
        if M is None:
            if w0 is None or config is None:
                raise ValueError(f"{self.name}: without the frozen masks 'M', delta needs w0 and config")
            M = spectral_masks(w0, config)
        if w0 is not None and tuple(w0.shape[-2:]) != tuple(M.shape[-2:]):
            raise ValueError(f"{self.name}: W0 has shape {tuple(w0.shape)} but the masks M_k are "
                             f"{tuple(M.shape[-2:])}")
        if M.shape[-3] != K:
            raise ValueError(f"{self.name}: {M.shape[-3]} masks M_k but {K} branches B_k A_k")
        out = None
        for k in range(K):
            B, A = params[f"B_{k}"], params[f"A_{k}"]  # (..., m, r_k), (..., r_k, n)
            if B.shape[-1] != A.shape[-2] or (B.shape[-2], A.shape[-1]) != tuple(M.shape[-2:]):
                raise ValueError(f"{self.name}: B_{k} {tuple(B.shape)} and A_{k} {tuple(A.shape)} "
                                 f"do not match masks of shape {tuple(M.shape[-2:])}")
            term = M[..., k, :, :] * (B @ A)  # (..., m, n)
            out = term if out is None else out + term
        return out

    def n_params(self, m, n, config):
        return sum(config.ranks) * (m + n)

    def rank_bound(self, m, n, rank_w0, config):
        return min(m, n, rank_w0 * max(config.ranks))

    def candidate_configs(self, m, n, budget):
        R, p = budget // (m + n), min(m, n)
        out = []
        for K in (4, 2, 1, 8):  # the first K that fits is the default at equal bound
            if 1 <= K <= min(R, p):
                out.append(SmoaConfig(K=K, r=_split_ranks(R, K)))
        return out


METHOD = SMoA()
