"""Hand-written gradients of the relative error for LoRA with scaled rows
(``Method.row_form``), used by Adam and L-BFGS in place of autograd through ΔW.

With V = W0 + s B A (m, n), R = ΔW − M, e = ‖R‖² / ‖M‖² and G = 2 R / ‖M‖² = ∂e/∂ΔW:

    scaled_base (α-LoRA)   W' = diag(α) W0 + s B A
        ∂e/∂α_i = ⟨G_i, W0_i⟩,   ∂e/∂B = s G Aᵀ,   ∂e/∂A = s Bᵀ G
    weight_norm (DoRA)     W' = diag(c) V,  c_i = mag_i / ‖V_i‖
        ∂e/∂mag_i = ⟨G_i, V_i⟩ / ‖V_i‖
        ∂e/∂V_i  = c_i (G_i − (⟨G_i, V_i⟩ / ‖V_i‖²) V_i)     (the row norm's derivative)
        ∂e/∂B = s (∂e/∂V) Aᵀ,   ∂e/∂A = s Bᵀ (∂e/∂V)

Three GEMMs of m n r per evaluation (B A, and the two gradients) and a few passes over
m×n, against autograd's graph, its saved tensors and ``delta``'s input checks at every
step. ΔW is the same expression as the method's ``delta`` (DoRA's exact norm, not PEFT's
detached one), so the values agree to rounding (``tests/test_reconstruction_fit.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import ROW_BLOCK, Params, bmm, row_blocked


def value_and_grad(method, M: Tensor, w0: Tensor, config):
    """fn(params) -> (e (b,), {name: gradient}) for a method with a ``row_form``, else None;
    M, w0: (b, m, n)."""
    if method.row_form is None or method.lora_term is None or w0 is None:
        return None
    kind, v_name = method.row_form
    b_name, a_name = method.lora_term
    s = float(getattr(config, "scale", 1.0))
    nrm = M.pow(2).sum((-2, -1), dtype=torch.float64).clamp_min(1e-300)  # (b,)
    w = (2.0 / nrm).to(M.dtype)[:, None, None]
    if row_blocked(M):
        return _blocked(kind, (v_name, b_name, a_name), M, w0, s, nrm, w)

    def fn(p: Params) -> tuple[Tensor, Params]:
        B, A, v = p[b_name], p[a_name], p[v_name]  # (b, m, r), (b, r, n), (b, m)
        L = B @ A  # (b, m, n)
        if kind == "scaled_base":
            R = (v - 1.0)[..., None] * w0 + s * L - M  # ΔW − M
            G = R * w  # ∂e/∂ΔW
            gv = (G * w0).sum(-1)
            GV = G
        elif kind == "weight_norm":
            V = w0 + s * L
            norm = torch.linalg.vector_norm(V, dim=-1).clamp_min(torch.finfo(V.dtype).tiny)  # (b, m)
            c = v / norm
            R = c[..., None] * V - w0 - M
            G = R * w
            gvv = (G * V).sum(-1)  # ⟨G_i, V_i⟩
            gv = gvv / norm
            GV = c[..., None] * (G - (gvv / (norm * norm))[..., None] * V)
        else:
            raise ValueError(f"{method.name}: unknown row_form {kind!r}")
        e = (R * R).sum((-2, -1), dtype=torch.float64) / nrm
        return e, {v_name: gv, b_name: s * bmm(GV, A.mT), a_name: s * (B.mT @ GV)}

    return fn


def _blocked(kind: str, names: tuple[str, str, str], M: Tensor, w0: Tensor, s: float,
             nrm: Tensor, w: Tensor, rows: int = ROW_BLOCK):
    """The same error and gradients target by target, ``rows`` rows at a time (every
    quantity above is row-wise: α_i, ‖V_i‖, c_i), so each block's m×n intermediates stay in
    cache; 1.38× (DoRA) and 1.41× (α-LoRA) the batched expression on one CPU thread at
    1000×1000, r = 72 (``reconstruction.bench --only i``), and a target's numbers do not
    depend on its batch."""
    v_name, b_name, a_name = names
    b, m, n = M.shape
    rows = max(1, min(rows, m))
    tiny = torch.finfo(M.dtype).tiny

    def fn(p: Params) -> tuple[Tensor, Params]:
        B, A, v = p[b_name], p[a_name], p[v_name]  # (b, m, r), (b, r, n), (b, m)
        gB, gA, gv = torch.empty_like(B), torch.zeros_like(A), torch.empty_like(v)
        row_sq = torch.empty(b, m, dtype=M.dtype, device=M.device)  # ‖R_i‖² per row
        for t in range(b):
            At, wt = A[t], w[t]  # (r, n), (1, 1)
            for i in range(0, m, rows):
                I = slice(i, min(i + rows, m))
                W0, Mi, vi = w0[t, I], M[t, I], v[t, I]  # (k, n), (k, n), (k,)
                L = torch.mm(B[t, I], At)  # (k, n)
                if kind == "scaled_base":
                    R = torch.mul(W0, (vi - 1.0)[:, None]).add_(L, alpha=s).sub_(Mi)  # ΔW − M
                    GV = R * wt  # ∂e/∂ΔW
                    gv[t, I] = (GV * W0).sum(-1)
                else:  # weight_norm
                    V = torch.add(W0, L, alpha=s)
                    norm = torch.linalg.vector_norm(V, dim=-1).clamp_min(tiny)  # (k,)
                    c = vi / norm
                    R = (c[:, None] * V).sub_(W0).sub_(Mi)
                    G = R * wt
                    gvv = (G * V).sum(-1)  # ⟨G_i, V_i⟩
                    gv[t, I] = gvv / norm
                    GV = G.sub_((gvv / (norm * norm))[:, None] * V).mul_(c[:, None])
                row_sq[t, I] = (R * R).sum(-1)
                torch.mm(GV, At.mT, out=gB[t, I])
                gA[t].addmm_(B[t, I].mT, GV)
        e = row_sq.sum(-1, dtype=torch.float64) / nrm
        return e, {v_name: gv, b_name: gB.mul_(s), a_name: gA.mul_(s)}

    return fn
