"""Every figure is checked on the data it draws: each curve equals the function that
computed it (theory, simulation, sweep rows, singular values), the legend is in the
curves' colours, no curve hides another, no note or legend sits on a curve, tick
labels do not collide. ``python -m figures`` refuses bad input in one line (exit 2)."""

from __future__ import annotations

import functools
import importlib
import os
import stat

import numpy as np
import pytest
import torch
from clicheck import call, interrupted, one_line, refused
from figcheck import assert_readable, by_gid, data_lines, xy
from matplotlib.colors import to_rgba

from figures.__main__ import available
from figures.__main__ import main as figures_main
from rmt import simulate as sim
from rmt import theory

NAMES = available()
#: quick mode of finetune_spectra fine-tunes MiniLM (a minute): slow tier; the fast tier
#: draws it from synthetic deltas
FAST = [n for n in NAMES if n != "finetune_spectra"]


def _real_data() -> bool:
    from finetune.data import have_corpora
    from finetune.encoder import have_encoder

    return have_corpora() and have_encoder()


@functools.cache
def drawn(name: str):
    """``(figure, data)`` of a figure's quick mode, drawn once per test session."""
    if name == "rmt_realdata" and not _real_data():
        pytest.skip("needs the corpora (python -m finetune.data fetch) and the encoder")
    return importlib.import_module(f"figures.{name}").draw(quick=True)


def test_every_figure_module_defines_draw_and_make():
    assert NAMES == ["finetune_spectra", "reconstruction_fig2", "rmt_fig1", "rmt_fig2",
                     "rmt_histogram", "rmt_realdata", "rmt_regression"]
    for name in NAMES:
        mod = importlib.import_module(f"figures.{name}")
        assert callable(getattr(mod, "make", None)) and callable(getattr(mod, "draw", None))


@pytest.mark.parametrize("name", FAST)
def test_figure_is_readable_no_curve_hidden_no_collision(name):
    assert_readable(drawn(name)[0])


# --------------------------------------------------------------------------- #
# the α-LoRA figures: curves equal the theory, markers the simulation
# --------------------------------------------------------------------------- #
def test_rmt_fig1_curves_are_the_theory_and_markers_the_simulation():
    from figures.rmt_fig1 import BASE, BETAS

    fig, data = drawn("rmt_fig1")
    again = sim.simulate_stats_betas(BASE, BETAS, trials=data["trials"], seed=0)
    colours = set()
    for beta, st, st2 in zip(BETAS, data["stats"], again):
        s = BASE.replace(beta=beta)
        x, y = xy(by_gid(fig, f"theory β={beta}"))
        np.testing.assert_allclose(y, theory.accuracy(s, x), rtol=1e-12)
        x, y = xy(by_gid(fig, f"simulation β={beta}"))
        np.testing.assert_allclose(y, st.accuracy(x).mean(0), rtol=1e-12)
        np.testing.assert_allclose(st.a, st2.a, rtol=1e-12)  # same seed, same numbers
        x, y = xy(by_gid(fig, f"alpha* β={beta}"))
        assert x[0] == pytest.approx(theory.alpha_star(s))
        # the optimum is the curve's maximum
        grid = np.linspace(-10, 10, 2001)
        assert y[0] >= theory.accuracy(s, grid).max() - 1e-9
        ref = by_gid(fig, f"reference β={beta}")
        x, y = xy(ref)
        np.testing.assert_allclose(y, theory.accuracy(s, x, symmetric=True), rtol=1e-12)
        assert ref.get_color() == by_gid(fig, f"theory β={beta}").get_color()
        colours.add(ref.get_color())
    assert len(colours) == 3  # the reference curve is drawn in each β's colour ...
    legend = fig.axes[0].get_legend()
    entry = next(h for h, t in zip(legend.legend_handles, legend.get_texts())
                 if "reference code" in t.get_text())
    assert to_rgba(entry.get_color()) not in {to_rgba(c) for c in colours}  # ... so neutral


