"""Deterministic equivalents of α-LoRA (rmt.theory): algebraic and analytic properties.

Agreement with the Monte Carlo simulation is in tests/test_rmt_simulate.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rmt import theory
from rmt.theory import Setting

FIG1 = Setting(N=5000, n=40, p=1000, mu_norm=0.8, mu_perp_norm=0.8, beta=0.5,
               gamma_src=5.0, gamma=0.1)

settings_st = st.builds(
    Setting,
    N=st.integers(1, 20000), n=st.integers(1, 5000), p=st.integers(2, 5000),
    mu_norm=st.floats(0.05, 3.0), mu_perp_norm=st.floats(0.0, 3.0),
    beta=st.floats(-1.0, 1.0), gamma_src=st.floats(0.01, 10.0), gamma=st.floats(0.01, 10.0),
)


@given(eta=st.floats(1e-3, 50), gamma=st.floats(1e-3, 50))
@settings(max_examples=200, deadline=None)
def test_delta_is_the_positive_root_of_its_quadratic(eta, gamma):
    d = theory.delta(eta, gamma)
    assert d > 0
    assert abs(gamma * d * d + (1 + gamma - eta) * d - eta) <= 1e-9 * max(1.0, eta, gamma * d * d)


@given(eta=st.floats(1e-2, 20), gamma=st.floats(1e-2, 20))
@settings(max_examples=100, deadline=None)
def test_delta_prime_matches_finite_difference(eta, gamma):
    h = 1e-6 * gamma
    fd = (theory.delta(eta, gamma + h) - theory.delta(eta, gamma - h)) / (2 * h)
    assert theory.delta_prime(eta, gamma) == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_first_order_derivatives_match_finite_differences():
    rng = np.random.default_rng(0)
    for _ in range(30):
        eta, gamma, M = rng.uniform(0.05, 5), rng.uniform(0.05, 5), rng.uniform(0, 4)
        W = rng.uniform(0.1, 3)
        c = rng.uniform(-1, 1) * math.sqrt(W * M)
        f = theory._first_order(eta, gamma, M, c, W)
        h = 1e-6 * gamma
        fp = theory._first_order(eta, gamma + h, M, c, W)
        fm = theory._first_order(eta, gamma - h, M, c, W)
        for k in "ABC":
            fd = (fp[k] - fm[k]) / (2 * h)
            assert f[k + "_p"] == pytest.approx(fd, rel=1e-5, abs=1e-10), k


@given(settings_st)
@settings(max_examples=100, deadline=None)
def test_source_norm_equals_design_h_form(s):
    """lim ‖w̃‖² = −C̃'(γ̃) coincides with DESIGN §5's h̃-form (eq. 9)."""
    assert theory.source_stats(s)["w_norm2"] == pytest.approx(theory.design_w_norm2(s),
                                                              rel=1e-9)


@given(settings_st)
@settings(max_examples=100, deadline=None)
def test_score_variance_is_positive_and_cauchy_schwarz_holds(s):
    co = theory.score_coefficients(s)
    assert co["V0"] > 0 and co["V2"] > 0
    assert co["V1"] ** 2 <= co["V0"] * co["V2"] * (1 + 1e-9)  # σ²(α) > 0 for all α
    src = theory.source_stats(s)
    assert src["w_dot_mu"] ** 2 <= src["w_norm2"] * s.target_mean_norm2 * (1 + 1e-9)


@given(settings_st.filter(lambda s: abs(s.beta) > 0.05))
@settings(max_examples=80, deadline=None)
def test_alpha_star_maximises_accuracy_on_a_dense_grid(s):
    a_star = theory.alpha_star(s)
    assume_finite = math.isfinite(a_star)
    grid = np.linspace(-50, 50, 20001)
    acc = theory.accuracy(s, grid)
    if assume_finite:
        assert theory.accuracy(s, a_star) >= acc.max() - 1e-12
        # and it is a stationary point of m/σ
        h = 1e-5 * max(1.0, abs(a_star))
        m, v = theory.mean_var(s, [a_star - h, a_star + h])
        r = m / np.sqrt(v)
        assert abs(r[1] - r[0]) <= 1e-6 * max(1.0, abs(r[0]))


@given(settings_st.filter(lambda s: abs(s.beta) > 0.05))
@settings(max_examples=80, deadline=None)
def test_alpha_worst_gives_chance_accuracy(s):
    a_bar = theory.alpha_worst(s)
    assert theory.accuracy(s, a_bar) == pytest.approx(0.5, abs=1e-9)


def test_unrelated_source_gives_alpha_star_zero():
    s = FIG1.replace(beta=0.0)
    assert theory.alpha_star(s) == pytest.approx(0.0, abs=1e-12)
    assert theory.pretrained_accuracy(s) == pytest.approx(0.5)


def test_figure1_published_alpha_star_recovered():
    """Published α* ≈ 1.64 / 4.1 / 7.5 (read off the paper's Figure 1); tolerance ±2%."""
    for beta, published in ((0.2, 1.64), (0.5, 4.1), (0.9, 7.5)):
        a = theory.alpha_star(FIG1.replace(beta=beta))
        assert a == pytest.approx(published, rel=0.02), (beta, a)


def test_alpha_star_increases_with_similarity_in_figure2():
    for p in (2, 20, 200, 2000):
        s = Setting(N=2000, n=200, p=p, mu_norm=1, mu_perp_norm=1, beta=0, gamma_src=1,
                    gamma=1)
        a = [theory.alpha_star(s.replace(beta=b)) for b in np.linspace(0, 1, 21)]
        assert np.all(np.diff(a) > 0)


def test_symmetric_accuracy_is_the_folded_signed_accuracy():
    alpha = np.linspace(-10, 10, 101)
    signed = theory.accuracy(FIG1, alpha)
    sym = theory.accuracy(FIG1, alpha, symmetric=True)
    assert np.allclose(sym, np.maximum(signed, 1 - signed))
    assert np.any(signed < 0.5)


def test_setting_is_the_fixed_source_case_with_limit_source_statistics():
    s = FIG1
    src = theory.source_stats(s)
    alpha = np.linspace(-3, 9, 13)
    m1, v1 = theory.mean_var(s, alpha)
    m2, v2 = theory.fixed_source_mean_var(alpha, p=s.p, n=s.n, gamma=s.gamma,
                                          mu_norm2=s.target_mean_norm2,
                                          w_dot_mu=src["w_dot_mu"], w_norm2=src["w_norm2"])
    assert np.allclose(m1, m2) and np.allclose(v1, v2)


def test_no_source_limit_is_plain_ridge():
    """α = 0 does not depend on the source at all."""
    a = [theory.mean_var(FIG1.replace(gamma_src=g, N=N), 0.0) for g, N in ((0.1, 50), (9, 9000))]
    assert a[0][0] == pytest.approx(a[1][0]) and a[0][1] == pytest.approx(a[1][1])


def test_regression_alpha_star_is_the_argmin_of_the_risk():
    kw = dict(p=300, n=100, gamma=0.5, wt_norm2=2.0, ws_norm2=3.0, wt_dot_ws=1.2,
              noise_var=0.3, k=2)
    grid = np.linspace(-3, 3, 60001)
    risk = theory.regression_risk(grid, **kw)
    assert grid[np.argmin(risk)] == pytest.approx(theory.regression_alpha_star(**kw),
                                                  abs=2e-4)
    assert theory.regression_alpha_star(**kw) == pytest.approx(0.4)


def test_regression_risk_at_large_ridge_tends_to_signal_plus_noise():
    """γ → ∞ gives W_α → αW_s: risk → ‖W_t − αW_s‖² + k s²."""
    kw = dict(p=200, n=100, wt_norm2=2.0, ws_norm2=3.0, wt_dot_ws=1.2, noise_var=0.3, k=2)
    r = theory.regression_risk(0.7, gamma=1e7, **kw)
    assert r == pytest.approx(2.0 - 2 * 0.7 * 1.2 + 0.49 * 3.0 + 0.6, rel=1e-5)


@pytest.mark.parametrize("kw, match", [
    (dict(beta=1.5), "beta"), (dict(gamma=0.0), "gamma"), (dict(gamma_src=-1), "gamma_src"),
    (dict(p=0), "p"), (dict(n=2.5), "n"), (dict(N=True), "N"), (dict(mu_norm=float("nan")),
                                                                "mu_norm"),
    (dict(mu_perp_norm=-1), "mu_perp_norm"), (dict(beta="x"), "beta"),
])
def test_bad_setting_raises_one_line_value_error(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        FIG1.replace(**kw)
    assert "\n" not in str(e.value)


def test_bad_fixed_source_input_raises_value_error():
    base = dict(p=100, n=10, gamma=1.0, mu_norm2=1.0, w_dot_mu=0.5, w_norm2=1.0)
    with pytest.raises(ValueError, match="Cauchy-Schwarz"):
        theory.fixed_source_mean_var(1.0, **{**base, "w_dot_mu": 2.0})
    with pytest.raises(ValueError, match="gamma"):
        theory.fixed_source_alpha_star(**{**base, "gamma": -1})
    with pytest.raises(ValueError, match="alpha"):
        theory.fixed_source_accuracy([1.0, float("inf")], **base)
    with pytest.raises(ValueError, match="ws_norm2"):
        theory.regression_alpha_star(ws_norm2=0.0, wt_dot_ws=1.0)
