"""α-LoRA, Figure 2 of the paper: the optimal α* against the task similarity β.

N = 2000, n = 200, ‖μ‖ = ‖μ_⊥‖ = 1, γ̃ = γ = 1, p ∈ {2, 20, 200, 2000}.
Lines: closed form α* = (aV1 − bV0)/(bV1 − aV2) (rmt.theory). Markers: α* of the
Monte Carlo, the argmax over a fine α grid of the trial-averaged exact accuracy
curve; error bars: bootstrap s.e. over trials.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from figures.save import save
from rmt import simulate as sim
from rmt import theory

PS = (2, 20, 200, 2000)
BASE = theory.Setting(N=2000, n=200, p=2, mu_norm=1.0, mu_perp_norm=1.0, beta=0.5,
                      gamma_src=1.0, gamma=1.0)


def _boot_argmax(st: sim.TrialStats, grid: np.ndarray, reps: int, seed: int) -> float:
    acc = st.accuracy(grid)  # (T, K)
    rng = np.random.default_rng(seed)
    T = acc.shape[0]
    picks = [grid[np.argmax(acc[rng.integers(0, T, T)].mean(0))] for _ in range(reps)]
    return float(np.std(picks, ddof=1))


def draw(quick: bool = False):
    """``(figure, data)``: data maps each p to its simulated ``(β, α* of the trial-averaged
    curve, bootstrap s.e.)`` points and per-trial statistics (one per β), and the trial
    counts."""
    import matplotlib.pyplot as plt

    betas = np.linspace(0, 1, 201)
    beta_sim = np.array([0.1, 0.4, 0.7, 0.9] if quick else [0.1, 0.3, 0.5, 0.7, 0.8, 0.9])
    trials = {2: 40, 20: 40, 200: 20, 2000: 0} if quick else {2: 400, 20: 400, 200: 200,
                                                             2000: 40}
    points, all_stats = {}, {}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p, color in zip(PS, ("C0", "C1", "C2", "C3")):
        s = BASE.replace(p=p)
        a_star = [theory.alpha_star(s.replace(beta=float(b))) for b in betas]
        ax.plot(betas, a_star, color=color, gid=f"theory p={p}", label=f"p = {p}" + (
            f" (sim: {trials[p]} trials)" if trials[p] else " (theory only in quick mode)"))
        if not trials[p]:
            continue
        stats = sim.simulate_stats_betas(s, beta_sim, trials=trials[p], seed=p)
        ys, es = [], []
        for b, st in zip(beta_sim, stats):
            th = theory.alpha_star(s.replace(beta=float(b)))
            grid = np.linspace(th - 2.0, th + 2.0, 801)
            ys.append(st.alpha_star_grid(grid))
            es.append(_boot_argmax(st, grid, 50 if quick else 200, seed=p))
        eb = ax.errorbar(beta_sim, ys, yerr=es, fmt="o", ms=4, color=color, capsize=2, lw=1)
        eb.lines[0].set_gid(f"simulation p={p}")
        points[p] = (beta_sim, np.array(ys), np.array(es))
        all_stats[p] = stats
    ax.set_xlabel("task similarity β")
    ax.set_ylabel("optimal α*")
    ax.set_ylim(-0.2, 5)
    ax.set_title("α-LoRA: α* vs β  (N=2000, n=200, ‖μ‖=‖μ_⊥‖=1, γ̃=γ=1; "
                 "lines theory, markers simulation)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    return fig, {"points": points, "stats": all_stats, "trials": trials}


def make(out: Path, quick: bool = False) -> list[Path]:
    return save(draw(quick)[0], out, "rmt_fig2")
