"""Exact solvers (``reconstruction.solvers.exact``): PMSS and MiSS closed forms, the
exact ALS of VeRA and LoKr, wired into ``fit(solver="auto")``."""

from __future__ import annotations

import pytest
import torch

import theory
from reconstruction.fit import fit, relative_error, solvers_for
from reconstruction.solvers import exact
from reconstruction.solvers.common import initial_params
from theory.methods.lokr import kron

F64 = torch.float64


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _dense_lstsq(meth, config, p, w0, M, name):
    """min_x ‖vec M − J x − vec ΔW(p with factor ``name`` = 0)‖ by a dense lstsq
    over the vectorized map (ΔW is affine in factor ``name``); returns (x, J x + off)."""
    base = dict(p)
    base[name] = torch.zeros_like(p[name])
    off = meth.delta(base, w0, config).reshape(-1)
    cols = []
    for k in range(p[name].numel()):
        e = torch.zeros(p[name].numel(), dtype=F64)
        e[k] = 1.0
        q = dict(base)
        q[name] = e.reshape(p[name].shape)
        cols.append(meth.delta(q, w0, config).reshape(-1) - off)
    J = torch.stack(cols, 1)  # (m n, |factor|)
    x = torch.linalg.lstsq(J, (M.reshape(-1) - off)[:, None], driver="gelsd").solution[:, 0]
    return x.reshape(p[name].shape), (J @ x + off).reshape(M.shape)


# --------------------------------------------------------------------------- #
# registry wiring
# --------------------------------------------------------------------------- #
def test_solvers_for_offers_svd_for_pmss_miss_and_als_for_vera_lokr():
    assert solvers_for("pmss") == ["svd", "adam", "lbfgs"]
    assert solvers_for("miss") == ["svd", "adam", "lbfgs"]
    assert solvers_for("vera") == ["als", "adam", "lbfgs"]
    assert solvers_for("lokr") == ["als", "adam", "lbfgs"]
    M = _randn(1, 12, 8)
    assert fit("pmss", M, theory.get_method("pmss").config(r=3), w0=_randn(1, 12, 8, seed=1)).solver == "svd"
    assert fit("miss", M, theory.get_method("miss").config(r=2)).solver == "svd"
    assert fit("vera", M, theory.get_method("vera").config(r=3), steps=5).solver == "als"
    assert fit("lokr", M, theory.get_method("lokr").config(r=1), steps=5).solver == "als"


# --------------------------------------------------------------------------- #
# closed forms = dense least squares
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("rank_w0", [None, 2])
def test_pmss_closed_form_equals_dense_lstsq_over_the_vectorized_map(rank_w0):
    """U* = U0 + C⁺ M R⁺, also when W0 (so C, R) is rank-deficient (rank 2 < r = 4)."""
    meth = theory.get_method("pmss")
    c = meth.config(r=4)
    m, n = 14, 11
    w0 = _randn(2, m, n, seed=1)
    if rank_w0:
        w0 = _randn(2, m, rank_w0, seed=2) @ _randn(2, rank_w0, n, seed=3)
    M = _randn(2, m, n, seed=4)
    res = fit("pmss", M, c, w0=w0)
    assert res.solver == "svd"
    for b in range(2):
        p = {k: v[b] for k, v in res.params.items()}
        x, D = _dense_lstsq(meth, c, {**p, "U": p["U"] - p["U0"], "U0": torch.zeros_like(p["U0"])},
                            w0[b], M[b], "U")
        assert torch.allclose(res.delta[b], D, atol=1e-9, rtol=0)
        # both are the minimum-norm solution of the Kronecker system
        assert torch.allclose(p["U"] - p["U0"], x, atol=1e-9 * max(1.0, float(x.abs().max())), rtol=0)
        assert abs(float(res.rel_error[b]) - float(relative_error(M[b], D))) < 1e-9


@pytest.mark.parametrize("kw", [{"r": 3}, {"r": 4}, {"r": 3, "mode": "bat"},
                                {"r": 3, "mode": "mini", "mini_r": 4}, {"r": 5, "mode": "mini", "mini_r": 2}])
