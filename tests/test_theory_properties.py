"""Properties every registered parameterization must satisfy (hypothesis).

Generic over ``theory.available()``: a family added to the registry is covered
without editing this file. Float64 throughout, so numerical ranks are exact for
generic points.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import theory
from theory.base import lora_budget
from theory.spectra import numerical_rank

METHODS = theory.available()
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
#: relative singular-value tolerance: far below any genuine singular value of a
#: generic float64 product at these sizes, far above round-off of a true zero
RTOL = 1e-10

dims = st.integers(1, 96)



def rank_of(x: torch.Tensor) -> int:
    return int(numerical_rank(x, rtol=RTOL))


def random_w0(m: int, n: int, seed: int, rank: int | None = None, lead=()) -> torch.Tensor:
    """Gaussian (..., m, n) float64, full rank, or of exactly ``rank`` if given."""
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(*lead, m, n, generator=g, dtype=torch.float64)
    L = torch.randn(*lead, m, rank, generator=g, dtype=torch.float64)
    R = torch.randn(*lead, rank, n, generator=g, dtype=torch.float64)
    return L @ R


def generic_scheme(method) -> str:
    return "gaussian" if "gaussian" in method.inits else method.inits[-1]


def trainable_numel(method, params: dict) -> int:
    return sum(t.numel() for k, t in params.items() if k not in method.frozen)


def config_at_rank(method, m, n, r):
    """``config_for_rank`` or None when nothing fits (e.g. full fine-tuning)."""
    try:
        return method.config_for_rank(m, n, r)
    except ValueError as e:
        if "no configuration fits" in str(e):
            return None
        raise


def explicit_configs(name: str, m: int, n: int, r: int) -> list:
    """Hand-written configs beyond the budget-matched one (all valid for m x n, r <= min)."""
    k = min(m, n)
    meth = theory.get_method(name)
    out = {
        "abba": [dict(r1=r, r2=max(1, k // 2))],
        "smoa": [dict(K=min(3, k), r=tuple(range(1, min(3, k) + 1))), dict(K=1, r=r)],
        "pmss": [dict(r=r, select="deim")],
        "alpha_lora": [dict(r=r, lora_alpha=2.0 * r)],
        "hut": [dict(r=r)],
        "lora": [dict(r=r, alpha=4.0, rslora=True)],
    }.get(name, [])
    return [meth.config(**kw) for kw in out]


# --------------------------------------------------------------------------- #
# parameter counts
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", METHODS)
@SETTINGS
@given(m=dims, n=dims, data=st.data())
def test_n_params_equals_number_of_trainable_entries_of_init(name, m, n, data):
    meth = theory.get_method(name)
    r = data.draw(st.integers(1, min(m, n)), label="r")
    budget = data.draw(st.integers(1, m * n + m + n), label="budget")
    configs = [c for c in [config_at_rank(meth, m, n, r)] if c is not None]
    configs += meth.configs_for_budget(m, n, budget)[:1] + explicit_configs(name, m, n, r)
    assume(configs)
    w0 = random_w0(m, n, seed=m * 131 + n)
    for cfg in configs:
        for scheme in meth.inits:
            params = meth.init(w0, cfg, 0, scheme=scheme)
            assert set(meth.frozen) <= set(params) or not meth.frozen
            assert trainable_numel(meth, params) == meth.n_params(m, n, cfg), (cfg, scheme)


# --------------------------------------------------------------------------- #
# rank bounds
# --------------------------------------------------------------------------- #
def _lokr_side_rank(params: dict, i: int) -> int:
    W = params.get(f"W{i}")
    if W is None:
        W = params[f"B{i}"] @ params[f"A{i}"]
    return rank_of(W)


def generic_rank(name: str, m: int, n: int, rank_w0: int, cfg, params: dict) -> int | None:
    """The rank theory says a generic point attains, or None where it says nothing."""
    k = min(m, n)
    if name == "lora":
        return min(cfg.r, k)
    if name == "abba":
        return min(cfg.r1 * cfg.r2, k)
    if name == "loha":
        return min(cfg.r * cfg.r, k)
    if name == "hira":
        return min(cfg.r * rank_w0, k)
    if name == "hut":  # rank(B A − 1) = r + 1 generically
        return min((cfg.r + 1) * rank_w0, k)
    if name == "pmss":
        return min(cfg.r, rank_w0)
    if name == "alpha_lora":
        return min(rank_w0 + cfg.r, k)
    if name == "lokr":
        return _lokr_side_rank(params, 1) * _lokr_side_rank(params, 2)
    if name == "full":
        return k
    return None


@pytest.mark.parametrize("name", METHODS)
@SETTINGS
@given(m=dims, n=dims, data=st.data())
def test_numerical_rank_never_exceeds_bound_and_generic_points_attain_it(name, m, n, data):
    meth = theory.get_method(name)
    k = min(m, n)
    r = data.draw(st.integers(1, k), label="r")
    rank_w0 = data.draw(st.sampled_from([k, data.draw(st.integers(1, k), label="k")]), label="rank_w0")
    cfg = config_at_rank(meth, m, n, r)
    assume(cfg is not None)
    w0 = random_w0(m, n, seed=7 * m + n, rank=None if rank_w0 == k else rank_w0)
    params = meth.init(w0, cfg, 1, scheme=generic_scheme(meth))
    dW = meth.delta(params, w0, cfg)
    assert dW.shape == (m, n)
    rk = rank_of(dW)
    bound = meth.rank_bound(m, n, rank_w0, cfg)
    assert bound <= k
    assert rk <= bound, f"{name} {cfg}: rank {rk} > bound {bound}"
    expected = generic_rank(name, m, n, rank_w0, cfg, params)
    if expected is not None:
        assert rk == expected, f"{name} {cfg}: rank {rk}, generic rank {expected}"


@SETTINGS
@given(m=st.integers(2, 64), n=st.integers(2, 64), data=st.data())
def test_smoa_exact_bound_is_valid_for_its_split_and_attained(m, n, data):
    from theory.methods.smoa import exact_rank_bound
    meth = theory.get_method("smoa")
    k = min(m, n)
    K = data.draw(st.integers(1, min(4, k)), label="K")
    ranks = tuple(data.draw(st.lists(st.integers(1, min(3, k)), min_size=K, max_size=K), label="ranks"))
    rank_w0 = data.draw(st.integers(1, k), label="rank_w0")
    cfg = meth.config(K=K, r=ranks)
    w0 = random_w0(m, n, seed=m + 3 * n, rank=rank_w0)
    dW = meth.delta(meth.init(w0, cfg, 2, "gaussian"), w0, cfg)
    exact = int(exact_rank_bound(w0, cfg))
    assert exact <= meth.rank_bound(m, n, rank_w0, cfg)
    assert rank_of(dW) == exact


def test_smoa_masks_partition_w0_into_nonempty_spectral_groups():
    from theory.methods.smoa import smoa_groups, spectral_masks
    meth = theory.get_method("smoa")
    w0 = random_w0(40, 30, seed=3, lead=(2,))
    cfg = meth.config(K=3, r=2)
    M = spectral_masks(w0, cfg)  # (2, 3, 40, 30)
    torch.testing.assert_close(M.sum(-3), w0)
    s = torch.linalg.svdvals(w0)
    groups = smoa_groups(s, 3)
    for b in range(2):
        counts = torch.bincount(groups[b], minlength=3)
        assert (counts > 0).all() and (groups[b].diff() >= 0).all()
        for kk in range(3):  # rank M_k = |I_k|
            assert rank_of(M[b, kk]) == int(counts[kk])
    # a dominant σ_1 still leaves every group non-empty
    g = smoa_groups(torch.tensor([100.0, 1, 1, 1, 1]), 4)
    assert g.tolist() == [0, 1, 2, 3, 3]


# --------------------------------------------------------------------------- #
# batching and initialization
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", METHODS)
@settings(max_examples=6, deadline=None, derandomize=True)
@given(m=st.integers(1, 24), n=st.integers(1, 24), data=st.data())
def test_delta_of_a_stack_equals_stack_of_single_deltas(name, m, n, data):
    meth = theory.get_method(name)
    r = data.draw(st.integers(1, min(m, n)), label="r")
    cfg = config_at_rank(meth, m, n, r)
    assume(cfg is not None)
    w0 = random_w0(m, n, seed=m * n, lead=(2, 3))
    params = meth.init(w0, cfg, 5, scheme=generic_scheme(meth))
    single_ndim = {k: t.ndim for k, t in meth.init(w0[0, 0], cfg, 5, generic_scheme(meth)).items()}
    stacked = meth.delta(params, w0, cfg)
    assert stacked.shape == (2, 3, m, n)
    for i in range(2):
        for j in range(3):
            p_ij = {k: (t[i, j] if t.ndim == single_ndim[k] + 2 else t) for k, t in params.items()}
            torch.testing.assert_close(stacked[i, j], meth.delta(p_ij, w0[i, j], cfg),
                                       rtol=1e-12, atol=1e-12)


SAME = [n for n in METHODS if theory.get_method(n).same_update(theory.get_method(n).config())]


@pytest.mark.parametrize("name", SAME)
@settings(max_examples=6, deadline=None, derandomize=True)
@given(m=st.integers(1, 24), n=st.integers(1, 24), data=st.data())
def test_a_declared_same_update_is_the_same_function_of_the_same_factors(name, m, n, data):
    """``same_update`` (a sweep then fits the two once): same factor names and shapes,
    the same ΔW bit for bit, the same count and bound; the generic starts the same."""
    meth = theory.get_method(name)
    cfg = config_at_rank(meth, m, n, data.draw(st.integers(1, min(m, n)), label="r"))
    assume(cfg is not None)
    same = meth.same_update(cfg)
    assume(same is not None)
    other, ocfg = theory.get_method(same[0]), same[1]
    w0 = random_w0(m, n, seed=m * n + 1)
    p = meth.init(w0, cfg, 3, "gaussian")
    q = other.init(w0, ocfg, 3, "gaussian")
    assert {k: v.shape for k, v in p.items()} == {k: v.shape for k, v in q.items()}
    assert all(torch.equal(p[k], q[k]) for k in p)
    assert torch.equal(meth.delta(p, w0, cfg), other.delta(p, w0, ocfg))
    assert meth.n_params(m, n, cfg) == other.n_params(m, n, ocfg)
    assert meth.rank_bound(m, n, min(m, n), cfg) == other.rank_bound(m, n, min(m, n), ocfg)


def test_loha_is_abba_at_r1_r2_r_only_without_alpha():
    loha = theory.get_method("loha")
    assert loha.same_update(loha.config(r=5)) == ("abba", theory.get_method("abba").config(r1=5, r2=5))
    assert loha.same_update(loha.config(r=5, alpha=10.0)) is None
    assert SAME == ["loha"]


@pytest.mark.parametrize("name", METHODS)
@settings(max_examples=8, deadline=None, derandomize=True)
@given(m=dims, n=dims, data=st.data())
def test_paper_init_gives_zero_update(name, m, n, data):
    meth = theory.get_method(name)
    cfg = config_at_rank(meth, m, n, data.draw(st.integers(1, min(m, n)), label="r"))
    assume(cfg is not None)
    w0 = random_w0(m, n, seed=m + n)
    dW = meth.delta(meth.init(w0, cfg, 0, "paper"), w0, cfg)
    # exactly zero except where W0 is renormalised (DoRA: ‖W0‖·W0/‖W0‖ − W0)
    assert float(dW.abs().max()) <= 1e-12 * float(w0.abs().max())
    # and a non-paper init moves away from W0 (the check above is not vacuous)
    d_generic = meth.delta(meth.init(w0, cfg, 0, generic_scheme(meth)), w0, cfg)
    assert float(d_generic.abs().max()) > 1e-6


@pytest.mark.parametrize("name", METHODS)
def test_forward_equals_dense_adapted_weight(name):
    meth = theory.get_method(name)
    m, n = 12, 10
    cfg = config_at_rank(meth, m, n, 3)
    if cfg is None:
        cfg = meth.configs_for_budget(m, n, m * n)[0]
    w0 = random_w0(m, n, seed=11, lead=(2,))
    params = meth.init(w0, cfg, 4, generic_scheme(meth))
    x = torch.randn(2, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(meth.forward(x, params, w0, cfg),
                               x @ (w0 + meth.delta(params, w0, cfg)).mT)


def test_hut_paper_init_is_exactly_all_ones_and_every_factor_gets_a_gradient():
    meth = theory.get_method("hut")
    w0 = random_w0(9, 7, seed=0)
    cfg = meth.config(r=3)
    p = meth.init(w0, cfg, 0, "paper")
    assert torch.equal(p["B"] @ p["A"], torch.ones(9, 7, dtype=torch.float64))
    assert torch.equal(meth.weight(p, w0, cfg), w0)
    p = {k: v.requires_grad_() for k, v in p.items()}
    target = random_w0(9, 7, seed=1)
    ((meth.weight(p, w0, cfg) - target) ** 2).sum().backward()
    assert p["B"].grad[:, 1:].abs().sum() > 0 and p["A"].grad.abs().sum() > 0


def test_pmss_skeleton_is_columns_and_rows_of_w0_and_exact_for_rank_r_w0():
    from theory.methods.pmss import skeleton
    w0 = random_w0(20, 15, seed=4, rank=5)
    for select in ("qr", "deim"):
        C, R, U0 = skeleton(w0, 5, select)
        cols = [j for j in range(15) if any(torch.equal(C[:, i], w0[:, j]) for i in range(5))]
        rows = [i for i in range(20) if any(torch.equal(R[k], w0[i]) for k in range(5))]
        assert len(cols) == 5 and len(rows) == 5
        # W0 of rank r is reproduced exactly by its skeleton: W0 = C U0 R
        torch.testing.assert_close(C @ U0 @ R, w0)


# --------------------------------------------------------------------------- #
# Hadamard-product facts
# --------------------------------------------------------------------------- #
@settings(max_examples=25, deadline=None, derandomize=True)
@given(m=st.integers(1, 60), n=st.integers(1, 60), data=st.data())
def test_hadamard_square_rank_at_most_r_r_plus_1_over_2(m, n, data):
    r = data.draw(st.integers(1, min(m, n, 10)), label="r")
    X = random_w0(m, n, seed=m * 7 + n * 3 + r, rank=r)
    rk = rank_of(X * X)
    assert rk <= r * (r + 1) // 2
    assert rk == min(r * (r + 1) // 2, m, n)  # attained generically: the trap is real
    if r * r <= min(m, n) and r > 1:
        Y = random_w0(m, n, seed=m + n + 99, rank=r)
        assert rank_of(X * Y) == r * r > rk  # independent factors do reach r²


@settings(max_examples=25, deadline=None, derandomize=True)
@given(m=st.integers(1, 60), n=st.integers(1, 60), data=st.data())
def test_hadamard_rank_at_most_product_of_ranks(m, n, data):
    r1 = data.draw(st.integers(1, min(m, n)), label="r1")
    r2 = data.draw(st.integers(1, min(m, n)), label="r2")
    X = random_w0(m, n, seed=m + 2 * n + r1, rank=r1)
    Y = random_w0(m, n, seed=m * n + r2 + 17, rank=r2)
    rk = rank_of(X * Y)
    assert rk <= r1 * r2
    assert rk == min(r1 * r2, m, n)


def test_abba_with_both_b_factors_zero_has_all_gradients_zero():
    meth = theory.get_method("abba")
    w0 = random_w0(16, 12, seed=0)
    target = random_w0(16, 12, seed=1)
    cfg = meth.config(r1=3, r2=2)

    def grads(zero):
        p = meth.init(w0, cfg, 0, "gaussian")
        for k in zero:
            p[k] = torch.zeros_like(p[k])
        p = {k: v.requires_grad_() for k, v in p.items()}
        ((w0 + meth.delta(p, w0, cfg) - target) ** 2).sum().backward()
        return {k: float(v.grad.abs().max()) for k, v in p.items()}

    assert all(g == 0.0 for g in grads(["B1", "B2"]).values())
    one = grads(["B2"])  # one zero B: B2 still receives a gradient (ABBA's paper init)
    assert one["B2"] > 0 and one["A1"] == 0 and one["B1"] == 0


# --------------------------------------------------------------------------- #
# budget matching
# --------------------------------------------------------------------------- #
SIZE_FIELDS = ("r", "r1", "r2", "K")


@pytest.mark.parametrize("name", METHODS)
@settings(max_examples=15, deadline=None, derandomize=True)
@given(m=st.integers(1, 200), n=st.integers(1, 200), data=st.data())
def test_configs_for_budget_fit_and_no_larger_neighbour_fits(name, m, n, data):
    meth = theory.get_method(name)
    budget = data.draw(st.integers(1, m * n + m + n), label="budget")
    found = meth.configs_for_budget(m, n, budget)
    if not found:
        # nothing fits: then no candidate at this budget is valid and within it either
        for c in meth.candidate_configs(m, n, budget):
            try:
                meth.validate(m, n, c)
            except ValueError:
                continue
            assert meth.n_params(m, n, c) > budget
        return
    counts = {meth.n_params(m, n, c) for c in found}
    assert len(counts) == 1
    best = counts.pop()
    assert best <= budget
    for c in found:
        meth.validate(m, n, c)
        for f in dataclasses.fields(c):  # growing one size field never fits
            v = getattr(c, f.name)
            if f.name not in SIZE_FIELDS or isinstance(v, bool) or not isinstance(v, int):
                continue
            try:
                bigger = dataclasses.replace(c, **{f.name: v + 1})
                meth.validate(m, n, bigger)
            except (ValueError, TypeError):
                continue
            p = meth.n_params(m, n, bigger)
            # only neighbours the method itself would consider (VeRA, e.g., caps r at min(m, n))
            considered = bigger in meth.candidate_configs(m, n, p)
            if p > best and considered:
                assert p > budget, f"{bigger} has {p} <= {budget} parameters but {c} was chosen"
    # a smaller budget never yields a count above this one's best
    smaller = data.draw(st.integers(1, budget), label="smaller")
    for c in meth.configs_for_budget(m, n, smaller):
        assert meth.n_params(m, n, c) <= min(best, smaller)


@pytest.mark.parametrize("name", METHODS)
def test_config_for_rank_matches_lora_budget(name):
    meth = theory.get_method(name)
    for m, n, r in [(4096, 4096, 16), (768, 3072, 8), (64, 32, 4)]:
        cfg = config_at_rank(meth, m, n, r)
        if cfg is None:  # only full fine-tuning cannot fit in a LoRA budget
            assert name == "full" and m * n > lora_budget(m, n, r)
            continue
        assert meth.n_params(m, n, cfg) <= lora_budget(m, n, r)


def test_pmss_pivots_are_those_of_scipy_column_pivoted_qr():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    from theory.methods.pmss import pivoted_columns
    W = random_w0(40, 30, seed=8, lead=(3,))
    cols = pivoted_columns(W, 30)  # (3, 30), batched
    for b in range(3):
        _, piv = scipy_linalg.qr(W[b].numpy(), mode="r", pivoting=True)
        assert cols[b].tolist() == piv.tolist()
