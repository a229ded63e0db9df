"""VeRA: ΔW = Λ_b B Λ_d A, frozen random projections with two trainable scaling vectors.

Kopiczko et al., "VeRA: Vector-based Random Matrix Adaptation", ICLR 2024; PEFT
``peft.tuners.vera``.

    A: (r, n), B: (m, r)  frozen random, shared by every layer (Kaiming-uniform)
    d: (r,), b: (m,)      trainable: ΔW = diag(b) B diag(d) A
    params m + r (the frozen A, B are not counted)    rank ΔW <= min(r, m, n)
    init ("paper", as PEFT): b = 0, d = d_initial (0.1), so ΔW = 0 at the start

PEFT names: vera_A = A, vera_B = B (one shared pair sliced to each layer's shape),
vera_lambda_d = d, vera_lambda_b = b. There is no scaling factor. ``init`` draws one
pair (A, B) and copies it to every matrix of a batch: the projections are shared,
as in the paper. The set of reachable ΔW is the image of (b, d), not a linear
space; its dimension grows with r even past min(m, n), but the frozen projections
cost r (m + n) memory, so ``candidate_configs`` stops at r = min(m, n).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from ..base import (
    Config,
    Method,
    Params,
    check_matrix,
    check_params,
    check_rank,
    gaussian,
    like,
    make_generator,
    zeros,
)


@dataclasses.dataclass(frozen=True)
class VeraConfig(Config):
    r: int = 256
    #: initial value of every entry of d (PEFT's ``d_initial``)
    d_initial: float = 0.1


def _kaiming_uniform_gain2(shape: tuple[int, ...], fan_in: int, g: torch.Generator, ref: Tensor) -> Tensor:
    """PEFT VeRA's ``_kaiming_init``: U(-b, b) with b = √3 · √2 / √fan_in."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(fan_in)
    u = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    return like(u * bound, ref)


class VeRA(Method):
    name = "vera"
    description = "frozen shared random projections, trainable scalings diag(b) B diag(d) A"
    citation = "Kopiczko et al., VeRA: Vector-based Random Matrix Adaptation, ICLR 2024"
    Config = VeraConfig
    inits = ("paper", "gaussian")
    peft_name = "vera"
    frozen = ("A", "B")
    exact_als = "scalings"

    def validate(self, m, n, config):
        check_rank(self.name, config.r, m * n, "r", m, n)
        if not math.isfinite(config.d_initial):
            raise ValueError(f"{self.name}: d_initial must be finite, got {config.d_initial}")

    def init(self, w0: Tensor, config: VeraConfig, generator=None, scheme="paper") -> Params:
        m, n = check_matrix(w0, "W0")
        self.validate(m, n, config)
        if scheme not in self.inits:
            raise ValueError(f"{self.name}: unknown init {scheme!r}; known: {', '.join(self.inits)}")
        g, lead, r = make_generator(generator), tuple(w0.shape[:-2]), config.r
        # one shared pair of frozen projections, copied over the batch
        A = _kaiming_uniform_gain2((r, n), n, g, w0).expand(*lead, r, n).clone()  # (..., r, n)
        B = _kaiming_uniform_gain2((m, r), r, g, w0).expand(*lead, m, r).clone()  # (..., m, r)
        if scheme == "paper":  # b = 0, d = d_initial
            return {"A": A, "B": B, "b": zeros((*lead, m), w0),
                    "d": torch.full((*lead, r), float(config.d_initial), dtype=w0.dtype, device=w0.device)}
        # gaussian: random scalings (ΔW != 0)
        return {"A": A, "B": B, "b": gaussian((*lead, m), 1.0, g, w0),
                "d": gaussian((*lead, r), 1.0, g, w0)}

    def delta(self, params: Params, w0=None, config: VeraConfig | None = None) -> Tensor:
        A, B, b, d = params["A"], params["B"], params["b"], params["d"]
        r, n = A.shape[-2:]
        m = B.shape[-2]
        check_params(params, {"A": (r, n), "B": (m, r), "b": (m,), "d": (r,)}, self.name)
        return (b[..., :, None] * B) @ (d[..., :, None] * A)  # (..., m, n)

    def forward(self, x, params, w0, config=None):
        A, B, b, d = params["A"], params["B"], params["b"], params["d"]
        h = (x @ A.mT) * d[..., None, :]  # (..., t, r)
        return x @ w0.mT + (h @ B.mT) * b[..., None, :]  # (..., t, m)

    def n_params(self, m, n, config):
        return m + config.r

    def rank_bound(self, m, n, rank_w0, config):
        return min(config.r, m, n)

    def candidate_configs(self, m, n, budget):
        r = min(budget - m, min(m, n))
        return [VeraConfig(r=r)] if r >= 1 else []


METHOD = VeRA()