def test_rmt_fig2_curves_are_the_closed_form_alpha_star_and_markers_the_argmax():
    from figures.rmt_fig2 import BASE, PS

    fig, data = drawn("rmt_fig2")
    for p in PS:
        s = BASE.replace(p=p)
        x, y = xy(by_gid(fig, f"theory p={p}"))
        np.testing.assert_allclose(y, [theory.alpha_star(s.replace(beta=float(b))) for b in x],
                                   rtol=1e-12)
        if p not in data["points"]:
            assert data["trials"][p] == 0
            continue
        betas, ys, es = data["points"][p]
        x, y = xy(by_gid(fig, f"simulation p={p}"))
        np.testing.assert_array_equal(x, betas)
        np.testing.assert_array_equal(y, ys)
        for b, st, a in zip(betas, data["stats"][p], ys):
            th = theory.alpha_star(s.replace(beta=float(b)))
            assert a == st.alpha_star_grid(np.linspace(th - 2, th + 2, 801))
        assert (es > 0).all()


def test_rmt_histogram_limits_are_the_theory_gaussians_and_bars_the_scores():
    from figures.rmt_histogram import LEFT, RIGHT

    fig, data = drawn("rmt_histogram")
    for tag, s in (("left", LEFT), ("right", RIGHT)):
        for alpha, (g, y) in data[tag].items():
            m, v = theory.mean_var(s, alpha)
            for cls in (1, -1):
                x, dens = xy(by_gid(fig, f"{tag} limit α={alpha:.4f} y={cls}"))
                want = 0.5 * np.exp(-0.5 * (x - cls * m) ** 2 / v) / np.sqrt(2 * np.pi * v)
                np.testing.assert_allclose(dens, want, rtol=1e-10)
                assert np.trapezoid(dens, x) == pytest.approx(0.5, abs=1e-3)  # half the mixture
                bars = by_gid(fig, f"{tag} histogram α={alpha:.4f} y={cls}")
                h, edges = bars.get_data()[:2]
                ref, _ = np.histogram(g[:, y == cls].ravel(), bins=edges, density=True)
                np.testing.assert_allclose(h, 0.5 * ref, rtol=1e-12)


def test_rmt_regression_curves_are_eq10_markers_the_simulation_within_its_error():
    from figures.rmt_regression import GAMMA, NOISE, K

    fig, data = drawn("rmt_regression")
    for (p, n, rho), (r, Wt, Ws) in data["cases"].items():
        tag = f"p={p} n={n} ρ={rho}"
        kw = dict(wt_norm2=float((Wt * Wt).sum()), ws_norm2=float((Ws * Ws).sum()),
                  wt_dot_ws=float((Wt * Ws).sum()))
        x, y = xy(by_gid(fig, f"theory {tag}"))
        np.testing.assert_allclose(y, theory.regression_risk(x, p=p, n=n, gamma=GAMMA,
                                                             noise_var=NOISE, k=K, **kw))
        x, y = xy(by_gid(fig, f"simulation {tag}"))
        np.testing.assert_array_equal(y, r.risk)
        th = theory.regression_risk(x, p=p, n=n, gamma=GAMMA, noise_var=NOISE, k=K, **kw)
        assert (np.abs(y - th) <= 4 * r.risk_se + 0.03 * th).all(), tag  # theory ≈ simulation
        x, _ = xy(by_gid(fig, f"alpha* {tag}"))
        assert x[0] == pytest.approx(theory.regression_alpha_star(**kw))


def test_rmt_realdata_curves_are_the_transfer_rows():
    from rmt import realdata as rd

    fig, data = drawn("rmt_realdata")
    assert len(data["rows"]) == 6  # 3 domains: every ordered pair
    for r in data["rows"]:
        tag = f"{r['source']}->{r['target']}"
        a = np.asarray(r["alphas"])
        view = (a >= -2) & (a <= 10)
        x, y = xy(by_gid(fig, f"measured {tag}"))
        np.testing.assert_array_equal(x, a[view])
        np.testing.assert_array_equal(y, np.asarray(r["curve_mean"])[view])
        x, y = xy(by_gid(fig, f"theory {tag}"))
        np.testing.assert_array_equal(y, np.asarray(r["theory_curve_mean"])[view])
    first = data["rows"][0]
    again = rd.transfer_pair(data["domains"][first["source"]], data["domains"][first["target"]],
                             n=data["n"], repeats=data["repeats"])
    np.testing.assert_allclose(again["curve_mean"], first["curve_mean"])


