"""Full fine-tuning: ΔW is a free m x n matrix (the reference every adapter is
compared with).

    params m n   rank ΔW <= min(m, n)   init ΔW = 0
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from ..base import Config, Method, Params, check_matrix, gaussian, make_generator, zeros


@dataclasses.dataclass(frozen=True)
class FullConfig(Config):
    pass


class Full(Method):
    name = "full"
    description = "full fine-tuning, ΔW free"
    citation = "-"
    Config = FullConfig
    inits = ("paper", "gaussian")
    closed_form = "identity"

    def init(self, w0: Tensor, config=None, generator=None, scheme="paper") -> Params:
        m, n = check_matrix(w0, "W0")
        if scheme == "paper":
            return {"W": zeros(tuple(w0.shape), w0)}
        if scheme == "gaussian":
            return {"W": gaussian(tuple(w0.shape), n ** -0.5, make_generator(generator), w0)}
        raise ValueError(f"{self.name}: unknown init {scheme!r}; known: {', '.join(self.inits)}")

    def delta(self, params: Params, w0=None, config=None) -> Tensor:
        return params["W"]

    def n_params(self, m, n, config=None):
        return m * n

    def rank_bound(self, m, n, rank_w0, config=None):
        return min(m, n)

    def candidate_configs(self, m, n, budget):
        return [FullConfig()]


METHOD = Full()
