"""What stops a training run: a loss that is no longer a finite number.

A run whose loss becomes NaN or ±inf (a learning rate too large, an overflow) raises
:class:`Diverged` at that step, before anything is saved, so that no file holding NaN
weights can pass for a result. ``Diverged`` is a :class:`cli.Failed`: a command that
lets it through prints ``failed: training diverged at step ...`` and exits 1.
"""

from __future__ import annotations

import math

import cli


class Diverged(cli.Failed):
    """Training stopped because the loss (or a weight) is NaN or infinite."""


def check_loss(loss: float, step: int, hint: str = "lower the learning rate") -> float:
    """``loss`` if finite, else :class:`Diverged` naming the step (1-based)."""
    if not math.isfinite(loss):
        raise Diverged(f"training diverged at step {step} (loss {loss}); nothing was saved; "
                       f"{hint}")
    return loss
