"""SAM: sharpness-aware minimization (Foret, Kleiner, Mobahi, Neyshabur, ICLR 2021).

    min_w  max_{‖ε‖ ≤ ρ} L(w + ε)

one ascent step approximates the inner maximum, and the base optimizer steps with the
gradient taken there:

    g     = ∇L(w)                              (1st forward-backward)
    ε     = ρ g / (‖g‖ + 1e-12)                (‖·‖: one 2-norm over every trainable tensor)
    g_SAM = ∇L(w + ε)                          (2nd forward-backward, same batch)
    w     ← base_step(w, g_SAM)                (AdamW with the trainer's schedule)

Reading taken: the reference PyTorch code the authors point to (davda54/sam), non-adaptive:
one global gradient norm over all trainable tensors (the adapter factors and the task
head alike), 1e-12 added to it, the reported loss L(w) of the first pass. One change:
w is restored from a copy, not by subtracting ε again, so after the step the weights
are exactly what the base optimizer made of w (subtracting is not exact in floating point).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import Rule


def check_radius(rule: str, opts: dict, *names: str) -> None:
    """Each named option must be a finite number >= 0 (one-line ValueError)."""
    for name in names:
        v = opts[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"--optimizer {rule}: {name} must be a finite number >= 0, got {v!r}")


def with_grad(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [p for p in params if p.grad is not None]


@torch.no_grad()
def grad_norm(grads: list[Tensor]) -> Tensor:
    """‖g‖: the 2-norm of all gradients taken together (a 0-d tensor)."""
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


@torch.no_grad()
def move(params: list[torch.nn.Parameter], direction: list[Tensor], scale: Tensor) -> None:
    """w ← w + scale · direction (in place)."""
    for p, d in zip(params, direction):
        p.add_(d * scale.to(p))


@torch.no_grad()
def restore(params: list[torch.nn.Parameter], saved: list[Tensor]) -> None:
    for p, w in zip(params, saved):
        p.copy_(w)


class SAM(Rule):
    name = "sam"
    gradient_evaluations = 2
    options: ClassVar[dict[str, Any]] = {"rho": 0.05}

    @classmethod
    def check_values(cls, opts):
        check_radius(cls.name, opts, "rho")

    def step(self, closure: Callable[[], Tensor], step: int) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = closure()                                     # L(w), g = ∇L(w)
        params = with_grad(self.params)
        g = [p.grad.detach().clone() for p in params]
        saved = [p.detach().clone() for p in params]
        move(params, g, self.opts["rho"] / (grad_norm(g) + 1e-12))   # w + ε
        self.optimizer.zero_grad(set_to_none=True)
        closure()                                            # g_SAM = ∇L(w + ε)
        restore(params, saved)                               # w, bit for bit
        self.optimizer.step()
        return loss
