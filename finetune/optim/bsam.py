"""BSAM: bilateral sharpness-aware minimization (Deng, Pang, Zhang, Huang, "Bilateral
Sharpness-Aware Minimization for Flatter Minima", 2024).

SAM penalises the *max-sharpness* max_ε L(w+ε) − L(w); BSAM adds the *min-sharpness*
L(w) − min_ε L(w+ε), so that the objective is

    L_max(w) + L(w) − L_min(w),    L_max = max_{‖ε‖≤ρ_max} L(w+ε),  L_min = min_{‖ε‖≤ρ_min} L(w+ε)

and each step takes three gradients of the same batch:

    g     = ∇L(w)                                  (1st forward-backward)
    g_max = ∇L(w + ρ_max g/‖g‖)                    (2nd: the max-sharpness point)
    g_min = ∇L(w − ρ_min g/‖g‖)                    (3rd: the min-sharpness point, along g)
    w     ← base_step(w, g_max + (g − c · g_min)),   c = ‖g_max‖ / ‖g_min‖

Reading taken: the authors' public code (github.com/ajiaaa/BSAM, ``bsam.py`` and
``train_bsam.py``):

- both points are found from g (the min point is *not* taken along g_max), with one
  global norm over all trainable tensors, 1e-12 added to ‖g‖;
- g_min is balanced by c = ‖g_max‖/‖g_min‖ (``balance="norm"``, the default). The
  paper's objective differentiates to c = 1 (``balance="none"``); only with c = 1 does
  ρ_min = 0 give SAM exactly (g_min = g then, and the step is g_max). With the authors'
  c the ρ_min = 0 step is g_max + (1 − ‖g_max‖/‖g‖) g: a test checks both;
- ρ_max is constant (0.05); ρ_min follows the learning rate (their
  ``ProportionScheduler``): ρ_min(t) = ρ_min_floor + (ρ_min − ρ_min_floor) · lr_t / lr_peak,
  with the published ρ_min = 0.05 at the peak and ρ_min_floor = 0 as the lr reaches 0
  (``schedule="lr"``; ``schedule="constant"`` keeps ρ_min fixed). lr_t / lr_peak is the
  trainer's schedule multiplier of the first parameter group (warm-up included).

w is restored from a copy between the passes (exact, as in :mod:`.sam`); 1e-12 is added to
‖g_min‖ (the authors' code divides by it bare); the reported loss is L(w).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import Rule
from .sam import check_radius, grad_norm, move, restore, with_grad

SCHEDULES = ("lr", "constant")
BALANCES = ("norm", "none")


class BSAM(Rule):
    name = "bsam"
    gradient_evaluations = 3
    options: ClassVar[dict[str, Any]] = {"rho_max": 0.05, "rho_min": 0.05, "rho_min_floor": 0.0, "schedule": "lr",
               "balance": "norm"}

    @classmethod
    def check_values(cls, opts):
        check_radius(cls.name, opts, "rho_max", "rho_min", "rho_min_floor")
        for key, known in (("schedule", SCHEDULES), ("balance", BALANCES)):
            if opts[key] not in known:
                raise ValueError(f"--optimizer bsam: {key} {opts[key]!r} unknown; "
                                 f"known: {', '.join(known)}")

    def rho_min_now(self) -> float:
        """ρ_min at the current learning rate (proportional to it, as the authors' code)."""
        hi, lo = float(self.opts["rho_min"]), float(self.opts["rho_min_floor"])
        if self.opts["schedule"] == "constant":
            return hi
        group = self.optimizer.param_groups[0]
        frac = group["lr"] / group.get("initial_lr", group["lr"]) if group["lr"] else 0.0
        return lo + (hi - lo) * frac

    def step(self, closure: Callable[[], Tensor], step: int) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = closure()                                          # g = ∇L(w)
        params = with_grad(self.params)
        g = [p.grad.detach().clone() for p in params]
        saved = [p.detach().clone() for p in params]
        norm_g = grad_norm(g) + 1e-12

        move(params, g, self.opts["rho_max"] / norm_g)            # w + ρ_max g/‖g‖
        self.optimizer.zero_grad(set_to_none=True)
        closure()
        g_max = [p.grad.detach().clone() for p in params]
        restore(params, saved)

        move(params, g, -self.rho_min_now() / norm_g)             # w − ρ_min g/‖g‖
        self.optimizer.zero_grad(set_to_none=True)
        closure()
        g_min = [p.grad for p in params]
        restore(params, saved)                                    # w, bit for bit

        c = (grad_norm(g_max) / (grad_norm(g_min) + 1e-12) if self.opts["balance"] == "norm"
             else torch.ones(()))
        with torch.no_grad():
            for p, gm, g0, gn in zip(params, g_max, g, g_min):
                p.grad = gm + (g0 - c.to(gn) * gn)                # g_max + g − c g_min
        self.optimizer.step()
        return loss
