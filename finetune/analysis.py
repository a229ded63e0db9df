"""How a learned update compares with full fine-tuning's: the measures of the comparison.

For two updates of the same layer, ΔW (an adapter's) and ΔW_f (full fine-tuning's),
both (d_out, d_in):

- **ranks** of ΔW (:mod:`theory.spectra`): the numerical rank (singular values above
  σ_max · max(m, n) · eps of float32, numpy's rule) and the entropy effective rank
  exp(H(σ/Σσ)) (Roy & Vetterli 2007);
- **cosine** ⟨ΔW, ΔW_f⟩_F / (‖ΔW‖_F ‖ΔW_f‖_F): 1 for the same direction, ≈ 0 for
  unrelated updates (NaN when either is zero);
- **subspace overlap** of the top-k singular subspaces: with U_k, V_k the leading left
  and right singular vectors of ΔW and U'_k, V'_k those of ΔW_f,

      overlap_k = (‖U_kᵀ U'_k‖_F² + ‖V_kᵀ V'_k‖_F²) / (2k)   ∈ [0, 1],

  1 when both updates act on the same k-dimensional input and output subspaces; two
  random subspaces give about k/m (left) and k/n (right). One reading of the usual
  ‖U_kᵀ V_k‖_F²/k, taken here: the mean of the left and right overlaps, so that a
  method is credited for finding both the directions it reads and those it writes;
- **reconstruction error** of ΔW_f by a method at a configuration: the relative error
  ‖ΔW_f − ΔW*‖_F² / ‖ΔW_f‖_F² of the best fit ΔW* that :func:`reconstruction.fit.fit`
  finds (for LoRA the truncated SVD: exactly the Eckart-Young tail), batched over
  the layers of each shape;
- the **rank correlation** (Spearman, :func:`scipy.stats.spearmanr`) between two
  orderings of the methods, with its p-value and the number of methods.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from theory import spectra

Deltas = Mapping[str, tuple[Tensor, Tensor]]  # {layer: (ΔW, W0)}, (d_out, d_in)


def cosine(a: Tensor, b: Tensor) -> float:
    """⟨a, b⟩_F / (‖a‖_F ‖b‖_F), in float64; NaN if either is zero."""
    a, b = a.double(), b.double()
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return math.nan
    return float((a * b).sum()) / (na * nb)


def top_subspaces(w: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """U_k (m, k) and V_k (n, k): the leading singular vectors of ``w`` (float64)."""
    U, _, Vh = torch.linalg.svd(w.double(), full_matrices=False)
    return U[:, :k], Vh[:k].mT


def subspace_overlap(a: Tensor, b: Tensor, k: int) -> float:
    """(‖U_kᵀ U'_k‖_F² + ‖V_kᵀ V'_k‖_F²) / (2k) of the top-k singular subspaces of a, b."""
    k = int(min(k, *a.shape))
    if k < 1:
        raise ValueError(f"subspace dimension k must be >= 1, got {k}")
    if float(a.norm()) == 0.0 or float(b.norm()) == 0.0:
        return math.nan
    ua, va = top_subspaces(a, k)
    ub, vb = top_subspaces(b, k)
    left = float((ua.mT @ ub).pow(2).sum())
    right = float((va.mT @ vb).pow(2).sum())
    return (left + right) / (2 * k)


def ranks(w: Tensor) -> tuple[int, float]:
    """(numerical rank, entropy effective rank) of one matrix (float32, as trained)."""
    w = w.float()
    s = torch.linalg.svdvals(w)
    tol = s[:1] * max(w.shape) * torch.finfo(torch.float32).eps
    return int((s > tol).sum()), float(spectra.entropy_rank_from_sv(s))


def layer_measures(deltas: Deltas, reference: Deltas | None, k: int) -> dict[str, dict]:
    """Per layer of ``deltas``: numerical and effective rank, and (with a ``reference``,
    full fine-tuning's deltas of the same layers) cosine and top-k overlap with it."""
    out = {}
    for path, (d, _) in deltas.items():
        num, eff = ranks(d)
        row = {"numerical_rank": num, "effective_rank": eff, "norm": float(d.double().norm())}
        if reference is not None:
            if path not in reference:
                raise ValueError(f"layer {path} is not among full fine-tuning's layers")
            f = reference[path][0]
            if tuple(f.shape) != tuple(d.shape):
                raise ValueError(f"layer {path}: shape {tuple(d.shape)} against full "
                                 f"fine-tuning's {tuple(f.shape)}")
            row["cosine"] = cosine(d, f)
            row["overlap"] = subspace_overlap(d, f, k)
        out[path] = row
    return out


def mean_over_layers(measures: Mapping[str, Mapping[str, float]], key: str) -> float:
    """Mean of one measure over the layers (NaNs left out; NaN if none)."""
    vals = [float(m[key]) for m in measures.values() if key in m and m[key] is not None
            and math.isfinite(float(m[key]))]
    return float(np.mean(vals)) if vals else math.nan


def reconstruction_errors(method: str, target: Deltas, rank: int, overrides: dict | None = None,
                          *, solver: str = "auto", steps: int | None = None,
                          seed: int = 0) -> dict[str, float]:
    """Relative error of the best fit of ``method`` (at the budget of rank-``rank`` LoRA on
    each layer, with ``overrides``) to every ΔW of ``target``, ``{layer: error}``.

    Layers of one shape are fitted in one batched call of :func:`reconstruction.fit.fit`
    (with their own W0 for the methods that read it). ``full`` reconstructs exactly (0);
    a zero ΔW has no relative error (NaN)."""
    import theory
    from reconstruction.fit import fit

    from .adapters import layer_config

    if method == "full":
        return {p: 0.0 for p in target}
    meth = theory.get_method(method)
    by_shape: dict[tuple[int, int], list[str]] = {}
    out: dict[str, float] = {}
    for p, (d, _) in target.items():
        if float(d.abs().max()) == 0.0:
            out[p] = math.nan
        else:
            by_shape.setdefault(tuple(d.shape), []).append(p)
    for (m, n), paths in by_shape.items():
        cfg = layer_config(meth, m, n, rank, overrides, where=paths[0])
        M = torch.stack([target[p][0].float() for p in paths])  # (B, m, n)
        W0 = torch.stack([target[p][1].float() for p in paths])  # (B, m, n)
        res = fit(meth, M, cfg, w0=W0, solver=solver, steps=steps, seed=seed)
        for p, e in zip(paths, res.rel_error.tolist()):
            out[p] = float(e)
    return {p: out[p] for p in target}


def spearman(x, y) -> dict[str, float]:
    """Spearman's ρ between two sequences (pairs with a NaN left out), its two-sided
    p-value and n; ρ and p are NaN when n < 3 or either side is constant."""
    from scipy import stats

    pairs = [(float(a), float(b)) for a, b in zip(x, y)
             if a is not None and b is not None and math.isfinite(float(a))
             and math.isfinite(float(b))]
    n = len(pairs)
    if n < 3 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
        return {"rho": math.nan, "p": math.nan, "n": n}
    res = stats.spearmanr([a for a, _ in pairs], [b for _, b in pairs])
    return {"rho": float(res.statistic), "p": float(res.pvalue), "n": n}
