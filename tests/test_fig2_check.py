"""``reconstruction.fig2_check``: the README's Figure 2 table is read whole (every
method, both ABBA conventions, the r = 8 brackets), and a sweep is judged against it:
a cell worse by more than the tolerance, or missing, fails (exit 1); bad input exits 2."""

from __future__ import annotations

import json

import pytest

import theory
from reconstruction import fig2_check as FC

README = FC.readme_table((FC.Path(FC.__file__).resolve().parent.parent / "README.md").read_text())


def test_the_readme_table_has_every_method_at_r72_and_the_r8_brackets():
    methods = {m for m, _, _, _ in README}
    assert methods == set(theory.available()) - {"full"}  # full fine-tuning is no adapter
    assert {(m, c) for m, c, _, _ in README if m == "abba"} == {("abba", "equal"), ("abba", "published")}
    assert len([k for k in README if k[3] == 72]) == 13 * 4  # 12 methods, ABBA twice
    # brackets: LoRA and both ABBA conventions at r = 8, orthogonal and random
    assert {k for k in README if k[3] == 8} == {(m, c, t, 8) for m, c in
                                                 [("lora", "equal"), ("abba", "equal"), ("abba", "published")]
                                                 for t in ("orthogonal", "random")}
    assert README[("lora", "equal", "orthogonal", 72)] == 0.928  # 1 - 72/1000
    assert README[("abba", "published", "sparse", 72)] == 0.188
    assert README[("alpha_lora", "equal", "orthogonal", 72)] == 0.864


def _results(tmp_path, errors: dict) -> FC.Path:
    rows = [{"method": m, "convention": c, "target": t, "rank": r, "rel_error": e, "m": 1000, "n": 1000}
            for (m, c, t, r), e in errors.items()]
    (tmp_path / "results.json").write_text(json.dumps({"meta": {}, "rows": rows}))
    return tmp_path


def test_a_sweep_matching_the_readme_passes_and_one_worse_cell_fails(tmp_path, capsys):
    good = {k: v + 0.0015 for k, v in README.items()}  # within the tolerance
    assert FC.main([str(_results(tmp_path, good))]) == 0
    assert f"{len(README)} of {len(README)} README numbers matched" in capsys.readouterr().out
    bad = dict(good)
    bad[("hira", "equal", "random", 72)] += 0.001  # 0.0025 above the README
    assert FC.main([str(_results(tmp_path, bad))]) == 1
    cap = capsys.readouterr()
    assert "hira        equal      random      72" in cap.out and "WORSE" in cap.out
    assert cap.err.strip() == "failed: 1 worse than the README by more than 0.002, 0 missing (listed above)"
    better = {k: v - 0.05 for k, v in README.items()}  # lower errors never fail
    del better[("vera", "equal", "sparse", 72)]
    assert FC.main([str(_results(tmp_path, better))]) == 1
    assert "1 missing" in capsys.readouterr().err


def test_every_cell_is_checked_against_a_baseline_sweep_and_one_worse_cell_fails(tmp_path, capsys):
    base = {**README, ("hira", "equal", "random", 40): 0.80, ("abba", "equal", "sparse", 16): 0.70}
    after = {k: v - 0.01 for k, v in base.items()}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _results(tmp_path / "b", base)
    assert FC.main([str(_results(tmp_path / "a", after)), "--baseline", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert f"{len(base)} cells in both, 0 missing here" in out and "largest excess -0.0100" in out
    after[("hira", "equal", "random", 40)] = 0.803  # off the README's r = 72 / 8: only the baseline sees it
    assert FC.main([str(_results(tmp_path / "a", after)), "--baseline", str(tmp_path / "b")]) == 1
    cap = capsys.readouterr()
    assert "hira        equal      random      40  0.8000  0.8030  +0.0030  WORSE" in cap.out
    assert cap.err.strip() == "failed: 1 cell(s) worse than the baseline, 0 missing"
    assert FC.main([str(tmp_path / "a"), "--baseline", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "none: no results file" in err


@pytest.mark.parametrize("argv,says", [
    (["/nonexistent/folder"], "no results file"),
    (["--tol", "-1"], "--tol"),
    (["--tol", "nan"], "--tol"),
    (["--baseline", "/nonexistent/folder"], "no results file"),
])
def test_bad_input_is_one_line_and_exit_2(argv, says, capsys):
    try:
        rc = FC.main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and says in err, err


def test_a_readme_without_the_table_is_refused(tmp_path, capsys):
    (tmp_path / "README.md").write_text("# nothing here\n")
    res = _results(tmp_path, {})
    assert FC.main([str(res), "--readme", str(tmp_path / "README.md")]) == 2
    assert "has no table" in capsys.readouterr().err
