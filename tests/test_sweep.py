"""The reconstruction sweep: grid planning, batches that give every cell the numbers of
a fit of it alone, resumption after an interruption without recomputing finished
cells, failed cells recorded, retried and reported (exit 1), bad input refused before
any work (exit 2), and the same cells on a Ray executor as locally, also after the
driver is killed."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import theory
from reconstruction import cells as C
from reconstruction import io as rio
from reconstruction import published
from reconstruction import sweep as S
from reconstruction.fit import lora_optimum
from reconstruction.targets import make_target

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def small_grid(**kw) -> S.Grid:
    base = dict(methods=["lora", "abba"], ranks=[2, 4], targets=["random", "orthogonal"],
                seeds=[0], conventions=["equal"], shape=(20, 20), batch=1, steps=3)
    base.update(kw)
    return S.Grid(**base)


def stable(rows: list[dict]) -> list[dict]:
    """Rows without the wall-clock fields (which differ between runs)."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "fitted_as")} for r in rows]


class Counter:
    """Wraps the sweep's batch runner (local executor), counting the cells fitted."""

    def __init__(self, monkeypatch):
        self.calls: list[C.Cell] = []
        real = S.run_batch

        def wrapped(batch):
            self.calls += list(batch.cells)
            return real(batch)

        monkeypatch.setattr(S, "run_batch", wrapped)


def _ray():
    pytest.importorskip("ray")
    from cli import executor as X
    # one small local instance per test session (shared with tests/test_executor.py); it
    # declares one GPU so that GPU requests can be scheduled here (no CUDA is used)
    X.local_ray(num_cpus=2, num_gpus=1)
    return X


# --------------------------------------------------------------------------- #
# resume
# --------------------------------------------------------------------------- #
def test_interrupted_sweep_resumes_without_recomputing_and_matches_an_uninterrupted_run(
        tmp_path, monkeypatch):
    grid = small_grid()
    n_cells = len(S.plan(grid)[0])
    assert n_cells == 2 * 2 * 2  # targets × ranks × methods

    count = Counter(monkeypatch)
    seen = []

    def interrupt_after_3(cell, rec):
        seen.append(cell)
        if len(seen) == 3:
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        S.run_sweep(grid, out, on_cell=interrupt_after_3, figure=False)
    first = rio.read_jsonl(out / "cells.jsonl")
    assert len(first) >= 3 and len(count.calls) == len(first)  # every fitted cell was stored
    # the aggregated table was already written, atomically, with the finished cells
    assert len(json.loads((out / "results.json").read_text())["rows"]) == len(first)

    count.calls.clear()
    res = S.run_sweep(grid, out, figure=False)
    assert res["complete"] and res["computed"] == n_cells - len(first)
    assert len(count.calls) == n_cells - len(first)  # nothing finished was fitted again
    recs = rio.read_jsonl(out / "cells.jsonl")
    assert len(recs) == n_cells and len({r["key"] for r in recs}) == n_cells
    assert recs[:len(first)] == first  # the first run's records are untouched
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


# --------------------------------------------------------------------------- #
# batches
# --------------------------------------------------------------------------- #
def test_cells_sharing_method_config_and_shape_form_one_batch_and_repeated_configs_one_fit():
    grid = small_grid(methods=["lora", "vera"], ranks=[2, 4], targets=["random", "sparse"],
                      seeds=[0, 1])
    cells, _ = S.plan(grid)
    got = C.batches(cells)
    lora = [b for b in got if b.cells[0].method == "lora"]
    assert len(lora) == 2 and all(len(b.cells) == 4 and len(b.fits) == 4 for b in lora)
    vera = [b for b in got if b.cells[0].method == "vera"]  # r = min(m, n) at both budgets
    assert len(vera) == 1 and len(vera[0].cells) == 8 and len(vera[0].fits) == 4
    assert sorted(c.key for b in got for c in b.cells) == sorted(c.key for c, _ in cells)
    assert [len(b.cells) for b in C.batches(cells, batched=False)] == [1] * len(cells)
    assert all(len(b.fits) <= 3 for b in C.batches(cells, max_fits=3))


