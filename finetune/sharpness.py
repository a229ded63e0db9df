"""How sharp is the minimum a run found? Two measures of the training loss L.

1. **Expected loss increase** under random perturbations of relative radius ρ in the full
   weight space of the adapted layers (Flat-LoRA's notion of flatness):

       S_ρ = E_E [ L(W' + E) ] − L(W'),    W' = W0 + ΔW of every adapted layer,
       E_i,: = ρ ‖W'_i,:‖ z_i / ‖z_i‖,      z_i ~ N(0, I)   (one row of one layer)

   every output row moved by exactly ρ times its norm in a uniformly random direction
   (the filter-normalised directions of Li et al., "Visualizing the Loss Landscape of
   Neural Nets", 2018; Flat-LoRA's training noise has the same row scale in expectation,
   E‖E_i‖² = ρ²‖W'_i‖²). Estimated by ``samples`` antithetic pairs, each on the same
   fixed training batches: ½[L(W'+E) + L(W'−E)] − L(W') has the same expectation and
   no first-order term (a run that has not reached a stationary point has a gradient,
   whose contribution averages to zero but would dominate the variance); reported with
   its standard error. For a quadratic with Hessian H per row, S_ρ = ½ ρ² tr(H)/d_in
   ‖W'‖²_F (a test).

2. **Top Hessian eigenvalue** λ_max of L by power iteration on Hessian-vector products
   (autograd double backward; no Hessian is formed), in two spaces:

   - ``weights``: with respect to the merged weights W' of the adapted layers (the same
     full space as 1, and the same for every method and for full fine-tuning: the
     derivative is taken with respect to ``Adapted.perturbation`` at E = 0);
   - ``factors``: with respect to the method's trainable factors θ (the space the optimizer
     moves in; the task head held fixed). For full fine-tuning both are the weights of the
     target layers.

   Power iteration converges to the eigenvalue of largest magnitude; the Rayleigh
   quotient vᵀHv is reported (negative if a negative curvature dominates), with the
   iterations used and the residual ‖Hv − λv‖/|λ|.

Both use the model in eval mode (no dropout: L is a deterministic function of the
weights) on training items drawn with a seed. :func:`run_sharpness` measures a finished
run (rebuilt by :func:`finetune.runs.load_model`) and caches the numbers in the run's
``sharpness.json`` keyed by the settings.

    python -m finetune.sharpness RUN_DIR [RUN_DIR ...] [--radius 0.05] [--json out.json]
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import cli

from .adapters import adapted_layers
from .optim.flat_lora import Site, weight_sites

Loss = Callable[[], Tensor]


# --------------------------------------------------------------------------- #
# 1. expected loss increase under random perturbations of relative radius ρ
# --------------------------------------------------------------------------- #
def row_direction(w: Tensor, radius: float, generator: torch.Generator) -> Tensor:
    """E (d_out, d_in): each row of norm ``radius`` · ‖w_i‖, in a uniformly random direction."""
    z = torch.randn(w.shape, generator=generator, device=w.device, dtype=w.dtype)
    z = z / torch.linalg.vector_norm(z, dim=1, keepdim=True)
    return radius * torch.linalg.vector_norm(w, dim=1, keepdim=True) * z


def _mean_loss(losses: Sequence[Loss]) -> float:
    with torch.no_grad():
        return float(sum(float(f()) for f in losses) / len(losses))


def expected_loss_increase(losses: Sequence[Loss], sites: Sequence[Site], radius: float = 0.05,
                           samples: int = 8, seed: int = 0) -> dict[str, Any]:
    """S_ρ = E[L(W' + E)] − L(W') over ``samples`` antithetic pairs (±E); L = mean of
    ``losses`` (closures, one per batch). The sites get their weights back exactly after
    every draw."""
    if not losses or not sites:
        raise ValueError("expected_loss_increase needs at least one loss and one weight")
    if not (math.isfinite(radius) and radius >= 0) or samples < 1:
        raise ValueError(f"radius must be >= 0 and samples >= 1, got {radius}, {samples}")
    base = _mean_loss(losses)
    g = torch.Generator(device=sites[0].weight().device).manual_seed(int(seed))
    rises = []
    for _ in range(samples):
        es = [row_direction(s.weight(), radius, g) for s in sites]
        pair = []
        for sign in (1.0, -1.0):  # the antithetic pair E, −E
            try:
                for s, e in zip(sites, es):
                    s.add(sign * e)
                pair.append(_mean_loss(losses))
            finally:
                for s in sites:
                    s.clear()
        rises.append(0.5 * (pair[0] + pair[1]) - base)
    r = np.asarray(rises)
    return {"radius": radius, "samples": samples, "loss": base, "increase": float(r.mean()),
            "increase_se": float(r.std(ddof=1) / math.sqrt(len(r))) if len(r) > 1 else math.nan,
            "increases": r.tolist()}


# --------------------------------------------------------------------------- #
# 2. top Hessian eigenvalue by power iteration on Hessian-vector products
# --------------------------------------------------------------------------- #
def hvp(losses: Sequence[Loss], params: Sequence[Tensor], v: Sequence[Tensor]) -> list[Tensor]:
    """H v with H = ∇² (mean of ``losses``) w.r.t. ``params`` (double backward, batch by
    batch). Attention runs on the math kernel of ``scaled_dot_product_attention``: the
    fused CPU kernels have no double backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = [torch.zeros_like(p) for p in params]
    with sdpa_kernel(SDPBackend.MATH):
        for f in losses:
            grads = torch.autograd.grad(f(), params, create_graph=True)
            dot = sum((g * u).sum() for g, u in zip(grads, v))
            hv = torch.autograd.grad(dot, params)
            for o, h in zip(out, hv):
                o.add_(h.detach() / len(losses))
    return out


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def top_hessian_eigenvalue(losses: Sequence[Loss], params: Sequence[Tensor], iters: int = 20,
                           tol: float = 1e-3, seed: int = 0) -> dict[str, Any]:
    """λ_max of the Hessian of the mean of ``losses`` w.r.t. ``params`` by power iteration:
    v ← Hv/‖Hv‖ until the Rayleigh quotient vᵀHv changes by less than ``tol`` (relative)."""
    params = list(params)
    if not params or not losses:
        raise ValueError("top_hessian_eigenvalue needs at least one parameter and one loss")
    g = torch.Generator(device=params[0].device).manual_seed(int(seed))
    v = [torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype) for p in params]
    norm = math.sqrt(_dot(v, v))
    v = [x / norm for x in v]
    lam, prev, converged, it = math.nan, math.nan, False, 0
    hv = v
    for it in range(1, iters + 1):
        hv = hvp(losses, params, v)
        lam = _dot(v, hv)                        # Rayleigh quotient (‖v‖ = 1)
        n = math.sqrt(_dot(hv, hv))
        if n == 0 or not math.isfinite(n):
            break
        if math.isfinite(prev) and abs(lam - prev) <= tol * abs(lam):
            converged = True
            break
        prev = lam
        v = [x / n for x in hv]
    resid = math.sqrt(_dot([h - lam * x for h, x in zip(hv, v)], [h - lam * x for h, x in zip(hv, v)]))
    return {"eigenvalue": lam, "iterations": it, "converged": converged,
            "residual": resid / abs(lam) if lam else math.nan}


