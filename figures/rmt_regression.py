"""α-LoRA, regression variant: test risk against α, theory against simulation.

y = W_tᵀx + ε (k = 4 outputs, noise variance 0.25), x ~ N(0, I_p); fine-tuned
W_α = αW_s + argmin_A (1/n)‖Y − Xᵀ(αW_s + A)‖² + γ‖A‖² (γ = 0.5). Lines: eq. (10) of
rmt.theory; markers: Monte Carlo mean ± s.e.; dotted: α* = ⟨W_t, W_s⟩_F / ‖W_s‖_F².
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from figures.save import save
from rmt import simulate as sim
from rmt import theory

K, NOISE, GAMMA = 4, 0.25, 0.5
CASES = ((400, 100), (200, 400))  # (p, n)
RHOS = (0.3, 0.8)  # W_s = ρ W_t + √(1−ρ²)·(independent)


def _weights(p: int, rho: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    Wt = torch.randn(p, K, generator=g, dtype=torch.float64) / np.sqrt(p)
    Wo = torch.randn(p, K, generator=g, dtype=torch.float64) / np.sqrt(p)
    return Wt, 1.5 * (rho * Wt + np.sqrt(1 - rho ** 2) * Wo)


def draw(quick: bool = False):
    """``(figure, data)``: data maps ``(p, n, ρ)`` to the simulation result drawn
    (:class:`rmt.simulate.RegressionResult`) and its weights ``(W_t, W_s)``."""
    import matplotlib.pyplot as plt

    trials = 20 if quick else 200
    alpha = np.linspace(-1, 2, 301)
    alpha_sim = np.linspace(-1, 2, 13)
    data = {}
    fig, axes = plt.subplots(1, len(CASES), figsize=(11, 4.2))
    for ax, (p, n) in zip(axes, CASES):
        for rho, color in zip(RHOS, ("C0", "C1")):
            Wt, Ws = _weights(p, rho, seed=p + int(10 * rho))
            kw = dict(wt_norm2=float((Wt * Wt).sum()), ws_norm2=float((Ws * Ws).sum()),
                      wt_dot_ws=float((Wt * Ws).sum()))
            risk = theory.regression_risk(alpha, p=p, n=n, gamma=GAMMA, noise_var=NOISE,
                                          k=K, **kw)
            a_star = theory.regression_alpha_star(**kw)
            r = sim.simulate_regression(Wt, Ws, n, GAMMA, alpha_sim, noise_var=NOISE,
                                        trials=trials, seed=p)
            tag = f"p={p} n={n} ρ={rho}"
            ax.plot(alpha, risk, color=color, label=f"ρ = {rho}: α* = {a_star:.2f}",
                    gid=f"theory {tag}")
            eb = ax.errorbar(alpha_sim, r.risk, yerr=r.risk_se, fmt="o", ms=3.5, color=color,
                             capsize=2, lw=1)
            eb.lines[0].set_gid(f"simulation {tag}")
            ax.axvline(a_star, color=color, ls=":", lw=1, gid=f"alpha* {tag}")
            data[(p, n, rho)] = (r, Wt, Ws)
        ax.set_title(f"p = {p}, n = {n}, k = {K}, γ = {GAMMA}, noise {NOISE} "
                     f"({trials} trials)", fontsize=9)
        ax.set_xlabel("α")
        ax.set_ylabel("test risk E‖W_αᵀx − y‖²")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("α-fine-tuned ridge regression: risk vs α (lines theory, markers simulation)",
                 fontsize=10)
    return fig, {"cases": data, "trials": trials, "alpha_sim": alpha_sim}


def make(out: Path, quick: bool = False) -> list[Path]:
    return save(draw(quick)[0], out, "rmt_regression")
