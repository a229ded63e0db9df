"""The solvers learn a method's structure from the method's declarations
(``Method.product_terms``, ``product_modulator``, ``closed_form``, ``exact_als``,
``lora_term``), never from its name: a method defined in one place, here in this file
and not registered, gets the same solvers, starts and numbers as the built-in method
of the same form."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import theory
from reconstruction.fit import fit, solvers_for
from reconstruction.solvers import common
from reconstruction.targets import make_target
from theory.base import Config, Method, gaussian, make_generator
from theory.methods.abba import AbbaConfig


class Hadamard(Method):
    """ΔW = s (P1 Q1) ⊙ (P2 Q2): ABBA under other factor names, declared only by
    ``product_terms`` (no solver knows its name)."""

    name = "hadamard_test"
    description = "ABBA with other names"
    citation = "-"
    Config = AbbaConfig
    inits = ("gaussian",)
    product_terms = ((("P1", "Q1"), ("P2", "Q2")),)

    def init(self, w0, config, generator=None, scheme="gaussian"):
        g, lead = make_generator(generator), tuple(w0.shape[:-2])
        m, n = w0.shape[-2:]
        return {"P1": gaussian((*lead, m, config.r1), config.r1 ** -0.5, g, w0),
                "Q1": gaussian((*lead, config.r1, n), 1.0, g, w0),
                "P2": gaussian((*lead, m, config.r2), config.r2 ** -0.5, g, w0),
                "Q2": gaussian((*lead, config.r2, n), 1.0, g, w0)}

    def delta(self, params, w0=None, config=None):
        s = 1.0 if config is None else config.scale
        return s * ((params["P1"] @ params["Q1"]) * (params["P2"] @ params["Q2"]))

    def n_params(self, m, n, config):
        return (config.r1 + config.r2) * (m + n)

    def rank_bound(self, m, n, rank_w0, config):
        return min(config.r1 * config.r2, m, n)

    def candidate_configs(self, m, n, budget):
        return []


@dataclasses.dataclass(frozen=True)
class _NoConfig(Config):
    r: int = 2


class Opaque(Method):
    """ΔW = tanh(B A): no declared structure, so only the gradient solvers apply."""

    name = "opaque_test"
    description = "not linear in its factors"
    citation = "-"
    Config = _NoConfig
    inits = ("gaussian",)

    def init(self, w0, config, generator=None, scheme="gaussian"):
        g, lead = make_generator(generator), tuple(w0.shape[:-2])
        m, n = w0.shape[-2:]
        return {"B": gaussian((*lead, m, config.r), 0.3, g, w0),
                "A": gaussian((*lead, config.r, n), 0.3, g, w0)}

    def delta(self, params, w0=None, config=None):
        return torch.tanh(params["B"] @ params["A"])

    def n_params(self, m, n, config):
        return config.r * (m + n)

    def rank_bound(self, m, n, rank_w0, config):
        return min(m, n)

    def candidate_configs(self, m, n, budget):
        return []


def test_declared_structure_picks_the_solvers_and_starts_without_any_name_list():
    had, opaque = Hadamard(), Opaque()
    assert solvers_for(had) == ["als", "adam", "lbfgs"]
    assert common.is_hadamard_pair(had) and not common.is_low_rank(had)
    assert common.extra_inits(had) == ("lora-warm", "spectral")
    assert solvers_for(opaque) == ["adam", "lbfgs"] and common.extra_inits(opaque) == ()
    # the built-in methods, read the same way
    declared = {n: (theory.get_method(n).closed_form, theory.get_method(n).exact_als,
                    theory.get_method(n).lora_term is not None) for n in theory.available()}
    assert {n for n, d in declared.items() if d[0]} == {"lora", "full", "pmss", "miss"}
    assert {n for n, d in declared.items() if d[1]} == {"vera", "lokr"}
    assert {n for n, d in declared.items() if d[2]} == {"dora", "alpha_lora"}
    assert {n for n in theory.available() if common.is_hadamard_pair(n)} == {"abba", "loha"}
    assert {n for n in theory.available() if theory.get_method(n).product_terms} == {
        "lora", "hira", "hut", "abba", "loha", "smoa"}


@pytest.mark.parametrize("solver,init", [("als", "lora-warm"), ("lbfgs", "lora-warm"),
                                         ("adam", "gaussian")])
def test_a_method_declared_like_abba_is_fitted_to_abbas_numbers_bit_for_bit(solver, init):
    """Same form, other names: the Khatri-Rao ALS, its hand-written gradient (L-BFGS) and
    autograd (Adam) give ABBA's errors exactly."""
    M = make_target("random", (24, 20), batch=2, seed=3).M.double()
    cfg = AbbaConfig(r1=2, r2=3)
    steps = {"als": 12, "lbfgs": 15, "adam": 30}[solver]
    abba = theory.get_method("abba")
    if init == "gaussian":  # the two methods' own inits: same draws under other names
        p0 = {k: v for k, v in Hadamard().init(torch.zeros(2, 24, 20, dtype=torch.float64), cfg, 0).items()}
        ref = fit(abba, M, cfg, solver=solver, steps=steps,
                  params0={"B1": p0["P1"], "A1": p0["Q1"], "B2": p0["P2"], "A2": p0["Q2"]})
        got = fit(Hadamard(), M, cfg, solver=solver, steps=steps, params0=p0)
    else:
        ref = fit(abba, M, cfg, solver=solver, init=init, steps=steps)
        got = fit(Hadamard(), M, cfg, solver=solver, init=init, steps=steps)
    assert got.solver == ref.solver == solver
    assert torch.equal(got.rel_error, ref.rel_error)
    assert set(got.params) == {"P1", "Q1", "P2", "Q2"}


def test_a_method_without_declared_structure_gets_no_als_and_still_fits_by_gradient():
    M = make_target("random", (12, 10), batch=1, seed=0).M.double()
    with pytest.raises(ValueError, match="not available"):
        fit(Opaque(), M, _NoConfig(), solver="als")
    res = fit(Opaque(), M, _NoConfig(), steps=50)
    assert res.solver == "adam" and float(res.rel_error[0]) < 1.0
