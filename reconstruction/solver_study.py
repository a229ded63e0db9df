"""Confront the solvers with the ABBA paper's Fig. 2 (Singhal et al., 2025).

The four targets (orthogonal, low-rank, sparse, random) at ``--size`` (paper:
1000×1000), ABBA at r1 = r2 = each of ``--ranks``, fitted by ALS from several starts,
by Adam and by L-BFGS; prints one line per (rank, solver, init) with the four errors and the
wall time, and the exact LoRA optimum at the same parameter budget. Slow (minutes
per line at 1000×1000 on a CPU); its README numbers are held by a slow-tier test
(``tests/test_solver_study.py``).

    python -m reconstruction.solver_study --size 1000 --ranks 36,72 --json out.json
    python -m reconstruction.solver_study --size 1000 --ranks 36,72 --solvers lbfgs --lbfgs-iters 2000

At LoRA rank r the paper's axis reads "ABBA r1 = r2 = r/2" (equal budget), its
public code uses r1 = r2 = r (twice LoRA's parameters): r1 = r2 = 36 is the equal
budget of LoRA r = 72, r1 = r2 = 72 the code's convention at r = 72.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

import cli
import theory

from .fit import fit, inits_for, lora_optimum
from .published import ABBA_FIG2
from .targets import PAPER_KINDS, make_target

#: ABBA Fig. 2 values read off the plot at LoRA r = 72 (``reconstruction.published``)
PAPER_ABBA_R72 = {k: v[72] for k, v in ABBA_FIG2.items()}
SOLVERS = ("als", "adam", "lbfgs")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def build_parser() -> cli.Parser:
    ap = cli.Parser(prog="python -m reconstruction.solver_study", description=__doc__)
    ap.add_argument("--size", type=cli.positive_int, default=1000, help="targets N×N (default 1000)")
    ap.add_argument("--ranks", type=cli.int_list, default=[36, 72], help="ABBA r1 = r2 values")
    ap.add_argument("--solvers", type=cli.str_list, default=list(SOLVERS),
                    help="which solvers (default als,adam,lbfgs)")
    ap.add_argument("--sweeps", type=cli.positive_int, default=60, help="ALS sweeps per start")
    ap.add_argument("--adam-steps", type=cli.positive_int, default=1000)
    ap.add_argument("--adam-lr", type=cli.positive_float, default=1e-2)
    ap.add_argument("--als-inits", type=cli.str_list, default=["lora-warm", "gaussian"])
    ap.add_argument("--adam-inits", type=cli.str_list, default=["gaussian", "lora-warm"])
    ap.add_argument("--lbfgs-iters", type=cli.positive_int, default=500)
    ap.add_argument("--lbfgs-inits", type=cli.str_list, default=["lora-warm"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--seed", type=cli.nonneg_int, default=0)
    ap.add_argument("--json", default=None, help="write the rows here (atomically, after each line)")
    return ap


def validate(a) -> None:
    """Every value checked before any work (one-line ValueError)."""
    bad = [s for s in a.solvers if s not in SOLVERS]
    if bad:
        raise ValueError(f"--solvers: unknown {', '.join(bad)}; known: {', '.join(SOLVERS)}")
    for r in a.ranks:
        if not 1 <= r <= a.size:
            raise ValueError(f"--ranks: r1 = r2 = {r} must be in 1..{a.size} (the --size)")
    known = inits_for("abba")
    for flag, inits in (("--als-inits", a.als_inits), ("--adam-inits", a.adam_inits),
                        ("--lbfgs-inits", a.lbfgs_inits)):
        bad = [i for i in inits if i not in known]
        if bad:
            raise ValueError(f"{flag}: unknown init {bad[0]!r}; ABBA's: {', '.join(known)}")
    if "spectral" in a.als_inits + a.adam_inits + a.lbfgs_inits:
        big = [r for r in a.ranks if r * r > a.size]
        if big:
            raise ValueError(f"the spectral start needs r1·r2 <= --size ({big[0]}² > {a.size})")
    a.device = cli.check_device(a.device)
    cli.check_writable_file(a.json, "--json")
    nbytes = 4 * len(PAPER_KINDS) * a.size * a.size * 8 * 3  # targets, ΔW, the solvers' m×n work
    cli.check_memory(nbytes, f"four {a.size}x{a.size} targets", a.device, hint="lower --size")


def study(a, say: Callable[[str], None] = print, save: Callable[[list], None] | None = None) -> list[dict]:
    """Run the study the parsed flags ``a`` describe; returns the rows."""
    dtype = DTYPES[a.dtype]
    S = a.size
    M = torch.cat([make_target(k, (S, S), seed=a.seed, dtype=torch.float64).M for k in PAPER_KINDS])
    abba = theory.get_method("abba")
    rows: list[dict] = []
    say(f"targets {', '.join(PAPER_KINDS)} at {S}x{S}; paper ABBA at LoRA r=72: {PAPER_ABBA_R72}")
    for r in a.ranks:
        for rr in sorted({r, 2 * r} & set(range(1, S + 1))):
            lo = lora_optimum(M, rr)
            say(f"LoRA optimum r={rr} ({rr * 2 * S} params): "
                + " ".join(f"{k}={float(v):.4f}" for k, v in zip(PAPER_KINDS, lo)))
            rows.append({"method": "lora", "r": rr, "solver": "svd", "init": "-",
                         "errors": dict(zip(PAPER_KINDS, lo.tolist())), "seconds": 0.0})
        cfg = abba.config(r1=r, r2=r)
        inits = {"als": a.als_inits, "adam": a.adam_inits, "lbfgs": a.lbfgs_inits}
        steps = {"als": a.sweeps, "adam": a.adam_steps, "lbfgs": a.lbfgs_iters}
        for solver in [s for s in SOLVERS if s in a.solvers]:
            for init in inits[solver]:
                t0 = time.perf_counter()
                res = fit(abba, M, cfg, solver=solver, init=init, steps=steps[solver], seed=a.seed,
                          lr=a.adam_lr, device=a.device, dtype=dtype,
                          tol=1e-6 if solver == "als" else 1e-7)
                dt = time.perf_counter() - t0
                errs = dict(zip(PAPER_KINDS, res.rel_error.tolist()))
                say(f"ABBA r1=r2={r} ({abba.n_params(S, S, cfg)} params) {solver:5s} {init:9s} "
                    f"{res.steps:5d} it {dt:7.1f}s: " + " ".join(f"{k}={v:.4f}" for k, v in errs.items()))
                rows.append({"method": "abba", "r1": r, "r2": r, "solver": solver, "init": init,
                             "steps": res.steps, "errors": errs, "seconds": dt,
                             "history": res.history[:: max(1, len(res.history) // 50)]})
                if save is not None:
                    save(rows)
    return rows


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)

    def work():
        validate(a)

        def save(rows):
            if a.json:
                cli.write_json(a.json, {"size": a.size, "device": a.device, "dtype": a.dtype,
                                        "rows": rows})

        save(study(a, say=lambda s: print(s, flush=True), save=save))

    return cli.run(work, interrupted="the rows finished so far are in --json (if given)")


if __name__ == "__main__":
    raise SystemExit(main())
