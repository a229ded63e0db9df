"""``python -m reconstruction.sweep``: methods × ranks × targets × seeds (× convention).

Cells that share method, configuration and shape are fitted together, as one batched
call of the solvers (``reconstruction.cells``); each cell's numbers are those of a fit
of it alone, and the results stay per cell. The batches run one after another in this
process (``--executor local``) or as Ray tasks on this machine or a cluster
(``--executor ray [--address auto|HOST:PORT] [--cpus-per-task N] [--gpus-per-task G]``,
docs/cluster.md); either way only this process (the driver) writes the results. The
default, ``--executor auto``, is Ray on this machine's cores (one one-thread task per
core) for a grid of ``LONG_JOB`` estimated seconds or more on a multi-core CPU, else
local; the first line says which executor runs and what it has.

Each finished cell is appended at once to ``<out>/cells.jsonl`` (one JSON line,
fsynced), and the aggregated table ``results.json`` / ``results.csv`` is rewritten
atomically after every batch, so an interrupted sweep (Ctrl-C, a killed driver,
``--max-cells``) resumes where it stopped: rerun the same command and the cells already
in the log, keyed by all their parameters, are not recomputed. A cell that fails is
logged with its one-line reason, counted and listed at the end, retried by the next
run, and makes the exit status 1. At the end it draws ``error_vs_rank.png/.pdf``
(Figure 2 layout of the ABBA paper).

    python -m reconstruction.sweep                          # a small default grid
    python -m reconstruction.sweep --preset abba-fig2 --size 256     # quick look
    python -m reconstruction.sweep --preset abba-fig2                # the real one
    python -m reconstruction.sweep --preset abba-fig2 --executor ray --address auto

``--preset abba-fig2`` is Figure 2 of Singhal et al. (2025): 1000×1000 targets
(orthogonal, low-rank, sparse, random), r = 8, 16, ..., 72, every registered
method at the budget of rank-r LoRA, and ABBA in two conventions side by side:
"equal" (r1 = r2 = r/2, r(m+n) parameters, the paper's stated axis) and
"published" (r1 = r2 = r, 2r(m+n) parameters, what its code runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import cli
import theory
from cli import executor as X
from cli.eta import Eta

from . import io as rio
from . import published
from .cells import MAX_FITS, SECONDS_PER_COST, Cell, batches, cost, run_batch
from .fit import SOLVERS, inits_for, solvers_for
from .run import CONVENTIONS, DTYPES, config_for, evaluate, resolve_methods  # noqa: F401

__all__ = ["PRESETS", "Cell", "Grid", "build_parser", "format_summary", "grid_from_args",
           "load_done", "main", "plan", "run_sweep"]

PRESETS: dict[str, dict[str, Any]] = {
    "abba-fig2": dict(
        methods="all", ranks=list(published.FIG2_RANKS), targets=list(published.FIG2_TARGETS),
        size=published.FIG2_SIZE, seeds=[0], batch=1, conventions=["equal", "published"],
    ),
}

DEFAULTS: dict[str, Any] = dict(methods="lora,abba", ranks=[8, 16, 32], targets=["random"],
                                size=256, seeds=[0], batch=1, conventions=["equal"])

#: bytes per target entry a fit holds at its peak (targets, W0, ΔW, residuals, solver state)
FIT_BYTES_PER_ENTRY = 8


@dataclasses.dataclass
class Grid:
    methods: list[str]
    ranks: list[int]
    targets: list[str]
    seeds: list[int]
    conventions: list[str]
    shape: tuple[int, int]
    batch: int = 1
    solver: str = "auto"
    steps: int | None = None
    init: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    w0: str = "gaussian"
    restarts: int = 1


def plan(grid: Grid) -> tuple[list[tuple[Cell, Any]], list[str]]:
    """The cells of ``grid`` in run order (target, seed, rank, method, convention) with
    their configs; a method with no configuration in a budget, or a convention that
    changes nothing for a method, gives no cell (reported in the notes)."""
    m, n = grid.shape
    cells, notes = [], []
    for tgt in grid.targets:
        for seed in grid.seeds:
            for r in grid.ranks:
                if r > min(m, n):
                    notes.append(f"rank {r} > min(m, n) = {min(m, n)}: skipped")
                    continue
                for name in grid.methods:
                    method = theory.get_method(name)
                    seen = set()
                    for conv in grid.conventions:
                        try:
                            cfg, within = config_for(method, m, n, r, conv, strict=False)
                        except ValueError as e:
                            notes.append(f"{name} r={r}: {e}")
                            continue
                        if not within and (conv == "equal" or "r1" not in cfg.asdict()):
                            # over budget is the point of "published" only for r1/r2 methods
                            notes.append(f"{name} r={r}: no configuration within the budget")
                            continue
                        if str(cfg) in seen:  # e.g. "published" = "equal" for non-ABBA methods
                            continue
                        seen.add(str(cfg))
                        cells.append((Cell(tgt, m, n, grid.batch, seed, method.name, r, conv,
                                           str(cfg), grid.solver, grid.steps, grid.init,
                                           grid.dtype, grid.w0, grid.restarts), cfg))
    return cells, list(dict.fromkeys(notes))


def load_done(out: Path) -> dict[str, dict]:
    """Finished cells of previous runs of the sweep in ``out``: {key: record with a row}.
    A failed cell (a record with an ``error``) is not finished: it is fitted again."""
    done: dict[str, dict] = {}
    for rec in rio.read_jsonl(Path(out) / "cells.jsonl"):
        if "key" in rec and rec.get("row"):
            done[rec["key"]] = rec
    return done


def load_failed(out: Path) -> dict[str, dict]:
    """Cells of ``out`` that failed and have not succeeded since: {key: last failure}."""
    ok, bad = set(), {}
    for rec in rio.read_jsonl(Path(out) / "cells.jsonl"):
        if "key" in rec:
            if rec.get("row"):
                ok.add(rec["key"])
            elif rec.get("error"):
                bad[rec["key"]] = rec
    return {k: r for k, r in bad.items() if k not in ok}


def _table(cells: Sequence[tuple[Cell, Any]], done: dict[str, dict]) -> list[dict]:
    rows = []
    for cell, _ in cells:
        rec = done.get(cell.key)
        if rec and rec.get("row"):
            rows.append(rec["row"])
    return rows


def _duration(s: float) -> str:
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def run_sweep(grid: Grid, out: Path, *, max_cells: int | None = None,
              on_cell: Callable[[Cell, dict], None] | None = None, progress: bool = False,
              log: Callable[[str], None] | None = None, figure: bool = True,
              executor: X.Executor | None = None, batched: bool = True) -> dict[str, Any]:
    """Run (or resume) the sweep; returns a summary dict.

    ``executor``: where the batches run (default: this process). ``batched``: False fits
    every cell alone (the cell-by-cell sweep, for comparison). ``on_cell(cell, record)``
    is called after each new cell is stored (a test hook: raising KeyboardInterrupt
    there simulates an interruption). ``max_cells`` stops after that many new cells (the
    sweep is then incomplete and resumes on the next call). ``log``: progress lines
    (one per finished batch, with the time left) when there is no progress bar.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ex = executor or X.LocalExecutor()
    cells, notes = plan(grid)
    done = load_done(out)
    todo = [(c, cfg) for c, cfg in cells if c.key not in done]
    stopped = max_cells is not None and len(todo) > max_cells
    if max_cells is not None:
        todo = todo[:max_cells]
    tasks = batches(todo, grid.device, batched)
    work = {id(t): cost(t) for t in tasks}  # estimated, for the order and the time left
    tasks.sort(key=lambda t: work[id(t)], reverse=True)  # largest first
    meta = {"grid": {**dataclasses.asdict(grid), "shape": list(grid.shape)},
            "n_cells": len(cells), "notes": notes, "torch": torch.__version__,
            "executor": ex.kind}
    run_id = uuid.uuid4().hex[:12]
    log = log or (lambda s: None)
    log(f"{len(cells)} cells, {len(done)} already done in {out}; {len(todo)} to fit now in "
        f"{len(tasks)} batch(es)")
    by_key = {c.key: c for c, _ in cells}
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), desc="sweep", unit="cell", file=sys.stderr)
    computed, failed_now = 0, []
    t0 = time.perf_counter()
    eta = Eta([(id(t), work[id(t)]) for t in tasks], slots=ex.slots, t0=t0)
    try:
        for task, result in ex.map(run_batch, tasks):
            if isinstance(result, X.TaskFailed):
                recs = [{"key": c.key, "error": f"task failed: {result.reason}"} for c in task.cells]
            else:
                recs = result
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            for rec in recs:  # the driver alone writes, one fsynced line per cell
                rec.update(run_id=run_id, finished=stamp)
                rio.append_jsonl(out / "cells.jsonl", rec)
                if rec.get("row"):
                    done[rec["key"]] = rec
                else:
                    failed_now.append(rec)
            computed += len(recs)
            rio.write_results(out, _table(cells, done), meta)
            now = time.perf_counter()
            elapsed, left = now - t0, eta.finished(id(task), now)
            if bar is not None:
                bar.update(len(recs))
                bar.set_postfix_str(f"{task.label()}"[:50] + f"; about {_duration(left)} left")
            else:
                log(f"[{computed}/{len(todo)} cells, {len(failed_now)} failed] {task.label()} "
                    f"{'failed' if isinstance(result, X.TaskFailed) else 'done'}; "
                    f"elapsed {_duration(elapsed)}, about {_duration(left)} left")
            for rec in recs:
                if on_cell is not None:
                    on_cell(by_key[rec["key"]], rec)
    finally:
        if bar is not None:
            bar.close()
    rows = _table(cells, done)
    failed = load_failed(out)
    failed = [failed[c.key] for c, _ in cells if c.key in failed]
    complete = all(c.key in done for c, _ in cells)
    meta["complete"] = complete
    meta["failed"] = [{"cell": by_key[r["key"]].label(), "error": r["error"]} for r in failed]
    rio.write_results(out, rows, meta)
    paths = []
    if figure and rows:
        from .plots import plot_error_vs_rank, save_figure
        m, n = grid.shape
        title = f"Reconstruction error vs budget ({m}×{n}, batch {grid.batch})"
        if not complete:
            title += " (incomplete)"
        paths = save_figure(plot_error_vs_rank(rows, title=title), out, "error_vs_rank")
    return {"rows": rows, "computed": computed, "total": len(cells), "complete": complete,
            "stopped": stopped, "errors": failed, "failed_now": failed_now, "notes": notes,
            "figure": paths, "out": out, "run_id": run_id, "batches": len(tasks),
            "seconds": time.perf_counter() - t0, "cells": {c.key: c for c, _ in cells}}


