"""The face-splitting (Khatri-Rao) identity and ABBA's memory-light forward.

(B1 A1) ⊙ (B2 A2) = (B1 ⊙_r B2)(A1ᵀ ⊙_r A2ᵀ)ᵀ, so x ↦ x ΔWᵀ never needs the m x n
update: this file checks the identity, the forward's values, and, with a dispatch
mode that sees every tensor torch allocates, that no m·n-sized tensor is created.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import theory
from theory.khatri_rao import face_split, hadamard_lowrank_factors, hadamard_lowrank_matmul


def randn(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(m=st.integers(1, 40), n=st.integers(1, 40), r1=st.integers(1, 6), r2=st.integers(1, 6),
       batch=st.sampled_from([(), (3,), (2, 2)]))
def test_face_splitting_identity_hadamard_of_low_rank_products(m, n, r1, r2, batch):
    B1, A1 = randn(*batch, m, r1, seed=1), randn(*batch, r1, n, seed=2)
    B2, A2 = randn(*batch, m, r2, seed=3), randn(*batch, r2, n, seed=4)
    L, R = hadamard_lowrank_factors(B1, A1, B2, A2)
    assert L.shape == (*batch, m, r1 * r2) and R.shape == (*batch, n, r1 * r2)
    torch.testing.assert_close(L @ R.mT, (B1 @ A1) * (B2 @ A2), rtol=1e-12, atol=1e-12)
    # and the bound it implies: rank((B1A1) ⊙ (B2A2)) <= r1 r2
    assert int(torch.linalg.matrix_rank((B1 @ A1) * (B2 @ A2)).max()) <= r1 * r2


def test_face_split_row_is_kronecker_of_rows():
    X, Y = randn(5, 3, seed=1), randn(5, 4, seed=2)
    F = face_split(X, Y)
    for i in range(5):
        torch.testing.assert_close(F[i], torch.kron(X[i], Y[i]))


def test_face_split_rejects_different_row_counts():
    with pytest.raises(ValueError, match="row counts differ"):
        face_split(randn(4, 2), randn(5, 2))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(m=st.integers(1, 48), n=st.integers(1, 48), t=st.integers(1, 6),
       r1=st.integers(1, 5), r2=st.integers(1, 5), batch=st.sampled_from([(), (2,), (2, 3)]))
def test_abba_forward_equals_dense_weight_matmul(m, n, t, r1, r2, batch):
    abba = theory.get_method("abba")
    cfg = abba.config(r1=min(r1, m, n), r2=min(r2, m, n), alpha=1.5)
    w0 = randn(*batch, m, n, seed=m * n)
    params = abba.init(w0, cfg, 0, "gaussian")
    x = randn(*batch, t, n, seed=t)
    torch.testing.assert_close(abba.forward(x, params, w0, cfg),
                               x @ (w0 + abba.delta(params, w0, cfg)).mT, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(
        hadamard_lowrank_matmul(x, params["B1"], params["A1"], params["B2"], params["A2"]),
        x @ ((params["B1"] @ params["A1"]) * (params["B2"] @ params["A2"])).mT, rtol=1e-11, atol=1e-11)


class RecordAllocations(TorchDispatchMode):
    """Records the number of elements of every tensor an op *allocates*: outputs that
    share storage with an input (views such as W0ᵀ) are not allocations."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {a.untyped_storage().data_ptr() for a in (*args, *kwargs.values())
                  if isinstance(a, torch.Tensor)}
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in inputs:
                self.sizes.append((str(func), o.numel()))
        return out

    @property
    def largest(self) -> int:
        return max(n for _, n in self.sizes)


def test_abba_forward_allocates_no_m_by_n_tensor_but_materializing_does():
    m = n = 512
    abba = theory.get_method("abba")
    cfg = abba.config(r1=8, r2=8)
    w0 = randn(m, n, seed=0).float()
    params = abba.init(w0, cfg, 0, "gaussian")
    x = randn(4, n, seed=1).float()  # 4 tokens
    with RecordAllocations() as rec:
        y = abba.forward(x, params, w0, cfg)
    assert y.shape == (4, m)
    assert rec.sizes, "the dispatch mode saw no op"
    # the largest intermediate is a (512, 64) face-split factor: O((m + n) r1 r2)
    assert rec.largest < m * n, rec.sizes
    assert rec.largest <= max(m, n) * cfg.r1 * cfg.r2
    with RecordAllocations() as dense:
        y_dense = x @ (w0 + abba.delta(params, w0, cfg)).mT
    assert dense.largest >= m * n  # forming ΔW allocates m·n entries (several times)
    torch.testing.assert_close(y, y_dense, rtol=1e-4, atol=1e-3)


def test_lora_forward_allocates_no_m_by_n_tensor():
    m = n = 512
    lora = theory.get_method("lora")
    cfg = lora.config(r=16)
    w0 = randn(m, n, seed=0).float()
    params = lora.init(w0, cfg, 0, "gaussian")
    with RecordAllocations() as rec:
        lora.forward(randn(4, n, seed=1).float(), params, w0, cfg)
    assert rec.largest < m * n
