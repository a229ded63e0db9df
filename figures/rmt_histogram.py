"""α-LoRA: histogram of the decision score g = w_αᵀx against its Gaussian limit.

Scores of fresh target points for a few trained models (pooled), split by class,
against N(±m(α), σ²(α)) from the deterministic equivalents (rmt.theory). Left: the
paper's Figure-1 setting (β = 0.5, p = 1000, n = 40) at α*; right: a Figure-2
setting (p = 200, n = 200, β = 0.9) at α = 0 and α*.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from figures.save import save
from rmt import simulate as sim
from rmt import theory

LEFT = theory.Setting(N=5000, n=40, p=1000, mu_norm=0.8, mu_perp_norm=0.8, beta=0.5,
                      gamma_src=5.0, gamma=0.1)
RIGHT = theory.Setting(N=2000, n=200, p=200, mu_norm=1.0, mu_perp_norm=1.0, beta=0.9,
                       gamma_src=1.0, gamma=1.0)


def _panel(ax, s, alphas, trials, n_test, seed, tag):
    scores = {}
    for alpha, color in zip(alphas, ("C0", "C1", "C2")):
        g, y = sim.sample_scores(s, alpha, n_test=n_test, trials=trials, seed=seed)
        scores[float(alpha)] = (g, y)
        m, v = theory.mean_var(s, alpha)
        sd = float(np.sqrt(v))
        xs = np.linspace(-m - 4.5 * sd, m + 4.5 * sd, 400)
        bins = np.linspace(xs[0], xs[-1], 70)
        for cls, ls in ((1, "-"), (-1, "--")):
            h, _ = np.histogram(g[:, y == cls].ravel(), bins=bins, density=True)
            # each class is half of the mixture: halve its normalised histogram
            ax.stairs(0.5 * h, bins, fill=True, alpha=0.25, color=color,
                      gid=f"{tag} histogram α={float(alpha):.4f} y={cls}")
            dens = np.exp(-0.5 * ((xs - cls * m) / sd) ** 2) / (sd * np.sqrt(2 * np.pi))
            ax.plot(xs, 0.5 * dens, color=color, ls=ls, lw=1.5,
                    gid=f"{tag} limit α={float(alpha):.4f} y={cls}",
                    label=(f"α = {alpha:.2f}: N(±{float(m):.3f}, {float(sd):.3f}²)"
                           if cls == 1 else None))
    ax.set_xlabel("score g = w_αᵀx")
    ax.set_ylabel("density (class +1 solid, −1 dashed)")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    return scores


def draw(quick: bool = False):
    """``(figure, data)``: data holds each panel's sampled scores ``{α: (g, y)}``
    (``g`` (trials, n_test), ``y`` (n_test,) ±1)."""
    import matplotlib.pyplot as plt

    trials, n_test = (2, 4000) if quick else (8, 20000)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    left = _panel(axes[0], LEFT, [theory.alpha_star(LEFT)], trials, n_test, seed=1, tag="left")
    axes[0].set_title("Fig.-1 setting, β=0.5, p=1000, n=40, at α*", fontsize=9)
    right = _panel(axes[1], RIGHT, [0.0, theory.alpha_star(RIGHT)], trials, n_test, seed=2,
                   tag="right")
    axes[1].set_title("Fig.-2 setting, β=0.9, p=200, n=200", fontsize=9)
    fig.suptitle(f"score histograms ({trials} models × {n_test} test points) vs "
                 "Gaussian limit", fontsize=10)
    return fig, {"left": left, "right": right, "trials": trials, "n_test": n_test}


def make(out: Path, quick: bool = False) -> list[Path]:
    return save(draw(quick)[0], out, "rmt_histogram")
