"""The rule interface and the plain step (AdamW)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from torch import Tensor, nn

RULES: dict[str, type[Rule]] = {}


class Rule:
    """One training step. ``optimizer`` is the base optimizer over the trainable
    parameters; ``model`` the whole model (rules that perturb weights find the adapted
    layers there); ``total_steps`` the length of the run (for schedules of their own)."""

    name: ClassVar[str] = "adamw"
    #: forward-backward passes per step (the cost relative to a plain step)
    gradient_evaluations: ClassVar[int] = 1
    #: option name -> default (``--set-opt name=value`` on the command line)
    options: ClassVar[dict[str, Any]] = {}

    def __init__(self, optimizer, model: nn.Module, total_steps: int, **options):
        self.optimizer = optimizer
        self.model = model
        self.total_steps = int(total_steps)
        self.opts = self.validate(options)

    @classmethod
    def validate(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The options with defaults filled in; a one-line ValueError for an unknown name
        or a bad value (``finetune.run`` calls this before any work)."""
        unknown = sorted(set(options) - set(cls.options))
        if unknown:
            raise ValueError(f"--optimizer {cls.name}: unknown option(s) {', '.join(unknown)}; "
                             f"its options are {', '.join(sorted(cls.options)) or 'none'}")
        opts = {**cls.options, **options}
        cls.check_values(opts)
        return opts

    @classmethod
    def check_values(cls, opts: dict[str, Any]) -> None:
        """Raise ValueError for a bad option value (rules with options override this)."""

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        RULES[cls.name] = cls

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def step(self, closure: Callable[[], Tensor], step: int) -> Tensor:
        """Zero the gradients, evaluate the closure, step; return the loss at w."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = closure()
        self.optimizer.step()
        return loss

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


RULES["adamw"] = Rule


def make_rule(name: str, optimizer, model: nn.Module, total_steps: int, **options) -> Rule:
    """The rule called ``name`` (one-line ValueError for an unknown one)."""
    if name not in RULES:
        raise ValueError(f"--optimizer {name!r} unknown; known: {', '.join(sorted(RULES))}")
    return RULES[name](optimizer, model, total_steps, **options)
