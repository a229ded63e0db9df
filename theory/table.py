"""Every registered method at the parameter budget of rank-r LoRA.

    python -m theory.table --shape 4096 4096 --rank 16 [--rank-w0 K] [--json PATH|-]

Bad input (a rank above min(M, N), a side above :data:`MAX_SIDE`, an unwritable
``--json``) is one line on stderr and exit 2, checked before the table is built.

For each method: the configuration matched to the budget r (m + n) of rank-r LoRA
(``Method.config_for_rank``), its parameter count, its rank bound (W0 of rank
``rank_w0``, full rank by default) and both as ratios to LoRA. A method with no
configuration within the budget (e.g. full fine-tuning) gets a row saying so.
"""

from __future__ import annotations

import sys

import cli

from .base import lora_budget
from .registry import available, get_method


def _check_int(name: str, v, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise ValueError(f"{name} must be {rng}, got {v}")
    return v


def _compact(cfg) -> str:
    """``k=v`` for the fields that are set (None and False flags left out)."""
    parts = [f"{k}={v}" for k, v in cfg.asdict().items() if v is not None and v is not False]
    return ",".join(parts) if parts else "-"


def budget_table(m: int, n: int, r: int, rank_w0: int | None = None) -> list[dict]:
    """One dict per registered method at the budget of rank-``r`` LoRA on an m x n W0.

    Keys: method, config (str, or None if nothing fits), config_fields (dict),
    n_params, rank_bound,
    params_ratio and rank_ratio (to rank-r LoRA: n_params / (r(m+n)), bound / r),
    needs_w0, note.
    """
    m = _check_int("m", m, 1)
    n = _check_int("n", n, 1)
    r = _check_int("rank", r, 1, min(m, n))
    rank_w0 = min(m, n) if rank_w0 is None else _check_int("rank_w0", rank_w0, 0, min(m, n))
    budget = lora_budget(m, n, r)
    rows = []
    for name in available():
        meth = get_method(name)
        row = {"method": name, "config": None, "n_params": None, "rank_bound": None,
               "params_ratio": None, "rank_ratio": None, "needs_w0": meth.needs_w0, "note": ""}
        try:
            cfg = meth.config_for_rank(m, n, r)
        except ValueError:
            row["note"] = f"no configuration within {budget} parameters"
            rows.append(row)
            continue
        p = meth.n_params(m, n, cfg)
        b = meth.rank_bound(m, n, rank_w0, cfg)
        row.update(config=_compact(cfg), config_fields=cfg.asdict(), n_params=p, rank_bound=b,
                   params_ratio=p / budget, rank_ratio=b / r)
        rows.append(row)
    return rows


def format_table(rows: list[dict], m: int, n: int, r: int, rank_w0: int | None = None) -> str:
    """The rows as an aligned text table with a one-line header."""
    rk = min(m, n) if rank_w0 is None else rank_w0
    head = ["method", "config", "params", "x LoRA", "rank bound", "x LoRA", "note"]
    body = []
    for row in rows:
        if row["config"] is None:
            body.append([row["method"], "-", "-", "-", "-", "-", row["note"]])
            continue
        body.append([row["method"], row["config"], f"{row['n_params']:,}", f"{row['params_ratio']:.3f}",
                     f"{row['rank_bound']:,}", f"{row['rank_ratio']:.2f}",
                     "needs W0" if row["needs_w0"] else ""])
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    right = {2, 3, 4, 5}

    def fmt(cells):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    title = (f"budget of rank-{r} LoRA on a {m}x{n} W0 (rank W0 = {rk}): "
             f"{lora_budget(m, n, r):,} parameters")
    rule = "-" * len(fmt(head))
    return "\n".join([title, fmt(head), rule, *map(fmt, body)])


#: the largest side accepted by the CLI: some methods (LoKr) enumerate factorizations
#: of m and n, linear in the side (about 1 s at 10^7); no weight of any model is wider
MAX_SIDE = 10_000_000


def build_parser() -> cli.Parser:
    ap = cli.Parser(prog="python -m theory.table", description=__doc__)
    ap.add_argument("--shape", nargs=2, type=cli.positive_int, default=[4096, 4096],
                    metavar=("M", "N"), help="W0 shape d_out d_in (default 4096 4096)")
    ap.add_argument("--rank", type=cli.positive_int, default=16,
                    help="LoRA rank defining the budget (default 16)")
    ap.add_argument("--rank-w0", type=cli.nonneg_int, default=None,
                    help="rank of W0 (default: full rank)")
    ap.add_argument("--json", default=None, metavar="PATH",
                    help="also write the rows as JSON ('-': stdout, instead of the table)")
    return ap


def check_args(a) -> None:
    """Every value checked before any work (one-line ValueError naming the flag)."""
    m, n = a.shape
    if max(m, n) > MAX_SIDE:
        raise ValueError(f"--shape {m} {n}: each side must be at most {MAX_SIDE:,}")
    if a.rank > min(m, n):
        raise ValueError(f"--rank must be between 1 and min(M, N) = {min(m, n)}, got {a.rank}")
    if a.rank_w0 is not None and a.rank_w0 > min(m, n):
        raise ValueError(f"--rank-w0 must be between 0 and min(M, N) = {min(m, n)}, "
                         f"got {a.rank_w0}")
    cli.check_writable_file(a.json, "--json")


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)

    def work():
        check_args(a)
        m, n = a.shape
        rows = budget_table(m, n, a.rank, a.rank_w0)
        payload = {"shape": [m, n], "rank": a.rank,
                   "rank_w0": a.rank_w0 if a.rank_w0 is not None else min(m, n),
                   "budget": lora_budget(m, n, a.rank), "rows": rows}
        if a.json == "-":
            print(cli.dumps(payload))
            return
        if a.json:
            cli.write_json(a.json, payload)
        print(format_table(rows, m, n, a.rank, a.rank_w0))

    return cli.run(work, interrupted="nothing was saved")


if __name__ == "__main__":
    sys.exit(main())
