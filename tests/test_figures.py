"""`python -m figures` regenerates every figure from code: each figure module's
quick mode writes a non-empty PNG and PDF, and an unknown name exits 2."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from figures.__main__ import available

NAMES = available()


def test_every_figure_module_defines_make():
    assert NAMES, "no figure modules found"
    for name in NAMES:
        assert callable(getattr(importlib.import_module(f"figures.{name}"), "make", None)), name


@pytest.mark.parametrize("name", NAMES)
def test_quick_figure_writes_png_and_pdf(name, tmp_path):
    paths = importlib.import_module(f"figures.{name}").make(tmp_path, quick=True)
    suffixes = {p.suffix for p in paths}
    assert {".png", ".pdf"} <= suffixes
    for p in paths:
        assert p.exists() and p.stat().st_size > 1000, p
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_unknown_figure_name_exits_2_with_one_line():
    r = subprocess.run([sys.executable, "-m", "figures", "no_such_figure"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "unknown figure" in r.stderr
    assert "Traceback" not in r.stderr
