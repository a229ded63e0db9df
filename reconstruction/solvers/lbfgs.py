"""Batched L-BFGS on the relative reconstruction error, for every registered method.

Each target b has its own quasi-Newton state, its own step and its own stopping
rule; nothing couples the targets (a single L-BFGS on the summed loss would share
one line search and mix the targets' curvature pairs). With x_b the trainable
factors of target b flattened (P entries), g_b = ∇e_b(x_b), and the last H pairs
s_k = x_{k+1} − x_k, y_k = g_{k+1} − g_k (Nocedal & Wright 2006, Alg. 7.4):

    d_b = −H_b g_b                  two-loop recursion, H_b⁰ = (sᵀy / yᵀy) I, or a
                                    preconditioner's (``precondition``: for ABBA
                                    and LoHa the Gauss-Newton H⁰ of
                                    ``solvers.precondition``)
    x_b ← x_b + t_b d_b             t_b: backtracking (halving) from 1 until
                                    e_b(x + t d) <= e_b(x) + c1 t g_bᵀ d   (Armijo)

Before the first curvature pair the step starts at unit length (t = 1/‖g‖) and is
doubled while the error keeps falling, so a badly scaled gradient (the factors'
scale is arbitrary) does not leave the first steps far too short; a preconditioned
run starts at t = 1 (a Gauss-Newton step has its scale).

A pair with s_kᵀ y_k <= 1e-10 ‖s_k‖ ‖y_k‖ is not stored (the inverse-Hessian estimate
stays positive definite): the targets share one ring of H slots, iteration k writing
slot (k − 1) mod H for all of them, an empty pair (ρ = 0, adding nothing) where a target
stores none, so the two-loop reads whole slots, not a gather per target (at 1000×1000,
r1 = r2 = 36 that gather and the unfused vector updates cost more than the error and
gradient themselves); γ comes from the newest pair stored; a direction that is not a descent direction (gᵀd >= 0)
falls back to −g. A target stops when its error improved by less than ``tol``
(relative) over ``window`` iterations, or when 30 halvings find no decrease.
Every trial point of every target is evaluated in one batched call: the error and
its gradient by autograd through ``method.delta``, or by a hand-written function
(``als_kr.value_and_grad`` for ABBA/LoHa: no m×n intermediate). The errors are kept in
float64; the iterate, gradients and pairs in the factors' dtype (``state_dtype``): in
float32 the vector work of an iteration costs half, and at 1000×1000, r1 = r2 = 36 a
float32 state ends 1000 iterations within 0.0005 of a float64 one (each trajectory
chaotic at that level, either one lower on some targets). Where every target is active
and takes its first trial step (the usual iteration), the trial point becomes the new
point as it is, with no per-target selection.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .adam import BLOWUP
from .common import Params, finish_step, per_target_steps

C1 = 1e-4
HALVINGS = 30


def _autograd_vg(method, M: Tensor, w0, config, fixed: Params):
    norm2 = (M * M).sum((-2, -1)).clamp_min(torch.finfo(M.dtype).tiny)  # (b,)

    def fn(p: Params) -> tuple[Tensor, Params]:
        leaves = {k: v.detach().requires_grad_(True) for k, v in p.items()}
        with torch.enable_grad():
            D = method.delta({**leaves, **fixed}, w0, config)  # (b, m, n)
            err = ((M - D) ** 2).sum((-2, -1)) / norm2  # (b,)
            grads = torch.autograd.grad(err.sum(), list(leaves.values()), allow_unused=True)
        return err.detach(), {k: torch.zeros_like(v) if g is None else g
                              for (k, v), g in zip(leaves.items(), grads)}

    return fn


def run_lbfgs(method, M: Tensor, w0: Tensor | None, config, params0: Params, *, steps: int,
              tol: float = 1e-7, window: int | None = None, history: int = 10,
              progress: bool = False, value_and_grad=None, value_and_grad_for=None,
              state_dtype=None, precondition=None):
    """Returns (best params, per-iteration errors [(b,)...], iterations run per target (b,),
    diverged (b,)),
    like ``adam.run_adam``. ``value_and_grad(params) -> ((b,), {name: gradient})`` over
    the trainable factors; default: autograd through ``method.delta``. ``state_dtype``:
    the dtype of x, g and the curvature pairs (default: the factors'; the errors are float64).
    ``value_and_grad_for(rows)``: the same for those targets alone; then a backtracking
    step evaluates only the targets still backtracking (the others' trial stands), where
    the whole batch was evaluated again whenever one target halved its step.
    ``precondition(params) -> apply(gradients) -> H⁰ gradients``: the two-loop's H⁰ at the
    current point in place of γ I (``solvers.precondition``); its steps have a scale, so
    the first iteration starts at t = 1 like the others."""
    from tqdm.auto import tqdm

    b, dev = M.shape[0], M.device
    frozen = set(method.frozen)
    names = [k for k in params0 if k not in frozen]
    fixed = {k: v.detach() for k, v in params0.items() if k in frozen}
    shapes = [params0[k].shape[1:] for k in names]
    sizes = [math.prod(s) for s in shapes]
    dtype = params0[names[0]].dtype
    sd = dtype if state_dtype is None else state_dtype
    tiny = torch.finfo(sd).tiny
    vg = value_and_grad or _autograd_vg(method, M, w0, config, fixed)

    def split(x: Tensor) -> Params:  # (b', P) -> {name: (b', *shape)} views, x's dtype
        return {k: v.reshape(x.shape[0], *s) for k, v, s in zip(names, torch.split(x, sizes, dim=1), shapes)}

    def flat(p: Params, rows: int) -> Tensor:  # {name: (rows, *shape)} -> (rows, P) state
        return torch.cat([p[k].reshape(rows, -1).to(sd) for k in names], 1)

    def unflat(x: Tensor) -> Params:
        """(b', P) state -> factors in their dtype, each in a buffer of its own: MKL's GEMMs
        round by the operands' alignment, and a view into x (what ``contiguous`` returns for
        one target) is aligned otherwise than a batch's copy."""
        return {k: v.to(dtype, copy=True, memory_format=torch.contiguous_format)
                for k, v in split(x).items()}

    def evaluate(x: Tensor, fn=None, fix: Params | None = None) -> tuple[Tensor, Tensor]:
        """(b',) float64 errors and (b', P) gradients at x (b', P), by ``fn`` (default vg)."""
        with torch.no_grad():
            e, g = (fn or vg)({**unflat(x), **(fixed if fix is None else fix)})
        e = e.double()
        e = torch.where(torch.isfinite(e), e, torch.full_like(e, math.inf))
        gf = flat(g, x.shape[0]).nan_to_num_(0.0, 0.0, 0.0)
        return e, gf

    def evaluate_rows(x: Tensor, rows_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Only the targets in ``rows_mask`` evaluated; the others' entries are inf and 0."""
        if value_and_grad_for is None or bool(rows_mask.all()):
            return evaluate(x)
        rows = rows_mask.nonzero()[:, 0]
        fn = value_and_grad_for(rows)
        es, gs = evaluate(x.index_select(0, rows), fn, {k: v.index_select(0, rows) for k, v in fixed.items()})
        e = torch.full((b,), math.inf, dtype=torch.float64, device=dev).index_copy_(0, rows, es)
        g = torch.zeros_like(x).index_copy_(0, rows, gs)
        return e, g

    if dev.type == "cpu":  # per-target dot products: no (b, P) temporary, batch-blind
        def dot(X: Tensor, Z: Tensor) -> Tensor:  # (b, P), (b, P) -> (b,)
            return torch.stack([torch.dot(X[t], Z[t]) for t in range(b)])
    else:  # one kernel over the batch
        def dot(X: Tensor, Z: Tensor) -> Tensor:
            return (X * Z).sum(1)

    x = flat({k: params0[k].detach() for k in names}, b)  # (b, P)
    e, g = evaluate(x)
    # the pairs of every target in one ring: iteration k writes slot (k - 1) % history for
    # all targets, an empty pair (rho = 0, zeros) where a target stored none, so the
    # two-loop reads contiguous slots (no per-target gather) and an empty pair adds nothing
    S = torch.zeros(history, b, x.shape[1], dtype=sd, device=dev)  # s_k
    Y = torch.zeros_like(S)  # y_k
    rho = torch.zeros(history, b, dtype=sd, device=dev)  # 1 / s_kᵀ y_k, 0 = empty
    gamma = torch.ones(b, dtype=sd, device=dev)  # sᵀy / yᵀy of the newest pair
    active = torch.isfinite(e) & (e < BLOWUP)
    diverged = ~active.clone()
    window = window or 10
    H = torch.zeros(steps + 1, b, dtype=torch.float64, device=dev)
    H[0] = e
    bar = tqdm(total=steps, disable=not progress, desc=f"lbfgs {method.name}", leave=False)
    k = 0
    its = torch.zeros(b, dtype=torch.long, device=dev)
    alpha = torch.zeros(history, b, dtype=sd, device=dev)
    for k in range(1, steps + 1):
        its.masked_fill_(active, k)
        # two-loop recursion over the stored pairs, newest first
        newest_first = [(k - 2 - j) % history for j in range(min(history, k - 1))]
        q = g.clone()
        for i in newest_first:
            a = rho[i] * dot(S[i], q)  # (b,)
            alpha[i] = a
            q.addcmul_(a[:, None], Y[i], value=-1.0)
        if precondition is None:
            r = q.mul_(gamma[:, None])  # H⁰ q, in place
        else:
            Hq = precondition(unflat(x))(split(q))
            r = flat(Hq, b)
        for i in reversed(newest_first):
            beta = rho[i] * dot(Y[i], r)
            r.addcmul_((alpha[i] - beta)[:, None], S[i])
        # the direction is d = −r; a target whose d is no descent direction takes −g
        slope = -dot(g, r)  # (b,) gᵀd
        bad = ~(slope < 0) | ~torch.isfinite(slope)
        if bool(bad.any()):
            r = torch.where(bad[:, None], g, r)
            slope = torch.where(bad, -dot(g, g), slope)
        # no curvature pair yet (and no preconditioner): the step length is unknown
        first = ((rho > 0).sum(0) == 0) & (precondition is None)
        t0 = 1.0 / g.norm(dim=1).clamp_min(tiny)  # |t0 d| = 1 along −g
        t = torch.where(first, t0, torch.ones_like(t0))
        t = torch.where(active, t, torch.zeros_like(t))
        # batched backtracking: every target halves its own t until Armijo holds; where
        # every target is active and takes the first trial (the usual case), the trial
        # point is the new point as it stands (no per-target selection). Targets that
        # stopped are not evaluated (with ``value_and_grad_for``)
        todo = active.clone()
        every = bool(active.all())
        e_new = g_new = x_new = None
        for _ in range(HALVINGS):
            xt = torch.addcmul(x, t[:, None], r, value=-1.0)  # x + t d
            et, gt = evaluate(xt) if x_new is None and every else evaluate_rows(xt, todo)
            ok = todo & (et <= e + C1 * t * slope)
            if x_new is None and bool(ok.all()):
                e_new, g_new, x_new = et, gt, xt
            else:
                if x_new is None:
                    e_new, g_new, x_new = e, g, x
                e_new = torch.where(ok, et, e_new)
                g_new = torch.where(ok[:, None], gt, g_new)
                x_new = torch.where(ok[:, None], xt, x_new)
            todo &= ~ok
            if not bool(todo.any()):
                break
            t = torch.where(todo, t / 2, t)
        # without a curvature pair, a first step that held at once may be far too short
        # (the gradient's scale says nothing of the distance to a minimum): double it
        # while the error keeps falling
        grow = first & active & ~todo & (t == t0)
        for _ in range(HALVINGS if bool(grow.any()) else 0):
            t = torch.where(grow, 2 * t, t)
            xt = torch.addcmul(x, t[:, None], r, value=-1.0)
            et, gt = evaluate(xt)
            ok = grow & (et < e_new)
            e_new = torch.where(ok, et, e_new)
            g_new = torch.where(ok[:, None], gt, g_new)
            x_new = torch.where(ok[:, None], xt, x_new)
            grow &= ok
            if not bool(grow.any()):
                break
        failed = todo  # no decrease found: the target has converged (or is stuck)
        moved = active & ~failed
        slot = (k - 1) % history
        s = torch.sub(x_new, x, out=S[slot])  # the pair, written into its slot
        y = torch.sub(g_new, g, out=Y[slot])
        sy, ss, yy = dot(s, y), dot(s, s), dot(y, y)
        store = moved & (sy > 1e-10 * (ss * yy).sqrt()) & torch.isfinite(1.0 / sy)
        if not bool(store.all()):  # an empty pair where a target stores none
            S[slot].masked_fill_(~store[:, None], 0.0)
            Y[slot].masked_fill_(~store[:, None], 0.0)
        rho[slot] = torch.where(store, 1.0 / torch.where(store, sy, 1.0), 0.0)
        gamma = torch.where(store & (yy > 0), sy / yy.clamp_min(tiny), gamma)
        x, e, g = x_new, e_new, g_new
        H[k] = e
        active &= ~failed
        if progress and k % 20 == 0:
            bar.set_postfix(err=f"{float(e.mean()):.4g}")
        if finish_step(bar, H, k, active, window, tol):
            break
    bar.close()
    return {**unflat(x), **fixed}, list(H[: k + 1]), per_target_steps(its, k), diverged
