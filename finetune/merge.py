"""Merging LoRAs trained on different tasks into one update, and what each rule costs.

    python -m finetune.merge --runs RUN1 RUN2 ... --how lego|sum|mean|ties|svd --rank K
    python -m finetune.merge --runs R1 R2 R3 R4 --how all --rank 8,32 --json merge.json

Every rule works layer by layer on the LoRAs' updates ΔW_t = s_t B_t A_t (t = 1..N, the
same base model and layers) and is compared with their sum S = Σ_t ΔW_t:

``sum``   task arithmetic (Ilharco et al., 2023) with λ = 1: S itself, rank <= Σ r_t
          (a LoRA whose factors are the concatenated ones).
``mean``  S / N.
``ties``  TIES-merging (Yadav et al., 2023) of the ΔW_t: keep the top 20 % magnitudes of
          each (``--density``), elect each entry's sign by the sign of the sum, average the
          entries that agree with it (PEFT's ``merge_utils.ties``, majority by total), λ = 1.
``svd``   the truncated SVD of S at rank K: by Eckart-Young the best rank-K approximation
          of S, so the floor of every rank-K merge's error against S.
``lego``  LoRA-LEGO (Zhao et al., "Merging LoRAs like Playing LEGO", ICLR 2025): pool the
          rank-one *minimal semantic units* u_i = [s b_i ; a_i] (column i of s·B with row i
          of A, R = Σ r_t of them), k-means them into K clusters (scikit-learn, k-means++,
          10 starts, seeded), and build the rank-K LoRA from the centroids c_j = [b̄_j ; ā_j]:
          ΔW = ω Σ_j ρ_j² b̄_j ā_j with the *dual reweighting* of the paper:
          parameter reweighting ρ_j = mean_{i∈j} ‖u_i‖ / ‖c_j‖ (a centroid is shorter than
          its units: "norm decay"; the centroid vector is rescaled to their mean norm) and
          output reweighting ω = √(r̄/K) (the output of K summed units grows in variance with
          K: "variance expansion"; r̄ the mean rank of the sources).

Reading taken for LEGO (the authors' code is not public as far as we could find): units
are clustered as the raw concatenation, no sign or scale normalisation; ρ_j scales the
whole centroid vector (both halves, so ρ_j² on ΔW); ω multiplies the merged output.
``--lego-reweight param|output|none`` turns either off. Merging a LoRA with itself at its
own rank gives it back exactly (each cluster a pair of equal units, ρ = ω = 1: a test).

For every rule and layer: the relative error ‖M − S‖_F / ‖S‖_F, the Eckart-Young
optimum √(Σ_{i>K} σ_i(S)²) / ‖S‖_F, and the error of M's own best rank-K approximation
(at least the optimum for every rule: a test). The merged model's metric on each source
task: the merged ΔW folded into W0 of that task's model, with the task's own trained
head (the LoRAs of different tasks do not share one; a shared body, task heads, as in the
merging literature). Beside them: the base model (ΔW = 0) and every single LoRA on every
task, with each task's head.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import cli

RULES = ("sum", "mean", "ties", "svd", "lego")
LEGO_REWEIGHT = ("both", "param", "output", "none")
Units = tuple[Tensor, Tensor]  # (s B (m, r), A (r, n)) of one LoRA layer


# --------------------------------------------------------------------------- #
# the rules, on one layer
# --------------------------------------------------------------------------- #
def merge_sum(units: Sequence[Units]) -> Tensor:
    return sum(b @ a for b, a in units)


def merge_mean(units: Sequence[Units]) -> Tensor:
    return merge_sum(units) / len(units)


def merge_ties(units: Sequence[Units], density: float = 0.2) -> Tensor:
    from peft.utils.merge_utils import ties

    deltas = [b @ a for b, a in units]
    return ties(deltas, torch.ones(len(deltas), dtype=deltas[0].dtype), density, "total")


def truncate(x: Tensor, k: int) -> Tensor:
    """The best rank-k approximation of x (truncated SVD)."""
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def merge_svd(units: Sequence[Units], k: int) -> Tensor:
    return truncate(merge_sum(units), k)


def lego_factors(units: Sequence[Units], k: int, seed: int = 0, reweight: str = "both"
                 ) -> tuple[Tensor, Tensor]:
    """LoRA-LEGO's rank-k LoRA ``(B (m, k), A (k, n))`` (scale folded into B), see above."""
    from sklearn.cluster import KMeans

    b_all = torch.cat([b for b, _ in units], dim=1)             # (m, R)
    a_all = torch.cat([a for _, a in units], dim=0)             # (R, n)
    m, big_r = b_all.shape
    if not 1 <= k <= big_r:
        raise ValueError(f"--rank {k} must be between 1 and the pooled rank {big_r}")
    x = torch.cat([b_all.T, a_all], dim=1).double()             # (R, m + n): unit i = [b_i; a_i]
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(x.numpy())
    labels = torch.as_tensor(km.labels_)
    cents = []
    for j in range(k):
        members = x[labels == j]                                # (n_j, m + n)
        c = members.mean(0)
        if reweight in ("both", "param"):
            c = c * members.norm(dim=1).mean() / c.norm().clamp_min(1e-30)
        cents.append(c)
    c = torch.stack(cents).to(b_all.dtype)                      # (k, m + n)
    b, a = c[:, :m].T.contiguous(), c[:, m:].contiguous()       # (m, k), (k, n)
    if reweight in ("both", "output"):
        r_mean = big_r / len(units)
        b = b * math.sqrt(r_mean / k)
    return b, a


