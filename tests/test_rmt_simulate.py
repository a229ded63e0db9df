"""Theory (rmt.theory) against Monte Carlo (rmt.simulate) for α-LoRA.

Tolerances: accuracy within 3 Monte Carlo s.e. + 0.005; score mean and variance
within 3 s.e. + 0.005 + 1% of the value (finite-size O(1/n) bias). The fast tier
runs 8 points (p = 400 > N, and the β = 0.5 curve of Figure 1 at p = 1000); the slow tier (-m slow) the full grid of
25 points, including every setting of the paper's Figures 1 and 2.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from rmt import simulate as sim
from rmt import theory
from rmt.theory import Setting

ALPHAS = np.array([-3.0, -1.0, 0.0, 0.5, 1.0, 2.0, 4.0, 8.0])

FAST = [  # (setting, trials)
    (Setting(400, 100, 50, 1.0, 1.0, 0.6, 1.0, 0.5), 120),      # n > p: Bartlett target
    (Setting(300, 100, 400, 1.5, 1.0, 0.7, 0.5, 0.5), 40),      # p ≥ 400 > N: push-through
    (Setting(200, 30, 100, 1.2, 0.8, 0.9, 2.0, 0.1), 120),      # p > n
    (Setting(500, 80, 60, 1.0, 1.5, -0.5, 1.0, 1.0), 120),      # negative similarity
    (Setting(400, 60, 80, 1.0, 1.0, 0.0, 1.0, 1.0), 120),       # unrelated source
    (Setting(600, 200, 20, 1.0, 1.0, 1.0, 0.3, 2.0), 150),      # identical tasks, small p
    (Setting(2000, 200, 200, 1.0, 1.0, 0.5, 1.0, 1.0), 40),     # a Figure-2 point
    (Setting(5000, 40, 1000, 0.8, 0.8, 0.5, 5.0, 0.1), 16),     # a Figure-1 point, p = 1000
]

FIG1 = [(Setting(5000, 40, 1000, 0.8, 0.8, b, 5.0, 0.1), 60) for b in (0.2, 0.5, 0.9)]
FIG2 = [(Setting(2000, 200, p, 1.0, 1.0, b, 1.0, 1.0), t)
        for p, t in ((2, 300), (20, 300), (200, 80), (2000, 12)) for b in (0.3, 0.8)]
MORE = [
    (Setting(1000, 100, 500, 1.0, 1.2, -0.4, 1.0, 0.2), 40),
    (Setting(1000, 300, 600, 1.2, 0.8, 0.6, 2.0, 0.05), 30),
    (Setting(500, 60, 800, 1.5, 1.5, 0.8, 0.5, 1.0), 40),
    (Setting(200, 800, 100, 1.0, 1.0, 0.95, 1.0, 0.2), 100),
    (Setting(3000, 50, 400, 0.7, 1.0, 0.3, 0.2, 0.3), 40),
    (Setting(800, 120, 300, 2.0, 0.5, 0.5, 3.0, 3.0), 60),
]
SLOW = FIG1 + FIG2 + MORE + FAST


def _id(case):
    s, _ = case
    return f"N{s.N}-n{s.n}-p{s.p}-b{s.beta:g}"


@functools.cache
def _stats(s: Setting, trials: int, sampler: str = "auto") -> sim.TrialStats:
    return sim.simulate_stats(s, trials=trials, seed=1234 + s.p, sampler=sampler)


def _check_against_theory(s: Setting, st: sim.TrialStats):
    acc = st.accuracy(ALPHAS)
    m, v = st.mean_var(ALPHAS)
    th_acc = theory.accuracy(s, ALPHAS)
    th_m, th_v = theory.mean_var(s, ALPHAS)
    T = st.trials

    def se(x):
        return x.std(0, ddof=1) / math.sqrt(T)

    bad = []
    for name, sim_x, th_x, rel in (("accuracy", acc, th_acc, 0.0), ("mean", m, th_m, 0.01),
                                   ("var", v, th_v, 0.01)):
        tol = 3 * se(sim_x) + 0.005 + rel * np.abs(th_x)
        err = np.abs(sim_x.mean(0) - th_x)
        for i in np.flatnonzero(err > tol):
            bad.append(f"{name}(α={ALPHAS[i]}): sim {sim_x.mean(0)[i]:.4f} th {th_x[i]:.4f} "
                       f"tol {tol[i]:.4f}")
    pre = st.pretrained_accuracy()
    if abs(pre.mean() - theory.pretrained_accuracy(s)) > 3 * pre.std(ddof=1) / math.sqrt(T) + 0.005:
        bad.append(f"pretrained: sim {pre.mean():.4f} th {theory.pretrained_accuracy(s):.4f}")
    assert not bad, "; ".join(bad)


@pytest.mark.parametrize("case", FAST, ids=[_id(c) for c in FAST])
def test_accuracy_mean_and_variance_match_theory_fast(case):
    _check_against_theory(case[0], _stats(*case))


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW, ids=[_id(c) for c in SLOW])
def test_accuracy_mean_and_variance_match_theory_full_grid(case):
    assert len(SLOW) >= 20
    _check_against_theory(case[0], _stats(*case))


def _bootstrap_se(st: sim.TrialStats, fn, reps=200, seed=0):
    rng = np.random.default_rng(seed)
    T = st.trials
    vals = []
    for _ in range(reps):
        idx = rng.integers(0, T, T)
        vals.append(fn(sim.TrialStats(*(getattr(st, f)[idx] for f in
                                        ("a", "b", "V0", "V1", "V2", "w_dot_mu", "w_norm2")))))
    return float(np.std(vals, ddof=1))


def _check_alpha_star(s: Setting, st: sim.TrialStats):
    """Theory α* within one grid spacing (+3 bootstrap s.e.) of the simulated argmax,
    where the accuracy curve is not flat (a drop ≥ 2e-3 one unit away from α*)."""
    a_th = theory.alpha_star(s)
    h = 0.05 * max(1.0, abs(a_th))
    drop = theory.accuracy(s, a_th) - theory.accuracy(s, [a_th - 1, a_th + 1]).max()
    if drop < 2e-3:
        pytest.skip(f"accuracy curve flat around α* (drop {drop:.1e})")
    grid = np.arange(a_th - 40 * h, a_th + 40 * h + h / 2, h)
    a_sim = st.alpha_star_grid(grid)
    se = _bootstrap_se(st, lambda x: x.alpha_star_grid(grid))
    assert abs(a_sim - a_th) <= h + 3 * se, (a_sim, a_th, h, se)
    # the plug-in estimate (eq. 8 on trial-averaged coefficients) is tighter
    se_p = _bootstrap_se(st, lambda x: x.alpha_star_plugin())
    assert abs(st.alpha_star_plugin() - a_th) <= 3 * se_p + 0.02 * abs(a_th) + 0.01


ASTAR_FAST = [FAST[0], FAST[2], FAST[6]]


@pytest.mark.parametrize("case", ASTAR_FAST, ids=[_id(c) for c in ASTAR_FAST])
def test_alpha_star_matches_simulated_argmax_fast(case):
    _check_alpha_star(case[0], _stats(*case))


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW, ids=[_id(c) for c in SLOW])
def test_alpha_star_matches_simulated_argmax_full_grid(case):
    _check_alpha_star(case[0], _stats(*case))


@pytest.mark.slow
def test_figure1_simulated_alpha_star_near_published():
    for (s, t), published in zip(FIG1, (1.64, 4.1, 7.5)):
        st = _stats(s, t)
        se = _bootstrap_se(st, lambda x: x.alpha_star_plugin())
        assert abs(st.alpha_star_plugin() - published) <= 3 * se + 0.03 * published


# --------------------------------------------------------------------------- #
# samplers and solvers
# --------------------------------------------------------------------------- #
def test_bartlett_and_direct_samplers_agree_in_distribution():
    s = Setting(400, 200, 60, 1.0, 1.0, 0.6, 1.0, 0.5)
    a, b = _stats(s, 200, "bartlett"), _stats(s, 200, "direct")
    for f in ("a", "b", "V0", "V1", "V2", "w_dot_mu", "w_norm2"):
        x, y = getattr(a, f), getattr(b, f)
        se = math.sqrt(x.var(ddof=1) / len(x) + y.var(ddof=1) / len(y))
        assert abs(x.mean() - y.mean()) <= 4 * se, f


def test_push_through_solve_equals_the_p_by_p_solve():
    """(XXᵀ/n + γI)⁻¹X y/n = X(XᵀX/n + γI)⁻¹y/n and γQw̃ via Woodbury, p > n."""
    T, p, n, gamma = 3, 50, 12, 0.3
    mu_t = torch.zeros(p, dtype=torch.float64)
    mu_t[0] = 1.0
    w = torch.randn(T, p, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    u, v = sim.fit_target(sim._Rng(5), w, mu_t, n, gamma, sampler="direct")
    X, y = sim._data(sim._Rng(5), T, p, n, mu_t, torch.float64, "cpu")
    G = X @ X.transpose(-1, -2) / n + gamma * torch.eye(p, dtype=torch.float64)
    assert torch.allclose(u, torch.linalg.solve(G, X @ y / n), atol=1e-10)
    assert torch.allclose(v, gamma * torch.linalg.solve(G, w), atol=1e-10)


def test_source_push_through_equals_the_p_by_p_solve():
    T, p, N, gamma = 2, 40, 15, 0.7
    mu = torch.zeros(p, dtype=torch.float64)
    mu[0] = 1.3
    w = sim.fit_source(sim._Rng(9), T, p, N, mu, gamma, sampler="direct")
    X, y = sim._data(sim._Rng(9), T, p, N, mu, torch.float64, "cpu")
    G = X @ X.transpose(-1, -2) / N + gamma * torch.eye(p, dtype=torch.float64)
    assert torch.allclose(w, torch.linalg.solve(G, X @ y / N), atol=1e-10)


def test_simulation_is_seeded_and_chunking_does_not_change_it():
    s = Setting(300, 40, 30, 1.0, 1.0, 0.5, 1.0, 1.0)
    a = sim.simulate(s, [0.0, 1.0], trials=6, seed=3)
    b = sim.simulate(s, [0.0, 1.0], trials=6, seed=3)
    c = sim.simulate(s, [0.0, 1.0], trials=6, seed=4)
    assert np.array_equal(a.accuracy, b.accuracy)
    assert not np.array_equal(a.accuracy, c.accuracy)
    d = sim.simulate(s, [0.0, 1.0], trials=6, seed=3, chunk=4)  # chunks of 4 + 2 trials
    assert np.allclose(a.accuracy, d.accuracy, rtol=0, atol=1e-12)
    e = sim.simulate_stats(s, trials=9, seed=3, chunk=2)  # trial i does not depend on T
    assert np.allclose(e.a[:6], a.stats.a, rtol=0, atol=1e-12)


def test_empirical_test_points_agree_with_exact_accuracy():
    s = Setting(400, 100, 50, 1.0, 1.0, 0.6, 1.0, 0.5)
    al = [0.0, 1.0, 3.0]
    ex = sim.simulate(s, al, trials=30, seed=2)
    em = sim.simulate(s, al, trials=30, seed=2, mode="empirical", n_test=4000)
    # same trained models: the only difference is test sampling, s.e. ≈ √(¼/4000)/√30
    assert np.all(np.abs(ex.accuracy - em.accuracy) < 0.006)
    assert np.allclose(em.mean, ex.mean, atol=0.02)
    assert np.allclose(em.var, ex.var, rtol=0.03)


def test_score_histogram_is_gaussian_with_predicted_moments():
    """Per trained model g | y ~ N(y w_αᵀμ_β, ‖w_α‖²); across models the moments
    concentrate on the deterministic equivalents."""
    s = Setting(1000, 100, 200, 1.0, 1.0, 0.8, 1.0, 1.0)
    T, n_test = 8, 10000
    g, y = sim.sample_scores(s, 1.0, n_test=n_test, trials=T, seed=0)
    st = sim.simulate_stats(s, trials=T, seed=0)  # the same trained models
    m_t, v_t = (x[:, 0] for x in st.mean_var([1.0]))
    yg = g * y  # (T, n_test)
    assert np.all(np.abs(yg.mean(1) - m_t) <= 4 * np.sqrt(v_t / n_test))
    assert np.allclose(yg.var(1), v_t, rtol=0.05)
    zz = (yg - yg.mean(1, keepdims=True)) / yg.std(1, keepdims=True)
    assert np.all(np.abs((zz ** 4).mean(1) - 3) < 0.25)  # Gaussian kurtosis
    m, v = theory.mean_var(s, 1.0)
    assert abs(m_t.mean() - m) <= 3 * m_t.std(ddof=1) / math.sqrt(T) + 0.005
    assert abs(v_t.mean() - v) <= 3 * v_t.std(ddof=1) / math.sqrt(T) + 0.01 * v


# --------------------------------------------------------------------------- #
# fixed source vector and regression
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("p,n,gamma", [(300, 120, 0.3), (60, 200, 1.0)])
def test_fixed_source_formulas_match_simulation_with_random_source(p, n, gamma):
    g = torch.Generator().manual_seed(p)
    mu = torch.randn(p, generator=g, dtype=torch.float64)
    mu = 1.2 * mu / mu.norm()
    w = 0.1 * torch.randn(p, generator=g, dtype=torch.float64) + 0.3 * mu
    al = np.array([-3.0, -1.0, 0.0, 1.0, 2.0, 5.0])
    r = sim.simulate_fixed_source(w, mu, n, gamma, al, trials=150, seed=1)
    kw = dict(p=p, n=n, gamma=gamma, mu_norm2=float(mu @ mu), w_dot_mu=float(w @ mu),
              w_norm2=float(w @ w))
    m, v = theory.fixed_source_mean_var(al, **kw)
    acc = theory.fixed_source_accuracy(al, **kw)
    assert np.all(np.abs(r.accuracy - acc) <= 3 * r.accuracy_se + 0.005)
    assert np.all(np.abs(r.mean - m) <= 3 * r.mean_se + 0.005 + 0.01 * np.abs(m))
    assert np.all(np.abs(r.var - v) <= 3 * r.var_se + 0.005 + 0.01 * np.abs(v))
    se = _bootstrap_se(r.stats, lambda x: x.alpha_star_plugin())
    assert abs(r.stats.alpha_star_plugin() - theory.fixed_source_alpha_star(**kw)) <= 3 * se + 0.01


@pytest.mark.parametrize("p,n", [(200, 100), (80, 300)])
def test_regression_risk_and_alpha_star_match_simulation(p, n):
    g = torch.Generator().manual_seed(n)
    k = 3
    Wt = torch.randn(p, k, generator=g, dtype=torch.float64) / math.sqrt(p)
    Ws = 0.6 * Wt + 0.5 * torch.randn(p, k, generator=g, dtype=torch.float64) / math.sqrt(p)
    al = np.linspace(-2, 3, 11)
    r = sim.simulate_regression(Wt, Ws, n, 0.5, al, noise_var=0.2, trials=80, seed=0)
    kw = dict(wt_norm2=float((Wt ** 2).sum()), ws_norm2=float((Ws ** 2).sum()),
              wt_dot_ws=float((Wt * Ws).sum()))
    th = theory.regression_risk(al, p=p, n=n, gamma=0.5, noise_var=0.2, k=k, **kw)
    assert np.all(np.abs(r.risk - th) <= 3 * r.risk_se + 0.005 + 0.01 * th)
    a_th = theory.regression_alpha_star(**kw)
    assert abs(r.alpha_star_plugin() - a_th) <= 0.02 * abs(a_th) + 0.01
    grid = np.linspace(a_th - 1, a_th + 1, 201)
    sim_curve = r.R0.mean() + 2 * r.R1.mean() * grid + r.R2.mean() * grid ** 2
    assert abs(grid[np.argmin(sim_curve)] - a_th) <= 0.02


# --------------------------------------------------------------------------- #
# bad input
# --------------------------------------------------------------------------- #
def test_simulation_bad_input_raises_value_error():
    s = Setting(100, 20, 10, 1.0, 1.0, 0.5, 1.0, 1.0)
    with pytest.raises(ValueError, match="trials"):
        sim.simulate(s, 1.0, trials=0)
    with pytest.raises(ValueError, match="mode"):
        sim.simulate(s, 1.0, mode="magic")
    with pytest.raises(ValueError, match="sampler"):
        sim.simulate(s, 1.0, sampler="magic")
    with pytest.raises(ValueError, match="bartlett"):
        sim.simulate(Setting(10, 20, 50, 1, 1, 0.5, 1, 1), 1.0, sampler="bartlett")
    with pytest.raises(ValueError, match="alpha"):
        sim.simulate(s, [1.0, float("nan")])
    with pytest.raises(ValueError, match="Setting"):
        sim.simulate({"p": 3}, 1.0)
    with pytest.raises(ValueError, match="same length"):
        sim.simulate_fixed_source(np.ones(5), np.ones(4), 10, 1.0, 0.0)
    with pytest.raises(ValueError, match="p >= 2"):
        sim.simulate(Setting(10, 10, 1, 1, 1, 0.5, 1, 1), 0.0)
    with pytest.raises(ValueError, match="W_t and W_s"):
        sim.simulate_regression(np.ones((5, 2)), np.ones((5, 3)), 10, 1.0, 0.0)


def _reference_code_w_norm2(s: Setting) -> float:
    """The lim ‖w̃‖² implied by the public reference code's α² term:
    ‖μ‖²/λ̃² + (1−h̃)(1 − 2‖μ‖²/λ̃) (no 1/h̃ factor, no (1−h̃)‖μ‖⁴/λ̃² term)."""
    M = s.mu_norm ** 2
    d = theory.delta(s.eta_src, s.gamma_src)
    h = 1 - s.eta_src / (1 + s.gamma_src * (1 + d)) ** 2
    lam = M + 1 + s.gamma_src * (1 + d)
    return M / lam ** 2 + (1 - h) * (1 - 2 * M / lam)


@pytest.mark.parametrize("N,p", [(300, 300), (250, 500)])
def test_source_norm_matches_simulation_and_not_the_reference_code_term(N, p):
    s = Setting(N, 40, p, 1.0, 1.0, 0.5, 0.5, 1.0)
    mu = torch.zeros(p, dtype=torch.float64)
    mu[0] = 1.0
    w = sim.fit_source(sim._Rng(0), 60, p, N, mu, s.gamma_src)
    w2 = (w * w).sum(-1).numpy()
    se = w2.std(ddof=1) / math.sqrt(len(w2))
    ours, ref = theory.source_stats(s)["w_norm2"], _reference_code_w_norm2(s)
    assert abs(w2.mean() - ours) <= 3 * se + 0.002
    assert abs(w2.mean() - ref) > 20 * se  # the reference-code variant is off by ~30%
