"""``python -m reconstruction.bench``: speed ratios of the reconstruction engine,
all measured in one run on one device (``--quick`` shrinks every size).

(a) batching: one batched fit of 64 targets (256×256, ABBA at the budget of
    rank-16 LoRA) against a Python loop of 64 single fits with the same solver and
    step count (goal >= 5×). The loop's fits are small enough to run on one CPU
    thread each (``fit.SMALL``), the batch on all: on a CPU with few cores, where
    one 256×256 fit is already compute-bound, the ratio is capped near (cores ×
    the per-call overhead saved); the goal is a GPU's, where the loop is
    launch-bound.
(b) efficiency: GFLOP/s of one solver step at 1024×1024 against torch's own
    square matmul GFLOP/s: the Khatri-Rao ALS ``fit`` uses for ABBA at this size,
    the generic ALS, and Adam. FLOPs are counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (matmul-type ops only: the small
    solves and element-wise ops are not counted, so this is a lower bound). An ALS
    sweep is timed directly; an Adam step is the difference of two fits with
    different step counts (init and set-up cancel). Goal >= 50%.
(c) solvers: ALS against Adam, wall time to reach 1.01× the best error either of
    them found (time to step k read as k/steps of the fit's time). Goal ALS >= 10×.
    L-BFGS (``solver="lbfgs"``) is timed to the same level beside them.
(d) memory: ABBA's Khatri-Rao forward x (W0 + ΔW)ᵀ (``theory.get_method("abba").forward``,
    Singhal et al. 2025 §3: (B1A1)⊙(B2A2) = (B1⊙_r B2)(A1ᵀ⊙_r A2ᵀ)ᵀ) against forming
    ΔW, at 4096×4096 for token counts 1..4096: peak bytes allocated by the forward
    (on CPU: a TorchDispatchMode that tracks the live tensors every op returns;
    on CUDA: ``torch.cuda.max_memory_allocated``) and time.
(e) sweep throughput: cells per minute of ``reconstruction.sweep`` on a grid of every
    method at two budgets, both ABBA conventions and the four Fig. 2 targets
    (``--preset abba-fig2`` shrunk), batched (cells sharing method, configuration and
    shape in one solver call, repeated configurations one fit) against cell by cell,
    into two temporary folders, in this process; and that both give the same errors.
(f) stopping rule: one Figure 2 batch per iterative family (HiRA, HUT, SMoA: ALS; DoRA,
    α-LoRA: Adam; VeRA, LoKr: exact ALS), the four targets at 1000×1000 and the budget of
    rank-72 LoRA, fitted with every iteration run (``tol=1e-7``, the old default) and with
    the default rule (``fit.STOP``), in this process: time ratio, iterations, and the
    largest error change (the grid is held to 0.002).
(g) ABBA's error and gradient for L-BFGS through ΔW (``solvers.als_kr.dense_value_and_grad``,
    what the Figure 2 grid runs at 1000×1000 for every ABBA and LoHa cell): the written-out
    expression as it was (eight element-wise passes over m×n) against the fused one (four),
    and on a CPU the fused one against its row-blocked form (per target, 128 rows at a time,
    every intermediate in cache: what a CPU runs), four targets, r1 = r2 = 36: time per
    evaluation, ratios, and how far they disagree.
(h) L-BFGS's state (``solvers.lbfgs``: iterate, gradient, curvature pairs) in float64, as it
    was, against the factors' dtype (float32), the same Figure 2-sized problem as (g) from
    the same start for the same iterations: time per iteration, ratio, and the errors of both.
(i) one CPU thread, what each worker of the Figure 2 grid runs (1000×1000, four targets):
    the ALS families' error per sweep through ΔW (``als.rel_error(M, st.delta(p))``, as it
    was) against ``als.structure_error`` (row blocks, no ΔW), for HiRA (r = 72) and SMoA
    (K = 4, r_k = 18); DoRA's and α-LoRA's error and gradient (``solvers.rowscale``, r = 72)
    batched against row-blocked; an ALS B and A half-step at r = 4 (SMoA's r_k at the budget
    of rank 16) with the narrow factor on the left of the normal-equation products
    (``common.bmm``) against the plain product: time per call, ratios, largest differences.
(j) L-BFGS for ABBA with the Gauss-Newton H⁰ (``solvers.precondition``) against γ I, as
    it was: the four Figure 2 targets at 1000×1000, r1 = r2 = 36, both from ``lora-warm``
    for the same iterations (1000); per target the iteration at which the preconditioned
    run reaches the error the plain one ends at, and the time ratio to get there (what
    lets the grid run 600 preconditioned iterations where it ran 1000 plain ones).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import cli
import theory
from reconstruction import fit as F

from . import io as rio
from .solvers import adam as _adam
from .run import DTYPES


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], device: str, repeat: int = 3) -> float:
    """Best wall time of ``repeat`` calls (after one warm-up call)."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors created inside the mode that are alive at once.

    Every op's output storage is counted when it first appears and released when
    the last tensor on it is freed (weakref finalizers), so views are not counted
    twice. Tensors created before the mode (inputs, parameters) are not counted.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.total = 0
        self._refs: dict[int, list[int]] = {}  # storage ptr -> [n tensors, bytes]

    def _release(self, ptr: int) -> None:
        ent = self._refs.get(ptr)
        if ent is None:
            return
        ent[0] -= 1
        if ent[0] <= 0:
            self.live -= ent[1]
            del self._refs[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0]
                  if isinstance(a, torch.Tensor) and a.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                ptr = st.data_ptr()
                if ptr == 0:
                    continue
                ent = self._refs.get(ptr)
                if ent is None and ptr in inputs:  # a view of a tensor made outside the mode
                    continue
                if ent is None:
                    nb = st.nbytes()
                    self._refs[ptr] = [1, nb]
                    self.live += nb
                    self.total += nb
                    self.peak = max(self.peak, self.live)
                else:
                    ent[0] += 1
                weakref.finalize(t, self._release, ptr)
        return out


