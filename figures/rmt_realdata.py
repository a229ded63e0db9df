"""α-LoRA on real sentiment domains: test accuracy against α for every source → target pair.

Each panel: the measured target test accuracy of ``w_α`` (mean over seeded draws of
the n target training samples, band = ±1 s.e.), the fixed-source deterministic
equivalent with plug-in statistics from those n samples (dashed, averaged over the
draws), α = 0 and α = 1 (grey), the median estimated α̂* (red) and the grid-best α
(green, an oracle). Data: MiniLM embeddings of the VADER corpora; see
:mod:`rmt.realdata` for the pre-processing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from figures.save import save


def draw(quick: bool = False):
    """``(figure, data)``: data holds the rows of :func:`rmt.realdata.run` drawn (one per
    panel, in panel order) and the domains."""
    import matplotlib.pyplot as plt

    from rmt import realdata as rd

    if quick:
        domains = rd.load_domains(("amazon", "tweets", "movie"), max_items=rd.QUICK_ITEMS)
        n, repeats = 32, 8
    else:
        domains = rd.load_domains(rd.DOMAINS)
        n, repeats = 64, 20
    rows = rd.run(domains, n_values=(n,), repeats=repeats, keep_curves=True)
    ncol = len(domains) - 1
    nrow = len(domains)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.5 * nrow), sharex=True,
                             squeeze=False)
    for ax, r in zip(axes.flat, rows):
        a = np.asarray(r["alphas"])
        view = (a >= -2) & (a <= 10)
        m, s = np.asarray(r["curve_mean"]), np.asarray(r["curve_se"])
        tag = f"{r['source']}->{r['target']}"
        ax.fill_between(a[view], (m - s)[view], (m + s)[view], color="C0", alpha=0.25, lw=0)
        ax.plot(a[view], m[view], color="C0", lw=1.5, label="measured", gid=f"measured {tag}")
        ax.plot(a[view], np.asarray(r["theory_curve_mean"])[view], "k--", lw=1,
                label="theory (plug-in)", gid=f"theory {tag}")
        for x0, style in ((0.0, ":"), (1.0, "-")):
            ax.axvline(x0, color="0.6", ls=style, lw=0.8)
        ax.axvline(r["alpha_hat_median"], color="C3", lw=1.2, label="median α̂*")
        ax.axvline(r["alpha_best"], color="C2", ls="--", lw=1.2, label="best α (oracle)")
        ax.set_title(f"{r['source']} → {r['target']}  (β̂={r['beta_hat']:.2f})", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("α")
    for ax in axes[:, 0]:
        ax.set_ylabel("target test accuracy")
    axes[0, 0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"α-LoRA transfer between VADER domains (MiniLM, p = 384, n = {n}, "
                 f"{repeats} draws)", fontsize=11)
    fig.tight_layout()
    return fig, {"rows": rows, "domains": domains, "n": n, "repeats": repeats}


def make(out: Path, quick: bool = False) -> list[Path]:
    return save(draw(quick)[0], out, "rmt_realdata")
