"""``python -m figures [NAME ...] [--out DIR] [--quick] [--list]``

Regenerates every figure (or the named ones) as PNG + PDF under ``--out``
(default ``figures/out``). ``--quick`` uses small sizes (what CI runs).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
from pathlib import Path

import figures

_NOT_FIGURES = {"save", "__main__"}


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(figures.__path__)
                  if m.name not in _NOT_FIGURES and not m.name.startswith("_"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m figures", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="figures to make (default: all)")
    ap.add_argument("--out", type=Path, default=Path("figures/out"))
    ap.add_argument("--quick", action="store_true", help="small sizes, for CI and a first look")
    ap.add_argument("--list", action="store_true", help="list the figures and exit")
    args = ap.parse_args(argv)
    names = available()
    if args.list:
        print("\n".join(names))
        return 0
    unknown = [n for n in args.names if n not in names]
    if unknown:
        print(f"error: unknown figure(s) {', '.join(unknown)}; known: {', '.join(names)}",
              file=sys.stderr)
        return 2
    for name in args.names or names:
        t = time.perf_counter()
        mod = importlib.import_module(f"figures.{name}")
        paths = mod.make(args.out, quick=args.quick)
        print(f"{name}: {', '.join(str(p) for p in paths)} ({time.perf_counter() - t:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
