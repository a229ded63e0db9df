"""Every notebook in notebooks/ (jupytext py:percent) executes top to bottom as a
real notebook (jupytext -> nbclient on an ipykernel), with no cell raising."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.py"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_without_error(path, tmp_path):
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    nb = jupytext.read(path)
    os.environ["MPLBACKEND"] = "Agg"
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3",
        resources={"metadata": {"path": str(path.parent.parent)}},
    )
    client.execute()
    n_code = sum(c.cell_type == "code" for c in nb.cells)
    assert n_code > 0, f"{path.name} has no code cell"
