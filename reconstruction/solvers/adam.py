"""Adam on the relative reconstruction error, for every registered method.

Loss = Σ_b ‖M_b − ΔW_b‖_F² / ‖M_b‖_F²: a sum over the batch, so each target's
gradient (and, Adam being elementwise, its whole trajectory) is independent of the
others. Learning-rate schedule: linear warm-up over the first 2% of the steps, then
cosine decay to 1% of ``lr`` ("cosine") or ×0.1 at 50% and 75% ("step").

Per target: the best iterate is kept; a target stops (its best is frozen) when its
best error improved by less than ``tol`` (relative) over the last ``window`` steps;
a NaN/inf (or astronomically large) error marks it ``diverged`` and stops it at its
last finite best. The loop ends when every target has stopped or after ``steps``.

Stopped targets leave the batch (``compact``): the targets, W0, the factors and Adam's
moments are cut down to the running targets, so a batch whose targets stop at
126, 151, 310 and 573 steps costs 1160 target-steps, not 4 × 573 = 2292. Adam being
elementwise and the loss a sum, each running target follows the same trajectory as
without cutting: bit for bit where the BLAS sums do not depend on the batch's size
(float64, small matrices: ``tests/test_reconstruction_fit.py``), to rounding otherwise
(on 1000×1000 float32 the batched GEMMs round differently for 3 matrices than for 4,
as they do for one matrix alone). A stopped target's recorded error stays at its last
value.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .common import Params, stalled

#: an error above this counts as divergence
BLOWUP = 1e12

#: stopped targets leave the batch (``run_adam(compact=None)`` reads it; the benchmark
#: ``python -m reconstruction.bench --only f`` times both)
COMPACT = True
#: ... on targets of at least this many entries (below, cutting costs more than it saves:
#: 0.84-0.87× at 48×48 in the benchmark)
COMPACT_FROM = 96 * 96


def lr_at(t: int, steps: int, lr: float, schedule: str) -> float:
    warm = max(1, steps // 50)
    w = min(1.0, (t + 1) / warm)
    if schedule == "cosine":
        return lr * w * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t / max(steps, 1))))
    if schedule == "step":
        return lr * w * (0.1 ** ((t >= steps // 2) + (t >= 3 * steps // 4)))
    if schedule == "constant":
        return lr * w
    raise ValueError(f"unknown schedule {schedule!r}; known: cosine, step, constant")


def _adam(params: list[Tensor], lr: float) -> torch.optim.Adam:
    """torch's fused Adam (one kernel for all factors: on a CPU about 5x faster than
    the per-tensor loop for a handful of small factors), else the default one."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):  # a device/dtype without a fused kernel
        return torch.optim.Adam(params, lr=lr)


