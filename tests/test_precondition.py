"""L-BFGS's Gauss-Newton H⁰ for a Hadamard pair (``solvers.precondition``): exact where
its Kronecker-factored approximation is (a partner whose square is rank one), the same
for a target alone or in a batch, finite on a zero factor, and a faster L-BFGS than
γ I from the same start."""

from __future__ import annotations

import pytest
import torch

import theory
from reconstruction import fit as F
from reconstruction.solvers import als_kr as _kr
from reconstruction.solvers import precondition as P
from reconstruction.solvers.common import structure
from reconstruction.targets import make_target


def _setup(m=14, n=11, r1=3, r2=2, b=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    meth = theory.get_method("abba")
    cfg = meth.config(r1=r1, r2=r2)
    p = {"B1": torch.randn(b, m, r1, generator=g, dtype=dtype),
         "A1": torch.randn(b, r1, n, generator=g, dtype=dtype),
         "B2": torch.randn(b, m, r2, generator=g, dtype=dtype),
         "A2": torch.randn(b, r2, n, generator=g, dtype=dtype)}
    st = structure(meth, p, None, cfg)
    M = torch.randn(b, m, n, generator=g, dtype=dtype)
    grads = {k: torch.randn(v.shape, generator=g, dtype=dtype) for k, v in p.items()}
    return M, st, p, grads


def test_h0_is_the_exact_gauss_newton_block_inverse_where_the_partner_squared_is_rank_one(monkeypatch):
    monkeypatch.setattr(P, "EPS", 0.0)
    monkeypatch.setattr(P, "RIDGE", 0.0)
    M, st, p, g = _setup()
    # partner B2 A2 = a bᵀ: its square a² (b²)ᵀ is rank one, the approximation exact
    p["B2"][..., 1:] = 0
    p["A2"][:, 1:] = 0
    s = float(st.scale)
    c = 2 * s * s / M.pow(2).sum((-2, -1))  # (b,)
    h = P.gauss_newton(M, st, _kr.names(st))(p)(g)
    P2 = p["B2"] @ p["A2"]  # (b, m, n)
    for t in range(M.shape[0]):
        B1, A1, Q = p["B1"][t], p["A1"][t], P2[t] ** 2
        for i in range(M.shape[1]):  # row i of B1: G_i = c A1 diag(P2[i]²) A1ᵀ
            G = c[t] * (A1 * Q[i]) @ A1.mT
            torch.testing.assert_close(h["B1"][t, i], torch.linalg.solve(G, g["B1"][t, i]),
                                       rtol=1e-8, atol=1e-10)
        for j in range(M.shape[2]):  # column j of A1: G_j = c B1ᵀ diag(P2[:, j]²) B1
            G = c[t] * (B1.mT * Q[:, j]) @ B1
            torch.testing.assert_close(h["A1"][t, :, j], torch.linalg.solve(G, g["A1"][t, :, j]),
                                       rtol=1e-8, atol=1e-10)


def test_h0_of_a_target_is_the_same_alone_and_in_a_batch():
    M, st, p, g = _setup(m=40, n=30, r1=5, r2=4, b=3, dtype=torch.float32)
    own = _kr.names(st)
    both = P.gauss_newton(M, st, own)(p)(g)
    for t in range(3):
        one = P.gauss_newton(M[t:t + 1], st, own)({k: v[t:t + 1] for k, v in p.items()})(
            {k: v[t:t + 1] for k, v in g.items()})
        for k in p:
            assert torch.equal(one[k][0], both[k][t]), (k, t)


def test_a_zero_factor_gives_a_finite_h0_and_the_others_keep_theirs():
    M, st, p, g = _setup()
    own = _kr.names(st)
    before = P.gauss_newton(M, st, own)(p)(g)
    p["B2"][1] = 0  # target 1's partner of pair 1 vanishes: no curvature there
    h = P.gauss_newton(M, st, own)(p)(g)
    assert all(bool(torch.isfinite(v).all()) for v in h.values())
    for k in p:  # targets 0 and 2 untouched
        torch.testing.assert_close(h[k][[0, 2]], before[k][[0, 2]], rtol=0, atol=0)


def test_preconditioned_lbfgs_ends_lower_than_plain_lbfgs_in_the_same_iterations():
    M = make_target("random", (200, 160), batch=2, seed=3).M
    M = torch.cat([M, make_target("orthogonal", (200, 160), seed=4).M])
    c = theory.get_method("abba").config(r1=6, r2=6)
    kw = dict(solver="lbfgs", init="lora-warm", steps=150, tol=0)
    pre = F.fit("abba", M, c, **kw)
    plain = F.fit("abba", M, c, precondition=False, **kw)
    longer = F.fit("abba", M, c, precondition=False, **{**kw, "steps": 300})
    assert bool((pre.rel_error < plain.rel_error).all()), (pre.rel_error, plain.rel_error)
    # and within its 150 iterations it gets most of the way to where 300 plain ones end
    gain_pre = plain.history_per_target[0] - pre.rel_error
    gain_long = plain.history_per_target[0] - longer.rel_error
    assert bool((gain_pre >= 0.9 * gain_long).all()), (pre.rel_error, longer.rel_error)


@pytest.mark.parametrize("precondition,iters", [(True, F.PRECONDITIONED_ITERS), (False, F.LBFGS_ITERS)])
def test_fit_gives_lbfgs_the_preconditioned_iteration_count_only_with_the_preconditioner(precondition, iters, monkeypatch):
    seen = {}
    real = F.run_lbfgs

    def spy(*a, **kw):
        seen.update(steps=kw["steps"], pre=kw["precondition"] is not None)
        return real(*a, **{**kw, "steps": 2})

    monkeypatch.setattr(F, "run_lbfgs", spy)
    M = make_target("random", (12, 10), seed=0).M
    F.fit("abba", M, theory.get_method("abba").config(r1=2, r2=2), solver="lbfgs",
          precondition=precondition)
    assert seen == {"steps": iters, "pre": precondition}


@pytest.mark.parametrize("r", [2, 6])  # the Khatri-Rao gradient and the one through ΔW
def test_a_preconditioned_lbfgs_fit_is_the_same_alone_and_in_a_batch_bit_for_bit(r):
    M = make_target("random", (60, 50), batch=3, seed=7).M
    c = theory.get_method("abba").config(r1=r, r2=r)
    kw = dict(solver="lbfgs", init="lora-warm", steps=40, tol=0)
    both = F.fit("abba", M, c, **kw)
    for t in range(3):
        one = F.fit("abba", M[t:t + 1], c, **kw)
        assert torch.equal(one.rel_error[0], both.rel_error[t]), t
        assert torch.equal(one.history_per_target[:, 0], both.history_per_target[:, t]), t
