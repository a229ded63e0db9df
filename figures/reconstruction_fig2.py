"""ABBA paper Figure 2, reproduced: relative reconstruction error against r.

Singhal et al., "ABBA: Highly Expressive Hadamard Product Adaptation for Large
Language Models" (2025), Fig. 2: four 1000×1000 targets (orthogonal, low-rank,
sparse, random), ‖M − ΔW‖_F²/‖M‖_F² against "LoRA r / ABBA r1 = r2 = r/2".
Here: one line per registered method at the budget of rank-r LoRA, LoRA's exact
truncated SVD, ABBA in both conventions (r1 = r2 = r/2, equal budget; r1 = r2 = r,
twice the budget, as the paper's code runs it), and the paper's ABBA values
(``reconstruction.published``) as star markers.

Source: a sweep's ``results.json`` (``python -m reconstruction.sweep --preset
abba-fig2``, default folder ``results/reconstruction/abba-fig2``; or the path in
``$RECONSTRUCTION_FIG2_RESULTS``). Without one: with ``quick``, a small sweep
(64×64, lora + abba, r = 4..16) is run here into a temporary folder; otherwise
the preset for lora and abba at 1000×1000 is run into the default folder
(long on a CPU, resumable). The paper's values are drawn only at 1000×1000.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from figures.save import save
from reconstruction import published
from reconstruction.plots import plot_error_vs_rank

DEFAULT_RESULTS = Path("results/reconstruction/abba-fig2/results.json")


def load_rows(path: Path) -> list[dict]:
    """The rows of a sweep's ``results.json`` (a file that is not one: ValueError)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        rows = list(data["rows"] if isinstance(data, dict) else data)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a sweep's results.json ({type(e).__name__})") from None
    if not all(isinstance(r, dict) and "target" in r and "method" in r for r in rows):
        raise ValueError(f"{path} is not a sweep's results.json (rows without target/method)")
    return rows


def quick_rows() -> list[dict]:
    """A small Figure 2 sweep (seconds on a laptop CPU)."""
    from reconstruction.sweep import Grid, run_sweep

    grid = Grid(methods=["lora", "abba"], ranks=[4, 8, 12, 16],
                targets=list(published.FIG2_TARGETS), seeds=[0],
                conventions=["equal", "published"], shape=(64, 64), batch=1, steps=20)
    with tempfile.TemporaryDirectory() as d:
        return run_sweep(grid, Path(d), figure=False)["rows"]


def full_rows(folder: Path) -> list[dict]:
    """The preset at full size for LoRA and ABBA (long on a CPU; resumable, so an
    interrupted run continues where it stopped). The full registry:
    ``python -m reconstruction.sweep --preset abba-fig2``."""
    import sys

    from reconstruction.sweep import PRESETS, Grid, run_sweep

    p = PRESETS["abba-fig2"]
    print(f"reconstruction_fig2: no sweep results; running the abba-fig2 preset for lora and "
          f"abba into {folder} (resumable)", file=sys.stderr)
    grid = Grid(methods=["lora", "abba"], ranks=list(p["ranks"]), targets=list(p["targets"]),
                seeds=list(p["seeds"]), conventions=list(p["conventions"]),
                shape=(p["size"], p["size"]), batch=p["batch"])
    return run_sweep(grid, folder, figure=False)["rows"]


def draw(quick: bool = False, results: str | Path | None = None):
    """``(figure, data)``: data holds the sweep rows drawn and where they came from."""
    path = Path(results or os.environ.get("RECONSTRUCTION_FIG2_RESULTS") or DEFAULT_RESULTS)
    if path.is_dir():
        path = path / "results.json"
    if path.exists():
        rows = load_rows(path)
        source = f"sweep {path}"
    elif quick:
        rows = quick_rows()
        source = "quick sweep 64×64, 20 ALS sweeps"
    else:
        rows = full_rows(path.parent)
        source = "sweep lora + abba"
    sizes = sorted({(r.get("m"), r.get("n")) for r in rows if r.get("m")})
    size = ", ".join(f"{m}×{n}" for m, n in sizes)
    fig = plot_error_vs_rank(rows, title=f"ABBA paper Fig. 2 reproduced ({size}; {source})")
    return fig, {"rows": rows, "source": source}


def make(out: Path, quick: bool = False, results: str | Path | None = None) -> list[Path]:
    return save(draw(quick, results)[0], out, "reconstruction_fig2")
