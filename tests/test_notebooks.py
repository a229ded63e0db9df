"""The notebooks open as intended and hold what they claim.

Each ``notebooks/*.py`` carries the jupytext py:percent header, so that Jupyter (and
``jupytext --to ipynb``) read it with one cell per ``# %%`` marker; each executes top
to bottom as a real notebook (jupytext -> nbclient on an ipykernel), and its
assertions (the rank bounds hold, theory within Monte Carlo error, ...) pass.
``python -m notebooks`` writes the paired ``.ipynb`` files."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from clicheck import call, interrupted, one_line

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[!_]*.py"))
jupytext = pytest.importorskip("jupytext")


def test_every_notebook_is_found():
    assert [p.stem for p in NOTEBOOKS] == ["adapters", "flat_minima_merging", "rank_bounds",
                                          "real_deltas", "reconstruction", "rmt_alpha_lora"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_jupyter_reads_one_cell_per_percent_marker(path):
    text = path.read_text(encoding="utf-8")
    nb = jupytext.reads(text, fmt="py")  # what Jupyter does: guess the format from the file
    rep = nb.metadata["jupytext"]["text_representation"]
    assert rep["format_name"] == "percent" and rep["extension"] == ".py"
    assert nb.metadata["jupytext"]["formats"] == "ipynb,py:percent"  # paired
    assert nb.metadata["kernelspec"]["name"] == "python3"
    markers = len(re.findall(r"^# %%", text, flags=re.MULTILINE))
    assert len(nb.cells) == markers
    assert not [c for c in nb.cells if "# %%" in c.source]  # no stray markers inside cells
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_notebook_checks_its_claims(path):
    nb = jupytext.read(path, fmt="py:percent")
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert len(re.findall(r"^\s*assert ", code, flags=re.MULTILINE)) >= 4


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_and_its_assertions_hold(path):
    nbclient = pytest.importorskip("nbclient")
    nb = jupytext.read(path, fmt="py:percent")
    os.environ["MPLBACKEND"] = "Agg"
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # a failing assertion raises CellExecutionError
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any(o.get("output_type") in ("stream", "display_data") for o in outputs)


# --------------------------------------------------------------------------- #
# python -m notebooks
# --------------------------------------------------------------------------- #
def _main():
    import importlib

    return importlib.import_module("notebooks.__main__")


def test_python_m_notebooks_writes_the_paired_ipynb_with_the_same_cells(tmp_path, capsys):
    import nbformat

    r = call(_main().main, ["--out", tmp_path], capsys)
    assert r.code == 0, r.err
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{p.stem}.ipynb" for p in NOTEBOOKS]
    for p in NOTEBOOKS:
        nb = nbformat.read(tmp_path / f"{p.stem}.ipynb", as_version=4)
        src = jupytext.read(p, fmt="py:percent")
        assert [c.source for c in nb.cells] == [c.source for c in src.cells]
        assert nb.metadata["jupytext"]["formats"] == "ipynb,py:percent"
        assert f"{p.stem}.ipynb ({len(src.cells)} cells)" in r.out


#: the header the notebooks had before issue 13: it names the percent format but no
#: extension, and jupytext (so Jupyter) then reads the file as a "light" script
INCOMPLETE = """# ---
# jupyter:
#   jupytext:
#     text_representation:
#       format_name: percent
# ---
"""


def test_a_notebook_with_an_incomplete_header_is_refused(tmp_path, monkeypatch):
    m = _main()
    text = (ROOT / "notebooks" / "rank_bounds.py").read_text(encoding="utf-8")
    (tmp_path / "rank_bounds.py").write_text(INCOMPLETE + text.split("# ---\n", 2)[2])
    monkeypatch.setattr(m, "HERE", tmp_path)
    with pytest.raises(ValueError, match=r"lacks the jupytext py:percent header \(read as light"):
        m.read("rank_bounds")


@pytest.mark.parametrize("argv, words", [
    (["nope"], "unknown notebook(s) nope; known: adapters"),
    (["--out", "/etc/hostname"], "--out /etc/hostname is a file; give a folder"),
    (["--out", "/proc/no/dir"], "--out /proc/no/dir: cannot write"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_python_m_notebooks_bad_input_one_line_exit_2(argv, words, capsys):
    one_line(call(_main().main, argv, capsys), words=words)


def test_python_m_notebooks_ctrl_c_exit_130(capsys, monkeypatch, tmp_path):
    m = _main()
    assert interrupted(m.main, ["--out", tmp_path], capsys, monkeypatch, m, "read") \
        .startswith("interrupted: ")