# --------------------------------------------------------------------------- #
# reconstruction: the sweep's rows, LoRA's Eckart-Young optimum, every curve visible
# --------------------------------------------------------------------------- #
def test_reconstruction_fig2_lines_are_the_rows_and_lora_the_eckart_young_optimum():
    from reconstruction.plots import curves_of
    from reconstruction.targets import make_target

    fig, data = drawn("reconstruction_fig2")
    rows = data["rows"]
    curves = curves_of(rows)
    assert set(curves) == {"orthogonal", "lowrank", "sparse", "random"}
    for tgt, by_key in curves.items():
        assert set(by_key) == {("abba", "equal"), ("abba", "published")}
        for (method, conv), (xs, ys) in by_key.items():
            x, y = xy(by_gid(fig, f"{tgt}|{method}|{conv}"))
            np.testing.assert_array_equal(x, xs)
            np.testing.assert_allclose(y, [r["rel_error"] for r in sorted(
                (r for r in rows if (r["target"], r["method"], r["convention"])
                 == (tgt, method, conv)), key=lambda r: r["rank"])])
        x, y = xy(by_gid(fig, f"{tgt}|lora-exact"))
        s = np.linalg.svd(make_target(tgt, (64, 64), 1, 0).M[0].double().numpy(),
                          compute_uv=False)
        np.testing.assert_allclose(y, [(s[int(r):] ** 2).sum() / (s ** 2).sum() for r in x],
                                   rtol=1e-4)


def readme_rows(size: int = 1000) -> list[dict]:
    """Sweep-like rows shaped like the README's Figure 2 table: DoRA and α-LoRA nearly
    equal, LoHa equal to ABBA, VeRA at 0.99 (the top of the panel), one failed cell."""
    r72 = {"hira": (0.763, 0.761, 0.759, 0.764), "abba": (0.664, 0.540, 0.478, 0.178),
           "loha": (0.664, 0.540, 0.478, 0.178), "smoa": (0.736, 0.729, 0.727, 0.641),
           "dora": (0.872, 0.441, 0.705, 0.192), "vera": (0.996, 0.996, 0.995, 0.990),
           "alpha_lora": (0.870, 0.441, 0.705, 0.192)}
    rows = []
    for ti, t in enumerate(("orthogonal", "lowrank", "sparse", "random")):
        for r in (8, 16, 24, 32, 40, 48, 56, 64, 72):
            f = 0.3 + 0.7 * (r - 8) / 64
            opt = 1 - r / size if t == "orthogonal" else 0.99 - 0.6 * r / 72
            for meth, v in r72.items():
                rows.append(dict(target=t, method=meth, convention="equal", rank=r,
                                 rel_error=0.99 - (0.99 - v[ti]) * f, lora_rank=r,
                                 lora_optimum=opt, m=size, n=size))
            rows.append(dict(target=t, method="abba", convention="published", rank=r,
                             rel_error=0.95 - 0.5 * f, lora_rank=r, lora_optimum=opt,
                             m=size, n=size))
    rows.append(dict(target="random", method="hut", convention="equal", rank=8,
                     rel_error=None, error="the fit diverged", m=size, n=size))
    return rows


@pytest.mark.parametrize("size", [1000, 256])
def test_error_vs_rank_keeps_every_curve_visible_and_notes_off_the_curves(size):
    from reconstruction import published
    from reconstruction.plots import plot_error_vs_rank

    fig = plot_error_vs_rank(readme_rows(size), title="t")
    assert_readable(fig)
    for ax in fig.axes:
        assert not ax.texts  # notes go in the titles, not over VeRA's line at the top
        gids = {ln.get_gid() for ln in data_lines(ax)}
        assert not any(g and "|hut|" in g for g in gids)  # a failed cell draws nothing
    tgt = "lowrank"
    dora, alpha = by_gid(fig, f"{tgt}|dora|equal"), by_gid(fig, f"{tgt}|alpha_lora|equal")
    assert np.allclose(xy(dora)[1], xy(alpha)[1], atol=0.01)  # they coincide ...
    assert alpha.get_linestyle() != dora.get_linestyle() and alpha.get_zorder() > \
        dora.get_zorder()  # ... and α-LoRA is drawn dashed on top, DoRA showing through
    assert "on the dora line" in alpha.get_label()
    loha = by_gid(fig, f"{tgt}|loha|equal")
    assert "on the ABBA r1=r2=r/2 line" in loha.get_label() and loha.get_markerfacecolor() \
        == "none"
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert len(labels) == len(set(labels)) == 1 + 8 + (size == published.FIG2_SIZE)
    if size == published.FIG2_SIZE:  # the paper's values, as published
        x, y = xy(by_gid(fig, "random|paper"))
        assert dict(zip(x, y)) == published.ABBA_FIG2["random"]
    else:
        assert "paper's values are for 1000×1000" in fig.axes[0].get_title()


