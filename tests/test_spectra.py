"""Effective-rank measures against their closed forms (theory.spectra)."""

from __future__ import annotations

import math

import pytest
import torch

from theory import spectra


def orthogonal(k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))[0]


def with_spectrum(sigma, m: int, n: int, seed: int = 0) -> torch.Tensor:
    """U diag(σ) Vᵀ for random orthogonal U (m x m), V (n x n): singular values σ."""
    S = torch.zeros(m, n, dtype=torch.float64)
    s = torch.as_tensor(sigma, dtype=torch.float64)
    S[range(len(s)), range(len(s))] = s
    return orthogonal(m, seed) @ S @ orthogonal(n, seed + 1).mT


@pytest.mark.parametrize("n", [1, 5, 17])
def test_identity_has_every_effective_rank_equal_to_n(n):
    eye = torch.eye(n, dtype=torch.float64)
    assert int(spectra.numerical_rank(eye)) == n
    assert float(spectra.stable_rank(eye)) == pytest.approx(n)
    assert float(spectra.entropy_rank(eye)) == pytest.approx(n)
    assert int(spectra.energy_rank(eye, q=1.0)) == n
    # equal energies: the q-energy rank is ⌈q n⌉
    for q in (0.1, 0.5, 0.9):
        assert int(spectra.energy_rank(eye, q=q)) == math.ceil(q * n - 1e-9)


def test_rank_one_matrix_has_every_effective_rank_one():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(12, 1, generator=g, dtype=torch.float64) @ torch.randn(1, 9, generator=g, dtype=torch.float64)
    out = spectra.summary(W, q=0.99)
    assert int(out["numerical_rank"]) == 1
    assert float(out["stable_rank"]) == pytest.approx(1.0)
    assert float(out["entropy_rank"]) == pytest.approx(1.0)
    assert int(out["energy_rank_0.99"]) == 1


def test_prescribed_spectrum_3_2_1_gives_the_closed_forms():
    W = with_spectrum([3.0, 2.0, 1.0], 8, 6, seed=3)
    assert int(spectra.numerical_rank(W)) == 3
    assert float(spectra.stable_rank(W)) == pytest.approx(14 / 9)  # (9 + 4 + 1) / 9
    p = [1 / 2, 1 / 3, 1 / 6]  # σ / Σσ = (3, 2, 1) / 6
    assert float(spectra.entropy_rank(W)) == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)))
    # energies σ² = 9, 4, 1 of 14: cumulative 9/14, 13/14, 1
    for q, k in [(0.5, 1), (9 / 14, 1), (0.65, 2), (13 / 14, 2), (0.93, 3), (1.0, 3)]:
        assert int(spectra.energy_rank(W, q=q)) == k, q


def test_measures_are_batched_and_match_one_at_a_time():
    Ws = torch.stack([with_spectrum([3.0, 2.0, 1.0], 8, 6, seed=1),
                      with_spectrum([1.0] * 6, 8, 6, seed=2),
                      with_spectrum([5.0], 8, 6, seed=3),
                      torch.zeros(8, 6, dtype=torch.float64)]).reshape(2, 2, 8, 6)
    out = spectra.summary(Ws, q=0.9)
    for key, v in out.items():
        assert v.shape == (2, 2), key
    assert out["numerical_rank"].flatten().tolist() == [3, 6, 1, 0]
    torch.testing.assert_close(out["stable_rank"].flatten(),
                               torch.tensor([14 / 9, 6.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(spectra.entropy_rank(Ws), out["entropy_rank"])
    torch.testing.assert_close(spectra.stable_rank(Ws), out["stable_rank"])
    assert out["energy_rank_0.9"].flatten().tolist() == [2, 6, 1, 0]
    for i in range(2):
        for j in range(2):
            assert int(spectra.numerical_rank(Ws[i, j])) == int(out["numerical_rank"][i, j])


def test_zero_matrix_has_every_effective_rank_zero():
    Z = torch.zeros(5, 7, dtype=torch.float64)
    assert int(spectra.numerical_rank(Z)) == 0
    assert float(spectra.stable_rank(Z)) == 0.0
    assert float(spectra.entropy_rank(Z)) == 0.0
    assert int(spectra.energy_rank(Z)) == 0


def test_numerical_rank_uses_numpys_tolerance():
    # σ = (1, 1e-13): kept at 6x6 (tol ~1.3e-15), dropped with a coarser rtol
    W = with_spectrum([1.0, 1e-13], 6, 6, seed=5)
    assert int(spectra.numerical_rank(W)) == 2
    assert int(spectra.numerical_rank(W, rtol=1e-10)) == 1
    import numpy as np
    assert int(spectra.numerical_rank(W)) == int(np.linalg.matrix_rank(W.numpy()))


def test_energy_rank_rejects_fraction_outside_unit_interval():
    with pytest.raises(ValueError, match="energy fraction"):
        spectra.energy_rank(torch.eye(3), q=1.5)
