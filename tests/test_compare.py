"""``python -m finetune.compare``: finished runs are never recomputed, a failed run is
reported (exit 1) and retried, bad input is one line before any work; and the
columns of the table are what they claim on hand-made runs (alignment of an update
with itself is 1, LoRA's reconstruction error is the Eckart-Young tail, Spearman on
known orderings)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import finetune.train as ftrain
from finetune import analysis as AN
from finetune import compare as C
from finetune import runs as R
from finetune.data import have_corpora
from finetune.train import Diverged, RunConfig
from reconstruction.fit import lora_optimum

FAST = ["--model", "mlp", "--methods", "abba", "--steps", "8", "--eval-every", "8",
        "--no-progress", "--no-fit"]


def _main(argv, capsys):
    try:
        code = C.main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _finished(tmp_path):
    return {p.parent.name: p.stat().st_mtime_ns for p in tmp_path.glob("mlp/digits/*/run.json")}


# --------------------------------------------------------------------------- #
# running, reusing, failing
# --------------------------------------------------------------------------- #
def test_second_invocation_recomputes_nothing_and_writes_the_outputs(tmp_path, capsys,
                                                                    monkeypatch):
    argv = [*FAST[:-1], "--out", str(tmp_path)]  # with the reconstruction column
    code, out, err = _main(argv, capsys)
    assert code == 0, err
    runs = _finished(tmp_path)
    assert len(runs) == 3 and {n.split("-")[0] for n in runs} == {"full", "lora", "abba"}
    stem = tmp_path / "mlp" / "digits" / "compare-r8-8steps"
    for ext in (".txt", ".csv", ".json", ".png"):
        assert stem.with_suffix(ext).is_file(), ext
    assert "abba" in out and "Spearman" in out

    def no_training(*a, **k):
        raise AssertionError("a finished run was recomputed")

    monkeypatch.setattr(ftrain, "train", no_training)
    code, out2, err = _main(argv, capsys)
    assert code == 0, err
    assert _finished(tmp_path) == runs
    assert out2 == out  # the same table from the same runs (the fits are cached)


def test_a_failed_run_exits_1_the_others_finish_and_the_next_call_retries_it(
        tmp_path, capsys, monkeypatch):
    real = ftrain.train

    def abba_diverges(cfg, **kw):
        if cfg.method == "abba":
            raise Diverged("the training loss became nan at step 3")
        return real(cfg, **kw)

    monkeypatch.setattr(ftrain, "train", abba_diverges)
    code, out, err = _main([*FAST, "--out", str(tmp_path)], capsys)
    assert code == 1 and err.startswith("failed: 1 run(s) failed") and err.count("\n") == 1, err
    assert "abba" in err and "nan at step 3" in err
    assert {n.split("-")[0] for n in _finished(tmp_path)} == {"full", "lora"}
    failed = list(tmp_path.glob("mlp/digits/abba-*/failed.json"))
    assert len(failed) == 1 and json.loads(failed[0].read_text())["status"] == "failed"
    assert "abba" in out and "failed 0" in out  # the table says so

    monkeypatch.setattr(ftrain, "train", real)
    code, out, err = _main([*FAST, "--out", str(tmp_path)], capsys)
    assert code == 0, err
    assert {n.split("-")[0] for n in _finished(tmp_path)} == {"full", "lora", "abba"}
    assert not list(tmp_path.glob("mlp/digits/*/failed.json"))


def test_an_exception_in_one_run_is_recorded_with_its_traceback(tmp_path, monkeypatch):
    def broken(cfg, **kw):
        raise RuntimeError("a bug in one method")

    monkeypatch.setattr(ftrain, "train", broken)
    cfg = RunConfig(model="mlp", task="digits", method="hira", steps=2)
    res = C.run_one(cfg, tmp_path)
    assert res["status"] == "failed" and res["reason"] == "RuntimeError: a bug in one method"
    blob = json.loads((R.run_dir(tmp_path, cfg) / "failed.json").read_text())
    assert "Traceback" in blob["traceback"] and blob["key"] == cfg.key


def test_ctrl_c_is_one_line_exit_130_and_keeps_finished_runs(tmp_path, capsys, monkeypatch):
    real = ftrain.train

    def interrupted(cfg, **kw):
        if cfg.method == "abba":
            raise KeyboardInterrupt
        return real(cfg, **kw)

    monkeypatch.setattr(ftrain, "train", interrupted)
    code, _, err = _main([*FAST, "--out", str(tmp_path)], capsys)
    assert code == 130 and err.startswith("interrupted: finished runs are kept")
    assert err.count("\n") == 1
    assert {n.split("-")[0] for n in _finished(tmp_path)} == {"full", "lora"}


def test_execute_maps_one_function_over_the_unfinished_configs(tmp_path):
    """The executor seam: any map-like callable runs the work."""
    rows, _ = C.plan_rows(["abba"], "ours")
    cfgs = C.plan("mlp", "digits", rows, rank=2, seeds=[0], steps=3, eval_every=3)
    calls = []

    def mapper(fn, items):
        items = list(items)
        calls.append([c.method for c in items])
        return [fn(c) for c in reversed(items)]  # any order: results are matched by key

    res = C.execute(cfgs, tmp_path, mapper=mapper)
    assert calls == [["full", "lora", "abba"]]
    assert [r["method"] for r in res] == ["full", "lora", "abba"]
    assert all(r["status"] == "trained" for r in res)
    res = C.execute(cfgs, tmp_path, mapper=mapper)
    assert calls[-1] == [] and all(r["status"] == "finished" for r in res)


def test_plan_always_has_full_and_lora_and_one_config_per_seed():
    rows, _ = C.plan_rows(["abba", "vera"], "both")
    assert [r.label for r in rows] == ["full", "lora", "lora (PEFT)", "abba", "vera",
                                       "vera (PEFT)"]
    assert [r.label for r in C.plan_rows(["abba"], "ours")[0]] == ["full", "lora", "abba"]
    cfgs = C.plan("mlp", "digits", rows, rank=4, seeds=[0, 1, 2])
    assert len(cfgs) == 3 * len(rows) and cfgs[0].method == "full"
    vera = next(c for c in cfgs if c.method == "vera")
    assert vera.lr == pytest.approx(10 * ftrain.T.defaults("mlp").lr)  # the stated choice
    assert next(c for c in cfgs if c.method == "abba").lr == ftrain.T.defaults("mlp").lr
    full = next(c for c in cfgs if c.method == "full")
    assert full.rank == RunConfig.rank  # one full run serves every --rank


def test_peft_rows_it_cannot_run_are_left_out_with_a_note_or_refused_when_named():
    rows, notes = C.plan_rows(C.ALL, "both", peft_ok=lambda m: m not in ("loha", "lokr"),
                              explicit=False)
    labels = [r.label for r in rows]
    assert "loha" in labels and "loha (PEFT)" not in labels and "hira (PEFT)" in labels
    assert any("loha" in n for n in notes)
    with pytest.raises(ValueError, match="cannot wrap"):
        C.plan_rows(["loha"], "both", peft_ok=lambda m: m != "loha", explicit=True)
    with pytest.raises(ValueError, match="PEFT has no 'abba'"):
        C.plan_rows(["abba"], "peft")


# --------------------------------------------------------------------------- #
# the columns, on hand-made runs
# --------------------------------------------------------------------------- #
def _record(cfg, metric, step_s, peak, deltas):
    return {"config": cfg.asdict(), "key": cfg.key, "name": cfg.name,
            "task": {"n_eval": 10}, "method": cfg.method, "impl": cfg.impl,
            "trainable_params": 100, "layer_configs": {"a": "r=2"},
            "metric_name": "accuracy", "higher_is_better": True, "metric": metric,
            "metric_before": 0.5, "final_eval": {"accuracy": metric},
            "evals": [{"step": 0, "accuracy": 0.5}, {"step": 4, "accuracy": metric}],
            "losses": [1.0, 0.8, 0.6, 0.5], "final_train_loss": 0.5,
            "step_seconds_median": step_s, "train_seconds": 4 * step_s,
            "peak_step_bytes": peak, "deltas": deltas}


def _hand_made(tmp_path):
    g = torch.Generator().manual_seed(0)
    F = {p: (torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)) for p in "ab"}

    def trunc(d, k):
        U, S, Vh = torch.linalg.svd(d, full_matrices=False)
        return U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]

    lora = {p: (trunc(d, 2), w) for p, (d, w) in F.items()}
    neg = {p: (-d, w) for p, (d, w) in F.items()}
    rows, _ = C.plan_rows(["abba"], "ours")
    cfgs = C.plan("mlp", "digits", rows, rank=2, seeds=[0, 1], steps=4)
    spec = {"full": (F, [0.95, 0.95], 3.0, 400), "lora": (lora, [0.8, 0.9], 1.0, 100),
            "abba": (neg, [0.7, 0.7], 1.3, 150)}
    for c in cfgs:
        deltas, metrics, step_s, peak = spec[c.method]
        R.save_run(R.run_dir(tmp_path, c), _record(c, metrics[c.seed], step_s, peak, deltas))
    return cfgs, F, lora


def test_columns_on_hand_made_runs(tmp_path):
    cfgs, F, lora = _hand_made(tmp_path)
    comp = C.compare_rows(cfgs, tmp_path, k=2)
    rows = {r["method"]: r for r in comp["rows"]}
    # full fine-tuning against itself (the other seed is the same update): aligned exactly
    assert rows["full"]["cosine"] == pytest.approx(1.0) and rows["full"]["overlap"] == \
        pytest.approx(1.0)
    # LoRA = full's rank-2 truncation: same top-2 subspaces, cosine = ‖F_2‖/‖F‖
    assert rows["lora"]["overlap"] == pytest.approx(1.0)
    expect = sum(float(lora[p][0].norm() / F[p][0].norm()) for p in "ab") / 2
    assert rows["lora"]["cosine"] == pytest.approx(expect, rel=1e-6)
    assert rows["abba"]["cosine"] == pytest.approx(-1.0)  # the opposite update
    assert rows["lora"]["numerical_rank"] == 2 and rows["full"]["numerical_rank"] == 6
    # metric mean ± sd over seeds, and the ratios to LoRA
    assert rows["lora"]["metric_mean"] == pytest.approx(0.85)
    assert rows["lora"]["metric_sd"] == pytest.approx(math.sqrt(0.005))
    assert rows["abba"]["time_vs_lora"] == pytest.approx(1.3)
    assert rows["abba"]["memory_vs_lora"] == pytest.approx(1.5)
    assert rows["full"]["time_vs_lora"] == pytest.approx(3.0)
    # reconstruction of full FT's ΔW (seed 0) by LoRA at rank 2: the Eckart-Young tail
    ey = sum(float(lora_optimum(F[p][0].double(), 2)) for p in "ab") / 2
    assert rows["lora"]["reconstruction_error"] == pytest.approx(ey, rel=1e-5)
    assert rows["full"]["reconstruction_error"] == 0.0
    # the correlation is over our methods, from the columns
    c = comp["correlation"]["reconstruction_vs_metric"]
    assert c == AN.spearman([-rows[m]["reconstruction_error"] for m in ("lora", "abba")],
                            [rows[m]["metric_mean"] for m in ("lora", "abba")])
    assert c["n"] == 2 and math.isnan(c["rho"])  # two methods: no correlation
    table = C.format_table(comp)
    assert "0.8500 ± 0.0707" in table and "1.30" in table and "1.50" in table
    paths = C.write_outputs(comp, tmp_path / "cmp")
    assert [p.suffix for p in paths] == [".txt", ".csv", ".json", ".png"]
    back = json.loads((tmp_path / "cmp.json").read_text())
    assert back["rows"][1]["metric_values"] == [0.8, 0.9]


def test_missing_and_failed_runs_are_rows_that_say_so(tmp_path):
    cfgs, _, _ = _hand_made(tmp_path)
    victim = next(c for c in cfgs if c.method == "abba" and c.seed == 1)
    d = R.run_dir(tmp_path, victim)
    (d / "run.json").unlink()
    R.record_failure(d, victim, "nan")
    comp = C.compare_rows(cfgs, tmp_path, k=2, fit=False)
    abba = next(r for r in comp["rows"] if r["method"] == "abba")
    assert abba["seeds"] == [0] and abba["failed"] == [1]
    assert "1 (1 failed)" in C.format_table(comp)


def test_alignment_measures_on_known_matrices():
    a = torch.diag(torch.tensor([3.0, 2.0, 0.0, 0.0]))
    b = torch.diag(torch.tensor([3.0, 0.0, 2.0, 0.0]))
    assert AN.subspace_overlap(a, a, 2) == pytest.approx(1.0)
    assert AN.subspace_overlap(a, b, 2) == pytest.approx(0.5)  # e1 shared, e2 vs e3
    assert AN.subspace_overlap(a, b, 1) == pytest.approx(1.0)
    assert AN.cosine(a, b) == pytest.approx(9 / 13)
    assert AN.cosine(a, 2 * a) == pytest.approx(1.0) and math.isnan(AN.cosine(a, 0 * a))
    c = torch.zeros(4, 4)
    c[2, 3], c[3, 2] = 1.0, 1.0
    assert AN.subspace_overlap(torch.diag(torch.tensor([1.0, 1.0, 0, 0])), c, 2) == \
        pytest.approx(0.0, abs=1e-12)


def test_spearman_on_known_orderings():
    assert AN.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(
        {"rho": 1.0, "p": 0.0, "n": 4}, abs=1e-12)
    r = AN.spearman([1, 2, 3, 4, 5], [5, 4, 3, 2, 1])
    assert r["rho"] == pytest.approx(-1.0) and r["n"] == 5
    r = AN.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5])  # Σd² = 4: ρ = 1 − 6·4/(5·24)
    assert r["rho"] == pytest.approx(0.8) and 0 < r["p"] < 1
    r = AN.spearman([1, 2, float("nan"), 3], [1, 2, 9, 3])  # the NaN pair is left out
    assert r["n"] == 3 and r["rho"] == pytest.approx(1.0)
    assert math.isnan(AN.spearman([1, 1, 1], [1, 2, 3])["rho"])


def test_reconstruction_of_a_real_full_ft_update_by_lora_is_eckart_young(tmp_path):
    cfg = RunConfig(model="mlp", task="digits", method="full", steps=6)
    assert C.run_one(cfg, tmp_path)["status"] == "trained"
    deltas = R.load_deltas(R.run_dir(tmp_path, cfg))
    errs = AN.reconstruction_errors("lora", deltas, 3)
    for p, (d, _) in deltas.items():
        assert errs[p] == pytest.approx(float(lora_optimum(d.double(), 3)), rel=1e-4, abs=1e-7)
    assert AN.reconstruction_errors("full", deltas, 3) == {p: 0.0 for p in deltas}


def test_peft_vera_row_trains_through_its_tuner():
    rec = ftrain.train(RunConfig(model="mlp", task="digits", method="vera", impl="peft",
                                 rank=4, steps=30, lr=0.1))
    assert rec["trainable_params"] == (128 + 10) * 2 + (10 + 10)  # one shared rank, 10
    assert rec["final_train_loss"] < 0.5 * rec["losses"][0]


# --------------------------------------------------------------------------- #
# bad input
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("argv, words", [
    (["--model", "bert"], "--model 'bert' unknown"),
    (["--task", "movie"], "not a task of --model mlp"),
    (["--methods", "nope"], "unknown method 'nope'"),
    (["--methods", ""], "no method"),
    (["--impl", "peft", "--methods", "abba"], "PEFT has no 'abba'"),
    (["--lr-set", "vera=abc"], "not a number"),
    (["--lr-set", "vera=-1"], "finite and > 0"),
    (["--lr-set", "nope=1"], "unknown method"),
    (["--lr-set", "vera"], "METHOD=LR"),
    (["--rank", "99"], "too large"),
    (["--targets", "q_proj"], "matches no linear layer"),
    (["--out", "/proc/nowhere/runs"], "cannot write"),
    (["--seeds", "0"], "--seeds"),
    (["--device", "tpu"], "--device"),
    (["--name", "a/b"], "plain file name"),
    (["--fit-solver", "magic"], "--fit-solver 'magic' unknown"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_runs(argv, words, tmp_path, capsys):
    out = ["--out", str(tmp_path)] if "--out" not in argv else []
    code, _, err = _main([*FAST, *out, *argv], capsys)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err
    assert "Traceback" not in err and not list(tmp_path.glob("*/*/*/run.json"))


@pytest.mark.skipif(not have_corpora(), reason="VADER corpora not fetched")
def test_peft_tuners_that_cannot_wrap_gpt2_conv1d_are_refused_when_named(tmp_path, capsys):
    code, _, err = _main(["--model", "tiny-gpt2", "--methods", "loha", "--impl", "both",
                          "--out", str(tmp_path), "--no-progress"], capsys)
    assert code == 2 and "PEFT's loha cannot wrap" in err and err.count("\n") == 1


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    code, _, err = _main([*FAST, "--out", str(f)], capsys)
    assert code == 2 and "is a file" in err


def test_the_same_comparison_through_ray_gives_the_same_runs_as_locally(tmp_path, capsys):
    """``--executor ray``: one Ray task per run, the driver collects; every run's metric
    and loss curve equal the local ones (seeded), and a second call reuses them all."""
    pytest.importorskip("ray")
    from cli import executor as X

    X.local_ray(num_cpus=2, num_gpus=1)  # the session's instance (tests/test_executor.py)
    argv = [*FAST, "--seeds", "2", "--threads", "1"]
    code, _, err = _main([*argv, "--out", str(tmp_path / "local")], capsys)
    assert code == 0, err
    code, _, err = _main([*argv, "--out", str(tmp_path / "ray"), "--executor", "ray"], capsys)
    assert code == 0, err
    assert "executor: ray" in err

    def records(root):
        return {p.parent.name: json.loads(p.read_text())
                for p in (root / "mlp" / "digits").glob("*/run.json")}

    local, ray_ = records(tmp_path / "local"), records(tmp_path / "ray")
    assert len(local) == 6 and local.keys() == ray_.keys()
    for name, rec in local.items():
        assert ray_[name]["metric"] == rec["metric"], name
        assert ray_[name]["losses"] == rec["losses"], name
    code, _, err = _main([*argv, "--out", str(tmp_path / "ray"), "--executor", "ray"], capsys)
    assert code == 0 and records(tmp_path / "ray") == ray_


def test_a_run_whose_ray_task_died_is_recorded_failed_and_retried(tmp_path):
    """A task lost after its retries (a dead worker) becomes the run's failed.json,
    written by the driver, and the run is not finished: the next call retries it."""
    from cli.executor import TaskFailed

    cfg = RunConfig(model="mlp", task="digits", method="lora", rank=2, steps=2)

    class Dead:
        def map(self, fn, tasks):
            for t in tasks:
                yield t, TaskFailed("WorkerCrashedError: the worker died")

    res = C.execute([cfg], tmp_path, mapper=C.executor_mapper(Dead(), tmp_path))
    assert res[0]["status"] == "failed" and "worker died" in res[0]["reason"]
    d = R.run_dir(tmp_path, cfg)
    assert "worker died" in json.loads((d / "failed.json").read_text())["reason"]
    assert not R.is_finished(d)
    res = C.execute([cfg], tmp_path)
    assert res[0]["status"] == "trained" and R.is_finished(d)


def test_kept_records_without_tensors_rebuild_the_same_table(tmp_path, capsys, monkeypatch):
    """``finetune.archive`` keeps run.json, the cached measures and fits; the table from
    the kept records (no safetensors anywhere) is the table from the full runs."""
    from finetune import archive as A

    runs, kept = tmp_path / "runs", tmp_path / "kept"
    argv = [*FAST[:-1], "--no-figure"]  # with the reconstruction column
    code, out, err = _main([*argv, "--out", str(runs)], capsys)
    assert code == 0, err
    res = A.archive(runs, kept, "mlp", "digits")
    assert len(res["kept"]) == 3 and not res["skipped"] and res["fits"]
    assert not list(kept.rglob("*.safetensors"))

    def no_training(*a, **k):
        raise AssertionError("a kept run was recomputed")

    monkeypatch.setattr(ftrain, "train", no_training)
    code, out2, err = _main([*argv, "--out", str(kept), "--report-only"], capsys)
    assert code == 0, err
    strip = [ln for ln in out.splitlines() if not ln.startswith("written:")]
    assert [ln for ln in out2.splitlines() if not ln.startswith("written:")] == strip
    # a measure that is not cached (another k) needs the tensors: one line, exit 2
    code, _, err = _main([*argv, "--out", str(kept), "--report-only", "--k", "2"], capsys)
    assert code == 2 and err.count("\n") == 1 and "kept without its tensors" in err, err


def test_archive_leaves_out_runs_without_cached_measures(tmp_path, capsys):
    from finetune import archive as A

    runs = tmp_path / "runs"
    code, _, err = _main([*FAST, "--no-figure", "--out", str(runs)], capsys)
    assert code == 0, err
    victim = next(runs.glob("mlp/digits/abba-*"))
    (victim / "analysis.json").unlink()
    res = A.archive(runs, tmp_path / "kept")
    assert res["skipped"] == [str(victim.relative_to(runs))] and len(res["kept"]) == 2
    assert A.main(["--out", str(tmp_path / "nowhere"), "--to", str(tmp_path / "k2")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_archive_of_a_model_with_no_runs_is_one_line_exit_2(tmp_path, capsys):
    from finetune import archive as A

    code, _, err = _main([*FAST, "--no-figure", "--out", str(tmp_path / "runs")], capsys)
    assert code == 0, err
    assert A.main(["--out", str(tmp_path / "runs"), "--to", str(tmp_path / "k"),
                   "--model", "minlm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no finished runs of minlm" in err
    assert not (tmp_path / "k" / "minlm").exists()
