"""Bad input gets a one-line ValueError that says what is wrong (and the table CLI
exits 2 with one line on stderr)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import theory
from theory.table import budget_table

METHODS = theory.available()
ROOT = Path(__file__).resolve().parent.parent



def w0(m=12, n=10, seed=0):
    return torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def a_config(meth, m=12, n=10):
    try:
        return meth.config_for_rank(m, n, 2)
    except ValueError:
        return meth.configs_for_budget(m, n, m * n)[0]


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 300, msg
    return msg


@pytest.mark.parametrize("name", METHODS)
def test_rank_below_one_is_rejected(name):
    meth = theory.get_method(name)
    with pytest.raises(ValueError, match=r">= 1") as e:
        meth.config_for_rank(12, 10, 0)
    one_line(e)


@pytest.mark.parametrize("name", METHODS)
def test_rank_above_min_dimension_is_rejected(name):
    meth = theory.get_method(name)
    with pytest.raises(ValueError, match=r"too large") as e:
        meth.config_for_rank(12, 10, 11)
    one_line(e)


@pytest.mark.parametrize("name", ["lora", "hira", "hut", "alpha_lora", "pmss", "abba"])
def test_config_rank_too_large_for_w0_is_rejected_by_init(name):
    meth = theory.get_method(name)
    field = "r1" if name == "abba" else "r"
    with pytest.raises(ValueError, match=r"too large for a 12x10 matrix") as e:
        meth.init(w0(), meth.config(**{field: 11}), 0)
    one_line(e)


@pytest.mark.parametrize("name", ["lora", "hira", "hut", "alpha_lora", "smoa"])
def test_zero_rank_config_is_rejected_by_init(name):
    meth = theory.get_method(name)
    with pytest.raises(ValueError, match=r"must be >= 1"):
        meth.init(w0(), meth.config(r=0), 0)


def test_smoa_ranks_tuple_must_have_one_rank_per_group():
    smoa = theory.get_method("smoa")
    with pytest.raises(ValueError, match=r"r has 2 ranks but K=3 groups"):
        smoa.init(w0(), smoa.config(K=3, r=(2, 2)), 0)
    with pytest.raises(ValueError, match=r"K \(number of groups\)=11 is too large"):
        smoa.init(w0(), smoa.config(K=11, r=1), 0)


@pytest.mark.parametrize("name", ["hira", "hut", "alpha_lora", "smoa", "pmss", "lora"])
def test_factors_that_do_not_match_w0_are_rejected(name):
    meth = theory.get_method(name)
    cfg = a_config(meth)
    params = meth.init(w0(12, 10), cfg, 0, "gaussian")
    if name == "lora":  # no W0 involved: B and A must agree on r
        params = {"B": params["B"], "A": params["A"][:-1]}
        with pytest.raises(ValueError, match=r"factor"):
            meth.delta(params, None, cfg)
        return
    if name == "pmss":  # the trainable core must be r x r
        params = dict(params, U=params["U"][:-1])
        with pytest.raises(ValueError, match=r"factor U has shape"):
            meth.delta(params, w0(12, 10), cfg)
        return
    with pytest.raises(ValueError, match=r"shape|match") as e:
        meth.delta(params, w0(13, 10), cfg)
    one_line(e)


@pytest.mark.parametrize("name", METHODS)
def test_non_finite_w0_is_rejected_by_init(name):
    meth = theory.get_method(name)
    bad = w0()
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf") as e:
        meth.init(bad, a_config(meth), 0)
    one_line(e)
    bad[3, 4] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or inf"):
        meth.init(bad, a_config(meth), 0)


@pytest.mark.parametrize("name", METHODS)
def test_w0_that_is_not_a_matrix_is_rejected(name):
    meth = theory.get_method(name)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., m, n\)"):
        meth.init(torch.ones(5, dtype=torch.float64), a_config(meth), 0)


def test_unknown_method_lists_the_known_names():
    with pytest.raises(ValueError, match=r"unknown method 'lorax'; known methods: .*lora.*abba") as e:
        theory.get_method("lorax")
    msg = one_line(e)
    for name in METHODS:
        assert name in msg


@pytest.mark.parametrize("name", METHODS)
def test_unknown_init_scheme_is_rejected_with_the_known_ones(name):
    meth = theory.get_method(name)
    with pytest.raises(ValueError, match=r"unknown init 'xavier'; known: paper") as e:
        meth.init(w0(), a_config(meth), 0, scheme="xavier")
    one_line(e)


@pytest.mark.parametrize("name", METHODS)
def test_unknown_config_field_is_rejected_with_the_fields(name):
    meth = theory.get_method(name)
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['rank_typo'\]; fields are") as e:
        meth.config(rank_typo=3)
    one_line(e)


@pytest.mark.parametrize("name", METHODS)
def test_non_positive_budget_is_rejected(name):
    with pytest.raises(ValueError, match=r"budget must be >= 1"):
        theory.get_method(name).configs_for_budget(12, 10, 0)


@pytest.mark.parametrize("args, match", [
    ((64, 64, 0), r"rank must be between 1 and 64"),
    ((64, 32, 33), r"rank must be between 1 and 32"),
    ((-4, 32, 2), r"m must be >= 1"),
    ((64, 32, 2.5), r"rank must be an integer"),
])
def test_budget_table_rejects_bad_shapes_and_ranks(args, match):
    with pytest.raises(ValueError, match=match):
        budget_table(*args)
    with pytest.raises(ValueError, match=r"rank_w0 must be between 0 and 32"):
        budget_table(64, 32, 4, rank_w0=40)


def run_table(*args):
    return subprocess.run([sys.executable, "-m", "theory.table", *args], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


# --------------------------------------------------------------------------- #
# the registry
# --------------------------------------------------------------------------- #
#: every family of DESIGN §2, in registry order (the order of tables and figures)
THIRTEEN = ["full", "lora", "hira", "abba", "loha", "lokr", "miss", "smoa", "hut", "pmss",
            "dora", "vera", "alpha_lora"]


def test_registry_holds_exactly_the_13_families_in_order():
    assert theory.available() == THIRTEEN
    assert [theory.get_method(n).name for n in THIRTEEN] == THIRTEEN


def test_a_method_module_that_fails_to_import_raises_naming_it(monkeypatch):
    from theory import registry

    monkeypatch.setattr(registry, "_REGISTRY", {})
    monkeypatch.setattr(registry, "_MODULES", (*registry._MODULES, "no_such_family"))
    with pytest.raises(ImportError, match=r"theory\.methods\.no_such_family failed to import"):
        registry.available()
    assert registry._REGISTRY == {}  # nothing half-loaded: the next call raises again
    with pytest.raises(ImportError):
        registry.get_method("lora")


def test_a_method_module_without_METHOD_raises(monkeypatch):
    from theory import registry

    monkeypatch.setattr(registry, "_REGISTRY", {})
    monkeypatch.setattr(registry, "_MODULES", ("lora", "__init__"))
    with pytest.raises(ImportError, match=r"theory\.methods\.__init__ defines no METHOD"):
        registry.available()


# --------------------------------------------------------------------------- #
# python -m theory.table: every flag with a bad value
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("args, match", [
    (["--shape", "64", "64", "--rank", "0"], "--rank: must be >= 1"),
    (["--shape", "64", "32", "--rank", "40"], "--rank must be between 1 and min(M, N) = 32"),
    (["--shape", "-3", "32"], "--shape: must be >= 1"),
    (["--shape", "0", "32"], "--shape: must be >= 1"),
    (["--shape", "64"], "--shape: expected 2 arguments"),
    (["--shape", "64", "6.5"], "--shape: expected an integer"),
    (["--shape", "1e10", "1e10"], "each side must be at most 10,000,000"),
    (["--shape", "nan", "4"], "--shape: must be a finite number"),
    (["--rank", "four"], "--rank: expected an integer, got 'four'"),
    (["--rank", "inf"], "--rank: must be a finite number"),
    (["--rank", ""], "--rank: expected an integer"),
    (["--shape", "64", "64", "--rank-w0", "65"], "--rank-w0 must be between 0 and min(M, N) = 64"),
    (["--rank-w0", "-1"], "--rank-w0: must be >= 0"),
    (["--json", "/proc/no/such.json"], "--json /proc/no/such.json: cannot write"),
    (["--json", "/"], "--json / is a folder"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_table_main_exits_2_with_one_error_line(args, match, capsys):
    from clicheck import refused

    from theory.table import main
    refused(main, args, capsys, match)


def test_table_json_into_a_folder_is_refused_before_anything_is_printed(tmp_path, capsys):
    from clicheck import refused

    from theory.table import main
    refused(main, ["--json", tmp_path], capsys, "is a folder; give a file name")
    assert list(tmp_path.iterdir()) == []


def test_table_ctrl_c_is_one_line_and_exit_130(capsys, monkeypatch):
    from clicheck import interrupted

    import theory.table as T
    assert interrupted(T.main, [], capsys, monkeypatch, T, "budget_table") \
        == "interrupted: nothing was saved"


@pytest.mark.parametrize("args", [["--shape", "64", "64", "--rank", "0"], ["--shape", "64"]])
def test_table_cli_process_exits_2_with_one_line_and_no_traceback(args):
    proc = run_table(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "(see python -m theory.table --help)" in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_table_cli_json_lists_every_method(tmp_path):
    out = tmp_path / "sub" / "table.json"
    proc = run_table("--shape", "256", "128", "--rank", "4", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert [r["method"] for r in data["rows"]] == THIRTEEN
    assert data["budget"] == 4 * (256 + 128)
    lora = next(r for r in data["rows"] if r["method"] == "lora")
    assert lora["n_params"] == data["budget"] and lora["rank_bound"] == 4
    assert "lora" in proc.stdout and "r=4" in proc.stdout
    assert not list(out.parent.glob(".*"))  # atomic write left no temp file


def test_table_json_to_stdout_is_strict_json_with_the_table_rows(capsys):
    from theory.table import main
    assert main(["--shape", "96", "64", "--rank", "8", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["rows"] == json.loads(json.dumps(budget_table(96, 64, 8), default=list))