def merge_lego(units: Sequence[Units], k: int, seed: int = 0, reweight: str = "both") -> Tensor:
    b, a = lego_factors(units, k, seed, reweight)
    return b @ a


def merge(how: str, units: Sequence[Units], k: int, *, density: float = 0.2, seed: int = 0,
          lego_reweight: str = "both") -> Tensor:
    """The merged ΔW (m, n) of one layer by rule ``how``."""
    if how == "sum":
        return merge_sum(units)
    if how == "mean":
        return merge_mean(units)
    if how == "ties":
        return merge_ties(units, density)
    if how == "svd":
        return merge_svd(units, k)
    if how == "lego":
        return merge_lego(units, k, seed, lego_reweight)
    raise ValueError(f"--how {how!r} unknown; known: {', '.join(RULES)}")


def relative_error(m: Tensor, s: Tensor) -> float:
    return float(torch.linalg.norm(m - s) / torch.linalg.norm(s).clamp_min(1e-30))


def svd_optimum(s: Tensor, k: int) -> float:
    """min over rank-k M of ‖M − S‖_F / ‖S‖_F = √(Σ_{i>k} σ_i²) / ‖S‖_F (Eckart-Young)."""
    sv = torch.linalg.svdvals(s.double())
    return float(sv[k:].square().sum().sqrt() / sv.square().sum().sqrt().clamp_min(1e-30))


# --------------------------------------------------------------------------- #
# runs on disk
# --------------------------------------------------------------------------- #
def load_units(run_dir: Path) -> tuple[dict, dict[str, Units], dict[str, Tensor]]:
    """(record, {layer: (s B, A)}, {layer: W0}) of a finished LoRA run."""
    import theory

    from . import adapters as A
    from .runs import load_deltas, load_factors, load_record, run_config

    rec = load_record(run_dir)
    if rec["method"] != "lora" or rec.get("impl", "ours") != "ours":
        raise ValueError(f"{run_dir}: a {rec['method']} run ({rec.get('impl')}); merging takes "
                         "LoRA runs of our adapters (--method lora --impl ours)")
    cfg = run_config(rec).resolved()
    factors, _ = load_factors(run_dir)
    deltas = load_deltas(run_dir)
    lora = theory.get_method("lora")
    units, w0 = {}, {}
    for path, f in factors.items():
        b, a = f["B"].double(), f["A"].double()
        conf = A.layer_config(lora, b.shape[0], a.shape[1], cfg.rank, dict(cfg.overrides), path)
        units[path] = (conf.scale * b, a)
        w0[path] = deltas[path][1]
    return rec, units, w0


def check_compatible(loaded: Sequence[tuple[dict, dict, dict]], runs: Sequence[Path]) -> int:
    """Same base model, same layers, same W0 in every run; returns the pooled rank."""
    rec0, units0, w00 = loaded[0]
    for (rec, units, w0), d in zip(loaded[1:], runs[1:]):
        if rec["config"]["model"] != rec0["config"]["model"]:
            raise ValueError(f"runs of different base models: {runs[0]} is "
                             f"{rec0['config']['model']}, {d} is {rec['config']['model']}")
        if set(units) != set(units0):
            extra = sorted(set(units) ^ set(units0))
            raise ValueError(f"runs with different layer sets: {runs[0]} and {d} differ in "
                             f"{len(extra)} layers (e.g. {extra[0]})")
        for p in units0:
            if not torch.equal(w0[p], w00[p]):
                raise ValueError(f"runs of different base weights: W0 of {p} differs between "
                                 f"{runs[0]} and {d}")
    return min(sum(u[p][0].shape[1] for _, u, _ in loaded) for p in units0)


