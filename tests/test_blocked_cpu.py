"""The row-blocked one-thread CPU evaluations (the Figure 2 grid's workers run one thread
each) give the batched expressions' numbers, and each target's numbers do not depend on
its batch: ``solvers.rowscale`` (DoRA, α-LoRA) and ``als.structure_error`` (the ALS
families' error per sweep)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import theory
from reconstruction.solvers import als, rowscale
from reconstruction.solvers.common import Structure, Term

B_, M_, N_ = 3, 300, 170  # 300 rows: two full blocks of 128 and a partial one


@contextlib.contextmanager
def threads(k: int):
    old = torch.get_num_threads()
    torch.set_num_threads(k)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("name", ["dora", "alpha_lora"])
def test_blocked_row_form_gradient_equals_the_batched_one_and_is_batch_blind(name):
    meth = theory.get_method(name)
    kind, v_name = meth.row_form
    bn, an = meth.lora_term
    g = torch.Generator().manual_seed(0)
    M = torch.randn(B_, M_, N_, generator=g)
    w0 = torch.randn(B_, M_, N_, generator=g) / N_ ** 0.5
    p = {bn: 0.1 * torch.randn(B_, M_, 6, generator=g), an: torch.randn(B_, 6, N_, generator=g),
         v_name: 1 + 0.1 * torch.randn(B_, M_, generator=g)}
    if kind == "weight_norm":  # DoRA's magnitudes start at the row norms of W0
        p[v_name] = torch.linalg.vector_norm(w0, dim=-1) * (1 + 0.1 * torch.randn(B_, M_, generator=g))
    cfg = type("Cfg", (), {"scale": 0.7})()
    _check_blocked(lambda i: rowscale.value_and_grad(meth, *((M, w0) if i is None else
                                                           (M[i:i + 1], w0[i:i + 1])), cfg), p)


def _check_blocked(make, p):
    """``make(None)``: the batch's value_and_grad, ``make(i)``: target i's alone. Built with
    two threads (the batched expression) and one (row-blocked): the same errors and
    gradients, and the blocked numbers of each target are its lone numbers, bit for bit."""
    with threads(2):
        batched = make(None)
    with threads(1):
        blocked = make(None)
        e1, g1 = batched(p)
        e2, g2 = blocked(p)
        assert float(((e1 - e2) / e1).abs().max()) < 1e-6
        for k in g1:
            assert _rel(g2[k], g1[k]) < 1e-5, k
        for i in range(B_):
            ei, gi = make(i)({k: v[i:i + 1] for k, v in p.items()})
            assert torch.equal(ei, e2[i:i + 1]) and all(torch.equal(gi[k], g2[k][i:i + 1]) for k in g2)


def _structures(g):
    W0 = torch.randn(B_, M_, N_, generator=g)
    pair = {"B": torch.randn(B_, M_, 5, generator=g), "A": torch.randn(B_, 5, N_, generator=g)}
    smoa = {**{f"B{k}": torch.randn(B_, M_, 2, generator=g) for k in range(3)},
            **{f"A{k}": torch.randn(B_, 2, N_, generator=g) for k in range(3)}}
    abba = {"B1": torch.randn(B_, M_, 4, generator=g), "A1": torch.randn(B_, 4, N_, generator=g),
            "B2": torch.randn(B_, M_, 3, generator=g), "A2": torch.randn(B_, 3, N_, generator=g)}
    return [
        ("hira", Structure([Term([("B", "A")], W0)], 0.7), pair),
        ("hut", Structure([Term([("B", "A")], W0)], 0.7, offset=0.3 * W0), pair),
        ("smoa", Structure([Term([(f"B{k}", f"A{k}")], W0 * (k + 1)) for k in range(3)], 1.3), smoa),
        ("abba", Structure([Term([("B1", "A1"), ("B2", "A2")], None)], 0.2), abba),
        ("lora", Structure([Term([("B", "A")], None)], 2.0), pair),
    ]


def _one(st: Structure, i: int) -> Structure:
    return Structure([Term(t.pairs, None if t.fixed is None else t.fixed[i:i + 1]) for t in st.terms],
                     st.scale, None if st.offset is None else st.offset[i:i + 1])


def test_structure_error_is_the_relative_error_of_delta_and_batch_blind():
    g = torch.Generator().manual_seed(1)
    M = torch.randn(B_, M_, N_, generator=g)
    for name, st, p in _structures(g):
        ref = als.rel_error(M, st.delta(p))
        with threads(1):
            e = als.structure_error(st, M, p)
            alone = torch.cat([als.structure_error(_one(st, i), M[i:i + 1], {k: v[i:i + 1] for k, v in p.items()})
                               for i in range(B_)])
        assert float(((e - ref) / ref).abs().max()) < 1e-5, name
        assert torch.equal(alone, e), name
        with threads(2):  # several threads: through ΔW, the same numbers as rel_error
            assert torch.equal(als.structure_error(st, M, p), ref), name


@pytest.mark.parametrize("name", ["hira", "hut", "smoa"])
def test_blocked_modulated_gradient_equals_the_batched_one_and_is_batch_blind(name):
    from reconstruction.solvers import modulated

    g = torch.Generator().manual_seed(2)
    st, p = next((st, p) for n, st, p in _structures(g) if n == name)
    M = torch.randn(B_, M_, N_, generator=g)
    _check_blocked(lambda i: modulated.value_and_grad(M, st) if i is None else
                   modulated.value_and_grad(M[i:i + 1], _one(st, i)), p)