def format_summary(rows: Sequence[dict]) -> str:
    """Compact table: one line per (target, method, convention), errors across ranks."""
    ranks = sorted({r["rank"] for r in rows})
    groups: dict[tuple, dict[int, list[float]]] = {}
    for r in rows:
        k = (r["target"], r["method"], r.get("convention", "equal"))
        groups.setdefault(k, {}).setdefault(r["rank"], []).append(r["rel_error"])
    lora: dict[tuple, dict[int, list[float]]] = {}
    for r in rows:
        if r.get("lora_rank") == r["rank"]:
            lora.setdefault((r["target"], "LoRA exact", "SVD"), {}).setdefault(r["rank"], []).append(
                r["lora_optimum"])
    head = ["target", "method", "convention"] + [f"r={x}" for x in ranks]
    lines = []
    for tgt in dict.fromkeys(k[0] for k in groups):
        for k, v in [*[(k, v) for k, v in lora.items() if k[0] == tgt],
                     *[(k, v) for k, v in groups.items() if k[0] == tgt]]:
            cells = [k[0], k[1], k[2]]
            for x in ranks:
                vals = v.get(x)
                cells.append(f"{sum(vals) / len(vals):.3f}" if vals else "")
            lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h)
              for i, h in enumerate(head)]
    fmt = lambda cs: "  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(cs, widths))).rstrip()
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *map(fmt, lines)])



