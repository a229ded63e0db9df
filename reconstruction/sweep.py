"""``python -m reconstruction.sweep``: methods × ranks × targets × seeds (× convention).

Each finished cell is appended at once to ``<out>/cells.jsonl`` (one JSON line,
fsynced), and the aggregated table ``results.json`` / ``results.csv`` is
rewritten atomically after every cell, so an interrupted sweep (Ctrl-C, a kill,
``--max-cells``) resumes where it stopped: rerun the same command and the cells
already in the log, keyed by all their parameters, are not recomputed. At the end
it draws ``error_vs_rank.png/.pdf`` (Figure 2 layout of the ABBA paper).

    python -m reconstruction.sweep                          # a small default grid
    python -m reconstruction.sweep --preset abba-fig2 --size 256     # quick look
    python -m reconstruction.sweep --preset abba-fig2 --device cuda  # the real one

``--preset abba-fig2`` is Figure 2 of Singhal et al. (2025): 1000×1000 targets
(orthogonal, low-rank, sparse, random), r = 8, 16, ..., 72, every registered
method at the budget of rank-r LoRA, and ABBA in two conventions side by side:
"equal" (r1 = r2 = r/2, r(m+n) parameters, the paper's stated axis) and
"published" (r1 = r2 = r, 2r(m+n) parameters, what its code runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import theory

from . import io as rio
from . import published
from .run import CONVENTIONS, DTYPES, CliParser, check_device, config_for, evaluate, resolve_methods

PRESETS: dict[str, dict[str, Any]] = {
    "abba-fig2": dict(
        methods="all", ranks=list(published.FIG2_RANKS), targets=list(published.FIG2_TARGETS),
        size=published.FIG2_SIZE, seeds=[0], batch=1, conventions=["equal", "published"],
    ),
}

DEFAULTS: dict[str, Any] = dict(methods="lora,abba", ranks=[8, 16, 32], targets=["random"],
                                size=256, seeds=[0], batch=1, conventions=["equal"])


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
    """Finished cells of a previous run of the sweep in ``out``: {key: record}."""
    done = {}
    for rec in rio.read_jsonl(out / "cells.jsonl"):
        if "key" in rec:
            done[rec["key"]] = rec
    return done


def _table(cells: Sequence[tuple[Cell, Any]], done: dict[str, dict]) -> list[dict]:
    rows = []
    for cell, _ in cells:
        rec = done.get(cell.key)
        if rec and rec.get("row"):
            rows.append(rec["row"])
    return rows


def run_sweep(grid: Grid, out: Path, *, max_cells: int | None = None,
              on_cell: Callable[[Cell, dict], None] | None = None, progress: bool = False,
              log: Callable[[str], None] | None = None, figure: bool = True) -> dict[str, Any]:
    """Run (or resume) the sweep; returns a summary dict.

    ``on_cell(cell, row)`` is called after each new cell is stored (a test hook: raising
    KeyboardInterrupt there simulates an interruption). ``max_cells`` stops after that
    many new cells (the sweep is then incomplete and resumes on the next call).
    """
    from . import targets as T

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = check_device(grid.device)
    dtype = DTYPES[grid.dtype]
    cells, notes = plan(grid)
    done = load_done(out)
    todo = [(c, cfg) for c, cfg in cells if c.key not in done]
    meta = {"grid": {**dataclasses.asdict(grid), "shape": list(grid.shape)},
            "n_cells": len(cells), "notes": notes, "torch": torch.__version__}
    run_id = uuid.uuid4().hex[:12]
    log = log or (lambda s: None)
    log(f"{len(cells)} cells, {len(cells) - len(todo)} already done in {out}")
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), desc="sweep", unit="cell", file=sys.stderr)
    cache: dict[tuple, Any] = {}
    computed = 0
    stopped = False
    try:
        for cell, cfg in todo:
            if max_cells is not None and computed >= max_cells:
                stopped = True
                break
            tkey = (cell.target, cell.seed)
            if tkey not in cache:
                cache.clear()
                tgt = T.get_target(cell.target, (cell.m, cell.n), cell.batch, cell.seed, dtype, device)
                from .run import load_w0
                cache[tkey] = (tgt, *load_w0(grid.w0, tgt, cell.seed, dtype, device))
            tgt, w0, w0_src = cache[tkey]
            if bar is not None:
                bar.set_postfix_str(f"{cell.target} r={cell.rank} {cell.method} {cell.convention}")
            try:
                row = evaluate(cell.method, tgt, cfg, w0=w0, w0_source=w0_src, rank=cell.rank,
                               convention=cell.convention, solver=grid.solver, steps=grid.steps,
                               init=grid.init, seed=cell.seed, device=device, dtype=dtype,
                               restarts=grid.restarts,
                               within_budget=cell.convention == "equal")
                row["target"] = cell.target
                rec = {"key": cell.key, "row": row}
            except (ValueError, RuntimeError) as e:  # one broken method does not stop the grid
                rec = {"key": cell.key, "error": str(e).splitlines()[0] if str(e) else type(e).__name__}
                log(f"cell failed: {cell.method} {cell.target} r={cell.rank}: {rec['error']}")
            rec.update(run_id=run_id, finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
            rio.append_jsonl(out / "cells.jsonl", rec)
            done[cell.key] = rec
            computed += 1
            rio.write_results(out, _table(cells, done), meta)
            if bar is not None:
                bar.update(1)
            if on_cell is not None:
                on_cell(cell, rec)
    finally:
        if bar is not None:
            bar.close()
    rows = _table(cells, done)
    errors = [done[c.key] for c, _ in cells if c.key in done and "error" in done[c.key]]
    complete = all(c.key in done for c, _ in cells)
    meta["complete"] = complete
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
            "stopped": stopped, "errors": errors, "notes": notes, "figure": paths, "out": out,
            "run_id": run_id}


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
    fmt = lambda cs: "  ".join(c.ljust(w) if i < 3 else c.rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(cs, widths))).rstrip()
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *map(fmt, lines)])


def _ints(s: str) -> list[int]:
    try:
        out = []
        for part in s.split(","):
            part = part.strip()
            if ":" in part:  # start:stop:step, stop inclusive
                a, b, *c = (int(x) for x in part.split(":"))
                out += list(range(a, b + 1, c[0] if c else 1))
            elif part:
                out.append(int(part))
        return out
    except ValueError:
        raise ValueError(f"expected integers like 8,16,32 or 8:72:8, got {s!r}") from None


def build_parser() -> argparse.ArgumentParser:
    ap = CliParser(prog="python -m reconstruction.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), help="a named grid")
    ap.add_argument("--methods", help="comma list or 'all' (default lora,abba; preset: all)")
    ap.add_argument("--ranks", help="e.g. 8,16,32 or 8:72:8 (LoRA-rank budgets)")
    ap.add_argument("--targets", help="comma list of target kinds or files")
    ap.add_argument("--seeds", help="e.g. 0,1,2")
    ap.add_argument("--conventions", help="equal,published")
    ap.add_argument("--size", type=int, help="square targets N×N")
    ap.add_argument("--shape", type=int, nargs=2, metavar=("M", "N"))
    ap.add_argument("--batch", type=int, help="targets per cell (default 1)")
    ap.add_argument("--solver", default="auto")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--init")
    ap.add_argument("--restarts", type=int, default=1)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--w0", default="gaussian", help="W0 stand-in mode for methods that need one")
    ap.add_argument("--out", type=Path, help="results folder (default results/reconstruction/<preset>)")
    ap.add_argument("--max-cells", type=int, help="stop after this many new cells (resume later)")
    ap.add_argument("--no-figure", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--quiet", action="store_true", help="no summary table")
    return ap


def grid_from_args(args) -> Grid:
    base = dict(PRESETS[args.preset]) if args.preset else dict(DEFAULTS)
    methods = resolve_methods(args.methods or base["methods"])
    ranks = _ints(args.ranks) if args.ranks else list(base["ranks"])
    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets \
        else list(base["targets"])
    seeds = _ints(args.seeds) if args.seeds else list(base["seeds"])
    convs = [c.strip() for c in args.conventions.split(",") if c.strip()] if args.conventions \
        else list(base["conventions"])
    bad = [c for c in convs if c not in CONVENTIONS]
    if bad:
        raise ValueError(f"unknown convention(s) {', '.join(bad)}; known: {', '.join(CONVENTIONS)}")
    if args.shape and args.size:
        raise ValueError("give --size or --shape, not both")
    shape = tuple(args.shape) if args.shape else (args.size or base["size"],) * 2
    if min(shape) < 1:
        raise ValueError(f"target shape must be positive, got {shape}")
    if not ranks or min(ranks) < 1:
        raise ValueError("ranks must be >= 1")
    if not targets or not methods or not seeds:
        raise ValueError("empty grid: give at least one method, target and seed")
    batch = args.batch or base["batch"]
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    return Grid(methods=methods, ranks=ranks, targets=targets, seeds=seeds, conventions=convs,
                shape=shape, batch=batch, solver=args.solver, steps=args.steps, init=args.init,
                dtype=args.dtype, device=args.device, w0=args.w0, restarts=args.restarts)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        grid = grid_from_args(args)
        if args.max_cells is not None and args.max_cells < 0:
            raise ValueError(f"--max-cells must be >= 0, got {args.max_cells}")
        out = args.out or Path("results/reconstruction") / (args.preset or "sweep")
        progress = not args.no_progress and sys.stderr.isatty()
        res = run_sweep(grid, out, max_cells=args.max_cells, progress=progress,
                        log=lambda s: print(s, file=sys.stderr), figure=not args.no_figure)
    except KeyboardInterrupt:
        print("error: interrupted; finished cells are saved, rerun the same command to resume",
              file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    if not args.quiet and res["rows"]:
        print(format_summary(res["rows"]))
    for e in res["errors"]:
        print(f"failed cell: {e['key']}: {e['error']}", file=sys.stderr)
    state = "complete" if res["complete"] else "incomplete (rerun to resume)"
    print(f"{res['computed']} new cells, {res['total']} in the grid, {state}; "
          f"{time.perf_counter() - t0:.1f}s; results in {res['out']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
