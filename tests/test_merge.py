"""Merging LoRAs: no rule beats Eckart-Young at rank K, LEGO gives a LoRA merged with
itself back, sum/mean/TIES are what they say, and the command checks its runs first."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune.data import have_corpora
from finetune.merge import (
    RULES,
    lego_factors,
    merge,
    merge_ties,
    relative_error,
    svd_optimum,
    truncate,
)
from finetune.merge import main as merge_main
from finetune.runs import save_run
from finetune.train import RunConfig, train


def exit_code(main, argv) -> int:
    """A command's exit status, in-process (parser errors raise SystemExit)."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


def _lora(m, n, r, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, r, generator=g, dtype=torch.float64),
            torch.randn(r, n, generator=g, dtype=torch.float64) / n**0.5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n_loras=st.integers(1, 4), r=st.integers(1, 4), m=st.integers(4, 12),
       n=st.integers(4, 12), k_frac=st.floats(0.1, 1.0), seed=st.integers(0, 10_000))
def test_no_merge_beats_the_svd_optimum_at_rank_k(n_loras, r, m, n, k_frac, seed):
    units = [_lora(m, n, r, seed + t) for t in range(n_loras)]
    k = max(1, round(k_frac * n_loras * r))
    s = sum(b @ a for b, a in units)
    opt = svd_optimum(s, k)
    for how in RULES:
        mdw = merge(how, units, k, seed=seed)
        assert relative_error(truncate(mdw, k), s) >= opt - 1e-9, how  # its best rank-K version
        if how in ("svd", "lego"):  # rank <= K by construction
            assert int(torch.linalg.matrix_rank(mdw)) <= k
            assert relative_error(mdw, s) >= opt - 1e-9, how
    assert relative_error(merge("svd", units, k), s) == pytest.approx(opt, abs=1e-9)


@pytest.mark.parametrize("r", [1, 4, 8])
def test_lego_merging_a_lora_with_itself_at_its_rank_gives_it_back(r):
    b, a = _lora(20, 16, r, seed=r)
    merged = merge("lego", [(b, a), (b, a)], r, seed=0)
    torch.testing.assert_close(merged, b @ a, rtol=1e-10, atol=1e-12)


def test_lego_at_the_pooled_rank_is_the_sum_with_its_output_reweighting():
    units = [_lora(10, 8, 3, seed=t) for t in range(4)]
    s = sum(b @ a for b, a in units)
    torch.testing.assert_close(merge("lego", units, 12, lego_reweight="none"), s)
    torch.testing.assert_close(merge("lego", units, 12), s * (3 / 12) ** 0.5)  # ω = √(r̄/K)


def test_lego_parameter_reweighting_gives_each_centroid_its_units_mean_norm():
    """Two units at an angle in one cluster: the plain centroid is shorter than both
    (norm decay: shorter than their mean norm); reweighted, it has that norm and the centroid's direction."""
    b = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)  # (m=2, r=2)
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # (r=2, n=2)
    u = torch.cat([b.T, a], dim=1)                                    # units (2, 4)
    for reweight, expect_norm in (("none", float(u.mean(0).norm())),
                                  ("param", float(u.norm(dim=1).mean()))):
        bb, aa = lego_factors([(b, a)], 1, reweight=reweight)
        c = torch.cat([bb.T, aa], dim=1)[0]
        assert float(c.norm()) == pytest.approx(expect_norm)
        torch.testing.assert_close(c / c.norm(), u.mean(0) / u.mean(0).norm())
    assert float(u.mean(0).norm()) < float(u.norm(dim=1).mean())  # the decay it undoes


def test_sum_is_exact_and_mean_is_off_by_one_minus_one_over_n():
    units = [_lora(9, 7, 2, seed=t) for t in range(3)]
    s = sum(b @ a for b, a in units)
    assert relative_error(merge("sum", units, 2), s) == 0.0
    assert relative_error(merge("mean", units, 2), s) == pytest.approx(2 / 3)


def test_ties_trims_elects_the_sign_of_the_sum_and_averages_the_agreeing_entries():
    # two 1x4 "updates" given as rank-1 LoRAs (b = [1], a = the row)
    t1 = torch.tensor([[3.0, -1.0, 0.5, 2.0]], dtype=torch.float64)
    t2 = torch.tensor([[-1.0, -4.0, 0.4, 2.0]], dtype=torch.float64)
    one = torch.ones(1, 1, dtype=torch.float64)
    got = merge_ties([(one, t1), (one, t2)], density=0.5)
    # trimmed to the top half: t1 -> [3, 0, 0, 2], t2 -> [0, -4, 0, 2]; signs of the sum
    # [+, -, 0 -> +, +]; agreeing entries averaged: [3, -4, 0, 2]
    torch.testing.assert_close(got, torch.tensor([[3.0, -4.0, 0.0, 2.0]], dtype=torch.float64))


