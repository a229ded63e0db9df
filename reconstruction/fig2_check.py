"""``python -m reconstruction.fig2_check [RESULTS]``: a Figure 2 sweep against the README.

Reads the README's table "Every method at the budget of rank-r LoRA" (section "Results
measured with it": every method at r = 72 on the four 1000×1000 targets, and at r = 8
in brackets on the orthogonal and random ones) and the sweep's ``results.json`` (the
folder of ``python -m reconstruction.sweep --preset abba-fig2``, default
``results/reconstruction/abba-fig2``), and prints one line per README number: the
README's value, the sweep's, their difference, and ``ok`` or ``WORSE`` (the sweep's
error above the README's by more than ``--tol``, default 0.002; the README rounds to
three decimals). Lower is never a failure: a better fit is welcome.

``--baseline OTHER`` also compares every cell with another sweep of the grid (e.g. one
made before a solver change, ``python -m reconstruction.sweep --preset abba-fig2 --out
OTHER``): the largest excess over it and each cell worse than it by more than ``--tol``.

Exit status 0 when every README number is matched (and no cell is worse than the baseline), 1 when one is worse or missing
from the results (listed), 2 on bad input (no README table, no results file).

The README's rows are matched by their first column: "LoRA, exact SVD" is the sweep's
``lora`` cell, "ABBA, equal budget" / "ABBA, as published" its ``abba`` cells of the
``equal`` / ``published`` convention, "α-LoRA" is ``alpha_lora``, the rest by name.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import cli

#: the README table's heading cell, which identifies it
TABLE_HEAD = "| r = 72 (r = 8 in brackets"
TARGETS = ("orthogonal", "lowrank", "sparse", "random")
#: README row label (lower case, up to the first comma) -> (method, convention)
LABELS = {
    "lora": ("lora", "equal"), "hira": ("hira", "equal"), "loha": ("loha", "equal"),
    "lokr": ("lokr", "equal"), "miss": ("miss", "equal"), "smoa": ("smoa", "equal"),
    "hut": ("hut", "equal"), "pmss": ("pmss", "equal"), "dora": ("dora", "equal"),
    "vera": ("vera", "equal"), "α-lora": ("alpha_lora", "equal"),
}
TOL = 0.002


def readme_table(text: str) -> dict[tuple[str, str, str, int], float]:
    """{(method, convention, target, rank): README error} from the README's text."""
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith(TABLE_HEAD))
    except StopIteration:
        raise ValueError(f"the README has no table starting with {TABLE_HEAD!r}") from None
    out: dict[tuple[str, str, str, int], float] = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        label = cells[0].lower()
        if label.startswith("abba"):
            key = ("abba", "published" if "published" in label else "equal")
        else:
            key = LABELS.get(label.split(",")[0].strip())
        if key is None:
            raise ValueError(f"README table: unknown row {cells[0]!r}")
        for tgt, cell in zip(TARGETS, cells[3:7]):
            nums = [float(x) for x in re.findall(r"\d+\.\d+", cell.replace("*", ""))]
            if not nums:
                raise ValueError(f"README table: no number in {cell!r} ({cells[0]}, {tgt})")
            out[(*key, tgt, 72)] = nums[0]
            if len(nums) > 1:
                out[(*key, tgt, 8)] = nums[1]
    if not out:
        raise ValueError("the README's Figure 2 table has no rows")
    return out


def sweep_errors(results: Path) -> dict[tuple[str, str, str, int], float]:
    """{(method, convention, target, rank): error} of a sweep's ``results.json``
    (1000×1000 rows only; the mean over seeds where there are several)."""
    rows = json.loads(Path(results).read_text())["rows"]
    acc: dict[tuple, list[float]] = {}
    for r in rows:
        if (r.get("m"), r.get("n")) != (1000, 1000) or r.get("rel_error") is None:
            continue
        key = (r["method"], r.get("convention", "equal"), r["target"], int(r["rank"]))
        acc.setdefault(key, []).append(float(r["rel_error"]))
    return {k: sum(v) / len(v) for k, v in acc.items()}


def compare(readme: dict, got: dict, tol: float = TOL) -> list[dict]:
    """One record per README number: readme, got (None if missing), diff, status."""
    out = []
    for key, want in readme.items():
        have = got.get(key)
        diff = None if have is None else have - want
        status = "missing" if have is None else ("WORSE" if diff > tol else "ok")
        out.append({"method": key[0], "convention": key[1], "target": key[2], "rank": key[3],
                    "readme": want, "got": have, "diff": diff, "status": status})
    return out