def peak_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak extra bytes allocated while ``fn`` runs (its result included)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return int(peak)
    with LiveBytes() as mode:
        out = fn()
        del out
    return int(mode.peak)


def _fit(method, M, cfg, *, solver, steps, w0, seed=0):
    return F.fit(method, M, cfg, w0=w0, solver=solver, steps=steps, seed=seed, tol=0.0)


def _solver_for_abba(prefer: str) -> str:
    have = F.solvers_for("abba")
    if prefer in have:
        return prefer
    return next(s for s in ("als", "adam") if s in have)


# --------------------------------------------------------------------------- #
# the four benchmarks
# --------------------------------------------------------------------------- #
def bench_batching(size: int, batch: int, rank: int, solver: str, steps: int, device: str,
                   dtype) -> dict:
    """(a) one batched fit of ``batch`` targets vs a loop of single fits."""
    from . import targets as T

    tgt = T.make_target("random", (size, size), batch, 0, dtype, device)
    w0 = T.base_weight(tgt, "gaussian", 0)
    abba = theory.get_method("abba")
    cfg = abba.config_for_rank(size, size, rank)
    solver = _solver_for_abba(solver)
    _fit("abba", tgt.M[:2], cfg, solver=solver, steps=2, w0=w0[:2])  # warm-up
    _sync(device)
    t = time.perf_counter()
    res = _fit("abba", tgt.M, cfg, solver=solver, steps=steps, w0=w0)
    _sync(device)
    t_batched = time.perf_counter() - t
    t = time.perf_counter()
    errs = []
    for b in range(batch):
        r = _fit("abba", tgt.M[b:b + 1], cfg, solver=solver, steps=steps, w0=w0[b:b + 1])
        errs.append(float(r.rel_error[0]))
    _sync(device)
    t_loop = time.perf_counter() - t
    same = max(abs(a - float(b)) for a, b in zip(errs, res.rel_error))
    # fit's small-problem rule: one CPU thread for at most F.SMALL entries in all
    nt = torch.get_num_threads() if torch.device(device).type == "cpu" else None
    threads = {k: (None if nt is None else 1 if e <= F.SMALL else nt)
               for k, e in (("batched", batch * size * size), ("loop", size * size))}
    return {"bench": "batching", "size": size, "batch": batch, "config": str(cfg),
            "solver": res.solver, "steps": steps, "batched_s": t_batched, "loop_s": t_loop,
            "ratio": t_loop / t_batched, "goal": 5.0, "max_error_gap": same,
            "threads": threads}


