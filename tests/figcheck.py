"""Checks of a drawn matplotlib figure that a reader would make by eye: every curve
visible (none hidden under another), tick labels that do not collide, notes and
legends that do not sit on the data, legend entries in the colours of their curves,
no "nan" in any title. Used by tests/test_figures.py on every figure."""

from __future__ import annotations

import itertools
import re

import numpy as np
from matplotlib.colors import to_rgba
from matplotlib.lines import Line2D


def renderer(fig):
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def data_lines(ax) -> list[Line2D]:
    """Visible lines of ``ax`` that carry data (not the empty legend proxies, not the caps
    of error bars)."""
    return [ln for ln in ax.get_lines()
            if ln.get_visible() and len(np.atleast_1d(ln.get_xdata())) > 0
            and not (ln.get_marker() in ("_", "|") and ln.get_linestyle() in ("None", ""))]


def by_gid(fig, gid: str) -> Line2D:
    found = [a for ax in fig.axes for a in ax.get_children() if a.get_gid() == gid]
    assert len(found) == 1, f"{len(found)} artists with gid {gid!r}"
    return found[0]


def xy(line: Line2D) -> tuple[np.ndarray, np.ndarray]:
    return (np.asarray(line.get_xdata(), dtype=float), np.asarray(line.get_ydata(), dtype=float))


def _style(ln: Line2D):
    """What tells two coinciding curves apart besides colour (colour alone does not: the
    one on top covers the other): line style, marker, hollow or filled, marker size."""
    mfc = ln.get_markerfacecolor()
    hollow = isinstance(mfc, str) and mfc == "none" or to_rgba(mfc)[3] == 0
    return (ln.get_linestyle(), ln.get_marker(), hollow, round(ln.get_markersize()))


def _display_path(ln: Line2D, per_segment: int = 20) -> np.ndarray:
    """Points along the drawn line (display coordinates), segments densely sampled;
    markers only when the line has no connecting segments."""
    pts = ln.get_transform().transform(np.column_stack(xy(ln)))
    pts = pts[np.isfinite(pts).all(1)]
    if len(pts) < 2 or ln.get_linestyle() in ("None", "", " "):
        return pts
    t = np.linspace(0, 1, per_segment)[:, None]
    return np.concatenate([a + t * (b - a) for a, b in zip(pts[:-1], pts[1:])])


def assert_no_curve_hidden(fig, tol: float = 0.01):
    """Two curves with the same x that coincide (within ``tol`` of the axes' y range at
    every point) must differ in line style, marker or marker fill, so that both show."""
    for ax in fig.axes:
        lo, hi = ax.get_ylim()
        span = abs(hi - lo) or 1.0
        lines = [ln for ln in data_lines(ax) if len(xy(ln)[0]) > 1]
        for a, b in itertools.combinations(lines, 2):
            (xa, ya), (xb, yb) = xy(a), xy(b)
            if xa.shape != xb.shape or not np.allclose(xa, xb):
                continue
            if ax.get_yscale() == "log":
                ya, yb, span = np.log10(ya), np.log10(yb), np.log10(hi / lo)
            if np.nanmax(np.abs(ya - yb)) <= tol * span:
                assert _style(a) != _style(b), (
                    f"{a.get_label()!r} and {b.get_label()!r} coincide and look the same: "
                    "one hides the other")


def _extents(artists, r):
    out = []
    for a in artists:
        if a.get_visible() and a.get_text().strip():
            out.append((a.get_text(), a.get_window_extent(r)))
    return out


def assert_tick_labels_do_not_collide(fig):
    r = renderer(fig)
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            labels = _extents(axis.get_ticklabels(which="both"), r)
            for (ta, ba), (tb, bb) in itertools.combinations(labels, 2):
                assert not ba.overlaps(bb), f"tick labels {ta!r} and {tb!r} collide in " \
                                            f"{ax.get_title()!r}"


def assert_panels_do_not_overlap(fig):
    """No axes' tick labels run into another axes."""
    r = renderer(fig)
    boxes = [(ax, ax.get_tightbbox(r)) for ax in fig.axes if ax.get_visible() and ax.axison]
    for (a, ba), (b, bb) in itertools.combinations(boxes, 2):
        assert not ba.overlaps(bb), f"panels {a.get_title()!r} and {b.get_title()!r} overlap"


def assert_text_and_legends_clear_of_curves(fig):
    """No note written in an axes and no legend box sits on a drawn curve."""
    r = renderer(fig)
    for ax in fig.axes:
        boxes = [(t.get_text(), t.get_window_extent(r)) for t in ax.texts if t.get_visible()]
        if ax.get_legend() is not None:
            boxes.append(("legend", ax.get_legend().get_window_extent(r)))
        for ln in data_lines(ax):
            pts = _display_path(ln)
            for text, box in boxes:
                inside = ((pts[:, 0] > box.x0) & (pts[:, 0] < box.x1)
                          & (pts[:, 1] > box.y0) & (pts[:, 1] < box.y1))
                assert not inside.any(), f"{text!r} sits on the curve {ln.get_label()!r} " \
                                         f"in {ax.get_title()!r}"


def assert_legend_colours_match_curves(fig):
    """Every legend entry has the colour of all the curves that carry its label."""
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()] + list(fig.legends)
    lines = [ln for ax in fig.axes for ln in data_lines(ax)]
    for leg in legends:
        for handle, text in zip(leg.legend_handles, leg.get_texts()):
            if not isinstance(handle, Line2D):
                continue
            want = to_rgba(handle.get_color())
            for ln in lines:
                if ln.get_label() == text.get_text():
                    assert to_rgba(ln.get_color()) == want, \
                        f"legend {text.get_text()!r} is not in its curve's colour"


def assert_no_nan_in_titles(fig):
    titles = [ax.get_title() for ax in fig.axes] + [fig._suptitle.get_text()
                                                    if fig._suptitle else ""]
    for t in titles:
        assert not re.search(r"\bnan\b", t, re.IGNORECASE), t


def assert_readable(fig):
    """All of the above."""
    assert_no_curve_hidden(fig)
    assert_tick_labels_do_not_collide(fig)
    assert_panels_do_not_overlap(fig)
    assert_text_and_legends_clear_of_curves(fig)
    assert_legend_colours_match_curves(fig)
    assert_no_nan_in_titles(fig)
