"""The "lora-warm" start of the Adam-only methods that contain rank-r LoRA (DoRA,
α-LoRA): it sits exactly at the rank-r LoRA optimum, Adam (best iterate kept) ends at
or below it, ``fit`` uses it by default, and the paper init is still selectable.
HUT does not contain LoRA and gets no such start."""

from __future__ import annotations

import math

import pytest
import torch

import theory
from reconstruction.fit import fit, inits_for, lora_optimum, relative_error
from reconstruction.solvers.common import initial_params
from reconstruction.targets import make_target

M_, N_, R_ = 24, 20, 3
#: the methods that declare a LoRA term (``Method.lora_term``)
LORA_CONTAINING = [n for n in theory.available() if theory.get_method(n).lora_term is not None]

# (method, config kwargs): s = 1, and s != 1 (PEFT's α/r, rsLoRA's α/√r)
CASES = [
    ("dora", {"r": R_}),
    ("dora", {"r": R_, "alpha": 16.0}),
    ("dora", {"r": R_, "alpha": 4.0, "rslora": True}),
    ("alpha_lora", {"r": R_}),
    ("alpha_lora", {"r": R_, "lora_alpha": 16.0}),
]


def _data(seed: int = 0, batch: int = 2, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(batch, M_, N_, generator=g, dtype=torch.float64)
    w0 = torch.randn(batch, M_, N_, generator=g, dtype=torch.float64) / math.sqrt(N_)
    return M.to(dtype), w0.to(dtype)


def _id(case):
    name, kw = case
    return name + "".join(f"-{k}={v}" for k, v in kw.items())


def test_lora_containing_methods_offer_lora_warm_and_hut_does_not():
    assert set(LORA_CONTAINING) == {"dora", "alpha_lora"}  # read from the methods' declarations
    for name in LORA_CONTAINING:
        assert "lora-warm" in inits_for(name)
        assert "paper" in inits_for(name)
    assert "lora-warm" not in inits_for("hut")


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_lora_warm_start_has_exactly_the_rank_r_lora_optimal_error(case):
    name, kw = case
    meth = theory.get_method(name)
    config = meth.config(**kw)
    M, w0 = _data()
    opt = lora_optimum(M, R_)  # (b,)
    p = initial_params(meth, M, w0, config, 0, "lora-warm")
    D = meth.delta(p, w0, config)
    assert torch.allclose(relative_error(M, D), opt, atol=1e-5, rtol=0)
    # ΔW is the truncated SVD itself, not just something as good
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    L = U[..., :R_] @ torch.diag_embed(S[..., :R_]) @ Vh[..., :R_, :]
    assert torch.allclose(D, L, atol=1e-10)
    # through fit, steps = 0: the same error, and lora-warm is the default start
    res = fit(name, M, config, w0=w0, solver="adam", steps=0)
    assert res.init.startswith("lora-warm")
    assert torch.allclose(res.rel_error, opt, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", LORA_CONTAINING)
def test_lora_warm_start_in_float32_matches_the_lora_optimum_to_rounding(name):
    meth = theory.get_method(name)
    config = meth.config(r=R_)
    M, w0 = _data(1, dtype=torch.float32)
    res = fit(name, M, config, w0=w0, solver="adam", steps=0)
    assert torch.allclose(res.rel_error, lora_optimum(M.double(), R_), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", LORA_CONTAINING)
@pytest.mark.parametrize("solver", ["adam", "auto"])
def test_adam_from_the_default_start_ends_at_or_below_the_lora_optimum(name, solver):
    meth = theory.get_method(name)
    config = meth.config(r=R_)
    M, w0 = _data(2)
    res = fit(name, M, config, w0=w0, solver=solver, steps=200)
    assert res.solver == "adam" and res.init.startswith("lora-warm")
    assert bool((res.rel_error <= lora_optimum(M, R_) + 1e-6).all())


@pytest.mark.parametrize("name", LORA_CONTAINING)
def test_the_extra_row_parameters_let_adam_beat_rank_r_lora_on_a_generic_target(name):
    # at the warm start ∂e/∂(row scale) ∝ −<R_i, W0_i> != 0, so Adam must move down
    meth = theory.get_method(name)
    M, w0 = _data(3)
    res = fit(name, M, meth.config(r=R_), w0=w0, solver="adam", steps=200)
    assert bool((res.rel_error < lora_optimum(M, R_) - 1e-4).all())


@pytest.mark.parametrize("name", LORA_CONTAINING)
def test_paper_init_is_still_selectable_and_starts_elsewhere(name):
    meth = theory.get_method(name)
    config = meth.config(r=R_)
    M, w0 = _data(4)
    paper = fit(name, M, config, w0=w0, solver="adam", steps=0, init="paper")
    warm = fit(name, M, config, w0=w0, solver="adam", steps=0)
    assert paper.init.startswith("paper") and warm.init.startswith("lora-warm")
    # the paper init is ΔW = 0 (error 1), the warm start is the LoRA optimum (< 1)
    assert torch.allclose(paper.rel_error, torch.ones(2, dtype=torch.float64), atol=1e-12)
    assert bool((warm.rel_error < paper.rel_error - 0.1).all())
    # further restarts use the method's own first init
    both = fit(name, M, config, w0=w0, solver="adam", steps=0, restarts=2)
    assert both.init.startswith("lora-warm+paper")


def test_hut_cannot_hold_a_generic_lora_update():
    # HUT: ΔW = W0 ⊙ (B A − 1). ΔW = L (rank 1) needs B A = 1 + L ⊘ W0, whose rank is
    # generically full (> r for any r < min(m, n)): HUT does not contain LoRA.
    _, w0 = _data(5, batch=1)
    g = torch.Generator().manual_seed(5)
    L = torch.randn(M_, 1, generator=g, dtype=torch.float64) @ torch.randn(1, N_, generator=g,
                                                                           dtype=torch.float64)
    need = 1.0 + L / w0[0]
    assert int(torch.linalg.matrix_rank(need)) == min(M_, N_)


# --------------------------------------------------------------------------- #
# the shared pieces of the starts: truncated factors, the tracked rank-1 split
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("scale", [1.0, -2.5])
def test_truncated_factors_give_the_eckart_young_approximation_times_the_scale(scale):
    from reconstruction.solvers.common import truncated_factors

    Z = make_target("gaussian", (9, 7), batch=2, seed=3, dtype=torch.float64).M
    U, S, Vh = torch.linalg.svd(Z, full_matrices=False)
    B, A = truncated_factors(Z, 3, scale)
    torch.testing.assert_close(scale * B @ A, (U[..., :3] * S[..., None, :3]) @ Vh[..., :3, :])
    torch.testing.assert_close(torch.linalg.vector_norm(B, dim=-2), torch.linalg.vector_norm(A, dim=-1))
    B, A = truncated_factors(Z, 10, scale)  # r above min(m, n) = 7: exact, zero-padded
    assert B.shape == (2, 9, 10) and A.shape == (2, 10, 7)
    torch.testing.assert_close(scale * B @ A, Z)
    assert bool((B[..., 7:] == 0).all() and (A[..., 7:, :] == 0).all())


def test_tracked_rank1_split_is_the_best_rank1_projection_of_each_row():
    from reconstruction.solvers.common import _rank1_split, _rank1_track

    g = torch.Generator().manual_seed(0)
    Z = torch.randn(2, 50, 4 * 3, generator=g, dtype=torch.float64)
    u, w = _rank1_split(Z, 4, 3)
    best = (u[..., :, None] * w[..., None, :]).flatten(-2)
    exact, _v = _rank1_track(Z, 4, 3, None)  # from the exact top vectors
    torch.testing.assert_close(exact, best)
    v0 = torch.randn(2, 50, 3, generator=g, dtype=torch.float64)
    tracked, _ = _rank1_track(Z, 4, 3, v0 / v0.norm(dim=-1, keepdim=True), power=300)
    torch.testing.assert_close(tracked, best, rtol=1e-6, atol=1e-8)
    few, _ = _rank1_track(Z, 4, 3, v0 / v0.norm(dim=-1, keepdim=True), power=1)
    assert float((few - best).abs().max()) > 1e-3  # one step from a random v is not there yet


def test_remembered_decomposition_is_bit_identical_and_keyed_on_content():
    """A start's decomposition of M is computed once per target (a sweep fits each target
    many times) and is exactly what the decomposition gives; any change of M misses."""
    from reconstruction.run import config_for
    from reconstruction.solvers import common

    calls = []

    def eig(Z):
        calls.append(1)
        return torch.linalg.eigh(Z @ Z.mT)[1]

    g = torch.Generator().manual_seed(3)
    Z = torch.randn(2, 40, 30, generator=g, dtype=torch.float64)
    first = common.remembered("test eigh", Z, eig)
    again = common.remembered("test eigh", Z.clone(), eig)
    assert len(calls) == 1 and again is first
    assert torch.equal(first, torch.linalg.eigh(Z @ Z.mT)[1])
    Z2 = Z.clone()
    Z2[1, 5, 7] += 1e-12
    assert not torch.equal(common.remembered("test eigh", Z2, eig), first) and len(calls) == 2
    # the same start from the spectral init, with and without the memory
    M = make_target("sparse", (48, 40), batch=2, seed=1).M
    meth = theory.get_method("abba")
    cfg = config_for(meth, 48, 40, 8)[0]
    w0 = torch.randn(2, 48, 40, generator=g) / 40 ** 0.5
    a = initial_params(meth, M, w0, cfg, 0, "spectral")
    common._DECOMP.clear()
    b = initial_params(meth, M, w0, cfg, 0, "spectral")
    assert all(torch.equal(a[k], b[k]) for k in a)
