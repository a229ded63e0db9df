"""Our PEFT-backed families agree with the `peft` package on the same factors.

For each family, a one-layer model ``nn.Linear(n, m)`` is wrapped by PEFT, every
adapter tensor PEFT created is overwritten with random non-zero values, the same
values are copied into our params dict, and our ΔW (or W' = W0 + ΔW) is compared
with PEFT's ``get_delta_weight`` and with the weight PEFT merges. PEFT's own
defaults (alpha = 8 etc.) are used, so the scalings are checked too.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

import theory
from theory.methods.lokr import factorization

ADAPTER = "default"
# (m, n) = (d_out, d_in): non-square both ways
SHAPES = [(20, 12), (24, 16), (16, 24)]
TOL = {torch.float32: {"rtol": 1e-6, "atol": 1e-6}, torch.float64: {"rtol": 1e-12, "atol": 1e-12}}


class OneLinear(nn.Module):
    def __init__(self, n: int, m: int):
        super().__init__()
        self.lin = nn.Linear(n, m)

    def forward(self, x):
        return self.lin(x)


def wrap(peft_config, m: int, n: int, dtype: torch.dtype, seed: int):
    """A PEFT-wrapped ``nn.Linear(n, m)`` whose adapter tensors all hold random values."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(OneLinear(n, m), peft_config).to(dtype)
    layer = model.base_model.model.lin
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in itertools.chain(layer.named_parameters(), layer.named_buffers()):
            if name.startswith("base_layer"):
                continue
            t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64))
    w0 = layer.get_base_layer().weight.detach().clone()
    return layer, w0


def tensor(d, key=ADAPTER):
    """The tensor of adapter ``key`` in a PEFT ParameterDict / BufferDict / ModuleDict."""
    t = d[key]
    return (t.weight if isinstance(t, nn.Module) else t).detach().clone()


# --------------------------------------------------------------------------- #
# one case per (family, PEFT option): PEFT config, our config, factor mapping,
# and PEFT's ΔW in our convention
# --------------------------------------------------------------------------- #
def case_lora(m, n, rslora=False):
    r = 3
    pc = peft.LoraConfig(r=r, target_modules=["lin"], use_rslora=rslora)
    cfg = theory.get_method("lora").config(r=r, alpha=pc.lora_alpha, rslora=rslora)
    params = lambda L: {"B": tensor(L.lora_B), "A": tensor(L.lora_A)}
    ref = lambda L, w0: L.get_delta_weight(ADAPTER)
    return "lora", pc, cfg, params, ref


def case_dora(m, n):
    r = 3
    pc = peft.LoraConfig(r=r, target_modules=["lin"], use_dora=True)
    cfg = theory.get_method("dora").config(r=r, alpha=pc.lora_alpha)

    def params(L):
        mag = tensor(L.lora_magnitude_vector).abs() + 0.5  # a positive magnitude
        with torch.no_grad():
            L.lora_magnitude_vector[ADAPTER].weight.copy_(mag)
        return {"B": tensor(L.lora_B), "A": tensor(L.lora_A), "magnitude": mag}

    return "dora", pc, cfg, params, None  # PEFT's DoRA ΔW is only visible through merging


def case_hira(m, n):
    r = 3
    pc = peft.HiraConfig(r=r, target_modules=["lin"])
    cfg = theory.get_method("hira").config(r=r)
    params = lambda L: {"B": tensor(L.hira_B), "A": tensor(L.hira_A)}
    # PEFT's get_delta_weight is the multiplier B A; the additive update is W0 ⊙ (B A)
    ref = lambda L, w0: w0 * L.get_delta_weight(ADAPTER)
    return "hira", pc, cfg, params, ref


def case_loha(m, n):
    r = 4
    pc = peft.LoHaConfig(r=r, target_modules=["lin"])
    cfg = theory.get_method("loha").config(r=r, alpha=pc.alpha)
    params = lambda L: {"B1": tensor(L.hada_w1_a), "A1": tensor(L.hada_w1_b),
                        "B2": tensor(L.hada_w2_a), "A2": tensor(L.hada_w2_b)}
    return "loha", pc, cfg, params, lambda L, w0: L.get_delta_weight(ADAPTER)


def case_lokr(m, n, r=2, decompose_both=False, decompose_factor=-1):
    pc = peft.LoKrConfig(r=r, target_modules=["lin"], decompose_both=decompose_both,
                         decompose_factor=decompose_factor)
    cfg = theory.get_method("lokr").config(r=r, alpha=pc.alpha, decompose_both=decompose_both,
                                           decompose_factor=decompose_factor)
    names = {"W1": "lokr_w1", "B1": "lokr_w1_a", "A1": "lokr_w1_b",
             "W2": "lokr_w2", "B2": "lokr_w2_a", "A2": "lokr_w2_b"}

    def params(L):
        return {ours: tensor(getattr(L, theirs)) for ours, theirs in names.items()
                if ADAPTER in getattr(L, theirs)}

    return "lokr", pc, cfg, params, lambda L, w0: L.get_delta_weight(ADAPTER)


