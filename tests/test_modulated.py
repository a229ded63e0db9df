"""The modulated updates s Σ_t F_t ⊙ (B_t A_t) (SMoA, HiRA, HUT) by L-BFGS
(``solvers.modulated``, ``precondition.gauss_newton_modulated``): the hand-written error
and gradient are autograd's, the H⁰ is the exact Gauss-Newton block inverse where F_t²
has rank one, a target's fit is the same alone or in a batch, and the preconditioned
run ends below ALS's 200 sweeps and far below plain L-BFGS."""

from __future__ import annotations

import pytest
import torch

import theory
from reconstruction import fit as F
from reconstruction.solvers import lbfgs as L
from reconstruction.solvers import modulated as Md
from reconstruction.solvers import precondition as P
from reconstruction.solvers.common import initial_params, is_modulated, structure
from reconstruction.targets import make_target

CONFIGS = {"smoa": dict(K=3, r=2), "hira": dict(r=3), "hut": dict(r=3)}


def _setup(name, m=30, n=20, b=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    meth = theory.get_method(name)
    cfg = meth.config(**CONFIGS[name])
    M = torch.randn(b, m, n, generator=g, dtype=dtype)
    W0 = torch.randn(b, m, n, generator=g, dtype=dtype)
    p = initial_params(meth, M, W0, cfg, 0, meth.inits[0])
    p = {k: v if k in meth.frozen else v + 0.3 * torch.randn(v.shape, generator=g, dtype=dtype)
         for k, v in p.items()}
    return meth, cfg, M, W0, p, structure(meth, p, W0, cfg)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_written_out_error_and_gradient_are_autograds(name):
    meth, cfg, M, W0, p, st = _setup(name)
    assert Md.applies(st) and is_modulated(meth)
    e, g = Md.value_and_grad(M, st)(p)
    fixed = {k: v for k, v in p.items() if k in meth.frozen}
    e_ad, g_ad = L._autograd_vg(meth, M, W0, cfg, fixed)({k: v for k, v in p.items() if k not in fixed})
    torch.testing.assert_close(e, e_ad, rtol=1e-12, atol=1e-12)
    assert sorted(g) == sorted(g_ad)
    for k in g:
        torch.testing.assert_close(g[k], g_ad[k], rtol=1e-10, atol=1e-12)


def test_only_the_modulated_updates_are_modulated():
    mods = {n for n in ("lora", "abba", "loha", "hira", "hut", "smoa", "vera", "lokr", "dora",
                        "alpha_lora", "miss", "pmss") if is_modulated(theory.get_method(n))}
    assert mods == {"hira", "hut", "smoa"}


@pytest.mark.parametrize("side,solver", [(512, "lbfgs"), (256, "als")])
def test_auto_fits_a_modulated_update_by_lbfgs_from_side_512(side, solver):
    for name in CONFIGS:
        meth = theory.get_method(name)
        assert F.auto_solver(meth, meth.config(**CONFIGS[name]), side, 300) == solver, name


def test_h0_is_the_exact_gauss_newton_block_inverse_where_the_modulator_squared_is_rank_one(monkeypatch):
    monkeypatch.setattr(P, "EPS", 0.0)
    monkeypatch.setattr(P, "RIDGE", 0.0)
    meth, cfg, M, W0, p, _ = _setup("hira")
    g = torch.Generator().manual_seed(1)
    a = torch.rand(M.shape[0], M.shape[1], 1, generator=g, dtype=M.dtype) + 0.5
    bv = torch.rand(M.shape[0], 1, M.shape[2], generator=g, dtype=M.dtype) + 0.5
    W0 = a * bv  # F = a bᵀ: F² = a² (b²)ᵀ has rank one
    st = structure(meth, p, W0, cfg)
    grads = {k: torch.randn(v.shape, generator=g, dtype=M.dtype) for k, v in p.items()}
    h = P.gauss_newton_modulated(M, st)(p)(grads)
    s = float(st.scale)
    c = 2 * s * s / M.pow(2).sum((-2, -1))
    for t in range(M.shape[0]):
        B, A, Q = p["B"][t], p["A"][t], W0[t] ** 2
        for i in range(M.shape[1]):  # row i of B: G_i = c A diag(F[i]²) Aᵀ
            G = c[t] * (A * Q[i]) @ A.mT
            torch.testing.assert_close(h["B"][t, i], torch.linalg.solve(G, grads["B"][t, i]),
                                       rtol=1e-8, atol=1e-10)
        for j in range(M.shape[2]):  # column j of A: G_j = c Bᵀ diag(F[:, j]²) B
            G = c[t] * (B.mT * Q[:, j]) @ B
            torch.testing.assert_close(h["A"][t, :, j], torch.linalg.solve(G, grads["A"][t, :, j]),
                                       rtol=1e-8, atol=1e-10)


def test_the_modulated_h0_of_a_target_is_the_same_alone_and_in_a_batch():
    meth, cfg, M, W0, p, st = _setup("smoa", m=40, n=30, dtype=torch.float32)
    grads = {k: torch.randn_like(v) for k, v in p.items() if k not in meth.frozen}
    both = P.gauss_newton_modulated(M, st)(p)(grads)
    for t in range(M.shape[0]):
        rows = torch.tensor([t])
        one = P.gauss_newton_modulated(M[t:t + 1], Md.subset(st, rows))(
            {k: v[t:t + 1] for k, v in p.items()})({k: v[t:t + 1] for k, v in grads.items()})
        for k in grads:
            assert torch.equal(one[k][0], both[k][t]), (k, t)


@pytest.mark.parametrize("name,cfg", [("smoa", dict(K=4, r=4)), ("hut", dict(r=12))])
def test_preconditioned_lbfgs_ends_below_200_als_sweeps_and_far_below_plain_lbfgs(name, cfg):
    M = torch.cat([make_target(k, (200, 160), seed=2).M for k in ("orthogonal", "sparse", "random")])
    c = theory.get_method(name).config(**cfg)
    # the solvers' reach: ALS's 200 sweeps against L-BFGS's MODULATED_ITERS, no early stop
    als = F.fit(name, M, c, solver="als", steps=200, tol=0)
    pre = F.fit(name, M, c, solver="lbfgs", tol=0)
    plain = F.fit(name, M, c, solver="lbfgs", precondition=False, tol=0)
    assert bool((pre.rel_error <= als.rel_error + 5e-4).all()), (pre.rel_error, als.rel_error)
    assert bool((pre.rel_error < plain.rel_error - 0.005).all()), (pre.rel_error, plain.rel_error)


def test_lbfgs_of_a_modulated_update_starts_with_the_als_warm_sweeps_and_stops_by_its_rule(monkeypatch):
    seen = {}
    real = F.run_lbfgs

    def spy(*a, **kw):
        seen.update(steps=kw["steps"], tol=kw["tol"], window=kw["window"],
                    pre=kw["precondition"] is not None)
        return real(*a, **{**kw, "steps": 3})

    monkeypatch.setattr(F, "run_lbfgs", spy)
    M = make_target("random", (24, 20), seed=0).M
    res = F.fit("hira", M, theory.get_method("hira").config(r=2), solver="lbfgs")
    assert seen == {"steps": F.MODULATED_ITERS, "tol": F.MODULATED_STOP[0],
                    "window": F.MODULATED_STOP[1], "pre": True}
    assert int(res.steps_per_target[0]) == F.WARM_SWEEPS + 3
    assert len(res.history_per_target) == F.WARM_SWEEPS + 3 + 1


@pytest.mark.parametrize("name", ["smoa", "hut"])
def test_a_modulated_lbfgs_fit_is_the_same_alone_and_in_a_batch_bit_for_bit(name):
    # 64×48: each target's m n floats a multiple of 64 bytes, so the batch's targets are
    # aligned like a target alone (MKL's GEMMs round by their operands' alignment)
    M = make_target("random", (64, 48), batch=3, seed=7).M
    W0 = torch.randn(M.shape, generator=torch.Generator().manual_seed(8)) / 48 ** 0.5
    c = theory.get_method(name).config(**({"K": 2, "r": 3} if name == "smoa" else {"r": 5}))
    kw = dict(solver="lbfgs", steps=40, tol=0)
    both = F.fit(name, M, c, w0=W0, **kw)
    for t in range(3):
        one = F.fit(name, M[t:t + 1], c, w0=W0[t:t + 1], **kw)
        assert torch.equal(one.rel_error[0], both.rel_error[t]), t
        assert torch.equal(one.history_per_target[:, 0], both.history_per_target[:, t]), t
