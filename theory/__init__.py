"""Parameterizations of PEFT updates, their parameter counts and rank bounds.

>>> import theory
>>> abba = theory.get_method("abba")
>>> cfg = abba.config_for_rank(1000, 1000, 16)     # budget of rank-16 LoRA
>>> cfg, abba.n_params(1000, 1000, cfg), abba.rank_bound(1000, 1000, 1000, cfg)
(AbbaConfig(r1=8, r2=8, alpha=None), 32000, 64)
"""

import cli  # noqa: I001 - first: Ctrl-C during the imports below is one line (cli.guard_startup)
cli.guard_startup()

from .base import Config, Method, lora_budget
from .registry import available, get_method, register

__all__ = ["Config", "Method", "available", "get_method", "lora_budget", "register"]