# --------------------------------------------------------------------------- #
# finetune_spectra: singular values and the summary rows
# --------------------------------------------------------------------------- #
SUFFIX = {"query": "attention.self.query", "key": "attention.self.key",
          "value": "attention.self.value", "attn-out": "attention.output.dense",
          "ffn-in": "intermediate.dense", "ffn-out": "output.dense"}


def synthetic_deltas(width: int = 24):
    """BERT-named layers (6 blocks × 6 maps) with known, distinct spectra."""
    g = torch.Generator().manual_seed(0)
    shapes = {"ffn-in": (4 * width, width), "ffn-out": (width, 4 * width)}
    out = {}
    for i in range(6):
        for j, (kind, suffix) in enumerate(SUFFIX.items()):
            m, n = shapes.get(kind, (width, width))
            k = min(m, n)
            s = torch.logspace(0, -0.5 - 0.15 * i - 0.35 * j, k, dtype=torch.float64)
            U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]
            V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]
            out[f"encoder.layer.{i}.{suffix}"] = ((U * s) @ V.T, torch.randn(m, n, generator=g,
                                                                               dtype=torch.float64))
    return out


def test_finetune_spectra_draws_the_singular_values_and_summary_rows():
    from figures import finetune_spectra as fs
    from finetune import full

    deltas = synthetic_deltas()
    fig, data = fs.draw(deltas=deltas, desc="synthetic")
    assert_readable(fig)
    for name, (d, _) in deltas.items():
        x, y = xy(by_gid(fig, f"sv {name}"))
        s = np.linalg.svd(d.numpy(), compute_uv=False)
        np.testing.assert_allclose(y, s / s[0], rtol=1e-8, atol=1e-14)
        np.testing.assert_array_equal(x, np.arange(1, len(s) + 1))
    rows = {r["layer"]: r for r in full.summarize(deltas)}
    for key in ("entropy_rank", "stable_rank", "energy_rank_0.9", "ey_16"):
        for kind, suffix in SUFFIX.items():
            x, y = xy(by_gid(fig, f"{key} {kind}"))
            np.testing.assert_array_equal(x, range(6))
            np.testing.assert_allclose(y, [rows[f"encoder.layer.{i}.{suffix}"][key]
                                           for i in range(6)])


def test_finetune_spectra_title_never_says_acc_nan(tmp_path, monkeypatch):
    from figures import finetune_spectra as fs
    from finetune.tiny import save_deltas

    deltas = synthetic_deltas(width=8)
    path = save_deltas(deltas, tmp_path / "d.safetensors",
                       metadata={"corpus": "movie", "steps": 3, "lr": 1e-4})
    monkeypatch.setattr(fs, "_cached", lambda: path)
    _, desc = fs.load_or_compute(quick=True)
    assert desc == "movie, 3 steps, lr 0.0001"
    path = save_deltas(deltas, tmp_path / "d.safetensors",
                       metadata={"corpus": "movie", "steps": 3, "lr": 1e-4, "acc_before": 0.5,
                                 "acc_after": 0.875})
    assert fs.load_or_compute(quick=True)[1] == "movie, 3 steps, lr 0.0001, acc 0.50 → 0.88"


@pytest.mark.slow
def test_finetune_spectra_quick_run_end_to_end(tmp_path):
    from figures import finetune_spectra as fs

    fig, data = fs.draw(quick=True)
    assert_readable(fig)
    assert len(data["deltas"]) == 36 and "quick run" in data["desc"]