def compare_sweeps(base: dict, got: dict, tol: float = TOL) -> tuple[list[dict], list[dict]]:
    """Every cell of ``base`` (``sweep_errors``) against ``got``: (records of the cells in
    both, sorted by excess, largest first; those missing from ``got``)."""
    recs, missing = [], []
    for key, want in base.items():
        rec = {"method": key[0], "convention": key[1], "target": key[2], "rank": key[3],
               "readme": want, "got": got.get(key)}
        if rec["got"] is None:
            missing.append({**rec, "diff": None, "status": "missing"})
            continue
        rec["diff"] = rec["got"] - want
        rec["status"] = "WORSE" if rec["diff"] > tol else "ok"
        recs.append(rec)
    return sorted(recs, key=lambda r: -r["diff"]), missing


def _read(res: Path) -> dict:
    res = res / "results.json" if res.is_dir() else res
    if not res.is_file():
        raise ValueError(f"{res}: no results file (run python -m reconstruction.sweep "
                         "--preset abba-fig2 first)")
    try:
        return sweep_errors(res)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{res}: not a sweep's results file ({type(e).__name__}: {e})") from None


def format_table(recs: list[dict]) -> str:
    head = f"{'method':<11} {'convention':<10} {'target':<10} {'r':>3} {'README':>7} {'sweep':>7} {'diff':>8}  status"
    lines = [head, "-" * len(head)]
    for r in recs:
        got = "" if r["got"] is None else f"{r['got']:.4f}"
        diff = "" if r["diff"] is None else f"{r['diff']:+.4f}"
        lines.append(f"{r['method']:<11} {r['convention']:<10} {r['target']:<10} {r['rank']:>3} "
                     f"{r['readme']:>7.4f} {got:>7} {diff:>8}  {r['status']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = cli.Parser(prog="python -m reconstruction.fig2_check", description=__doc__)
    ap.add_argument("results", nargs="?", type=Path, default=Path("results/reconstruction/abba-fig2"),
                    help="the sweep's folder or its results.json")
    ap.add_argument("--readme", type=Path, default=Path(__file__).resolve().parent.parent / "README.md")
    ap.add_argument("--tol", type=cli.nonneg_float, default=TOL,
                    help=f"how much higher than the README an error may be (default {TOL})")
    ap.add_argument("--baseline", type=Path, metavar="OTHER",
                    help="also compare every cell with another sweep's folder or results.json")
    args = ap.parse_args(argv)

    def work():
        if not args.readme.is_file():
            raise ValueError(f"--readme {args.readme}: no such file")
        got = _read(args.results)
        base = None if args.baseline is None else _read(args.baseline)
        recs = compare(readme_table(args.readme.read_text()), got, args.tol)
        print(format_table(recs))
        worse = [r for r in recs if r["status"] == "WORSE"]
        missing = [r for r in recs if r["status"] == "missing"]
        ok = len(recs) - len(worse) - len(missing)
        worst = max((r["diff"] for r in recs if r["diff"] is not None), default=float("nan"))
        print(f"{ok} of {len(recs)} README numbers matched (largest excess {worst:+.4f}, "
              f"tolerance {args.tol}); {len(worse)} worse, {len(missing)} missing")
        bad = []
        if base is not None:
            cells, gone = compare_sweeps(base, got, args.tol)
            over = [r for r in cells if r["status"] == "WORSE"]
            print(f"\nagainst {args.baseline}: {len(cells)} cells in both, {len(gone)} missing here")
            print(format_table(cells[:5] + [r for r in over[5:]] + gone).replace("README", "  base"))
            if cells:
                d = [r["diff"] for r in cells]
                print(f"largest excess {max(d):+.4f}, largest gain {min(d):+.4f}, mean change "
                      f"{sum(d) / len(d):+.5f}; {len(over)} worse than the baseline by more than {args.tol}")
            if over or gone:
                bad.append(f"{len(over)} cell(s) worse than the baseline, {len(gone)} missing")
        if worse or missing:
            bad.insert(0, f"{len(worse)} worse than the README by more than {args.tol}, "
                          f"{len(missing)} missing (listed above)")
        if bad:
            raise cli.Failed("; ".join(bad))

    return cli.run(work)


if __name__ == "__main__":
    sys.exit(main())
