"""Result records of the reconstruction tools.

Files are written by the toolkit's one atomic writer and JSON convention
(:mod:`cli.files`, re-exported here): a temporary file in the same folder, fsynced,
renamed over the destination; NaN/inf as ``null``. The sweep's per-cell log
(``cells.jsonl``) is append-only: one complete JSON line per cell, fsynced; a torn
last line is ignored when the log is read back.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cli.files import (append_jsonl, atomic_write, csv_text, dumps, read_jsonl,  # noqa: F401
                       to_jsonable, write_csv, write_json)

# --------------------------------------------------------------------------- #
# result records
# --------------------------------------------------------------------------- #

#: the columns of a result table, in the order the CSV lists them
COLUMNS = (
    "target", "method", "convention", "rank", "config", "n_params", "budget_rank",
    "rank_bound", "numerical_rank", "entropy_rank", "rel_error", "rel_error_std",
    "lora_rank", "lora_optimum", "solver", "init", "steps", "seconds", "diverged",
    "w0_source", "seed", "batch", "m", "n", "dtype", "device",
)


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation of a list of floats."""
    v = [float(x) for x in values]
    if not v:
        return float("nan"), float("nan")
    mu = sum(v) / len(v)
    return mu, math.sqrt(sum((x - mu) ** 2 for x in v) / len(v))


def write_results(out: str | os.PathLike, rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any],
                  stem: str = "results") -> tuple[Path, Path]:
    """Write ``<out>/<stem>.json`` (meta + rows) and ``<out>/<stem>.csv`` (rows), atomically."""
    out = Path(out)
    j = write_json(out / f"{stem}.json", {"meta": dict(meta), "rows": list(rows)})
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    cols += [k for r in rows for k in r if k not in cols and not isinstance(r[k], (list, dict))]
    cols = list(dict.fromkeys(cols))
    c = write_csv(out / f"{stem}.csv", rows, cols)
    return j, c