def weight_space(sites: Sequence[Site]) -> tuple[list[Tensor], Callable[[], None]]:
    """Leaf tensors E = 0 (one per adapted layer, requiring grad) installed as the layers'
    perturbations: derivatives w.r.t. them are derivatives w.r.t. W'. Returns (E, undo)."""
    if not all(s.adapted for s in sites):
        raise ValueError("the weight space through perturbations needs adapted layers")
    es = []
    for s in sites:
        e = torch.zeros_like(s.weight()).requires_grad_(True)
        s.module.perturbation = e
        es.append(e)

    def undo():
        for s in sites:
            s.clear()

    return es, undo


def hessian_top(losses: Sequence[Loss], model: nn.Module, sites: Sequence[Site], space: str,
                iters: int = 20, tol: float = 1e-3, seed: int = 0) -> dict[str, Any]:
    """λ_max in ``space`` "weights" (W' of the sites) or "factors" (trainable factors of the
    adapted layers; for full fine-tuning, the sites' weights in both spaces)."""
    adapted = bool(adapted_layers(model)) and all(s.adapted for s in sites)
    if not adapted:
        params = [s.module.weight for s in sites]
        return top_hessian_eigenvalue(losses, params, iters, tol, seed)
    if space == "weights":
        es, undo = weight_space(sites)
        try:
            return top_hessian_eigenvalue(losses, es, iters, tol, seed)
        finally:
            undo()
    if space == "factors":
        params = [p for s in sites for p in s.module.factors.values() if p.requires_grad]
        return top_hessian_eigenvalue(losses, params, iters, tol, seed)
    raise ValueError(f"space {space!r} unknown; known: weights, factors")


