"""The reconstruction sweep: grid planning, resumption after an interruption
without recomputing finished cells, and the Figure 2 preset and figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reconstruction import io as rio
from reconstruction import published
from reconstruction import sweep as S

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def small_grid(**kw) -> S.Grid:
    base = dict(methods=["lora", "abba"], ranks=[2, 4], targets=["random", "orthogonal"],
                seeds=[0], conventions=["equal"], shape=(20, 20), batch=1, steps=3)
    base.update(kw)
    return S.Grid(**base)


def stable(rows: list[dict]) -> list[dict]:
    """Rows without the wall-clock fields (which differ between runs)."""
    return [{k: v for k, v in r.items() if k not in ("seconds",)} for r in rows]


class Counter:
    """Wraps reconstruction.sweep.evaluate, counting the fits actually computed."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = S.evaluate

        def wrapped(method, target, config, **kw):
            self.calls.append((method, str(config), kw.get("rank"), target.name))
            return real(method, target, config, **kw)

        monkeypatch.setattr(S, "evaluate", wrapped)


def test_interrupted_sweep_resumes_without_recomputing_and_matches_an_uninterrupted_run(
        tmp_path, monkeypatch):
    grid = small_grid()
    n_cells = len(S.plan(grid)[0])
    assert n_cells == 2 * 2 * 2  # targets × ranks × methods

    count = Counter(monkeypatch)

    def interrupt_after_3(cell, rec):
        if len(count.calls) == 3:
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        S.run_sweep(grid, out, on_cell=interrupt_after_3, figure=False)
    first = rio.read_jsonl(out / "cells.jsonl")
    assert len(first) == 3 and len(count.calls) == 3
    # the aggregated table was already written, atomically, with the finished cells
    assert len(json.loads((out / "results.json").read_text())["rows"]) == 3

    count.calls.clear()
    res = S.run_sweep(grid, out, figure=False)
    assert res["complete"] and res["computed"] == n_cells - 3
    assert len(count.calls) == n_cells - 3  # nothing finished was fitted again
    recs = rio.read_jsonl(out / "cells.jsonl")
    assert len(recs) == n_cells and len({r["key"] for r in recs}) == n_cells
    assert recs[:3] == first  # the first run's records are untouched
    assert len({r["run_id"] for r in recs}) == 2

    # a third run computes nothing
    count.calls.clear()
    again = S.run_sweep(grid, out, figure=False)
    assert again["computed"] == 0 and count.calls == []

    fresh = S.run_sweep(grid, tmp_path / "fresh", figure=False)
    assert stable(res["rows"]) == stable(fresh["rows"])
    assert stable(json.loads((out / "results.json").read_text())["rows"]) == stable(fresh["rows"])


def test_a_changed_parameter_is_a_new_cell(tmp_path, monkeypatch):
    out = tmp_path / "s"
    S.run_sweep(small_grid(targets=["random"]), out, figure=False)
    count = Counter(monkeypatch)
    res = S.run_sweep(small_grid(targets=["random"], steps=4), out, figure=False)
    assert res["computed"] == 4 and len(count.calls) == 4  # steps is part of every key


def test_torn_last_line_of_the_log_is_recomputed(tmp_path, monkeypatch):
    grid = small_grid(targets=["random"], methods=["lora"])
    out = tmp_path / "s"
    S.run_sweep(grid, out, figure=False)
    lines = (out / "cells.jsonl").read_text().splitlines()
    assert len(lines) == 2
    (out / "cells.jsonl").write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    count = Counter(monkeypatch)
    res = S.run_sweep(grid, out, figure=False)
    assert len(count.calls) == 1 and res["complete"]
    assert len(rio.read_jsonl(out / "cells.jsonl")) == 2


def test_max_cells_stops_and_a_rerun_of_the_cli_finishes_the_grid(tmp_path):
    out = tmp_path / "cli"
    args = [sys.executable, "-m", "reconstruction.sweep", "--methods", "lora,abba",
            "--ranks", "2,4", "--size", "20", "--steps", "2", "--out", str(out),
            "--no-figure"]
    p = subprocess.run([*args, "--max-cells", "3"], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == 0, p.stderr
    assert "incomplete" in p.stdout
    assert len(rio.read_jsonl(out / "cells.jsonl")) == 3
    p = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr
    assert "1 new cells, 4 in the grid, complete" in p.stdout
    recs = rio.read_jsonl(out / "cells.jsonl")
    assert len(recs) == 4 and len({r["key"] for r in recs}) == 4
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["method"], r["rank"]) for r in rows] == [
        ("lora", 2), ("abba", 2), ("lora", 4), ("abba", 4)]


def test_published_convention_doubles_only_abbas_ranks():
    cells = S.plan(small_grid(conventions=["equal", "published"], targets=["random"],
                              ranks=[4]))[0]
    got = {(c.method, c.convention): cfg for c, cfg in cells}
    assert set(got) == {("lora", "equal"), ("abba", "equal"), ("abba", "published")}
    assert (got[("abba", "equal")].r1, got[("abba", "equal")].r2) == (2, 2)
    assert (got[("abba", "published")].r1, got[("abba", "published")].r2) == (4, 4)


def test_preset_abba_fig2_is_the_papers_grid_and_size_shrinks_it():
    ap = S.build_parser()
    g = S.grid_from_args(ap.parse_args(["--preset", "abba-fig2"]))
    assert g.shape == (1000, 1000) and g.ranks == list(range(8, 73, 8))
    assert g.targets == ["orthogonal", "lowrank", "sparse", "random"]
    assert g.conventions == ["equal", "published"]
    import theory
    assert g.methods == theory.available()
    g = S.grid_from_args(ap.parse_args(["--preset", "abba-fig2", "--size", "256",
                                        "--methods", "lora,abba"]))
    assert g.shape == (256, 256) and g.methods == ["lora", "abba"]


def test_bad_sweep_arguments_exit_2_with_one_line(tmp_path, capsys):
    for argv in (["--methods", "nosuch"], ["--ranks", "a,b"], ["--conventions", "other"],
                 ["--max-cells", "-1"], ["--preset", "nosuch"]):
        try:
            rc = S.main([*argv, "--out", str(tmp_path)])
        except SystemExit as e:
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), argv


def test_figure_from_sweep_results_has_png_and_pdf(tmp_path):
    from figures import reconstruction_fig2 as fig2

    grid = small_grid(conventions=["equal", "published"], targets=["random", "sparse"])
    res = S.run_sweep(grid, tmp_path / "s", figure=True)
    assert [p.suffix for p in res["figure"]] == [".png", ".pdf"]
    paths = fig2.make(tmp_path / "fig", quick=True, results=tmp_path / "s")
    assert [p.name for p in paths] == ["reconstruction_fig2.png", "reconstruction_fig2.pdf"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_published_numbers_are_the_papers_endpoints():
    assert published.ABBA_FIG2["orthogonal"] == {8: 0.95, 72: 0.41}
    assert published.ABBA_FIG2["random"] == {8: 0.234, 72: 0.12}
    assert set(published.ABBA_FIG2) == set(published.FIG2_TARGETS)
    assert published.lora_orthogonal(72) == pytest.approx(0.928)


def test_published_convention_adds_over_budget_cells_only_for_abba_style_r1_r2_methods():
    cells, notes = S.plan(small_grid(methods=["full", "lora", "abba"], ranks=[4],
                                     targets=["random"], conventions=["equal", "published"]))
    got = {(c.method, c.convention) for c, _cfg in cells}
    assert got == {("lora", "equal"), ("abba", "equal"), ("abba", "published")}
    assert any("full" in x and "budget" in x for x in notes)