def test_every_cell_has_the_same_numbers_in_a_batch_as_fitted_alone(tmp_path):
    """Every method, two seeds, three targets: the batched sweep and the cell-by-cell one
    give identical rows, bit for bit (one CPU thread, as the test session runs), and a
    row is what
    ``reconstruction.run.evaluate`` returns for that cell alone."""
    from reconstruction.run import evaluate, load_w0
    from reconstruction.targets import get_target

    assert torch.get_num_threads() == 1
    grid = small_grid(methods=theory.available(), ranks=[8], targets=["random", "sparse", "lowrank"],
                      seeds=[0, 1], shape=(48, 32), steps=25, conventions=["equal", "published"])
    batched = S.run_sweep(grid, tmp_path / "b", figure=False)
    alone = S.run_sweep(grid, tmp_path / "a", figure=False, batched=False)
    assert batched["batches"] < alone["batches"] == batched["total"]
    assert batched["complete"] and not batched["errors"]
    assert stable(batched["rows"]) == stable(alone["rows"])
    for row in batched["rows"][:: 7]:
        tgt = get_target(row["target"], (48, 32), 1, row["seed"])
        w0, src = load_w0("gaussian", tgt, row["seed"], torch.float32, "cpu")
        cfg = theory.get_method(row["method"]).config(**row["config_fields"])
        ref = evaluate(row["method"], tgt, cfg, w0=w0, w0_source=src, rank=row["rank"],
                       convention=row["convention"], steps=25, seed=row["seed"], device="cpu",
                       dtype=torch.float32, within_budget=row["convention"] == "equal")
        ref["target"] = row["target"]
        assert stable([row]) == stable([ref]), row["method"]


def test_loha_cells_are_answered_by_abbas_fit_with_the_numbers_of_lohas_own_fit(tmp_path):
    """LoHa without α is ABBA at r1 = r2 = r (``Method.same_update``): with L-BFGS, as the
    Figure 2 grid fits them, one fit answers both, and each LoHa row is what LoHa's own
    fit gives, bit for bit; a LoHa start of its own ("paper") is never shared."""
    grid = small_grid(methods=["abba", "loha"], ranks=[4, 8], targets=["random", "orthogonal"],
                      shape=(32, 32), steps=30, solver="lbfgs", conventions=["equal", "published"])
    cells, _ = S.plan(grid)
    got = C.batches(cells)
    shared = [b for b in got if {c.method for c in b.cells} == {"abba", "loha"}]
    assert len(shared) == 2 and all(b.fit_as[0] == "abba" for b in shared)
    assert not any(b.cells[0].method == "loha" for b in got if b not in shared)
    batched = S.run_sweep(grid, tmp_path / "b", figure=False)
    alone = S.run_sweep(grid, tmp_path / "a", figure=False, batched=False)
    assert batched["complete"] and batched["batches"] == 3 < alone["batches"] == 12
    assert stable(batched["rows"]) == stable(alone["rows"])
    loha = [r for r in batched["rows"] if r["method"] == "loha"]
    assert len(loha) == 4 and all(r["fitted_as"].startswith("abba r1=") for r in loha)
    paper = [(c, cfg) for c, cfg in S.plan(small_grid(methods=["abba", "loha"], ranks=[4],
                                                      init="paper", solver="lbfgs"))[0]]
    assert all(b.fit_as[0] == b.cells[0].method for b in C.batches(paper))


