"""What every command of the toolkit does the same way.

- :mod:`cli.parser`: :class:`Parser`, an ``argparse`` parser whose errors are one line
  (``error: ... (see PROG --help)``, exit 2), and argument types that say what is wrong.
- :mod:`cli.main`: :func:`run`, the wrapper around a command's work: bad input
  (``ValueError``/``OSError``/:class:`UsageError`) is one line and exit 2, a finished
  run with failed parts (:class:`Failed`) exit 1, Ctrl-C one line and exit 130.
- :mod:`cli.files`: the one atomic writer (temp file in the same folder, fsync, rename,
  the user's umask honoured), and the one JSON convention (NaN and ±inf are written as
  ``null``: strict JSON every parser reads).
- :mod:`cli.checks`: checks made before any work: output paths writable, a size that
  fits in memory, a device that exists.
- :mod:`cli.executor`: tasks run here or as Ray tasks on a cluster (``--executor``,
  ``--address``, ``--cpus-per-task``, ``--gpus-per-task``), results handed back to the
  driver as they finish (imported on its own: ``from cli import executor``).

Exit statuses of every command: 0 done, 1 done but some of the work failed (failed
sweep cells, a diverged run: listed on stderr, retried by the next run), 2 bad input or
an error that stopped the run, 130 interrupted (what was saved is said).
"""

from .checks import (check_device, check_memory, check_threads, check_writable_dir,
                     check_writable_file, format_bytes)
from .files import (append_jsonl, atomic_path, atomic_write, csv_text, dumps, emit_json,
                    read_jsonl, to_jsonable, write_csv, write_json)
from .main import (EXIT_FAILED, EXIT_INTERRUPT, EXIT_OK, EXIT_USAGE, Failed, UsageError,
                   guard_startup, run)
from .parser import (Parser, finite_float, int_list, nonneg_float, nonneg_int, positive_float,
                     positive_int, probability, str_list)

__all__ = [
    "EXIT_FAILED", "EXIT_INTERRUPT", "EXIT_OK", "EXIT_USAGE", "Failed", "Parser", "UsageError",
    "append_jsonl", "atomic_path", "atomic_write", "check_device", "check_memory",
    "check_threads", "check_writable_dir", "check_writable_file", "csv_text", "dumps", "emit_json",
    "finite_float", "format_bytes", "guard_startup", "int_list", "nonneg_float", "nonneg_int", "positive_float",
    "positive_int", "probability", "read_jsonl", "run", "str_list", "to_jsonable", "write_csv", "write_json",
]