# --------------------------------------------------------------------------- #
# a finished run
# --------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True)
class Settings:
    """What a sharpness measurement depends on (the cache key)."""

    radius: float = 0.05
    samples: int = 8
    batches: int = 4
    batch: int = 32
    hessian_batches: int = 2
    iters: int = 20
    tol: float = 1e-3
    seed: int = 0

    def check(self) -> None:
        if not (math.isfinite(self.radius) and self.radius > 0):
            raise ValueError(f"--radius must be a finite number > 0, got {self.radius}")
        if not (math.isfinite(self.tol) and self.tol > 0):
            raise ValueError(f"--tol must be a finite number > 0, got {self.tol}")
        for k in ("samples", "batches", "batch", "hessian_batches", "iters"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(self, k)}")
        if self.hessian_batches > self.batches:
            raise ValueError(f"--hessian-batches ({self.hessian_batches}) must be <= --batches "
                             f"({self.batches})")


def training_losses(task, model: nn.Module, n_batches: int, batch: int, seed: int) -> list[Loss]:
    """Closures of the training loss on ``n_batches`` seeded batches of training items."""
    rng = np.random.default_rng([seed, 23])
    n = min(n_batches * batch, len(task.train_idx))
    idx = np.sort(rng.choice(task.train_idx, size=n, replace=False))
    chunks = [idx[i:i + batch] for i in range(0, n, batch)]
    data = [task.batch(c) for c in chunks]
    return [(lambda b=b: task.loss(model, b)) for b in data]


def measure(task, model: nn.Module, settings: Settings, paths: list[str] | None = None
            ) -> dict[str, Any]:
    """Both measures of ``model`` on ``task``'s training items."""
    settings.check()
    model.eval()
    losses = training_losses(task, model, settings.batches, settings.batch, settings.seed)
    sites = weight_sites(model, paths=None if adapted_layers(model) else paths)
    if not sites:
        raise ValueError("no adapted layer (or target layer) to measure")
    s = settings
    out = {"settings": dataclasses.asdict(s), "layers": len(sites),
           "weight_params": int(sum(x.weight().numel() for x in sites))}
    out["random"] = expected_loss_increase(losses, sites, s.radius, s.samples, s.seed)
    hl = losses[: s.hessian_batches]
    out["hessian_weights"] = hessian_top(hl, model, sites, "weights", s.iters, s.tol, s.seed)
    out["hessian_factors"] = hessian_top(hl, model, sites, "factors", s.iters, s.tol, s.seed)
    return out


def run_sharpness(run_dir: Path, settings: Settings | None = None, *, device: str = "cpu",
                  cache: bool = True) -> dict[str, Any]:
    """Both measures for a finished run; cached in ``<run>/sharpness.json`` by settings."""
    from .runs import load_deltas, load_model, load_record

    settings = settings or Settings()
    settings.check()
    run_dir = Path(run_dir)
    rec = load_record(run_dir)
    key = cli.dumps(dataclasses.asdict(settings), indent=None)
    path = run_dir / "sharpness.json"
    if cache and path.is_file():
        try:
            cached = json.loads(path.read_text())
            if isinstance(cached, dict) and cached.get("key") == key:
                return cached
        except (ValueError, UnicodeDecodeError):
            pass  # a torn cache: measure again
    with torch.random.fork_rng(devices=[]):
        model, task = load_model(run_dir, device=device)
        paths = sorted(load_deltas(run_dir)) if rec["method"] == "full" else None
        out = measure(task, model, settings, paths)
    out.update(key=key, run=rec["name"], method=rec["method"],
               optimizer=rec["config"]["optimizer"], metric_name=rec["metric_name"],
               metric=rec["metric"])
    if cache:
        cli.write_json(path, out)
    return out


def _mean_sd(xs: Sequence[float]) -> str:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return "n/a"
    sd = float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0
    return f"{np.mean(xs):.4g} ± {sd:.2g}"


