"""Training rules: how one step turns the loss into an update (``--optimizer``).

Every rule wraps a base ``torch.optim`` optimizer (AdamW by default) and is called
once per step with a closure that computes the training loss of the current batch
and back-propagates it (``loss = closure()``). A rule may call the closure several
times (SAM-style rules evaluate the gradient at perturbed weights) and must leave
the model's weights as the base optimizer's step left them.

``adamw``      the plain step: one gradient, ``optimizer.step()``.
``sam``        sharpness-aware minimization (2 gradients per step, :mod:`.sam`).
``bsam``       bilateral SAM: max- and min-sharpness points (3 gradients, :mod:`.bsam`).
``flat-lora``  a filter-aware random perturbation of the merged weight W0 + ΔW, ramped
               over training (1 gradient, :mod:`.flat_lora`).

Rules register themselves in :data:`RULES` (one file each); :func:`make_rule`
builds one by name.
"""

from __future__ import annotations

from . import bsam, flat_lora, sam  # noqa: F401  (each registers its rule)
from .base import RULES, Rule, make_rule

__all__ = ["RULES", "Rule", "make_rule"]
