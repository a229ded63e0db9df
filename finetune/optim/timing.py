"""Step time of each rule relative to AdamW, measured in one process, interleaved.

    python -m finetune.optim.timing                                # the digits MLP, LoRA
    python -m finetune.optim.timing --model minilm --method lora --rank 8 --reps 5

On a shared machine the step times of separate runs drift with the load; here every
rule steps on the same model, data and batch, in rounds (adamw, sam, bsam, flat-lora,
adamw, ...), so a change of load hits all of them alike. Each rule has its own AdamW (the
weights drift a little over the rounds; the cost of a step does not depend on them).
Printed: the median seconds per step of each rule, its ratio to AdamW, and the
published cost (forward-backward passes per step: 1, 2, 3, 1) beside it. A rule may carry
options: ``--rules "adamw,flat-lora,flat-lora[mode=forward]"``.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

import cli

from . import RULES, make_rule


def rule_list(text: str) -> list[str]:
    """``a,b[x=1,y=2],c`` -> ``["a", "b[x=1,y=2]", "c"]`` (commas in brackets kept)."""
    import argparse
    import re

    out = [m.strip() for m in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", str(text)) if m.strip()]
    if not out:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return out


def parse_rule(text: str) -> tuple[str, dict]:
    """``"flat-lora[mode=forward,rho=0.1]"`` -> ``("flat-lora", {"mode": "forward", "rho": 0.1})``."""
    from reconstruction.run import parse_set

    name, _, rest = text.partition("[")
    if rest and not rest.endswith("]"):
        raise ValueError(f"--rules: {text!r}: options go in brackets, name[key=value,...]")
    if name not in RULES:
        raise ValueError(f"--rules: {name!r} unknown; known: {', '.join(sorted(RULES))}")
    opts = parse_set([kv for kv in rest[:-1].split(",") if kv]) if rest else {}
    RULES[name].validate(opts)
    return name, opts


def time_rules(task, model, rules: list[str], *, reps: int = 3, steps: int = 3,
               batch: int = 32, seed: int = 0, progress: bool = False) -> dict[str, dict]:
    """Median seconds per step of each rule over ``reps`` interleaved rounds of ``steps``."""
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    idx = np.random.default_rng([seed, 5]).choice(task.train_idx, size=min(batch, task.n_train),
                                                  replace=False)
    data = task.batch(idx)

    def closure():
        loss = task.loss(model, data)
        loss.backward()
        return loss.detach()

    made = {}
    for label in rules:
        name, opts = parse_rule(label)
        opt = torch.optim.AdamW([{"params": params, "name": "body"}], lr=1e-5)
        made[label] = make_rule(name, opt, model, total_steps=2 * steps * reps + 2, **opts)
    model.train()
    for rule in made.values():  # one warm-up step each
        rule.step(closure, 1)
    times: dict[str, list[float]] = {n: [] for n in rules}
    k = 1
    for _ in tqdm(range(reps), desc="timing", disable=not progress, leave=False):
        for name, rule in made.items():
            for _ in range(steps):
                k += 1
                t0 = time.perf_counter()
                rule.step(closure, k)
                times[name].append(time.perf_counter() - t0)
    base = float(np.median(times[rules[0]]))
    return {n: {"seconds": float(np.median(t)), "ratio": float(np.median(t)) / base,
                "gradient_evaluations": made[n].gradient_evaluations, "samples": len(t)}
            for n, t in times.items()}


def build_parser() -> cli.Parser:
    ap = cli.Parser(prog="python -m finetune.optim.timing", description=__doc__)
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--task", default=None, help="default movie (digits for mlp)")
    ap.add_argument("--method", default="lora", help="a registry method or full")
    ap.add_argument("--rank", type=cli.positive_int, default=8)
    ap.add_argument("--rules", type=rule_list, default=["adamw", "sam", "bsam", "flat-lora"],
                    help="the first is the reference (default adamw,sam,bsam,flat-lora); "
                         "options in brackets: flat-lora[mode=forward]")
    ap.add_argument("--reps", type=cli.positive_int, default=3)
    ap.add_argument("--steps", type=cli.positive_int, default=3, help="steps per rule per round")
    ap.add_argument("--batch", type=cli.positive_int, default=32)
    ap.add_argument("--threads", type=cli.positive_int)
    ap.add_argument("--json", metavar="PATH")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def work():
        import theory

        from .. import adapters as A
        from .. import tasks as T

        task_name = args.task or ("digits" if args.model == "mlp" else "movie")
        T.check_pair(args.model, task_name)
        if args.method != "full":
            theory.get_method(args.method)
        for r in args.rules:
            parse_rule(r)
        cli.check_threads(args.threads)
        cli.check_writable_file(args.json, "--json")
        T.check_available(args.model, task_name)
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        task = T.get_task(args.model, task_name, seed=0)
        model = task.model
        if args.method == "full":
            for p in model.parameters():
                p.requires_grad_(True)
        else:
            A.inject(model, args.method, rank=args.rank, targets=task.targets, seed=0)
            for name in task.head:  # the head trains too, as in finetune.train
                for p in model.get_submodule(name).parameters():
                    p.requires_grad_(True)
        res = time_rules(task, model, list(args.rules), reps=args.reps, steps=args.steps,
                         batch=args.batch, progress=sys.stderr.isatty())
        print(f"{args.model}/{task_name} {args.method} rank {args.rank}, batch {args.batch}, "
              f"{args.reps} rounds x {args.steps} steps, {torch.get_num_threads()} thread(s)")
        w = max(10, *map(len, res))
        print(f"{'rule':<{w}} {'s/step':>8} {'x ' + args.rules[0]:>9} {'passes':>7}")
        for n, r in res.items():
            print(f"{n:<{w}} {r['seconds']:>8.3f} {r['ratio']:>9.2f} {r['gradient_evaluations']:>7}")
        if args.json:
            cli.write_json(args.json, {"model": args.model, "task": task_name,
                                       "method": args.method, "rank": args.rank,
                                       "threads": torch.get_num_threads(), "rules": res})

    return cli.run(work)


if __name__ == "__main__":
    raise SystemExit(main())
