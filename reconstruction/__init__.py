"""Batched reconstruction of target matrices by PEFT updates (DESIGN §4).

>>> from reconstruction import make_target
>>> from reconstruction.fit import fit
>>> t = make_target("orthogonal", (64, 64), batch=2)
>>> import theory
>>> res = fit("abba", t.M, theory.get_method("abba").config(r1=4, r2=4))
>>> res.rel_error.shape
torch.Size([2])

``targets``: the synthetic kinds of the ABBA paper's Fig. 2 and more, files, W0
stand-ins. ``fit``: the solvers (svd, als, adam) behind one function.
CLI: ``python -m reconstruction.run``.
"""

import cli  # noqa: I001 - first: Ctrl-C during the imports below is one line (cli.guard_startup)
cli.guard_startup()

from .fit import FitResult, auto_solver, lora_optimum, relative_error, solvers_for

# ``fit`` the function is not re-exported: ``reconstruction.fit`` stays the module
# (``from reconstruction.fit import fit``).
from .targets import KINDS, Target, base_weight, get_target, load_target, make_target

__all__ = ["KINDS", "FitResult", "Target", "auto_solver", "base_weight", "get_target",
           "load_target", "lora_optimum", "make_target", "relative_error", "solvers_for"]
