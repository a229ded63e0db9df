"""Helpers for the bad-input tests of every command: call a ``main(argv)`` in this
process and check that it ended as the toolkit promises (``cli``): one line on stderr,
the right exit status, no traceback. An exception that escapes ``main`` (a bug, not
bad input) fails the test with its traceback."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Ended:
    code: int
    out: str
    err: str


def call(main, argv, capsys) -> Ended:
    """``main(argv)``'s exit status (argparse's ``SystemExit`` included) and output."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return Ended(int(code or 0), cap.out, cap.err)


def one_line(r: Ended, code: int = 2, prefix: str = "error: ", words: str = "") -> str:
    """The single stderr line of an ended command, checked."""
    lines = r.err.strip().splitlines()
    assert r.code == code, (r.code, r.err)
    assert len(lines) == 1, r.err
    assert lines[0].startswith(prefix), r.err
    assert "Traceback" not in r.err
    assert words.lower() in lines[0].lower(), (words, lines[0])
    return lines[0]


def interrupted(main, argv, capsys, monkeypatch, where, name: str) -> str:
    """Run ``main`` with ``where.name`` replaced by a function raising
    ``KeyboardInterrupt`` (Ctrl-C during the work): one line, exit 130."""
    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(where, name, ctrl_c)
    return one_line(call(main, argv, capsys), code=130, prefix="interrupted: ")


def refused(main, argv, capsys, words: str) -> str:
    """Bad input: one ``error:`` line containing ``words``, exit 2, nothing on stdout."""
    r = call(main, argv, capsys)
    line = one_line(r, words=words)
    assert r.out == "", r.out
    return line
