"""Plots of reconstruction results (used by the sweep and by ``figures``).

:func:`plot_error_vs_rank` draws the ABBA paper's Figure 2 layout (Singhal et al.
2025): one panel per target, relative error ‖M − ΔW‖_F²/‖M‖_F² against r, one
line per method at the budget of rank-r LoRA, LoRA's exact truncated-SVD optimum,
ABBA in both conventions (r1 = r2 = r/2, equal budget; r1 = r2 = r, as
published, twice the budget) and the paper's published ABBA values as markers.
"""

from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from . import published  # noqa: E402
from .targets import default_lowrank_rank  # noqa: E402


def _label(method: str, convention: str, fields: dict) -> str:
    if method == "abba":
        if convention == "published":
            return "ABBA r1=r2=r (budget 2r(m+n), as published)"
        return "ABBA r1=r2=r/2 (budget r(m+n))"
    if method == "loha" and convention == "equal":
        return "loha (the image of ABBA r1=r2: on its line)"
    return method if convention == "equal" else f"{method} ({convention})"


def plot_error_vs_rank(rows: Sequence[dict[str, Any]], title: str | None = None,
                       show_published: bool = True):
    """Figure 2-style panels from sweep rows (dicts with target, method, convention,
    rank, rel_error, lora_rank, lora_optimum, m, n). Returns the matplotlib figure."""
    rows = [r for r in rows if r.get("rel_error") is not None and r.get("rank") is not None]
    order = list(published.FIG2_TARGETS)
    targets = sorted({r["target"] for r in rows},
                     key=lambda t: (order.index(t) if t in order else len(order), t))
    if not targets:
        fig, ax = plt.subplots(figsize=(4, 3))
        ax.text(0.5, 0.5, "no results", ha="center", va="center")
        ax.set_axis_off()
        return fig
    ncol = min(4, len(targets))
    nrow = -(-len(targets) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.6 * nrow), squeeze=False)
    methods = list(dict.fromkeys((r["method"], r.get("convention", "equal")) for r in rows))
    others = [k for k in methods if k[0] != "abba"]
    palette = ["tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
               "tab:cyan", "tab:gray", "gold", "lime", "navy", "teal", "salmon"]
    colors = {k: palette[i % len(palette)] for i, k in enumerate(others)}
    colors[("abba", "equal")] = "tab:blue"
    colors[("abba", "published")] = "tab:red"
    for ax, tgt in zip(axes.flat, targets):
        rs = [r for r in rows if r["target"] == tgt]
        m, n = rs[0].get("m"), rs[0].get("n")
        # LoRA's exact optimum at the budget r(m+n) (Eckart-Young), from any row carrying it
        lora = defaultdict(list)
        for r in rs:
            if r.get("lora_rank") == r["rank"] and r.get("lora_optimum") is not None:
                lora[r["rank"]].append(r["lora_optimum"])
        if lora:
            xs = sorted(lora)
            ax.plot(xs, [sum(lora[x]) / len(lora[x]) for x in xs], "k-", lw=2.2,
                    label="LoRA, exact SVD (budget r(m+n))", zorder=5)
        curves = defaultdict(lambda: defaultdict(list))
        fields = {}
        for r in rs:
            if r["method"] == "lora" and r.get("solver") == "svd" and r.get("convention") == "equal":
                continue  # identical to the exact curve above
            key = (r["method"], r.get("convention", "equal"))
            curves[key][r["rank"]].append(r["rel_error"])
            fields[key] = r.get("config_fields", {})
        for key in methods:
            if key not in curves:
                continue
            pts = curves[key]
            xs = sorted(pts)
            ys = [sum(pts[x]) / len(pts[x]) for x in xs]
            is_abba = key[0] == "abba"
            style = ":" if key[0] == "loha" else "-" if key[1] == "equal" else "--"
            ax.plot(xs, ys, style, marker="o" if is_abba else ".",
                    ms=4 if is_abba else 3, lw=2 if is_abba or key[0] == "loha" else 1.1,
                    color=colors[key],
                    label=_label(key[0], key[1], fields[key]),
                    zorder=4.5 if key[0] == "loha" else 4 if is_abba else 3)
        pub = published.ABBA_FIG2.get(tgt)
        same_size = (m, n) == (published.FIG2_SIZE, published.FIG2_SIZE)
        if show_published and pub and not same_size:
            ax.text(0.98, 0.97, f"paper's values are for {published.FIG2_SIZE}×"
                    f"{published.FIG2_SIZE}: not shown", transform=ax.transAxes, ha="right",
                    va="top", fontsize=7, color="0.4")
        if show_published and pub and same_size:
            xs = sorted(pub)
            ax.plot(xs, [pub[x] for x in xs], "*", color="darkred", ms=12, mfc="none", mew=1.5,
                    label=f"ABBA, paper Fig. 2 ({published.FIG2_SIZE}×{published.FIG2_SIZE})",
                    zorder=6)
        ptitle = published.TARGET_TITLES.get(tgt, tgt)
        if tgt == "lowrank" and m and n:
            ptitle = f"low-rank (rank {default_lowrank_rank(m, n)}, flat spectrum)"
        ax.set_title(f"{ptitle}\n{m}×{n}", fontsize=9)
        ax.set_xlabel("LoRA rank r (budget r(m+n))")
        ax.set_ylabel("relative error ‖M−ΔW‖²/‖M‖²")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(targets):]:
        ax.set_axis_off()
    handles, labels = {}, []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    fig.legend([handles[lab] for lab in labels], labels, loc="lower center",
               ncol=min(4, len(labels)), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.07 - 0.035 * ((len(labels) - 1) // 4)))
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def save_figure(fig, out: str | os.PathLike, stem: str, dpi: int = 150) -> list[Path]:
    """Save ``fig`` as ``<out>/<stem>.png`` and ``.pdf``, each written to a temp file
    and moved into place (atomic), then close it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    try:
        for ext in ("png", "pdf"):
            fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{stem}.", suffix=f".{ext}")
            os.close(fd)
            try:
                fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=ext)
                os.replace(tmp, out / f"{stem}.{ext}")
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            paths.append(out / f"{stem}.{ext}")
    finally:
        plt.close(fig)
    return paths
