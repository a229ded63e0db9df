"""``python -m rmt.run``: tables, JSON, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rmt import run, theory


def test_default_run_prints_table_with_alpha_star(capsys):
    assert run.main([]) == 0
    out = capsys.readouterr().out
    a = theory.alpha_star(theory.Setting(**run.DEFAULTS))
    assert f"{a:.4f}" in out and "alpha_bar" in out and "pre-trained" in out


def test_json_output_matches_theory_and_simulation_columns(capsys):
    assert run.main(["--N", "400", "--n", "50", "--p", "60", "--beta", "0.7", "--alpha", "0",
                     "1", "3", "--simulate", "--trials", "5", "--json", "-"]) == 0
    res = json.loads(capsys.readouterr().out)
    s = theory.Setting(N=400, n=50, p=60, mu_norm=0.8, mu_perp_norm=0.8, beta=0.7,
                       gamma_src=5.0, gamma=0.1)
    assert res["alpha"] == [0.0, 1.0, 3.0]
    assert res["theory"]["accuracy"] == pytest.approx(list(theory.accuracy(s, [0, 1, 3])))
    assert len(res["simulation"]["accuracy_se"]) == 3
    assert res["simulation"]["trials"] == 5


def test_json_file_is_written(tmp_path, capsys):
    path = tmp_path / "sub" / "r.json"
    assert run.main(["--alpha-grid", "-1", "1", "5", "--json", str(path)]) == 0
    assert "alpha*" in capsys.readouterr().out
    assert len(json.loads(path.read_text())["alpha"]) == 5


@pytest.mark.parametrize("argv, msg", [
    (["--beta", "1.5"], "beta"),
    (["--gamma", "0"], "gamma"),
    (["--p", "0"], "p must"),
    (["--alpha-grid", "0", "1", "2.5"], "K"),
    (["--alpha", "nan"], "finite"),
    (["--trials", "0", "--simulate"], "trials"),
    (["--simulate", "--device", "nonexistent"], "device"),
    (["--bogus"], "unrecognized"),
    (["--alpha", "1", "--alpha-grid", "0", "1", "3"], "not allowed"),
])
def test_bad_input_one_line_error_exit_2(argv, msg, capsys):
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err and err.count("\n") == 1


def test_module_entry_point_exit_status():
    r = subprocess.run([sys.executable, "-m", "rmt.run", "--beta", "7"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