def run_adam(method, M: Tensor, w0: Tensor | None, config, params0: Params, *, steps: int,
             lr: float, schedule: str = "cosine", tol: float = 1e-7, window: int | None = None,
             progress: bool = False, value_and_grad=None, value_and_grad_for=None,
             compact: bool | None = None) -> tuple[Params, list[Tensor], int, Tensor]:
    """Returns (best params, per-step errors [(b,)...], steps run per target (b,), diverged (b,)).
    ``value_and_grad(params) -> ((b,), {name: gradient})``: the relative errors and
    their gradients computed by hand (``als_kr.value_and_grad``: no m×n intermediate,
    no autograd); default: autograd through ``method.delta``. ``value_and_grad_for(rows)``
    makes the same function for the targets ``rows`` (a LongTensor) alone: with a
    hand-written gradient, stopped targets leave the batch only when it is given."""
    from tqdm.auto import tqdm

    b = M.shape[0]
    frozen = set(method.frozen)
    # contiguous factors and gradients: the fused kernel reads both as flat buffers
    train = {k: v.detach().clone(memory_format=torch.contiguous_format).requires_grad_(True)
             for k, v in params0.items() if k not in frozen}
    fixed = fixed0 = {k: v.detach() for k, v in params0.items() if k in frozen}
    best = {k: v.detach().clone() for k, v in train.items()}
    norm2 = (M * M).sum((-2, -1)).clamp_min(torch.finfo(M.dtype).tiny)  # (b,)
    best_err = torch.full((b,), math.inf, dtype=torch.float64, device=M.device)
    active = torch.ones(b, dtype=torch.bool, device=M.device)
    diverged = torch.zeros(b, dtype=torch.bool, device=M.device)
    window = window or max(50, steps // 20)
    opt = _adam(list(train.values()), lr)
    compact = (COMPACT if compact is None else compact) and M[0].numel() >= COMPACT_FROM \
        and (value_and_grad is None or value_and_grad_for is not None)
    rows = None  # the targets still in the batch (global indices); None: all of them
    Mr, w0r, norm2r = M, w0, norm2
    # per-step records, preallocated: growing lists of small tensors interleaved with the
    # big temporaries fragment the CPU heap (RSS grew ~linearly with the steps)
    H = torch.zeros(steps + 1, b, dtype=torch.float64, device=M.device)
    BH = torch.zeros(steps + 1, b, dtype=torch.float64, device=M.device)
    bar = tqdm(total=steps, disable=not progress, desc=f"adam {method.name}", leave=False)
    t = 0
    its = torch.zeros(b, dtype=torch.long, device=M.device)
    for t in range(steps + 1):  # the last pass only evaluates
        its.masked_fill_(active, t)
        grads = None
        if value_and_grad is not None:
            with torch.no_grad():
                err, grads = value_and_grad({**train, **fixed})  # (b,), {name: like the factor}
        else:
            D = method.delta({**train, **fixed}, w0r, config)  # (b, m, n)
            err = ((Mr - D) ** 2).sum((-2, -1)) / norm2r  # (b,)
        e = err.detach().double()
        if rows is not None:  # the stopped targets keep their last error
            e = H[t - 1].index_copy(0, rows, e)
        bad = ~torch.isfinite(e) | (e > BLOWUP)
        newly = bad & active
        diverged |= newly
        active &= ~newly
        better = active & (e < best_err)
        best_err = torch.where(better, e, best_err)
        with torch.no_grad():
            for k, v in train.items():  # in place: no new big allocation per step
                if rows is None:
                    torch.where(better.reshape(-1, *([1] * (v.ndim - 1))), v, best[k], out=best[k])
                else:
                    here = better[rows].reshape(-1, *([1] * (v.ndim - 1)))
                    best[k].index_copy_(0, rows, torch.where(here, v, best[k].index_select(0, rows)))
        H[t] = torch.where(torch.isfinite(e), e, best_err)
        BH[t] = best_err
        active &= ~stalled(BH, t, window, tol)  # stopping rule, per target
        if t == steps or not bool(active.any()):
            break
        live = active if rows is None else active[rows]  # (the batch's targets,)
        if grads is None:
            opt.zero_grad(set_to_none=False)
            loss = torch.where(live, err, torch.zeros_like(err)).sum()
            loss.backward()
        else:
            for k, v in train.items():
                v.grad = grads[k].contiguous()
        all_active = bool(live.all())
        with torch.no_grad():
            for v in train.values():
                if v.grad is not None:
                    v.grad.nan_to_num_(0.0, 0.0, 0.0)
                    if not all_active:  # stopped targets stay where they are
                        v.grad.mul_(live.reshape(-1, *([1] * (v.ndim - 1))).to(v.grad))
        if compact and not all_active:  # some targets stopped: the batch is cut to the running ones
            rows = active.nonzero().flatten()
            train, fixed, opt = _cut(train, fixed, opt, live, lr)
            Mr, norm2r = M.index_select(0, rows), norm2.index_select(0, rows)
            w0r = None if w0 is None else w0.index_select(0, rows)
            if value_and_grad is not None:
                value_and_grad = value_and_grad_for(rows)
        for g in opt.param_groups:
            g["lr"] = lr_at(t, steps, lr, schedule)
        opt.step()
        bar.update(1)
        if progress and t % 20 == 0:
            bar.set_postfix(err=f"{float(best_err.mean()):.4g}")
    bar.close()
    out = {**{k: v.detach() for k, v in best.items()}, **fixed0}
    return {k: out[k] for k in params0}, list(H[: t + 1]), its.long().cpu(), diverged


def _cut(train: Params, fixed: Params, opt: torch.optim.Optimizer, keep: Tensor, lr: float):
    """The factors (with their gradients), frozen factors and Adam (moments and step
    count) of the targets ``keep`` (a bool mask over the batch) alone."""
    sel = keep.nonzero().flatten()
    new = {k: v.detach().index_select(0, sel).contiguous().requires_grad_(True) for k, v in train.items()}
    for k, v in train.items():
        if v.grad is not None:
            new[k].grad = v.grad.index_select(0, sel).contiguous()
    new_opt = _adam(list(new.values()), lr)
    for k, v in train.items():
        state = opt.state.get(v, {})
        if state:
            new_opt.state[new[k]] = {n: (x.clone() if n == "step" else x.index_select(0, sel).contiguous())
                                     for n, x in state.items()}
    return new, {k: v.index_select(0, sel) for k, v in fixed.items()}, new_opt
