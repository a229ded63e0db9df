"""DoRA: W' = magnitude ⊙ (W0 + s B A) / ‖W0 + s B A‖_row, i.e. LoRA on the direction.

Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024; PEFT
``LoraConfig(use_dora=True)`` (``peft.tuners.lora.dora``).

    V = W0 + s B A                               (..., m, n)
    W' = diag(magnitude / ‖V‖_row) V,  ΔW = W' − W0
    B: (m, r)  A: (r, n)  magnitude: (m,)   params r (m + n) + m
    rank ΔW = rank((diag(c) − I) W0 + s diag(c) B A) <= min(rank W0 + r, m, n),
              c = magnitude / ‖V‖_row
    s = α / r (rsLoRA: α / √r), PEFT's LoRA scaling; alpha=None means s = 1
    init ("paper"): A Kaiming-uniform, B = 0, magnitude = ‖W0‖_row (so ΔW = 0)

The norm is taken per output row of the (d_out, d_in) weight, as PEFT does
(``torch.linalg.norm(W0 + s B A, dim=1)``; the paper writes ‖·‖_c, the norm of each
column of the (d_in, d_out) matrix, which is the same thing). PEFT detaches the norm
in the backward pass (the paper's memory trick); ``delta`` here is the exact value
with the full gradient: forward values agree, gradients differ on purpose.
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
    kaiming_uniform,
    make_generator,
    zeros,
)


@dataclasses.dataclass(frozen=True)
class DoraConfig(Config):
    r: int = 8
    #: None means s = 1; otherwise PEFT's LoRA scaling α/r (α/√r with rslora)
    alpha: float | None = None
    rslora: bool = False

    @property
    def scale(self) -> float:
        if self.alpha is None:
            return 1.0
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class DoRA(Method):
    name = "dora"
    description = "LoRA on the direction, learned row magnitude: m ⊙ (W0 + sBA)/‖W0 + sBA‖_row"
    citation = "Liu et al., DoRA: Weight-Decomposed Low-Rank Adaptation, ICML 2024"
    Config = DoraConfig
    inits = ("paper", "gaussian")
    needs_w0 = True
    peft_name = "dora"
    lora_term = ("B", "A")
    row_form = ("weight_norm", "magnitude")

    def validate(self, m, n, config):
        check_rank(self.name, config.r, min(m, n), "r", m, n)

    def init(self, w0: Tensor, config: DoraConfig, generator=None, scheme="paper") -> Params:
        m, n = check_matrix(w0, "W0")
        self.validate(m, n, config)
        g, lead, r = make_generator(generator), tuple(w0.shape[:-2]), config.r
        if scheme == "paper":  # A Kaiming-uniform, B = 0, magnitude = row norms of W0
            return {"B": zeros((*lead, m, r), w0), "A": kaiming_uniform((*lead, r, n), n, g, w0),
                    "magnitude": torch.linalg.vector_norm(w0, dim=-1)}
        if scheme == "gaussian":  # generic: random B, A; magnitude the row norms of W0 times (1 + N(0, 0.1²))
            B = gaussian((*lead, m, r), r ** -0.5, g, w0)
            A = gaussian((*lead, r, n), n ** -0.5, g, w0)
            noise = gaussian((*lead, m), 0.1, g, w0)
            return {"B": B, "A": A, "magnitude": torch.linalg.vector_norm(w0, dim=-1) * (1 + noise)}
        raise ValueError(f"{self.name}: unknown init {scheme!r}; known: {', '.join(self.inits)}")

    def _check(self, params: Params, w0: Tensor | None) -> tuple[int, int]:
        if w0 is None:
            raise ValueError(f"{self.name}: ΔW depends on W0; pass w0")
        m, n = check_matrix(w0, "W0")
        r = params["B"].shape[-1] if "B" in params else 0
        check_params(params, {"B": (m, r), "A": (r, n), "magnitude": (m,)}, self.name)
        return m, n

    def weight(self, params: Params, w0: Tensor, config: DoraConfig | None = None) -> Tensor:
        """W' = magnitude ⊙ V / ‖V‖_row with V = W0 + s B A."""
        self._check(params, w0)
        s = 1.0 if config is None else config.scale
        V = w0 + s * (params["B"] @ params["A"])  # (..., m, n)
        norm = torch.linalg.vector_norm(V, dim=-1)  # (..., m)
        return (params["magnitude"] / norm)[..., :, None] * V

    def delta(self, params: Params, w0: Tensor | None = None, config: DoraConfig | None = None) -> Tensor:
        return self.weight(params, w0, config) - w0

    def forward(self, x, params, w0, config=None):
        """x W'ᵀ without forming V: ‖V_i‖² = ‖W0_i‖² + 2s⟨(W0 Aᵀ)_i, B_i⟩ + s² B_i (A Aᵀ) B_iᵀ."""
        self._check(params, w0)
        s = 1.0 if config is None else config.scale
        B, A, mag = params["B"], params["A"], params["magnitude"]  # (..., m, r), (..., r, n), (..., m)
        sq = (w0 * w0).sum(-1) + 2 * s * ((w0 @ A.mT) * B).sum(-1) \
            + s * s * ((B @ (A @ A.mT)) * B).sum(-1)  # (..., m)
        c = mag / sq.clamp_min(0).sqrt()  # (..., m)
        y = x @ w0.mT + s * ((x @ A.mT) @ B.mT)  # (..., t, m) = x Vᵀ
        return y * c[..., None, :]

    def embed_lora(self, params: Params, w0: Tensor, config: DoraConfig) -> Params:
        """magnitude = ‖V‖_row, V = W0 + s B A (from the stored factors): then W' = V and
        ΔW = s B A exactly (needs no row of V to vanish)."""
        s = 1.0 if config is None else config.scale
        V = w0.to(params["B"]) + s * (params["B"] @ params["A"])  # (..., m, n)
        return {**params, "magnitude": torch.linalg.vector_norm(V, dim=-1).to(params["magnitude"])}

    def n_params(self, m, n, config):
        return config.r * (m + n) + m

    def rank_bound(self, m, n, rank_w0, config):
        return min(rank_w0 + config.r, m, n)

    def candidate_configs(self, m, n, budget):
        r = min((budget - m) // (m + n), min(m, n))
        return [DoraConfig(r=r)] if r >= 1 else []


METHOD = DoRA()
