"""Where runs live on disk and how they are read back.

One folder per run, ``<out>/<model>/<task>/<name>/`` (``name`` = method, rank,
optimizer, seed and a hash of the whole configuration, :attr:`RunConfig.name`):

- ``run.json``: the record of a *finished* run (config, trainable parameters, the
  metric and its value before training, loss and evaluation curves, step time, peak
  memory, wall time, forgetting, α-LoRA's α per layer). Its presence is what makes
  a run finished: it is never recomputed.
- ``deltas.safetensors``: the learned ``<layer>.delta`` = ΔW and ``<layer>.w0`` = W0 of
  every adapted layer (for full fine-tuning, of the target layers), (d_out, d_in),
  float32: ``python -m reconstruction.run --target <run>/deltas.safetensors`` reads it.
- ``adapter.safetensors``: the trained factors, ``<layer>.<factor>`` (ours) or PEFT's
  adapter state dict (``--impl peft``); metadata: method and per-layer configs.
- ``trainable.safetensors``: every other trained tensor, by its parameter name in the
  model (the task head of an adapter run; for full fine-tuning every weight of the
  model), so that :func:`load_model` rebuilds the trained model exactly.
- ``checkpoint.pt`` while the run is unfinished (resume point), ``failed.json`` after a
  divergence (the next run of the same command starts it again).

Every file is written atomically (:mod:`cli.files`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cli

DEFAULT_OUT = Path("runs")


def run_dir(out: Path, cfg) -> Path:
    r = cfg.resolved()
    return Path(out) / r.model / r.task / cfg.name


def is_finished(d: Path) -> bool:
    return (Path(d) / "run.json").is_file()


def load_record(d: Path) -> dict[str, Any]:
    """The ``run.json`` of a finished run (one-line ValueError if missing or corrupt)."""
    p = Path(d) / "run.json" if Path(d).is_dir() else Path(d)
    try:
        rec = json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: no finished run there (run.json missing)") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: not a readable run record ({type(e).__name__})") from None
    if not isinstance(rec, dict) or "config" not in rec or "metric" not in rec:
        raise ValueError(f"{p}: not a run record of finetune.run")
    rec["dir"] = str(p.parent)
    return rec


def load_deltas(d: Path) -> dict:
    """``{layer: (ΔW, W0)}`` of a finished run."""
    from finetune.tiny import load_deltas as _load

    p = Path(d) / "deltas.safetensors"
    if not p.is_file():
        if is_finished(d):
            raise FileNotFoundError(f"{p} not found: a record kept without its tensors "
                                    "(finetune.archive) reports only its cached measures; "
                                    "retrain the run to measure it anew")
        raise FileNotFoundError(f"{p} not found (an unfinished or foreign run?)")
    try:
        return _load(p)
    except Exception as e:  # safetensors raises its own error type on a corrupt file
        raise ValueError(f"{p}: not a readable deltas file ({type(e).__name__})") from None


def load_factors(d: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """``({layer: {factor: tensor}}, metadata)`` of a finished run's ``adapter.safetensors``."""
    from safetensors import safe_open

    p = Path(d) / "adapter.safetensors"
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found")
    try:
        out: dict[str, dict[str, Any]] = {}
        with safe_open(str(p), "pt") as f:
            meta = dict(f.metadata() or {})
            for k in f.keys():
                layer, factor = k.rsplit(".", 1)
                out.setdefault(layer, {})[factor] = f.get_tensor(k)
    except Exception as e:
        raise ValueError(f"{p}: not a readable adapter file ({type(e).__name__})") from None
    return out, meta


def find_runs(out: Path, model: str | None = None, task: str | None = None) -> list[dict]:
    """Records of every finished run under ``out`` (optionally one model / task)."""
    base = Path(out)
    pattern = f"{model or '*'}/{task or '*'}/*/run.json"
    recs = []
    for p in sorted(base.glob(pattern)):
        try:
            recs.append(load_record(p))
        except (ValueError, FileNotFoundError):
            continue
    return recs


def save_run(d: Path, record: dict, model=None) -> None:
    """Write a finished run: deltas, factors, then run.json last (it marks completion)."""
    from safetensors.torch import save_file

    from finetune.tiny import save_deltas

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    rec = {k: v for k, v in record.items() if k not in ("deltas", "model")}
    save_deltas(record["deltas"], d / "deltas.safetensors",
                metadata={"model": rec["config"]["model"], "task": rec["config"]["task"],
                          "method": rec["method"], "impl": rec["impl"], "run": rec["name"],
                          "convention": "<layer>.delta = ΔW, <layer>.w0 = W0: (d_out, d_in)"})
    if model is not None and rec["method"] != "full":
        tensors = adapter_tensors(model, rec["impl"])
        if tensors:
            with cli.atomic_path(d / "adapter.safetensors") as tmp:
                save_file(tensors, str(tmp), metadata={
                    "method": rec["method"], "impl": rec["impl"],
                    "layer_configs": json.dumps(rec["layer_configs"])})
    if model is not None and rec["impl"] != "peft":  # written even when empty: its
        other = other_trainable_tensors(model, rec["method"], rec["impl"])  # presence says
        with cli.atomic_path(d / "trainable.safetensors") as tmp:  # the run can be rebuilt
            save_file(other, str(tmp), metadata={"method": rec["method"]})
    cli.write_json(d / "run.json", rec)
    for stale in ("checkpoint.pt", "failed.json"):
        (d / stale).unlink(missing_ok=True)


