"""``python -m finetune.compare``: every method fine-tuned at equal budget, against full
fine-tuning, with PEFT's tuners as reference rows.

    python -m finetune.compare                                    # tiny GPT-2, all methods, 1 seed
    python -m finetune.compare --model minilm --task movie --methods all --rank 8 --seeds 3 --impl both
    python -m finetune.compare --model mlp --task digits --rank 4 --seeds 3
    python -m finetune.compare --model smollm2 --task tweets --methods lora,abba,hira,loha,dora,alpha_lora

What it does, for each ``--model`` and ``--task``:

1. **plans** one :class:`~finetune.train.RunConfig` per row and seed: full fine-tuning
   and our LoRA always (the reference of the alignment and of the cost ratios), then
   every method of ``--methods`` (``--impl ours``), PEFT's tuner for those PEFT has
   (``--impl peft``), or both (``--impl both``). ``--rank r`` is the budget of rank-r
   LoRA on every adapted layer. Learning rates: the model's defaults
   (:data:`finetune.tasks.DEFAULTS`) except the stated choices of :data:`LR_SCALE`
   (VeRA: 10x the adapter rate, as its paper's learning rates are about ten times
   LoRA's), and ``--lr-set method=LR``;
2. **runs what is missing**: :func:`run_one` trains one configuration into its run
   folder (:mod:`finetune.runs`); finished runs (``run.json``) are never recomputed; a
   run that fails (diverges, or raises) is written as ``failed.json``, reported, and
   retried by the next invocation, the others still run, and the exit status is 1.
   :func:`execute` maps :func:`run_one` over the configurations with any ``map``-like
   function (the builtin by default: an executor plugs in there). Ctrl-C keeps every
   finished run and the current run's checkpoint (exit 130);
3. **compares** (:func:`compare_rows`): per row, the metric (mean ± sd over seeds), the
   trainable parameters, step time and peak step memory relative to our LoRA (means
   over seeds; the runs ran at different times on a shared machine, so the time ratios
   are indicative: ``python -m finetune.bench`` measures them in one run), the
   numerical and effective rank of the learned ΔW, its cosine similarity and top-k
   singular-subspace overlap with full fine-tuning's ΔW (same seed; for the full row,
   another seed's full fine-tuning: the reproducibility ceiling), and the relative
   error with which the same method at the same budget *reconstructs* full
   fine-tuning's ΔW (:func:`finetune.analysis.reconstruction_errors` on the first
   seed's full run, cached); all means over layers (:mod:`finetune.analysis`). Then
   Spearman's ρ across our methods between "reconstructs full FT's ΔW better" (lower
   error) and "fine-tunes better" (the metric), with its p-value and n;
4. **writes**, beside the runs (``<out>/<model>/<task>/compare-r<R>-<steps>steps``):
   the table (``.txt``), ``.csv``, ``.json`` and a figure (``.png``: the metric against
   trainable parameters and against peak memory, the Pareto views, and the learning
   curves), each atomically.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import cli
import theory
from cli import executor
from cli.main import first_line

from . import analysis as AN
from . import runs as R
from . import tasks as T
from .train import Diverged, RunConfig

#: every adapter of the registry
ALL = tuple(m for m in theory.available() if m != "full")
#: stated learning-rate choices: a multiple of the model's adapter learning rate.
#: VeRA trains only two scaling vectors per layer; its paper (Kopiczko et al., 2024,
#: Table 8) uses learning rates about ten times LoRA's.
LR_SCALE = {"vera": 10.0}
IMPL_CHOICES = ("ours", "peft", "both")
ANALYSIS_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Row:
    method: str
    impl: str = "ours"

    @property
    def label(self) -> str:
        return f"{self.method} (PEFT)" if self.impl == "peft" else self.method


# --------------------------------------------------------------------------- #
# planning
# --------------------------------------------------------------------------- #
def parse_methods(spec: str | Sequence[str]) -> list[str]:
    """``all`` or a comma list of registry names (``full`` is always included anyway)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [s.strip() for s in items if s and s.strip()]
    if not items:
        raise ValueError("--methods: no method given")
    out: list[str] = []
    for s in items:
        names = ALL if s == "all" else (("full",) if s == "full" else (theory.get_method(s).name,))
        out += [n for n in names if n not in out]
    return out


def plan_rows(methods: Sequence[str], impl: str, peft_ok: Callable[[str], bool] | None = None,
              explicit: bool = True) -> tuple[list[Row], list[str]]:
    """The rows: full and our LoRA first (and PEFT's LoRA with ``impl`` peft or both),
    then each method (ours, PEFT's or both).

    ``peft_ok(method)``: whether PEFT's tuner can run on this model's layers; a PEFT
    row it cannot run is an error when the method was named (``explicit``), else it is
    left out with a note."""
    from .reference import PEFT_METHODS

    if impl not in IMPL_CHOICES:
        raise ValueError(f"--impl {impl!r} unknown; known: {', '.join(IMPL_CHOICES)}")
    rows, notes = [Row("full"), Row("lora")], []
    if impl in ("peft", "both"):  # PEFT's LoRA: the reference of the reference rows
        rows.append(Row("lora", "peft"))
    for m in methods:
        if m == "full":
            continue
        if impl in ("ours", "both") and Row(m) not in rows:
            rows.append(Row(m))
        if impl in ("peft", "both"):
            if m not in PEFT_METHODS:
                if explicit and impl == "peft":
                    raise ValueError(f"--impl peft: PEFT has no {m!r}; it has "
                                     f"{', '.join(PEFT_METHODS)}")
                continue
            if Row(m, "peft") in rows:
                continue
            if peft_ok is not None and not peft_ok(m):
                if explicit:
                    raise ValueError(f"--impl {impl}: PEFT's {m} cannot wrap this model's "
                                     "layers (it takes only nn.Linear)")
                notes.append(f"PEFT's {m} left out: it takes only nn.Linear layers")
                continue
            rows.append(Row(m, "peft"))
    return rows, notes