def matmul_gflops(size: int, device: str, dtype) -> float:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
    inner = max(1, int(2e9 // (2 * size**3)))  # about 2 GFLOP per timing: stable on a busy CPU

    def many():
        for _ in range(inner):
            a @ b

    t = timeit(many, device, repeat=7) / inner
    return 2 * size**3 / t / 1e9


def _als_steppers(M: Tensor, params: dict, w0: Tensor, cfg) -> dict[str, Callable[[], object]]:
    """One ALS sweep as a closure, for the Khatri-Rao ALS (the one ``fit`` uses for
    ABBA at this size) and for the generic ALS: each leaves what the next sweep
    needs (KR: the next P; generic: the error the stopping rule reads)."""
    from .fit import relative_error
    from .solvers import als as _als
    from .solvers import als_kr as _kr
    from .solvers.common import structure

    meth = theory.get_method("abba")
    st = structure(meth, params, w0, cfg)
    out = {}
    if _kr.applies(st, params, M.shape[-2], M.shape[-1]):
        sol = _kr.KRALS(M, st.scale)
        state = {"prep": sol.prepare(params)}

        def kr_step():
            new, _e = sol.sweep(state["prep"])
            state["prep"] = sol.prepare(new, err=False)

        out["als (Khatri-Rao)"] = kr_step
    order = _als.sweep_order(st, params)
    active = torch.ones(M.shape[0], dtype=torch.bool, device=M.device)
    gstate = {"p": dict(params)}

    def generic_step():
        gstate["p"] = _als.als_sweep(st, M, gstate["p"], order, active)
        relative_error(M.double(), st.delta(gstate["p"]).double())

    out["als (generic)"] = generic_step
    return out


def bench_step_gflops(size: int, rank: int, solvers: dict[str, tuple[int, int]], device: str,
                      dtype) -> dict:
    """(b) GFLOP/s of one solver step vs torch's matmul, for each solver.

    ALS: one sweep timed directly (best of 3 runs of 10 sweeps, after warm-up), for
    the Khatri-Rao ALS and the generic one. Adam: the difference of two fits with
    ``solvers['adam'] = (k1, k2)`` steps (init and set-up cancel)."""
    from torch.utils.flop_counter import FlopCounterMode

    from . import targets as T

    tgt = T.make_target("random", (size, size), 1, 0, dtype, device)
    w0 = T.base_weight(tgt, "gaussian", 0)
    cfg = theory.get_method("abba").config_for_rank(size, size, rank)
    mm = matmul_gflops(size, device, dtype)
    rows = []
    if "als" in solvers and "als" in F.solvers_for("abba"):
        start = _fit("abba", tgt.M, cfg, solver="als", steps=2, w0=w0).params
        for name, step in _als_steppers(tgt.M, start, w0, cfg).items():
            step()
            with FlopCounterMode(display=False) as fc:
                step()
            f_step = fc.get_total_flops()
            t_step = timeit(lambda step=step: [step() for _ in range(10)], device, 3) / 10
            rows.append({"solver": name, "flop_per_step": f_step, "seconds_per_step": t_step,
                         "step_gflops": f_step / t_step / 1e9, "ratio": f_step / t_step / 1e9 / mm})
    if "adam" in solvers:
        k1, k2 = solvers["adam"]

        def run(k):
            return _fit("abba", tgt.M, cfg, solver="adam", steps=k, w0=w0)

        def flops(k):
            with FlopCounterMode(display=False) as fc:
                r = run(k)
            return fc.get_total_flops(), r.steps

        (f1, s1), (f2, s2) = flops(k1), flops(k2)
        t1 = timeit(lambda: run(k1), device, 3)
        t2 = timeit(lambda: run(k2), device, 3)
        t_step = (t2 - t1) / max(s2 - s1, 1)
        if s2 <= s1:
            rows.append({"solver": "adam", "note": f"the fit stopped early ({s1}, {s2} steps)"})
        elif t_step <= 0:
            rows.append({"solver": "adam", "note": "timing noise larger than the steps' cost"})
        else:
            f_step = (f2 - f1) / (s2 - s1)
            rows.append({"solver": "adam", "flop_per_step": f_step, "seconds_per_step": t_step,
                         "step_gflops": f_step / t_step / 1e9, "ratio": f_step / t_step / 1e9 / mm})
    ok = [r["ratio"] for r in rows if "ratio" in r]
    return {"bench": "step_gflops", "size": size, "config": str(cfg), "matmul_gflops": mm,
            "rows": rows, "ratio": max(ok) if ok else None, "goal": 0.5}


def _time_to(history: list[float], seconds: float, level: float) -> float | None:
    for i, e in enumerate(history):
        if e <= level:
            return seconds * i / max(len(history) - 1, 1)  # history[0] = the start
    return None


def bench_als_vs_adam(size: int, rank: int, als_steps: int, adam_steps: int, device: str,
                      dtype, lbfgs_steps: int | None = None) -> dict:
    """(c) time for ALS and Adam (and L-BFGS) to reach 1.01× the best error of ALS and Adam."""
    from . import targets as T

    if "als" not in F.solvers_for("abba") or "adam" not in F.solvers_for("abba"):
        return {"bench": "als_vs_adam", "skipped": "abba lacks als or adam"}
    tgt = T.make_target("random", (size, size), 1, 0, dtype, device)
    w0 = T.base_weight(tgt, "gaussian", 0)
    cfg = theory.get_method("abba").config_for_rank(size, size, rank)
    runs = [("als", als_steps), ("adam", adam_steps)]
    if lbfgs_steps and "lbfgs" in F.solvers_for("abba"):
        runs.append(("lbfgs", lbfgs_steps))
    res = {s: _fit("abba", tgt.M, cfg, solver=s, steps=k, w0=w0) for s, k in runs}
    # the level: 1.01× the best of ALS and Adam (L-BFGS is timed to the same level)
    best = min(min(r.history) if r.history else float(r.rel_error.mean())
               for s, r in res.items() if s != "lbfgs")
    level = 1.01 * best
    t = {s: _time_to(r.history, r.seconds, level) for s, r in res.items()}
    out = {"bench": "als_vs_adam", "size": size, "config": str(cfg), "best_error": best,
           "level": level, "goal": 10.0, "solvers": list(res)}
    for s, r in res.items():
        out[f"{s}_steps"] = r.steps
        out[f"{s}_seconds"] = r.seconds
        out[f"{s}_final"] = float(r.rel_error.mean())
        out[f"{s}_time_to_level"] = t[s]
    if t["als"] is None:
        out["ratio"] = None
        out["note"] = "ALS did not reach the level"
    elif t["adam"] is None:
        out["ratio"] = res["adam"].seconds / t["als"]
        out["note"] = f"Adam did not reach the level in {res['adam'].steps} steps: ratio is a lower bound"
    else:
        out["ratio"] = t["adam"] / t["als"]
    if "lbfgs" in res and t["lbfgs"] is not None:
        adam_t = res["adam"].seconds if t["adam"] is None else t["adam"]  # a lower bound if None
        out["lbfgs_ratio"] = adam_t / max(t["lbfgs"], 1e-12)
    return out


def bench_forward(size: int, tokens: list[int], rank: int, device: str, dtype,
                  repeat: int = 3) -> dict:
    """(d) ABBA Khatri-Rao forward vs forming ΔW: peak memory and time per token count."""
    abba = theory.get_method("abba")
    cfg = abba.config_for_rank(size, size, rank)
    g = torch.Generator().manual_seed(0)
    w0 = (torch.randn(size, size, generator=g) / size**0.5).to(device=device, dtype=dtype)
    params = abba.init(w0, cfg, 0, scheme="gaussian")
    rows = []
    with torch.no_grad():
        for t in tokens:
            x = torch.randn(t, size, generator=g).to(device=device, dtype=dtype)

            def kr(x=x):
                return abba.forward(x, params, w0, cfg)

            def dense(x=x):
                return x @ (w0 + abba.delta(params, w0, cfg)).mT

            err = float((kr() - dense()).abs().max() / dense().abs().max().clamp_min(1e-30))
            rows.append({
                "tokens": t,
                "kr_bytes": peak_bytes(kr, device), "dense_bytes": peak_bytes(dense, device),
                "kr_s": timeit(kr, device, repeat), "dense_s": timeit(dense, device, repeat),
                "max_rel_diff": err,
            })
    return {"bench": "forward", "size": size, "config": str(cfg), "rows": rows}


def bench_sweep(size: int, ranks: list[int], device: str, dtype, steps: int | None = None) -> dict:
    """(e) the sweep's throughput, batched against cell by cell (same grid, same process;
    ``steps``: the solvers' iterations, None = the sweep's defaults)."""
    import tempfile
    from pathlib import Path

    from . import cells as C
    from .sweep import Grid, run_sweep

    name = {torch.float32: "float32", torch.float64: "float64"}[dtype]
    grid = Grid(methods=theory.available(), ranks=ranks, targets=["orthogonal", "lowrank",
                "sparse", "random"], seeds=[0], conventions=["equal", "published"],
                shape=(size, size), dtype=name, device=device, steps=steps)
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for mode in ("cell_by_cell", "batched"):
            C.clear_caches()  # each mode makes its own targets and singular values
            t = time.perf_counter()
            res = run_sweep(grid, Path(d) / mode, figure=False, batched=mode == "batched")
            out[mode] = (time.perf_counter() - t, res)
    (t_one, one), (t_bat, bat) = out["cell_by_cell"], out["batched"]
    n = one["total"]
    gap = max((abs(a["rel_error"] - b["rel_error"]) for a, b in zip(one["rows"], bat["rows"])),
              default=0.0)
    return {"bench": "sweep", "size": size, "ranks": ranks, "steps": steps, "cells": n,
            "batches": bat["batches"], "cell_by_cell_s": t_one, "batched_s": t_bat,
            "cell_by_cell_per_min": 60 * n / t_one, "batched_per_min": 60 * n / t_bat,
            "ratio": t_one / t_bat, "max_error_gap": gap,
            "failed": len(one["errors"]) + len(bat["errors"])}


STOP_FAMILIES = ("hira", "hut", "smoa", "dora", "alpha_lora", "vera", "lokr")


def bench_stopping(size: int, rank: int, device: str, dtype,
                   methods: tuple[str, ...] = STOP_FAMILIES) -> dict:
    """(f) every iteration (tol 1e-7) against the default stopping rule, per family, on the
    four Figure 2 targets with their W0 stand-ins (seed 0); for the Adam families also
    the rule with the stopped targets kept in the batch (``solvers.adam.COMPACT``)."""
    from . import cells as C
    from .run import config_for

    name = {torch.float32: "float32", torch.float64: "float64"}[dtype]
    got = [C._target(t, size, size, 1, 0, name, device, "gaussian")
           for t in ("orthogonal", "lowrank", "sparse", "random")]
    M = torch.cat([g[0].M for g in got])  # (4, size, size)
    w0 = torch.cat([g[1] for g in got])
    rows = []
    for meth in methods:
        cfg = config_for(theory.get_method(meth), size, size, rank, "equal")[0]
        row = {"method": meth, "config": str(cfg)}
        modes = [("all", 1e-7, True), ("rule", None, True)]
        if F.auto_solver(meth, cfg, size, size) == "adam":  # stopped targets kept in the batch
            modes.insert(1, ("rule, uncut", None, False))
        for tag, tol, cut in modes:
            _sync(device)
            t = time.perf_counter()
            was, _adam.COMPACT = _adam.COMPACT, cut
            try:
                res = F.fit(meth, M, cfg, w0=w0, seed=[0] * 4, dtype=dtype, device=device, tol=tol)
            finally:
                _adam.COMPACT = was
            _sync(device)
            row[tag] = {"seconds": time.perf_counter() - t, "solver": res.solver,
                        "steps": res.steps_per_target.tolist(), "errors": res.rel_error.tolist()}
        row["ratio"] = row["all"]["seconds"] / max(row["rule"]["seconds"], 1e-12)
        if "rule, uncut" in row:
            row["cut_ratio"] = row["rule, uncut"]["seconds"] / max(row["rule"]["seconds"], 1e-12)
        row["max_error_change"] = max(a - b for a, b in zip(row["rule"]["errors"], row["all"]["errors"]))
        rows.append(row)
    return {"bench": "stopping", "size": size, "rank": rank, "rows": rows}


def _plain_dense_value_and_grad(M: Tensor, s: float):
    """(g)'s baseline: the same error and gradient as ``als_kr.dense_value_and_grad``,
    written as before it was fused (R = s P1 ⊙ P2 − M, ‖R‖² summed in float64, the
    gradient weight applied to R)."""
    nrm = M.pow(2).sum((-2, -1), dtype=torch.float64).clamp_min(1e-300)
    w = (2 * s / nrm).to(M.dtype)[:, None, None]

    def fn(p):
        B1, A1, B2, A2 = p["B1"], p["A1"], p["B2"], p["A2"]
        P1, P2 = B1 @ A1, B2 @ A2
        R = s * (P1 * P2) - M
        e = (R * R).sum((-2, -1), dtype=torch.float64) / nrm
        G = R.mul_(w)
        G2, G1 = G * P1, G.mul_(P2)
        return e, {"B1": G1 @ A1.mT, "A1": B1.mT @ G1, "B2": G2 @ A2.mT, "A2": B2.mT @ G2}

    return fn


def bench_dense_gradient(size: int, r: int, device: str, dtype, batch: int = 4) -> dict:
    """(g) the plain, the fused batched and (on a CPU) the row-blocked dense ABBA
    error-and-gradient, same inputs."""
    from .solvers import als_kr as _kr
    from .solvers.common import structure

    g = torch.Generator().manual_seed(0)
    M = torch.randn(batch, size, size, generator=g).to(device=device, dtype=dtype)
    meth = theory.get_method("abba")
    cfg = meth.config(r1=r, r2=r)
    p = {k: v.to(device=device, dtype=dtype) for k, v in
         meth.init(torch.zeros(batch, size, size, dtype=torch.float64), cfg, 0, "gaussian").items()}
    st = structure(meth, p, None, cfg)
    fns = {"plain": _plain_dense_value_and_grad(M, float(cfg.scale)),
           "fused": _kr.dense_value_and_grad(M, st, row_block=None)}
    if torch.device(device).type == "cpu":
        fns["blocked"] = _kr.dense_value_and_grad(M, st)
    out = {name: fn(p) for name, fn in fns.items()}
    times = {name: timeit(lambda fn=fn: fn(p), device, repeat=10) for name, fn in fns.items()}
    e0, g0 = out["plain"]
    row = {"bench": "dense_gradient", "size": size, "r": r, "batch": batch,
           "plain_s": times["plain"], "fused_s": times["fused"],
           "ratio": times["plain"] / max(times["fused"], 1e-12),
           "error_rel_diff": max(float(((e - e0).abs() / e0).max()) for e, _ in out.values()),
           "grad_rel_diff": max(float((gr[k] - g0[k]).abs().max() / g0[k].abs().max())
                                for _, gr in out.values() for k in g0)}
    if "blocked" in times:
        row["blocked_s"] = times["blocked"]
        row["blocked_ratio"] = times["fused"] / max(times["blocked"], 1e-12)
    return row


def bench_blocked(size: int, device: str, dtype, batch: int = 4) -> dict:
    """(i) the one-thread evaluations, each against what it replaced, same inputs."""
    from .solvers import als as _als
    from .solvers import common as _common
    from .solvers import rowscale as _rs
    from .solvers.common import Structure, Term

    if torch.device(device).type != "cpu":
        return {"bench": "blocked", "skipped": "CPU only (a GPU runs the batched expressions)"}
    old_threads = torch.get_num_threads()
    g = torch.Generator().manual_seed(0)
    M = torch.randn(batch, size, size, generator=g).to(dtype)
    W0 = (torch.randn(batch, size, size, generator=g) / size ** 0.5).to(dtype)
    rows = []
    try:
        torch.set_num_threads(1)

        def pair(r):
            return {"B": torch.randn(batch, size, r, generator=g).to(dtype),
                    "A": torch.randn(batch, r, size, generator=g).to(dtype)}

        smoa = {}
        for k in range(4):
            smoa.update({f"B{k}": torch.randn(batch, size, 18, generator=g).to(dtype),
                         f"A{k}": torch.randn(batch, 18, size, generator=g).to(dtype)})
        for name, st, p in (("HiRA r=72 error", Structure([Term([("B", "A")], W0)], 1.0), pair(72)),
                            ("SMoA K=4 r_k=18 error",
                             Structure([Term([(f"B{k}", f"A{k}")], W0 * (k + 1)) for k in range(4)], 1.0),
                             smoa)):
            a = _als.rel_error(M, st.delta(p))
            b = _als.structure_error(st, M, p)
            ta = timeit(lambda: _als.rel_error(M, st.delta(p)), device, repeat=5)
            tb = timeit(lambda: _als.structure_error(st, M, p), device, repeat=5)
            rows.append((name, ta, tb, float(((a - b) / a).abs().max())))
        cfg = type("Cfg", (), {"scale": 1.0})()
        for mname in ("dora", "alpha_lora"):
            meth = theory.get_method(mname)
            _, v_name = meth.row_form
            bn, an = meth.lora_term
            p = {bn: 0.01 * torch.randn(batch, size, 72, generator=g).to(dtype),
                 an: torch.randn(batch, 72, size, generator=g).to(dtype),
                 v_name: torch.linalg.vector_norm(W0, dim=-1)}
            torch.set_num_threads(2)  # the batched expression is what several threads build
            batched = _rs.value_and_grad(meth, M, W0, cfg)
            torch.set_num_threads(1)
            blocked = _rs.value_and_grad(meth, M, W0, cfg)
            (ea, ga), (eb, gb) = batched(p), blocked(p)
            diff = max([float(((ea - eb) / ea).abs().max())]
                       + [float((ga[k] - gb[k]).norm() / ga[k].norm().clamp_min(1e-30)) for k in ga])
            rows.append((f"{mname} r=72 error+gradient", timeit(lambda: batched(p), device, repeat=5),
                         timeit(lambda: blocked(p), device, repeat=5), diff))
        r = 4
        T, C = M, W0 * size ** 0.5
        C2, CT = C * C, C * T
        A = torch.linalg.qr(torch.randn(batch, size, r, generator=g).to(dtype))[0].mT.contiguous()
        B = torch.randn(batch, size, r, generator=g).to(dtype)

        def half_steps():
            x = _als._row_solve(T, C, A, B, 1.0, C2=C2, CT=CT)
            y = _als._row_solve(T.mT, C.mT, B.mT, A.mT, 1.0, C2=C2.mT, CT=CT.mT)
            return x, y

        narrow = _common.bmm

        def plain(X, Y):
            if Y.shape[-1] == 1 and Y.shape[-2] > 1:
                return narrow(X, Y)
            return X @ Y

        try:
            _common.bmm = _als.bmm = plain
            xa, ya = half_steps()
            ta = timeit(half_steps, device, repeat=5)
        finally:
            _common.bmm = _als.bmm = narrow
        xb, yb = half_steps()
        tb = timeit(half_steps, device, repeat=5)
        diff = max(float((xa - xb).norm() / xa.norm()), float((ya - yb).norm() / ya.norm()))
        rows.append(("ALS half-steps r=4 (narrow-left products)", ta, tb, diff))
    finally:
        torch.set_num_threads(old_threads)
    return {"bench": "blocked", "size": size, "batch": batch,
            "rows": [{"what": w, "before_s": a, "after_s": b, "ratio": a / max(b, 1e-12), "max_rel_diff": d}
                     for w, a, b, d in rows]}


def bench_lbfgs_state(size: int, r: int, iters: int, device: str, dtype, batch: int = 4) -> dict:
    """(h) L-BFGS with a float64 state against one in the factors' dtype, same start."""
    from .solvers import als_kr as _kr
    from .solvers.common import structure
    from .solvers.lbfgs import run_lbfgs

    g = torch.Generator().manual_seed(0)
    M = torch.randn(batch, size, size, generator=g).to(device=device, dtype=dtype)
    M = M / M.pow(2).mean((-2, -1), keepdim=True).sqrt()
    meth = theory.get_method("abba")
    cfg = meth.config(r1=r, r2=r)
    p0 = {k: v.to(device=device, dtype=dtype) for k, v in
          meth.init(torch.zeros(batch, size, size, dtype=torch.float64), cfg, 0, "gaussian").items()}
    vg = _kr.dense_value_and_grad(M, structure(meth, p0, None, cfg))
    row = {"bench": "lbfgs_state", "size": size, "r": r, "batch": batch, "iters": iters,
           "dtype": str(dtype).replace("torch.", "")}
    for name, sd in (("float64", torch.float64), ("factors", None)):
        _sync(device)
        t = time.perf_counter()
        _p, hist, _k, _d = run_lbfgs(meth, M, None, cfg, p0, steps=iters, tol=0.0,
                                     value_and_grad=vg, state_dtype=sd)
        _sync(device)
        row[name] = {"seconds": time.perf_counter() - t, "errors": [float(e) for e in hist[-1]]}
    row["ratio"] = row["float64"]["seconds"] / max(row["factors"]["seconds"], 1e-12)
    row["max_error_diff"] = max(abs(a - b) for a, b in zip(row["float64"]["errors"],
                                                           row["factors"]["errors"]))
    return row


def bench_precondition(size: int, r: int, iters: int, device: str, dtype) -> dict:
    """(j) L-BFGS with the Gauss-Newton H⁰ against γ I, same targets, start and iterations."""
    from .targets import make_target

    M = torch.cat([make_target(k, (size, size), seed=0).M for k in _FIG2_TARGETS])
    M = M.to(device=device, dtype=dtype)
    cfg = theory.get_method("abba").config(r1=r, r2=r)
    kw = dict(solver="lbfgs", init="lora-warm", tol=0.0)
    F.fit("abba", M, cfg, steps=1, **kw)  # the start's decomposition is remembered: paid once
    row = {"bench": "precondition", "size": size, "r": r, "iters": iters, "batch": M.shape[0]}
    for name, pre in (("plain", False), ("gauss_newton", True)):
        _sync(device)
        t = time.perf_counter()
        res = F.fit("abba", M, cfg, steps=iters, precondition=pre, **kw)
        _sync(device)
        row[name] = {"seconds": time.perf_counter() - t, "errors": [float(e) for e in res.rel_error],
                     "history": res.history_per_target}
    H = row["gauss_newton"].pop("history")  # (iters + 1, b)
    row["plain"].pop("history")
    goal = torch.tensor(row["plain"]["errors"], dtype=H.dtype)
    reached = H <= goal  # (iters + 1, b)
    row["iters_to_plain_final"] = [int(reached[:, t].nonzero()[0]) if bool(reached[:, t].any()) else None
                                   for t in range(H.shape[1])]
    if all(k is not None for k in row["iters_to_plain_final"]):
        k = max(row["iters_to_plain_final"])  # the batch runs until its last target gets there
        row["ratio"] = row["plain"]["seconds"] / max(row["gauss_newton"]["seconds"] * k / iters, 1e-12)
    return row


_FIG2_TARGETS = ("orthogonal", "lowrank", "sparse", "random")


def bench_modulated(size: int, rank: int, device: str, dtype) -> dict:
    """(k) the modulated updates (SMoA, HiRA, HUT) at the budget of rank-``rank`` LoRA:
    ALS (200 sweeps, its stopping rule) against 5 ALS sweeps + preconditioned L-BFGS
    (``fit._run_modulated``, its stopping rule), same targets and W0, each fit's defaults."""
    from .run import config_for, load_w0
    from .targets import make_target

    tg = [make_target(k, (size, size), seed=0) for k in _FIG2_TARGETS]
    M = torch.cat([t.M for t in tg]).to(device=device, dtype=dtype)
    w0 = torch.cat([load_w0("gaussian", t, 0, dtype, device)[0] for t in tg])
    rows = []
    for name in ("smoa", "hira", "hut"):
        meth = theory.get_method(name)
        cfg, _ = config_for(meth, size, size, rank, "equal", strict=False)  # the sweep's config
        row = {"method": name, "config": str(cfg)}
        for solver in ("als", "lbfgs"):
            _sync(device)
            t = time.perf_counter()
            res = F.fit(name, M, cfg, w0=w0, solver=solver)
            _sync(device)
            row[solver] = {"seconds": time.perf_counter() - t, "errors": [float(e) for e in res.rel_error],
                           "steps": [int(k) for k in res.steps_per_target]}
        row["ratio"] = row["als"]["seconds"] / max(row["lbfgs"]["seconds"], 1e-12)
        row["lower"] = sum(a <= b for a, b in zip(row["lbfgs"]["errors"], row["als"]["errors"]))
        rows.append(row)
    return {"bench": "modulated", "size": size, "rank": rank, "batch": M.shape[0], "rows": rows}


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #
SIZES = {
    # (a) size, batch, steps; (b) size, {solver: step counts}; (c) size, ALS, Adam steps;
    # (d) size, token counts; (e) size, ranks, iterations (None: the sweep's defaults);
    # (f) size, LoRA-rank budget; (g) size, r; (h) size, r, iterations; (i) size;
    # (j) size, r, iterations; (k) size, LoRA-rank budget
    "full": dict(a=(256, 64, {"als": 20, "adam": 200}),
                 b=(1024, {"als": (), "adam": (20, 220)}),
                 c=(256, 60, 3000, 300),
                 d=(4096, [1, 8, 64, 512, 4096]),
                 e=(256, [8, 16], None),
                 f=(1000, 72),
                 g=(1000, 36),
                 h=(1000, 36, 100),
                 i=(1000,),
                 j=(1000, 36, 1000),
                 k=(1000, 72)),
    "quick": dict(a=(64, 16, {"als": 5, "adam": 50}),
                  b=(192, {"als": (), "adam": (10, 110)}),
                  c=(64, 30, 1500, 150),
                  d=(512, [1, 64, 512]),
                  e=(40, [3, 6], 40),
                  f=(48, 6),
                  g=(96, 8),
                  h=(96, 8, 40),
                  i=(160,),
                  j=(96, 6, 120),
                  k=(96, 8)),
}


def _mb(b: int) -> str:
    return f"{b / 2**20:.2f} MiB"


def report(results: list[dict]) -> str:
    lines = []
    for r in results:
        if r.get("skipped"):
            lines.append(f"({r['bench']}) skipped: {r['skipped']}")
            continue
        if r["bench"] == "batching":
            lines.append(
                f"(a) batched fit of {r['batch']} targets {r['size']}×{r['size']} (abba {r['config']}, "
                f"{r['solver']}, {r['steps']} steps): batched {r['batched_s']:.2f}s, loop "
                f"{r['loop_s']:.2f}s -> ratio {r['ratio']:.1f}× (goal >= {r['goal']:g}×; "
                f"max error gap {r['max_error_gap']:.1e})"
                + (f"; CPU threads: batched {r['threads']['batched']}, loop {r['threads']['loop']} "
                   f"per fit" if r.get("threads", {}).get("loop") else ""))
        elif r["bench"] == "step_gflops":
            for x in r["rows"]:
                if "note" in x:
                    lines.append(f"(b) one {x['solver']} step at {r['size']}×{r['size']}: {x['note']}")
                    continue
                lines.append(
                    f"(b) one {x['solver']} step at {r['size']}×{r['size']} (abba {r['config']}): "
                    f"{x['flop_per_step'] / 1e9:.3f} GFLOP (matmul-type, counted) in "
                    f"{x['seconds_per_step'] * 1e3:.1f} ms = {x['step_gflops']:.1f} GFLOP/s; torch "
                    f"matmul {r['matmul_gflops']:.1f} GFLOP/s -> ratio {100 * x['ratio']:.1f}% "
                    f"(goal >= {100 * r['goal']:.0f}%)")
        elif r["bench"] == "als_vs_adam":
            ta = r["als_time_to_level"]
            td = r["adam_time_to_level"]
            ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.1f}×"
            lines.append(
                f"(c) time to 1.01× best error ({r['best_error']:.4f}) at {r['size']}×{r['size']} "
                f"(abba {r['config']}): ALS {'never' if ta is None else f'{ta:.2f}s'} "
                f"({r['als_steps']} steps, final {r['als_final']:.4f}), Adam "
                f"{'never' if td is None else f'{td:.2f}s'} ({r['adam_steps']} steps, final "
                f"{r['adam_final']:.4f}) -> ALS faster by {ratio} (goal >= {r['goal']:g}×)"
                + (f"; {r['note']}" if r.get("note") else ""))
            if "lbfgs_steps" in r:
                tl = r["lbfgs_time_to_level"]
                lines.append(
                    f"    L-BFGS {'never' if tl is None else f'{tl:.2f}s'} ({r['lbfgs_steps']} "
                    f"iterations, final {r['lbfgs_final']:.4f})"
                    + (f" -> faster than Adam by {r['lbfgs_ratio']:.1f}×" if "lbfgs_ratio" in r else ""))
        elif r["bench"] == "sweep":
            lines.append(
                f"(e) sweep of {r['cells']} cells ({r['size']}×{r['size']}, every method, ranks "
                f"{','.join(map(str, r['ranks']))}, both conventions, 4 targets, "
                f"{'default iterations' if r['steps'] is None else str(r['steps']) + ' iterations'}): batched "
                f"{r['batched_per_min']:.1f} cells/min ({r['batched_s']:.1f}s, {r['batches']} "
                f"batches), cell by cell {r['cell_by_cell_per_min']:.1f} cells/min "
                f"({r['cell_by_cell_s']:.1f}s) -> ratio {r['ratio']:.2f}× (max error gap "
                f"{r['max_error_gap']:.1e}, {r['failed']} failed)")
        elif r["bench"] == "stopping":
            lines.append(f"(f) stopping rule, one batch per family ({r['size']}×{r['size']}, 4 targets, "
                         f"rank-{r['rank']} budget): every iteration vs the default rule")
            for x in r["rows"]:
                a, b = x["all"], x["rule"]
                lines.append(
                    f"    {x['method']:<10} {a['solver']:<5} {a['seconds']:7.1f}s -> {b['seconds']:7.1f}s "
                    f"({x['ratio']:.2f}×), iterations {min(a['steps'])}-{max(a['steps'])} -> "
                    f"{min(b['steps'])}-{max(b['steps'])}, largest error change {x['max_error_change']:+.5f}")
                if "cut_ratio" in x:
                    u = x["rule, uncut"]
                    lines.append(f"    {'':<10} {'':<5} stopped targets kept in the batch {u['seconds']:7.1f}s, "
                                 f"cut out {b['seconds']:7.1f}s ({x['cut_ratio']:.2f}×; errors differ by "
                                 f"{max(abs(p - q) for p, q in zip(u['errors'], b['errors'])):.1e})")
        elif r["bench"] == "dense_gradient":
            lines.append(
                f"(g) ABBA error + gradient through ΔW ({r['size']}×{r['size']}, {r['batch']} targets, "
                f"r1 = r2 = {r['r']}): plain {r['plain_s'] * 1e3:.2f} ms, fused {r['fused_s'] * 1e3:.2f} ms "
                f"per evaluation ({r['ratio']:.2f}×)"
                + (f", row-blocked {r['blocked_s'] * 1e3:.2f} ms ({r['blocked_ratio']:.2f}× the fused)"
                   if "blocked_s" in r else "")
                + f"; largest relative difference: error {r['error_rel_diff']:.1e}, "
                f"gradient {r['grad_rel_diff']:.1e}")
        elif r["bench"] == "lbfgs_state":
            a, b = r["float64"], r["factors"]
            lines.append(
                f"(h) L-BFGS state ({r['size']}×{r['size']}, {r['batch']} targets, ABBA r1 = r2 = "
                f"{r['r']}, {r['iters']} iterations, factors {r['dtype']}): float64 "
                f"{a['seconds'] / r['iters'] * 1e3:.1f} ms, {r['dtype']} {b['seconds'] / r['iters'] * 1e3:.1f} ms "
                f"per iteration ({r['ratio']:.2f}×); errors {', '.join(f'{e:.4f}' for e in a['errors'])} "
                f"vs {', '.join(f'{e:.4f}' for e in b['errors'])} (largest difference "
                f"{r['max_error_diff']:.1e})")
        elif r["bench"] == "blocked":
            if "skipped" in r:
                lines.append(f"(i) one-thread evaluations: skipped, {r['skipped']}")
                continue
            lines.append(f"(i) one CPU thread, {r['size']}×{r['size']}, {r['batch']} targets: before -> after "
                         "per call")
            for x in r["rows"]:
                lines.append(f"    {x['what']:<42} {x['before_s'] * 1e3:8.1f} ms -> {x['after_s'] * 1e3:7.1f} ms "
                             f"({x['ratio']:.2f}×; largest relative difference {x['max_rel_diff']:.1e})")
        elif r["bench"] == "precondition":
            a, b = r["plain"], r["gauss_newton"]
            its = ", ".join("never" if k is None else str(k) for k in r["iters_to_plain_final"])
            lines.append(
                f"(j) L-BFGS for ABBA ({r['size']}×{r['size']}, {r['batch']} Figure 2 targets, r1 = r2 = "
                f"{r['r']}, lora-warm, {r['iters']} iterations): γ I {a['seconds']:.1f}s, errors "
                f"{', '.join(f'{e:.4f}' for e in a['errors'])}; Gauss-Newton H⁰ {b['seconds']:.1f}s, errors "
                f"{', '.join(f'{e:.4f}' for e in b['errors'])}; the plain run's final errors reached at "
                f"iteration {its}"
                + (f" -> {r['ratio']:.2f}× less time to them" if "ratio" in r else ""))
        elif r["bench"] == "modulated":
            lines.append(f"(k) modulated updates, {r['size']}×{r['size']}, {r['batch']} Figure 2 targets, "
                         f"the budget of LoRA r = {r['rank']}: ALS against ALS warm-up + L-BFGS with H⁰")
            for x in r["rows"]:
                a, b = x["als"], x["lbfgs"]
                lines.append(f"    {x['method']:<5} {x['config']:<22} ALS {a['seconds']:6.1f}s "
                             f"({', '.join(f'{e:.4f}' for e in a['errors'])}); L-BFGS {b['seconds']:6.1f}s "
                             f"({', '.join(f'{e:.4f}' for e in b['errors'])}): {x['ratio']:.2f}× ALS's speed, "
                             f"lower or equal on {x['lower']} of {len(a['errors'])}")
        elif r["bench"] == "forward":
            lines.append(f"(d) ABBA forward at {r['size']}×{r['size']} (abba {r['config']}): "
                         "Khatri-Rao vs forming ΔW")
            head = f"    {'tokens':>6}  {'KR peak':>12}  {'dense peak':>12}  {'mem ratio':>9}  " \
                   f"{'KR time':>9}  {'dense time':>10}  {'speedup':>7}"
            lines.append(head)
            for row in r["rows"]:
                lines.append(
                    f"    {row['tokens']:>6}  {_mb(row['kr_bytes']):>12}  {_mb(row['dense_bytes']):>12}  "
                    f"{row['dense_bytes'] / max(row['kr_bytes'], 1):>8.1f}×  "
                    f"{row['kr_s'] * 1e3:>7.2f}ms  {row['dense_s'] * 1e3:>8.2f}ms  "
                    f"{row['dense_s'] / row['kr_s']:>6.1f}×")
    return "\n".join(lines)


def build_parser() -> cli.Parser:
    ap = cli.Parser(prog="python -m reconstruction.bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    ap.add_argument("--only", default="abcdeghijk",
                    help="which benchmarks, e.g. 'ae' (default abcdeghijk; f, the stopping rule at "
                         "1000×1000, about half an hour on 2 cores, only when asked)")
    ap.add_argument("--solver", choices=("als", "adam", "both"), default="both",
                    help="solver(s) for (a) (default both)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--rank", type=cli.positive_int, default=16, help="LoRA-rank budget (default 16)")
    ap.add_argument("--json", metavar="PATH", help="also write the measurements as JSON")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def work():
        device = cli.check_device(args.device)
        dtype = DTYPES[args.dtype]
        bad = set(args.only) - set("abcdefghijk")
        if bad or not args.only:
            raise ValueError(f"--only takes letters from 'abcdefghijk', got {args.only!r}")
        cli.check_writable_file(args.json, "--json")
        S = SIZES["quick" if args.quick else "full"]
        smallest = min(v[0] for k, v in S.items() if k in args.only)
        if args.rank > smallest:
            raise ValueError(f"--rank {args.rank} is above the smallest size used ({smallest})")
        big = max(v[0] for k, v in S.items() if k in args.only)
        cli.check_memory(3 * 64 * big * big * torch.finfo(dtype).bits // 8 if "a" in args.only
                         else 16 * big * big * torch.finfo(dtype).bits // 8,
                         f"the {'quick' if args.quick else 'full'} benchmarks", device,
                         hint="use --quick or --only")
        print(f"reconstruction bench ({'quick' if args.quick else 'full'}) on {device}, "
              f"{args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads",
              flush=True)
        results = []
        solvers_a = S["a"][2] if args.solver == "both" else {args.solver: S["a"][2][args.solver]}
        todo = {
            "a": lambda: [bench_batching(*S["a"][:2], args.rank, s, k, device, dtype)
                          for s, k in solvers_a.items()],
            "b": lambda: bench_step_gflops(S["b"][0], args.rank, S["b"][1], device, dtype),
            "c": lambda: bench_als_vs_adam(S["c"][0], args.rank, S["c"][1], S["c"][2], device,
                                           dtype, lbfgs_steps=S["c"][3]),
            "d": lambda: bench_forward(S["d"][0], S["d"][1], args.rank, device, dtype),
            "e": lambda: bench_sweep(S["e"][0], S["e"][1], device, dtype, steps=S["e"][2]),
            "f": lambda: bench_stopping(S["f"][0], S["f"][1], device, dtype),
            "g": lambda: bench_dense_gradient(*S["g"], device, dtype),
            "h": lambda: bench_lbfgs_state(*S["h"], device, dtype),
            "i": lambda: bench_blocked(*S["i"], device, dtype),
            "j": lambda: bench_precondition(*S["j"], device, dtype),
            "k": lambda: bench_modulated(*S["k"], device, dtype),
        }
        for k in "abcdefghijk":
            if k in args.only:
                got = todo[k]()
                got = got if isinstance(got, list) else [got]
                results += got
                print(report(got), flush=True)
                if args.json:  # after each benchmark: an interruption keeps the ones done
                    rio.write_json(args.json, {"device": device, "dtype": args.dtype,
                                               "quick": args.quick, "results": results})

    return cli.run(work, interrupted="the benchmarks finished so far are in --json (if given)")


if __name__ == "__main__":
    raise SystemExit(main())