def evaluate_with(run_dir: Path, updates: dict[str, dict[str, Tensor]], device: str = "cpu"
                  ) -> dict[str, float]:
    """The metric of run ``run_dir``'s task (its data split and head) with each ΔW set of
    ``updates`` folded into W0: ``{name: metric}``."""
    from . import adapters as A
    from .runs import load_model

    model, task = load_model(run_dir, device=device)
    A.remove(model)  # the original linear modules, W0 exactly
    mods = {p: model.get_submodule(p) for p in next(iter(updates.values()))}
    saved = {p: m.weight.detach().clone() for p, m in mods.items()}
    out = {}
    try:
        for name, dws in updates.items():
            with torch.no_grad():
                for p, m in mods.items():
                    dw = dws[p].to(m.weight)
                    m.weight.copy_(saved[p] + (dw if isinstance(m, torch.nn.Linear) else dw.T))
            out[name] = float(task.evaluate(model)[task.metric])
    finally:
        with torch.no_grad():
            for p, m in mods.items():
                m.weight.copy_(saved[p])
    return out


def merge_runs(runs: Sequence[Path], hows: Sequence[str], ranks: Sequence[int], *,
               density: float = 0.2, seed: int = 0, lego_reweight: str = "both",
               evaluate: bool = True, device: str = "cpu", progress: bool = False,
               keep_deltas: bool = False) -> dict[str, Any]:
    """Every rule at every rank on the runs: errors per layer, metrics per source task
    (``keep_deltas``: also the merged ΔW per layer under ``"deltas"`` and W0 under ``"w0"``)."""
    from tqdm.auto import tqdm

    runs = [Path(r) for r in runs]
    loaded = [load_units(r) for r in runs]
    pooled = check_compatible(loaded, runs)
    for k in ranks:
        if k > pooled:
            raise ValueError(f"--rank {k} is larger than the pooled rank {pooled} of the "
                             f"{len(runs)} LoRAs")
    layers = list(loaded[0][1])
    sums = {p: merge_sum([u[p] for _, u, _ in loaded]) for p in layers}
    results, updates = [], {}
    combos = [(h, k) for h in hows for k in (ranks if h in ("svd", "lego") else ranks[:1])]
    for how, k in tqdm(combos, desc="merging", disable=not progress, leave=False):
        name = f"{how}" if how not in ("svd", "lego") else f"{how}@{k}"
        dws, per = {}, {}
        for p in layers:
            mdw = merge(how, [u[p] for _, u, _ in loaded], k, density=density, seed=seed,
                        lego_reweight=lego_reweight)
            dws[p] = mdw.float()
            per[p] = {"error": relative_error(mdw, sums[p]),
                      "rank": int(torch.linalg.matrix_rank(mdw.double())),
                      **{f"error_at_{kk}": relative_error(truncate(mdw, kk), sums[p])
                         for kk in ranks},
                      **{f"svd_optimum_{kk}": svd_optimum(sums[p], kk) for kk in ranks}}
        updates[name] = dws
        summary = {key: float(np.mean([v[key] for v in per.values()]))
                   for key in next(iter(per.values()))}
        results.append({"name": name, "how": how, "rank": k if how in ("svd", "lego") else None,
                        "mean": summary, "layers": per})
    out: dict[str, Any] = {
        "runs": [str(r) for r in runs], "tasks": [rec["config"]["task"] for rec, _, _ in loaded],
        "model": loaded[0][0]["config"]["model"], "pooled_rank": pooled, "ranks": list(ranks),
        "density": density, "seed": seed, "lego_reweight": lego_reweight, "merges": results,
    }
    if evaluate:
        singles = {f"single:{rec['config']['task']}#{i}": {p: (u[p][0] @ u[p][1]).float()
                                                           for p in layers}
                   for i, (rec, u, _) in enumerate(loaded)}
        base = {"base": {p: torch.zeros_like(sums[p]).float() for p in layers}}
        metrics = {}
        seen = {}
        for i, (r, (rec, _, _)) in enumerate(tqdm(list(zip(runs, loaded)), desc="evaluating",
                                                  disable=not progress, leave=False)):
            if str(r.resolve()) in seen:  # the same run twice: evaluated once
                metrics[f"{rec['config']['task']}#{i}"] = metrics[seen[str(r.resolve())]]
                continue
            key = f"{rec['config']['task']}#{i}"
            seen[str(r.resolve())] = key
            metrics[key] = evaluate_with(r, {**base, **singles, **updates}, device)
        out["metric_name"] = loaded[0][0]["metric_name"]
        out["metrics"] = metrics  # {source task: {merge name: metric}}
        out["recorded"] = {f"{rec['config']['task']}#{i}": rec["metric"]
                           for i, (rec, _, _) in enumerate(loaded)}
    if keep_deltas:
        out["deltas"], out["w0"] = updates, loaded[0][2]
    return out