# --------------------------------------------------------------------------- #
# the command, on small real runs (the digits MLP)
# --------------------------------------------------------------------------- #
def _train(out, seed=0, **kw):
    """One finished run of the digits MLP (in-process: no interpreter start-up)."""
    cfg = RunConfig(model="mlp", task="digits", steps=30, rank=4, seed=seed, **kw)
    rec = train(cfg, return_model=True)
    d = out / cfg.resolved().model / cfg.task / cfg.name
    save_run(d, rec, rec["model"])
    return d


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return {"s0": _train(out, 0), "s1": _train(out, 1),
            "one_layer": _train(out, 0, targets=("re:layers\\.0",)),
            "abba": _train(out, 0, method="abba")}


def _merge(capsys, *args):
    rc = exit_code(merge_main, [str(a) for a in args])
    return rc, capsys.readouterr()


def test_the_command_merges_by_every_rule_and_evaluates_on_each_task(runs, tmp_path, capsys):
    rc, out = _merge(capsys, "--runs", runs["s0"], runs["s1"], "--rank", "2,8", "--json",
                     tmp_path / "m.json", "--out", tmp_path / "merged")
    assert rc == 0, out.err
    assert "svd@8" in out.out and "lego@2" in out.out
    res = json.loads((tmp_path / "m.json").read_text())
    names = [m["name"] for m in res["merges"]]
    assert names == ["sum", "mean", "ties", "svd@2", "svd@8", "lego@2", "lego@8"]
    assert res["pooled_rank"] == 8
    for m in res["merges"]:
        for k in (2, 8):
            assert m["mean"][f"error_at_{k}"] >= m["mean"][f"svd_optimum_{k}"] - 1e-9
    by = {m["name"]: m for m in res["merges"]}
    assert by["sum"]["mean"]["error"] < 1e-6 and by["svd@8"]["mean"]["error"] < 1e-6
    for task, metrics in res["metrics"].items():
        # a single LoRA folded into W0 scores what its run recorded (same split and head)
        own = metrics[f"single:{task}"]
        assert own == pytest.approx(res["recorded"][task], abs=0.01)
        assert set(metrics) >= set(names) | {"base"}
    files = sorted(p.name for p in (tmp_path / "merged").iterdir())
    assert "merge.json" in files and "merged-lego-k2.safetensors" in files
    from finetune.tiny import load_deltas
    d = load_deltas(tmp_path / "merged" / "merged-svd-k2.safetensors")
    assert all(int(torch.linalg.matrix_rank(dw, rtol=1e-4)) <= 2 for dw, _ in d.values())


@pytest.mark.parametrize("case, fragment", [
    (lambda r: ["--runs", r["s0"], r["s1"], "--how", "average"], "--how 'average' unknown"),
    (lambda r: ["--runs", r["s0"], r["s1"], "--rank", "9"], "larger than the pooled rank 8"),
    (lambda r: ["--runs", r["s0"], r["one_layer"]], "different layer sets"),
    (lambda r: ["--runs", r["s0"], r["abba"]], "merging takes LoRA runs"),
    (lambda r: ["--runs", r["s0"], "/nonexistent/run"], "no finished run there"),
    (lambda r: ["--runs", r["s0"], r["s1"], "--rank", "0"], "--rank"),
])
def test_bad_input_is_one_line_and_exit_2(runs, case, fragment, capsys):
    rc, out = _merge(capsys, *case(runs))
    assert rc == 2, out.err
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], out.err


def test_runs_of_different_base_models_are_refused(runs, tmp_path, capsys):
    if not have_corpora():
        pytest.skip("VADER corpora not fetched (the tiny GPT-2 trains on them)")
    cfg = RunConfig(model="tiny-gpt2", task="movie", steps=2, rank=2)
    rec = train(cfg, return_model=True)
    other = tmp_path / cfg.name
    save_run(other, rec, rec["model"])
    rc, out = _merge(capsys, "--runs", runs["s0"], other, "--no-eval")
    assert rc == 2 and "different base models" in out.err, out.err
    assert len(out.err.strip().splitlines()) == 1


def test_the_command_runs_as_a_module_and_fails_in_one_line():
    r = subprocess.run([sys.executable, "-m", "finetune.merge", "--runs", "/nonexistent/run"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
