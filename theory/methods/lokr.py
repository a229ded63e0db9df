"""LoKr: ΔW = s · W1 ⊗ W2, a Kronecker product whose larger factor may be low-rank.

Edalati et al., "KronA: Parameter Efficient Tuning with Kronecker Adapter", 2022;
as LoKr in LyCORIS (Yeh et al., "Navigating Text-To-Image Customization: From
LyCORIS Fine-Tuning to Model Evaluation", ICLR 2024) and PEFT (``peft.tuners.lokr``).

The shapes follow PEFT exactly. With ``(a, b) = factorization(m, f)`` and
``(c, d) = factorization(n, f)`` (f = ``decompose_factor``; -1 means "near √dim"):

    W1: (a, c)   W2: (b, d)   ΔW = s · W1 ⊗ W2: (a b, c d) = (m, n)
    W2 = B2 A2 with B2: (b, r), A2: (r, d)   when r < max(b, d) / 2
    W1 = B1 A1 with B1: (a, r), A1: (r, c)   when decompose_both and r < max(a, c) / 2
    params  (a c or r(a + c)) + (b d or r(b + d))
    rank ΔW = rank W1 · rank W2 <= min(a, c, [r]) · min(b, d, [r]), capped at min(m, n)
    s = α / r (PEFT's scaling; alpha=None means s = 1)
    init ("paper", as PEFT): W1 = 0 (or B1 = 0, A1 Kaiming), W2 Kaiming-uniform (both
    factors when low-rank), so ΔW = 0 at the start. "lycoris": W1 Kaiming, W2 = 0 (or A2 = 0).

PEFT names: lokr_w1 = W1, lokr_w1_a = B1, lokr_w1_b = A1, lokr_w2 = W2,
lokr_w2_a = B2, lokr_w2_b = A2.

Forward without forming ΔW: with x reshaped to X (c, d), (W1 ⊗ W2) vec(X) = vec(W1 X W2ᵀ).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

from torch import Tensor

from ..base import (
    Config,
    Method,
    Params,
    check_matrix,
    check_params,
    check_rank,
    gaussian,
    kaiming_uniform,
    make_generator,
    zeros,
)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's ``lokr.layer.factorization``: split ``dimension`` into two factors.

    If ``factor`` divides ``dimension``, return ``(factor, dimension // factor)``; else
    the divisor pair nearest √dimension whose first member is at most ``factor``
    (any, when ``factor == -1``), smaller member first. ``factorization(128) == (8, 16)``.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


@dataclasses.dataclass(frozen=True)
class LokrConfig(Config):
    r: int = 8
    #: None means s = 1; otherwise s = α / r as in PEFT
    alpha: float | None = None
    #: also write W1 as a rank-r product (when r < max(a, c) / 2)
    decompose_both: bool = False
    #: the size of one Kronecker factor (-1: near √dim, PEFT's default)
    decompose_factor: int = -1

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.r


@dataclasses.dataclass(frozen=True)
class LokrShapes:
    """The Kronecker layout of an m x n update: W1 (a, c), W2 (b, d)."""

    a: int
    b: int
    c: int
    d: int
    full_w1: bool  # W1 is a free (a, c) matrix, else B1 A1
    full_w2: bool  # W2 is a free (b, d) matrix, else B2 A2


def lokr_shapes(m: int, n: int, config: LokrConfig) -> LokrShapes:
    """PEFT's choice of factor shapes and low-rank switches for an ``nn.Linear(n, m)``."""
    a, b = factorization(m, config.decompose_factor)  # out: m = a b
    c, d = factorization(n, config.decompose_factor)  # in:  n = c d
    full_w1 = not (config.decompose_both and config.r < max(a, c) / 2)
    full_w2 = not (config.r < max(b, d) / 2)
    return LokrShapes(a, b, c, d, full_w1, full_w2)


def kron(W1: Tensor, W2: Tensor) -> Tensor:
    """Batched Kronecker product: (..., a, c), (..., b, d) -> (..., a b, c d), like torch.kron."""
    a, c = W1.shape[-2:]
    b, d = W2.shape[-2:]
    out = W1[..., :, None, :, None] * W2[..., None, :, None, :]  # (..., a, b, c, d)
    return out.reshape(*out.shape[:-4], a * b, c * d)


