"""Save a matplotlib figure as PNG and PDF, each written atomically (:func:`cli.atomic_path`:
a temporary file beside the destination, renamed into place), then close it."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import cli  # noqa: E402


def save(fig, out: Path, stem: str, dpi: int = 150) -> list[Path]:
    """``<out>/<stem>.png`` and ``<out>/<stem>.pdf``; the figure is closed even on failure."""
    out = Path(out)
    paths = []
    try:
        for ext in ("png", "pdf"):
            with cli.atomic_path(out / f"{stem}.{ext}") as tmp:
                fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=ext)
            paths.append(out / f"{stem}.{ext}")
    finally:
        plt.close(fig)
    return paths
