"""LoRA: ΔW = s · B A.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.
rsLoRA scaling (Kalajdzievski, 2023): s = α/√r instead of α/r.

    B: (m, r)   A: (r, n)   params r (m + n)   rank ΔW <= r
    init: A Kaiming-uniform, B = 0 (so ΔW = 0 at the start).
"""

from __future__ import annotations

import dataclasses
import math

from torch import Tensor

from ..base import (Config, Method, Params, check_matrix, check_params, check_rank,
                    gaussian, kaiming_uniform, make_generator, truncated_svd_factors, zeros)


@dataclasses.dataclass(frozen=True)
class LoraConfig(Config):
    r: int = 8
    #: None means s = 1 (the natural choice for expressivity studies)
    alpha: float | None = None
    rslora: bool = False

    @property
    def scale(self) -> float:
        if self.alpha is None:
            return 1.0
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class LoRA(Method):
    name = "lora"
    description = "low-rank update s·B A"
    citation = "Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, ICLR 2022"
    Config = LoraConfig
    inits = ("paper", "gaussian", "pissa")
    peft_name = "lora"
    product_terms = ((("B", "A"),),)
    closed_form = "truncated_svd"

    def validate(self, m, n, config):
        check_rank(self.name, config.r, min(m, n), "r", m, n)

    def init(self, w0: Tensor, config: LoraConfig, generator=None, scheme="paper") -> Params:
        m, n = check_matrix(w0, "W0")
        self.validate(m, n, config)
        g, lead, r = make_generator(generator), tuple(w0.shape[:-2]), config.r
        if scheme == "paper":  # A Kaiming-uniform, B = 0
            return {"B": zeros((*lead, m, r), w0), "A": kaiming_uniform((*lead, r, n), n, g, w0)}
        if scheme == "gaussian":  # both factors random: ΔW != 0
            return {"B": gaussian((*lead, m, r), 1 / math.sqrt(r), g, w0),
                    "A": gaussian((*lead, r, n), 1 / math.sqrt(n), g, w0)}
        if scheme == "pissa":  # principal singular directions of W0 (Meng et al. 2024)
            B, A = truncated_svd_factors(w0, r)
            return {"B": B / math.sqrt(config.scale), "A": A / math.sqrt(config.scale)}
        raise ValueError(f"{self.name}: unknown init {scheme!r}; known: {', '.join(self.inits)}")

    def delta(self, params: Params, w0=None, config: LoraConfig | None = None) -> Tensor:
        B, A = params["B"], params["A"]  # (..., m, r), (..., r, n)
        check_params(params, {"B": (B.shape[-2], A.shape[-2]), "A": (B.shape[-1], A.shape[-1])}, self.name)
        s = 1.0 if config is None else config.scale
        return s * (B @ A)

    def forward(self, x, params, w0, config=None):
        s = 1.0 if config is None else config.scale
        return x @ w0.mT + s * ((x @ params["A"].mT) @ params["B"].mT)

    def n_params(self, m, n, config):
        return config.r * (m + n)

    def rank_bound(self, m, n, rank_w0, config):
        return min(config.r, m, n)

    def candidate_configs(self, m, n, budget):
        r = min(budget // (m + n), min(m, n))
        return [LoraConfig(r=r)] if r >= 1 else []


METHOD = LoRA()
