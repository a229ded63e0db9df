"""Fit a PEFT update to a batch of target matrices.

Problem (DESIGN §4; the metric of Singhal et al., ABBA, 2025, Fig. 2): for each
target M_b (m, n) find the method's factors minimizing the relative error

    e_b = ‖M_b − ΔW_b‖_F² / ‖M_b‖_F².

Solvers (every one batched over the targets, on any device, float32 or float64):

- ``svd``: closed form, LoRA (truncated SVD, Eckart-Young) and full (ΔW = M);
  PMSS (U = U0 + C⁺ M R⁺) and MiSS in each mode (its linear least squares in the
  shard D) (``solvers.exact``);
- ``als``: alternating least squares for methods linear in each factor (LoRA,
  HiRA, ABBA, LoHa, SMoA; ``solvers.als``); exact row-wise solves, monotone. ABBA
  and LoHa at small r1·r2 use the Khatri-Rao ALS (``solvers.als_kr``): two GEMMs
  over the targets per sweep, nothing m×n formed. VeRA (bilinear in b, d) and LoKr
  (nearest Kronecker product, Van Loan-Pitsianis, with the rank constraint of W2 /
  W1) have their own exact ALS (``solvers.exact``), monotone, each from several
  starts batched together (the best kept per target; LoKr starts from the rank-1
  SVD of the rearranged target, which is its optimum when both factors are free);
- ``adam``: every method (``solvers.adam``); for ABBA/LoHa at small r1·r2 the
  loss is the Khatri-Rao expansion of the error with its gradient written out
  (same values, no m×n tensor, no autograd);
- ``auto``: svd for LoRA/full/PMSS/MiSS, ALS where available, Adam otherwise. For the
  Hadamard pairs ABBA and LoHa (``auto_solver``): L-BFGS from ``lora-warm`` on
  targets of a side >= 512 or at large r1·r2; else ALS from at least 3 starts,
  ``lora-warm``, then ``spectral`` (seeds seed, seed + 1, ...) when r1·r2 <= min(m, n),
  Gaussian starts otherwise. For the modulated updates s Σ_t F_t ⊙ (B_t A_t) (SMoA,
  HiRA, HUT; ``solvers.modulated``) on targets of a side >= 512: ``WARM_SWEEPS`` ALS
  sweeps, then L-BFGS with the Gauss-Newton H⁰ of each F_t
  (``precondition.gauss_newton_modulated``), which ends lower than 200 sweeps of ALS
  in a fifth to a half of the time (README, "Sweeps at scale").

Several ALS starts are screened: each runs a tenth of the sweeps, and the best per
target runs the rest (total work ≈ 1.2 single runs for 3 starts), where a later
start replaces the first (``lora-warm``) only when 1% better. Exact Hadamard targets
show it within a few sweeps (a spectral start near 0, the others stalled); on
general targets lora-warm ends lowest: at 256×256 (the main job) 3 × 60 full sweeps
ended above one lora-warm run of 200, and a spectral start 0.2% ahead after 20
sweeps ended 0.4% behind.

Reconstruction inits, besides each method's own (``solvers.common``):

- ``lora-warm`` (ABBA, LoHa): B1 A1 = truncated SVD of M at rank r1, B2 = [1, ε N],
  A2 = [1; ε N], so ΔW starts at ≈ the rank-r1 LoRA optimum;
- ``spectral`` (ABBA, LoHa, r1 r2 <= min(m, n)): the Khatri-Rao form ΔW = L Rᵀ,
  L = B1 ⊙_r B2, searched in the top-(r1 r2) singular subspace by alternating
  projections onto rank-one rows: recovers exact Hadamard targets where random
  starts stall;
- ``lora-warm`` (DoRA, α-LoRA, Adam's first start): their factors set so that ΔW
  is exactly the rank-r LoRA optimum, so Adam can only improve on LoRA(r);
- ``svd`` (LoRA): the optimum itself.

Targets are fitted at unit RMS (M / rms(M)) when ΔW is linear in some factor
group (the result is scaled back), so Adam's step sizes mean the same on every
target; the relative error is unchanged. At the end, for those methods, the
update is replaced by its best multiple c·ΔW (c = <M, ΔW>/‖ΔW‖²), so no solver
returns an error above 1, the error of the zero update.

>>> import theory, torch
>>> from reconstruction.targets import make_target
>>> M = make_target("random", (40, 30)).M
>>> res = fit("lora", M, theory.get_method("lora").config(r=4))
>>> bool(torch.allclose(res.rel_error, lora_optimum(M.double(), 4), atol=1e-5))
True
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Sequence

import torch
from torch import Tensor

import theory
from theory.base import Config

from .solvers import als as _als
from .solvers import als_kr as _kr
from .solvers import exact as _exact
from .solvers import modulated as _modulated
from .solvers import precondition as _precondition
from .solvers import rowscale as _rowscale
from .solvers.adam import run_adam
from .solvers.common import (
    extra_inits,
    finish_step,
    has_als,
    homogeneous_factors,
    initial_params,
    is_hadamard_pair,
    is_modulated,
    optimal_rescale,
    per_target_steps,
    rescale_start,
    scale_factors,
    structure,
)
from .solvers.lbfgs import run_lbfgs
from .solvers.svd import fit_svd

SOLVERS = ("auto", "svd", "als", "adam", "lbfgs")
#: default iteration counts (Adam steps, ALS sweeps)
ADAM_STEPS = 2000
ALS_SWEEPS = 200
LBFGS_ITERS = 1000
#: L-BFGS's iterations for a Hadamard pair (ABBA, LoHa) with its Gauss-Newton H⁰
#: (``solvers.precondition``), against 1000 plain ones: at 1000×1000 from ``lora-warm`` on
#: Figure 2's four targets, 600 end lower on all four at r1 = r2 = 8, and within +0.0006 at
#: 36 and +0.0013 at 72, lower on two of four each (README, "Sweeps at scale")
PRECONDITIONED_ITERS = 600
#: a modulated update (SMoA, HiRA, HUT; ``solvers.modulated``) by L-BFGS: WARM_SWEEPS ALS
#: sweeps from the ALS start, then at most MODULATED_ITERS preconditioned iterations with
#: the stopping rule MODULATED_STOP (tol, window) (calibrated at 1000×1000 on Figure 2's
#: four targets, README "Sweeps at scale")
WARM_SWEEPS = 5
MODULATED_ITERS = 400
MODULATED_STOP = (2e-4, 20)
#: methods that ``auto`` fits by L-BFGS instead of Adam on targets of a side >=
#: ``LBFGS_FROM``, with their stopping rule (tol, window). α-LoRA, ΔW = (α − 1) ⊙ W0 + s B A:
#: at 1000×1000 on Figure 2's four targets (r = 8, 40, 72; README "Sweeps at scale") it
#: ends 0.0004-0.0018 lower than Adam's 2000 steps on the orthogonal target and within
#: +0.00008 on the others, in 0.28-0.43× the time. DoRA stays with Adam: by L-BFGS it
#: ends up to +0.005 higher on the orthogonal target (measured the same day)
ADAM_TO_LBFGS = {"alpha_lora": (1e-4, 20)}
#: several ALS starts run 1/SCREEN of the sweeps each; the best per target the rest, where a
#: later start must beat the first (lora-warm) by SCREEN_MARGIN (relative) to replace it
SCREEN = 10
SCREEN_MARGIN = 0.01
#: ``auto`` fits ABBA/LoHa by L-BFGS on targets with a side this long or longer
LBFGS_FROM = 512
ADAM_LR = 1e-2
#: the stopping rule when ``fit`` gets no ``tol``: (tol, window) per solver, a target
#: stopping when its error improved by less than tol (relative) over window iterations
#: (window None: the solver's own, Adam max(50, steps/20), L-BFGS 10). Calibrated on the
#: recorded error curves of Figure 2's fits (1000×1000, its four targets, r = 40 and 72;
#: README, "Sweeps at scale"): ALS (HiRA, HUT; SMoA barely) stops after 60-100% of its
#: 200 sweeps, the exact ALS of VeRA and LoKr earlier, and Adam (DoRA, α-LoRA) after
#: 6-60% of its 2000 steps, each within 0.0005 of the error of the full run at r = 72
#: (smaller problems stop earlier and further off: within 0.002 at 96×80, a test);
#: L-BFGS (ABBA, LoHa), still gaining 0.001 in its last quarter, runs its iterations out
#: (tol 1e-7). ``tol=0`` stops only where the error stands still.
STOP = {"als": (1e-4, 10), "adam": (1e-4, None), "lbfgs": (1e-7, None)}
#: at most this many entries (B m n, the whole batch): fitted with one CPU thread
SMALL = 256 * 256


def relative_error(M: Tensor, D: Tensor) -> Tensor:
    """‖M − D‖_F² / ‖M‖_F² per matrix: (..., m, n) -> (...). A zero target gives ‖D‖_F²."""
    num = ((M - D) ** 2).sum((-2, -1))
    den = (M * M).sum((-2, -1))
    return num / torch.where(den > 0, den, torch.ones_like(den))


def lora_optimum(M: Tensor, r: int) -> Tensor:
    """Exact best relative error of rank-r LoRA, Σ_{k>r} σ_k² / Σ_k σ_k² (Eckart-Young),
    per matrix: (..., m, n) -> (...)."""
    return lora_optimum_from_sv(torch.linalg.svdvals(M), r)


def lora_optimum_from_sv(s: Tensor, r: int) -> Tensor:
    """``lora_optimum`` from the singular values s (..., p) of the targets (one SVD serves
    every rank)."""
    s2 = s ** 2  # (..., p)
    tot = s2.sum(-1)
    tail = s2[..., int(r):].sum(-1)
    return tail / torch.where(tot > 0, tot, torch.ones_like(tot))


@dataclasses.dataclass
class FitResult:
    method: str
    config: Config
    solver: str
    init: str
    params: dict[str, Tensor]  # batched factors (B, ...), trainable and frozen
    delta: Tensor  # (B, m, n)
    rel_error: Tensor  # (B,) float64 on cpu
    history: list[float]  # mean relative error per step (adam) / sweep (als)
    steps: int
    seconds: float
    diverged: Tensor  # (B,) bool
    #: per-target error per step/sweep, (steps+1, B) float64 cpu (of the best restart)
    history_per_target: Tensor | None = None
    #: per target, the restart (init, seed) that won
    winners: list[str] = dataclasses.field(default_factory=list)
    #: per target, the iterations a fit of it alone would report (``steps`` is their max)
    steps_per_target: Tensor | None = None

    def __repr__(self) -> str:
        return (f"FitResult({self.method} {self.config}, solver={self.solver}, init={self.init}, "
                f"rel_error={[round(float(e), 5) for e in self.rel_error]}, steps={self.steps}, "
                f"{self.seconds:.2f}s)")


def solvers_for(method) -> list[str]:
    """The solvers that handle a method (a Method or a registry name), read from its
    declared structure (``Method.closed_form``, ``product_terms``, ``exact_als``);
    ``auto`` picks the first."""
    meth = method if isinstance(method, theory.Method) else theory.get_method(method)
    out = []
    if meth.closed_form is not None:
        out.append("svd")
    if has_als(meth):
        out.append("als")
    out += ["adam", "lbfgs"]
    return out


def auto_solver(method, config: Config, m: int, n: int) -> str:
    """What ``solver="auto"`` runs for ``method`` at ``config`` on m×n targets: the
    closed form, else ALS, else Adam; except for the Hadamard pairs (ABBA, LoHa) on
    targets of a side >= ``LBFGS_FROM`` or at an r1·r2 too large for the Khatri-Rao
    ALS (``als_kr.cheaper``), where L-BFGS from ``lora-warm`` reaches lower errors.
    Measured on the four Fig. 2 targets at 1000×1000 (seed 0, float32, 2-core CPU):
    at r1 = r2 = 8, 16, 20 L-BFGS (1000 iterations) ends below ALS (200 sweeps from
    the same start) on all 12, by 0.0002-0.004 (r1 = r2 = 20, orthogonal: 0.8181
    against 0.8203), in 0.9-1.3× ALS's time; at r1 = r2 = 36, where the generic ALS
    costs O(m n (r1² + r2²)) per sweep, 0.666 in 8 s per target against 0.672 in
    89 s. At 256×256, r1 = r2 = 8, the two tie (0.1917 / 0.7951 / 0.7220 / 0.5835 by
    ALS in 1.2 s, 0.1917 / 0.7942 / 0.7228 / 0.5806 by 500 L-BFGS iterations in
    1.7 s) and ALS, guarded and monotone, is kept. The modulated updates (SMoA, HiRA,
    HUT) go to L-BFGS on the same targets (side >= ``LBFGS_FROM``): 5 ALS sweeps, then
    preconditioned L-BFGS (``_run_modulated``), which at 1000×1000 on Figure 2's four
    targets (the Figure 2 grid, r = 8-72) ended at or below ALS's 200 sweeps on 106 of
    108 cells (the other two +0.0001), in 0.2-0.5× the time at r = 16-72 and about the
    same at r = 8 (SMoA r = 72: 0.7357 against 0.7365 on the orthogonal target, 31 s
    against 156 s per batch of four); at 256×200 ALS is as good and faster, and is kept.
    α-LoRA (``ADAM_TO_LBFGS``) goes from Adam to L-BFGS on the same targets."""
    meth = method if isinstance(method, theory.Method) else theory.get_method(method)
    avail = solvers_for(meth)
    chosen = "svd" if "svd" in avail else ("als" if "als" in avail else "adam")
    if chosen == "als" and is_hadamard_pair(meth):
        r1, r2 = _pair_ranks(meth, config)
        if max(m, n) >= LBFGS_FROM or not _kr.cheaper(r1, r2, m, n):
            chosen = "lbfgs"
    if chosen == "als" and is_modulated(meth) and max(m, n) >= LBFGS_FROM:
        chosen = "lbfgs"
    if chosen == "adam" and meth.name in ADAM_TO_LBFGS and max(m, n) >= LBFGS_FROM:
        chosen = "lbfgs"
    return chosen


#: starts drawn by the same code for every Hadamard pair (``solvers.common``: the
#: reconstruction inits, and the methods' "gaussian", the same for ABBA and LoHa)
PAIR_STARTS = ("lora-warm", "spectral", "gaussian")


def same_fit(method, config: Config, solver: str, init: str | None, m: int, n: int):
    """(method name, config) whose fit on m×n targets is this one's, number for number:
    the registered method with the same update (``Method.same_update``: LoHa without α is
    ABBA at r1 = r2 = r) where both fits run the same solver from the same starts (the
    Hadamard pairs' ALS and L-BFGS, started at ``PAIR_STARTS``); else the method's own.
    A sweep fits such cells once (``reconstruction.cells``; a test checks that the shared
    fit equals the method's own)."""
    meth = method if isinstance(method, theory.Method) else theory.get_method(method)
    own = (meth.name, config)
    same = meth.same_update(config)
    if same is None or (init is not None and init not in PAIR_STARTS):
        return own
    other = theory.get_method(same[0])
    if not (is_hadamard_pair(meth) and is_hadamard_pair(other)):
        return own
    mine = auto_solver(meth, config, m, n) if solver == "auto" else solver
    theirs = auto_solver(other, same[1], m, n) if solver == "auto" else solver
    if mine != theirs or mine not in ("als", "lbfgs"):
        return own
    return same[0], same[1]


def inits_for(method_name: str) -> list[str]:
    """Initializations ``fit`` accepts for a method (its own, then reconstruction ones)."""
    m = theory.get_method(method_name)
    return [*m.inits, *extra_inits(m)]


def _default_inits(method, solver: str, restarts: int, init: str | None,
                   spectral_ok: bool = False) -> list[tuple[str, int]]:
    """(scheme, seed offset) per restart. Adam on a method that contains rank-r LoRA
    (DoRA, α-LoRA: ``Method.lora_term``) starts the first restart at
    ``lora-warm`` (the rank-r LoRA optimum written in its factors), the others at its
    own first init; ``init=`` still picks any scheme (e.g. "paper")."""
    if init is not None:
        return [(init, i) for i in range(restarts)]
    if solver == "lbfgs":  # the starts of ALS for the Hadamard pairs and the modulated
        # updates (whose L-BFGS begins with ALS sweeps), of Adam otherwise
        solver = "als" if is_hadamard_pair(method) or is_modulated(method) else "adam"
    if solver == "adam" and method.lora_term is not None:
        return [("lora-warm", 0)] + [(method.inits[0], i) for i in range(1, restarts)]
    if solver == "als":
        if is_hadamard_pair(method):
            if spectral_ok:  # lora-warm, then spectral from seeds seed, seed + 1, ...
                return [("lora-warm", 0)] + [("spectral", i) for i in range(restarts - 1)]
            return [("lora-warm", 0)] + [("gaussian", i) for i in range(1, restarts)]
        first = "gaussian" if "gaussian" in method.inits else method.inits[0]
        return [(first, i) for i in range(restarts)]
    return [(method.inits[0], i) for i in range(restarts)]


def _pair_ranks(meth, config) -> tuple[int, int]:
    if hasattr(config, "r1"):
        return int(config.r1), int(config.r2)
    return int(config.r), int(config.r)


def _prepare(M: Tensor, dtype, device) -> Tensor:
    if not torch.is_tensor(M):
        raise ValueError(f"targets must be a torch.Tensor, got {type(M).__name__}")
    if M.ndim == 2:
        M = M[None]
    if M.ndim != 3:
        raise ValueError(f"targets must have shape (B, m, n) or (m, n), got {tuple(M.shape)}")
    if min(M.shape) < 1:
        raise ValueError(f"targets have an empty dimension: {tuple(M.shape)}")
    if dtype is None:
        dtype = M.dtype if M.dtype in (torch.float32, torch.float64) else torch.float32
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    M = M.to(device=device if device is not None else M.device, dtype=dtype)
    if not bool(torch.isfinite(M).all()):
        bad = [i for i in range(M.shape[0]) if not bool(torch.isfinite(M[i]).all())]
        raise ValueError(f"target {bad[0]} contains NaN or inf values")
    zero = (M == 0).flatten(1).all(1)
    if bool(zero.any()):
        i = int(zero.nonzero()[0, 0])
        raise ValueError(f"target {i} is all zeros: its relative error is undefined")
    return M


@contextlib.contextmanager
def _threads_for(M: Tensor):
    """One intra-op thread for small CPU problems (all targets together at most SMALL
    entries): their many tiny ops gain nothing from threads, and on a busy machine
    spinning threads slow them down by 10-100x. A batch of small targets is not small."""
    small = M.device.type == "cpu" and M.ndim >= 2 and M.numel() <= SMALL
    old = torch.get_num_threads()
    if small and old > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small and old > 1:
            torch.set_num_threads(old)


def fit(method, M: Tensor, config: Config | None = None, *, w0: Tensor | None = None,
        solver: str = "auto", steps: int | None = None, init: str | None = None,
        seed: int | Sequence[int] = 0,
        lr: float | None = None, device=None, dtype=None, progress: bool = False,
        tol: float | None = None, restarts: int = 1, schedule: str = "cosine",
        window: int | None = None, params0: dict[str, Tensor] | None = None,
        precondition: bool = True) -> FitResult:
    """Fit ``method`` (a registry name or Method) at ``config`` to the targets ``M``
    (B, m, n) (or (m, n)).

    ``w0`` (B, m, n) or (m, n): the base weights (needed by HiRA, SMoA...; ABBA's paper
    init reads it). Without it a stand-in N(0, 1/n) drawn from ``seed`` is used and
    ``FitResult.init`` says so. ``seed``: one for every target, or one per target (then
    each target gets the starts, and the W0 stand-in, of a fit of it alone with its
    seed). ``steps``: Adam steps (default 2000), ALS sweeps (default 200) or L-BFGS
    iterations (default 1000; 600 for ABBA and LoHa, whose L-BFGS takes the Gauss-Newton
    H⁰ of ``solvers.precondition`` unless ``precondition=False``, then 1000 plain ones;
    at most 400 for SMoA, HiRA and HUT, after ``WARM_SWEEPS`` ALS sweeps, with their H⁰
    unless ``precondition=False``). ``restarts``: number of starts (seeds seed, seed+1,
    ...); the best is kept per target (ALS: screened, see the module docstring). ``tol``/``window``: stop a target when its
    error improved by less than ``tol`` (relative) over ``window`` steps/sweeps (None: the
    solver's default, ``STOP``). ``params0``: start from these factors (batched like the
    targets, e.g. another fit's ``params``: ALS then Adam) instead of an init.

    Batching changes no target's numbers: every target keeps its own starts, stopping
    rule and solver state, and one that stops is left as it is while the others go on
    (on a CPU with one thread, bit for bit; ``tests/test_sweep.py``). Its iteration count
    is ``FitResult.steps_per_target``.
    """
    with _threads_for(M if torch.is_tensor(M) else torch.zeros(1, 1)):
        return _fit(method, M, config, w0=w0, solver=solver, steps=steps, init=init, seed=seed,
                    lr=lr, device=device, dtype=dtype, progress=progress, tol=tol,
                    restarts=restarts, schedule=schedule, window=window, params0=params0,
                    precondition=precondition)


def _fit(method, M, config, *, w0, solver, steps, init, seed, lr, device, dtype, progress, tol,
         restarts, schedule, window, params0, precondition) -> FitResult:
    t_start = time.perf_counter()
    meth = method if isinstance(method, theory.Method) else theory.get_method(method)
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; known: {', '.join(SOLVERS)}")
    M = _prepare(M, dtype, device)
    Bn, m, n = M.shape
    dtype, device = M.dtype, M.device
    if config is None:
        config = meth.config()
    meth.validate(m, n, config)
    if steps is not None and int(steps) < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if int(restarts) < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    seeds, per_target = _seeds(seed, Bn)
    w0_note = ""
    if w0 is None:
        if not per_target:
            g = torch.Generator().manual_seed(seeds[0] + 7919)
            w0 = torch.randn(Bn, m, n, generator=g, dtype=torch.float64) / math.sqrt(n)
        else:  # each target's own stand-in, as drawn for it alone
            w0 = torch.cat([torch.randn(1, m, n, generator=torch.Generator().manual_seed(s + 7919),
                                        dtype=torch.float64) for s in seeds]) / math.sqrt(n)
        w0 = w0.to(M)
        w0_note = " (W0 stand-in N(0,1/n))" if meth.needs_w0 else ""
    else:
        if not torch.is_tensor(w0):
            raise ValueError(f"w0 must be a torch.Tensor, got {type(w0).__name__}")
        w0 = w0.to(device=device, dtype=dtype)
        if w0.ndim == 2:
            w0 = w0.expand(Bn, m, n)
        if tuple(w0.shape) != (Bn, m, n):
            raise ValueError(f"w0 has shape {tuple(w0.shape)}, the targets {(Bn, m, n)}")
        if not bool(torch.isfinite(w0).all()):
            raise ValueError("w0 contains NaN or inf values")
        w0 = w0.contiguous()

    # which solver
    avail = solvers_for(meth)
    chosen = solver
    spectral_ok = is_hadamard_pair(meth) and math.prod(_pair_ranks(meth, config)) <= min(m, n)
    if solver == "auto":
        chosen = auto_solver(meth, config, m, n)
        # ALS: lora-warm + 2 spectral (or Gaussian) starts. L-BFGS: lora-warm alone
        # (Gaussian starts end clearly worse; spectral ones are so ill-conditioned,
        # factor norms 10³-10⁵ times the product's, that float32 gradients are noise)
        if chosen == "als" and is_hadamard_pair(meth) and init is None:
            restarts = max(int(restarts), 3)
    elif solver not in avail:
        raise ValueError(f"{meth.name}: solver {solver!r} not available; "
                         f"solvers: {', '.join(avail)}")

    # fit at unit RMS when ΔW is linear in some factor group
    probe_params = initial_params(meth, M[:1], w0[:1], config, seeds[0], meth.inits[0])
    hom = homogeneous_factors(meth, probe_params, w0[:1], config)
    rms = ((M * M).mean((-2, -1)).sqrt())  # (B,)
    c = torch.where(rms > 0, rms, torch.ones_like(rms)) if hom else torch.ones_like(rms)
    Mt = M / c[:, None, None]

    starts = _default_inits(meth, chosen, int(restarts), init, spectral_ok)
    if chosen == "svd":
        starts = starts[:1]
    best_p, best_e, best_hist, winners = None, None, None, [""] * Bn
    diverged = torch.zeros(Bn, dtype=torch.bool)
    n_steps = torch.zeros(Bn, dtype=torch.long)  # per target
    if params0 is not None:  # warm start from given factors (e.g. a previous FitResult.params)
        ref = initial_params(meth, Mt[:1], w0[:1], config, seeds[0], meth.inits[0])
        bad = [k for k in ref if k not in params0 or tuple(params0[k].shape[1:]) != tuple(ref[k].shape[1:])
               or params0[k].shape[0] != Bn]
        if bad:
            raise ValueError(f"{meth.name}: params0 lacks or misshapes factor(s) {bad}")
        given = {k: params0[k].detach().to(device=device, dtype=dtype) for k in ref}
        if hom:
            given = scale_factors(given, hom, 1.0 / c.double())
        starts = [("given", 0)]
    modulated = chosen == "lbfgs" and is_modulated(meth)
    if tol is None and chosen in STOP:
        rule = MODULATED_STOP if modulated else ADAM_TO_LBFGS[meth.name] \
            if chosen == "lbfgs" and meth.name in ADAM_TO_LBFGS else STOP[chosen]
        tol, window = rule[0], window if window is not None else rule[1]
    tol = 1e-7 if tol is None else float(tol)
    precondition = bool(precondition) and (is_hadamard_pair(meth) or modulated)
    lbfgs_iters = MODULATED_ITERS if modulated else PRECONDITIONED_ITERS if precondition else LBFGS_ITERS
    total = {"als": ALS_SWEEPS, "adam": ADAM_STEPS, "lbfgs": lbfgs_iters}.get(chosen, 0) \
        if steps is None else int(steps)
    screen = max(5, total // SCREEN) if chosen == "als" and len(starts) > 1 and total >= 4 * SCREEN else None

    def solve(p0, scheme: str, nsteps: int):
        """One solver run from p0: (params, history, steps done, diverged)."""
        div = torch.zeros(Bn, dtype=torch.bool, device=device)
        if chosen == "svd":
            p = (_exact.closed_form if meth.closed_form in _exact.CLOSED_FORMS else fit_svd)(
                meth, Mt, w0, config, p0)
            return p, [relative_error(Mt, meth.delta(p, w0, config)).double()], \
                torch.zeros(Bn, dtype=torch.long), div
        if chosen == "als" and meth.exact_als is not None:
            p, hist, k = _exact.run_als(meth, Mt, w0, config, p0, steps=nsteps, tol=tol, window=window,
                                        progress=progress, warm=scheme in ("given", "continued"))
        elif chosen == "als":
            p, hist, k = _run_als(meth, Mt, w0, config, p0, steps=nsteps, tol=tol, window=window,
                                  progress=progress)
        elif modulated:
            p, hist, k, div = _run_modulated(meth, Mt, w0, config, p0, steps=nsteps, tol=tol,
                                             window=window, progress=progress,
                                             precondition=precondition)
        elif chosen == "lbfgs":  # from the start's best multiple (spectral starts are far off)
            p0 = rescale_start(meth, Mt, w0, config, p0, hom)
            st = _pair_structure(meth, p0, w0, config)  # once: backtracking asks per subset
            vg = _kr_value_and_grad(meth, Mt, w0, config, p0, st)
            p, hist, k, div = run_lbfgs(meth, Mt, w0, config, p0, steps=nsteps, tol=tol, window=window,
                                        progress=progress, value_and_grad=vg,
                                        precondition=_precondition.gauss_newton(Mt, st, _kr.names(st))
                                        if precondition and st is not None else None,
                                        value_and_grad_for=None if vg is None else (
                                            lambda rows, p0=p0, st=st: _kr_value_and_grad(
                                                meth, Mt.index_select(0, rows), w0.index_select(0, rows),
                                                config, {k: v.index_select(0, rows) for k, v in p0.items()},
                                                st)))
        else:
            st = _pair_structure(meth, p0, w0, config)
            p, hist, k, div = run_adam(meth, Mt, w0, config, p0, steps=nsteps,
                                       lr=ADAM_LR if lr is None else float(lr), schedule=schedule,
                                       tol=tol, window=window, progress=progress,
                                       value_and_grad=_kr_value_and_grad(meth, Mt, w0, config, p0, st),
                                       value_and_grad_for=lambda rows, st=st: _kr_value_and_grad(
                                           meth, Mt.index_select(0, rows), w0.index_select(0, rows),
                                           config, {k: v.index_select(0, rows) for k, v in p0.items()}, st))
        return p, hist, k, div

    for scheme, off in starts:
        p0 = given if scheme == "given" else _initial(meth, Mt, w0, config, seeds, off, scheme)
        p, hist, k, div = solve(p0, scheme, screen or total)
        with torch.no_grad():
            e = relative_error(Mt.double(), meth.delta(p, w0, config).double())  # (B,)
            e = torch.where(torch.isfinite(e), e, torch.full_like(e, math.inf))
        n_steps = torch.maximum(n_steps, k)
        H = torch.stack([h.double().cpu() for h in hist])  # (steps+1, B)
        label = [f"{scheme}:{s + off}" for s in seeds]
        if best_p is None:
            best_p, best_e, best_hist = p, e, H
            winners = label
            diverged = div.cpu()
            continue
        better = e < (best_e * (1 - SCREEN_MARGIN) if screen else best_e)
        best_p = _take(better, p, best_p)
        best_e = torch.where(better, e, best_e)
        L = max(best_hist.shape[0], H.shape[0])
        best_hist = torch.where(better.cpu()[None], _pad(H, L), _pad(best_hist, L))
        diverged = torch.where(better.cpu(), div.cpu(), diverged)
        winners = [label[b] if bool(better[b]) else winners[b] for b in range(Bn)]

    if screen is not None and total > screen:  # the screened best start runs the rest
        p, hist, k, div = solve(best_p, "continued", total - screen)
        with torch.no_grad():
            e = relative_error(Mt.double(), meth.delta(p, w0, config).double())
        better = torch.isfinite(e) & (e <= best_e)  # ALS never increases it; a guard all the same
        best_p = _take(better, p, best_p)
        H = torch.stack([h.double().cpu() for h in hist])
        best_hist = torch.cat([best_hist, torch.where(better.cpu()[None], H[1:], best_hist[-1:])])
        n_steps = torch.maximum(n_steps, screen + k)

    params = best_p
    with torch.no_grad():
        if hom:
            D = meth.delta(params, w0, config)
            cc = optimal_rescale(Mt, D)  # never worse than the zero update
            cc = torch.where(torch.isfinite(cc), cc, torch.ones_like(cc))
            params = scale_factors(params, hom, cc * c.double())
        params = {k: v.detach() for k, v in params.items()}
        delta = meth.delta(params, w0, config).detach()  # (B, m, n)
        rel = relative_error(M.double(), delta.double()).cpu()
    if not bool(torch.isfinite(rel).all()):
        raise RuntimeError(f"{meth.name}: the fit returned a non-finite error; please report")
    init_label = starts[0][0] if len(starts) == 1 else "+".join(dict.fromkeys(s for s, _ in starts))
    return FitResult(
        method=meth.name, config=config, solver=chosen, init=init_label + w0_note,
        params=params, delta=delta, rel_error=rel,
        history=[float(h.mean()) for h in best_hist], steps=int(n_steps.max()),
        seconds=time.perf_counter() - t_start, diverged=diverged.cpu(),
        history_per_target=best_hist, winners=winners, steps_per_target=n_steps)


def _seeds(seed, Bn: int) -> tuple[list[int], bool]:
    """(one seed per target, whether they were given per target) from an int (the same
    for all) or a sequence of Bn ints."""
    if not isinstance(seed, Sequence):
        return [int(seed)] * Bn, False
    seeds = [int(s) for s in seed]
    if len(seeds) != Bn:
        raise ValueError(f"{len(seeds)} seeds for {Bn} targets: give one seed, or one per target")
    return seeds, True


def _initial(meth, M: Tensor, w0: Tensor, config, seeds: list[int], off: int, scheme: str):
    """``initial_params`` with each target's own seed (+ off): one call per distinct seed,
    on the targets that have it, put back in the batch's order."""
    uniq = list(dict.fromkeys(seeds))
    if len(uniq) == 1:
        return initial_params(meth, M, w0, config, uniq[0] + off, scheme)
    one: list[dict[str, Tensor]] = [{}] * len(seeds)  # per target, its factors (1, ...)
    for s in uniq:
        idx = [b for b, x in enumerate(seeds) if x == s]
        ii = torch.tensor(idx, device=M.device)
        p = initial_params(meth, M[ii], w0[ii], config, s + off, scheme)
        for j, b in enumerate(idx):
            one[b] = {k: v[j:j + 1] for k, v in p.items()}
    return {k: _cat_like([o[k] for o in one]) for k in one[0]}


def _cat_like(ts: list[Tensor]) -> Tensor:
    """torch.cat on dim 0 keeping each matrix's memory layout (an SVD's factors are
    column-major): reductions over a factor then add in the same order as for the
    factor alone, so a target's numbers do not depend on its batch."""
    if ts[0].ndim >= 2 and not ts[0].is_contiguous() and ts[0].mT.is_contiguous():
        return torch.cat([t.mT for t in ts]).mT
    return torch.cat(ts)


def _kr_value_and_grad(meth, M: Tensor, w0: Tensor, config, p0, st=...):
    """A hand-written error and gradient for Adam and L-BFGS, else None (autograd through
    ΔW): for a Hadamard pair the Khatri-Rao one where it is the cheaper
    (``als_kr.gradient_cheaper``), else the same through ΔW written out
    (``als_kr.dense_value_and_grad``); the row-scaled LoRA one (``solvers.rowscale``) for a
    method with a ``row_form``. ``st``: the pair's ``_pair_structure`` where already known
    (it depends on the method, config and shape, not on the targets: L-BFGS's backtracking
    asks for subsets of the batch, and measuring it costs ~80 ms at 1000×1000)."""
    if meth.row_form is not None:
        return _rowscale.value_and_grad(meth, M, w0, config)
    if st is ...:
        st = _pair_structure(meth, p0, w0, config)
    if st is None:
        return None
    if _kr.gradient_applies(st, p0, M.shape[-2], M.shape[-1]):
        return _kr.value_and_grad(M, st)
    return _kr.dense_value_and_grad(M, st)


def _pair_structure(meth, p0, w0: Tensor, config):
    """The (*) form of a Hadamard pair s (B1 A1) ⊙ (B2 A2) (ABBA, LoHa), else None."""
    if not is_hadamard_pair(meth):
        return None
    st = structure(meth, p0, w0, config)
    return st if st is not None and _kr._is_pair(st) else None


def _take(mask: Tensor, new: dict[str, Tensor], old: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per target (mask (B,)), the factors of ``new`` where True, of ``old`` elsewhere."""
    return {k: torch.where(mask.reshape(-1, *([1] * (v.ndim - 1))), new[k], v) for k, v in old.items()}


def _pad(X: Tensor, L: int) -> Tensor:
    """Repeat the last row of X (k, B) up to L rows."""
    return torch.cat([X, X[-1:].expand(L - X.shape[0], -1)]) if X.shape[0] < L else X


def _run_modulated(meth, M: Tensor, w0: Tensor, config, p0, *, steps: int, tol: float,
                   window: int | None, progress: bool, precondition: bool = True):
    """A modulated update (``solvers.modulated``): ``WARM_SWEEPS`` ALS sweeps from p0, then
    L-BFGS with the hand-written error and gradient and (``precondition``) the
    Gauss-Newton H⁰ of each modulator. Returns (params, hist, steps per target (ALS
    sweeps + L-BFGS iterations), diverged), like ``run_lbfgs``."""
    st = structure(meth, p0, w0, config)
    if not _modulated.applies(st):
        raise ValueError(f"{meth.name}: its update is not s Σ F ⊙ (B A) with fixed F")
    p, hist0, k0 = _run_als(meth, M, w0, config, p0, steps=WARM_SWEEPS, tol=0.0, window=None,
                            progress=False)
    p = {**p0, **p}
    p, hist, k, div = run_lbfgs(
        meth, M, w0, config, p, steps=steps, tol=tol, window=window, progress=progress,
        value_and_grad=_modulated.value_and_grad(M, st),
        value_and_grad_for=lambda rows: _modulated.value_and_grad(
            M.index_select(0, rows), _modulated.subset(st, rows)),
        precondition=_precondition.gauss_newton_modulated(M, st) if precondition else None)
    return p, list(hist0) + list(hist[1:]), k0 + k, div


def _run_als(meth, M: Tensor, w0: Tensor, config, p0, *, steps: int, tol: float,
             window: int | None, progress: bool, extrapolate: bool = True, kr: bool = True):
    """ALS sweeps until ``steps`` or every target stalls. Returns (params, hist, sweeps).
    ABBA/LoHa at small r1 r2 go to the Khatri-Rao ALS (``solvers/als_kr.py``; ``kr``
    False forces the generic one)."""
    from tqdm.auto import tqdm

    st = structure(meth, p0, w0, config)
    if st is None:
        raise ValueError(f"{meth.name}: ALS needs the product form s·Σ F ⊙ Π(B A), "
                         f"which this method's delta does not match")
    p = _als.unstick(st, {k: v.detach() for k, v in p0.items()})
    if kr and _kr.applies(st, p, M.shape[-2], M.shape[-1]):
        return _kr.run(M, st, p, steps=steps, tol=tol, window=window or 5, progress=progress,
                       extrapolate=extrapolate, label=f"als {meth.name}")
    order = _als.sweep_order(st, p)
    Bn = M.shape[0]
    active = torch.ones(Bn, dtype=torch.bool, device=M.device)
    window = window or 5
    e = _als.rel_error(M, st.delta(p))
    hist = torch.zeros(steps + 1, Bn, dtype=torch.float64, device=M.device)  # preallocated
    hist[0] = e
    k = 0
    its = torch.zeros(Bn, dtype=torch.long, device=M.device)
    bar = tqdm(total=steps, disable=not progress, desc=f"als {meth.name}", leave=False)
    names = [x for t in st.terms for pair in t.pairs for x in pair]
    beta = torch.full((Bn,), 0.5, dtype=torch.float64, device=M.device)
    memo: dict = {"norm": _als.norm2(M)}  # what stays the same from sweep to sweep (``als.als_sweep``)
    with torch.no_grad():
        for k in range(1, steps + 1):
            its.masked_fill_(active, k)
            prev = p
            p = _als.als_sweep(st, M, p, order, active, memo=memo)
            e = memo.get("error")  # several terms: the sweep's own residual
            if e is None:
                e = _als.structure_error(st, M, p, memo["norm"])
            if extrapolate and k >= 2:
                p, e, beta = _als.extrapolate(st, M, prev, p, e, beta, active, names, memo["norm"])
            hist[k] = torch.where(active, e, hist[k - 1])
            if finish_step(bar, hist, k, active, window, tol):
                break
        bar.close()
    return p, list(hist[: k + 1]), per_target_steps(its, k)
