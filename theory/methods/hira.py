"""HiRA: ΔW = W0 ⊙ (B A), a low-rank matrix modulated entrywise by the frozen weight.

Huang et al., "HiRA: Parameter-Efficient Hadamard High-Rank Adaptation for Large
Language Models", ICLR 2025.

    B: (m, r)   A: (r, n)   params r (m + n)
    rank ΔW <= min(r · rank W0, m, n)        (rank(X ⊙ Y) <= rank X · rank Y)
    init ("paper", as PEFT's HiRA): A Kaiming-uniform, B = 0 (so ΔW = 0 at the start)

PEFT (``peft.tuners.hira``) stores ``hira_B`` (m, r) and ``hira_A`` (r, n); its
``get_delta_weight`` returns the *multiplier* B A, and merging adds W0 ⊙ (B A).
Neither the paper nor PEFT uses a scaling factor.
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


@dataclasses.dataclass(frozen=True)
class HiraConfig(Config):
    r: int = 8


class HiRA(Method):
    name = "hira"
    description = "low-rank update modulated by the frozen weight W0 ⊙ (B A)"
    citation = ("Huang et al., HiRA: Parameter-Efficient Hadamard High-Rank Adaptation "
                "for Large Language Models, ICLR 2025")
    Config = HiraConfig
    inits = ("paper", "gaussian")
    needs_w0 = True
    peft_name = "hira"
    product_terms = ((("B", "A"),),)
    product_modulator = "w0"

    def validate(self, m, n, config):
        check_rank(self.name, config.r, min(m, n), "r", m, n)

    def init(self, w0: Tensor, config: HiraConfig, generator=None, scheme="paper") -> Params:
        m, n = check_matrix(w0, "W0")
        self.validate(m, n, config)
        g, lead, r = make_generator(generator), tuple(w0.shape[:-2]), config.r
        if scheme == "paper":  # A Kaiming-uniform, B = 0
            return {"B": zeros((*lead, m, r), w0), "A": kaiming_uniform((*lead, r, n), n, g, w0)}
        if scheme == "gaussian":  # B A has O(1) entries: ΔW is W0 modulated at full strength
            return {"B": gaussian((*lead, m, r), r ** -0.5, g, w0),
                    "A": gaussian((*lead, r, n), 1.0, g, w0)}
        raise ValueError(f"{self.name}: unknown init {scheme!r}; known: {', '.join(self.inits)}")

    def delta(self, params: Params, w0: Tensor | None = None, config: HiraConfig | None = None) -> Tensor:
        if w0 is None:
            raise ValueError(f"{self.name}: ΔW = W0 ⊙ (B A) needs W0")
        B, A = params["B"], params["A"]  # (..., m, r), (..., r, n)
        m, n = check_matrix(w0, "W0")
        check_params(params, {"B": (m, A.shape[-2]), "A": (B.shape[-1], n)}, self.name)
        return w0 * (B @ A)  # (..., m, n)

    def n_params(self, m, n, config):
        return config.r * (m + n)

    def rank_bound(self, m, n, rank_w0, config):
        return min(config.r * rank_w0, m, n)

    def candidate_configs(self, m, n, budget):
        r = min(budget // (m + n), min(m, n))
        return [HiraConfig(r=r)] if r >= 1 else []


METHOD = HiRA()
