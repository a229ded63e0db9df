"""``python -m rmt.run``: α-LoRA deterministic equivalents, optionally against simulation.

Defaults are the middle curve of the paper's Figure 1 (N=5000, n=40, p=1000,
‖μ‖=‖μ_⊥‖=0.8, β=0.5, γ̃=5, γ=0.1). Examples::

    python -m rmt.run                                  # theory table on a default α grid
    python -m rmt.run --beta 0.9 --alpha 0 1 7.5 --simulate --trials 50
    python -m rmt.run --alpha-grid -10 10 21 --json -  # machine-readable

Prints accuracy, score mean and variance (given y=+1) per α, with Monte Carlo
mean ± s.e. beside the theory when ``--simulate`` is given, then α* (best), ᾱ
(accuracy ½) and the pre-trained source classifier's accuracy on the target.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

import numpy as np

from rmt import theory

DEFAULTS = dict(N=5000, n=40, p=1000, mu_norm=0.8, mu_perp_norm=0.8, beta=0.5,
                gamma_src=5.0, gamma=0.1)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        raise SystemExit(_fail(message))


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m rmt.run", description=__doc__,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--N", type=int, default=DEFAULTS["N"], help="source samples")
    ap.add_argument("--n", type=int, default=DEFAULTS["n"], help="target samples")
    ap.add_argument("--p", type=int, default=DEFAULTS["p"], help="dimension")
    ap.add_argument("--mu-norm", type=float, default=DEFAULTS["mu_norm"], help="‖μ‖")
    ap.add_argument("--mu-perp-norm", type=float, default=DEFAULTS["mu_perp_norm"],
                    help="‖μ_⊥‖")
    ap.add_argument("--beta", type=float, default=DEFAULTS["beta"], help="task similarity β")
    ap.add_argument("--gamma-src", type=float, default=DEFAULTS["gamma_src"], help="γ̃")
    ap.add_argument("--gamma", type=float, default=DEFAULTS["gamma"], help="γ")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--alpha", type=float, nargs="+", help="one or more α values")
    g.add_argument("--alpha-grid", type=float, nargs=3, metavar=("LO", "HI", "K"),
                   help="K evenly spaced α in [LO, HI] (default -10 10 11)")
    ap.add_argument("--simulate", action="store_true", help="add Monte Carlo columns")
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mode", choices=["exact", "empirical"], default="exact",
                    help="simulated accuracy: exact Φ(w_αᵀμ_β/‖w_α‖) or fresh test points")
    ap.add_argument("--json", metavar="PATH", help="write results as JSON ('-' = stdout)")
    return ap


def _alphas(args) -> np.ndarray:
    if args.alpha is not None:
        a = np.asarray(args.alpha, dtype=float)
    else:
        lo, hi, k = args.alpha_grid if args.alpha_grid else (-10.0, 10.0, 11.0)
        if not float(k).is_integer() or k < 1:
            raise ValueError(f"--alpha-grid K must be a positive integer, got {k:g}")
        a = np.linspace(lo, hi, int(k))
    if not np.all(np.isfinite(a)):
        raise ValueError("alpha values must be finite")
    return a


def _num(x):
    x = float(x)
    return x if math.isfinite(x) else str(x)


def compute(args) -> dict:
    s = theory.Setting(N=args.N, n=args.n, p=args.p, mu_norm=args.mu_norm,
                       mu_perp_norm=args.mu_perp_norm, beta=args.beta,
                       gamma_src=args.gamma_src, gamma=args.gamma)
    alpha = _alphas(args)
    m, v = theory.mean_var(s, alpha)
    acc = theory.accuracy(s, alpha)
    co = theory.score_coefficients(s)
    res = dict(setting=dict(vars(s)), alpha=alpha.tolist(),
               theory=dict(accuracy=acc.tolist(), mean=m.tolist(), var=v.tolist(),
                           alpha_star=_num(theory.alpha_star(s)),
                           alpha_worst=_num(theory.alpha_worst(s)),
                           pretrained_accuracy=theory.pretrained_accuracy(s),
                           coefficients={k: float(co[k]) for k in ("a", "b", "V0", "V1", "V2")}))
    a_star = theory.alpha_star(s)
    if math.isfinite(a_star):
        res["theory"]["accuracy_at_alpha_star"] = float(theory.accuracy(s, a_star))
    if args.simulate:
        import torch

        from rmt import simulate as sim
        try:
            torch.empty(1, device=args.device)
        except (RuntimeError, AssertionError) as e:
            raise ValueError(f"device {args.device!r} is not available ({e})") from None
        r = sim.simulate(s, alpha, trials=args.trials, seed=args.seed, device=args.device,
                         mode=args.mode, progress=sys.stderr.isatty())
        res["simulation"] = dict(
            trials=args.trials, seed=args.seed, mode=args.mode,
            accuracy=r.accuracy.tolist(), accuracy_se=r.accuracy_se.tolist(),
            mean=r.mean.tolist(), mean_se=r.mean_se.tolist(),
            var=r.var.tolist(), var_se=r.var_se.tolist(),
            pretrained_accuracy=r.pretrained_accuracy, pretrained_se=r.pretrained_se,
            alpha_star_plugin=_num(r.stats.alpha_star_plugin()))
    return res


def format_table(res: dict) -> str:
    s = res["setting"]
    th = res["theory"]
    sim = res.get("simulation")
    lines = [("α-LoRA  N={N} n={n} p={p} ‖μ‖={mu_norm:g} ‖μ_⊥‖={mu_perp_norm:g} β={beta:g} "
              "γ̃={gamma_src:g} γ={gamma:g}").format(**s)]
    if sim:
        lines.append(f"simulation: {sim['trials']} trials, seed {sim['seed']}, {sim['mode']} "
                     "accuracy (mean ± s.e.)")
        hdr = (f"{'alpha':>8} | {'acc(th)':>8} {'acc(sim)':>17} | {'mean(th)':>9} "
               f"{'mean(sim)':>19} | {'var(th)':>9} {'var(sim)':>19}")
    else:
        hdr = f"{'alpha':>8} | {'accuracy':>8} | {'mean':>9} | {'var':>9}"
    lines += [hdr, "-" * len(hdr)]
    for i, a in enumerate(res["alpha"]):
        row = f"{a:8.3f} | {th['accuracy'][i]:8.4f} "
        if sim:
            row += f"{sim['accuracy'][i]:8.4f} ± {sim['accuracy_se'][i]:6.4f} "
        row += f"| {th['mean'][i]:9.4f} "
        if sim:
            row += f"{sim['mean'][i]:9.4f} ± {sim['mean_se'][i]:7.4f} "
        row += f"| {th['var'][i]:9.4f}"
        if sim:
            row += f" {sim['var'][i]:9.4f} ± {sim['var_se'][i]:7.4f}"
        lines.append(row)

    def f(x):
        return f"{x:.4f}" if isinstance(x, float) else str(x)
    extra = f"   (accuracy {th['accuracy_at_alpha_star']:.4f})" if "accuracy_at_alpha_star" in th else ""
    lines.append(f"alpha* (best)              = {f(th['alpha_star'])}{extra}")
    if sim:
        lines.append(f"alpha* (simulation)        = {f(sim['alpha_star_plugin'])}"
                     "   (eq. 8 on trial-averaged coefficients)")
    lines.append(f"alpha_bar (accuracy 1/2)   = {f(th['alpha_worst'])}")
    pre = f"pre-trained w̃ on target    = {th['pretrained_accuracy']:.4f}"
    if sim:
        pre += f"   (simulation {sim['pretrained_accuracy']:.4f} ± {sim['pretrained_se']:.4f})"
    lines.append(pre)
    return "\n".join(lines)


def _write_json(path: str, res: dict) -> None:
    text = json.dumps(res, indent=2)
    if path == "-":
        print(text)
        return
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".rmt.", suffix=".json")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        if args.trials < 1:
            raise ValueError(f"--trials must be >= 1, got {args.trials}")
        res = compute(args)
        if args.json != "-":
            print(format_table(res))
        if args.json:
            _write_json(args.json, res)
    except BrokenPipeError:  # e.g. piped into `head`
        return 0
    except (ValueError, OSError) as e:
        return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