def test_batches_are_handed_out_largest_estimated_work_first(tmp_path):
    """So that parallel workers finish together: the grid's slowest fits start first."""
    from cli import executor as X

    seen = []

    class Recording(X.LocalExecutor):
        def map(self, fn, tasks):
            tasks = list(tasks)
            seen.extend(tasks)
            yield from super().map(fn, tasks)

    grid = small_grid(methods=["lora", "hira", "vera"], ranks=[2, 4], targets=["random"])
    assert S.run_sweep(grid, tmp_path, figure=False, executor=Recording())["complete"]
    work = [C.cost(b) for b in seen]
    assert work == sorted(work, reverse=True)
    assert [(b.cells[0].method, b.cells[0].rank) for b in seen] == \
        [("vera", 2), ("hira", 4), ("hira", 2), ("lora", 2), ("lora", 4)]


def test_width_one_factors_and_odd_sizes_give_the_same_numbers_in_a_batch_as_alone(tmp_path):
    """At budgets 2 and 3 on 40×40 targets (rank-one factors: GEMV-shaped products,
    which a BLAS sums in another order for one matrix than for several; and rows that
    do not fill SIMD vectors) the batched sweep still gives every cell the numbers of a
    fit of it alone, including which of ABBA's screened ALS starts wins."""
    grid = small_grid(methods=theory.available(), ranks=[2, 3], targets=["lowrank", "random"],
                      seeds=[0], shape=(40, 40), steps=40, conventions=["equal", "published"])
    batched = S.run_sweep(grid, tmp_path / "b", figure=False)
    alone = S.run_sweep(grid, tmp_path / "a", figure=False, batched=False)
    assert batched["complete"] and batched["batches"] < alone["batches"]
    assert stable(batched["rows"]) == stable(alone["rows"])


# --------------------------------------------------------------------------- #
# failed cells
# --------------------------------------------------------------------------- #
def test_a_failed_cell_is_recorded_listed_exits_1_and_is_retried_by_the_next_run(
        tmp_path, monkeypatch, capsys):
    real = C._fit_rows

    def broken(batch, fits):
        if batch.cells[0].method == "abba":
            raise RuntimeError("the solver broke (a test)")
        return real(batch, fits)

    monkeypatch.setattr(C, "_fit_rows", broken)
    out = tmp_path / "s"
    argv = ["--methods", "lora,abba", "--ranks", "2,4", "--size", "20", "--steps", "3",
            "--targets", "random", "--out", str(out), "--no-figure", "--no-progress"]
    assert S.main(argv) == 1
    cap = capsys.readouterr()
    failed = [x for x in cap.err.splitlines() if x.startswith("failed cell: abba")]
    assert len(failed) == 2 and all("the solver broke" in x for x in failed)
    assert cap.err.strip().splitlines()[-1].startswith("failed: 2 of 4 cells failed")
    assert "2 failed" in cap.out and "complete;" not in cap.out
    recs = rio.read_jsonl(out / "cells.jsonl")
    assert sum("error" in r for r in recs) == 2 and sum("row" in r for r in recs) == 2
    assert len(json.loads((out / "results.json").read_text())["meta"]["failed"]) == 2

    monkeypatch.setattr(C, "_fit_rows", real)
    count = Counter(monkeypatch)
    assert S.main(argv) == 0
    assert sorted(c.method for c in count.calls) == ["abba", "abba"]  # only the failed ones
    assert "2 new cells, 4 in the grid, complete" in capsys.readouterr().out
    assert len(S.load_done(out)) == 4 and S.load_failed(out) == {}


