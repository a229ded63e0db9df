"""Plots of reconstruction results (used by the sweep and by ``figures``).

:func:`plot_error_vs_rank` draws the ABBA paper's Figure 2 layout (Singhal et al.
2025): one panel per target, relative error ‖M − ΔW‖_F²/‖M‖_F² against r, one
line per method at the budget of rank-r LoRA, LoRA's exact truncated-SVD optimum,
ABBA in both conventions (r1 = r2 = r/2, equal budget; r1 = r2 = r, as
published, twice the budget) and the paper's published ABBA values as markers.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from . import published  # noqa: E402
from .targets import default_lowrank_rank  # noqa: E402

PALETTE = ["tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
           "tab:cyan", "tab:gray", "gold", "lime", "navy", "teal", "salmon"]
MARKERS = ["s", "^", "v", "D", "P", "X", "<", ">", "h", "p", "*", "d", "8"]
#: two curves closer than this fraction of the panel's y range at every rank are drawn
#: so that both stay visible (the later one dashed, with larger hollow markers)
COINCIDE = 0.01


def _label(method: str, convention: str) -> str:
    if method == "abba":
        if convention == "published":
            return "ABBA r1=r2=r (budget 2r(m+n), as published)"
        return "ABBA r1=r2=r/2 (budget r(m+n))"
    return method if convention == "equal" else f"{method} ({convention})"


def curve_key(row: dict) -> tuple[str, str]:
    return row["method"], row.get("convention", "equal")


def curves_of(rows: Sequence[dict]) -> dict[str, dict[tuple[str, str], tuple[list, list]]]:
    """``{target: {(method, convention): (ranks, mean rel_error per rank)}}``: the data
    :func:`plot_error_vs_rank` draws (rows without an error, i.e. failed cells, left out;
    LoRA's SVD rows left out, being the exact curve drawn from ``lora_optimum``)."""
    out: dict = defaultdict(dict)
    pts: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        if r.get("rel_error") is None or r.get("rank") is None:
            continue
        if r["method"] == "lora" and r.get("solver") == "svd" and r.get("convention",
                                                                         "equal") == "equal":
            continue
        pts[r["target"]][curve_key(r)][r["rank"]].append(r["rel_error"])
    for tgt, by_key in pts.items():
        for key, by_rank in by_key.items():
            xs = sorted(by_rank)
            out[tgt][key] = (xs, [sum(by_rank[x]) / len(by_rank[x]) for x in xs])
    return dict(out)


def lora_exact_of(rows: Sequence[dict]) -> dict[str, tuple[list, list]]:
    """``{target: (ranks, LoRA's exact error at the budget r(m+n))}`` from the rows that
    carry it (Eckart-Young, computed by the sweep)."""
    acc: dict = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("rank") is not None and r.get("lora_rank") == r["rank"] \
                and r.get("lora_optimum") is not None:
            acc[r["target"]][r["rank"]].append(r["lora_optimum"])
    return {t: (sorted(v), [sum(v[x]) / len(v[x]) for x in sorted(v)]) for t, v in acc.items()}


def _coincides(a: tuple[list, list], b: tuple[list, list], span: float) -> bool:
    """Same ranks, and at every rank closer than COINCIDE of the y span."""
    return a[0] == b[0] and all(abs(x - y) <= COINCIDE * span for x, y in zip(a[1], b[1]))


def _short(key: tuple[str, str]) -> str:
    if key[0] == "abba":
        return "ABBA r1=r2=r" if key[1] == "published" else "ABBA r1=r2=r/2"
    return key[0] if key[1] == "equal" else f"{key[0]} ({key[1]})"


class overlay_labels(dict):
    """Legend label of every curve, one for all panels; ``overlays`` holds the curves
    that lie on an earlier one in some panel (they are drawn dashed and hollow, and the
    label says on which line: "in some panels" where they part elsewhere)."""

    def __init__(self, curves, exact, keys):
        super().__init__()
        self.overlays: dict[tuple[str, str], str] = {}
        for i, key in enumerate(keys):
            hits, panels = set(), 0
            for tgt, by_key in curves.items():
                if key not in by_key:
                    continue
                panels += 1
                ys = [y for c in by_key.values() for y in c[1]] + exact.get(tgt, ([], []))[1]
                span = max(ys) - min(ys) if len(ys) > 1 else 1.0
                under = [k for k in keys[:i] if k in by_key
                         and _coincides(by_key[k], by_key[key], span)]
                if under:
                    hits.add((under[0], tgt))
            self[key] = _label(*key)
            if hits:
                on = sorted({_short(k) for k, _ in hits})
                where = "" if len(hits) == panels else " in some panels"
                self.overlays[key] = on[0]
                self[key] += f" (dashed: on the {' / '.join(on)} line{where})"


def plot_error_vs_rank(rows: Sequence[dict[str, Any]], title: str | None = None,
                       show_published: bool = True):
    """Figure 2-style panels from sweep rows (dicts with target, method, convention,
    rank, rel_error, lora_rank, lora_optimum, m, n). Returns the matplotlib figure.

    Every (method, convention) keeps one colour and one marker across panels. A curve
    that lies on an earlier one (LoHa on ABBA r1 = r2, α-LoRA on DoRA: closer than
    :data:`COINCIDE` of the panel's range at every rank) is drawn dashed with larger
    hollow markers on top, and its legend entry says which line it lies on, so neither
    hides the other. Notes go in the panel titles, never over the curves."""
    curves = curves_of(rows)
    exact = lora_exact_of(rows)
    order = list(published.FIG2_TARGETS)
    targets = sorted(set(curves) | set(exact),
                     key=lambda t: (order.index(t) if t in order else len(order), t))
    if not targets:
        fig, ax = plt.subplots(figsize=(4, 3))
        ax.text(0.5, 0.5, "no results", ha="center", va="center")
        ax.set_axis_off()
        return fig
    ncol = min(4, len(targets))
    nrow = -(-len(targets) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.6 * nrow), squeeze=False)
    keys = list(dict.fromkeys(curve_key(r) for r in rows if r.get("rel_error") is not None))
    others = [k for k in keys if k[0] != "abba"]
    style = {k: (PALETTE[i % len(PALETTE)], MARKERS[i % len(MARKERS)])
             for i, k in enumerate(others)}
    style[("abba", "equal")] = ("tab:blue", "o")
    style[("abba", "published")] = ("tab:red", "o")
    labels = overlay_labels(curves, exact, keys)
    for ax, tgt in zip(axes.flat, targets):
        m, n = next(((r.get("m"), r.get("n")) for r in rows if r["target"] == tgt), (None, None))
        if tgt in exact:
            ax.plot(*exact[tgt], "k-", lw=2.2, label="LoRA, exact SVD (budget r(m+n))",
                    zorder=5, gid=f"{tgt}|lora-exact")
        for key in keys:
            if key not in curves.get(tgt, {}):
                continue
            color, marker = style[key]
            big = key[0] == "abba"
            kw = dict(color=color, marker=marker, ms=4 if big else 3.5, lw=2 if big else 1.2,
                      ls="-" if key[1] == "equal" else "--", zorder=4 if big else 3)
            if key in labels.overlays:  # lies on another line: dashed, hollow, larger, on top
                kw.update(ls=(0, (3, 2)), mfc="none", ms=7, mew=1.3, lw=1.6, zorder=4.5)
            ax.plot(*curves[tgt][key], label=labels[key], gid=f"{tgt}|{key[0]}|{key[1]}", **kw)
        pub = published.ABBA_FIG2.get(tgt)
        same_size = (m, n) == (published.FIG2_SIZE, published.FIG2_SIZE)
        ptitle = published.TARGET_TITLES.get(tgt, tgt)
        if tgt == "lowrank" and m and n:
            ptitle = f"low-rank (rank {default_lowrank_rank(m, n)}, flat spectrum)"
        sub = f"{m}×{n}"
        if show_published and pub and same_size:
            xs = sorted(pub)
            ax.plot(xs, [pub[x] for x in xs], "*", color="darkred", ms=12, mfc="none", mew=1.5,
                    label=f"ABBA, paper Fig. 2 ({published.FIG2_SIZE}×{published.FIG2_SIZE})",
                    zorder=6, gid=f"{tgt}|paper")
        elif show_published and pub:
            sub += f" (paper's values are for {published.FIG2_SIZE}×{published.FIG2_SIZE})"
        ax.set_title(f"{ptitle}\n{sub}", fontsize=9)
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
    ncol_leg = 3 if len(labels) > 8 else min(4, len(labels))
    fig.legend([handles[lab] for lab in labels], labels, loc="upper center",
               ncol=ncol_leg, fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0.0))
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def save_figure(fig, out: str | os.PathLike, stem: str, dpi: int = 150) -> list[Path]:
    """Save ``fig`` as ``<out>/<stem>.png`` and ``.pdf``, atomically, then close it
    (:func:`figures.save.save`)."""
    from figures.save import save

    return save(fig, out, stem, dpi=dpi)