def row_lr(row: Row, model: str, lr: float | None, lr_for: dict[str, float]) -> float | None:
    """The learning rate of a row (None: the trainer's default for the model and method)."""
    if row.method in lr_for:
        return float(lr_for[row.method])
    if row.method == "full":
        return None
    if lr is not None:
        return float(lr)
    scale = LR_SCALE.get(row.method)
    return None if scale is None else T.defaults(model).lr * scale


def plan(model: str, task: str, rows: Sequence[Row], *, rank: int, seeds: Iterable[int],
         steps: int | None = None, batch: int | None = None, eval_every: int | None = None,
         lr: float | None = None, lr_for: dict[str, float] | None = None,
         targets: Sequence[str] | None = None, device: str = "cpu") -> list[RunConfig]:
    """One RunConfig per row and seed, seed by seed (full fine-tuning first in each), so a
    partial comparison has every method at the first seed. Full fine-tuning keeps the
    default ``rank`` field (it has no rank), so one full run serves every ``--rank``."""
    lr_for = dict(lr_for or {})
    out = []
    for s in seeds:
        for row in rows:
            out.append(RunConfig(
                model=model, task=task, method=row.method, impl=row.impl,
                rank=RunConfig.rank if row.method == "full" else int(rank),
                targets=tuple(targets) if targets else None, steps=steps, batch=batch,
                lr=row_lr(row, model, lr, lr_for), eval_every=eval_every, seed=int(s),
                device=device).resolved())
    return out