BAD = [
    (["--methods", "nosuch"], "unknown method"),
    (["--ranks", "a,b"], "--ranks"),
    (["--ranks", ""], "--ranks"),
    (["--ranks", "100000", "--size", "16"], "above min(m, n) = 16"),
    (["--ranks", "0"], "--ranks"),
    (["--size", "0"], "--size"),
    (["--batch", "0"], "--batch"),
    (["--steps", "0"], "--steps"),
    (["--restarts", "0"], "--restarts"),
    (["--solver", "foo"], "--solver foo"),
    (["--init", "foo"], "--init foo"),
    (["--methods", "hut", "--solver", "svd"], "does not apply to hut"),
    (["--conventions", "other"], "--conventions"),
    (["--max-cells", "-1"], "--max-cells"),
    (["--preset", "nosuch"], "--preset"),
    (["--targets", "nosuch"], "neither a target kind"),
    (["--w0", "nosuch"], "--w0"),
    (["--seeds", "-1"], "--seeds"),
    (["--size", "100000000", "--ranks", "8"], "needs about"),
    (["--device", "tpu"], "--device"),
    (["--preset", "abba-fig2", "--device", "tpu"], "--device tpu"),  # a long grid: auto
    (["--executor", "ray", "--device", "tpu"], "--device tpu"),  # checked before Ray starts
    (["--executor", "local", "--address", "auto"], "--address is for --executor ray"),
    (["--executor", "local", "--gpus-per-task", "1"], "--gpus-per-task is for --executor ray"),
    (["--address", "127.0.0.1:1"], "no Ray cluster answers"),  # auto: a Ray flag asks for Ray
    (["--executor", "ray", "--gpus-per-task", "nan"], "--gpus-per-task"),
    (["--executor", "ray", "--cpus-per-task", "0"], "--cpus-per-task"),
    (["--executor", "ray", "--address", "127.0.0.1:1"], "no Ray cluster answers"),
]


@pytest.mark.parametrize("argv,says", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_sweep_arguments_exit_2_with_one_line_before_any_work(argv, says, tmp_path, capsys):
    out = tmp_path / "s"
    try:
        rc = S.main([*argv, "--out", str(out)])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), (argv, err)
    assert says in err, err
    assert not out.exists()  # nothing was written


def test_an_unwritable_out_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert S.main(["--out", str(tmp_path / "file"), "--size", "16", "--ranks", "2"]) == 2
    assert "is a file" in capsys.readouterr().err


# --------------------------------------------------------------------------- #
# Ray
# --------------------------------------------------------------------------- #
def test_ray_executor_gives_the_local_cells_and_the_driver_alone_writes(tmp_path):
    X = _ray()
    grid = small_grid(methods=["lora", "abba", "vera", "hira"], ranks=[2, 4],
                      targets=["random", "sparse"], shape=(24, 24), steps=10)
    local = S.run_sweep(grid, tmp_path / "local", figure=False)
    ex = X.make("ray")
    assert not ex.owned  # the session's instance, left running
    remote = S.run_sweep(grid, tmp_path / "ray", figure=False, executor=ex)
    assert remote["complete"] and remote["computed"] == local["computed"] == len(S.plan(grid)[0])
    a, b = stable(local["rows"]), stable(remote["rows"])
    assert [(r["method"], r["rank"], r["target"]) for r in a] == [
        (r["method"], r["rank"], r["target"]) for r in b]
    for x, y in zip(a, b):
        assert x["rel_errors"] == pytest.approx(y["rel_errors"], rel=1e-6, abs=1e-9)
        assert {k: v for k, v in x.items() if k not in ("rel_errors", "rel_error", "rel_error_std",
                                                         "numerical_rank", "entropy_rank")} == \
            {k: v for k, v in y.items() if k not in ("rel_errors", "rel_error", "rel_error_std",
                                                      "numerical_rank", "entropy_rank")}
    assert json.loads((tmp_path / "ray" / "results.json").read_text())["meta"]["executor"] == "ray"