def adapter_tensors(model, impl: str) -> dict:
    if impl == "peft":
        from peft import get_peft_model_state_dict
        try:
            sd = get_peft_model_state_dict(model)
        except Exception:  # noqa: BLE001 (a model PEFT cannot describe: keep the deltas only)
            return {}
        return {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}
    from finetune.adapters import adapted_layers

    out = {}
    for path, layer in adapted_layers(model).items():
        for name, p in layer.factors.items():
            out[f"{path}.{name}"] = p.detach().float().cpu().contiguous()
    return out


def other_trainable_tensors(model, method: str, impl: str) -> dict:
    """The trained tensors that ``adapter.safetensors`` does not hold, by parameter name:
    the task head of an adapter run, every trainable weight of a full fine-tuning run."""
    if impl == "peft":
        return {}
    from finetune.adapters import adapted_layers

    factor_ids = {id(p) for lay in adapted_layers(model).values() for p in lay.factors.values()}
    return {n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters()
            if p.requires_grad and id(p) not in factor_ids}


def run_config(rec: dict):
    """The :class:`~finetune.train.RunConfig` of a run record."""
    from finetune.train import RunConfig

    c = dict(rec["config"])
    c["overrides"] = tuple(sorted((c.get("overrides") or {}).items()))
    c["optimizer_options"] = tuple(sorted((c.get("optimizer_options") or {}).items()))
    c["targets"] = tuple(c["targets"]) if c.get("targets") else None
    return RunConfig(**c)


def load_model(d: Path, device: str = "cpu"):
    """Rebuild the trained model of a finished run: ``(model, task)``.

    The task (data split and a fresh pre-trained model) is built from the run's
    config and seed, the method injected with the run's configuration, and the saved
    factors (``adapter.safetensors``) and other trained tensors (``trainable.safetensors``:
    the head; every weight for full fine-tuning) copied in. Runs of ``--impl peft`` and
    runs saved before ``trainable.safetensors`` existed are refused (one line)."""
    import torch
    from safetensors.torch import load_file

    from finetune import adapters as A
    from finetune import tasks as T

    d = Path(d)
    rec = load_record(d)
    cfg = run_config(rec).resolved()
    if cfg.impl == "peft":
        raise ValueError(f"{d}: load_model rebuilds runs of our adapters and full "
                         "fine-tuning, not --impl peft")
    other = d / "trainable.safetensors"
    if not other.is_file():
        raise FileNotFoundError(f"{other} not found: the run predates saved heads; "
                                "retrain it with --force")
    task = T.get_task(cfg.model, cfg.task, seed=cfg.seed, device=device,
                      alpha_fraction=cfg.alpha_fraction,
                      use_alpha_slice=cfg.method == "alpha_lora")
    model = task.model
    if cfg.method != "full":
        layers = A.inject(model, cfg.method, rank=cfg.rank, targets=cfg.targets,
                          overrides=dict(cfg.overrides), init=cfg.init, seed=cfg.seed)
        factors, _ = load_factors(d)
        if set(factors) != set(layers):
            raise ValueError(f"{d}: adapter.safetensors does not match the run's layers")
        with torch.no_grad():
            for path, lay in layers.items():
                for name, p in lay.factors.items():
                    p.copy_(factors[path][name])
    try:
        tensors = load_file(str(other))
    except Exception as e:  # noqa: BLE001 (safetensors raises its own error type)
        raise ValueError(f"{other}: not a readable tensor file ({type(e).__name__})") from None
    params = dict(model.named_parameters())
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise ValueError(f"{other}: tensors {', '.join(missing[:3])} are not in the model")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)
    model.to(device).eval()
    return model, task


def record_failure(d: Path, cfg, reason: str, step: int | None = None) -> Path:
    """Write ``failed.json`` (and drop the checkpoint, so the next run starts afresh)."""
    d = Path(d)
    (d / "checkpoint.pt").unlink(missing_ok=True)
    return cli.write_json(d / "failed.json", {"status": "failed", "reason": reason, "step": step,
                                               "config": cfg.resolved().asdict(),
                                               "key": cfg.key})
