"""The step rules (``--optimizer``): SAM is the hand-computed step on a quadratic, BSAM is
its three-gradient formula and reduces to SAM at ρ_min = 0 (with the paper's c = 1),
Flat-LoRA perturbs the merged weight with the published row scale and ramp and gives W0
back bit for bit, and bad names and values are one line."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from finetune import adapters as A
from finetune.optim import RULES, make_rule
from finetune.optim.flat_lora import row_noise, step_generator, weight_sites


def exit_code(main, argv) -> int:
    """A command's exit status, in-process (parser errors raise SystemExit)."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


# --------------------------------------------------------------------------- #
# a quadratic L(w) = ½ wᵀ H w − bᵀ w, where every gradient is known in closed form
# --------------------------------------------------------------------------- #
class Quadratic(nn.Module):
    def __init__(self, d=5, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(d, d, generator=g, dtype=torch.float64)
        self.register_buffer("H", q @ q.T + torch.eye(d, dtype=torch.float64))  # SPD
        self.register_buffer("b", torch.randn(d, generator=g, dtype=torch.float64))
        self.w = nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))

    def loss(self):
        return 0.5 * self.w @ self.H @ self.w - self.b @ self.w

    def grad(self, w):
        return self.H @ w - self.b


def _quadratic_step(rule_name, lr=0.1, **opts):
    q = Quadratic()
    w0 = q.w.detach().clone()
    opt = torch.optim.SGD(q.parameters(), lr=lr)
    rule = make_rule(rule_name, opt, q, total_steps=10, **opts)

    def closure():
        loss = q.loss()
        loss.backward()
        return loss.detach()

    loss = rule.step(closure, 0)
    return q, w0, q.w.detach().clone(), loss


def test_sam_is_the_hand_computed_step_on_a_quadratic():
    rho, lr = 0.3, 0.1
    q, w0, w1, loss = _quadratic_step("sam", lr=lr, rho=rho)
    g = q.grad(w0)
    eps = rho * g / (g.norm() + 1e-12)
    expected = w0 - lr * q.grad(w0 + eps)
    torch.testing.assert_close(w1, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(loss, 0.5 * w0 @ q.H @ w0 - q.b @ w0)  # the loss at w
    # and it is not plain gradient descent
    assert (w1 - (w0 - lr * g)).norm() > 1e-3


@pytest.mark.parametrize("balance", ["norm", "none"])
def test_bsam_is_the_three_gradient_formula_on_a_quadratic(balance):
    rho_max, rho_min, lr = 0.3, 0.2, 0.1
    q, w0, w1, _ = _quadratic_step("bsam", lr=lr, rho_max=rho_max, rho_min=rho_min,
                                   schedule="constant", balance=balance)
    g = q.grad(w0)
    u = g / (g.norm() + 1e-12)
    g_max, g_min = q.grad(w0 + rho_max * u), q.grad(w0 - rho_min * u)
    c = g_max.norm() / (g_min.norm() + 1e-12) if balance == "norm" else 1.0
    expected = w0 - lr * (g_max + g - c * g_min)
    torch.testing.assert_close(w1, expected, rtol=0, atol=1e-12)


def test_bsam_with_the_authors_balance_at_rho_min_zero_adds_a_multiple_of_g_to_sam():
    """The authors' c = ‖g_max‖/‖g_min‖ does not reduce to SAM at ρ_min = 0: the step is
    g_max + (1 − ‖g_max‖/‖g‖) g (stated in the docstring; checked here)."""
    rho, lr = 0.3, 0.1
    q, w0, w1, _ = _quadratic_step("bsam", lr=lr, rho_max=rho, rho_min=0.0)
    g = q.grad(w0)
    g_max = q.grad(w0 + rho * g / (g.norm() + 1e-12))
    expected = w0 - lr * (g_max + (1 - g_max.norm() / (g.norm() + 1e-12)) * g)
    torch.testing.assert_close(w1, expected, rtol=0, atol=1e-12)
    _, _, w_sam, _ = _quadratic_step("sam", lr=lr, rho=rho)
    assert (w1 - w_sam).norm() > 1e-4


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 3))


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)


def _train(rule_name, steps=4, method="lora", lr=1e-2, **opts):
    model = _mlp()
    if method != "full":
        A.inject(model, method, rank=2, targets=["0", "2"], seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    rule = make_rule(rule_name, opt, model, total_steps=steps, **opts)
    x, y = _batch()
    for k in range(steps):
        def closure():
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss.detach()
        rule.step(closure, k)
    return model, rule


@pytest.mark.parametrize("method", ["lora", "full"])
def test_bsam_with_rho_min_zero_and_the_papers_objective_is_sam_exactly(method):
    """ρ_min = 0 and c = 1: g_min = g, so the step is SAM's, bit for bit (AdamW, 4 steps)."""
    sam, _ = _train("sam", method=method, rho=0.05)
    bsam, _ = _train("bsam", method=method, rho_max=0.05, rho_min=0.0, balance="none")
    other, _ = _train("adamw", method=method)
    for (n, a), (_, b), (_, c) in zip(sam.named_parameters(), bsam.named_parameters(),
                                      other.named_parameters()):
        assert torch.equal(a, b), n
    assert any(not torch.equal(a, c) for a, c in zip(sam.parameters(), other.parameters()))


def test_bsam_rho_min_follows_the_learning_rate():
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / 10)
    rule = make_rule("bsam", opt, model, total_steps=10, rho_min=0.08, rho_min_floor=0.02)
    seen = []
    for _ in range(10):
        seen.append(rule.rho_min_now())
        opt.step()
        sched.step()
    expected = [0.02 + 0.06 * (1 - k / 10) for k in range(10)]
    assert seen == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------- #