def test_miss_closed_form_equals_dense_lstsq_in_every_mode(kw):
    """balance / mini: column (and row) residue means; bat: one least squares per row block."""
    meth = theory.get_method("miss")
    c = meth.config(**kw)
    m, n = 12, 9 if kw.get("mode") != "bat" else 12  # r = 4 does not divide n = 9: a cut tile
    w0 = _randn(2, m, n, seed=5)
    M = _randn(2, m, n, seed=6)
    res = fit("miss", M, c, w0=w0)
    assert res.solver == "svd"
    for b in range(2):
        p = {k: v[b] for k, v in res.params.items()}
        x, D = _dense_lstsq(meth, c, p, w0[b], M[b], "D")
        assert torch.allclose(res.delta[b], D, atol=1e-9, rtol=0)
        assert torch.allclose(p["D"], x, atol=1e-9, rtol=0)


def test_miss_balance_shard_is_the_mean_of_each_column_residue_class():
    M = _randn(1, 5, 7)
    D = exact.miss_shard(M, None, theory.get_method("miss").config(r=3))  # (1, 3, 5)
    for k in range(3):
        assert torch.allclose(D[0, k], M[0, :, k::3].mean(-1), atol=1e-14)


# --------------------------------------------------------------------------- #
# VeRA and LoKr: exact ALS
# --------------------------------------------------------------------------- #
def _method_target(name, config, m, n, seed):
    """A target the method reaches exactly at ``config`` (VeRA: with the frozen A, B
    that ``fit`` draws at seed 0)."""
    meth = theory.get_method(name)
    w0 = torch.zeros(1, m, n, dtype=F64)
    p = initial_params(meth, w0, w0, config, 0, "gaussian")
    for k in p:
        if k not in meth.frozen:
            p[k] = _randn(*p[k].shape, seed=100 + seed)
    return meth.delta(p, w0, config), w0


ALS_CASES = [("vera", {"r": 4}, (16, 12)), ("vera", {"r": 30}, (16, 12)),
             ("lokr", {"r": 2}, (24, 20)), ("lokr", {"r": 1, "decompose_both": True}, (24, 20)),
             ("lokr", {"r": 2, "alpha": 6.0, "decompose_both": True, "decompose_factor": 8}, (64, 64))]


@pytest.mark.parametrize("name,kw,shape", ALS_CASES)
def test_exact_als_error_never_increases_from_sweep_to_sweep(name, kw, shape):
    c = theory.get_method(name).config(**kw)
    M = _randn(3, *shape, seed=7)
    res = fit(name, M, c, steps=80)
    H = res.history_per_target  # (sweeps + 1, B)
    assert H.shape[0] >= 2
    assert bool((H[1:] <= H[:-1] + 1e-12).all()), (H[1:] - H[:-1]).max()
    assert torch.allclose(H[-1], res.rel_error, atol=1e-9)
    # every start of the batched multi-start, not only the winner, is monotone
    p0 = initial_params(theory.get_method(name), M, M, c, 0, "gaussian")
    if name == "vera":
        _, hist, _ = exact.run_vera(M, p0, steps=40, tol=0.0, window=5, starts=1)
    else:
        _, hist, _ = exact.run_lokr(theory.get_method(name), M, c, p0, steps=40, tol=0.0, window=5,
                                    starts=1)
    H1 = torch.stack(hist)
    assert bool((H1[1:] <= H1[:-1] + 1e-12).all())


@pytest.mark.parametrize("name,kw,shape", ALS_CASES)
def test_exact_als_recovers_a_target_built_by_the_method(name, kw, shape):
    c = theory.get_method(name).config(**kw)
    errs = []
    for seed in range(4):
        M, w0 = _method_target(name, c, *shape, seed)
        errs.append(float(fit(name, M, c, w0=w0, seed=0, steps=400, tol=1e-13).rel_error[0]))
    assert sum(e < 1e-8 for e in errs) >= 3, errs


def test_lokr_rearrangement_turns_the_kronecker_product_into_a_rank_one():
    W1, W2 = _randn(2, 3, 4, seed=1), _randn(2, 5, 2, seed=2)
    Rm = exact.rearrange(kron(W1, W2), 3, 5, 4, 2)
    assert torch.allclose(Rm, W1.reshape(2, -1, 1) * W2.reshape(2, 1, -1), atol=1e-14)


