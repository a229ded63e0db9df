"""ABBA: ΔW = s · (B1 A1) ⊙ (B2 A2), two independently learnable low-rank factors.

Singhal et al., "ABBA: Highly Expressive Hadamard Product Adaptation for Large
Language Models", 2025 (arXiv:2505.14238).

    B1: (m, r1)  A1: (r1, n)  B2: (m, r2)  A2: (r2, n)
    params (r1 + r2)(m + n)          rank ΔW <= min(r1 r2, m, n)
    s = α² / √(r1 r2) (the paper's rank-stable scaling; alpha=None means s = 1)
    init ("paper"): B1 = U√Σ, A1 = √Σ Vᵀ from the rank-r1 truncated SVD of W0,
                    A2 Kaiming-uniform, B2 = 0  (so ΔW = 0 at the start)

Forward without forming ΔW (Khatri-Rao identity, ``theory.khatri_rao``):
    x ΔWᵀ = s · (x (A1ᵀ ⊙_r A2ᵀ)) (B1 ⊙_r B2)ᵀ, memory O((m + n) r1 r2).
"""

from __future__ import annotations

import dataclasses
import math

from torch import Tensor

from ..base import (Config, Method, Params, check_matrix, check_rank, gaussian,
                    kaiming_uniform, make_generator, truncated_svd_factors, zeros)
from ..khatri_rao import hadamard_lowrank_matmul


@dataclasses.dataclass(frozen=True)
class AbbaConfig(Config):
    r1: int = 8
    r2: int = 8
    alpha: float | None = None

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha**2 / math.sqrt(self.r1 * self.r2)


class ABBA(Method):
    name = "abba"
    description = "Hadamard product of two learnable low-rank matrices s·(B1A1)⊙(B2A2)"
    citation = "Singhal et al., ABBA: Highly Expressive Hadamard Product Adaptation for LLMs, 2025"
    Config = AbbaConfig
    inits = ("paper", "gaussian", "kaiming")
    product_terms = ((("B1", "A1"), ("B2", "A2")),)

    def validate(self, m, n, config):
        check_rank(self.name, config.r1, min(m, n), "r1", m, n)
        check_rank(self.name, config.r2, min(m, n), "r2", m, n)

    def init(self, w0: Tensor, config: AbbaConfig, generator=None, scheme="paper") -> Params:
        m, n = check_matrix(w0, "W0")
        self.validate(m, n, config)
        g, lead = make_generator(generator), tuple(w0.shape[:-2])
        r1, r2 = config.r1, config.r2
        if scheme == "paper":
            B1, A1 = truncated_svd_factors(w0, r1)
            return {"B1": B1, "A1": A1, "B2": zeros((*lead, m, r2), w0),
                    "A2": kaiming_uniform((*lead, r2, n), n, g, w0)}
        if scheme == "kaiming":  # LoHa-style: three Kaiming factors, B2 = 0
            return {"B1": kaiming_uniform((*lead, m, r1), r1, g, w0),
                    "A1": kaiming_uniform((*lead, r1, n), n, g, w0),
                    "B2": zeros((*lead, m, r2), w0),
                    "A2": kaiming_uniform((*lead, r2, n), n, g, w0)}
        if scheme == "gaussian":  # all four random (ΔW != 0): a generic point
            return {"B1": gaussian((*lead, m, r1), r1 ** -0.5, g, w0),
                    "A1": gaussian((*lead, r1, n), 1.0, g, w0),
                    "B2": gaussian((*lead, m, r2), r2 ** -0.5, g, w0),
                    "A2": gaussian((*lead, r2, n), 1.0, g, w0)}
        raise ValueError(f"{self.name}: unknown init {scheme!r}; known: {', '.join(self.inits)}")

    def delta(self, params: Params, w0=None, config: AbbaConfig | None = None) -> Tensor:
        s = 1.0 if config is None else config.scale
        return s * ((params["B1"] @ params["A1"]) * (params["B2"] @ params["A2"]))

    def forward(self, x, params, w0, config=None):
        s = 1.0 if config is None else config.scale
        kr = hadamard_lowrank_matmul(x, params["B1"], params["A1"], params["B2"], params["A2"])
        return x @ w0.mT + s * kr

    def n_params(self, m, n, config):
        return (config.r1 + config.r2) * (m + n)

    def rank_bound(self, m, n, rank_w0, config):
        return min(config.r1 * config.r2, m, n)

    def candidate_configs(self, m, n, budget):
        R, k = budget // (m + n), min(m, n)
        return [AbbaConfig(r1=r1, r2=R - r1) for r1 in range((R + 1) // 2, R)
                if 1 <= R - r1 <= k and r1 <= k]


METHOD = ABBA()