# --------------------------------------------------------------------------- #
# running: one configuration, and a map over many
# --------------------------------------------------------------------------- #
def run_one(cfg: RunConfig, out: str | Path, progress: bool = False) -> dict[str, Any]:
    """Train ``cfg`` into its run folder under ``out`` unless it is finished there.

    The unit of work of a comparison, and all an executor needs: a picklable function
    of one config whose result is small, while every output goes to the run folder.
    Returns ``{"key", "dir", "status": "finished" | "trained" | "failed", "reason"}``. A
    failure (divergence, or any exception from the run) writes ``failed.json`` with the
    reason and the traceback, and is returned, not raised; Ctrl-C is raised (the
    trainer has written a checkpoint)."""
    from .train import train

    d = R.run_dir(Path(out), cfg)
    res = {"key": cfg.key, "name": cfg.name, "dir": str(d), "method": cfg.method,
           "impl": cfg.impl, "seed": cfg.seed, "status": "finished", "reason": None}
    if R.is_finished(d):
        return res
    d.mkdir(parents=True, exist_ok=True)
    try:
        rec = train(cfg, run_dir=d, progress=progress, return_model=True)
    except Diverged as e:
        R.record_failure(d, cfg, str(e))
        return {**res, "status": "failed", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 (one broken run must not stop the others)
        reason = f"{type(e).__name__}: {first_line(e)}"
        p = R.record_failure(d, cfg, reason)
        cli.write_json(p, {**json.loads(p.read_text()), "traceback": traceback.format_exc()})
        return {**res, "status": "failed", "reason": reason}
    R.save_run(d, rec, rec.get("model"))
    return {**res, "status": "trained"}


def execute(configs: Sequence[RunConfig], out: str | Path, *, progress: bool = False,
            mapper: Callable = map) -> list[dict[str, Any]]:
    """Run every unfinished config (``mapper(run_one, configs)``: the builtin ``map`` runs
    them here one after another; any map-like executor can replace it). Returns the
    outcome of every config, finished ones included, in order."""
    from tqdm.auto import tqdm

    out = Path(out)
    todo = [c for c in configs if not R.is_finished(R.run_dir(out, c))]
    done = {c.key: {"key": c.key, "name": c.name, "dir": str(R.run_dir(out, c)),
                    "method": c.method, "impl": c.impl, "seed": c.seed,
                    "status": "finished", "reason": None}
            for c in configs if c not in todo}
    work = functools.partial(run_one, out=str(out), progress=progress)
    bar = tqdm(total=len(todo), desc="runs", unit="run", disable=not progress or not todo)
    try:
        for res in mapper(work, todo):
            done[res["key"]] = res
            bar.update(1)
            if res["status"] == "failed" and progress:
                tqdm.write(f"run failed: {res['name']}: {res['reason']}", file=sys.stderr)
    finally:
        bar.close()
    return [done[c.key] for c in configs if c.key in done]


def executor_mapper(ex, out: str | Path) -> Callable:
    """A ``mapper`` for :func:`execute` from a :mod:`cli.executor` executor: each run is
    one task (on a Ray cluster, one task per run on whichever node has the CPUs/GPUs it
    asks for), results come back as they finish, and a task that died after its retries
    (a lost node, an out-of-memory kill) is recorded in the run's ``failed.json`` by the
    driver and returned as failed, so the next invocation retries it. On a cluster
    ``--out`` must be a folder every node sees (a shared file system): the runs write
    their own folders there."""
    from cli.executor import TaskFailed

    def mapper(fn, todo):
        for cfg, res in ex.map(fn, todo):
            if isinstance(res, TaskFailed):
                d = R.run_dir(Path(out), cfg)
                d.mkdir(parents=True, exist_ok=True)
                R.record_failure(d, cfg, res.reason)
                res = {"key": cfg.key, "name": cfg.name, "dir": str(d), "method": cfg.method,
                       "impl": cfg.impl, "seed": cfg.seed, "status": "failed",
                       "reason": res.reason}
            yield res

    return mapper


# --------------------------------------------------------------------------- #
# comparing finished runs
# --------------------------------------------------------------------------- #
def run_measures(d: Path, deltas, reference, reference_key: str | None, k: int) -> dict:
    """Per-layer measures of one run against full fine-tuning's deltas, cached in the run
    folder (``analysis.json``, recomputed when the reference or k changes). ``deltas`` and
    ``reference`` may be zero-argument callables, called only when the cache is stale: a
    run kept without its deltas (:mod:`finetune.archive`) still reports from its cache."""
    p = Path(d) / "analysis.json"
    try:
        blob = json.loads(p.read_text())
        if (blob.get("version") == ANALYSIS_VERSION and blob.get("reference") == reference_key
                and blob.get("k") == k):
            return blob["layers"]
    except (OSError, ValueError, AttributeError):
        pass
    deltas = deltas() if callable(deltas) else deltas
    reference = reference() if callable(reference) else reference
    layers = AN.layer_measures(deltas, reference, k)
    cli.write_json(p, {"version": ANALYSIS_VERSION, "reference": reference_key, "k": k,
                       "layers": layers})
    return layers


def reconstruction_cached(cache_dir: Path, full_key: str, method: str, rank: int, target, *,
                          solver: str, steps: int | None, layers=None) -> dict[str, float]:
    """:func:`finetune.analysis.reconstruction_errors`, cached as JSON per (full run,
    method, rank, solver, steps). ``target`` may be a zero-argument callable (called only
    on a cache miss) when ``layers`` names its layers."""
    p = Path(cache_dir) / f"{full_key}-{method}-r{rank}-{solver}-{steps or 'default'}.json"
    names = set(layers) if layers is not None else set(target)
    try:
        blob = json.loads(p.read_text())
        if set(blob["errors"]) == names:
            return {k: (math.nan if v is None else float(v)) for k, v in blob["errors"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    target = target() if callable(target) else target
    errs = AN.reconstruction_errors(method, target, rank, solver=solver, steps=steps)
    cli.write_json(p, {"full_run": full_key, "method": method, "rank": rank, "solver": solver,
                       "steps": steps, "errors": errs})
    return errs


def _mean(xs) -> float:
    xs = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    return float(np.mean(xs)) if xs else math.nan


def _sd(xs) -> float:
    xs = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    return float(np.std(xs, ddof=1)) if len(xs) > 1 else math.nan


def _config_text(rec: dict) -> str:
    """The distinct layer configurations, in layer order, without false flags."""
    seen = list(dict.fromkeys(rec.get("layer_configs", {}).values()))
    short = [",".join(f for f in c.split(",") if not f.endswith("=False"))
             .replace("decompose_both=True", "both").replace("decompose_factor=", "factor=")
             for c in seen]
    return " | ".join(short) or "-"


def compare_rows(configs: Sequence[RunConfig], out: str | Path, *, k: int | None = None,
                 fit: bool = True, fit_solver: str = "auto", fit_steps: int | None = None,
                 progress: bool = False) -> dict[str, Any]:
    """The comparison of the finished runs of ``configs`` (one model and task): rows,
    the rank correlations, notes. Runs that are not finished count as missing/failed."""
    from tqdm.auto import tqdm

    out = Path(out)
    if not configs:
        raise ValueError("nothing to compare")
    model, task = configs[0].model, configs[0].task
    rank = next((c.rank for c in configs if c.method != "full"), configs[0].rank)
    k = int(k or rank)
    rows_order: list[Row] = list(dict.fromkeys(Row(c.method, c.impl) for c in configs))
    runs: dict[Row, list[tuple[RunConfig, dict | None, str]]] = {r: [] for r in rows_order}
    for c in configs:
        d = R.run_dir(out, c)
        if R.is_finished(d):
            runs[Row(c.method, c.impl)].append((c, R.load_record(d), "finished"))
        else:
            status = "failed" if (d / "failed.json").is_file() else "missing"
            runs[Row(c.method, c.impl)].append((c, None, status))
    full = {c.seed: (rec, R.run_dir(out, c)) for c, rec, _ in runs[Row("full")] if rec}
    # full FT's deltas per seed, loaded on first use: cached measures and fits need none
    full_deltas = functools.cache(lambda seed: R.load_deltas(full[seed][1]))

    full_seeds = sorted(full)
    meta: dict[str, Any] = {"model": model, "task": task, "rank": rank, "k": k}
    any_rec = next((rec for rs in runs.values() for _, rec, _ in rs if rec), None)
    if any_rec is not None:
        meta.update(metric=any_rec["metric_name"], higher_is_better=any_rec["higher_is_better"],
                    steps=any_rec["config"]["steps"], batch=any_rec["config"]["batch"],
                    targets=any_rec["config"]["targets"], task_info=any_rec["task"])
    notes: list[str] = []

    # per run: ranks, alignment (cached in each run folder)
    n_work = sum(1 for rs in runs.values() for _, rec, _ in rs if rec)
    bar = tqdm(total=n_work, desc="measures", unit="run", disable=not progress, leave=False)
    measures: dict[str, dict] = {}
    for row, rs in runs.items():
        for c, rec, _ in rs:
            if rec is None:
                continue
            if row.method == "full":
                others = [s for s in full_seeds if s != c.seed]
                ref_seed = others[0] if others else None
            else:
                ref_seed = c.seed if c.seed in full else (full_seeds[0] if full_seeds else None)
            ref = (functools.partial(full_deltas, ref_seed) if ref_seed is not None
                   else None)
            ref_key = full[ref_seed][0]["key"] if ref is not None else None
            measures[c.key] = run_measures(Path(rec["dir"]),
                                           functools.partial(R.load_deltas, rec["dir"]), ref,
                                           ref_key, k)
            bar.update(1)
    bar.close()

    # reconstruction of full fine-tuning's ΔW (first seed's), by each method at the budget
    recon: dict[str, float] = {}
    if fit and full_seeds:
        s0 = full_seeds[0]
        layers = list(measures[full[s0][0]["key"]])
        cache = out / model / task / "reconstruction"
        methods = list(dict.fromkeys(r.method for r in rows_order))
        bar = tqdm(methods, desc="reconstruction", unit="method", disable=not progress,
                   leave=False)
        for m in bar:
            errs = reconstruction_cached(cache, full[s0][0]["key"], m, rank,
                                         functools.partial(full_deltas, s0), layers=layers,
                                         solver=fit_solver, steps=fit_steps)
            recon[m] = _mean(errs.values())
        meta["reconstruction_of"] = f"full fine-tuning, seed {s0} ({len(layers)} layers)"

    lora_recs = [rec for _, rec, _ in runs.get(Row("lora"), []) if rec]
    lora_time = _mean(r["step_seconds_median"] for r in lora_recs)
    lora_mem = _mean(r["peak_step_bytes"] for r in lora_recs)
    rows = []
    for row in rows_order:
        rs = runs[row]
        recs = [rec for _, rec, _ in rs if rec]
        ms = [measures[c.key] for c, rec, _ in rs if rec]
        out_row: dict[str, Any] = {
            "method": row.method, "impl": row.impl, "label": row.label,
            "seeds": [c.seed for c, rec, _ in rs if rec],
            "failed": [c.seed for c, _, st in rs if st == "failed"],
            "missing": [c.seed for c, _, st in rs if st == "missing"],
            "lr": rs[0][0].lr if rs else None,
        }
        if recs:
            metric = [r["metric"] for r in recs]
            out_row.update(
                config="full" if row.method == "full" else _config_text(recs[0]),
                trainable_params=int(recs[0]["trainable_params"]),
                metric_mean=_mean(metric), metric_sd=_sd(metric), metric_values=metric,
                metric_before=_mean(r["metric_before"] for r in recs),
                final_train_loss=_mean(r["final_train_loss"] for r in recs),
                step_seconds=_mean(r["step_seconds_median"] for r in recs),
                peak_step_bytes=_mean(r["peak_step_bytes"] for r in recs),
                train_seconds=_mean(r["train_seconds"] for r in recs),
                numerical_rank=_mean(AN.mean_over_layers(m, "numerical_rank") for m in ms),
                effective_rank=_mean(AN.mean_over_layers(m, "effective_rank") for m in ms),
                cosine=_mean(AN.mean_over_layers(m, "cosine") for m in ms),
                overlap=_mean(AN.mean_over_layers(m, "overlap") for m in ms),
                forgetting=_mean(r.get("forgetting") for r in recs),
                train_loss_eval=_mean(r["final_eval"].get("train_loss") for r in recs),
                runs=[r["dir"] for r in recs],
            )
            out_row["time_vs_lora"] = out_row["step_seconds"] / lora_time if lora_time else math.nan
            out_row["memory_vs_lora"] = (out_row["peak_step_bytes"] / lora_mem
                                         if lora_mem else math.nan)
            out_row["reconstruction_error"] = recon.get(row.method, math.nan)
        rows.append(out_row)

    ours = [r for r in rows if r["impl"] == "ours" and r["method"] != "full"
            and "metric_mean" in r]
    sign = 1.0 if meta.get("higher_is_better", True) else -1.0
    corr = {
        "reconstruction_vs_metric": AN.spearman([-r["reconstruction_error"] for r in ours],
                                                [sign * r["metric_mean"] for r in ours]),
        "alignment_vs_metric": AN.spearman([r["cosine"] for r in ours],
                                           [sign * r["metric_mean"] for r in ours]),
    }
    one_rank = [r["method"] for r in rows if r["impl"] == "peft"
                and r["method"] in ("lokr", "miss", "vera")]
    if one_rank:
        notes.append(f"PEFT's {', '.join(one_rank)}: one rank for all layers, so the parameter "
                     "count can differ from ours (the params column is PEFT's own)")
    d = T.defaults(model)
    own = [f"{r['label']} {r['lr']:g}" for r in rows if r.get("lr") is not None
           and r["lr"] != (d.full_lr if r["method"] == "full" else d.lr)]
    notes.append(f"learning rates: adapters {d.lr:g}, full fine-tuning {d.full_lr:g} (the "
                 f"model's defaults)" + (f"; set per row: {', '.join(own)} (VeRA "
                                         f"{LR_SCALE['vera']:g}x: a stated choice)" if own else ""))
    if any(r["impl"] == "peft" for r in rows):
        notes.append("recon err of a PEFT row: the fit of our parameterization of the same method")
    if rows and full_seeds:
        notes.append(f"cos / overlap: against full fine-tuning of the same seed (the full "
                     f"row: of another seed); overlap of random {k}-dim subspaces ≈ k/d")
    return {**meta, "rows": rows, "correlation": corr, "notes": notes,
            "lora_step_seconds": lora_time, "lora_peak_step_bytes": lora_mem}


# --------------------------------------------------------------------------- #
# the table, the files, the figure
# --------------------------------------------------------------------------- #
def _f(x, spec: str = ".3f", none: str = "-") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return format(x, spec)


def format_table(comp: dict[str, Any]) -> str:
    metric = comp.get("metric", "metric")
    causal = any(math.isfinite(r.get("forgetting", math.nan)) for r in comp["rows"])
    width = 36  # the config column (the CSV and JSON have it whole)
    head = ["method", "config", "params", f"{metric} mean ± sd", "n", "train loss", "train s",
            "time×", "mem×",
            "num rank", "eff rank", "cos(full)", f"overlap@{comp['k']}", "recon err"]
    if causal:
        head.append("forgetting")
    lines = []
    for r in comp["rows"]:
        if "metric_mean" not in r:
            st = ("failed " + ",".join(map(str, r["failed"]))) if r["failed"] else "not run"
            cells = [r["label"], "-", "-", st, "0"] + ["-"] * (len(head) - 5)
            lines.append(cells)
            continue
        n = len(r["seeds"])
        fail = f" ({len(r['failed'])} failed)" if r["failed"] else ""
        conf = r["config"] if len(r["config"]) <= width else r["config"][:width - 1] + "…"
        tl = r["train_loss_eval"] if math.isfinite(r["train_loss_eval"]) else r["final_train_loss"]
        cells = [r["label"], conf, f"{r['trainable_params']:,}",
                 f"{_f(r['metric_mean'], '.4f')} ± {_f(r['metric_sd'], '.4f')}", f"{n}{fail}",
                 _f(tl, ".4f"), _f(r["train_seconds"], ".0f"), _f(r["time_vs_lora"], ".2f"), _f(r["memory_vs_lora"], ".2f"),
                 _f(r["numerical_rank"], ".1f"), _f(r["effective_rank"], ".1f"),
                 _f(r["cosine"], ".3f"), _f(r["overlap"], ".3f"),
                 _f(r["reconstruction_error"], ".4f")]
        if causal:
            cells.append(_f(r["forgetting"], "+.4f"))
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(head)]
    left = {0, 1}

    def fmt(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    info = comp.get("task_info", {})
    better = "higher" if comp.get("higher_is_better", True) else "lower"
    title = (f"{comp['model']}/{comp['task']}: budget of rank-{comp['rank']} LoRA per adapted "
             f"layer; {comp.get('steps', '?')} steps x batch {comp.get('batch', '?')}; "
             f"{metric} ({better} is better) on {info.get('n_eval', '?')} held-out items")
    out = [title, fmt(head), fmt(["-" * w for w in widths])]
    out += [fmt(c) for c in lines]
    c = comp["correlation"]["reconstruction_vs_metric"]
    a = comp["correlation"]["alignment_vs_metric"]
    out.append("")
    out.append(f"Spearman ρ across our methods, 'reconstructs full FT's ΔW better' vs "
               f"'fine-tunes better': {_f(c['rho'], '+.3f')} (p = {_f(c['p'], '.3g')}, "
               f"n = {c['n']})")
    out.append(f"Spearman ρ, 'aligned with full FT's ΔW (cos)' vs 'fine-tunes better': "
               f"{_f(a['rho'], '+.3f')} (p = {_f(a['p'], '.3g')}, n = {a['n']})")
    lt, lm = comp.get("lora_step_seconds"), comp.get("lora_peak_step_bytes")
    if lt and math.isfinite(lt):
        out.append(f"time× and mem×: step time and peak step memory over our LoRA's "
                   f"({lt:.3f} s, {cli.format_bytes(lm)}); the runs ran at different times on "
                   "a shared machine: `python -m finetune.bench` measures time in one run")
    out.append("train s: seconds of training steps per run (evaluations excluded), mean over "
               "seeds")
    out.append("train loss: on the whole training set at the end where the task measures it "
               "(digits), else the mean of the last 10 batches")
    out.append("num/eff rank: numerical and entropy effective rank of the learned ΔW; recon "
               "err: relative error of the best fit of the same method at the same budget to "
               f"full FT's ΔW ({comp.get('reconstruction_of', 'not computed')}); all means "
               "over the adapted layers, then over seeds")
    out += [f"note: {n}" for n in comp["notes"]]
    return "\n".join(out)


def csv_rows(comp: dict[str, Any]) -> list[dict[str, Any]]:
    keys = ["method", "impl", "config", "lr", "trainable_params", "metric_mean", "metric_sd",
            "metric_values", "metric_before", "final_train_loss", "train_loss_eval",
            "step_seconds", "time_vs_lora", "peak_step_bytes", "memory_vs_lora",
            "train_seconds", "numerical_rank", "effective_rank", "cosine", "overlap",
            "reconstruction_error", "forgetting", "seeds", "failed", "missing"]
    return [{k: r.get(k) for k in keys} for r in comp["rows"]]


def figure(comp: dict[str, Any], path: Path) -> Path:
    """Metric against trainable parameters and against peak step memory (mean ± sd over
    seeds; the Pareto views), and the learning curves (training loss, a moving average
    of 10 steps, mean over seeds; held-out metric at each evaluation)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in comp["rows"] if "metric_mean" in r]
    metric = comp.get("metric", "metric")
    higher = comp.get("higher_is_better", True)
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    cmap = plt.get_cmap("tab20")
    colors = {r["label"]: cmap(i % 20) for i, r in enumerate(rows)}
    for ax, xkey, xlabel in ((axes[0, 0], "trainable_params", "trainable parameters"),
                             (axes[0, 1], "peak_step_bytes", "peak step memory (MB)")):
        for r in rows:
            x = r[xkey] / (2**20 if xkey == "peak_step_bytes" else 1)
            sd = r["metric_sd"] if math.isfinite(r["metric_sd"]) else 0.0
            ax.errorbar([x], [r["metric_mean"]], yerr=[sd], fmt="s" if r["impl"] == "peft"
                        else ("*" if r["method"] == "full" else "o"), color=colors[r["label"]],
                        ms=9 if r["method"] == "full" else 6, capsize=3)
            ax.annotate(r["label"], (x, r["metric_mean"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        pts = sorted((r[xkey] / (2**20 if xkey == "peak_step_bytes" else 1), r["metric_mean"])
                     for r in rows)
        front, best = [], None
        for x, y in pts:  # the Pareto frontier: no other row is cheaper and better
            if best is None or (y > best if higher else y < best):
                front.append((x, y))
                best = y
        ax.plot(*zip(*front), ":", color="0.4", lw=1, zorder=0, label="Pareto frontier")
        ax.legend(fontsize=7, loc="lower right" if higher else "upper right")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{metric} (mean ± sd over seeds)")
        ax.grid(alpha=0.3)
    axes[0, 0].set_title(f"{comp['model']}/{comp['task']}: {metric} against trainable parameters")
    axes[0, 1].set_title("against peak step memory")
    lo, hi = math.inf, -math.inf
    for r in rows:
        curves, evals = [], []
        for d in r["runs"]:
            rec = json.loads((Path(d) / "run.json").read_text())
            curves.append(np.asarray(rec["losses"], dtype=float))
            evals.append([(e["step"], e[metric]) for e in rec["evals"]])
        n = min(len(c) for c in curves)
        mean = np.mean([c[:n] for c in curves], axis=0)
        w = min(10, n)
        smooth = np.convolve(mean, np.ones(w) / w, mode="valid")
        ls = "--" if r["impl"] == "peft" else "-"
        lw = 2.2 if r["method"] == "full" else 1.2
        axes[1, 0].plot(np.arange(w, n + 1), smooth, ls + ("o" if len(smooth) < 3 else ""),
                        color=colors[r["label"]], lw=lw, label=r["label"])
        lo, hi = min(lo, float(smooth.min())), max(hi, float(smooth.max()))
        steps = [s for s, _ in evals[0]]
        vals = np.mean([[v for _, v in e[:len(steps)]] for e in evals], axis=0)
        axes[1, 1].plot(steps, vals, ls + "o", color=colors[r["label"]], lw=lw, ms=3,
                        label=r["label"])
    axes[1, 0].set_xlabel("step")
    axes[1, 0].set_ylabel("training loss (moving average of 10 steps)")
    if lo > 0 and hi / lo > 10:
        axes[1, 0].set_yscale("log")
    axes[1, 0].set_title("learning curves")
    axes[1, 1].set_xlabel("step")
    axes[1, 1].set_ylabel(f"held-out {metric}")
    axes[1, 1].set_title("held-out metric during training")
    axes[1, 0].legend(fontsize=7, ncol=2)
    for ax in axes[1]:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with cli.atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=110)
    plt.close(fig)
    return path


def write_outputs(comp: dict[str, Any], stem: Path, *, with_figure: bool = True) -> list[Path]:
    """``stem``.txt / .csv / .json (and .png), each written atomically."""
    stem = Path(stem)
    paths = [cli.atomic_write(stem.with_suffix(".txt"), format_table(comp) + "\n"),
             cli.write_csv(stem.with_suffix(".csv"), csv_rows(comp)),
             cli.write_json(stem.with_suffix(".json"), comp)]
    if with_figure and any("metric_mean" in r for r in comp["rows"]):
        paths.append(figure(comp, stem.with_suffix(".png")))
    return paths


#: a comparison's float fields that strict JSON writes as null when NaN
_FLOATS = ("metric_mean", "metric_sd", "metric_before", "final_train_loss", "train_loss_eval",
           "step_seconds", "time_vs_lora", "peak_step_bytes", "memory_vs_lora", "train_seconds",
           "numerical_rank", "effective_rank", "cosine", "overlap", "reconstruction_error",
           "forgetting")


def read_comparison(path: Path) -> dict[str, Any]:
    """A comparison's JSON (``write_outputs``) read back as ``compare_rows`` made it: the
    NaNs that strict JSON keeps as null are NaN again, so ``format_table`` and
    ``figure`` take it as they take a fresh one."""
    comp = json.loads(Path(path).read_text())
    for r in comp["rows"]:
        for k in _FLOATS:
            if k in r and r[k] is None:
                r[k] = math.nan
    for c in comp.get("correlation", {}).values():
        for k in ("rho", "p"):
            if c.get(k) is None:
                c[k] = math.nan
    return comp


def output_stem(out: Path, model: str, task: str, rank: int, steps: int) -> Path:
    return Path(out) / model / task / f"compare-r{rank}-{steps}steps"


# --------------------------------------------------------------------------- #
# the command
# --------------------------------------------------------------------------- #
def build_parser() -> cli.Parser:
    ap = cli.Parser(prog="python -m finetune.compare", description=__doc__)
    ap.add_argument("--model", type=cli.str_list, default=["tiny-gpt2"],
                    help=f"comma list of {' | '.join(T.MODELS)} (default tiny-gpt2)")
    ap.add_argument("--task", type=cli.str_list,
                    help="comma list of tasks (default movie; digits for mlp)")
    ap.add_argument("--methods", default="all",
                    help="all or a comma list of registry methods (full and lora are always run)")
    ap.add_argument("--impl", default="ours", choices=IMPL_CHOICES,
                    help="our adapters, PEFT's tuners (the methods PEFT has), or both")
    ap.add_argument("--rank", type=cli.positive_int, default=8,
                    help="budget of rank-r LoRA per adapted layer (default 8)")
    ap.add_argument("--seeds", type=cli.positive_int, default=1,
                    help="seeds 0..N-1 per method (default 1)")
    ap.add_argument("--steps", type=cli.positive_int, help="training steps (default: per model)")
    ap.add_argument("--batch", type=cli.positive_int, help="batch size (default: per model)")
    ap.add_argument("--eval-every", type=cli.positive_int, help="default: steps / 5")
    ap.add_argument("--lr", type=cli.positive_float,
                    help="learning rate of every adapter (default: per model, VeRA 10x)")
    ap.add_argument("--lr-set", action="append", metavar="METHOD=LR",
                    help="learning rate of one method (full too), repeatable")
    ap.add_argument("--targets", type=cli.str_list,
                    help="layers to adapt (default: the model's attention and FFN maps)")
    ap.add_argument("--k", type=cli.positive_int,
                    help="dimension of the compared singular subspaces (default: --rank)")
    ap.add_argument("--fit-solver", default="auto",
                    help="reconstruction solver for the recon column (default auto)")
    ap.add_argument("--fit-steps", type=cli.positive_int,
                    help="reconstruction iterations (default: the solver's)")
    ap.add_argument("--no-fit", action="store_true", help="leave out the reconstruction column")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: compare the runs that are finished")
    ap.add_argument("--out", type=Path, default=R.DEFAULT_OUT, help="runs folder (default runs)")
    ap.add_argument("--name", help="file name of the table, CSV, JSON and figure beside the runs "
                                   "(default compare-r<R>-<steps>steps)")
    ap.add_argument("--no-figure", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu | cuda[:N] (default cpu)")
    ap.add_argument("--threads", type=cli.positive_int, help="torch CPU threads")
    ap.add_argument("--no-progress", action="store_true")
    executor.add_arguments(ap)
    return ap


def _parse_lr_set(items: list[str] | None) -> dict[str, float]:
    out = {}
    for it in items or []:
        if "=" not in it:
            raise ValueError(f"--lr-set {it!r}: expected METHOD=LR")
        name, val = (s.strip() for s in it.split("=", 1))
        name = name if name == "full" else theory.get_method(name).name
        try:
            lr = float(val)
        except ValueError:
            raise ValueError(f"--lr-set {it!r}: {val!r} is not a number") from None
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"--lr-set {it!r}: the learning rate must be finite and > 0")
        out[name] = lr
    return out


@dataclasses.dataclass
class Job:
    model: str
    task: str
    configs: list[RunConfig]
    notes: list[str]


def _layers(model: str, task: str, targets) -> list:
    """The targeted modules of a fresh ``model`` (built once, for the checks)."""
    from . import adapters as A

    probe = T.get_task(model, task, seed=0)
    paths = A.match_layers(probe.model, targets or T.DEFAULT_TARGETS[model],
                           what=f"--model {model}")
    return [probe.model.get_submodule(p) for p in paths]


def _check_layers(mods: list, configs: Sequence[RunConfig]) -> None:
    """Every method's configuration fits every targeted layer (a rank too large: one
    line, before anything runs)."""
    from torch import nn

    from . import adapters as A

    shapes = {(int(w.shape[0]), int(w.shape[1])) if isinstance(mod, nn.Linear)
              else (int(w.shape[1]), int(w.shape[0])) for mod in mods for w in [mod.weight]}
    for c in configs:
        if c.method == "full":
            continue
        meth = theory.get_method(c.method)
        for m, n in sorted(shapes):
            A.layer_config(meth, m, n, c.rank, dict(c.overrides), where=c.method)


def prepare_jobs(args) -> list[Job]:
    """Validate everything and plan every (model, task): raises one-line errors."""
    from .run import estimate_bytes

    models = args.model
    methods = parse_methods(args.methods)
    explicit = args.methods.strip() != "all"
    lr_for = _parse_lr_set(args.lr_set)
    cli.check_device(args.device)
    cli.check_threads(args.threads)
    cli.check_writable_dir(args.out, "--out")
    if args.name is not None and (not args.name.strip() or "/" in args.name
                                  or args.name.startswith(".")):
        raise ValueError(f"--name {args.name!r}: give a plain file name (no folder, no dot first)")
    from reconstruction.fit import SOLVERS
    if args.fit_solver not in SOLVERS:
        raise ValueError(f"--fit-solver {args.fit_solver!r} unknown; known: {', '.join(SOLVERS)}")
    jobs = []
    for model in models:
        if model not in T.MODELS:
            raise ValueError(f"--model {model!r} unknown; known: {', '.join(T.MODELS)}")
        tasks = args.task or [("digits" if model == "mlp" else "movie")]
        for task in tasks:
            T.check_pair(model, task)
            jobs.append(Job(model, task, [], []))
    for job in jobs:
        if not args.report_only:
            T.check_available(job.model, job.task)
        mods = None if args.report_only else _layers(job.model, job.task, args.targets)
        peft_ok = None
        if mods is not None:
            from .reference import peft_supports
            peft_ok = functools.partial(lambda ms, m: peft_supports(m, ms), mods)
        rows, notes = plan_rows(methods, args.impl, peft_ok, explicit)
        job.notes = notes
        job.configs = plan(job.model, job.task, rows, rank=args.rank,
                           seeds=range(args.seeds), steps=args.steps, batch=args.batch,
                           eval_every=args.eval_every, lr=args.lr, lr_for=lr_for,
                           targets=args.targets, device=args.device)
        todo = [c for c in job.configs if not R.is_finished(R.run_dir(args.out, c))]
        if mods is not None:
            _check_layers(mods, job.configs)
        if todo and not args.report_only:
            cli.check_memory(max(estimate_bytes(c) for c in todo),
                             f"fine-tuning {job.model}", args.device)
    return jobs


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def work():
        jobs = prepare_jobs(args)
        ex = executor.from_args(args, device=args.device)  # checked before any run: exit 2
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        progress = not args.no_progress and sys.stderr.isatty()
        failed: list[dict] = []

        def report(job):
            comp = compare_rows(job.configs, args.out, k=args.k, fit=not args.no_fit,
                                fit_solver=args.fit_solver, fit_steps=args.fit_steps,
                                progress=progress)
            comp["notes"] = job.notes + comp["notes"]
            comp["command"] = "python -m finetune.compare " + " ".join(
                sys.argv[1:] if argv is None else argv)
            steps = job.configs[0].steps
            stem = output_stem(args.out, job.model, job.task, args.rank, steps)
            if args.name:
                stem = stem.with_name(args.name)
            paths = write_outputs(comp, stem, with_figure=not args.no_figure)
            print(format_table(comp))
            print(f"written: {', '.join(str(p) for p in paths)}\n")

        if ex.kind == "ray" and not args.report_only:
            print(ex.describe(), file=sys.stderr)
        with ex:
            for job in jobs:
                if not args.report_only:
                    results = execute(job.configs, args.out, progress=progress,
                                      mapper=executor_mapper(ex, args.out))
                    failed += [r for r in results if r["status"] == "failed"]
                report(job)
        if failed:
            names = ", ".join(f"{r['name']} ({r['reason']})" for r in failed[:3])
            more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
            raise cli.Failed(f"{len(failed)} run(s) failed: {names}{more}; their failed.json "
                             "says why; rerun to retry them")

    return cli.run(work, interrupted=(f"finished runs are kept under {args.out}; the "
                                      "current run's checkpoint too: rerun to resume"))


if __name__ == "__main__":
    raise SystemExit(main())
