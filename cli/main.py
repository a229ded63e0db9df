"""The wrapper around every command's work: one line and a known exit status, always.

    def main(argv=None) -> int:
        args = build_parser().parse_args(argv)
        return cli.run(lambda: work(args), interrupted="finished runs are saved; rerun to resume")

==========================================  ======  =====================================
what happened                               status  on stderr
==========================================  ======  =====================================
the work returned                           0       (whatever the command printed)
:class:`Failed` (some cells/runs failed)    1       ``failed: <reason>``
``ValueError``, ``OSError``, UsageError,    2       ``error: <first line of the message>``
``KeyError`` (a missing field), out of
memory
Ctrl-C (``KeyboardInterrupt``)              130     ``interrupted: <what was saved>``
a closed pipe (``... | head``)              0       nothing
==========================================  ======  =====================================

Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPT = 0, 1, 2, 130


class UsageError(ValueError):
    """Bad input found after parsing (a flag combination, a value out of range)."""


class Failed(Exception):
    """The command ran to its end but part of the work failed (exit 1). The message
    says what failed; the parts that succeeded are saved, the failed ones are not."""


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    if isinstance(e, KeyError) and e.args:
        text = f"missing key {e.args[0]!r}"
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    return text.splitlines()[0] if text else type(e).__name__


def _out_of_memory() -> tuple[type[BaseException], ...]:
    try:
        import torch
        return (MemoryError, torch.OutOfMemoryError)
    except (ImportError, AttributeError):  # torch not installed: only Python's own
        return (MemoryError,)


def _interrupted_while_starting(signum, frame):
    try:
        sys.stderr.write("interrupted: while starting, before any work: nothing was done\n")
        sys.stderr.flush()
    finally:
        os._exit(EXIT_INTERRUPT)


def guard_startup() -> None:
    """Ctrl-C while a command is still importing (torch, transformers: seconds) prints one
    line and exits 130 instead of an import traceback. Called first thing by every
    package's ``__init__``; acts only for ``python -m <command>`` (``sys.argv[0] == "-m"``
    while the package imports) in the main thread with Python's own Ctrl-C handler in
    place, so importing the toolkit in Jupyter or a test changes nothing. :func:`run` puts
    Python's handler back when the work starts.

    Also, before torch loads: OpenMP threads that wait for work sleep instead of spinning
    (``OMP_WAIT_POLICY=PASSIVE``; a value already set is kept). On a machine shared with
    other jobs, spinning threads made a two-thread reconstruction fit 2.5-7× slower than
    one thread and a 1000×1000 SVD 5-8× slower (2-core CPU, load 3-7, measured in one
    session); on an idle machine the two policies timed the same."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if (sys.argv[:1] == ["-m"] and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
        signal.signal(signal.SIGINT, _interrupted_while_starting)


def run(work: Callable[[], int | None], *, interrupted: str = "nothing was saved",
        stderr=None) -> int:
    """Call ``work()`` and turn its outcome into an exit status (module docstring).

    ``interrupted``: what the user should know after Ctrl-C (what was saved, how to resume).
    ``work`` may return an int status (None means 0)."""
    err = stderr or sys.stderr
    if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        status = work()
        return EXIT_OK if status is None else int(status)
    except KeyboardInterrupt:
        print(f"interrupted: {interrupted}", file=err)
        return EXIT_INTERRUPT
    except BrokenPipeError:  # stdout closed by `| head`: not an error
        try:  # silence the flush at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_OK
    except Failed as e:
        print(f"failed: {first_line(e)}", file=err)
        return EXIT_FAILED
    except _out_of_memory() as e:
        print(f"error: out of memory: {first_line(e)}", file=err)
        return EXIT_USAGE
    except (ValueError, OSError, KeyError) as e:
        print(f"error: {first_line(e)}", file=err)
        return EXIT_USAGE
