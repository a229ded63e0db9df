"""Closed forms: LoRA's best rank-r update is the truncated SVD of the target
(Eckart & Young, 1936): ‖M − M_r‖_F² = Σ_{k>r} σ_k², the floor every iterative LoRA
fit must reach. Full fine-tuning reaches M itself.
"""

from __future__ import annotations

from torch import Tensor

from .common import Params, structure, svd_init

#: methods with a closed-form best fit
CLOSED_FORM = ("lora", "full")


def fit_svd(method, M: Tensor, w0: Tensor | None, config, params0: Params) -> Params:
    """The optimal factors of ``method`` for the targets M (b, m, n)."""
    if method.name == "full":
        return {"W": M.clone()}
    if method.name == "lora":
        st = structure(method, params0, w0, config)
        if st is None:
            raise ValueError("lora: the factors do not have the form s·B A")
        return svd_init(method, M, params0, st)
    raise ValueError(f"{method.name}: no closed-form solver (the svd solver is for "
                     f"{', '.join(CLOSED_FORM)})")
