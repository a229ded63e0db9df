"""``python -m reconstruction.run``: fit PEFT updates to target matrices and compare.

Problem (DESIGN §4, the metric of the ABBA paper, Singhal et al. 2025, Fig. 2):
given targets M (B, m, n), find each method's factors minimizing

    ‖M − ΔW‖_F² / ‖M‖_F²

at the parameter budget of rank-r LoRA, r (m + n) (``--rank r``; ABBA then has
r1 = r2 = r/2), and print it beside the exact optimum of LoRA at the same budget
(truncated SVD, Eckart-Young).

    python -m reconstruction.run --method abba --rank 16
    python -m reconstruction.run --method all --rank 32 --target lowrank --size 512
    python -m reconstruction.run --method abba --r1 16 --r2 16 --json -

With no flag it fits ABBA at the budget of rank-16 LoRA on a batch of U[0,1)
random 256×256 targets (the "random" panel of the paper's Figure 2, shrunk).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

import cli
import theory
from reconstruction import fit as F
from theory import spectra
from theory.base import check_rank

from . import io as rio

#: defaults of the CLI (a run with no flag uses these)
DEFAULT_METHOD = "abba"
DEFAULT_RANK = 16
DEFAULT_TARGET = "random"
DEFAULT_SIZE = 256
DEFAULT_BATCH = 2
#: iterations when --steps is not given (``reconstruction.sweep`` uses fit's own): ALS
#: fit's 200 sweeps, Adam and L-BFGS fewer than its 2000 steps / 1000 iterations, so
#: that ``--method all`` stays quick
QUICK_STEPS = {"als": 200, "adam": 600, "lbfgs": 300}

#: conventions for turning "rank r" into a configuration
CONVENTIONS = ("equal", "published")


# --------------------------------------------------------------------------- #
# configuration
# --------------------------------------------------------------------------- #
def resolve_methods(spec: str) -> list[str]:
    """``"all"``, one name, or a comma list -> registry names (unknown -> ValueError)."""
    spec = (spec or "").strip()
    if not spec:
        raise ValueError("no method given; use --method NAME, a comma list, or all")
    if spec.lower() == "all":
        return theory.available()
    names = []
    for part in spec.split(","):
        part = part.strip()
        if part:
            names.append(theory.get_method(part).name)
    return list(dict.fromkeys(names))


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``["alpha=2", "r1=4"]`` -> ``{"alpha": 2, "r1": 4}`` (Python literals, else strings)."""
    out: dict[str, Any] = {}
    for it in items or []:
        if "=" not in it:
            raise ValueError(f"--set expects key=value, got {it!r}")
        k, v = it.split("=", 1)
        k = k.strip()
        if not k:
            raise ValueError(f"--set expects key=value, got {it!r}")
        try:
            val = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):
            val = v.strip()
            if val.lower() in ("nan", "inf", "+inf", "-inf", "infinity", "-infinity"):
                val = float(val)
        if isinstance(val, float) and not math.isfinite(val):
            raise ValueError(f"--set {k}={v.strip()}: the value must be finite")
        if k in out and out[k] != val:
            raise ValueError(f"--set gives {k} twice ({out[k]!r} and {val!r})")
        out[k] = val
    return out