# --------------------------------------------------------------------------- #
# command line
# --------------------------------------------------------------------------- #
def build_parser() -> cli.Parser:
    ap = cli.Parser(prog="python -m finetune.merge", description=__doc__)
    ap.add_argument("--runs", nargs="+", type=Path, required=True,
                    help="finished LoRA run folders (same base model and layers)")
    ap.add_argument("--how", type=cli.str_list, default=["all"],
                    help=f"comma list of {' | '.join(RULES)} or all (default all)")
    ap.add_argument("--rank", type=cli.int_list, default=[8],
                    help="K, the rank of the svd and lego merges (comma list; default 8)")
    ap.add_argument("--density", type=cli.probability, default=0.2,
                    help="TIES: the fraction of each update kept (default 0.2)")
    ap.add_argument("--lego-reweight", default="both", choices=LEGO_REWEIGHT)
    ap.add_argument("--seed", type=cli.nonneg_int, default=0, help="k-means seed")
    ap.add_argument("--no-eval", action="store_true", help="errors only (no model evaluation)")
    ap.add_argument("--threads", type=cli.positive_int)
    ap.add_argument("--out", type=Path, help="folder for merge.json and the merged deltas")
    ap.add_argument("--json", metavar="PATH", help="write the result as JSON ('-': stdout)")
    return ap


def _table(res: dict) -> str:
    tasks = list(res.get("metrics", {}))
    head = f"{'merge':<10} {'rank':>5} {'err vs sum':>10}"
    ks = res["ranks"]
    head += "".join(f" {'err@' + str(k):>8} {'opt@' + str(k):>8}" for k in ks)
    head += "".join(f" {t.split('#')[0]:>8}" for t in tasks) + (f" {'mean':>7}" if tasks else "")
    lines = [head]
    rows = [(m["name"], m["mean"]) for m in res["merges"]]
    names = [n for n, _ in rows]
    if tasks:
        names = ["base"] + [n for n in res["metrics"][tasks[0]] if n.startswith("single:")] + names
    by = dict(rows)
    for n in names:
        if n in by:
            s = by[n]
            line = f"{n:<10} {s['rank']:>5.0f} {s['error']:>10.4f}"
            line += "".join(f" {s[f'error_at_{k}']:>8.4f} {s[f'svd_optimum_{k}']:>8.4f}" for k in ks)
        else:
            line = f"{n.replace('single:', ''):<10} {'':>5} {'':>10}" + " " * (18 * len(ks))
        if tasks:
            vals = [res["metrics"][t][n] for t in tasks]
            line += "".join(f" {v:>8.4f}" for v in vals) + f" {np.mean(vals):>7.4f}"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def work():
        from .runs import load_record

        hows = list(RULES) if args.how == ["all"] else list(dict.fromkeys(args.how))
        for h in hows:
            if h not in RULES:
                raise ValueError(f"--how {h!r} unknown; known: {', '.join(RULES)}, all")
        ranks = sorted(set(args.rank))
        if any(k < 1 for k in ranks):
            raise ValueError(f"--rank must be >= 1, got {args.rank}")
        cli.check_threads(args.threads)
        cli.check_writable_dir(args.out, "--out")
        cli.check_writable_file(args.json, "--json")
        for d in args.runs:
            load_record(d)
            if not args.no_eval and not (Path(d) / "trainable.safetensors").is_file():
                raise FileNotFoundError(f"{Path(d) / 'trainable.safetensors'} not found: the run "
                                        "cannot be rebuilt for evaluation (retrain it, or "
                                        "--no-eval)")
        if args.threads:
            torch.set_num_threads(args.threads)
        res = merge_runs(args.runs, hows, ranks, density=args.density, seed=args.seed,
                         lego_reweight=args.lego_reweight, evaluate=not args.no_eval,
                         progress=sys.stderr.isatty(), keep_deltas=True)
        deltas, w0 = res.pop("deltas"), res.pop("w0")
        if args.out:
            from finetune.tiny import save_deltas

            args.out.mkdir(parents=True, exist_ok=True)
            for name, dws in deltas.items():  # the reconstruction convention: <layer>.delta/.w0
                save_deltas({p: (dws[p], w0[p]) for p in dws},
                            args.out / f"merged-{name.replace('@', '-k')}.safetensors",
                            metadata={"merge": name, "runs": " ".join(res["runs"])})
            cli.write_json(args.out / "merge.json", res)
        if not cli.emit_json(args.json, res):
            print(f"{len(args.runs)} LoRAs of {res['model']} ({', '.join(res['tasks'])}), pooled "
                  f"rank {res['pooled_rank']}; errors: mean over {len(res['merges'][0]['layers'])}"
                  f" layers of ‖M − S‖/‖S‖, S = the summed update")
            print(_table(res))

    return cli.run(work)


if __name__ == "__main__":
    raise SystemExit(main())
