"""``python -m figures [NAME ...] [--out DIR] [--quick] [--list]``

Regenerates every figure (or the named ones) as PNG + PDF under ``--out``
(default ``figures/out``). ``--quick`` uses small sizes (what CI runs).

The names and the output folder are checked before any figure is drawn. With several
figures, one that fails (its data missing, say) is reported and the others are still
made; the exit status is then 1. Each file is written atomically, so an interrupted
run leaves every finished figure in place.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
from pathlib import Path

import cli
import figures
from cli.main import first_line

_NOT_FIGURES = {"save", "__main__"}
DEFAULT_OUT = Path("figures/out")


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(figures.__path__)
                  if m.name not in _NOT_FIGURES and not m.name.startswith("_"))


def build_parser() -> cli.Parser:
    ap = cli.Parser(prog="python -m figures", description=__doc__)
    ap.add_argument("names", nargs="*", help="figures to make (default: all; --list names them)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help=f"folder of the PNG and PDF files (default {DEFAULT_OUT})")
    ap.add_argument("--quick", action="store_true", help="small sizes, for CI and a first look")
    ap.add_argument("--list", action="store_true", help="list the figures and exit")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    names = available()

    def work():
        if args.list:
            if args.names:
                raise cli.UsageError("--list takes no figure names")
            print("\n".join(names))
            return
        unknown = [n for n in args.names if n not in names]
        if unknown:
            raise cli.UsageError(f"unknown figure(s) {', '.join(unknown)}; known: "
                                 f"{', '.join(names)}")
        cli.check_writable_dir(args.out, "--out")
        todo = list(dict.fromkeys(args.names)) or names
        failed = []
        for name in todo:
            t = time.perf_counter()
            mod = importlib.import_module(f"figures.{name}")
            try:
                paths = mod.make(args.out, quick=args.quick)
            except (ValueError, OSError, KeyError) as e:
                if len(todo) == 1:
                    raise
                failed.append(name)
                print(f"{name}: not made: {first_line(e)}", file=sys.stderr)
                continue
            print(f"{name}: {', '.join(str(p) for p in paths)} "
                  f"({time.perf_counter() - t:.1f}s)", flush=True)
        if failed:
            raise cli.Failed(f"{len(failed)} of {len(todo)} figures not made "
                             f"({', '.join(failed)}); the others are in {args.out}")

    return cli.run(work, interrupted=f"the figures finished before the interrupt are in "
                                     f"{args.out}")


if __name__ == "__main__":
    raise SystemExit(main())