def config_for(method, m: int, n: int, rank: int, convention: str = "equal",
               overrides: dict[str, Any] | None = None, strict: bool = True):
    """The configuration of ``method`` for "rank r".

    convention "equal": the largest configuration within the budget of rank-r LoRA,
    r (m + n) parameters (ABBA: r1 = r2 = r/2). "published": ABBA's Figure 2 as its
    code runs it, r1 = r2 = r (twice LoRA's parameters); methods without r1/r2 fields
    use the equal-budget configuration. ``overrides`` replace fields (e.g. r1, r2,
    alpha); with ``strict`` a field the method does not have is a ValueError,
    otherwise it is ignored. Returns ``(config, within_budget)``.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; known: {', '.join(CONVENTIONS)}")
    fields = {f.name for f in dataclasses.fields(method.Config)}
    check_rank(method.name, rank, min(m, n), "rank", m, n)
    cs = method.configs_for_budget(m, n, theory.lora_budget(m, n, rank))
    if cs:
        cfg, within = cs[0], True
    else:
        cfg, within = method.config(), False
    kw = dict(cfg.asdict())
    if convention == "published" and {"r1", "r2"} <= fields:
        kw.update(r1=rank, r2=rank)
    overrides = dict(overrides or {})
    bad = sorted(set(overrides) - fields)
    if bad and strict:
        raise ValueError(f"{method.name} has no config field(s) {', '.join(bad)}; "
                         f"its fields are {', '.join(sorted(fields)) or 'none'}")
    kw.update({k: v for k, v in overrides.items() if k in fields})
    cfg = method.config(**kw)
    method.validate(m, n, cfg)
    budget = theory.lora_budget(m, n, rank)
    return cfg, within and method.n_params(m, n, cfg) <= budget


#: kept under this name for the commands that import it from here
check_device = cli.check_device


DTYPES = {"float32": torch.float32, "float64": torch.float64}


def load_w0(spec: str, target, seed: int, dtype, device):
    """W0 for methods that need one: a stand-in mode name or a file, and its source label."""
    from . import targets as T

    p = Path(spec)
    if p.suffix.lower() in (".npy", ".pt", ".pth", ".safetensors") or p.exists():
        if not p.exists():
            raise FileNotFoundError(f"--w0 file {p} not found")
        w = T.load_target(p, dtype=dtype, device=device).M  # (b, m, n)
        if tuple(w.shape[-2:]) != tuple(target.M.shape[-2:]):
            raise ValueError(f"W0 from {p} has shape {tuple(w.shape[-2:])}, the target "
                             f"{tuple(target.M.shape[-2:])}")
        if w.shape[0] not in (1, target.M.shape[0]):
            raise ValueError(f"W0 from {p} holds {w.shape[0]} matrices, the target batch "
                             f"{target.M.shape[0]}")
        return w.expand_as(target.M).contiguous(), f"file {p.name}"
    w = T.base_weight(target, mode=spec, seed=seed)
    if tuple(w.shape[-2:]) != tuple(target.M.shape[-2:]):
        raise ValueError(f"W0 has shape {tuple(w.shape[-2:])}, the target {tuple(target.M.shape[-2:])}")
    if target.w0 is not None:
        return w, f"target's own ({target.w0_source})" if target.w0_source else "target's own"
    return w, f"stand-in ({spec})"


# --------------------------------------------------------------------------- #
# one fit -> one row
# --------------------------------------------------------------------------- #
def evaluate(method_name: str, target, config, *, w0=None, w0_source: str = "-",
             rank: int | None = None, convention: str = "equal", within_budget: bool = True,
             solver: str = "auto", steps: int | None = None, init: str | None = None,
             seed: int = 0, device: str | None = None, dtype=None, progress: bool = False,
             restarts: int = 1) -> dict[str, Any]:
    """Fit ``method_name`` with ``config`` to ``target.M`` and return a result row
    (plain Python values: the relative error per target, its mean and spread, the
    achieved effective ranks, the exact LoRA optimum at the same parameter count)."""

    method = theory.get_method(method_name)
    M = target.M  # (B, m, n)
    B, m, n = M.shape
    t0 = time.perf_counter()
    res = F.fit(method.name, M, config, w0=w0, solver=solver, steps=steps, init=init,
                seed=seed, device=device, dtype=dtype, progress=progress, restarts=restarts)
    wall = time.perf_counter() - t0
    delta = res.delta.detach()
    err = res.rel_error.detach().double().cpu()  # (B,)
    summ = spectra.summary(delta)  # numerical rank at the tolerance of delta's own dtype
    num_rank = summ["numerical_rank"].double().cpu()
    ent_rank = summ["entropy_rank"].double().cpu()
    n_params = int(method.n_params(m, n, config))
    if method.needs_w0 and w0 is not None:
        rank_w0 = int(spectra.numerical_rank(w0.double() if w0.dtype != torch.float64 else w0).max())
    else:
        rank_w0 = min(m, n)
    bound = int(method.rank_bound(m, n, rank_w0, config))
    lora_rank = min(n_params // (m + n), min(m, n))
    if lora_rank >= 1:
        lopt = F.lora_optimum(M.double() if M.dtype != torch.float64 else M, lora_rank)
        lopt = lopt.double().cpu()
    else:
        lopt = torch.ones(B, dtype=torch.float64)
    mu, sd = rio.mean_std(err.tolist())
    lmu, _ = rio.mean_std(lopt.tolist())
    diverged = res.diverged.detach().cpu() if torch.is_tensor(res.diverged) else torch.tensor(res.diverged)
    return {
        "target": target.name,
        "method": method.name,
        "convention": convention,
        "rank": rank,
        "config": str(config),
        "config_fields": config.asdict(),
        "n_params": n_params,
        "budget_rank": rank,
        "within_budget": bool(within_budget),
        "rank_bound": bound,
        "numerical_rank": float(num_rank.mean()),
        "entropy_rank": float(ent_rank.mean()),
        "rel_error": mu,
        "rel_error_std": sd,
        "rel_errors": err.tolist(),
        "lora_rank": lora_rank,
        "lora_optimum": lmu,
        "lora_optima": lopt.tolist(),
        "solver": res.solver,
        "init": res.init,
        "steps": int(res.steps),
        "seconds": float(res.seconds if res.seconds else wall),
        "diverged": int(diverged.sum()),
        "w0_source": w0_source if method.needs_w0 else "-",
        "seed": seed,
        "batch": B,
        "m": m,
        "n": n,
        "dtype": str(M.dtype if dtype is None else dtype).replace("torch.", ""),
        "device": str(device or M.device),
    }


# --------------------------------------------------------------------------- #
# table
# --------------------------------------------------------------------------- #
def _fmt_err(mu: float, sd: float, batch: int) -> str:
    if mu is None or not math.isfinite(mu):
        return "nan"
    return f"{mu:.4f} ± {sd:.4f}" if batch > 1 else f"{mu:.4f}"


def format_table(rows: list[dict[str, Any]], show_convention: bool = False) -> str:
    """Aligned plain-text table of result rows."""
    head = ["method", "config", "params", "rank bound", "num rank", "eff rank",
            "rel error", "LoRA same budget", "time", "solver", "W0"]
    if show_convention:
        head.insert(1, "convention")
    if all(r["w0_source"] == "-" for r in rows):
        head.remove("W0")
    lines = []
    for r in rows:
        over = "" if r.get("within_budget", True) else " (over budget)"
        cells = [
            r["method"],
            r["config"],
            f"{r['n_params']:,}{over}",
            str(r["rank_bound"]),
            f"{r['numerical_rank']:.1f}".rstrip("0").rstrip("."),
            f"{r['entropy_rank']:.1f}",
            _fmt_err(r["rel_error"], r["rel_error_std"], r["batch"]) + (" !" if r["diverged"] else ""),
            f"{r['lora_optimum']:.4f} (r={r['lora_rank']})",
            f"{r['seconds']:.2f}s",
            f"{r['solver']}" + (f"/{r['steps']}" if r["solver"] != "svd" and r["steps"] else ""),
            r["w0_source"],
        ][:len(head) - show_convention]
        if show_convention:
            cells.insert(1, r.get("convention", ""))
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h)
              for i, h in enumerate(head)]
    right = {"params", "rank bound", "num rank", "eff rank", "time"}

    def fmt(cells):
        return "  ".join(c.rjust(w) if h in right else c.ljust(w)
                         for c, w, h in zip(cells, widths, head)).rstrip()

    out = [fmt(head), "  ".join("-" * w for w in widths)]
    out += [fmt(c) for c in lines]
    return "\n".join(out)


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #
#: kept under this name for the commands that import it from here
CliParser = cli.Parser


def build_parser() -> argparse.ArgumentParser:
    ap = cli.Parser(prog="python -m reconstruction.run", description=__doc__)
    ap.add_argument("--method", default=DEFAULT_METHOD,
                    help=f"method name, comma list, or 'all' (default {DEFAULT_METHOD})")
    ap.add_argument("--rank", type=cli.positive_int, default=DEFAULT_RANK,
                    help="parameter budget of rank-r LoRA, r(m+n) (default %(default)s)")
    ap.add_argument("--r1", type=cli.positive_int, help="override r1 (abba / loha-like methods)")
    ap.add_argument("--r2", type=cli.positive_int, help="override r2 (abba / loha-like methods)")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override any config field, e.g. --set alpha=2 (repeatable)")
    ap.add_argument("--convention", choices=CONVENTIONS, default="equal",
                    help="'equal': budget of rank-r LoRA (ABBA r1=r2=r/2); 'published': "
                         "ABBA r1=r2=r as the paper's code runs it")
    ap.add_argument("--target", default=DEFAULT_TARGET,
                    help=f"target kind or file (.npy/.pt/.safetensors) (default {DEFAULT_TARGET})")
    ap.add_argument("--size", type=cli.positive_int, help=f"square targets N×N (default {DEFAULT_SIZE})")
    ap.add_argument("--shape", type=cli.positive_int, nargs=2, metavar=("M", "N"), help="target shape m×n")
    ap.add_argument("--batch", type=cli.positive_int, default=DEFAULT_BATCH,
                    help="number of targets fitted at once (default %(default)s)")
    ap.add_argument("--solver", default="auto", help="auto|svd|als|adam|lbfgs (default auto)")
    ap.add_argument("--steps", type=cli.positive_int,
                    help=f"ALS sweeps / Adam steps / L-BFGS iterations (default "
                         f"{QUICK_STEPS['als']} / {QUICK_STEPS['adam']} / {QUICK_STEPS['lbfgs']}; "
                         f"fewer if every target converges)")
    ap.add_argument("--init", help="initialization scheme (default: the solver's)")
    ap.add_argument("--restarts", type=cli.positive_int, default=1, help="random restarts, keep the best")
    ap.add_argument("--seed", type=cli.nonneg_int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu|cuda (default cpu)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--w0", default="gaussian",
                    help="W0 for methods that need one when the target has none: a stand-in "
                         "mode (default gaussian) or a file")
    ap.add_argument("--json", metavar="PATH", help="write results as JSON ('-' = stdout, no table)")
    ap.add_argument("--out", type=Path, metavar="DIR", help="write results.json + results.csv here")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def _shape(args) -> tuple[int, int]:
    if args.shape and args.size:
        raise ValueError("give --size or --shape, not both")
    if args.shape:
        shape = tuple(args.shape)
    else:
        s = DEFAULT_SIZE if args.size is None else args.size
        shape = (s, s)
    if min(shape) < 1:
        raise ValueError(f"target shape must be positive, got {shape[0]}x{shape[1]}")
    return shape


def run(args) -> tuple[list[dict], dict, list[str]]:
    """Do the work of the CLI; returns (rows, meta, notes)."""
    from . import targets as T

    device = check_device(args.device)
    dtype = DTYPES[args.dtype]
    cli.check_writable_file(args.json, "--json")
    cli.check_writable_dir(args.out, "--out")
    names = resolve_methods(args.method)
    explicit = args.method.strip().lower() != "all"
    overrides = parse_set(args.set)
    for key in ("r1", "r2"):
        flag = getattr(args, key)
        if flag is not None:
            if key in overrides and overrides[key] != flag:
                raise ValueError(f"--{key} {flag} and --set {key}={overrides[key]} disagree")
            overrides[key] = flag
    shape = _shape(args)
    if not Path(args.target).suffix:  # a generated kind: the targets, W0, ΔW and solver work
        cli.check_memory(8 * args.batch * shape[0] * shape[1] * torch.finfo(dtype).bits // 8,
                         f"--batch {args.batch} of {shape[0]}x{shape[1]} targets",
                         device, hint="lower --batch or --size")
    target = T.get_target(args.target, shape, args.batch, args.seed, dtype, device)
    m, n = target.M.shape[-2:]
    w0, w0_src = load_w0(args.w0, target, args.seed, dtype, device)
    if overrides and not explicit:
        have = [nm for nm in names if set(overrides) <= {f.name for f in
                                                          dataclasses.fields(theory.get_method(nm).Config)}]
        if not have:
            raise ValueError(f"no method has the config field(s) {', '.join(sorted(overrides))}")
    rows, notes = [], []
    progress = not args.no_progress and sys.stderr.isatty() and args.json != "-"
    for name in names:
        method = theory.get_method(name)
        try:
            cfg, within = config_for(method, m, n, args.rank, args.convention, overrides,
                                     strict=explicit)
        except ValueError as e:
            if explicit:
                raise
            notes.append(f"skipped {name}: {e}")
            continue
        if not within and not explicit:
            notes.append(f"skipped {name}: no configuration within the budget of rank-"
                         f"{args.rank} LoRA ({theory.lora_budget(m, n, args.rank):,} parameters)")
            continue
        steps = args.steps
        if steps is None:
            chosen = F.auto_solver(name, cfg, m, n) if args.solver == "auto" else args.solver
            steps = QUICK_STEPS.get(chosen)
        rows.append(evaluate(name, target, cfg, w0=w0, w0_source=w0_src, rank=args.rank,
                             convention=args.convention, within_budget=within,
                             solver=args.solver, steps=steps, init=args.init,
                             seed=args.seed, device=device, dtype=dtype, progress=progress,
                             restarts=args.restarts))
    meta = {
        "target": target.name, "labels": list(getattr(target, "labels", []) or []),
        "shape": [int(m), int(n)], "batch": int(target.M.shape[0]), "rank": args.rank,
        "budget": theory.lora_budget(m, n, args.rank), "convention": args.convention,
        "seed": args.seed, "dtype": args.dtype, "device": device, "solver": args.solver,
        "w0": w0_src, "torch": torch.__version__, "notes": notes,
    }
    return rows, meta, notes


def report(args, rows, meta, notes) -> None:
    """Write the files, then print the table (or the JSON to stdout)."""
    if args.out:
        rio.write_results(args.out, rows, meta)
    if cli.emit_json(args.json, {"meta": meta, "rows": rows}):
        return
    m, n = meta["shape"]
    print(f"target: {meta['target']}  {m}×{n}  batch {meta['batch']}  seed {meta['seed']}  "
          f"{meta['dtype']} on {meta['device']}")
    print(f"budget: rank-{meta['rank']} LoRA = {meta['budget']:,} parameters per matrix "
          f"({meta['convention']} convention); relative error ‖M−ΔW‖²_F/‖M‖²_F"
          + (" mean ± sd over the batch" if meta["batch"] > 1 else ""))
    if any(r["w0_source"] != "-" for r in rows):
        print(f"W0 (methods that need one): {meta['w0']}")
    print()
    print(format_table(rows))
    for note in notes:
        print(f"note: {note}")
    if args.out:
        print(f"wrote {args.out / 'results.json'} and {args.out / 'results.csv'}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def work():
        rows, meta, notes = run(args)
        report(args, rows, meta, notes)
        bad = [r["method"] for r in rows if r["diverged"]]
        if bad:
            raise cli.Failed(f"the fit diverged for {', '.join(bad)} (the error shown is the "
                             "best finite iterate's)")

    return cli.run(work, interrupted="nothing was saved")


if __name__ == "__main__":
    raise SystemExit(main())
