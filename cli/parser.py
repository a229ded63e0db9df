"""An argument parser whose errors are one line, and argument types that explain themselves.

    ap = Parser(prog="python -m finetune.run", description=__doc__)
    ap.add_argument("--steps", type=positive_int, default=200)
    ap.add_argument("--lr", type=positive_float, default=1e-3)

``--steps 0`` then ends with ``error: argument --steps: must be >= 1, got 0 (see python
-m finetune.run --help)`` on stderr and exit status 2: no usage dump, no traceback.
Every type rejects NaN and inf where a number is expected, so a bad value is never
silently replaced or carried into the work.
"""

from __future__ import annotations

import argparse
import math
import sys


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with one-line errors (exit 2) and raw-text help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D102 (argparse's hook)
        first = message.strip().splitlines()[0] if message and message.strip() else "bad arguments"
        self.exit(2, f"error: {first} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):  # noqa: D102
        if args is None:
            args = sys.argv[1:]
        return super().parse_args(list(args), namespace)


def _number(text: str, kind, what: str):
    try:
        v = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if isinstance(v, float) and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return v


def _int(text: str) -> int:
    """An integer; ``1e3`` and ``1000.0`` are accepted when they are whole numbers."""
    try:
        return int(text)
    except (TypeError, ValueError):
        pass
    v = _number(text, float, "an integer")
    if not float(v).is_integer():
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    return int(v)


def positive_int(text: str) -> int:
    v = _int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return v


def nonneg_int(text: str) -> int:
    v = _int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def finite_float(text: str) -> float:
    return _number(text, float, "a number")


def positive_float(text: str) -> float:
    v = finite_float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def nonneg_float(text: str) -> float:
    v = finite_float(text)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def probability(text: str) -> float:
    """A number in [0, 1]."""
    v = finite_float(text)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return v


def int_list(text: str) -> list[int]:
    """``8,16,32`` or ``8:72:8`` (stop inclusive), or a mix; at least one value."""
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if ":" in part:
                a, b, *c = (int(x) for x in part.split(":"))
                step = c[0] if c else 1
                if step < 1 or len(c) > 1:
                    raise ValueError
                out += list(range(a, b + 1, step))
            else:
                out.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected integers like 8,16,32 or 8:72:8, got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return out


def str_list(text: str) -> list[str]:
    """``a,b,c`` -> ``["a", "b", "c"]`` (blanks dropped); at least one item."""
    out = [p.strip() for p in str(text).split(",") if p.strip()]
    if not out:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return out
