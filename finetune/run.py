"""``python -m finetune.run``: fine-tune one model on one task with one method.

    python -m finetune.run                                   # tiny GPT-2, LoRA, a few seconds
    python -m finetune.run --model minilm --task movie --method abba --rank 8
    python -m finetune.run --model minilm --task movie --method full
    python -m finetune.run --model minilm --task movie --method lora --impl peft
    python -m finetune.run --model smollm2 --task tweets --method hira --steps 300
    python -m finetune.run --model mlp --task digits --method abba --rank 4

``--rank r`` is the parameter budget of rank-r LoRA on every adapted layer (ABBA gets
r1 = r2 = r/2, LoHa r/2, DoRA r − 1, ...), ``--set key=value`` overrides a config
field, ``--targets`` picks the layers (suffixes of module paths as in PEFT, or
``re:<regex>``; default: the attention and FFN maps). ``--impl peft`` runs PEFT's own
tuner for the methods it has (the reference rows). The loop is the same for every
method (:mod:`finetune.train`): seeded data order, AdamW with warm-up and decay,
checkpoints; a killed run resumes from its last checkpoint, a finished one is never
recomputed (``--force`` retrains it).

Writes ``<out>/<model>/<task>/<run name>/``: ``run.json`` (config, trainable
parameters, metric, loss curve, step time, peak memory, wall time, forgetting),
``deltas.safetensors`` (``<layer>.delta``/``<layer>.w0``, what
``python -m reconstruction.run --target FILE`` reads) and ``adapter.safetensors``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import cli
import theory

from . import runs as R
from . import tasks as T
from .train import IMPLS, SCHEDULES, Diverged, RunConfig, train


def build_parser() -> cli.Parser:
    ap = cli.Parser(prog="python -m finetune.run", description=__doc__)
    ap.add_argument("--model", default="tiny-gpt2", help=f"{' | '.join(T.MODELS)} (default tiny-gpt2)")
    ap.add_argument("--task", default=None,
                    help="movie | amazon | tweets | nyt (text models), digits (mlp); "
                         "default movie (digits for mlp)")
    ap.add_argument("--method", default="lora", help="full or a registry method (default lora)")
    ap.add_argument("--impl", default="ours", choices=IMPLS,
                    help="ours (the registry) or peft (PEFT's own tuner)")
    ap.add_argument("--rank", type=cli.positive_int, default=8,
                    help="budget of rank-r LoRA per adapted layer (default 8)")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a config field of every layer (repeatable)")
    ap.add_argument("--targets", type=cli.str_list,
                    help="comma list of layer-name suffixes or re:<regex> (default: attention + FFN)")
    ap.add_argument("--init", default="paper", help="initialization scheme (default paper)")
    ap.add_argument("--steps", type=cli.positive_int, help="training steps (default: per model)")
    ap.add_argument("--batch", type=cli.positive_int, help="batch size (default: per model)")
    ap.add_argument("--lr", type=cli.positive_float, help="learning rate (default: per model/method)")
    ap.add_argument("--head-lr", type=cli.finite_float, help="task head learning rate (MiniLM)")
    ap.add_argument("--warmup", type=cli.probability, default=0.1,
                    help="fraction of steps of linear warm-up (default 0.1)")
    ap.add_argument("--schedule", default="linear", choices=SCHEDULES)
    ap.add_argument("--weight-decay", type=cli.finite_float, default=0.0)
    ap.add_argument("--optimizer", default="adamw", help="the step rule (default adamw)")
    ap.add_argument("--opt-set", action="append", metavar="KEY=VALUE",
                    help="an option of the step rule, e.g. --opt-set rho=0.05 (repeatable)")
    ap.add_argument("--alpha-lr", type=cli.positive_float, default=5e-3,
                    help="α-LoRA: Adam lr of the α vectors (default 5e-3, the authors')")
    ap.add_argument("--alpha-every", type=cli.positive_int, default=10,
                    help="α-LoRA: one α step every T steps (default 10, the authors')")
    ap.add_argument("--alpha-fraction", type=cli.probability, default=0.2,
                    help="α-LoRA: held-out fraction of the training data for α (default 0.2)")
    ap.add_argument("--eval-every", type=cli.positive_int, help="default: steps / 5")
    ap.add_argument("--seed", type=cli.nonneg_int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu | cuda[:N] (default cpu)")
    ap.add_argument("--threads", type=cli.positive_int, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=R.DEFAULT_OUT, help="runs folder (default runs)")
    ap.add_argument("--json", metavar="PATH", help="also write the record as JSON ('-': stdout only)")
    ap.add_argument("--force", action="store_true", help="retrain a finished run")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def config_from_args(args) -> RunConfig:
    from reconstruction.run import parse_set

    task = args.task or ("digits" if args.model == "mlp" else "movie")
    T.check_pair(args.model, task)
    if args.method != "full":
        theory.get_method(args.method)  # unknown method: one line
    overrides = parse_set(args.set)
    opts = parse_set(args.opt_set)
    cfg = RunConfig(model=args.model, task=task, method=args.method, impl=args.impl,
                    rank=args.rank, targets=tuple(args.targets) if args.targets else None,
                    overrides=tuple(overrides.items()), init=args.init, steps=args.steps,
                    batch=args.batch, lr=args.lr, head_lr=args.head_lr, warmup=args.warmup,
                    schedule=args.schedule, weight_decay=args.weight_decay,
                    optimizer=args.optimizer, optimizer_options=tuple(opts.items()),
                    seed=args.seed, alpha_lr=args.alpha_lr, alpha_every=args.alpha_every,
                    alpha_fraction=args.alpha_fraction, eval_every=args.eval_every,
                    device=args.device)
    cfg = cfg.resolved()
    from .optim import RULES
    if cfg.optimizer not in RULES:
        raise ValueError(f"--optimizer {cfg.optimizer!r} unknown; known: {', '.join(sorted(RULES))}")
    RULES[cfg.optimizer].validate(dict(cfg.optimizer_options))
    return cfg


#: parameters of each model, and activation bytes one training example keeps for the
#: backward pass (measured peaks, rounded up: MiniLM LoRA at batch 32 peaked at 408 MB;
#: SmolLM2 is dominated by its 49,152-word logits)
MODEL_PARAMS = {"minilm": 22.7e6, "smollm2": 134.5e6, "tiny-gpt2": 0.2e6, "mlp": 0.03e6}
EXAMPLE_BYTES = {"minilm": 16e6, "smollm2": 64e6, "tiny-gpt2": 1e6, "mlp": 1e4}


def estimate_bytes(cfg: RunConfig) -> int:
    """A coarse upper estimate of the run's memory: the model (for full fine-tuning with
    its gradients and AdamW state, 4x the weights) and the activations of one batch."""
    size = MODEL_PARAMS[cfg.model]
    mult = 4 if cfg.method == "full" else 1.5
    batch = cfg.batch if cfg.batch is not None else T.defaults(cfg.model).batch
    return int(size * 4 * mult + EXAMPLE_BYTES[cfg.model] * batch + 512e6)


def fmt_metric(rec: dict) -> str:
    name = rec["metric_name"]
    return f"{name} {rec['metric_before']:.4f} -> {rec['metric']:.4f}"


def summary_lines(rec: dict, d: Path) -> list[str]:
    c = rec["config"]
    lines = [f"{c['model']}/{c['task']} {rec['method']}{' (PEFT)' if rec['impl'] == 'peft' else ''}"
             f" rank-{c['rank']} budget, {rec['trainable_params']:,} trainable parameters, "
             f"{c['steps']} steps x {c['batch']}, seed {c['seed']}",
             f"{fmt_metric(rec)}; final train loss {rec['final_train_loss']:.4f}"]
    if rec.get("forgetting") is not None:
        lines.append(f"forgetting ({rec['forget_corpus']}): held-out loss "
                     f"{rec['forget_loss_before']:.4f} -> {rec['forget_loss_after']:.4f} "
                     f"({rec['forgetting']:+.4f})")
    peak = rec.get("peak_step_bytes")
    lines.append(f"{rec['step_seconds_median']:.3f} s/step (median), peak step memory "
                 f"{cli.format_bytes(peak) if peak else 'n/a'}, {rec['train_seconds']:.1f} s training")
    if rec.get("alpha"):
        means = [v["mean"] for v in rec["alpha"].values()]
        lines.append(f"α per layer: mean {sum(means) / len(means):.4f} "
                     f"(min {min(v['min'] for v in rec['alpha'].values()):.4f}, "
                     f"max {max(v['max'] for v in rec['alpha'].values()):.4f})")
    lines.append(f"run: {d}")
    return lines


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    state: dict = {}

    def work():
        cfg = config_from_args(args)
        cli.check_device(cfg.device)
        cli.check_threads(args.threads)
        T.check_available(cfg.model, cfg.task)
        cli.check_writable_dir(args.out, "--out")
        cli.check_writable_file(args.json, "--json")
        batch = cfg.batch or T.defaults(cfg.model).batch
        cli.check_memory(estimate_bytes(cfg), f"{cfg.method} on {cfg.model} at batch {batch} "
                         "(lower --batch)", cfg.device)
        d = R.run_dir(args.out, cfg)
        state["dir"] = d
        if R.is_finished(d) and not args.force:
            rec = R.load_record(d)
            _report(args, rec, d, cached=True)
            return 0
        if args.force and d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        progress = not args.no_progress and sys.stderr.isatty()
        try:
            rec = train(cfg, run_dir=d, progress=progress, return_model=True)
        except Diverged as e:
            R.record_failure(d, cfg, str(e))
            raise cli.Failed(f"{e}; nothing saved as a result ({d / 'failed.json'}); "
                             "lower --lr and rerun") from None
        R.save_run(d, rec, rec.get("model"))
        _report(args, R.load_record(d), d, cached=False)

    return cli.run(work, interrupted=_interrupted(state))


def _interrupted(state):
    class Msg:  # evaluated when printed: the run folder is known by then
        def __str__(self):
            d = state.get("dir")
            return (f"checkpoint saved in {d}; rerun the same command to resume" if d
                    else "nothing was saved")
    return Msg()


def _report(args, rec: dict, d: Path, cached: bool) -> None:
    if cli.emit_json(args.json, rec):
        return
    if cached:
        print(f"finished run found (not recomputed; --force retrains): {d}")
    print("\n".join(summary_lines(rec, d)))


if __name__ == "__main__":
    raise SystemExit(main())