class LoKr(Method):
    name = "lokr"
    description = "Kronecker product s·W1 ⊗ W2, W2 (and optionally W1) low-rank"
    citation = ("Edalati et al., KronA: Parameter Efficient Tuning with Kronecker Adapter, 2022; "
                "LoKr as in LyCORIS (Yeh et al., ICLR 2024)")
    Config = LokrConfig
    inits = ("paper", "gaussian", "lycoris")
    peft_name = "lokr"
    exact_als = "kronecker"

    def validate(self, m, n, config):
        check_rank(self.name, config.r, max(m, n), "r", m, n)
        f = config.decompose_factor
        if isinstance(f, bool) or not isinstance(f, int) or (f != -1 and f < 1):
            raise ValueError(f"{self.name}: decompose_factor must be -1 or a positive integer, got {f!r}")

    def shapes(self, m: int, n: int, config: LokrConfig) -> LokrShapes:
        self.validate(m, n, config)
        return lokr_shapes(m, n, config)

    def init(self, w0: Tensor, config: LokrConfig, generator=None, scheme="paper") -> Params:
        m, n = check_matrix(w0, "W0")
        sh = self.shapes(m, n, config)
        g, lead, r = make_generator(generator), tuple(w0.shape[:-2]), config.r
        a, b, c, d = sh.a, sh.b, sh.c, sh.d

        def ku(shape):  # kaiming_uniform_(a=√5) on a 2-D tensor: fan_in = its last size
            return kaiming_uniform((*lead, *shape), shape[-1], g, w0)

        def gs(shape, std):
            return gaussian((*lead, *shape), std, g, w0)

        if scheme not in self.inits:
            raise ValueError(f"{self.name}: unknown init {scheme!r}; known: {', '.join(self.inits)}")
        p: Params = {}
        if scheme == "paper":  # PEFT default: the W1 side starts at 0
            if sh.full_w1:
                p["W1"] = zeros((*lead, a, c), w0)
            else:
                p["B1"], p["A1"] = zeros((*lead, a, r), w0), ku((r, c))
            if sh.full_w2:
                p["W2"] = ku((b, d))
            else:
                p["B2"], p["A2"] = ku((b, r)), ku((r, d))
        elif scheme == "lycoris":  # LyCORIS: the W2 side starts at 0
            if sh.full_w1:
                p["W1"] = ku((a, c))
            else:
                p["B1"], p["A1"] = ku((a, r)), ku((r, c))
            if sh.full_w2:
                p["W2"] = zeros((*lead, b, d), w0)
            else:
                p["B2"], p["A2"] = ku((b, r)), zeros((*lead, r, d), w0)
        else:  # gaussian: every factor random, ΔW entries O(1)
            if sh.full_w1:
                p["W1"] = gs((a, c), 1.0)
            else:
                p["B1"], p["A1"] = gs((a, r), r ** -0.5), gs((r, c), 1.0)
            if sh.full_w2:
                p["W2"] = gs((b, d), 1.0)
            else:
                p["B2"], p["A2"] = gs((b, r), r ** -0.5), gs((r, d), 1.0)
        return p

    @staticmethod
    def _factor(params: Params, i: int) -> Tensor:
        """W_i, formed from B_i A_i when it is stored low-rank."""
        if f"W{i}" in params:
            return params[f"W{i}"]
        if f"B{i}" not in params or f"A{i}" not in params:
            raise ValueError(f"lokr: need W{i} or both B{i} and A{i} (have {sorted(params)})")
        B, A = params[f"B{i}"], params[f"A{i}"]
        check_params(params, {f"B{i}": (B.shape[-2], A.shape[-2]),
                              f"A{i}": (B.shape[-1], A.shape[-1])}, "lokr")
        return B @ A

    def delta(self, params: Params, w0=None, config: LokrConfig | None = None) -> Tensor:
        s = 1.0 if config is None else config.scale
        return s * kron(self._factor(params, 1), self._factor(params, 2))  # (..., m, n)

    def forward(self, x, params, w0, config=None):
        s = 1.0 if config is None else config.scale
        W1 = self._factor(params, 1)[..., None, :, :]  # (..., 1, a, c)
        c = W1.shape[-1]
        X = x.reshape(*x.shape[:-1], c, x.shape[-1] // c)  # (..., t, c, d)
        Y = W1 @ X  # (..., t, a, d)
        if "W2" in params:
            Y = Y @ params["W2"][..., None, :, :].mT  # (..., t, a, b)
        else:
            Y = (Y @ params["A2"][..., None, :, :].mT) @ params["B2"][..., None, :, :].mT
        return x @ w0.mT + s * Y.flatten(-2)  # (..., t, m)

    def n_params(self, m, n, config):
        sh = self.shapes(m, n, config)
        r = config.r
        p1 = sh.a * sh.c if sh.full_w1 else r * (sh.a + sh.c)
        p2 = sh.b * sh.d if sh.full_w2 else r * (sh.b + sh.d)
        return p1 + p2

    def rank_bound(self, m, n, rank_w0, config):
        sh = self.shapes(m, n, config)
        r1 = min(sh.a, sh.c) if sh.full_w1 else min(sh.a, sh.c, config.r)
        r2 = min(sh.b, sh.d) if sh.full_w2 else min(sh.b, sh.d, config.r)
        return min(r1 * r2, m, n)

    def candidate_configs(self, m, n, budget):
        """Search over decompose_factor (every divisor of m or n, and -1), decompose_both,
        and, in each regime of the low-rank switches, the largest r under ``budget``."""
        factors = {-1} | {f for k in (m, n) for f in range(1, k + 1) if k % f == 0}
        out = []
        for f in sorted(factors):
            for both in (False, True):
                a, b = factorization(m, f)
                c, d = factorization(n, f)
                t2 = math.ceil(max(b, d) / 2)  # r >= t2: W2 is a free matrix
                t1 = math.ceil(max(a, c) / 2) if both else 1  # r >= t1: W1 is a free matrix
                cuts = sorted({1, t1, t2, max(m, n) + 1})
                for lo, hi in itertools.pairwise(cuts):  # r in [lo, hi): counts linear in r
                    hi = min(hi, max(m, n) + 1)
                    if lo >= hi:
                        continue
                    cfg = LokrConfig(r=lo, decompose_both=both, decompose_factor=f)
                    p_lo = self.n_params(m, n, cfg)
                    slope = self.n_params(m, n, LokrConfig(r=lo + 1, decompose_both=both,
                                                           decompose_factor=f)) - p_lo \
                        if lo + 1 < hi else 0
                    r = lo if slope == 0 else lo + max(0, (budget - p_lo) // slope)
                    out.append(LokrConfig(r=min(r, hi - 1), decompose_both=both, decompose_factor=f))
        # one representative per distinct (shapes, count): PEFT gives the same layout for many f
        seen, uniq = set(), []
        for cfg in out:
            key = (lokr_shapes(m, n, cfg), self.n_params(m, n, cfg), cfg.r)
            if key not in seen:
                seen.add(key)
                uniq.append(cfg)
        return uniq


METHOD = LoKr()