def test_lokr_with_both_factors_free_is_the_rank_one_svd_of_the_rearrangement():
    meth = theory.get_method("lokr")
    c = meth.config(r=8, alpha=2.0)  # r >= max/2 everywhere: W1 (4, 4), W2 (6, 5) free
    sh = meth.shapes(24, 20, c)
    assert sh.full_w1 and sh.full_w2
    M = _randn(3, 24, 20, seed=8)
    res = fit("lokr", M, c)
    Rm = exact.rearrange(M, sh.a, sh.b, sh.c, sh.d)
    U, S, Vh = torch.linalg.svd(Rm, full_matrices=False)
    best = S[:, :1, None] * U[:, :, :1] * Vh[:, :1, :]  # σ1 u1 v1ᵀ
    assert torch.allclose(exact.rearrange(res.delta, sh.a, sh.b, sh.c, sh.d), best, atol=1e-10)
    assert torch.allclose(res.rel_error, 1 - S[:, 0] ** 2 / (S ** 2).sum(-1), atol=1e-12)


# --------------------------------------------------------------------------- #
# optimality against Adam, batching, dtypes
# --------------------------------------------------------------------------- #
OPT_CASES = [("pmss", {"r": 3}), ("miss", {"r": 3}), ("miss", {"r": 2, "mode": "bat"}),
             ("miss", {"r": 2, "mode": "mini", "mini_r": 4}), ("vera", {"r": 6}),
             ("lokr", {"r": 2}), ("lokr", {"r": 1, "decompose_both": True})]


@pytest.mark.parametrize("name,kw", OPT_CASES)
def test_adam_never_beats_the_exact_solver(name, kw):
    meth = theory.get_method(name)
    c = meth.config(**kw)
    M = _randn(2, 16, 12, seed=9)
    w0 = _randn(2, 16, 12, seed=10)
    ex = fit(name, M, c, w0=w0, steps=400, tol=1e-10)
    for init in meth.inits[:2]:
        for lr in (1e-2, 3e-2):  # the seed picks VeRA's frozen projections: keep it
            ad = fit(name, M, c, w0=w0, solver="adam", init=init, lr=lr, steps=400)
            assert bool((ad.rel_error >= ex.rel_error - 1e-6).all()), (init, lr, ad.rel_error, ex.rel_error)


@pytest.mark.parametrize("name,kw", OPT_CASES)
def test_batched_fit_equals_per_target_fits(name, kw):
    c = theory.get_method(name).config(**kw)
    M = _randn(3, 16, 12, seed=11)
    w0 = _randn(3, 16, 12, seed=12)
    both = fit(name, M, c, w0=w0, steps=100)
    for b in range(3):
        one = fit(name, M[b : b + 1], c, w0=w0[b : b + 1], steps=100)
        assert abs(float(one.rel_error[0]) - float(both.rel_error[b])) < 1e-9
        assert torch.allclose(one.delta[0], both.delta[b], atol=1e-7)


@pytest.mark.parametrize("name,kw", OPT_CASES)
def test_exact_solvers_take_float32_and_return_float32_factors(name, kw):
    c = theory.get_method(name).config(**kw)
    M, w0 = _randn(2, 16, 12, seed=13), _randn(2, 16, 12, seed=14)
    r64 = fit(name, M, c, w0=w0, steps=60)
    r32 = fit(name, M.float(), c, w0=w0.float(), steps=60)
    assert all(v.dtype == torch.float32 for v in r32.params.values())
    assert r32.delta.dtype == torch.float32
    assert torch.allclose(r32.rel_error, r64.rel_error, atol=1e-4)


@pytest.mark.parametrize("name,kw", [("vera", {"r": 6}), ("lokr", {"r": 2})])
def test_exact_als_warm_started_from_its_own_result_does_not_get_worse(name, kw):
    c = theory.get_method(name).config(**kw)
    M = _randn(2, 16, 12, seed=15)
    first = fit(name, M, c, steps=50)
    again = fit(name, M, c, params0=first.params, steps=20)
    assert bool((again.rel_error <= first.rel_error + 1e-12).all())
    assert torch.allclose(again.history_per_target[0], first.rel_error, atol=1e-9)