# Flat-LoRA
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("mode", ["auto", "forward"])
@pytest.mark.parametrize("method", ["lora", "abba", "dora", "hira"])
def test_flat_lora_gives_w0_back_bit_for_bit_after_every_step(method, mode):
    model = _mlp()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    layers = A.inject(model, method, rank=2, targets=["0", "2"], seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    rule = make_rule("flat-lora", opt, model, total_steps=5, rho=0.5, mode=mode)
    x, y = _batch()
    factors_before = {p: {k: v.detach().clone() for k, v in lay.factors.items()}
                      for p, lay in layers.items()}
    for k in range(5):
        def closure():
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss.detach()
        rule.step(closure, k)
        for path, lay in layers.items():
            assert torch.equal(lay.w0, before[f"{path}.weight"]), (k, path)
            assert lay.perturbation is None
    moved = [not torch.equal(v, layers[p].factors[k]) for p in layers
             for k, v in factors_before[p].items()]
    assert any(moved)  # it trained


def test_flat_lora_on_full_fine_tuning_restores_the_weights_exactly():
    """With a zero learning rate the step must leave every weight bit for bit as it was:
    the in-place perturbation is taken back from a copy, not subtracted."""
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    rule = make_rule("flat-lora", opt, model, total_steps=4, rho=0.5, ramp="constant")
    assert len(rule.sites) == 3
    x, y = _batch()
    grads = []
    for k in range(3):
        def closure():
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss.detach()
        rule.step(closure, k)
        grads.append(model[0].weight.grad.clone())
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not torch.equal(grads[0], grads[1])  # each step a fresh perturbation


@pytest.mark.parametrize("mode", ["forward", "inplace"])
def test_flat_lora_gradient_is_the_gradient_at_the_perturbed_merged_weight(mode):
    """The gradient the base optimizer gets is ∇θ L(W0 + ΔW(θ) + E), E drawn with the
    row scale σ_i = f(t) ρ ‖W'_i‖/√d_in from the (seed, step) generator; in place, up to
    the rounding of (W0 + E) x against W0 x + E x."""
    model = _mlp()
    layers = A.inject(model, "lora", rank=2, targets=["0", "2"], seed=0)
    with torch.no_grad():  # a nonzero ΔW, so that W' differs from W0
        for lay in layers.values():
            lay.factors["B"].normal_(0, 0.3)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    rho, T, t = 0.4, 8, 3
    rule = make_rule("flat-lora", opt, model, total_steps=T, rho=rho, seed=7, mode=mode)
    x, y = _batch()

    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach()

    rule.step(closure, t)
    got = {p: lay.factors["A"].grad.clone() for p, lay in layers.items()}
    # by hand: the same draws, the perturbation added to the merged weight explicitly
    f = 0.5 * (1 - math.cos(math.pi * t / T))
    gen = step_generator(7, t, torch.device("cpu"))
    for lay in layers.values():
        w = (lay.w0 + lay.delta()).detach()
        lay.perturbation = row_noise(w, f * rho, gen)
    opt.zero_grad()
    closure()
    exact = {"rtol": 0, "atol": 0} if mode == "forward" else {"rtol": 1e-4, "atol": 1e-7}
    for p, lay in layers.items():
        lay.perturbation = None
        torch.testing.assert_close(got[p], lay.factors["A"].grad, **exact)
    opt.zero_grad()
    closure()
    assert not torch.equal(got["0"], layers["0"].factors["A"].grad)  # E mattered


@pytest.mark.parametrize("method, inplace", [("lora", True), ("abba", True), ("loha", True),
                                             ("hira", False), ("dora", False),
                                             ("alpha_lora", False)])
def test_flat_lora_auto_goes_in_place_only_where_dw_ignores_w0(method, inplace):
    model = _mlp()
    A.inject(model, method, rank=2, targets=["0", "2"], seed=0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    rule = make_rule("flat-lora", opt, model, total_steps=4)
    assert [s.inplace for s in rule.sites] == [inplace, inplace]
    if not inplace:
        with pytest.raises(ValueError, match="mode inplace would perturb"):
            make_rule("flat-lora", opt, model, total_steps=4, mode="inplace")


def test_flat_lora_noise_has_the_filter_aware_scale():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 4000, generator=g) * torch.linspace(0.1, 3, 64)[:, None]  # rows differ
    e = row_noise(w, 0.05, step_generator(0, 1, torch.device("cpu")))
    ratio = e.norm(dim=1) / (0.05 * w.norm(dim=1))   # E‖E_i‖² = ρ² ‖W_i‖²
    assert ratio.mean() == pytest.approx(1.0, abs=0.01)
    assert float(ratio.std()) < 0.03


def test_flat_lora_ramp_is_the_half_cosine_from_zero_to_one():
    model = _mlp()
    A.inject(model, "lora", rank=2, targets=["0"], seed=0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    rule = make_rule("flat-lora", opt, model, total_steps=100)
    assert rule.ramp(0) == 0.0 and rule.ramp(50) == pytest.approx(0.5)
    assert rule.ramp(100) == pytest.approx(1.0) and rule.ramp(25) < 0.5 < rule.ramp(75)


def test_flat_lora_same_seed_same_weights_other_seed_other_weights():
    a, _ = _train("flat-lora", rho=0.5, seed=1)
    b, _ = _train("flat-lora", rho=0.5, seed=1)
    c, _ = _train("flat-lora", rho=0.5, seed=2)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_flat_lora_perturbs_the_adapted_layers_only():
    model = _mlp()
    A.inject(model, "lora", rank=2, targets=["2"], seed=0)
    sites = weight_sites(model)
    assert [s.path for s in sites] == ["2"]


def test_the_gradient_evaluations_per_step_are_those_published():
    assert {n: RULES[n].gradient_evaluations for n in ("adamw", "sam", "bsam", "flat-lora")} \
        == {"adamw": 1, "sam": 2, "bsam": 3, "flat-lora": 1}


# --------------------------------------------------------------------------- #
# bad input
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name, opts, fragment", [
    ("nope", {}, "unknown"),
    ("sam", {"rho": -1.0}, "rho must be"),
    ("sam", {"radius": 0.1}, "unknown option"),
    ("bsam", {"balance": "weird"}, "balance"),
    ("bsam", {"rho_min": float("nan")}, "rho_min must be"),
    ("flat-lora", {"ramp": "linear"}, "ramp"),
    ("flat-lora", {"seed": -3}, "seed must be"),
    ("flat-lora", {"mode": "sideways"}, "mode"),
])
def test_bad_rule_names_and_values_are_one_line_value_errors(name, opts, fragment):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=fragment) as e:
        make_rule(name, opt, model, 10, **opts)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("args, fragment", [
    (["--optimizer", "nope"], "--optimizer 'nope' unknown"),
    (["--optimizer", "sam", "--opt-set", "rho=-0.1"], "rho must be"),
    (["--optimizer", "bsam", "--opt-set", "foo=1"], "unknown option"),
])
def test_the_command_refuses_bad_optimizers_in_one_line(tmp_path, args, fragment, capsys):
    from finetune.run import main as run_main

    assert exit_code(run_main, ["--model", "mlp", *args, "--out", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], lines
    assert not any(tmp_path.iterdir())  # nothing was started


@pytest.mark.parametrize("args, fragment", [
    (["--rules", "adamw,lookahead"], "--rules: 'lookahead' unknown"),
    (["--model", "gpt5"], "--model 'gpt5' unknown"),
    (["--method", "nope"], "nope"),
])
def test_the_timing_command_refuses_bad_input_in_one_line(args, fragment, capsys):
    from finetune.optim.timing import main as timing_main

    assert exit_code(timing_main, args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], lines


def test_the_timing_command_counts_each_rule_against_the_first(capsys):
    from finetune.optim.timing import main as timing_main

    assert timing_main(["--reps", "1", "--steps", "2"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == {"adamw", "sam", "bsam", "flat-lora"}
    assert rows["adamw"][2] == "1.00"
    assert [rows[n][3] for n in ("adamw", "sam", "bsam", "flat-lora")] == ["1", "2", "3", "1"]


def test_the_rules_are_there_when_the_command_runs_as_a_module(tmp_path):
    r = subprocess.run([sys.executable, "-m", "finetune.run", "--model", "mlp", "--optimizer",
                        "nope", "--out", str(tmp_path)], capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 2 and "known: adamw, bsam, flat-lora, sam" in r.stderr, r.stderr


def test_timing_rules_carry_their_options_in_brackets():
    from finetune.optim.timing import parse_rule, rule_list

    assert rule_list("adamw,flat-lora[mode=forward,rho=0.1],sam") == [
        "adamw", "flat-lora[mode=forward,rho=0.1]", "sam"]
    assert parse_rule("flat-lora[mode=forward,rho=0.1]") == (
        "flat-lora", {"mode": "forward", "rho": 0.1})
    with pytest.raises(ValueError, match="mode 'up' unknown"):
        parse_rule("flat-lora[mode=up]")
