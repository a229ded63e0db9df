"""Closed forms: LoRA's best rank-r update is the truncated SVD of the target
(Eckart & Young, 1936): ‖M − M_r‖_F² = Σ_{k>r} σ_k², the floor every iterative LoRA
fit must reach. Full fine-tuning reaches M itself.
"""

from __future__ import annotations

from torch import Tensor

from .common import Params, structure, svd_init

#: the closed forms (``Method.closed_form``) solved here; "core" and "shard" are in ``exact``
CLOSED_FORMS = ("truncated_svd", "identity")


def fit_svd(method, M: Tensor, w0: Tensor | None, config, params0: Params) -> Params:
    """The optimal factors of ``method`` for the targets M (b, m, n)."""
    if method.closed_form == "identity":  # ΔW = W: its one trainable factor is M itself
        (name,) = [k for k in params0 if k not in method.frozen]
        return {**params0, name: M.clone()}
    if method.closed_form == "truncated_svd":
        st = structure(method, params0, w0, config)
        if st is None:
            raise ValueError(f"{method.name}: the factors do not have the form s·B A")
        return svd_init(method, M, params0, st)
    raise ValueError(f"{method.name}: no closed-form solver here (the svd solver is for "
                     f"closed forms {', '.join(CLOSED_FORMS)})")
