"""The cells of a sweep, grouped into batches that are fitted in one solver call: the
task ``reconstruction.sweep`` runs in its own process or as a Ray task.

A *cell* is one point of the grid (target, seed, method, rank, convention, ...). Cells
that share method, configuration, shape and fit options form a *batch*: their distinct
(target, seed) pairs are stacked and fitted by one call of ``reconstruction.fit.fit``,
every target with its own seed, starts and stopping rule, so each cell's numbers are
those of a fit of it alone (bit for bit on a CPU with one thread, ``tests/test_sweep.py``:
the solvers avoid the few batched kernels whose rounding depends on the batch's size,
GEMV-shaped products (``solvers.common.bmm``), LoKr's SVD of a wide 𝓡(M) and the
spectral start's small products, which run target by target). Cells whose configuration is
the same at several ranks (VeRA's r = min(m, n) at every budget of the Figure 2 grid)
share one fit. The result stays per cell: one row per cell, identical to what
``reconstruction.run.evaluate`` returns for it (its ``seconds`` being the batch's time
divided among its fits).

Within a process, targets, their W0 stand-ins and the targets' singular values (for the
LoRA optimum beside every row) are made once and reused by the batches that need them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Sequence
from typing import Any

import torch

import theory
from theory import spectra

from . import fit as F
from . import io as rio
from .solvers.common import is_modulated

#: at most this many distinct (target, seed) fits in one batch
MAX_FITS = 8


@dataclasses.dataclass(frozen=True)
class Cell:
    """One point of the grid; ``key`` holds every parameter that changes the result."""

    target: str
    m: int
    n: int
    batch: int
    seed: int
    method: str
    rank: int
    convention: str
    config: str
    solver: str
    steps: int | None
    init: str | None
    dtype: str
    w0: str
    restarts: int

    @property
    def key(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    def label(self) -> str:
        return f"{self.method} {self.config} {self.target} r={self.rank} {self.convention} seed={self.seed}"


@dataclasses.dataclass(frozen=True)
class Batch:
    """Cells fitted together: same method, config, shape and fit options."""

    cells: tuple[Cell, ...]
    configs: tuple[Any, ...]  # the Config of each cell (equal, or the same update)
    device: str = "cpu"
    #: the (method name, Config) fitted for every cell (``fit.same_fit``: LoHa cells are
    #: answered by the fit of ABBA at r1 = r2 = r); None: the first cell's own
    fit_as: tuple[str, Any] | None = None

    @property
    def fits(self) -> list[tuple[str, int]]:
        """The distinct (target, seed) pairs, in cell order."""
        return list(dict.fromkeys((c.target, c.seed) for c in self.cells))

    def label(self) -> str:
        c = self.cells[0]
        return f"{c.method} {c.config} ({len(self.cells)} cells, {len(self.fits)} fits)"


def _fit_as(c: Cell, cfg) -> tuple[str, Any]:
    return F.same_fit(c.method, cfg, c.solver, c.init, c.m, c.n)


def _group_key(c: Cell, cfg) -> tuple:
    method, config = _fit_as(c, cfg)
    return (method, str(config), c.m, c.n, c.batch, c.solver, c.steps, c.init, c.dtype, c.w0,
            c.restarts)


def batches(cells: Sequence[tuple[Cell, Any]], device: str = "cpu", batched: bool = True,
            max_fits: int = MAX_FITS) -> list[Batch]:
    """Group ``cells`` ((cell, config) pairs) into batches, in the order of their first
    cell; ``batched=False`` gives one batch per cell (the cell-by-cell sweep)."""
    if not batched:
        return [Batch((c,), (cfg,), device) for c, cfg in cells]
    groups: dict[tuple, list[tuple[Cell, Any]]] = {}
    for c, cfg in cells:
        groups.setdefault(_group_key(c, cfg), []).append((c, cfg))
    out = []
    for members in groups.values():
        chunk: list[tuple[Cell, Any]] = []
        fits: set = set()
        for c, cfg in members:
            if (c.target, c.seed) not in fits and len(fits) >= max_fits:
                out.append(_batch(chunk, device))
                chunk, fits = [], set()
            chunk.append((c, cfg))
            fits.add((c.target, c.seed))
        out.append(_batch(chunk, device))
    return out


#: a fit's estimated seconds at 1000×1000 on one CPU thread, a + b·p with p its trainable
#: parameters over (m + n) (its LoRA-rank equivalent), per solver (``exact``: VeRA's and
#: LoKr's ALS; ``modulated``: SMoA's, HiRA's and HUT's L-BFGS; ``stopped-lbfgs``:
#: α-LoRA's, ``fit.ADAM_TO_LBFGS``), read off the Figure 2 grid's per-fit times (README,
#: "Sweeps at scale"); their ratios order the batches, ``SECONDS_PER_COST`` scales them
COST = {"svd": (0.3, 0.0), "exact": (4.0, 0.05), "als": (0.0, 0.7), "adam": (0.0, 0.3),
        "lbfgs": (0.0, 1.0), "modulated": (0.0, 0.5), "stopped-lbfgs": (3.4, 0.1)}
#: seconds of one CPU thread here per unit of ``cost``: the Figure 2 grid's 96 batches
#: come to 6795 units and took 1460 s of fitting in one-thread tasks (2026-12-07)
SECONDS_PER_COST = 0.215


def cost(batch: Batch) -> float:
    """The batch's estimated work (``COST``, scaled by m·n): the sweep hands the batches out
    largest first, so that parallel workers finish together (no lane left alone on the
    grid's slowest fit at the end), and estimates the time left from it."""
    c0, cfg = batch.cells[0], batch.configs[0]
    name, cfg = batch.fit_as or (c0.method, cfg)
    meth = theory.get_method(name)
    solver = F.auto_solver(meth, cfg, c0.m, c0.n) if c0.solver == "auto" else c0.solver
    if solver == "als" and meth.exact_als is not None:
        solver = "exact"
    if solver == "lbfgs" and is_modulated(meth):
        solver = "modulated"
    if solver == "lbfgs" and meth.name in F.ADAM_TO_LBFGS:
        solver = "stopped-lbfgs"
    a, b = COST.get(solver, (0.0, 1.0))
    p = meth.n_params(c0.m, c0.n, cfg) / (c0.m + c0.n)
    return len(batch.fits) * c0.batch * c0.m * c0.n / 1e6 * (a + b * p)


def _batch(chunk: list[tuple[Cell, Any]], device: str) -> Batch:
    c0, cfg0 = chunk[0]
    return Batch(tuple(x for x, _ in chunk), tuple(y for _, y in chunk), device,
                 fit_as=_fit_as(c0, cfg0))


# --------------------------------------------------------------------------- #
# per-process caches: targets, W0, singular values
# --------------------------------------------------------------------------- #
@functools.lru_cache(maxsize=16)
def _target(spec: str, m: int, n: int, batch: int, seed: int, dtype: str, device: str, w0: str):
    """(target, W0, W0 source, singular values of the targets (b, p) float64, rank W0)."""
    from . import targets as T
    from .run import DTYPES, load_w0

    dt = DTYPES[dtype]
    tgt = T.get_target(spec, (m, n), batch, seed, dt, device)
    w, src = load_w0(w0, tgt, seed, dt, device)
    M = tgt.M
    s = torch.linalg.svdvals(M.double() if M.dtype != torch.float64 else M)
    rank_w0 = int(spectra.numerical_rank(w.double() if w.dtype != torch.float64 else w).max())
    return tgt, w, src, s, rank_w0


def clear_caches() -> None:
    _target.cache_clear()


# --------------------------------------------------------------------------- #
# one batch
# --------------------------------------------------------------------------- #
def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def run_batch(batch: Batch) -> list[dict]:
    """Fit the batch; one record per cell, in cell order: ``{"key", "row", "batch_fits",
    "batch_seconds"}`` or ``{"key", "error"}`` (the cell's one-line reason). Bad input for
    one fit fails only the cells of that fit (the batch is then fitted target by target)."""
    fits = batch.fits
    t0 = time.perf_counter()
    try:
        got = _fit_rows(batch, fits)
    except (ValueError, RuntimeError) as e:
        if isinstance(e, torch.OutOfMemoryError):
            raise  # not the cell's fault: the task fails (and is retried)
        if len(fits) == 1:
            return [{"key": c.key, "error": _one_line(e)} for c in batch.cells]
        got = {}
        for f in fits:  # alone, so that one bad target fails its own cells only
            try:
                got.update(_fit_rows(batch, [f]))
            except (ValueError, RuntimeError) as e1:
                if isinstance(e1, torch.OutOfMemoryError):
                    raise
                got[f] = _one_line(e1)
    seconds = time.perf_counter() - t0
    out = []
    for cell, cfg in zip(batch.cells, batch.configs):
        r = got[(cell.target, cell.seed)]
        if isinstance(r, str):
            out.append({"key": cell.key, "error": r})
            continue
        row = dict(r)  # within budget: the "published" convention is over it by design
        if cell.method != row["method"]:  # answered by the same update's fit (``fit_as``)
            meth = theory.get_method(cell.method)
            n_params = int(meth.n_params(cell.m, cell.n, cfg))
            assert n_params == row["n_params"], (cell.label(), row["config"])
            row.update(method=cell.method, config=str(cfg), config_fields=cfg.asdict(),
                       fitted_as=f"{row['method']} {row['config']}")
        row.update(rank=cell.rank, budget_rank=cell.rank, convention=cell.convention,
                   within_budget=cell.convention == "equal", target=cell.target)
        out.append({"key": cell.key, "row": row, "batch_fits": len(fits),
                    "batch_seconds": seconds})
    return out


def _fit_rows(batch: Batch, fits: list[tuple[str, int]]) -> dict[tuple[str, int], dict]:
    """One fit of the targets of ``fits``; {(target, seed): row without the per-cell fields}."""
    c0, config = batch.cells[0], batch.configs[0]
    name, config = batch.fit_as or (c0.method, config)
    method = theory.get_method(name)
    m, n = c0.m, c0.n
    got = [_target(t, m, n, c0.batch, s, c0.dtype, batch.device, c0.w0) for t, s in fits]
    M = torch.cat([g[0].M for g in got])  # (F·batch, m, n)
    w0 = torch.cat([g[1] for g in got])
    seeds = [s for (_, s), g in zip(fits, got) for _ in range(g[0].M.shape[0])]
    res = F.fit(method.name, M, config, w0=w0, solver=c0.solver, steps=c0.steps, init=c0.init,
                seed=seeds, device=batch.device, dtype=M.dtype, restarts=c0.restarts)
    summ = spectra.summary(res.delta.detach())
    num_rank = summ["numerical_rank"].double().cpu()
    ent_rank = summ["entropy_rank"].double().cpu()
    err = res.rel_error.detach().double().cpu()
    steps = res.steps_per_target
    div = res.diverged.detach().cpu()
    n_params = int(method.n_params(m, n, config))
    lora_rank = min(n_params // (m + n), min(m, n))
    out = {}
    i = 0
    for (t, s), (tgt, w, src, sv, rank_w0) in zip(fits, got):
        b = tgt.M.shape[0]
        sl = slice(i, i + b)
        i += b
        bound = int(method.rank_bound(m, n, rank_w0 if method.needs_w0 else min(m, n), config))
        if lora_rank >= 1:
            lopt = F.lora_optimum_from_sv(sv, lora_rank).double().cpu()
        else:
            lopt = torch.ones(b, dtype=torch.float64)
        e = err[sl]
        mu, sd = rio.mean_std(e.tolist())
        lmu, _ = rio.mean_std(lopt.tolist())
        out[(t, s)] = {
            "target": tgt.name, "method": method.name, "convention": None, "rank": None,
            "config": str(config), "config_fields": config.asdict(), "n_params": n_params,
            "budget_rank": None, "within_budget": None, "rank_bound": bound,
            "numerical_rank": float(num_rank[sl].mean()), "entropy_rank": float(ent_rank[sl].mean()),
            "rel_error": mu, "rel_error_std": sd, "rel_errors": e.tolist(),
            "lora_rank": lora_rank, "lora_optimum": lmu, "lora_optima": lopt.tolist(),
            "solver": res.solver, "init": res.init, "steps": int(steps[sl].max()),
            "seconds": float(res.seconds) / len(fits), "diverged": int(div[sl].sum()),
            "w0_source": src if method.needs_w0 else "-", "seed": s, "batch": b, "m": m, "n": n,
            "dtype": str(M.dtype).replace("torch.", ""), "device": str(batch.device),
        }
    return out
