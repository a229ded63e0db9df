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

import math
import sys

import numpy as np

import cli
from rmt import theory

DEFAULTS = dict(N=5000, n=40, p=1000, mu_norm=0.8, mu_perp_norm=0.8, beta=0.5,
                gamma_src=5.0, gamma=0.1)
DEFAULT_GRID = (-10.0, 10.0, 11)
DEFAULT_TRIALS = 50
#: the most α values of one run: the table prints one row per α
MAX_ALPHAS = 100_000
#: fresh test points per trial in ``--mode empirical`` (rmt.simulate.simulate's default)
N_TEST = 2000
#: Setting field -> the flag that sets it (for error messages)
FLAGS = {"N": "--N", "n": "--n", "p": "--p", "mu_norm": "--mu-norm",
         "mu_perp_norm": "--mu-perp-norm", "beta": "--beta", "gamma_src": "--gamma-src",
         "gamma": "--gamma"}
#: flags that only the simulation reads: given without --simulate they are an error
SIM_ONLY = ("trials", "seed", "device", "mode")


def build_parser() -> cli.Parser:
    ap = cli.Parser(prog="python -m rmt.run", description=__doc__)
    ap.add_argument("--N", type=cli.positive_int, default=DEFAULTS["N"], help="source samples")
    ap.add_argument("--n", type=cli.positive_int, default=DEFAULTS["n"], help="target samples")
    ap.add_argument("--p", type=cli.positive_int, default=DEFAULTS["p"], help="dimension")
    ap.add_argument("--mu-norm", type=cli.finite_float, default=DEFAULTS["mu_norm"], help="‖μ‖")
    ap.add_argument("--mu-perp-norm", type=cli.finite_float, default=DEFAULTS["mu_perp_norm"],
                    help="‖μ_⊥‖")
    ap.add_argument("--beta", type=cli.finite_float, default=DEFAULTS["beta"],
                    help="task similarity β in [-1, 1]")
    ap.add_argument("--gamma-src", type=cli.positive_float, default=DEFAULTS["gamma_src"],
                    help="γ̃")
    ap.add_argument("--gamma", type=cli.positive_float, default=DEFAULTS["gamma"], help="γ")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--alpha", type=cli.finite_float, nargs="+", help="one or more α values")
    g.add_argument("--alpha-grid", type=cli.finite_float, nargs=3, metavar=("LO", "HI", "K"),
                   help=f"K evenly spaced α in [LO, HI] (default -10 10 11; K <= {MAX_ALPHAS:,})")
    ap.add_argument("--simulate", action="store_true", help="add Monte Carlo columns")
    ap.add_argument("--trials", type=cli.positive_int, default=None,
                    help=f"Monte Carlo trials, >= 2 (default {DEFAULT_TRIALS}; with --simulate)")
    ap.add_argument("--seed", type=cli.nonneg_int, default=None,
                    help="seed of the simulation (default 0; with --simulate)")
    ap.add_argument("--device", default=None,
                    help="device of the simulation: cpu, cuda[:N] (default cpu; with --simulate)")
    ap.add_argument("--mode", choices=["exact", "empirical"], default=None,
                    help="simulated accuracy: exact Φ(w_αᵀμ_β/‖w_α‖) (default) or "
                         f"{N_TEST} fresh test points per trial (with --simulate)")
    ap.add_argument("--json", metavar="PATH", help="write results as JSON ('-' = stdout)")
    return ap


def _alphas(args) -> np.ndarray:
    if args.alpha is not None:
        if len(args.alpha) > MAX_ALPHAS:
            raise ValueError(f"--alpha: at most {MAX_ALPHAS:,} values, got {len(args.alpha):,}")
        return np.asarray(args.alpha, dtype=float)
    lo, hi, k = args.alpha_grid if args.alpha_grid else DEFAULT_GRID
    if not float(k).is_integer() or k < 1:
        raise ValueError(f"--alpha-grid K must be a positive integer, got {k:g}")
    if k > MAX_ALPHAS:
        raise ValueError(f"--alpha-grid K = {k:g}: at most {MAX_ALPHAS:,} α values "
                         "(the table prints one row per α)")
    if k > 1 and not lo < hi:
        raise ValueError(f"--alpha-grid needs LO < HI, got {lo:g} {hi:g}")
    return np.linspace(lo, hi, int(k))


def setting(args) -> theory.Setting:
    """The validated setting; a bad value names its flag."""
    try:
        return theory.Setting(**{k: getattr(args, k) for k in FLAGS})
    except ValueError as e:
        msg = str(e)
        for field, flag in FLAGS.items():
            if msg.startswith(f"{field} "):
                msg = flag + msg[len(field):]
                break
        raise ValueError(msg) from None


