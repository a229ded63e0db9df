"""MiSS (formerly Bone): one small shard D shared across the whole weight.

Kang and Yin, "MiSS: Revisiting the Trade-off in LoRA with an Efficient
Shard-Sharing Structure" (first version: "Bone: Block-Affine Adaptation of Large
Language Models"), 2024, arXiv:2409.15371; PEFT ``peft.tuners.miss``.

Three modes, as PEFT's ``init_weights`` (True = "balance", "bat", "mini"):

balance (PEFT default)   D: (r, m)
    ΔW[i, j] = D[j mod r, i], i.e. ΔW[:, j] = D[j mod r, :]ᵀ: Dᵀ tiled along the
    input dimension (the last tile cut when r does not divide n)
    params r m      rank ΔW <= min(r, m, n)      requires r <= n
mini                     D: (r, mini_r)
    ΔW[i, j] = D[j mod r, i mod mini_r]: D tiled along both dimensions
    params r mini_r  rank ΔW <= min(r, mini_r, m, n)   requires mini_r | m, r <= n
bat (block-affine)       D: (m/r, r, r), one r x r block D_p per row block p
    ΔW_pq = (W0_pq + I) D_p = W0_pq D_p + D_p for the r x r blocks (p, q) of W0
    params m r      rank ΔW <= min(m, n)      requires r | m and r | n; needs W0
init: D = 0 in every mode (ΔW = 0 at the start; PEFT's default).

Orientation follows PEFT's code: the balance shard is stored (r, m) and tiled
along the *columns* (input dimension); in bat mode, D_p multiplies each block from
the right, so ΔW_pq = (W0_pq + I) D_p. DESIGN.md's table states the same formulas.
In balance and mini mode ΔW does not depend on W0; in bat mode ``delta`` needs W0.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from ..base import (
    Config,
    Method,
    Params,
    check_matrix,
    check_rank,
    gaussian,
    kaiming_uniform,
    make_generator,
    zeros,
)

MODES = ("balance", "bat", "mini")


@dataclasses.dataclass(frozen=True)
class MissConfig(Config):
    r: int = 8
    #: "balance" (PEFT default), "bat" or "mini"
    mode: str = "balance"
    #: the shard width along the output dimension, "mini" mode only (must divide m)
    mini_r: int | None = None


class MiSS(Method):
    name = "miss"
    description = "a shared shard D tiled over the weight (Bone / MiSS)"
    citation = ("Kang and Yin, MiSS: Revisiting the Trade-off in LoRA with an Efficient "
                "Shard-Sharing Structure (Bone), 2024, arXiv:2409.15371")
    Config = MissConfig
    inits = ("paper", "gaussian", "kaiming")
    # Only "bat" mode reads W0; balance/mini do not. A class-level flag cannot say
    # "depends on the config", so it is False and delta() raises if bat gets no W0.
    needs_w0 = False
    peft_name = "miss"
    closed_form = "shard"

    def validate(self, m, n, config):
        if config.mode not in MODES:
            raise ValueError(f"{self.name}: mode must be one of {', '.join(MODES)}, got {config.mode!r}")
        check_rank(self.name, config.r, n, "r", m, n)  # PEFT: r <= in_features
        if config.mode == "bat" and (m % config.r or n % config.r):
            raise ValueError(f"{self.name}: bat mode needs r dividing both sides of the {m}x{n} "
                             f"matrix, got r={config.r}")
        if config.mode != "mini" and config.mini_r is not None:
            raise ValueError(f"{self.name}: mini_r is used by mode='mini' only, got mode={config.mode!r}")
        if config.mode == "mini":
            if config.mini_r is None:
                raise ValueError(f"{self.name}: mode='mini' needs mini_r (a divisor of m={m})")
            check_rank(self.name, config.mini_r, m, "mini_r", m, n)
            if m % config.mini_r:
                raise ValueError(f"{self.name}: mini mode needs mini_r dividing m={m}, got {config.mini_r}")

    def shard_shape(self, m: int, n: int, config: MissConfig) -> tuple[int, ...]:
        r = config.r
        return {"balance": (r, m), "mini": (r, config.mini_r), "bat": (m // r, r, r)}[config.mode]

    def init(self, w0: Tensor, config: MissConfig, generator=None, scheme="paper") -> Params:
        m, n = check_matrix(w0, "W0")
        self.validate(m, n, config)
        g, lead, shape = make_generator(generator), tuple(w0.shape[:-2]), self.shard_shape(m, n, config)
        if scheme == "paper":  # D = 0
            return {"D": zeros((*lead, *shape), w0)}
        if scheme == "kaiming":  # PEFT's init_weights=False: kaiming_uniform_(a=√5), fan_in = size(1)
            return {"D": kaiming_uniform((*lead, *shape), shape[1], g, w0)}
        if scheme == "gaussian":  # generic non-zero shard, ΔW entries O(1) (bat: O(1) on top of W0 D)
            return {"D": gaussian((*lead, *shape), 1.0 if config.mode != "bat" else config.r ** -0.5, g, w0)}
        raise ValueError(f"{self.name}: unknown init {scheme!r}; known: {', '.join(self.inits)}")

    def delta(self, params: Params, w0: Tensor | None = None, config: MissConfig | None = None) -> Tensor:
        if w0 is None:
            raise ValueError(f"{self.name}: delta needs W0 (for its shape, and its values in bat mode)")
        D = params["D"]
        config = MissConfig(r=D.shape[-2]) if config is None else config  # default: balance
        m, n = check_matrix(w0, "W0")
        self.validate(m, n, config)
        shape = self.shard_shape(m, n, config)
        if tuple(D.shape[D.ndim - len(shape):]) != shape:
            raise ValueError(f"{self.name}: factor D has shape {tuple(D.shape)}, expected (..., "
                             + ", ".join(map(str, shape)) + f") for mode {config.mode}")
        r = config.r
        if config.mode == "bat":
            P, Q = m // r, n // r
            Wb = w0.reshape(*w0.shape[:-2], P, r, Q, r).transpose(-3, -2)  # (..., P, Q, r, r): block (p, q)
            Dp = D[..., :, None, :, :]  # (..., P, 1, r, r)
            out = Wb @ Dp + Dp  # (W0_pq + I) D_p
            return out.transpose(-3, -2).reshape(*out.shape[:-4], m, n)
        cols = torch.arange(n, device=D.device) % r  # column j reads shard row j mod r
        if config.mode == "mini":
            rows = torch.arange(m, device=D.device) % config.mini_r
            return D.mT[..., rows, :][..., :, cols]  # (..., m, n)
        return D.mT[..., :, cols]  # (..., m, n)

    def forward(self, x, params, w0, config=None):
        config = MissConfig(r=params["D"].shape[-2]) if config is None else config
        if config.mode == "bat":
            return super().forward(x, params, w0, config)
        m, n = w0.shape[-2:]
        D = params["D"]  # (..., r, m) or (..., r, mini_r)
        if config.mode == "mini":
            D = D.repeat(*([1] * (D.ndim - 1)), m // config.mini_r)  # (..., r, m)
        r = config.r
        xp = F.pad(x, (0, (-n) % r))  # (..., t, ceil(n/r) r)
        xs = xp.reshape(*xp.shape[:-1], -1, r).sum(-2)  # (..., t, r): sum over column tiles
        return x @ w0.mT + xs @ D

    def n_params(self, m, n, config):
        return config.r * (config.mini_r if config.mode == "mini" else m)

    def rank_bound(self, m, n, rank_w0, config):
        if config.mode == "bat":
            return min(m, n)
        if config.mode == "mini":
            return min(config.r, config.mini_r, m, n)
        return min(config.r, m, n)

    def candidate_configs(self, m, n, budget):
        """Balance mode only (PEFT's default, the mode DESIGN's budget row describes);
        bat and mini are reachable with an explicit config."""
        r = min(budget // m, n)
        return [MissConfig(r=r)] if r >= 1 else []


METHOD = MiSS()