# --------------------------------------------------------------------------- #
# saving, and python -m figures
# --------------------------------------------------------------------------- #
def test_save_writes_png_and_pdf_atomically_with_the_umask(tmp_path):
    import matplotlib.pyplot as plt

    from figures.save import save

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    paths = save(fig, tmp_path / "sub", "f")
    assert [p.name for p in paths] == ["f.png", "f.pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[1].read_bytes()[:5] == b"%PDF-"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(paths[0].stat().st_mode) == 0o666 & ~mask
    assert sorted(p.name for p in paths[0].parent.iterdir()) == ["f.pdf", "f.png"]
    assert not plt.fignum_exists(fig.number)


def test_save_that_fails_leaves_no_file_and_closes_the_figure(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from figures.save import save

    fig, _ = plt.subplots()
    monkeypatch.setattr(fig, "savefig", lambda *a, **k: (_ for _ in ()).throw(OSError("full")))
    with pytest.raises(OSError):
        save(fig, tmp_path, "f")
    assert list(tmp_path.iterdir()) == [] and not plt.fignum_exists(fig.number)


def test_cli_makes_the_named_figure(tmp_path, capsys):
    r = call(figures_main, ["rmt_fig2", "--quick", "--out", tmp_path], capsys)
    assert r.code == 0 and r.err == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rmt_fig2.pdf", "rmt_fig2.png"]
    assert r.out.startswith(f"rmt_fig2: {tmp_path / 'rmt_fig2.png'}")


FIG_BAD = [
    (["no_such_figure"], "unknown figure(s) no_such_figure; known: finetune_spectra"),
    (["rmt_fig1", "nope"], "unknown figure(s) nope"),
    (["rmt_fig1", "--out", "/proc/no/dir"], "--out /proc/no/dir: cannot write"),
    (["rmt_fig1", "--out", "/etc/hostname"], "--out /etc/hostname is a file; give a folder"),
    (["--list", "rmt_fig1"], "--list takes no figure names"),
    (["--quick=yes"], "--quick: ignored explicit argument"),
    (["--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("argv, words", FIG_BAD, ids=[" ".join(a) for a, _ in FIG_BAD])
def test_cli_bad_input_is_one_line_exit_2_before_any_figure(argv, words, capsys, monkeypatch):
    import figures.rmt_fig1 as f1

    monkeypatch.setattr(f1, "make", lambda *a, **k: pytest.fail("drawn despite bad input"))
    refused(figures_main, argv, capsys, words)


def test_cli_ctrl_c_is_one_line_exit_130(capsys, monkeypatch, tmp_path):
    import figures.rmt_fig1 as f1

    line = interrupted(figures_main, ["rmt_fig1", "--out", tmp_path], capsys, monkeypatch, f1,
                       "make")
    assert line == f"interrupted: the figures finished before the interrupt are in {tmp_path}"


def test_cli_one_missing_input_among_several_exits_1_and_makes_the_others(capsys, monkeypatch,
                                                                          tmp_path):
    import figures.rmt_fig1 as f1
    import figures.rmt_fig2 as f2

    def missing(*a, **k):
        raise FileNotFoundError(2, "No such file or directory", "results.json")

    monkeypatch.setattr(f1, "make", missing)
    monkeypatch.setattr(f2, "make", lambda out, quick: [out / "rmt_fig2.png"])
    r = call(figures_main, ["rmt_fig1", "rmt_fig2", "--out", tmp_path], capsys)
    assert r.code == 1
    assert r.err.splitlines() == [
        "rmt_fig1: not made: results.json: No such file or directory",
        f"failed: 1 of 2 figures not made (rmt_fig1); the others are in {tmp_path}"]
    assert r.out.startswith("rmt_fig2: ")
    # the same failure alone is bad input: one line, exit 2
    one_line(call(figures_main, ["rmt_fig1", "--out", tmp_path], capsys),
             words="results.json: No such file or directory")


def test_a_corrupt_sweep_results_file_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "results.json"
    bad.write_text("{not json")
    monkeypatch.setenv("RECONSTRUCTION_FIG2_RESULTS", str(bad))
    r = call(figures_main, ["reconstruction_fig2", "--quick", "--out", tmp_path / "o"], capsys)
    one_line(r, words=f"{bad} is not a sweep's results.json")
