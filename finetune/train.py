"""One training loop for every method: full fine-tuning, our adapters, PEFT's tuners.

    cfg = RunConfig(model="minilm", task="movie", method="abba", rank=8, seed=0)
    result = train(cfg, run_dir=Path("runs/x"))     # resumes from run_dir's checkpoint

The loop, the same for every method (so that the method is the only variable):

- the model and data of :func:`finetune.tasks.get_task`; for an adapter, the layers
  matched by ``targets`` are injected (:func:`finetune.adapters.inject`, or PEFT's
  tuner with ``impl="peft"``) and only their factors and the task head train; for
  ``method="full"`` every weight of the model trains;
- a seeded data order (epochs of a permutation of the training items), dropout from a
  seeded generator, AdamW with linear warm-up over ``warmup`` of the steps then linear
  (or cosine) decay to 0, the step rule of ``optimizer`` (:mod:`finetune.optim`);
- non-finite loss stops the run (:class:`Diverged`): nothing is reported as a result;
- held-out metric at step 0, every ``eval_every`` steps and at the end; for causal LMs
  the "forgetting" of the PEFT method-comparison suite: the change of held-out loss on
  another corpus from the base model to the fine-tuned one;
- step time (median over the steps, evaluation excluded) and the peak memory of one
  step (:mod:`finetune.memory`);
- a checkpoint (trainable tensors, optimizer, scheduler, data and dropout generator
  states, the curves so far) every ``checkpoint_every`` steps and on Ctrl-C, written
  atomically: an interrupted run resumes and ends with the same numbers as an
  uninterrupted one.

α-LoRA trains its α vectors as its authors' code does (El Firdoussi et al., α-LoRA,
``fine_tune_glue_2.py`` of github.com/elfirdoussilab1/alpha-LoRA): the adapter by
AdamW, α by its own Adam (lr ``alpha_lr`` = 5e-3, no schedule) on one batch of a
held-out slice of the training data every ``alpha_every`` = 10 steps (including step 0);
the slice (``alpha_fraction`` = 20 % of the training items) is not used by the
adapter's optimizer. One change, stated: the authors' loop takes the *first* batch of
their validation loader every time; here the held-out batches cycle through the
slice in a seeded order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import theory

from . import adapters as A
from . import tasks as T
from .guard import Diverged  # noqa: F401 (re-exported: the trainer's failure)
from .memory import resident_bytes, step_peak_bytes
from .optim import make_rule

SCHEDULES = ("linear", "cosine", "constant")
IMPLS = ("ours", "peft")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run's numbers (``key`` hashes it). ``None`` fields
    take the model's defaults (:data:`finetune.tasks.DEFAULTS`) in :meth:`resolved`."""

    model: str = "tiny-gpt2"
    task: str = "movie"
    method: str = "lora"
    impl: str = "ours"
    rank: int = 8
    targets: tuple[str, ...] | None = None
    overrides: tuple[tuple[str, Any], ...] = ()
    init: str = "paper"
    steps: int | None = None
    batch: int | None = None
    lr: float | None = None
    head_lr: float | None = None
    warmup: float = 0.1
    schedule: str = "linear"
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    optimizer_options: tuple[tuple[str, Any], ...] = ()
    seed: int = 0
    alpha_lr: float = 5e-3
    alpha_every: int = 10
    alpha_fraction: float = 0.2
    eval_every: int | None = None
    device: str = "cpu"

    def resolved(self) -> RunConfig:
        """Defaults filled in and names normalised; raises ValueError on bad values."""
        T.check_pair(self.model, self.task)
        d = T.defaults(self.model)
        method = self.method if self.method == "full" else theory.get_method(self.method).name
        if self.impl not in IMPLS:
            raise ValueError(f"--impl {self.impl!r} unknown; known: {', '.join(IMPLS)}")
        if self.impl == "peft":
            from .reference import PEFT_METHODS
            if method not in PEFT_METHODS:
                raise ValueError(f"--impl peft: PEFT has no {method!r}; "
                                 f"it has {', '.join(PEFT_METHODS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule {self.schedule!r} unknown; known: {', '.join(SCHEDULES)}")
        steps = d.steps if self.steps is None else int(self.steps)
        lr = (d.full_lr if method == "full" else d.lr) if self.lr is None else float(self.lr)
        head_lr = d.head_lr if self.head_lr is None else float(self.head_lr)
        for name, v in (("steps", steps), ("rank", self.rank), ("alpha_every", self.alpha_every),
                        ("batch", self.batch or d.batch)):
            if int(v) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        for name, v in (("lr", lr), ("alpha_lr", self.alpha_lr)):
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0, got {v}")
        if not (math.isfinite(head_lr) and head_lr >= 0):
            raise ValueError(f"--head-lr must be a finite number >= 0, got {head_lr}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"--warmup must be in [0, 1), got {self.warmup}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0 < self.alpha_fraction < 1:
            raise ValueError(f"--alpha-fraction must be in (0, 1), got {self.alpha_fraction}")
        eval_every = self.eval_every if self.eval_every is not None else max(1, steps // 5)
        if eval_every < 1:
            raise ValueError(f"--eval-every must be >= 1, got {eval_every}")
        targets = tuple(self.targets) if self.targets else tuple(T.DEFAULT_TARGETS[self.model])
        return dataclasses.replace(self, method=method, steps=steps, lr=lr, head_lr=head_lr,
                                   batch=int(self.batch or d.batch), targets=targets,
                                   eval_every=int(eval_every),
                                   overrides=tuple(sorted(self.overrides)),
                                   optimizer_options=tuple(sorted(self.optimizer_options)))

    def asdict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["overrides"] = dict(self.overrides)
        d["optimizer_options"] = dict(self.optimizer_options)
        d["targets"] = list(self.targets) if self.targets else None
        return d

    @property
    def key(self) -> str:
        """A hash of the resolved config (the device counts by its type only)."""
        d = self.resolved().asdict()
        d["device"] = torch.device(d["device"]).type
        blob = json.dumps(d, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        r = self.resolved()
        impl = "-peft" if r.impl == "peft" else ""
        rank = "" if r.method == "full" else f"-r{r.rank}"
        return f"{r.method}{impl}{rank}-{r.optimizer}-s{r.seed}-{self.key[:8]}"


# --------------------------------------------------------------------------- #
# building the trainable model
# --------------------------------------------------------------------------- #
def prepare(cfg: RunConfig, task: T.Task) -> dict[str, Any]:
    """Inject the method into ``task.model`` and return what the loop needs: parameter
    groups, the adapted layer paths and their configs, the α parameters."""
    model = task.model
    paths = A.match_layers(model, cfg.targets, what=f"--model {cfg.model}")
    head = [p for name in task.head for p in model.get_submodule(name).parameters()]
    alpha: list[nn.Parameter] = []
    layer_configs: dict[str, Any] = {}
    w0 = {}
    overrides = dict(cfg.overrides)
    if cfg.method == "full":
        if overrides:
            raise ValueError("--set has no effect on full fine-tuning")
        for p in model.parameters():
            p.requires_grad_(True)
        head_ids = {id(p) for p in head}
        body = [p for p in model.parameters() if id(p) not in head_ids]
        for path in paths:
            lay = model.get_submodule(path)
            w = lay.weight.detach()
            w0[path] = (w if isinstance(lay, nn.Linear) else w.mT).float().cpu().clone()
    elif cfg.impl == "ours":
        layers = A.inject(model, cfg.method, rank=cfg.rank, targets=cfg.targets,
                          overrides=overrides, init=cfg.init, seed=cfg.seed)
        layer_configs = {p: lay.config for p, lay in layers.items()}
        for p in head:
            p.requires_grad_(True)
        for lay in layers.values():
            if "alpha" in lay.factors and cfg.method == "alpha_lora":
                alpha.append(lay.factors["alpha"])
        alpha_ids = {id(p) for p in alpha}
        head_ids = {id(p) for p in head}
        body = [p for p in model.parameters()
                if p.requires_grad and id(p) not in alpha_ids and id(p) not in head_ids]
    else:
        from .reference import inject_peft
        method = theory.get_method(cfg.method)
        for path in paths:
            lay = model.get_submodule(path)
            w = lay.weight
            m, n = (w.shape[1], w.shape[0]) if not isinstance(lay, nn.Linear) else tuple(w.shape)
            layer_configs[path] = A.layer_config(method, int(m), int(n), cfg.rank, overrides, path)
        if cfg.init not in ("paper", "ours"):
            raise ValueError("--impl peft takes --init paper (PEFT's own) or ours (the "
                             "registry's paper init, the same factors as our run)")
        inject_peft(model, cfg.method, layer_configs, seed=cfg.seed)
        if cfg.init == "ours":
            from theory.base import make_generator

            from .reference import peft_layers, set_factors
            g = make_generator(cfg.seed)  # the same draws, in the same order, as inject()
            plays = peft_layers(model)
            for path in paths:
                lay = plays[path]
                w = lay.get_base_layer().weight.detach()
                w0 = (w if isinstance(lay.get_base_layer(), nn.Linear) else w.mT).contiguous()
                set_factors(lay, cfg.method, method.init(w0, layer_configs[path], generator=g))
        for p in head:
            p.requires_grad_(True)
        head_ids = {id(p) for p in head}
        body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": body, "lr": cfg.lr, "name": "body"}]
    if head and cfg.head_lr > 0:
        groups.append({"params": head, "lr": cfg.head_lr, "name": "head"})
    elif head:
        for p in head:
            p.requires_grad_(False)
    return {"groups": groups, "alpha": alpha, "paths": paths, "layer_configs": layer_configs,
            "w0": w0}


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def layer_deltas(cfg: RunConfig, model: nn.Module, prep: dict) -> dict[str, tuple]:
    """``{path: (ΔW, W0)}`` of the adapted (or, for full fine-tuning, the target) layers."""
    if cfg.method == "full":
        out = {}
        for path, w0 in prep["w0"].items():
            lay = model.get_submodule(path)
            w = lay.weight.detach()
            w = (w if isinstance(lay, nn.Linear) else w.mT).float().cpu()
            out[path] = (w - w0, w0)
        return out
    if cfg.impl == "peft":
        from .reference import peft_layer_deltas
        return peft_layer_deltas(model)
    return A.layer_deltas(model)


def _lr_lambda(cfg: RunConfig) -> Callable[[int], float]:
    n_warm = round(cfg.warmup * cfg.steps)

    def f(k: int) -> float:  # multiplier of the base lr at step k = 0, 1, ...
        if k < n_warm:
            return (k + 1) / (n_warm + 1)
        frac = (k - n_warm) / max(1, cfg.steps - n_warm)
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * frac))
        return max(0.0, 1 - frac)

    return f


class Order:
    """A seeded stream of index batches: epochs of permutations of ``items``."""

    def __init__(self, items: np.ndarray, batch: int, seed: list[int]):
        self.items, self.batch = np.asarray(items), int(batch)
        self.rng = np.random.default_rng(seed)
        self.perm, self.pos = self.rng.permutation(self.items), 0

    def next(self) -> np.ndarray:
        b = min(self.batch, len(self.items))
        if self.pos + b > len(self.perm):
            self.perm, self.pos = self.rng.permutation(self.items), 0
        out = self.perm[self.pos:self.pos + b]
        self.pos += b
        return out

    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "perm": self.perm.tolist(), "pos": self.pos}

    def load(self, s: dict) -> None:
        self.rng.bit_generator.state = s["rng"]
        self.perm, self.pos = np.asarray(s["perm"]), int(s["pos"])


