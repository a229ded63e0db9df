"""The one atomic writer and the one JSON convention.

Every result file goes through :func:`atomic_write` (bytes or text) or
:func:`atomic_path` (for libraries that write a path themselves: safetensors,
matplotlib, numpy): the data go to a temporary file in the destination's folder, are
flushed and fsynced, then ``os.replace``d over the destination, so a reader (or a
killed run) sees the old file or the new one, never half of one. The temporary file
is removed on any failure, and the result gets the permissions of a normal new file
(``0o666`` less the umask; ``mkstemp`` alone would leave ``0o600``).

JSON: strict (``allow_nan=False``); NaN and ±inf are written as ``null``. Tensors and
numpy values become lists and numbers, dataclasses dicts, paths strings.

The append-only log of a sweep (:func:`append_jsonl`) writes one complete line per
record and fsyncs it; :func:`read_jsonl` skips a torn last line.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an error, the
    file written there is fsynced and renamed to ``path``; else it is removed.

    ``suffix`` (default: ``path``'s own) matters to writers that choose the format by
    extension (matplotlib's ``savefig``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise IsADirectoryError(21, "Is a directory", str(path))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                               suffix=suffix if suffix is not None else (path.suffix or ".tmp"))
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically."""
    blob = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)
    return Path(path)


def to_jsonable(x: Any) -> Any:
    """Tensors, numpy values, dataclasses and paths as JSON values; NaN/±inf as None."""
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return to_jsonable(dataclasses.asdict(x))
    if hasattr(x, "tolist"):  # torch / numpy tensors and scalars
        return to_jsonable(x.tolist())
    return str(x)


def dumps(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON text of ``obj`` (see :func:`to_jsonable`)."""
    return json.dumps(to_jsonable(obj), indent=indent, allow_nan=False, ensure_ascii=False)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as strict, indented JSON with a trailing newline."""
    return atomic_write(path, dumps(obj) + "\n")


def emit_json(path: str | os.PathLike | None, obj: Any) -> bool:
    """The ``--json PATH`` convention of every command: ``-`` prints ``obj`` to stdout
    (and the caller prints nothing else: True), a path is written atomically (False), None
    writes nothing (False)."""
    if path is None or str(path) == "":
        return False
    if str(path) == "-":
        sys.stdout.write(dumps(obj) + "\n")
        return True
    write_json(path, obj)
    return False


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows as CSV text; columns default to the union of keys in first-seen order.
    Nested values (lists, dicts) are written as compact JSON, None/NaN as empty."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
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


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one record as one line and fsync it; a torn previous line is closed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(to_jsonable(record), allow_nan=False, ensure_ascii=False,
                      separators=(",", ":")) + "\n"
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
    """The complete records of a JSON-lines file (unparsable, torn lines skipped)."""
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