def test_more_gpus_per_task_than_the_cluster_has_exits_2_and_keeps_finished_cells(tmp_path, capsys):
    _ray()
    out = tmp_path / "s"
    argv = ["--methods", "lora", "--ranks", "2", "--size", "16", "--out", str(out), "--no-figure"]
    assert S.main(argv) == 0
    before = (out / "cells.jsonl").read_bytes()
    capsys.readouterr()
    assert S.main([*argv, "--ranks", "2,4", "--executor", "ray", "--gpus-per-task", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --gpus-per-task 2 is more than the Ray cluster has") and \
        len(err.strip().splitlines()) == 1
    assert (out / "cells.jsonl").read_bytes() == before


def test_an_address_with_no_ray_cluster_exits_2_with_one_line_and_keeps_finished_cells(
        tmp_path, capsys):
    """A port that accepts and stays silent (Ray's own join would wait there without end)."""
    pytest.importorskip("ray")
    import socket

    out = tmp_path / "s"
    argv = ["--methods", "lora", "--ranks", "2", "--size", "16", "--out", str(out), "--no-figure"]
    assert S.main(argv) == 0
    before = (out / "cells.jsonl").read_bytes()
    capsys.readouterr()
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        addr = f"127.0.0.1:{srv.getsockname()[1]}"
        assert S.main([*argv, "--ranks", "2,4", "--executor", "ray", "--address", addr]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"error: --address {addr}: no Ray cluster answers there "
                                        "(no reply in 5 s)"]
    assert (out / "cells.jsonl").read_bytes() == before


def test_ray_not_installed_exits_2_with_one_line(tmp_path):
    fake = tmp_path / "noray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    env = {**ENV, "PYTHONPATH": f"{tmp_path / 'noray'}{os.pathsep}{ROOT}"}
    p = subprocess.run([sys.executable, "-m", "reconstruction.sweep", "--executor", "ray",
                        "--size", "16", "--ranks", "2", "--out", str(tmp_path / "s")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "error: --executor ray needs Ray, which is not installed: pip install -e '.[cluster]'"]


def _kill_session(pid: int) -> None:
    """SIGKILL every process of the session ``pid`` leads (the driver and the local Ray
    instance it started)."""
    for line in subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True,
                               text=True).stdout.splitlines():
        p, sid = (int(x) for x in line.split())
        if sid == pid:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_killed_ray_driver_resumes_with_no_finished_cell_recomputed(tmp_path):
    """The driver (a process of its own) joins the session's Ray instance by its address
    (starting one per driver costs 20-40 s here), is SIGKILLed once a cell is written,
    and the same command then fits only the cells that were not."""
    _ray()
    import ray
    address = ray.get_runtime_context().gcs_address
    out = tmp_path / "s"
    args = [sys.executable, "-m", "reconstruction.sweep", "--methods", "hut", "--solver", "adam",
            "--steps", "800", "--ranks", "2,4,6,8", "--size", "64", "--out", str(out),
            "--no-figure", "--quiet", "--executor", "ray", "--address", address]
    # the instance's authentication mode (Ray sets RAY_AUTH_MODE when it starts one, and a
    # driver joining an explicit address must ask for the same)
    env = {**ENV, **{k: v for k, v in os.environ.items() if k.startswith("RAY_AUTH")}}
    p = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    log = out / "cells.jsonl"
    try:
        t0 = time.time()
        while time.time() - t0 < 400 and p.poll() is None:
            if log.exists() and log.read_text().count("\n") >= 1:
                break
            time.sleep(0.05)
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)  # the driver, mid-run
        p.wait()
    finally:
        _kill_session(p.pid)
    first = rio.read_jsonl(log)
    assert 1 <= len(first) < 4, "the driver was not killed mid-run"
    q = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert q.returncode == 0, q.stderr
    recs = rio.read_jsonl(log)
    assert recs[:len(first)] == first
    assert len(recs) == 4 and len({r["key"] for r in recs}) == 4  # none fitted twice
    assert f"{4 - len(first)} new cells, 4 in the grid, complete" in q.stdout


# --------------------------------------------------------------------------- #
# grid and preset
# --------------------------------------------------------------------------- #
def test_published_convention_doubles_only_abbas_ranks():
    cells = S.plan(small_grid(conventions=["equal", "published"], targets=["random"],
                              ranks=[4]))[0]
    got = {(c.method, c.convention): cfg for c, cfg in cells}
    assert set(got) == {("lora", "equal"), ("abba", "equal"), ("abba", "published")}
    assert (got[("abba", "equal")].r1, got[("abba", "equal")].r2) == (2, 2)
    assert (got[("abba", "published")].r1, got[("abba", "published")].r2) == (4, 4)


def test_auto_executor_takes_ray_for_the_figure_2_grid_and_stays_local_for_a_quick_look(tmp_path):
    """The estimate behind ``--executor auto``: the 1000×1000 grid is a long job (1460 s
    of one-thread fitting measured), ``--size 256`` and the first cells of a grid
    (``--max-cells``) are not."""
    ap = S.build_parser()
    full = S.grid_from_args(ap.parse_args(["--preset", "abba-fig2"]))
    est = S.estimated_seconds(full, tmp_path / "none")
    assert 0.7 * 1460 < est < 1.3 * 1460 and est >= S.LONG_JOB
    quick = S.grid_from_args(ap.parse_args(["--preset", "abba-fig2", "--size", "256"]))
    assert S.estimated_seconds(quick, tmp_path / "none") < S.LONG_JOB
    assert S.estimated_seconds(full, tmp_path / "none", max_cells=4) < S.LONG_JOB


def test_a_small_grid_runs_in_this_process_by_default(tmp_path, capsys):
    out = tmp_path / "s"
    assert S.main(["--methods", "lora", "--ranks", "2", "--size", "16", "--out", str(out),
                   "--no-figure"]) == 0
    assert capsys.readouterr().err.startswith("executor: local (this process")
    assert json.loads((out / "results.json").read_text())["meta"]["executor"] == "local"


def test_preset_abba_fig2_is_the_papers_grid_and_size_shrinks_it():
    ap = S.build_parser()
    g = S.grid_from_args(ap.parse_args(["--preset", "abba-fig2"]))
    assert g.shape == (1000, 1000) and g.ranks == list(range(8, 73, 8))
    assert g.targets == ["orthogonal", "lowrank", "sparse", "random"]
    assert g.conventions == ["equal", "published"]
    assert g.methods == theory.available()
    assert len(S.plan(g)[0]) == 468
    g = S.grid_from_args(ap.parse_args(["--preset", "abba-fig2", "--size", "256",
                                        "--methods", "lora,abba"]))
    assert g.shape == (256, 256) and g.methods == ["lora", "abba"]


def test_figure_from_sweep_results_has_png_and_pdf(tmp_path):
    from figures import reconstruction_fig2 as fig2

    grid = small_grid(conventions=["equal", "published"], targets=["random", "sparse"])
    res = S.run_sweep(grid, tmp_path / "s", figure=True)
    assert [p.suffix for p in res["figure"]] == [".png", ".pdf"]
    paths = fig2.make(tmp_path / "fig", quick=True, results=tmp_path / "s")
    assert [p.name for p in paths] == ["reconstruction_fig2.png", "reconstruction_fig2.pdf"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_lora_on_the_orthogonal_target_loses_exactly_r_over_n_as_the_figure_draws_it():
    """``published.lora_orthogonal`` (the LoRA curve of the orthogonal panel) against the
    Eckart-Young optimum computed on the target itself."""
    M = make_target("orthogonal", (200, 200), seed=3, dtype=torch.float64).M
    for r in (8, 40, 72):
        assert float(lora_optimum(M, r)[0]) == pytest.approx(
            published.lora_orthogonal(r, n=200), abs=1e-12)
    assert set(published.ABBA_FIG2) == set(published.FIG2_TARGETS)
    # the read-off ABBA values fall with the budget, and stay above 0 as errors do
    for t, v in published.ABBA_FIG2.items():
        assert 0 < v[72] < v[8] < 1, t
    assert math.isclose(published.lora_orthogonal(72), 0.928)


def test_published_convention_adds_over_budget_cells_only_for_abba_style_r1_r2_methods():
    cells, notes = S.plan(small_grid(methods=["full", "lora", "abba"], ranks=[4],
                                     targets=["random"], conventions=["equal", "published"]))
    got = {(c.method, c.convention) for c, _cfg in cells}
    assert got == {("lora", "equal"), ("abba", "equal"), ("abba", "published")}
    assert any("full" in x and "budget" in x for x in notes)
