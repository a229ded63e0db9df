"""α-LoRA in random-matrix theory (DESIGN §5): deterministic equivalents
(:mod:`rmt.theory`, numpy) and a batched Monte Carlo of the same setting
(:mod:`rmt.simulate`, torch). Of the other packages it imports only :mod:`cli`.
"""

import cli  # noqa: I001 - first: Ctrl-C during the imports below is one line (cli.guard_startup)
cli.guard_startup()

from rmt.theory import (  # noqa: F401
    Setting,
    accuracy,
    alpha_star,
    alpha_worst,
    delta,
    fixed_source_accuracy,
    fixed_source_alpha_star,
    fixed_source_mean_var,
    mean_var,
    pretrained_accuracy,
    regression_alpha_star,
    regression_risk,
    score_coefficients,
    source_stats,
)
