"""Result records and atomic writing (JSON, CSV, JSON lines).

Every file the reconstruction tools write goes through :func:`atomic_write`: the
text is written to a temporary file in the same folder, flushed to disk, then
moved over the destination with ``os.replace`` (atomic on POSIX and Windows), so
an interrupted run leaves either the old file or the new one, never half of one.

The sweep's per-cell log (``cells.jsonl``) is append-only instead: one complete
JSON object per line, flushed and fsynced after each cell; a torn last line (a
kill during the write) is ignored when the log is read back.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------- #
# atomic writes
# --------------------------------------------------------------------------- #


def atomic_write(path: str | os.PathLike, text: str | bytes) -> Path:
    """Write ``text`` to ``path`` atomically (temp file in the same folder + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8") if isinstance(text, str) else text
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def to_jsonable(x: Any) -> Any:
    """Turn tensors, numpy scalars, dataclasses, paths and non-finite floats into JSON values
    (NaN and inf become ``None``, so the output is strict JSON)."""
    import dataclasses

    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return to_jsonable(dataclasses.asdict(x))
    if hasattr(x, "tolist"):  # torch / numpy tensors and scalars
        return to_jsonable(x.tolist())
    return str(x)


def dumps(obj: Any, indent: int | None = 2) -> str:
    return json.dumps(to_jsonable(obj), indent=indent, allow_nan=False, ensure_ascii=False)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as strict JSON (indented, trailing newline)."""
    return atomic_write(path, dumps(obj) + "\n")


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows (dicts) as CSV text; columns default to the union of keys in first-seen order.
    Nested values (lists, dicts) are written as compact JSON."""
    if columns is None:
        columns = []
        for r in rows:
            for k in r:
                if k not in columns:
                    columns.append(k)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        out = []
        for c in columns:
            v = to_jsonable(r.get(c))
            if isinstance(v, (list, dict)):
                v = json.dumps(v, separators=(",", ":"))
            out.append("" if v is None else v)
        w.writerow(out)
    return buf.getvalue()


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]],
              columns: Sequence[str] | None = None) -> Path:
    """Atomically write ``rows`` as CSV."""
    return atomic_write(path, csv_text(rows, columns))


# --------------------------------------------------------------------------- #
# append-only JSON lines (the sweep's cell log)
# --------------------------------------------------------------------------- #


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one record as a single line and fsync it (the line is written in one call)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(to_jsonable(record), allow_nan=False, ensure_ascii=False,
                      separators=(",", ":")) + "\n"
    # make sure a torn previous line (a kill mid-write) does not swallow this one
    prefix = ""
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                prefix = "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(prefix + line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All complete records of a JSON-lines file; unparsable (torn) lines are skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


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