def summary_rows(results: Sequence[dict], records: Sequence[dict]) -> list[dict[str, str]]:
    """One row per (method, optimizer): seeds, metric, both measures and the step time
    relative to AdamW of the same method and seed (mean ± sd over seeds)."""
    groups: dict[tuple, list[tuple[dict, dict]]] = {}
    for r, rec in zip(results, records):
        groups.setdefault((rec["method"], rec["config"]["optimizer"]), []).append((r, rec))
    adamw = {(rec["method"], rec["config"]["seed"]): rec["step_seconds_median"]
             for rec in records if rec["config"]["optimizer"] == "adamw"}
    rows = []
    for (method, opt), items in sorted(groups.items()):
        ratios = [rec["step_seconds_median"] / adamw[(method, rec["config"]["seed"])]
                  for _, rec in items if (method, rec["config"]["seed"]) in adamw]
        rows.append({
            "method": method, "optimizer": opt, "seeds": str(len(items)),
            items[0][1]["metric_name"]: _mean_sd([rec["metric"] for _, rec in items]),
            "S_rho": _mean_sd([r["random"]["increase"] for r, _ in items]),
            "lambda_max W'": _mean_sd([r["hessian_weights"]["eigenvalue"] for r, _ in items]),
            "lambda_max factors": _mean_sd([r["hessian_factors"]["eigenvalue"] for r, _ in items]),
            "s/step": _mean_sd([rec["step_seconds_median"] for _, rec in items]),
            "x adamw (same seed)": _mean_sd(ratios),
        })
    return rows


def markdown(rows: Sequence[dict[str, str]]) -> str:
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(r.get(c, "") for c in cols) + " |" for r in rows]
    return "\n".join(out)


# --------------------------------------------------------------------------- #
# command line
# --------------------------------------------------------------------------- #
def build_parser() -> cli.Parser:
    ap = cli.Parser(prog="python -m finetune.sharpness", description=__doc__)
    ap.add_argument("runs", nargs="+", type=Path, help="finished run folders")
    d = Settings()
    ap.add_argument("--radius", type=cli.positive_float, default=d.radius,
                    help=f"relative radius ρ of the random perturbations (default {d.radius})")
    ap.add_argument("--samples", type=cli.positive_int, default=d.samples)
    ap.add_argument("--batches", type=cli.positive_int, default=d.batches,
                    help="training batches the loss is taken on")
    ap.add_argument("--batch", type=cli.positive_int, default=d.batch)
    ap.add_argument("--hessian-batches", type=cli.positive_int, default=d.hessian_batches)
    ap.add_argument("--iters", type=cli.positive_int, default=d.iters,
                    help="power-iteration steps at most")
    ap.add_argument("--tol", type=cli.positive_float, default=d.tol,
                    help=f"power iteration stops when λ changes by less (relative; default {d.tol})")
    ap.add_argument("--seed", type=cli.nonneg_int, default=d.seed)
    ap.add_argument("--threads", type=cli.positive_int)
    ap.add_argument("--no-cache", action="store_true", help="measure again (sharpness.json)")
    ap.add_argument("--summary", action="store_true",
                    help="also a table per (method, optimizer): mean ± sd over the runs' seeds")
    ap.add_argument("--json", metavar="PATH", help="write every result as JSON")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def work():
        from tqdm.auto import tqdm

        from .runs import load_record

        s = Settings(radius=args.radius, samples=args.samples, batches=args.batches,
                     batch=args.batch, hessian_batches=args.hessian_batches, iters=args.iters,
                     tol=args.tol, seed=args.seed)
        s.check()
        cli.check_threads(args.threads)
        cli.check_writable_file(args.json, "--json")
        for d in args.runs:  # every run finished and rebuildable, before any work
            rec = load_record(d)
            need = ["trainable.safetensors"] + ([] if rec["method"] == "full"
                                                else ["adapter.safetensors"])
            for f in need:
                if not (Path(d) / f).is_file():
                    raise FileNotFoundError(f"{Path(d) / f} not found (a run of an older "
                                            "trainer or of --impl peft?)")
        if args.threads:
            torch.set_num_threads(args.threads)
        results = []
        for d in tqdm(args.runs, desc="sharpness", unit="run", disable=not sys.stderr.isatty()):
            r = run_sharpness(d, s, cache=not args.no_cache)
            results.append(r)
            print(f"{r['run']}: {r['metric_name']} {r['metric']:.4f}  "
                  f"S_rho={r['random']['increase']:.5f}±{r['random']['increase_se']:.5f} "
                  f"(rho {s.radius})  lambda_max weights {r['hessian_weights']['eigenvalue']:.4g}"
                  f"  factors {r['hessian_factors']['eigenvalue']:.4g}")
        if args.summary:
            print(markdown(summary_rows(results, [load_record(d) for d in args.runs])))
        if args.json:
            cli.write_json(args.json, results)

    return cli.run(work)


if __name__ == "__main__":
    raise SystemExit(main())
