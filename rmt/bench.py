"""``python -m rmt.bench``: how fast are the theory and the Monte Carlo?

Prints (1) the time of one theory curve (accuracy at 1000 α values, closed form), and
(2) simulation throughput in trials/s at p = 1000 (the Figure-1 setting: N = 5000,
n = 40), batched over trials against a Python loop of single trials, measured in the
same run (best of ``--repeat``), with the ratio. Flags: --trials, --device, --p,
--repeat, --threads, --json PATH|-.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from rmt import simulate as sim
from rmt import theory


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def bench(trials: int = 16, device: str = "cpu", p: int = 1000, repeat: int = 3,
          sampler: str = "auto") -> dict:
    s = theory.Setting(N=5000, n=40, p=p, mu_norm=0.8, mu_perp_norm=0.8, beta=0.5,
                       gamma_src=5.0, gamma=0.1)
    alpha = np.linspace(-10, 10, 1000)
    t_theory = _best(lambda: theory.accuracy(s, alpha), max(repeat, 20))
    t_astar = _best(lambda: theory.alpha_star(s), max(repeat, 20))

    def batched():
        sim.simulate_stats(s, trials=trials, seed=0, device=device, sampler=sampler)

    def loop():
        for i in range(trials):
            sim.simulate_stats(s, trials=1, seed=i, device=device, sampler=sampler)

    batched()  # warm-up
    t_b = _best(batched, repeat)
    t_l = _best(loop, repeat)
    return dict(device=device, p=p, N=s.N, n=s.n, trials=trials, sampler=sampler,
                threads=torch.get_num_threads(),
                theory_curve_1000_alpha_ms=1e3 * t_theory, alpha_star_us=1e6 * t_astar,
                batched_trials_per_s=trials / t_b, loop_trials_per_s=trials / t_l,
                speedup_batched_over_loop=t_l / t_b)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rmt.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--p", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sampler", default="auto", choices=["auto", "direct", "bartlett"])
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    try:
        if args.trials < 1 or args.repeat < 1 or args.threads < 0:
            raise ValueError("--trials and --repeat must be >= 1, --threads >= 0")
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.empty(1, device=args.device)
        r = bench(args.trials, args.device, args.p, args.repeat, args.sampler)
    except (ValueError, RuntimeError, AssertionError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    if args.json:
        text = json.dumps(r, indent=2)
        if args.json == "-":
            print(text)
            return 0
        with open(args.json, "w") as fh:
            fh.write(text + "\n")
    print(f"device {r['device']} ({r['threads']} threads), Figure-1 setting N={r['N']} "
          f"n={r['n']} p={r['p']}, sampler {r['sampler']}")
    print(f"theory: accuracy curve, 1000 α values: {r['theory_curve_1000_alpha_ms']:.3f} ms; "
          f"α* closed form: {r['alpha_star_us']:.0f} µs")
    print(f"simulation ({r['trials']} trials): batched {r['batched_trials_per_s']:.2f} trials/s, "
          f"per-trial loop {r['loop_trials_per_s']:.2f} trials/s, "
          f"ratio {r['speedup_batched_over_loop']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
