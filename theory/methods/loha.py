"""LoHa: ΔW = s · (B1 A1) ⊙ (B2 A2), the Hadamard product of two rank-r matrices.

Hyeon-Woo et al., "FedPara: Low-Rank Hadamard Product for Communication-Efficient
Federated Learning", ICLR 2022; as LoHa in LyCORIS and PEFT (``peft.tuners.loha``).

    B1: (m, r)  A1: (r, n)  B2: (m, r)  A2: (r, n)     (r1 = r2 = r)
    params 2 r (m + n)          rank ΔW <= min(r², m, n)
    s = α / r (PEFT's scaling; alpha=None means s = 1)
    init ("paper", as PEFT): B1, A1, B2 Kaiming-uniform, A2 = 0 (so ΔW = 0 at the start)

PEFT names: hada_w1_a = B1, hada_w1_b = A1, hada_w2_a = B2, hada_w2_b = A2. PEFT
zeroes hada_w2_b, i.e. the (r, n) factor A2 (not a "B"); we follow PEFT.

Forward without forming ΔW (Khatri-Rao identity, ``theory.khatri_rao``), as ABBA.
"""

from __future__ import annotations

import dataclasses

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
from ..khatri_rao import hadamard_lowrank_matmul


@dataclasses.dataclass(frozen=True)
class LohaConfig(Config):
    r: int = 8
    #: None means s = 1; otherwise s = α / r as in PEFT
    alpha: float | None = None

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.r


class LoHa(Method):
    name = "loha"
    description = "Hadamard product of two rank-r matrices s·(B1A1)⊙(B2A2), s = α/r"
    citation = ("Hyeon-Woo et al., FedPara: Low-Rank Hadamard Product for Communication-Efficient "
                "Federated Learning, ICLR 2022")
    Config = LohaConfig
    inits = ("paper", "gaussian")
    peft_name = "loha"
    product_terms = ((("B1", "A1"), ("B2", "A2")),)

    def validate(self, m, n, config):
        check_rank(self.name, config.r, min(m, n), "r", m, n)

    def same_update(self, config: LohaConfig):
        """Without α (s = 1), LoHa at rank r is ABBA at r1 = r2 = r, factor for factor."""
        if config.alpha is not None:
            return None
        from ..registry import get_method

        return "abba", get_method("abba").config(r1=config.r, r2=config.r)

    def init(self, w0: Tensor, config: LohaConfig, generator=None, scheme="paper") -> Params:
        m, n = check_matrix(w0, "W0")
        self.validate(m, n, config)
        g, lead, r = make_generator(generator), tuple(w0.shape[:-2]), config.r
        if scheme == "paper":  # PEFT: kaiming_uniform_(a=√5) on three factors, A2 = 0
            return {"B1": kaiming_uniform((*lead, m, r), r, g, w0),
                    "A1": kaiming_uniform((*lead, r, n), n, g, w0),
                    "B2": kaiming_uniform((*lead, m, r), r, g, w0),
                    "A2": zeros((*lead, r, n), w0)}
        if scheme == "gaussian":  # all four random (ΔW != 0): a generic point
            return {"B1": gaussian((*lead, m, r), r ** -0.5, g, w0),
                    "A1": gaussian((*lead, r, n), 1.0, g, w0),
                    "B2": gaussian((*lead, m, r), r ** -0.5, g, w0),
                    "A2": gaussian((*lead, r, n), 1.0, g, w0)}
        raise ValueError(f"{self.name}: unknown init {scheme!r}; known: {', '.join(self.inits)}")

    def _check(self, params: Params) -> None:
        m, r = params["B1"].shape[-2:]
        n = params["A1"].shape[-1]
        check_params(params, {"B1": (m, r), "A1": (r, n), "B2": (m, r), "A2": (r, n)}, self.name)

    def delta(self, params: Params, w0=None, config: LohaConfig | None = None) -> Tensor:
        self._check(params)
        s = 1.0 if config is None else config.scale
        return s * ((params["B1"] @ params["A1"]) * (params["B2"] @ params["A2"]))  # (..., m, n)

    def forward(self, x, params, w0, config=None):
        s = 1.0 if config is None else config.scale
        kr = hadamard_lowrank_matmul(x, params["B1"], params["A1"], params["B2"], params["A2"])
        return x @ w0.mT + s * kr

    def n_params(self, m, n, config):
        return 2 * config.r * (m + n)

    def rank_bound(self, m, n, rank_w0, config):
        return min(config.r ** 2, m, n)

    def candidate_configs(self, m, n, budget):
        r = min(budget // (2 * (m + n)), min(m, n))
        return [LohaConfig(r=r)] if r >= 1 else []


METHOD = LoHa()