def build_parser() -> argparse.ArgumentParser:
    ap = cli.Parser(prog="python -m reconstruction.sweep", description=__doc__)
    ap.add_argument("--preset", choices=sorted(PRESETS), help="a named grid")
    ap.add_argument("--methods", type=cli.str_list,
                    help="comma list or 'all' (default lora,abba; preset: all)")
    ap.add_argument("--ranks", type=cli.int_list, help="e.g. 8,16,32 or 8:72:8 (LoRA-rank budgets)")
    ap.add_argument("--targets", type=cli.str_list, help="comma list of target kinds or files")
    ap.add_argument("--seeds", type=cli.int_list, help="e.g. 0,1,2")
    ap.add_argument("--conventions", type=cli.str_list, help="equal,published")
    ap.add_argument("--size", type=cli.positive_int, help="square targets N×N")
    ap.add_argument("--shape", type=cli.positive_int, nargs=2, metavar=("M", "N"))
    ap.add_argument("--batch", type=cli.positive_int, help="matrices per target and cell (default 1)")
    ap.add_argument("--solver", default="auto", help=f"{'|'.join(SOLVERS)} (default auto)")
    ap.add_argument("--steps", type=cli.positive_int,
                    help="ALS sweeps / Adam steps / L-BFGS iterations (default: fit's own)")
    ap.add_argument("--init", help="initialization scheme (default: the solver's)")
    ap.add_argument("--restarts", type=cli.positive_int, default=1, help="starts, the best kept")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--device", default="cpu", help="cpu|cuda (default cpu)")
    ap.add_argument("--w0", default="gaussian",
                    help="W0 stand-in mode for methods that need one (gaussian, orthogonal) or a file")
    ap.add_argument("--out", type=Path, help="results folder (default results/reconstruction/<preset>)")
    ap.add_argument("--max-cells", type=cli.nonneg_int,
                    help="stop after this many new cells (resume later)")
    ap.add_argument("--cell-by-cell", action="store_true",
                    help="fit every cell alone instead of in batches (slower; for comparison)")
    ap.add_argument("--no-figure", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--quiet", action="store_true", help="no summary table")
    X.add_arguments(ap)
    return ap


def _check_targets(targets: list[str], shape: tuple[int, int]) -> None:
    """Every target is a kind (options parsed) or a readable file of the grid's shape."""
    from . import targets as T

    for spec in targets:
        kind = spec.split(":", 1)[0].strip().lower()
        if T._ALIASES.get(kind, kind) in T.KINDS:
            T.get_target(spec, (min(shape[0], 8), min(shape[1], 8)) if ":" not in spec else shape,
                         1, 0)  # parses the options (a tiny draw unless options need the shape)
            continue
        p = Path(spec.rsplit(":", 1)[0] if not Path(spec).exists() else spec)
        if not p.exists():
            raise ValueError(f"--targets: {spec!r} is neither a target kind ({', '.join(T.KINDS)}) "
                             "nor an existing file")
        M = T.get_target(spec).M
        got = tuple(M.shape[-2:])
        zero = (M == 0).flatten(1).all(1)
        if bool(zero.any()):
            raise ValueError(f"--targets: matrix {int(zero.nonzero()[0, 0])} of {spec} is all zeros "
                             "(its relative error is undefined)")
        if got != tuple(shape):
            raise ValueError(f"--targets: {spec} holds {got[0]}x{got[1]} matrices; give --shape "
                             f"{got[0]} {got[1]}")


def grid_from_args(args) -> Grid:
    """The grid the flags ask for, every value checked (one-line ValueError)."""
    base = dict(PRESETS[args.preset]) if args.preset else dict(DEFAULTS)
    try:
        methods = resolve_methods(",".join(args.methods) if args.methods else base["methods"])
    except (ValueError, KeyError) as e:
        raise ValueError(f"--methods: {str(e).strip(chr(34) + chr(39))}") from None
    ranks = list(args.ranks) if args.ranks else list(base["ranks"])
    targets = list(args.targets) if args.targets else list(base["targets"])
    seeds = list(args.seeds) if args.seeds else list(base["seeds"])
    convs = list(args.conventions) if args.conventions else list(base["conventions"])
    bad = [c for c in convs if c not in CONVENTIONS]
    if bad:
        raise ValueError(f"--conventions: unknown {', '.join(bad)}; known: {', '.join(CONVENTIONS)}")
    if args.shape and args.size:
        raise ValueError("give --size or --shape, not both")
    shape = tuple(args.shape) if args.shape else (args.size or base["size"],) * 2
    m, n = shape
    low = [r for r in ranks if r < 1]
    if low:
        raise ValueError(f"--ranks: {low[0]} is not a rank (ranks are >= 1)")
    high = [r for r in ranks if r > min(m, n)]
    if high:
        raise ValueError(f"--ranks: {high[0]} is above min(m, n) = {min(m, n)} of the {m}x{n} "
                         f"targets; give --ranks up to {min(m, n)} or a larger --size")
    neg = [s for s in seeds if s < 0]
    if neg:
        raise ValueError(f"--seeds: {neg[0]} is negative")
    if args.solver not in SOLVERS:
        raise ValueError(f"--solver {args.solver}: unknown; known: {', '.join(SOLVERS)}")
    if args.solver != "auto":
        lack = [x for x in methods if args.solver not in solvers_for(x)]
        if lack:
            raise ValueError(f"--solver {args.solver} does not apply to {', '.join(lack)} "
                             f"(leave them out with --methods, or use --solver auto)")
    if args.init is not None:
        lack = [x for x in methods if args.init not in inits_for(x)]
        if lack:
            known = ", ".join(inits_for(lack[0]))
            raise ValueError(f"--init {args.init} is not an init of {', '.join(lack)} "
                             f"({lack[0]}: {known})")
    from .targets import BASE_WEIGHT_MODES
    if args.w0 not in BASE_WEIGHT_MODES and not Path(args.w0).exists():
        raise ValueError(f"--w0 {args.w0}: neither a stand-in mode ({', '.join(BASE_WEIGHT_MODES)}) "
                         "nor an existing file")
    _check_targets(targets, shape)
    batch = args.batch or base["batch"]
    grid = Grid(methods=methods, ranks=ranks, targets=targets, seeds=seeds, conventions=convs,
                shape=shape, batch=batch, solver=args.solver, steps=args.steps, init=args.init,
                dtype=args.dtype, device=args.device, w0=args.w0, restarts=args.restarts)
    if not plan(grid)[0]:
        raise ValueError("the grid has no cell: no method has a configuration within these budgets")
    return grid


#: ``--executor auto`` runs a grid on a local Ray instance (one one-thread task per core)
#: from this many estimated seconds of one-thread fitting: starting the instance costs
#: 20-40 s here, two one-thread workers save about a third of the wall time
LONG_JOB = 300.0


def estimated_seconds(grid: Grid, out: Path, max_cells: int | None = None) -> float:
    """One CPU thread's estimated fitting time of the cells not yet in ``out`` (at most
    ``max_cells`` of them)."""
    cells, _ = plan(grid)
    done = load_done(out)
    todo = [(c, cfg) for c, cfg in cells if c.key not in done][:max_cells]
    return sum(cost(t) for t in batches(todo, grid.device, True)) * SECONDS_PER_COST


def _check_memory(grid: Grid, ex: X.Executor) -> None:
    """The largest batch (targets, W0, ΔW and the solvers' state) fits in memory."""
    m, n = grid.shape
    fits = min(len(grid.targets) * len(grid.seeds), MAX_FITS)
    nbytes = FIT_BYTES_PER_ENTRY * fits * grid.batch * m * n * torch.finfo(DTYPES[grid.dtype]).bits // 8
    what = f"a batch of {fits * grid.batch} {m}x{n} targets"
    hint = "lower --size, --batch or the number of targets and seeds"
    if ex.kind == "local":
        cli.check_memory(nbytes, what, grid.device, hint=hint)
    else:
        biggest = ex.largest_node_memory()
        if biggest and nbytes > 0.8 * biggest:
            raise ValueError(f"{what} needs about {cli.format_bytes(nbytes)}, more than a node "
                             f"of the Ray cluster has ({cli.format_bytes(biggest)}); {hint}")


def work(args) -> None:
    """Validate everything, then run the sweep; failed cells end in ``cli.Failed``."""
    grid = grid_from_args(args)
    out = args.out or Path("results/reconstruction") / (args.preset or "sweep")
    cli.check_writable_dir(out, "--out")
    long_job = estimated_seconds(grid, out, args.max_cells) >= LONG_JOB
    kind = X.choose(args.executor, address=args.address, cpus_per_task=args.cpus_per_task,
                    gpus_per_task=args.gpus_per_task, device=grid.device, long_job=long_job)
    # the whole check where the tasks run on this machine (locally or on a Ray instance
    # started here), the name alone for a cluster elsewhere
    grid.device = cli.check_device(grid.device, here=kind == "local" or not args.address)
    ex = X.from_args(args, device=grid.device, long_job=long_job)
    with ex:
        _check_memory(grid, ex)
        say = lambda s: print(s, file=sys.stderr, flush=True)
        say(ex.describe())
        progress = not args.no_progress and sys.stderr.isatty()
        res = run_sweep(grid, out, max_cells=args.max_cells, progress=progress, log=say,
                        figure=not args.no_figure, executor=ex, batched=not args.cell_by_cell)
    if not args.quiet and res["rows"]:
        print(format_summary(res["rows"]))
    for rec in res["errors"]:
        cell = res["cells"][rec["key"]]
        print(f"failed cell: {cell.label()}: {rec['error']}", file=sys.stderr)
    state = "complete" if res["complete"] else "incomplete (rerun to resume)"
    n_failed = len(res["errors"])
    print(f"{res['computed']} new cells, {res['total']} in the grid, {state}"
          + (f", {n_failed} failed" if n_failed else "")
          + f"; {res['seconds']:.1f}s; results in {res['out']}")
    if n_failed:
        raise cli.Failed(f"{n_failed} of {res['total']} cells failed (listed above; the others "
                         "are saved); rerun the same command to retry them")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run(lambda: work(args),
                   interrupted="finished cells are saved; rerun the same command to resume")


if __name__ == "__main__":
    raise SystemExit(main())
