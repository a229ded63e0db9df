"""``python -m finetune.bench``: step time and peak memory of every method, relative to
LoRA, on the same model and the same batch, measured in one run.

    python -m finetune.bench                                   # MiniLM, batch 32, every method
    python -m finetune.bench --model tiny-gpt2 --reps 3        # seconds
    python -m finetune.bench --methods lora,abba --dense abba,lora --json bench.json

One training step is what :func:`finetune.train.train` does: forward, loss, backward,
AdamW step, with the same trainable parameters (:func:`finetune.train.prepare`: the
factors, and MiniLM's head). Every variant is built on the *same* model object in turn
(:func:`finetune.adapters.inject`, then :func:`~finetune.adapters.remove`, which gives
W0 back bit for bit; full fine-tuning's weights are restored from a copy), so nothing
but the method changes. The variants are **interleaved**: each repetition times every
variant once (``--steps`` steps after one warm-up step, in an order rotated from one
repetition to the next); the step time reported is the median over repetitions, and
the ratio to LoRA the median of the ratios within each repetition (with their range),
so a burst of load on a shared machine hits the two sides of a ratio alike. On the CPU
the clock is the process's own CPU time (``time.process_time``: the work a step does,
not the time it waits for a core other jobs hold); the wall-time ratios are reported
beside it. On a GPU the clock is the wall time after a synchronization. Peak memory is that
of one step (:mod:`finetune.memory`: tensor bytes from the profiler's allocation
events on the CPU, ``max_memory_allocated`` on a GPU, plus the resident parameters,
gradients and optimizer state), measured once per variant.

``--dense M,...`` adds, for each method named, the same layers with ``dense`` forwards
(:attr:`finetune.adapters.Adapted.dense`: ΔW formed, ``x (W0 + ΔW)ᵀ``), so ABBA through
the Khatri-Rao identity is set against ABBA with its m×n update formed.

The issue's goal: ABBA's step time and peak memory within 1.5x of LoRA's at equal
budget. The closing lines state the ratios measured and whether the goal is met.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from typing import Any

import torch

import cli
import theory

from . import adapters as A
from . import tasks as T
from .memory import resident_bytes, step_peak_bytes
from .train import RunConfig, prepare

GOAL = 1.5  # ABBA over LoRA, time and memory


@dataclasses.dataclass(frozen=True)
class Variant:
    method: str
    dense: bool = False

    @property
    def label(self) -> str:
        return f"{self.method} (ΔW formed)" if self.dense else self.method


class Bench:
    """One model and one batch; :meth:`setup` / :meth:`teardown` switch the method."""

    def __init__(self, model: str, task: str, rank: int, batch: int | None, device: str,
                 targets=None):
        self.task = T.get_task(model, task, seed=0, device=device)
        self.device = device
        self.model_name, self.task_name, self.rank, self.targets = model, task, rank, targets
        d = T.defaults(model)
        self.batch_size = int(batch or d.batch)
        idx = self.task.train_idx[:self.batch_size]
        self.batch = self.task.batch(idx)
        self.state0 = {k: v.detach().clone() for k, v in self.task.model.state_dict().items()}

    def setup(self, v: Variant):
        cfg = RunConfig(model=self.model_name, task=self.task_name, method=v.method, rank=self.rank,
                        targets=tuple(self.targets) if self.targets else None,
                        device=self.device).resolved()
        prep = prepare(cfg, self.task)
        if v.dense:
            A.set_dense(self.task.model, True)
        opt = torch.optim.AdamW(prep["groups"], weight_decay=0.0)
        n_params = sum(p.numel() for g in prep["groups"] for p in g["params"])
        return opt, n_params

    def teardown(self) -> None:
        model = self.task.model
        A.remove(model)
        with torch.no_grad():
            for k, t in model.state_dict().items():
                t.copy_(self.state0[k])
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None

    def step(self, opt) -> float:
        loss = self.task.loss(self.task.model, self.batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)

    def time_steps(self, v: Variant, steps: int, measure_memory: bool) -> dict[str, Any]:
        opt, n_params = self.setup(v)
        try:
            self.task.model.train()
            torch.manual_seed(0)
            self.step(opt)  # warm-up: optimizer state allocated, caches filled
            out: dict[str, Any] = {"trainable_params": n_params}
            if measure_memory:
                peak, _ = step_peak_bytes(lambda: self.step(opt), self.device)
                out["peak_step_bytes"] = int(peak + resident_bytes(self.task.model, opt))
            self._sync()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                self.step(opt)
            self._sync()
            out["seconds_per_step"] = (time.perf_counter() - t0) / steps
            out["cpu_seconds_per_step"] = (time.process_time() - c0) / steps
            return out
        finally:
            self.teardown()


def run_bench(model: str = "tiny-gpt2", task: str | None = None, methods=None, *, rank: int = 8,
              batch: int | None = None, reps: int = 5, steps: int = 3, dense=("abba",),
              device: str = "cpu", targets=None, progress: bool = False) -> dict[str, Any]:
    """Time every variant ``reps`` times, interleaved; returns rows and the ratios."""
    from tqdm.auto import tqdm

    task = task or ("digits" if model == "mlp" else "movie")
    methods = list(methods or [m for m in theory.available()])
    if "lora" not in methods:
        methods.insert(0, "lora")
    variants = [Variant(m) for m in methods] + [Variant(m, True) for m in dense if m in methods
                                                 and m != "full"]
    b = Bench(model, task, rank, batch, device, targets)
    # the clock of the ratios: on the CPU the process's own CPU seconds (a shared machine's
    # other jobs delay a step's wall time, not the work it does); on a GPU the wall time
    clock = "seconds_per_step" if device.startswith("cuda") else "cpu_seconds_per_step"
    times: dict[Variant, list[float]] = {v: [] for v in variants}
    walls: dict[Variant, list[float]] = {v: [] for v in variants}
    info: dict[Variant, dict] = {}
    bar = tqdm(total=reps * len(variants), desc="bench", unit="variant", disable=not progress)
    for rep in range(reps):
        k = rep % len(variants)
        for v in variants[k:] + variants[:k]:  # rotated: no variant always first
            r = b.time_steps(v, steps, measure_memory=v not in info)
            times[v].append(r[clock])
            walls[v].append(r["seconds_per_step"])
            info.setdefault(v, r)
            bar.update(1)
    bar.close()
    lora = Variant("lora")
    m_lora = info[lora]["peak_step_bytes"]
    rows = []
    for v in variants:
        paired = [a / b for a, b in zip(times[v], times[lora])]  # same repetition, same load
        paired_wall = [a / b for a, b in zip(walls[v], walls[lora])]
        rows.append({"variant": v.label, "method": v.method, "dense": v.dense,
                     "trainable_params": info[v]["trainable_params"],
                     "seconds_per_step": statistics.median(times[v]), "seconds_all": times[v],
                     "wall_seconds_per_step": statistics.median(walls[v]),
                     "wall_seconds_all": walls[v],
                     "time_vs_lora": statistics.median(paired),
                     "time_vs_lora_range": [min(paired), max(paired)],
                     "wall_vs_lora": statistics.median(paired_wall),
                     "peak_step_bytes": info[v]["peak_step_bytes"],
                     "memory_vs_lora": info[v]["peak_step_bytes"] / m_lora})
    by = {r["variant"]: r for r in rows}
    out = {"model": model, "task": task, "rank": rank, "batch": b.batch_size, "reps": reps,
           "steps": steps, "device": device, "clock": "wall" if clock == "seconds_per_step"
           else "cpu", "threads": torch.get_num_threads(),
           "torch": torch.__version__, "rows": rows}
    if "abba" in by:
        out["abba_vs_lora"] = {"time": by["abba"]["time_vs_lora"],
                               "time_range": by["abba"]["time_vs_lora_range"],
                               "memory": by["abba"]["memory_vs_lora"], "goal": GOAL}
        dv = Variant("abba", True)
        if dv in times:
            paired = [a / b for a, b in zip(times[Variant("abba")], times[dv])]
            out["abba_kr_vs_dense"] = {
                "time": statistics.median(paired), "time_range": [min(paired), max(paired)],
                "memory": by["abba"]["peak_step_bytes"] / by[dv.label]["peak_step_bytes"]}
    return out


def format_report(res: dict[str, Any]) -> str:
    clock = res.get("clock", "wall")
    head = ["variant", "params", f"ms/step ({clock})", "time×LoRA", "(range)", "wall×LoRA",
            "peak memory", "mem×LoRA"]
    cells = [[r["variant"], f"{r['trainable_params']:,}", f"{1e3 * r['seconds_per_step']:.1f}",
              f"{r['time_vs_lora']:.2f}",
              "{:.2f}-{:.2f}".format(*r["time_vs_lora_range"]), f"{r['wall_vs_lora']:.2f}",
              cli.format_bytes(r["peak_step_bytes"]),
              f"{r['memory_vs_lora']:.2f}"] for r in res["rows"]]
    w = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]

    def fmt(cs):
        return "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(cs))

    title = (f"{res['model']}/{res['task']}: one training step (forward, backward, AdamW) on "
             f"one batch of {res['batch']}, budget of rank-{res['rank']} LoRA per layer; "
             f"median of {res['reps']} interleaved repetitions of {res['steps']} steps; "
             f"{res['device']}, {res['threads']} thread(s), torch {res['torch']}")
    lines = [title, fmt(head), fmt(["-" * x for x in w])] + [fmt(c) for c in cells]
    if "abba_vs_lora" in res:
        a = res["abba_vs_lora"]
        ok = a["time"] <= GOAL and a["memory"] <= GOAL
        lines.append(f"ABBA (Khatri-Rao forward) / LoRA at equal budget: time {a['time']:.2f}x "
                     "({:.2f}-{:.2f} over the repetitions), ".format(*a["time_range"])
                     + f"peak memory {a['memory']:.2f}x; goal <= {GOAL}x: "
                     f"{'met' if ok else 'NOT met'}")
    if "abba_kr_vs_dense" in res:
        d = res["abba_kr_vs_dense"]
        lines.append(f"ABBA Khatri-Rao / ABBA with ΔW formed: time {d['time']:.2f}x "
                     "({:.2f}-{:.2f}), ".format(*d["time_range"])
                     + f"peak memory {d['memory']:.2f}x")
    lines.append(f"time×LoRA: median over the repetitions of the step's {clock} time over "
                 "LoRA's in the same repetition (range: min-max; on the CPU the process's own "
                 "CPU seconds, which other jobs on a shared machine do not inflate; wall×LoRA: "
                 "the same with wall time); memory: one step's peak, measured once")
    return "\n".join(lines)


def build_parser() -> cli.Parser:
    ap = cli.Parser(prog="python -m finetune.bench", description=__doc__)
    ap.add_argument("--model", default="minilm", help=f"{' | '.join(T.MODELS)} (default minilm)")
    ap.add_argument("--task", help="default movie (digits for mlp)")
    ap.add_argument("--methods", default="all", help="all or a comma list (lora always)")
    ap.add_argument("--dense", default="abba",
                    help="methods also timed with ΔW formed in the forward (default abba; "
                         "'none' for none)")
    ap.add_argument("--rank", type=cli.positive_int, default=8)
    ap.add_argument("--batch", type=cli.positive_int, help="default: the model's training batch")
    ap.add_argument("--reps", type=cli.positive_int, default=5, help="repetitions (default 5)")
    ap.add_argument("--steps", type=cli.positive_int, default=3,
                    help="timed steps per repetition (default 3)")
    ap.add_argument("--targets", type=cli.str_list)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=cli.positive_int)
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-': stdout)")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def work():
        from .compare import parse_methods
        from .run import estimate_bytes

        task = args.task or ("digits" if args.model == "mlp" else "movie")
        T.check_pair(args.model, task)
        methods = parse_methods(args.methods)
        if args.methods.strip() == "all":
            methods = ["full", *methods]
        dense = [] if args.dense.strip() == "none" else parse_methods(args.dense)
        bad = [m for m in dense if m not in methods and m != "lora"]
        if bad:
            raise ValueError(f"--dense {','.join(bad)}: not among --methods")
        if "full" in dense:
            raise ValueError("--dense full: full fine-tuning has no ΔW to form")
        device = cli.check_device(args.device)
        cli.check_threads(args.threads)
        cli.check_writable_file(args.json, "--json")
        T.check_available(args.model, task)
        cli.check_memory(estimate_bytes(RunConfig(model=args.model, task=task, method="full")),
                         f"the bench on {args.model}", device)
        if args.threads:
            torch.set_num_threads(args.threads)
        probe = T.get_task(args.model, task, seed=0)
        mods = [probe.model.get_submodule(p) for p in A.match_layers(
            probe.model, args.targets or T.DEFAULT_TARGETS[args.model], what=f"--model {args.model}")]
        for m in methods:
            if m != "full":
                for mod in mods:
                    w = mod.weight
                    mm, nn_ = (w.shape[0], w.shape[1]) if isinstance(mod, torch.nn.Linear) \
                        else (w.shape[1], w.shape[0])
                    A.layer_config(theory.get_method(m), int(mm), int(nn_), args.rank, where=m)
        del probe
        res = run_bench(args.model, task, methods, rank=args.rank, batch=args.batch,
                        reps=args.reps, steps=args.steps, dense=dense, device=device,
                        targets=args.targets,
                        progress=not args.no_progress and sys.stderr.isatty())
        if not cli.emit_json(args.json, res):
            print(format_report(res))

    return cli.run(work, interrupted="nothing was saved (the bench writes at its end)")


if __name__ == "__main__":
    raise SystemExit(main())
