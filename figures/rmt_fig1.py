"""α-LoRA, Figure 1 of the paper: target accuracy against α for three task similarities.

N = 5000, n = 40, p = 1000, ‖μ‖ = ‖μ_⊥‖ = 0.8, γ̃ = 5, γ = 0.1, β ∈ {0.2, 0.5, 0.9}.
Lines: deterministic equivalent Φ(m(α)/σ(α)) (rmt.theory). Markers: Monte Carlo
mean ± 1 s.e. of the exact conditional accuracy Φ(w_αᵀμ_β/‖w_α‖) (rmt.simulate).
Stars: α* (published ≈ 1.64 / 4.1 / 7.5); crosses: ᾱ (accuracy ½); dotted: α = 0
(ignore the source) and α = 1 (plain fine-tuning). Thin dashed: Φ(|m|/σ), the
convention of the paper's reference code (it differs only beyond ᾱ, where the
signed accuracy of sign(g), which the simulation measures, drops below ½).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from figures.save import save
from rmt import simulate as sim
from rmt import theory

BETAS = (0.2, 0.5, 0.9)
BASE = theory.Setting(N=5000, n=40, p=1000, mu_norm=0.8, mu_perp_norm=0.8, beta=0.5,
                      gamma_src=5.0, gamma=0.1)


def draw(quick: bool = False):
    """``(figure, data)``: data holds the simulated per-trial statistics drawn (one
    :class:`rmt.simulate.TrialStats` per β), the α grids and the trial count."""
    import matplotlib.pyplot as plt

    trials = 6 if quick else 100
    alpha = np.linspace(-10, 10, 801)
    alpha_sim = np.linspace(-10, 10, 11 if quick else 21)
    stats = sim.simulate_stats_betas(BASE, BETAS, trials=trials, seed=0)
    fig, ax = plt.subplots(figsize=(7, 5.2))
    for beta, st, color in zip(BETAS, stats, ("C0", "C1", "C2")):
        s = BASE.replace(beta=beta)
        a_star, a_bar = theory.alpha_star(s), theory.alpha_worst(s)
        ax.plot(alpha, theory.accuracy(s, alpha), color=color, gid=f"theory β={beta}",
                label=f"β = {beta}: α* = {a_star:.2f}, ᾱ = {a_bar:.2f}")
        left = alpha < a_bar if theory.score_coefficients(s)["b"] > 0 else alpha > a_bar
        ax.plot(alpha[left], theory.accuracy(s, alpha[left], symmetric=True), color=color,
                ls="--", lw=0.8, gid=f"reference β={beta}")
        acc = st.accuracy(alpha_sim)  # (trials, K)
        se = acc.std(0, ddof=1) / np.sqrt(acc.shape[0])
        eb = ax.errorbar(alpha_sim, acc.mean(0), yerr=se, fmt="o", ms=3.5, color=color,
                         capsize=2, lw=1)
        eb.lines[0].set_gid(f"simulation β={beta}")
        ax.plot([a_star], theory.accuracy(s, [a_star]), "*", ms=13, color=color, mec="k",
                gid=f"alpha* β={beta}")
        if -10 <= a_bar <= 10:
            ax.plot([a_bar], [0.5], "X", ms=8, color=color, mec="k", gid=f"alpha_bar β={beta}")
    # one legend entry for the three dashed curves: drawn neutral, as it stands for all
    ax.plot([], [], color="0.3", ls="--", lw=0.8,
            label="Φ(|m|/σ), reference code's convention (dashed)")
    for a0, name in ((0, "α = 0"), (1, "α = 1")):
        ax.axvline(a0, color="gray", ls=":", lw=1)
        ax.text(a0 + 0.12, 0.98, name, transform=ax.get_xaxis_transform(), color="gray",
                fontsize=8, rotation=90, va="top")
    ax.axhline(0.5, color="gray", lw=0.6)
    ax.set_xlabel("α (scale of the source classifier)")
    ax.set_ylabel("target test accuracy")
    ax.set_title(f"α-LoRA: accuracy vs α  (N=5000, n=40, p=1000; lines theory, "
                 f"markers {trials} trials ± s.e.)", fontsize=9)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    ax.grid(alpha=0.3)
    return fig, {"stats": stats, "alpha_sim": alpha_sim, "trials": trials}


def make(out: Path, quick: bool = False) -> list[Path]:
    return save(draw(quick)[0], out, "rmt_fig1")