def _finite(model_params: list[nn.Parameter]) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model_params)


# --------------------------------------------------------------------------- #
# the loop
# --------------------------------------------------------------------------- #
def train(cfg: RunConfig, *, run_dir: Path | None = None, task: T.Task | None = None,
          checkpoint_every: int = 50, progress: bool = False,
          on_step: Callable[[int, float], None] | None = None,
          return_model: bool = False) -> dict[str, Any]:
    """Train (or resume) one run; returns its record (metrics, curves, timings, deltas).

    ``run_dir``: where ``checkpoint.pt`` is kept (None: no checkpoints). ``on_step(step,
    loss)`` is called after every step (a test hook: raising KeyboardInterrupt there
    simulates Ctrl-C; a checkpoint is written first)."""
    import cli

    cfg = cfg.resolved()
    device = cli.check_device(cfg.device)
    t_wall = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.startswith("cuda") else []):
        torch.manual_seed(cfg.seed)
        if task is None:
            task = T.get_task(cfg.model, cfg.task, seed=cfg.seed, device=device,
                              alpha_fraction=cfg.alpha_fraction,
                              use_alpha_slice=cfg.method == "alpha_lora")
        model = task.model
        prep = prepare(cfg, task)
        opt = torch.optim.AdamW(prep["groups"], weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
        rule = make_rule(cfg.optimizer, opt, model, cfg.steps, **dict(cfg.optimizer_options))
        alpha_opt = torch.optim.Adam(prep["alpha"], lr=cfg.alpha_lr) if prep["alpha"] else None
        order = Order(task.train_idx, cfg.batch, [cfg.seed, 1])
        alpha_order = Order(task.alpha_idx, cfg.batch, [cfg.seed, 2]) if alpha_opt else None
        trainable = [p for g in prep["groups"] for p in g["params"]] + prep["alpha"]
        state = {"step": 0, "losses": [], "evals": [], "step_seconds": [], "alpha_losses": [],
                 "peak_step_bytes": None, "train_seconds": 0.0}
        ckpt = Path(run_dir) / "checkpoint.pt" if run_dir is not None else None
        resumed = False
        if ckpt is not None and ckpt.is_file():
            resumed = _load_checkpoint(ckpt, cfg, model, rule, sched, alpha_opt, order,
                                       alpha_order, state)
        if not resumed:
            model.train()
            ev0 = task.evaluate(model)
            state["evals"].append({"step": 0, **ev0})
            state["forget_before"] = task.forgetting_loss(model)
            state["metric_before"] = ev0[task.metric]

        def save_checkpoint():
            if ckpt is not None:
                _save_checkpoint(ckpt, cfg, model, rule, sched, alpha_opt, order, alpha_order,
                                 state, trainable)

        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=state["step"], desc=f"{cfg.model}/{cfg.task} "
                   f"{cfg.method}{'(peft)' if cfg.impl == 'peft' else ''}", unit="step",
                   disable=not progress, leave=False)
        model.train()
        try:
            while state["step"] < cfg.steps:
                k = state["step"]
                batch = task.batch(order.next())

                def closure():
                    loss = task.loss(model, batch)
                    loss.backward()
                    return loss.detach()

                t0 = time.perf_counter()
                if k == 1 and state["peak_step_bytes"] is None:  # measure one step's memory
                    peak, loss = step_peak_bytes(lambda: rule.step(closure, k), device)
                    state["peak_step_bytes"] = int(peak + resident_bytes(model, opt))
                    timed = False
                else:
                    loss = rule.step(closure, k)
                    timed = True
                sched.step()
                loss_v = float(loss)
                if device.startswith("cuda"):
                    torch.cuda.synchronize(device)
                dt = time.perf_counter() - t0
                if timed:
                    state["step_seconds"].append(dt)
                state["train_seconds"] += dt
                if not math.isfinite(loss_v):
                    raise Diverged(f"the training loss became {loss_v} at step {k + 1}")
                if alpha_opt is not None and k % cfg.alpha_every == 0:
                    state["alpha_losses"].append(_alpha_step(task, model, alpha_opt,
                                                             prep["alpha"], alpha_order))
                state["losses"].append(loss_v)
                state["step"] = k + 1
                if state["step"] % cfg.eval_every == 0 or state["step"] == cfg.steps:
                    if not _finite(trainable):
                        raise Diverged(f"the weights became non-finite by step {state['step']}")
                    state["evals"].append({"step": state["step"], **task.evaluate(model)})
                    model.train()
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(state['losses'][-10:]):.3f}")
                if ckpt is not None and state["step"] % checkpoint_every == 0 \
                        and state["step"] < cfg.steps:
                    save_checkpoint()
                if on_step is not None:
                    on_step(state["step"], loss_v)
        except KeyboardInterrupt:
            bar.close()
            save_checkpoint()
            raise
        finally:
            bar.close()
        final = state["evals"][-1]
        forget_after = task.forgetting_loss(model)
        deltas = layer_deltas(cfg, model, prep)
    steps_t = state["step_seconds"] or [math.nan]
    record = {
        "config": cfg.asdict(), "key": cfg.key, "name": cfg.name, "task": task.describe(),
        "method": cfg.method, "impl": cfg.impl,
        "trainable_params": int(trainable_count(model)),
        "adapted_layers": len(prep["paths"]) if cfg.method != "full" else 0,
        "layer_configs": {p: str(c) for p, c in prep["layer_configs"].items()},
        "metric_name": task.metric, "higher_is_better": task.higher_is_better,
        "metric": final[task.metric], "metric_before": state["metric_before"],
        "final_eval": final, "evals": state["evals"], "losses": state["losses"],
        "final_train_loss": float(np.mean(state["losses"][-10:])),
        "step_seconds_median": float(np.median(steps_t)),
        "train_seconds": state["train_seconds"],
        "peak_step_bytes": state["peak_step_bytes"],
        "wall_seconds_this_session": time.perf_counter() - t_wall,
        "resumed": resumed, "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if state.get("forget_before") is not None:
        record.update(forget_corpus=getattr(task, "forget_corpus", None),
                      forget_loss_before=state["forget_before"], forget_loss_after=forget_after,
                      forgetting=forget_after - state["forget_before"])
    if prep["alpha"]:
        record["alpha_losses"] = state["alpha_losses"]
        record["alpha"] = {}
        for p, lay in A.adapted_layers(model).items():
            a = lay.factors["alpha"].detach()
            record["alpha"][p] = {"mean": float(a.mean()), "std": float(a.std()),
                                  "min": float(a.min()), "max": float(a.max())}
    record["deltas"] = deltas
    if return_model:
        record["model"] = model
    return record


def _alpha_step(task, model, alpha_opt, alpha_params, order) -> float:
    """One Adam step of the α vectors on a held-out batch (the other gradients are
    cleared again by the next training step)."""
    idx = order.next()
    batch = task.alpha_batch(idx) if hasattr(task, "alpha_batch") else task.batch(idx)
    alpha_opt.zero_grad(set_to_none=True)
    loss = task.loss(model, batch)
    loss.backward()
    alpha_opt.step()
    for p in model.parameters():
        p.grad = None
    return float(loss.detach())


# --------------------------------------------------------------------------- #
# checkpoints
# --------------------------------------------------------------------------- #
def _save_checkpoint(path: Path, cfg, model, rule, sched, alpha_opt, order, alpha_order, state,
                     trainable) -> None:
    import cli

    names = {id(p): n for n, p in model.named_parameters()}
    blob = {
        "key": cfg.key, "step": state["step"],
        "params": {names[id(p)]: p.detach().cpu().clone() for p in trainable},
        "rule": rule.state_dict(), "sched": sched.state_dict(),
        "alpha_opt": alpha_opt.state_dict() if alpha_opt is not None else None,
        "order": order.state(), "alpha_order": alpha_order.state() if alpha_order else None,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "state": {k: v for k, v in state.items()},
    }
    with cli.atomic_path(path) as tmp:
        torch.save(blob, tmp)


def _load_checkpoint(path: Path, cfg, model, rule, sched, alpha_opt, order, alpha_order,
                     state) -> bool:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(blob, dict) or "key" not in blob:
            raise ValueError("not a checkpoint of finetune.run")
    except Exception as e:  # a torn or foreign file: say so, never resume from it
        raise ValueError(f"checkpoint {path} is unreadable ({type(e).__name__}); delete it "
                         "to start the run again") from None
    if blob["key"] != cfg.key:
        raise ValueError(f"checkpoint {path} belongs to another configuration; delete it or "
                         "use another --out")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in blob["params"].items():
            params[n].copy_(t)
    rule.load_state_dict(blob["rule"])
    sched.load_state_dict(blob["sched"])
    if alpha_opt is not None and blob["alpha_opt"] is not None:
        alpha_opt.load_state_dict(blob["alpha_opt"])
    order.load(blob["order"])
    if alpha_order is not None and blob["alpha_order"] is not None:
        alpha_order.load(blob["alpha_order"])
    torch.set_rng_state(blob["torch_rng"])
    if blob.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["cuda_rng"])
    state.update(blob["state"])
    return True
