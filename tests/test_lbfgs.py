"""The batched L-BFGS: every target has its own quasi-Newton state and line search
(a batched fit equals the per-target fits), the Armijo steps never raise the
error, the hand-written Khatri-Rao gradient and autograd give the same run, and it
reaches the optima the exact solvers know (Eckart-Young for LoRA; an exactly
representable Hadamard target)."""

from __future__ import annotations

import pytest
import torch

import theory
from reconstruction import fit as F
from reconstruction.fit import fit, lora_optimum
from reconstruction.targets import make_target


def test_batched_lbfgs_equals_per_target_runs():
    # targets of very different difficulty: a shared line search would couple them
    M = make_target("random", (30, 24), batch=3, seed=2, dtype=torch.float64).M
    M[1] = M[1] * 1e3
    M[2] = make_target("sparse", (30, 24), seed=5, dtype=torch.float64).M[0]
    c = theory.get_method("abba").config(r1=2, r2=3)
    both = fit("abba", M, c, solver="lbfgs", steps=60, tol=0)
    for b in range(3):
        one = fit("abba", M[b:b + 1], c, solver="lbfgs", steps=60, tol=0)
        torch.testing.assert_close(one.rel_error[0], both.rel_error[b], rtol=1e-6, atol=1e-9)


def test_lbfgs_error_never_increases_from_one_iteration_to_the_next():
    for name, kw in (("abba", {"r1": 3, "r2": 2}), ("hira", {"r": 3}), ("dora", {"r": 2})):
        M = make_target("gaussian", (28, 20), batch=2, seed=1, dtype=torch.float64).M
        res = fit(name, M, theory.get_method(name).config(**kw), solver="lbfgs", steps=80, tol=0)
        H = res.history_per_target  # (iterations + 1, b)
        assert bool((H[1:] <= H[:-1] + 1e-12).all()), name
        assert bool((H[-1] < H[0]).all()), name  # and it moved


