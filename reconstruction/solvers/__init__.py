"""Batched reconstruction solvers behind ``reconstruction.fit.fit``:

- ``svd``: closed forms (LoRA's truncated SVD, full ΔW = M);
- ``als``: alternating least squares for updates linear in each factor;
- ``exact``: the closed forms of PMSS and MiSS (linear least squares) and the
  exact ALS of VeRA (bilinear) and LoKr (nearest Kronecker product), each
  derivation in its docstring;
- ``adam``: gradient descent on the relative error, every method;
- ``lbfgs``: batched L-BFGS (a quasi-Newton state and a line search per target),
  every method;
- ``als_kr``: the Khatri-Rao ALS of ABBA/LoHa and the hand-written gradient of its
  error expansion (Adam, L-BFGS);
- ``common``: batched inits (``lora-warm``, ``spectral``), the product form the
  ALS reads, homogeneity probes and the optimal rescaling.

The solvers' study against the ABBA paper's Fig. 2 is ``python -m reconstruction.solver_study``.
"""

from .adam import run_adam
from .als import als_sweep
from .lbfgs import run_lbfgs
from .svd import fit_svd

__all__ = ["als_sweep", "fit_svd", "run_adam", "run_lbfgs"]
