"""HUT: W' = W0 ⊙ (B A), a multiplicative (Hadamard) update of the frozen weight.

Chen et al., "HUT: A More Computation Efficient Fine-Tuning Method With Hadamard
Updated Transformation", 2024 (arXiv:2409.13501).

    W' = W0 ⊙ (B A)   so   ΔW = W' − W0 = W0 ⊙ (B A − 1)
    B: (m, r)   A: (r, n)   params r (m + n)
    rank ΔW <= min((r + 1) · rank W0, m, n)   (rank(B A − 1) <= r + 1)

The paper describes the update loosely; this module implements the reading of
DESIGN.md: the transformation starts at the identity, B A = 1 (the all-ones
matrix), so ΔW = 0. It is made *exactly* all-ones, with every factor trainable,
by ("paper" init):

    B = [1 | 0]  (m, r): first column ones, the rest zero
    A = [1 ; K]  (r, n): first row ones, the other r − 1 rows Kaiming-uniform

so B A = 1·1ᵀ + 0·K = 1 in exact arithmetic and in floating point, while the
gradients reach B[:, 1:] through the random rows of A (a zero-initialised LoRA riding
on the all-ones direction). With r = 1 this is B = 1, A = 1. Contrast HiRA
(``theory.methods.hira``): ΔW = W0 ⊙ (B A) starts from B A = 0.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from ..base import (Config, Method, Params, check_matrix, check_params, check_rank, gaussian,
                    kaiming_uniform, make_generator, zeros)


@dataclasses.dataclass(frozen=True)
class HutConfig(Config):
    r: int = 8


class HUT(Method):
    name = "hut"
    description = "multiplicative update W' = W0 ⊙ (B A), B A = 1 at the start"
    citation = ("Chen et al., HUT: A More Computation Efficient Fine-Tuning Method With "
                "Hadamard Updated Transformation, 2024")
    Config = HutConfig
    inits = ("paper", "gaussian")
    needs_w0 = True
    product_terms = ((("B", "A"),),)  # ΔW = W0 ⊙ (B A) − W0
    product_modulator = "w0"
    product_offset = "w0"

    def validate(self, m, n, config):
        check_rank(self.name, config.r, min(m, n), "r", m, n)

    def init(self, w0: Tensor, config: HutConfig, generator=None, scheme="paper") -> Params:
        m, n = check_matrix(w0, "W0")
        self.validate(m, n, config)
        g, lead, r = make_generator(generator), tuple(w0.shape[:-2]), config.r
        if scheme == "paper":  # B A = all-ones exactly
            B = zeros((*lead, m, r), w0)
            B[..., :, 0] = 1.0
            A = kaiming_uniform((*lead, r, n), n, g, w0)
            A[..., 0, :] = 1.0
            return {"B": B, "A": A}
        if scheme == "gaussian":  # a generic point: B A − 1 has rank r + 1
            return {"B": gaussian((*lead, m, r), r ** -0.5, g, w0),
                    "A": gaussian((*lead, r, n), 1.0, g, w0)}
        raise ValueError(f"{self.name}: unknown init {scheme!r}; known: {', '.join(self.inits)}")

    def delta(self, params: Params, w0: Tensor | None = None, config: HutConfig | None = None) -> Tensor:
        if w0 is None:
            raise ValueError(f"{self.name}: ΔW = W0 ⊙ (B A − 1) needs W0")
        B, A = params["B"], params["A"]  # (..., m, r), (..., r, n)
        m, n = check_matrix(w0, "W0")
        check_params(params, {"B": (m, A.shape[-2]), "A": (B.shape[-1], n)}, self.name)
        return w0 * (B @ A - 1.0)  # (..., m, n)

    def weight(self, params, w0, config=None):
        return w0 * (params["B"] @ params["A"])  # W' exactly as the paper writes it

    def n_params(self, m, n, config):
        return config.r * (m + n)

    def rank_bound(self, m, n, rank_w0, config):
        return min((config.r + 1) * rank_w0, m, n)

    def candidate_configs(self, m, n, budget):
        r = min(budget // (m + n), min(m, n))
        return [HutConfig(r=r)] if r >= 1 else []


METHOD = HUT()