def test_hand_written_dense_gradient_and_autograd_give_the_same_lbfgs_run(monkeypatch):
    """At r1 r2 beyond the Khatri-Rao gradient, the gradient through ΔW written out
    (``als_kr.dense_value_and_grad``) runs L-BFGS as autograd does."""
    M = make_target("random", (24, 20), batch=2, seed=3, dtype=torch.float64).M
    c = theory.get_method("abba").config(r1=8, r2=8, alpha=3.0)
    assert not F._kr.gradient_cheaper(8, 8, 24, 20)
    hand = fit("abba", M, c, solver="lbfgs", steps=40, tol=0)
    monkeypatch.setattr(F, "_kr_value_and_grad", lambda *a: None)
    auto = fit("abba", M, c, solver="lbfgs", steps=40, tol=0)
    torch.testing.assert_close(hand.history_per_target, auto.history_per_target, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("name,kw", [("dora", {"r": 3, "alpha": 6.0}), ("alpha_lora", {"r": 3})])
@pytest.mark.parametrize("solver", ["adam", "lbfgs"])
def test_row_scaled_lora_gradient_and_autograd_give_the_same_run(name, kw, solver, monkeypatch):
    """DoRA and α-LoRA (``Method.row_form``): the hand-written gradient of
    ``solvers.rowscale`` runs Adam and L-BFGS as autograd does."""
    M = make_target("random", (24, 20), batch=2, seed=4, dtype=torch.float64).M
    w0 = make_target("gaussian", (24, 20), batch=2, seed=5, dtype=torch.float64).M / 20 ** 0.5
    c = theory.get_method(name).config(**kw)
    assert F._kr_value_and_grad(theory.get_method(name), M, w0, c, None) is not None
    hand = fit(name, M, c, w0=w0, solver=solver, steps=40, tol=0)
    monkeypatch.setattr(F, "_kr_value_and_grad", lambda *a: None)
    auto = fit(name, M, c, w0=w0, solver=solver, steps=40, tol=0)
    torch.testing.assert_close(hand.history_per_target, auto.history_per_target, rtol=1e-7, atol=1e-10)


def test_khatri_rao_gradient_and_autograd_give_the_same_lbfgs_run(monkeypatch):
    M = make_target("random", (40, 32), batch=2, seed=3, dtype=torch.float64).M
    c = theory.get_method("loha").config(r=2)
    kr = fit("loha", M, c, solver="lbfgs", steps=40, tol=0)
    monkeypatch.setattr(F, "_kr_value_and_grad", lambda *a: None)
    auto = fit("loha", M, c, solver="lbfgs", steps=40, tol=0)
    torch.testing.assert_close(kr.history_per_target, auto.history_per_target, rtol=1e-7, atol=1e-10)


def test_lbfgs_recovers_an_exact_hadamard_target_and_lora_optimum():
    g = torch.Generator().manual_seed(0)
    B1, A1 = torch.randn(3, 36, 2, generator=g, dtype=torch.float64), torch.randn(3, 2, 30, generator=g, dtype=torch.float64)
    B2, A2 = torch.randn(3, 36, 2, generator=g, dtype=torch.float64), torch.randn(3, 2, 30, generator=g, dtype=torch.float64)
    M = (B1 @ A1) * (B2 @ A2)
    res = fit("abba", M, theory.get_method("abba").config(r1=2, r2=2), solver="lbfgs",
              steps=400, init="spectral", restarts=2, tol=0)
    assert int((res.rel_error < 1e-8).sum()) >= 2, res.rel_error
    L = make_target("gaussian", (30, 20), batch=2, seed=4).M
    opt = lora_optimum(L.double(), 3)
    lora = fit("lora", L, theory.get_method("lora").config(r=3), solver="lbfgs", steps=300)
    assert float(((lora.rel_error - opt) / opt).max()) < 1e-4


def test_a_float32_fit_runs_lbfgs_in_its_own_dtype_and_ends_where_a_float64_state_does(monkeypatch):
    """``fit`` leaves L-BFGS's state dtype at its default, the factors' (half the vector work
    in float32, ``python -m reconstruction.bench --only h``); from the same float32 start a
    float64 state reaches the same errors, and the float32 run never raises its error."""
    from reconstruction.solvers import lbfgs as L

    M = make_target("random", (64, 48), batch=2, seed=6).M  # float32
    c = theory.get_method("abba").config(r1=4, r2=4)
    seen = []
    real = L.run_lbfgs

    def spy(*a, **kw):
        out = real(*a, **kw)
        seen.append(kw.get("state_dtype"))
        return out

    monkeypatch.setattr(F, "run_lbfgs", spy)
    f32 = fit("abba", M, c, solver="lbfgs", steps=300, tol=0)
    monkeypatch.setattr(F, "run_lbfgs", lambda *a, **kw: spy(*a, **{**kw, "state_dtype": torch.float64}))
    f64 = fit("abba", M, c, solver="lbfgs", steps=300, tol=0)
    assert seen == [None, torch.float64]  # the default: the factors' dtype
    assert f32.params["B1"].dtype == torch.float32
    assert float((f32.rel_error - f64.rel_error).abs().max()) < 1e-3, (f32.rel_error, f64.rel_error)
    assert bool((f32.history_per_target[1:] <= f32.history_per_target[:-1] + 1e-6).all())


def test_auto_runs_khatri_rao_als_on_small_targets_at_small_r1_r2_and_lbfgs_otherwise():
    abba, loha = theory.get_method("abba"), theory.get_method("loha")
    assert F.auto_solver(abba, abba.config(r1=8, r2=8), 256, 256) == "als"
    assert F.auto_solver(abba, abba.config(r1=8, r2=8), 1000, 1000) == "lbfgs"  # side >= 512
    assert F.auto_solver(abba, abba.config(r1=8, r2=8), 256, F.LBFGS_FROM) == "lbfgs"
    assert F.auto_solver(abba, abba.config(r1=36, r2=36), 1000, 1000) == "lbfgs"
    assert F.auto_solver(loha, loha.config(r=36), 1000, 1000) == "lbfgs"
    assert F.auto_solver("hira", theory.get_method("hira").config(r=36), 256, 256) == "als"
    assert F.auto_solver("vera", theory.get_method("vera").config(), 1000, 1000) == "als"
    assert F.auto_solver("lora", theory.get_method("lora").config(r=36), 1000, 1000) == "svd"
    # at 36×36, r1 = r2 = 6 is past the Khatri-Rao threshold: auto is L-BFGS from
    # lora-warm, the same run as an explicit lbfgs fit
    M = make_target("random", (36, 36), batch=2, seed=6, dtype=torch.float64).M
    c = abba.config(r1=6, r2=6)
    auto = fit("abba", M, c, solver="auto", steps=100)
    assert auto.solver == "lbfgs" and auto.init == "lora-warm"
    one = fit("abba", M, c, solver="lbfgs", steps=100)
    torch.testing.assert_close(auto.rel_error, one.rel_error, rtol=0, atol=0)


def test_lbfgs_starts_from_the_best_multiple_of_its_start_in_a_balanced_gauge():
    from reconstruction.solvers.common import initial_params, rescale_start

    meth = theory.get_method("abba")
    c = meth.config(r1=3, r2=2)
    M = make_target("sparse", (30, 26), batch=2, seed=1, dtype=torch.float64).M
    p = initial_params(meth, M, M, c, 0, "gaussian")
    p["A1"] = p["A1"] * 1e4  # a wildly unbalanced gauge, and ΔW far too large
    q = rescale_start(meth, M, M, c, p, None)
    D0, D1 = meth.delta(p, M, c), meth.delta(q, M, c)
    cos2 = (M * D0).sum((-2, -1)) ** 2 / ((M * M).sum((-2, -1)) * (D0 * D0).sum((-2, -1)))
    torch.testing.assert_close(F.relative_error(M, D1), 1 - cos2)  # the best multiple of ΔW
    for b, a in (("B1", "A1"), ("B2", "A2")):  # each rank-one component balanced
        torch.testing.assert_close(torch.linalg.vector_norm(q[b], dim=-2),
                                   torch.linalg.vector_norm(q[a], dim=-1))


def test_backtracking_evaluates_only_the_targets_still_backtracking_with_the_same_run(monkeypatch):
    """With ``value_and_grad_for``, a halving step re-evaluates only the targets whose
    trial failed Armijo (the others' trial stands): the same run, bit for bit on one CPU
    thread, for fewer target-evaluations than re-evaluating the whole batch."""
    from reconstruction.solvers import lbfgs as L

    M = make_target("random", (40, 36), batch=4, seed=4).M
    M[1] = make_target("sparse", (40, 36), seed=6).M[0]
    c = theory.get_method("abba").config(r1=8, r2=8)
    counts = {"targets": 0}
    real = F._kr_value_and_grad

    def counting(meth, Mt, *a):
        fn = real(meth, Mt, *a)

        def wrapped(p):
            counts["targets"] += Mt.shape[0]
            return fn(p)
        return wrapped

    monkeypatch.setattr(F, "_kr_value_and_grad", counting)
    sub = fit("abba", M, c, solver="lbfgs", steps=80, tol=0, init="gaussian")
    n_sub = counts["targets"]
    real_run = L.run_lbfgs
    monkeypatch.setattr(F, "run_lbfgs", lambda *a, **k: real_run(*a, **{**k, "value_and_grad_for": None}))
    counts["targets"] = 0
    whole = fit("abba", M, c, solver="lbfgs", steps=80, tol=0, init="gaussian")
    n_whole = counts["targets"]
    assert torch.equal(sub.history_per_target, whole.history_per_target)
    assert all(torch.equal(sub.params[k], whole.params[k]) for k in sub.params)
    assert n_sub < n_whole  # some step backtracked, and only its targets paid for it


def test_a_lone_target_is_fit_as_the_first_of_a_batch_where_its_factors_are_unaligned_in_the_state():
    # 64×49, r1 = r2 = 3: B2 starts 339 floats into a target's state, so a view of it (what
    # ``contiguous`` gives for one target) is aligned otherwise than a batch's copy, and
    # MKL's GEMMs round by alignment; the factors get buffers of their own
    M = make_target("random", (64, 49), batch=3, seed=7).M
    c = theory.get_method("abba").config(r1=3, r2=3)
    kw = dict(solver="lbfgs", init="lora-warm", steps=30, tol=0)
    both = F.fit("abba", M, c, **kw)
    one = F.fit("abba", M[:1], c, **kw)
    assert torch.equal(one.history_per_target[:, 0], both.history_per_target[:, 0])


def test_auto_fits_alpha_lora_by_lbfgs_from_side_512_and_dora_stays_with_adam():
    al, dora = theory.get_method("alpha_lora"), theory.get_method("dora")
    assert F.auto_solver(al, al.config(r=71), 1000, 1000) == "lbfgs"
    assert F.auto_solver(al, al.config(r=7), 256, F.LBFGS_FROM) == "lbfgs"
    assert F.auto_solver(al, al.config(r=7), 256, 256) == "adam"
    assert F.auto_solver(dora, dora.config(r=71), 1000, 1000) == "adam"


def test_alpha_lora_by_lbfgs_stops_by_its_rule_where_adam_ends():
    """Its stopping rule (``ADAM_TO_LBFGS``: 1e-4 over 20 iterations) ends every target
    long before ``LBFGS_ITERS``, within +0.0005 of Adam's 2000 steps (four targets,
    128×96)."""
    meth = theory.get_method("alpha_lora")
    M = torch.cat([make_target(k, (128, 96), 1, seed=0).M
                   for k in ("orthogonal", "lowrank", "sparse", "random")])
    W0 = torch.randn(4, 128, 96, generator=torch.Generator().manual_seed(1))
    adam = fit(meth, M, meth.config(r=7), w0=W0, solver="adam", seed=0)
    lb = fit(meth, M, meth.config(r=7), w0=W0, solver="lbfgs", seed=0)
    assert int(lb.steps_per_target.max()) < F.LBFGS_ITERS // 2
    assert bool((lb.rel_error <= adam.rel_error + 5e-4).all()), (lb.rel_error, adam.rel_error)
    unstopped = fit(meth, M, meth.config(r=7), w0=W0, solver="lbfgs", seed=0, tol=0.0, steps=300)
    # tol=0 stops only where the error stands still: the rule is what stopped them
    assert bool((unstopped.steps_per_target >= lb.steps_per_target).all())
    assert int(unstopped.steps_per_target.sum()) > int(lb.steps_per_target.sum()) + 200
