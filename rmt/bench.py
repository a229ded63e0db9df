"""``python -m rmt.bench``: how fast are the theory and the Monte Carlo?

Prints (1) the time of one theory curve (accuracy at 1000 α values, closed form), and
(2) simulation throughput in trials/s at p = 1000 (the Figure-1 setting: N = 5000,
n = 40), batched over trials against a Python loop of single trials, measured in the
same run (best of ``--repeat``), with the ratio. Flags: --trials, --device, --p,
--repeat, --threads, --json PATH|-.
"""

from __future__ import annotations

import time

import numpy as np
import torch

import cli
from rmt import simulate as sim
from rmt import theory

FIG1 = dict(N=5000, n=40, mu_norm=0.8, mu_perp_norm=0.8, beta=0.5, gamma_src=5.0, gamma=0.1)


def _best(fn, repeat: int, device: str = "cpu") -> float:
    cuda = str(device).startswith("cuda")
    best = float("inf")
    for _ in range(repeat):
        if cuda:
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return best


def setting(p: int) -> theory.Setting:
    """The Figure-1 setting (N = 5000, n = 40) at dimension ``p``."""
    return theory.Setting(p=p, **FIG1)


def bench(trials: int = 16, device: str = "cpu", p: int = 1000, repeat: int = 3,
          sampler: str = "auto") -> dict:
    s = setting(p)
    alpha = np.linspace(-10, 10, 1000)
    t_theory = _best(lambda: theory.accuracy(s, alpha), max(repeat, 20))
    t_astar = _best(lambda: theory.alpha_star(s), max(repeat, 20))

    def batched():
        sim.simulate_stats(s, trials=trials, seed=0, device=device, sampler=sampler)

    def loop():
        for i in range(trials):
            sim.simulate_stats(s, trials=1, seed=i, device=device, sampler=sampler)

    batched()  # warm-up
    t_b = _best(batched, repeat, device)
    t_l = _best(loop, repeat, device)
    return dict(device=device, p=p, N=s.N, n=s.n, trials=trials, sampler=sampler,
                threads=torch.get_num_threads(),
                theory_curve_1000_alpha_ms=1e3 * t_theory, alpha_star_us=1e6 * t_astar,
                batched_trials_per_s=trials / t_b, loop_trials_per_s=trials / t_l,
                speedup_batched_over_loop=t_l / t_b)


def build_parser() -> cli.Parser:
    ap = cli.Parser(prog="python -m rmt.bench", description=__doc__)
    ap.add_argument("--trials", type=cli.positive_int, default=16)
    ap.add_argument("--p", type=cli.positive_int, default=1000)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--repeat", type=cli.positive_int, default=3)
    ap.add_argument("--sampler", default="auto", choices=["auto", "direct", "bartlett"])
    ap.add_argument("--threads", type=cli.positive_int, default=None,
                    help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", metavar="PATH", help="also write the numbers as JSON ('-': stdout)")
    return ap


def check(args) -> None:
    """Every flag checked before any timing (one-line ValueError naming the flag)."""
    from rmt.run import simulation_bytes

    cli.check_threads(args.threads)
    args.device = cli.check_device(args.device)
    s = setting(args.p)
    for m, what in ((s.N, "N"), (s.n, "n")):
        try:
            sim._use_bartlett(args.sampler, s.p, m)
        except ValueError as e:
            raise ValueError(f"--sampler bartlett: {e} (target {what} = {m}); use auto or direct") \
                from None
    dev, host = simulation_bytes(s, args.trials, 0, "exact")
    cli.check_memory(dev + host, f"--trials {args.trials} at --p {args.p}", args.device,
                     "lower --trials or --p")
    cli.check_writable_file(args.json, "--json")


def report(r: dict) -> str:
    return "\n".join([
        f"device {r['device']} ({r['threads']} threads), Figure-1 setting N={r['N']} "
        f"n={r['n']} p={r['p']}, sampler {r['sampler']}",
        f"theory: accuracy curve, 1000 α values: {r['theory_curve_1000_alpha_ms']:.3f} ms; "
        f"α* closed form: {r['alpha_star_us']:.0f} µs",
        f"simulation ({r['trials']} trials): batched {r['batched_trials_per_s']:.2f} trials/s, "
        f"per-trial loop {r['loop_trials_per_s']:.2f} trials/s, "
        f"ratio {r['speedup_batched_over_loop']:.2f}x"])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def work():
        check(args)
        prev = torch.get_num_threads()
        try:
            if args.threads:
                torch.set_num_threads(args.threads)
            r = bench(args.trials, args.device, args.p, args.repeat, args.sampler)
        finally:
            torch.set_num_threads(prev)
        if not cli.emit_json(args.json, r):
            print(report(r))

    return cli.run(work, interrupted="nothing was saved (a benchmark keeps no partial result)")


if __name__ == "__main__":
    raise SystemExit(main())