def case_miss(m, n, mode="balance", r=4, mini_r=None):
    init = {"balance": True, "bat": "bat", "mini": "mini"}[mode]
    pc = peft.MissConfig(r=r, target_modules=["lin"], init_weights=init, mini_r=mini_r or 1)
    cfg = theory.get_method("miss").config(r=r, mode=mode, mini_r=mini_r)
    params = lambda L: {"D": tensor(L.miss_block)}
    if mode == "bat":  # only bat has an additive get_delta_weight(adapter, W0)
        return "miss", pc, cfg, params, lambda L, w0: L.get_delta_weight(ADAPTER, w0.clone())
    # balance/mini: get_delta_weight_miss returns the full weight W0 + ΔW
    return "miss", pc, cfg, params, lambda L, w0: L.get_delta_weight_miss(ADAPTER, w0.clone()) - w0


def case_vera(m, n):
    r = 5
    pc = peft.VeraConfig(r=r, target_modules=["lin"])
    cfg = theory.get_method("vera").config(r=r)
    params = lambda L: {"A": tensor(L.vera_A)[:, :n], "B": tensor(L.vera_B)[:m, :],
                        "d": tensor(L.vera_lambda_d), "b": tensor(L.vera_lambda_b)}
    return "vera", pc, cfg, params, lambda L, w0: L.get_delta_weight(ADAPTER)


CASES = {
    "lora": case_lora,
    "lora-rslora": lambda m, n: case_lora(m, n, rslora=True),
    "dora": case_dora,
    "hira": case_hira,
    "loha": case_loha,
    "lokr-lowrank-w2": lambda m, n: case_lokr(m, n, r=2),
    "lokr-full-w2": lambda m, n: case_lokr(m, n, r=8),
    "lokr-decompose-both": lambda m, n: case_lokr(m, n, r=1, decompose_both=True, decompose_factor=2),
    "lokr-factor-4": lambda m, n: case_lokr(m, n, r=2, decompose_factor=4),
    "miss-balance": case_miss,
    "miss-balance-ragged": lambda m, n: case_miss(m, n, r=5),  # r does not divide n=12,16,24
    "miss-bat": lambda m, n: case_miss(m, n, mode="bat"),
    "miss-mini": lambda m, n: case_miss(m, n, mode="mini", r=4, mini_r=4),
    "vera": case_vera,
}
DTYPES = [torch.float32, torch.float64]


