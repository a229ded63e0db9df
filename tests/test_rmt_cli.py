"""The α-LoRA commands (``rmt.run``, ``rmt.bench``, ``rmt.realdata``): what they print
agrees with the functions that compute it, and every flag with a bad value ends in one
line on stderr and exit 2 before any work (Ctrl-C: one line, exit 130)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from clicheck import call, interrupted, one_line, refused

from rmt import bench, realdata, run, theory
from rmt import simulate as sim


# --------------------------------------------------------------------------- #
# rmt.run
# --------------------------------------------------------------------------- #
def test_default_run_prints_table_with_alpha_star(capsys):
    assert run.main([]) == 0
    out = capsys.readouterr().out
    a = theory.alpha_star(theory.Setting(**run.DEFAULTS))
    assert f"{a:.4f}" in out and "alpha_bar" in out and "pre-trained" in out
    assert len([ln for ln in out.splitlines() if " | " in ln]) == 1 + 11  # header + 11 α


def test_json_output_matches_theory_and_simulation_columns(capsys):
    argv = ["--N", "400", "--n", "50", "--p", "60", "--beta", "0.7", "--alpha", "0", "1", "3",
            "--simulate", "--trials", "5", "--seed", "3", "--json", "-"]
    assert run.main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    s = theory.Setting(N=400, n=50, p=60, mu_norm=0.8, mu_perp_norm=0.8, beta=0.7,
                       gamma_src=5.0, gamma=0.1)
    assert res["alpha"] == [0.0, 1.0, 3.0]
    assert res["theory"]["accuracy"] == pytest.approx(list(theory.accuracy(s, [0, 1, 3])))
    r = sim.simulate(s, [0, 1, 3], trials=5, seed=3)  # the same seed: the same numbers
    assert res["simulation"]["accuracy"] == pytest.approx(list(r.accuracy), rel=1e-12)
    assert res["simulation"]["accuracy_se"] == pytest.approx(list(r.accuracy_se), rel=1e-12)
    assert res["simulation"]["trials"] == 5 and res["simulation"]["device"] == "cpu"


def test_simulation_table_has_finite_standard_errors(capsys):
    assert run.main(["--p", "30", "--N", "200", "--alpha", "0", "2", "--simulate",
                     "--trials", "2"]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out and out.count("±") >= 6


def test_json_file_is_written(tmp_path, capsys):
    path = tmp_path / "sub" / "r.json"
    assert run.main(["--alpha-grid", "-1", "1", "5", "--json", str(path)]) == 0
    assert "alpha*" in capsys.readouterr().out
    res = json.loads(path.read_text())
    assert res["alpha"] == pytest.approx(list(np.linspace(-1, 1, 5)))
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


RUN_BAD = [
    (["--N", "0"], "--N: must be >= 1"),
    (["--n", "2.5"], "--n: expected an integer"),
    (["--p", "0"], "--p: must be >= 1"),
    (["--p", "x"], "--p: expected an integer"),
    (["--mu-norm", "-1"], "--mu-norm must be >= 0"),
    (["--mu-norm", "inf"], "--mu-norm: must be a finite number"),
    (["--mu-perp-norm", "-0.5"], "--mu-perp-norm must be >= 0"),
    (["--beta", "1.5"], "--beta must be in [-1, 1]"),
    (["--beta", "nan"], "--beta: must be a finite number"),
    (["--gamma", "0"], "--gamma: must be > 0"),
    (["--gamma-src", "-2"], "--gamma-src: must be > 0"),
    (["--alpha", "nan"], "--alpha: must be a finite number"),
    (["--alpha"], "--alpha: expected at least one argument"),
    (["--alpha-grid", "0", "1", "2.5"], "--alpha-grid K must be a positive integer"),
    (["--alpha-grid", "0", "1", "0"], "--alpha-grid K must be a positive integer"),
    (["--alpha-grid", "0", "1", "1e8"], "at most 100,000 α values"),
    (["--alpha-grid", "1", "0", "5"], "--alpha-grid needs LO < HI"),
    (["--alpha", "1", "--alpha-grid", "0", "1", "3"], "not allowed with argument"),
    (["--trials", "5"], "--trials only applies with --simulate"),
    (["--seed", "1"], "--seed only applies with --simulate"),
    (["--device", "cpu"], "--device only applies with --simulate"),
    (["--mode", "empirical", "--trials", "4"], "--trials, --mode only apply with --simulate"),
    (["--simulate", "--trials", "0"], "--trials: must be >= 1"),
    (["--simulate", "--trials", "1"], "--trials must be >= 2 with --simulate"),
    (["--simulate", "--trials", "1e9"], "needs about"),
    (["--simulate", "--p", "1000000", "--N", "100000", "--trials", "2"], "lower --trials, --p"),
    (["--simulate", "--seed", "-1"], "--seed: must be >= 0"),
    (["--simulate", "--device", "tpu"], "--device tpu: not a device torch knows"),
    (["--simulate", "--device", "nonexistent"], "--device nonexistent"),
    (["--simulate", "--mode", "fresh"], "--mode: invalid choice"),
    (["--json", "/proc/no/x.json"], "--json /proc/no/x.json: cannot write"),
    (["--json", "/"], "--json / is a folder"),
    (["--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("argv, words", RUN_BAD, ids=[" ".join(a) for a, _ in RUN_BAD])
def test_run_bad_input_one_line_error_exit_2(argv, words, capsys):
    refused(run.main, argv, capsys, words)


def test_run_without_cuda_refuses_a_cuda_device(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    one_line(call(run.main, ["--simulate", "--device", "cuda"], capsys),
             words="--device cuda: CUDA is not available")


def test_run_ctrl_c_during_the_simulation_is_one_line_exit_130(capsys, monkeypatch):
    assert interrupted(run.main, ["--simulate", "--trials", "2", "--p", "20"], capsys,
                       monkeypatch, sim, "simulate") == "interrupted: nothing was saved"


def test_module_entry_point_exit_status():
    r = subprocess.run([sys.executable, "-m", "rmt.run", "--beta", "7"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: --beta") \
        and "Traceback" not in r.stderr


# --------------------------------------------------------------------------- #
# rmt.bench
# --------------------------------------------------------------------------- #
def test_bench_on_tiny_sizes_reports_consistent_rates():
    r = bench.bench(trials=3, p=20, repeat=1)
    assert (r["p"], r["N"], r["n"], r["trials"], r["device"]) == (20, 5000, 40, 3, "cpu")
    for k in ("theory_curve_1000_alpha_ms", "alpha_star_us", "batched_trials_per_s",
              "loop_trials_per_s"):
        assert np.isfinite(r[k]) and r[k] > 0, k
    # the ratio is the two measured rates' ratio (one run, the same trials)
    assert r["speedup_batched_over_loop"] == pytest.approx(
        r["batched_trials_per_s"] / r["loop_trials_per_s"])


def test_bench_cli_json_file_and_table(tmp_path, capsys):
    path = tmp_path / "b.json"
    assert bench.main(["--trials", "2", "--p", "10", "--repeat", "1", "--threads", "1",
                       "--json", str(path)]) == 0
    out = capsys.readouterr().out
    r = json.loads(path.read_text())
    assert r["trials"] == 2 and r["p"] == 10 and r["threads"] == 1
    assert f"ratio {r['speedup_batched_over_loop']:.2f}x" in out


BENCH_BAD = [
    (["--trials", "0"], "--trials: must be >= 1"),
    (["--trials", "1e9"], "needs about"),
    (["--p", "-3"], "--p: must be >= 1"),
    (["--p", "1e7"], "lower --trials or --p"),
    (["--device", "tpu"], "--device tpu: not a device torch knows"),
    (["--repeat", "0"], "--repeat: must be >= 1"),
    (["--sampler", "gibbs"], "--sampler: invalid choice"),
    (["--sampler", "bartlett"], "--sampler bartlett: the bartlett sampler needs"),
    (["--threads", "0"], "--threads: must be >= 1"),
    (["--threads", "100000"], "--threads 100000 is more than 4x"),
    (["--json", "/"], "--json / is a folder"),
    (["--json", "/proc/no/b.json"], "cannot write"),
    (["--bogus"], "unrecognized arguments"),
]


@pytest.mark.parametrize("argv, words", BENCH_BAD, ids=[" ".join(a) for a, _ in BENCH_BAD])
def test_bench_bad_input_one_line_error_exit_2(argv, words, capsys):
    refused(bench.main, argv, capsys, words)


def test_bench_ctrl_c_is_one_line_exit_130(capsys, monkeypatch):
    assert interrupted(bench.main, ["--p", "10", "--trials", "2"], capsys, monkeypatch,
                       bench, "bench").startswith("interrupted: nothing was saved")


# --------------------------------------------------------------------------- #
# rmt.realdata (the checks run before any embedding)
# --------------------------------------------------------------------------- #
def _corpora():
    from finetune.data import have_corpora

    return have_corpora()


REAL_BAD = [
    (["--domains", "amazon"], "--domains needs at least two different domains"),
    (["--domains", "amazon", "amazon"], "--domains needs at least two different domains"),
    (["--domains", "imdb", "amazon"], "--domains: invalid choice: 'imdb'"),
    (["--n", "4"], "--n must be even numbers >= 10"),
    (["--n", "11"], "--n must be even numbers >= 10"),
    (["--n", "0"], "--n: must be >= 1"),
    (["--n", "100000", "--quick"], "is too large"),
    (["--repeats", "0"], "--repeats: must be >= 1"),
    (["--repeats", "1e9", "--quick"], "lower --repeats"),
    (["--gamma", "0"], "--gamma: must be > 0"),
    (["--gamma-src", "nan"], "--gamma-src: must be a finite number"),
    (["--prep", "pca"], "--prep: invalid choice"),
    (["--shrink", "-1"], "--shrink must be >= 0"),
    (["--seed", "-1"], "--seed: must be >= 0"),
    (["--device", "tpu"], "--device tpu: not a device torch knows"),
    (["--json", "/"], "--json / is a folder"),
    (["--json", "/proc/no/r.json"], "cannot write"),
    (["--bogus"], "unrecognized arguments"),
]


@pytest.mark.parametrize("argv, words", REAL_BAD, ids=[" ".join(a) for a, _ in REAL_BAD])
def test_realdata_bad_input_one_line_error_exit_2(argv, words, capsys, monkeypatch):
    if not _corpora() and "--quick" in argv:
        pytest.skip("needs the fetched corpora (python -m finetune.data fetch)")
    monkeypatch.setattr(realdata, "load_domains", _no_embedding)
    refused(realdata.main, argv, capsys, words)


def _no_embedding(*a, **k):
    raise AssertionError("bad input must be refused before any embedding")


@pytest.mark.skipif(not _corpora(), reason="needs the fetched corpora")
def test_realdata_ctrl_c_is_one_line_exit_130(capsys, monkeypatch):
    line = interrupted(realdata.main, ["--quick", "--domains", "amazon", "tweets"], capsys,
                       monkeypatch, realdata, "load_domains")
    assert line.startswith("interrupted: nothing was saved")