def simulation_bytes(s: theory.Setting, trials: int, n_alpha: int, mode: str) -> tuple[int, int]:
    """Estimated peak bytes of ``--simulate``: ``(on the device, on the CPU)``.

    Device: one chunk of training data (rmt.simulate draws at most its ``_CHUNK_ELEMS``
    floats per chunk, but never less than one trial) and its Gram/Cholesky factors, a
    few float64 copies. CPU: seven scalars per trial and the (trials, K) accuracy, mean
    and variance arrays (and their temporaries); ``empirical`` adds the (trials,
    n_test, K) test scores."""
    from rmt import simulate as sim

    def per_trial(m):  # floats of the largest fit of m samples
        k = min(s.p, m)
        return s.p * k + k * k + s.p
    per = max(per_trial(s.N), per_trial(s.n))
    chunk = max(per, min(trials * per, sim._CHUNK_ELEMS))
    device = 8 * 4 * chunk
    host = 8 * trials * (7 + 8 * n_alpha)
    if mode == "empirical":
        device += 8 * 3 * min(trials, max(1, sim._CHUNK_ELEMS // (N_TEST * s.p))) * N_TEST * s.p
        host += 8 * 3 * trials * N_TEST * n_alpha
    return device, host


def check(args) -> tuple[theory.Setting, np.ndarray]:
    """Every flag checked before any work (one-line ValueError naming the flag)."""
    s = setting(args)
    alpha = _alphas(args)
    if not args.simulate:
        given = [f"--{k}" for k in SIM_ONLY if getattr(args, k) is not None]
        if given:
            raise cli.UsageError(f"{', '.join(given)} only "
                                 f"{'applies' if len(given) == 1 else 'apply'} with --simulate")
    else:
        args.trials = DEFAULT_TRIALS if args.trials is None else args.trials
        args.seed = 0 if args.seed is None else args.seed
        args.mode = args.mode or "exact"
        if args.trials < 2:
            raise cli.UsageError(f"--trials must be >= 2 with --simulate (a standard error "
                                 f"needs two trials), got {args.trials}")
        args.device = cli.check_device(args.device or "cpu")
        dev, host = simulation_bytes(s, args.trials, len(alpha), args.mode)
        what = f"--simulate with --trials {args.trials} at p = {s.p}, N = {s.N}, n = {s.n}"
        hint = "lower --trials, --p or the number of α values"
        if args.device.startswith("cuda"):
            cli.check_memory(dev, what, args.device, hint)
            cli.check_memory(host, what, "cpu", hint)
        else:
            cli.check_memory(dev + host, what, "cpu", hint)
    cli.check_writable_file(args.json, "--json")
    return s, alpha


def compute(args, s: theory.Setting, alpha: np.ndarray) -> dict:
    """Theory on the α grid, and the simulation with ``--simulate`` (``check``ed args)."""
    m, v = theory.mean_var(s, alpha)
    acc = theory.accuracy(s, alpha)
    co = theory.score_coefficients(s)
    a_star = theory.alpha_star(s)
    res = dict(setting=dict(vars(s)), alpha=alpha.tolist(),
               theory=dict(accuracy=acc.tolist(), mean=m.tolist(), var=v.tolist(),
                           alpha_star=float(a_star),
                           alpha_worst=float(theory.alpha_worst(s)),
                           pretrained_accuracy=theory.pretrained_accuracy(s),
                           coefficients={k: float(co[k]) for k in ("a", "b", "V0", "V1", "V2")}))
    if math.isfinite(a_star):
        res["theory"]["accuracy_at_alpha_star"] = float(theory.accuracy(s, a_star))
    if args.simulate:
        from rmt import simulate as sim

        r = sim.simulate(s, alpha, trials=args.trials, seed=args.seed, device=args.device,
                         mode=args.mode, n_test=N_TEST, progress=sys.stderr.isatty())
        res["simulation"] = dict(
            trials=args.trials, seed=args.seed, mode=args.mode, device=args.device,
            accuracy=r.accuracy.tolist(), accuracy_se=r.accuracy_se.tolist(),
            mean=r.mean.tolist(), mean_se=r.mean_se.tolist(),
            var=r.var.tolist(), var_se=r.var_se.tolist(),
            pretrained_accuracy=r.pretrained_accuracy, pretrained_se=r.pretrained_se,
            alpha_star_plugin=float(r.stats.alpha_star_plugin()))
    return res


def format_table(res: dict) -> str:
    s = res["setting"]
    th = res["theory"]
    sim = res.get("simulation")
    lines = [("α-LoRA  N={N} n={n} p={p} ‖μ‖={mu_norm:g} ‖μ_⊥‖={mu_perp_norm:g} β={beta:g} "
              "γ̃={gamma_src:g} γ={gamma:g}").format(**s)]
    if sim:
        lines.append(f"simulation: {sim['trials']} trials, seed {sim['seed']}, {sim['mode']} "
                     f"accuracy (mean ± s.e.), on {sim['device']}")
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


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def work():
        s, alpha = check(args)
        res = compute(args, s, alpha)
        if not cli.emit_json(args.json, res):
            print(format_table(res))

    return cli.run(work, interrupted="nothing was saved")


if __name__ == "__main__":
    raise SystemExit(main())
