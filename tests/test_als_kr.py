"""The Khatri-Rao ALS for s (B1 A1) ⊙ (B2 A2): its row solves are the exact least
squares ones, its error expansion equals the explicit error, it reads the targets
in two GEMMs per sweep and forms nothing of size m×n, and it lands where the
generic ALS lands."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import theory
from reconstruction import fit as F
from reconstruction.solvers import als_kr
from reconstruction.solvers.common import initial_params, structure
from reconstruction.targets import make_target


def _setup(m=12, n=10, r1=2, r2=3, batch=2, dtype=torch.float64, seed=0, method="abba"):
    meth = theory.get_method(method)
    cfg = meth.config(r1=r1, r2=r2) if method == "abba" else meth.config(r=r1)
    M = make_target("random", (m, n), batch=batch, seed=seed, dtype=dtype).M
    w0 = torch.randn(batch, m, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    p = initial_params(meth, M, w0, cfg, seed, "gaussian")
    g = torch.Generator().manual_seed(seed + 1)
    p = {k: torch.randn(v.shape, generator=g, dtype=dtype) for k, v in p.items()}
    st = structure(meth, p, w0, cfg)
    return meth, cfg, M, w0, p, st


def _explicit(M, st, p):
    return F.relative_error(M.double(), st.delta(p).double())


def test_b_half_rows_are_the_dense_least_squares_solutions():
    _meth, _cfg, M, _w0, p, st = _setup()
    sol = als_kr.KRALS(M, st.scale)
    prep = sol.prepare(p)
    q, s = prep.p, st.scale
    B1, B2 = sol._half(q["B1"], q["B2"], prep.P, prep.H)  # B1 given B2, then B2 given B1
    b, m, _ = B1.shape
    for t in range(b):
        for i in range(m):
            c = q["B2"][t, i] @ q["A2"][t]  # (n,) the other pair's row
            D = s * q["A1"][t] * c  # (r1, n): row i of ΔW is b1ᵀ D
            want = torch.linalg.lstsq(D.mT, M[t, i][:, None]).solution[:, 0]
            torch.testing.assert_close(B1[t, i], want, rtol=1e-7, atol=1e-9)
            c1 = B1[t, i] @ q["A1"][t]
            D2 = s * q["A2"][t] * c1
            want2 = torch.linalg.lstsq(D2.mT, M[t, i][:, None]).solution[:, 0]
            torch.testing.assert_close(B2[t, i], want2, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_error_expansion_equals_the_explicit_error(dtype, tol):
    _meth, _cfg, M, _w0, p, st = _setup(m=40, n=30, dtype=dtype)
    sol = als_kr.KRALS(M, st.scale)
    prep = sol.prepare(p)
    torch.testing.assert_close(prep.err, _explicit(M, st, prep.p), rtol=0, atol=tol)
    new, e = sol.sweep(prep)
    torch.testing.assert_close(e, _explicit(M, st, new), rtol=0, atol=tol)
    # the gauge changes (QR, balance) leave ΔW unchanged
    torch.testing.assert_close(st.delta(prep.p), st.delta(p), rtol=1e-4 if dtype == torch.float32
                               else 1e-10, atol=1e-5 if dtype == torch.float32 else 1e-12)


_VIEWS = ("view", "expand", "transpose", "alias", "permute", "as_strided", "slice", "select",
          "unsqueeze", "squeeze", "detach", ".t.")


class _Reads(TorchDispatchMode):
    """Records, per op, whether an input or the output has at least ``big`` elements."""

    def __init__(self, big: int):
        super().__init__()
        self.big, self.reads, self.writes = big, [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [a for a in tree_flatten((args, kwargs))[0] if torch.is_tensor(a)]
        outs = [o for o in tree_flatten(out)[0] if torch.is_tensor(o)]
        if any(v in str(func) for v in _VIEWS):
            return out
        if any(a.numel() >= self.big for a in ins):
            self.reads.append(str(func))
        if any(o.numel() >= self.big for o in outs):
            self.writes.append(str(func))
        return out


def test_a_sweep_reads_the_targets_in_two_gemms_and_forms_nothing_m_by_n():
    _meth, _cfg, M, _w0, p, st = _setup(m=96, n=80, r1=2, r2=2, batch=1)
    sol = als_kr.KRALS(M, st.scale)
    prep = sol.prepare(p)
    with _Reads(96 * 80) as rec:
        new, _e = sol.sweep(prep)
        sol.prepare(new, err=False)
    assert len(rec.reads) == 2 and all("mm" in r for r in rec.reads), rec.reads
    assert rec.writes == [], rec.writes


@pytest.mark.parametrize("method", ["abba", "loha"])
@pytest.mark.parametrize("kind", ["random", "sparse", "lowrank"])
def test_khatri_rao_and_generic_als_reach_the_same_error(method, kind, monkeypatch):
    """Different sweep orders may stop at different stationary points from one start;
    the best of three full runs (lora-warm, spectral from seeds 0 and 1) is the same."""
    meth = theory.get_method(method)
    cfg = meth.config(r1=2, r2=2) if method == "abba" else meth.config(r=2)
    M = make_target(kind, (48, 40), batch=3, seed=4, dtype=torch.float64).M

    def best_of_three():
        runs = [F.fit(method, M, cfg, solver="als", steps=300, tol=1e-12, init=i, seed=s)
                for i, s in (("lora-warm", 0), ("spectral", 0), ("spectral", 1))]
        return torch.stack([r.rel_error for r in runs]).min(0).values

    kr = best_of_three()
    monkeypatch.setattr(als_kr, "applies", lambda *a, **k: False)
    gen = best_of_three()
    torch.testing.assert_close(kr, gen, rtol=5e-3, atol=1e-6)


def test_applies_chooses_khatri_rao_only_while_r1_r2_is_small():
    def st_for(r1, r2, m, n, method="abba"):
        meth = theory.get_method(method)
        cfg = meth.config(r1=r1, r2=r2)
        w0 = torch.zeros(1, m, n)
        p = initial_params(meth, w0, w0, cfg, 0, "gaussian")
        return structure(meth, p, w0, cfg), p

    st, p = st_for(8, 8, 1000, 1000)
    assert als_kr.applies(st, p, 1000, 1000)
    st, p = st_for(36, 36, 1000, 1000)
    assert not als_kr.applies(st, p, 1000, 1000)
    lora = theory.get_method("lora")
    cfg = lora.config(r=4)
    w0 = torch.zeros(1, 50, 40)
    pl = initial_params(lora, w0, w0, cfg, 0, "gaussian")
    assert not als_kr.applies(structure(lora, pl, w0, cfg), pl, 50, 40)


@pytest.mark.parametrize("method,r1,r2", [("abba", 2, 3), ("abba", 3, 1), ("loha", 2, 2)])
def test_hand_written_khatri_rao_gradient_equals_autograd_of_the_dense_error(method, r1, r2):
    _meth, _cfg, M, _w0, p, st = _setup(m=23, n=17, r1=r1, r2=r2, batch=3, method=method)
    e, g = als_kr.value_and_grad(M, st)(p)
    leaves = {k: v.clone().requires_grad_(True) for k, v in p.items()}
    dense = _explicit(M, st, leaves)  # (b,) through ΔW = s (B1 A1) ⊙ (B2 A2)
    torch.testing.assert_close(e, dense.detach(), rtol=1e-10, atol=1e-12)
    want = torch.autograd.grad(dense.sum(), [leaves[k] for k in als_kr.NAMES])
    for k, w in zip(als_kr.NAMES, want):
        assert g[k].shape == p[k].shape
        torch.testing.assert_close(g[k], w, rtol=1e-9, atol=1e-12)


def test_adam_on_the_khatri_rao_error_follows_the_same_trajectory_as_on_delta(monkeypatch):
    cfg = theory.get_method("abba").config(r1=2, r2=3)
    M = make_target("random", (64, 48), batch=2, seed=1, dtype=torch.float64).M
    assert F._kr_value_and_grad(theory.get_method("abba"), M, M, cfg,
                                  initial_params(theory.get_method("abba"), M, M, cfg, 0,
                                                 "paper")) is not None
    kr = F.fit("abba", M, cfg, solver="adam", steps=150, tol=0)
    monkeypatch.setattr(F, "_kr_value_and_grad", lambda *a: None)
    dense = F.fit("abba", M, cfg, solver="adam", steps=150, tol=0)
    torch.testing.assert_close(torch.tensor(kr.history), torch.tensor(dense.history),
                               rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(kr.rel_error, dense.rel_error, rtol=1e-9, atol=1e-12)


def test_gradient_solvers_use_the_khatri_rao_gradient_only_at_small_r1_r2():
    """Adam and L-BFGS take the hand-written Khatri-Rao gradient while its flops stay
    under the gradient through ΔW; beyond (r1 = r2 = 16 at 1000×1000) the one through ΔW
    (written out: ``dense_value_and_grad``), even where the Khatri-Rao ALS still applies."""
    assert als_kr.gradient_cheaper(8, 8, 1000, 1000) and als_kr.gradient_cheaper(4, 4, 256, 256)
    assert not als_kr.gradient_cheaper(16, 16, 1000, 1000) and als_kr.cheaper(16, 16, 1000, 1000)
    meth = theory.get_method("abba")
    M = make_target("random", (1000, 1000), seed=0).M
    for r, kr in ((8, True), (16, False)):
        cfg = meth.config(r1=r, r2=r)
        p0 = initial_params(meth, M, M, cfg, 0, "gaussian")
        got = F._kr_value_and_grad(meth, M, M, cfg, p0)
        assert (got.__qualname__.split(".")[0] == "value_and_grad") == kr
