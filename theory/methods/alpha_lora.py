"""α-LoRA: W' = diag(α) W0 + s · B A, LoRA plus one trainable scale per output row.

"α-LoRA" (transfer learning with a scaled base: fine-tuning w_α = α w̃ + a, analysed
by random-matrix theory in ``rmt/``; in the LLM, one α per output row).

    ΔW = W' − W0 = (α − 1) ⊙_rows W0 + s B A
    alpha: (m,)   B: (m, r)   A: (r, n)   params r (m + n) + m
    rank ΔW <= min(m, n, rank W0 + r)     (generically min(m, n) for full-rank W0)
    s = lora_alpha / r (rsLoRA: / √r); lora_alpha=None means s = 1
    init ("paper"): α = 1, A Kaiming-uniform, B = 0 (so ΔW = 0 at the start)

The DESIGN table lists the bound min(m, n); the bound here is the same for a
full-rank W0 and tighter when W0 is low rank (row scaling keeps rank W0).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from ..base import (Config, Method, Params, check_matrix, check_params, check_rank, gaussian,
                    kaiming_uniform, make_generator, zeros)


@dataclasses.dataclass(frozen=True)
class AlphaLoraConfig(Config):
    r: int = 8
    #: the LoRA scaling numerator (PEFT's lora_alpha); None means s = 1
    lora_alpha: float | None = None
    rslora: bool = False

    @property
    def scale(self) -> float:
        if self.lora_alpha is None:
            return 1.0
        return self.lora_alpha / (math.sqrt(self.r) if self.rslora else self.r)


class AlphaLoRA(Method):
    name = "alpha_lora"
    description = "row-scaled base plus LoRA: diag(α) W0 + s·B A"
    citation = "α-LoRA: fine-tuning with a trainable per-row scale of the pre-trained weight"
    Config = AlphaLoraConfig
    inits = ("paper", "gaussian")
    needs_w0 = True
    lora_term = ("B", "A")
    row_form = ("scaled_base", "alpha")

    def validate(self, m, n, config):
        check_rank(self.name, config.r, min(m, n), "r", m, n)

    def init(self, w0: Tensor, config: AlphaLoraConfig, generator=None, scheme="paper") -> Params:
        m, n = check_matrix(w0, "W0")
        self.validate(m, n, config)
        g, lead, r = make_generator(generator), tuple(w0.shape[:-2]), config.r
        if scheme == "paper":  # α = 1, B = 0, A Kaiming-uniform
            return {"alpha": torch.ones((*lead, m), device=w0.device, dtype=w0.dtype),
                    "B": zeros((*lead, m, r), w0),
                    "A": kaiming_uniform((*lead, r, n), n, g, w0)}
        if scheme == "gaussian":  # α around 1, B A random: a generic point
            return {"alpha": 1.0 + gaussian((*lead, m), 1.0, g, w0),
                    "B": gaussian((*lead, m, r), r ** -0.5, g, w0),
                    "A": gaussian((*lead, r, n), n ** -0.5, g, w0)}
        raise ValueError(f"{self.name}: unknown init {scheme!r}; known: {', '.join(self.inits)}")

    def delta(self, params: Params, w0: Tensor | None = None,
              config: AlphaLoraConfig | None = None) -> Tensor:
        if w0 is None:
            raise ValueError(f"{self.name}: ΔW = (α − 1) W0 + s B A needs W0")
        B, A = params["B"], params["A"]  # (..., m, r), (..., r, n)
        m, n = check_matrix(w0, "W0")
        check_params(params, {"alpha": (m,), "B": (m, A.shape[-2]), "A": (B.shape[-1], n)}, self.name)
        s = 1.0 if config is None else config.scale
        return (params["alpha"] - 1.0)[..., :, None] * w0 + s * (B @ A)  # (..., m, n)

    def forward(self, x, params, w0, config=None):
        s = 1.0 if config is None else config.scale
        return (x @ w0.mT) * params["alpha"][..., None, :] + s * ((x @ params["A"].mT) @ params["B"].mT)

    def bias_scale(self, params):
        """The authors' code scales the whole pre-trained map, α ⊙ (W0 x + b), so in a
        layer with a bias the bias is scaled too (ΔW, a statement about W, is unchanged)."""
        return params["alpha"]

    def embed_lora(self, params: Params, w0: Tensor, config: AlphaLoraConfig) -> Params:
        """α = 1: then ΔW = s B A exactly."""
        return {**params, "alpha": torch.ones_like(params["alpha"])}

    def n_params(self, m, n, config):
        return config.r * (m + n) + m

    def rank_bound(self, m, n, rank_w0, config):
        return min(m, n, rank_w0 + config.r)

    def candidate_configs(self, m, n, budget):
        r = min((budget - m) // (m + n), min(m, n))
        return [AlphaLoraConfig(r=r)] if r >= 1 else []


METHOD = AlphaLoRA()