def _build(case, m, n, dtype):
    name, pc, cfg, get_params, ref = CASES[case](m, n)
    layer, w0 = wrap(pc, m, n, dtype, seed=m * 100 + n)
    return theory.get_method(name), cfg, layer, w0, get_params(layer), ref


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("case", [c for c in CASES if c != "dora"])
def test_delta_matches_peft_get_delta_weight(case, shape, dtype):
    M, cfg, layer, w0, params, ref = _build(case, *shape, dtype)
    ours = M.delta(params, w0, cfg)
    theirs = ref(layer, w0).detach()
    assert ours.dtype == dtype and ours.shape == w0.shape
    assert float(theirs.abs().max()) > 0.1  # the factors really are non-zero
    torch.testing.assert_close(ours, theirs, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("case", list(CASES))
def test_adapted_weight_matches_peft_merged_weight(case, shape, dtype):
    M, cfg, layer, w0, params, _ = _build(case, *shape, dtype)
    ours = M.weight(params, w0, cfg)  # W0 + ΔW
    layer.merge(safe_merge=True)
    merged = layer.get_base_layer().weight.detach()
    assert float((merged - w0).abs().max()) > 1e-3  # the merge changed the weight
    torch.testing.assert_close(ours, merged, **TOL[dtype])


@pytest.mark.parametrize("case", ["lora", "dora", "hira", "loha", "lokr-lowrank-w2", "miss-balance-ragged",
                                  "miss-bat", "miss-mini", "vera"])
def test_forward_matches_peft_layer_output(case):
    m, n = 24, 16
    M, cfg, layer, w0, params, _ = _build(case, m, n, torch.float64)
    x = torch.randn(7, n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    bias = layer.get_base_layer().bias.detach()
    with torch.no_grad():
        theirs = layer(x) - bias
    torch.testing.assert_close(M.forward(x, params, w0, cfg), theirs, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- #
# properties of our modules alone
# --------------------------------------------------------------------------- #
OURS = {  # a config per (method, mode) on a 24 x 16 matrix
    "hira": {"r": 3},
    "loha": {"r": 3, "alpha": 5.0},
    "lokr": {"r": 2, "alpha": 3.0},
    "lokr-full": {"r": 8},
    "lokr-both": {"r": 1, "decompose_both": True, "decompose_factor": 2},
    "miss": {"r": 5},
    "miss-bat": {"r": 4, "mode": "bat"},
    "miss-mini": {"r": 4, "mode": "mini", "mini_r": 8},
    "dora": {"r": 3, "alpha": 6.0},
    "vera": {"r": 6},
}


def _ours(key):
    M = theory.get_method(key.split("-")[0])
    return M, M.config(**OURS[key])


def test_peft_backed_methods_are_registered():
    names = theory.available()
    for name in ("lora", "hira", "loha", "lokr", "miss", "dora", "vera"):
        assert name in names
        M = theory.get_method(name)
        assert M.peft_name is not None and M.inits[0] == "paper" and "gaussian" in M.inits


@pytest.mark.parametrize("key", list(OURS))
def test_delta_of_a_stack_is_the_stack_of_deltas(key):
    M, cfg = _ours(key)
    w0 = torch.randn(3, 2, 24, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    params = M.init(w0, cfg, 7, scheme="gaussian")
    stacked = M.delta(params, w0, cfg)
    assert stacked.shape == w0.shape
    for i, j in itertools.product(range(3), range(2)):
        single = M.delta({k: v[i, j] for k, v in params.items()}, w0[i, j], cfg)
        torch.testing.assert_close(stacked[i, j], single, rtol=1e-12, atol=1e-12)
    assert float(stacked.abs().max()) > 1e-3


@pytest.mark.parametrize("key", list(OURS))
def test_forward_equals_x_times_adapted_weight(key):
    M, cfg = _ours(key)
    g = torch.Generator().manual_seed(2)
    w0 = torch.randn(2, 24, 16, dtype=torch.float64, generator=g)
    x = torch.randn(2, 5, 16, dtype=torch.float64, generator=g)
    params = M.init(w0, cfg, 8, scheme="gaussian")
    torch.testing.assert_close(M.forward(x, params, w0, cfg), x @ M.weight(params, w0, cfg).mT,
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("key", list(OURS))
def test_paper_init_gives_zero_update(key):
    M, cfg = _ours(key)
    w0 = torch.randn(2, 24, 16, generator=torch.Generator().manual_seed(4))
    params = M.init(w0, cfg, 0, scheme="paper")
    assert float(M.delta(params, w0, cfg).abs().max()) <= 1e-6
    # ... and not because every factor is zero (all-zero factors of a product never train);
    # MiSS is the exception that needs none: its ΔW is linear in its one shard D = 0
    assert any(float(v.abs().sum()) > 0 for v in params.values()) or key.startswith("miss")


@pytest.mark.parametrize("key", list(OURS))
def test_init_is_seeded_and_counts_the_trainable_parameters(key):
    M, cfg = _ours(key)
    w0 = torch.randn(3, 24, 16)
    p1, p2 = M.init(w0, cfg, 11, "gaussian"), M.init(w0, cfg, 11, "gaussian")
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    trainable = sum(v[0].numel() for k, v in p1.items() if k not in M.frozen)
    assert trainable == M.n_params(24, 16, cfg)


@pytest.mark.parametrize("key", list(OURS))
def test_generic_rank_attains_the_rank_bound(key):
    M, cfg = _ours(key)
    g = torch.Generator().manual_seed(5)
    m, n = 24, 16
    if key == "hira":  # a low-rank W0 makes r·rank(W0) the binding bound
        w0 = torch.randn(m, 2, dtype=torch.float64, generator=g) @ torch.randn(2, n, dtype=torch.float64, generator=g)
        rank_w0 = 2
    else:
        w0 = torch.randn(m, n, dtype=torch.float64, generator=g)
        rank_w0 = min(m, n)
    bound = M.rank_bound(m, n, rank_w0, cfg)
    assert 1 <= bound <= min(m, n)
    d = M.delta(M.init(w0, cfg, 9, "gaussian"), w0, cfg)
    assert int(torch.linalg.matrix_rank(d)) == bound


def test_miss_bat_block_formula():
    """ΔW_pq = (W0_pq + I) D_p on the r x r blocks (the MiSS paper's block-affine update)."""
    M = theory.get_method("miss")
    cfg = M.config(r=4, mode="bat")
    w0 = torch.randn(12, 8, dtype=torch.float64)
    D = M.init(w0, cfg, 1, "gaussian")["D"]  # (3, 4, 4)
    d = M.delta({"D": D}, w0, cfg)
    I4 = torch.eye(4, dtype=torch.float64)
    for p, q in itertools.product(range(3), range(2)):
        blk = w0[4 * p:4 * p + 4, 4 * q:4 * q + 4]
        torch.testing.assert_close(d[4 * p:4 * p + 4, 4 * q:4 * q + 4], (blk + I4) @ D[p])


def test_miss_balance_tiles_the_shard_along_columns():
    M = theory.get_method("miss")
    D = torch.randn(5, 7, dtype=torch.float64)  # r = 5, m = 7
    d = M.delta({"D": D}, torch.zeros(7, 12, dtype=torch.float64), M.config(r=5))
    for j in range(12):
        torch.testing.assert_close(d[:, j], D[j % 5])


def test_lokr_factorization_matches_peft():
    from peft.tuners.lokr.layer import factorization as peft_factorization
    for dim, f in itertools.product([1, 7, 12, 16, 20, 24, 128, 4096, 11008], [-1, 1, 2, 3, 4, 5, 8, 64]):
        assert factorization(dim, f) == peft_factorization(dim, f)


def test_lokr_budget_search_finds_the_largest_count_not_above_the_budget():
    """Brute force over every factor, decompose_both and r on a small matrix."""
    M = theory.get_method("lokr")
    m, n = 24, 16
    for budget in (20, 60, 80, 150, 400):
        best = 0
        for f, both, r in itertools.product([-1, *range(1, 25)], (False, True), range(1, 25)):
            p = M.n_params(m, n, M.config(r=r, decompose_both=both, decompose_factor=f))
            if p <= budget:
                best = max(best, p)
        found = M.configs_for_budget(m, n, budget)
        assert found and M.n_params(m, n, found[0]) == best


@pytest.mark.parametrize("name", ["lora", "hira", "loha", "lokr", "miss", "dora", "vera"])
@pytest.mark.parametrize("shape,r", [((4096, 4096), 16), ((24, 16), 2), ((64, 48), 4)])
def test_config_for_rank_stays_within_the_lora_budget(name, shape, r):
    M = theory.get_method(name)
    m, n = shape
    cfg = M.config_for_rank(m, n, r)
    M.validate(m, n, cfg)
    assert 1 <= M.n_params(m, n, cfg) <= r * (m + n)
    assert 1 <= M.rank_bound(m, n, min(m, n), cfg) <= min(m, n)


@pytest.mark.parametrize("name,kwargs", [
    ("miss", {"r": 4, "mode": "diagonal"}),
    ("miss", {"r": 5, "mode": "bat"}),  # 5 divides neither 24 nor 16
    ("miss", {"r": 4, "mode": "mini", "mini_r": 5}),  # 5 does not divide m = 24
    ("miss", {"r": 4, "mode": "mini"}),  # mini needs mini_r
    ("miss", {"r": 17}),  # r > n
    ("hira", {"r": 0}),
    ("loha", {"r": 17}),
    ("lokr", {"r": 2, "decompose_factor": 0}),
    ("dora", {"r": 2.5}),
    ("vera", {"r": -1}),
])
def test_bad_configs_raise_one_line_value_errors(name, kwargs):
    M = theory.get_method(name)
    with pytest.raises(ValueError) as e:
        M.init(torch.randn(24, 16), M.config(**kwargs))
    assert "\n" not in str(e.value) and name in str(e.value)


@pytest.mark.parametrize("name", ["hira", "dora"])
def test_methods_that_read_w0_refuse_to_run_without_it(name):
    M = theory.get_method(name)
    cfg = M.config(r=2)
    params = M.init(torch.randn(8, 6), cfg, 0, "gaussian")
    with pytest.raises(ValueError, match="W0|w0"):
        M.delta(params, None, cfg)
    assert M.needs_w0


def test_vera_projections_are_shared_across_a_batch_and_frozen():
    M = theory.get_method("vera")
    p = M.init(torch.randn(4, 24, 16), M.config(r=6), 0)
    assert M.frozen == ("A", "B")
    assert all(torch.equal(p["A"][0], p["A"][i]) and torch.equal(p["B"][0], p["B"][i]) for i in range(4))
    # PEFT's Kaiming bound √6/√fan_in
    assert float(p["A"].abs().max()) <= math.sqrt(6 / 16) and float(p["B"].abs().max()) <= math.sqrt(6 / 6)
    assert torch.all(p["d"] == 0.1) and torch.all(p["b"] == 0)
