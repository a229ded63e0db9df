"""Singular spectra of real full fine-tuning updates ΔW = W_ft − W0 of MiniLM.

Top: per layer type (query, key, value, attention output, FFN in, FFN out), the
normalized singular values σ_k / σ_1 of ΔW for each of the 6 layers (log scale).
Bottom: effective ranks of ΔW across depth, per type: entropy rank
exp H(σ/Σσ) (Roy & Vetterli 2007), stable rank Σσ²/σ_1², energy rank r_0.9, and
the Eckart-Young error of the best rank-16 approximation Σ_{k>16}σ_k²/Σσ² (the
floor of rank-16 LoRA).

Data: the deltas file of ``python -m finetune.full`` (``results/minilm_movie_deltas
.safetensors``, or the same name under the data directory) when present; otherwise
a fine-tune is run here (quick: 5 steps of batch 16, max_len 32; full: the default
200 steps, saved to ``results/`` for next time). The title says which.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from figures.save import save

TYPES = ("query", "key", "value", "attn-out", "ffn-in", "ffn-out")
QUICK = {"steps": 5, "batch": 16, "max_len": 32, "eval_size": 64}


def _cached() -> Path | None:
    from finetune.data import data_dir
    from finetune.full import default_out

    repo = Path(__file__).resolve().parent.parent
    for p in (default_out("movie"), repo / default_out("movie"),
              data_dir() / default_out("movie").name):
        if p.is_file():
            return p
    return None


def _accuracies(get) -> str:
    """``, acc 0.51 → 0.83`` when both held-out accuracies are recorded and finite."""
    try:
        a0, a1 = float(get("acc_before")), float(get("acc_after"))
    except (TypeError, ValueError):
        return ""
    return f", acc {a0:.2f} → {a1:.2f}" if np.isfinite([a0, a1]).all() else ""


def load_or_compute(quick: bool):
    """``(deltas, description)``: the cached file if any, else a fresh fine-tune."""
    from finetune import full
    from finetune.tiny import load_deltas

    path = _cached()
    if path is not None:
        meta = full.read_metadata(path)
        desc = (f"{meta.get('corpus', '?')}, {meta.get('steps', '?')} steps, "
                f"lr {meta.get('lr', '?')}{_accuracies(meta.get)}")
        return load_deltas(path), desc
    if quick:
        deltas = full.full_finetune_deltas("movie", **QUICK)
        return deltas, f"movie, {QUICK['steps']} steps (quick run)"
    repo = Path(__file__).resolve().parent.parent
    deltas, info = full.full_finetune_deltas("movie", out=repo / full.default_out("movie"),
                                             return_info=True)
    return deltas, f"movie, {info['steps']} steps, lr {info['lr']}{_accuracies(info.get)}"


def draw(quick: bool = False, deltas=None, desc: str | None = None):
    """``(figure, data)``: data holds the deltas drawn, their singular values and the
    :func:`finetune.full.summarize` rows. ``deltas`` (``{layer: (ΔW, W0)}``, BERT layer
    names) replaces the cached file or fine-tune."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    from finetune import full

    if deltas is None:
        deltas, desc = load_or_compute(quick)
    sv = full.singular_values(deltas)
    rows = {r["layer"]: r for r in full.summarize(deltas, sv=sv)}
    n_layers = 1 + max(full.layer_index(k) for k in deltas)
    cmap = plt.get_cmap("viridis")
    fig = plt.figure(figsize=(15, 7.2))
    gs = fig.add_gridspec(2, 12, height_ratios=[1.15, 1], hspace=0.45, wspace=1.6)
    for j, kind in enumerate(TYPES):
        ax = fig.add_subplot(gs[0, 2 * j:2 * j + 2])
        for name in deltas:
            if full.layer_type(name) != kind:
                continue
            i = full.layer_index(name)
            s = sv[name].numpy()
            ax.semilogy(np.arange(1, len(s) + 1), s / s[0], color=cmap(i / max(1, n_layers - 1)),
                        lw=1.1, label=f"layer {i}", gid=f"sv {name}")
        shape = next(r["shape"] for r in rows.values() if full.layer_type(r["layer"]) == kind)
        ax.set_title(f"{kind} ({shape[0]}×{shape[1]})", fontsize=9)
        ax.set_xlabel("k", fontsize=8)
        ax.set_ylim(1e-3, 1.5)
        ax.grid(alpha=0.3, which="both", lw=0.4)
        ax.tick_params(labelsize=7)
        if j == 0:
            ax.set_ylabel("σ_k / σ_1 of ΔW")
            fig.legend(*ax.get_legend_handles_labels(), loc="upper center", ncol=n_layers,
                       fontsize=7, frameon=False, bbox_to_anchor=(0.5, 0.955))
    panels = [("entropy_rank", "entropy rank"), ("stable_rank", "stable rank (log scale)"),
              ("energy_rank_0.9", "energy rank r_0.9"), ("ey_16", "rank-16 EY error")]
    for j, (key, label) in enumerate(panels):
        ax = fig.add_subplot(gs[1, 3 * j:3 * j + 3])
        for c, kind in enumerate(TYPES):
            pts = sorted((full.layer_index(r["layer"]), r[key]) for r in rows.values()
                         if full.layer_type(r["layer"]) == kind)
            if pts:
                x, yv = zip(*pts)
                ax.plot(x, yv, "o-", color=f"C{c}", ms=3.5, lw=1.2, label=kind,
                        gid=f"{key} {kind}")
        ax.set_xlabel("layer", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.set_xticks(range(n_layers))
        ax.grid(alpha=0.3)
        if key == "stable_rank":
            # plain numbers at 1-2-5 steps, no minor labels (they collided as 2×10⁰, 3×10⁰ ...)
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.tick_params(labelsize=7)
        if j == 0:
            fig.legend(*ax.get_legend_handles_labels(), loc="upper center", ncol=len(TYPES),
                       fontsize=7, frameon=False, bbox_to_anchor=(0.5, 0.04))
    fig.suptitle(f"Full fine-tuning updates ΔW of MiniLM-L6 (binary sentiment: {desc}); "
                 f"max rank {min(min(r['shape']) for r in rows.values())}", fontsize=11)
    return fig, {"deltas": deltas, "sv": sv, "rows": rows, "desc": desc}


def make(out: Path, quick: bool = False) -> list[Path]:
    return save(draw(quick)[0], out, "finetune_spectra")
