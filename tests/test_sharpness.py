"""Sharpness measures: on a quadratic with a known Hessian both are recovered (the top
eigenvalue in the weight and in the factor space, the expected loss increase
½ρ² tr(H)/d_in ‖W'‖²), the weights come back exactly, and a finished run is rebuilt
(``load_model``) to the same metric and ΔW before it is measured."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from finetune import adapters as A
from finetune.optim.flat_lora import weight_sites
from finetune.runs import save_run
from finetune.sharpness import (
    Settings,
    expected_loss_increase,
    hessian_top,
    row_direction,
    run_sharpness,
    top_hessian_eigenvalue,
)
from finetune.sharpness import main as sharpness_main
from finetune.train import RunConfig, train


def exit_code(main, argv) -> int:
    """A command's exit status, in-process (parser errors raise SystemExit)."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


def _spd(n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, n, generator=g, dtype=dtype)
    return q @ q.T / n + 0.1 * torch.eye(n, dtype=dtype)


def _quadratic(H, m=4, adapter=None, seed=0):
    """L(W') = ½ Σ_i (W'_i − C_i) H (W'_i − C_i)ᵀ through the layer's forward (C = W' now:
    a minimum), so ∇²_{W'_i} L = H for every row i."""
    n = H.shape[0]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n, m, bias=False)).double()
    if adapter:
        A.inject(model, adapter, rank=2, targets=["0"], seed=seed)
        with torch.no_grad():  # a nonzero ΔW
            for lay in A.adapted_layers(model).values():
                for p in lay.factors.values():
                    p.normal_(0, 0.5)
    x = torch.eye(n, dtype=torch.float64)
    with torch.no_grad():
        c = model(x).clone()  # (n, m) = W'ᵀ

    def loss():
        r = model(x) - c
        return 0.5 * (r * (H @ r)).sum()

    return model, loss


@pytest.mark.parametrize("adapter", [None, "lora", "abba"])
def test_top_eigenvalue_in_the_weight_space_is_that_of_the_known_hessian(adapter):
    H = _spd(12)
    model, loss = _quadratic(H, adapter=adapter)
    sites = weight_sites(model, paths=["0"]) if adapter is None else weight_sites(model)
    out = hessian_top([loss], model, sites, "weights", iters=500, tol=1e-10)
    assert out["converged"]
    assert out["eigenvalue"] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-6)


def test_power_iteration_recovers_the_top_eigenvalue_of_a_given_matrix():
    H = _spd(30, seed=3)
    w = torch.zeros(30, dtype=torch.float64, requires_grad=True)
    out = top_hessian_eigenvalue([lambda: 0.5 * w @ H @ w], [w], iters=1000, tol=1e-12)
    assert out["eigenvalue"] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-8)
    assert out["residual"] < 1e-4


def test_the_hessian_goes_through_attention_whose_fused_kernel_has_no_double_backward():
    """A self-attention layer (F.scaled_dot_product_attention) with an adapted projection:
    power iteration on HVPs agrees with the eigenvalue of the Hessian formed by torch.func."""
    torch.manual_seed(0)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(8, 8)

        def forward(self, x):
            h = self.q(x).view(2, 5, 2, 4).transpose(1, 2)  # (batch, heads, tokens, 4)
            return nn.functional.scaled_dot_product_attention(h, h, h).sum(1)

    model = Attn()
    A.inject(model, "lora", rank=2, targets=["q"], seed=0)
    x = torch.randn(2, 5, 8)
    loss = lambda: model(x).pow(2).mean()
    lay = A.adapted_layers(model)["q"]
    got = hessian_top([loss], model, weight_sites(model), "factors", iters=300, tol=1e-9)

    names = list(lay.factors)
    flat = torch.cat([lay.factors[n].detach().flatten() for n in names])

    def f(theta):
        params, i = {}, 0
        for n in names:
            k = lay.factors[n].numel()
            params[n] = theta[i:i + k].view_as(lay.factors[n])
            i += k
        from torch.func import functional_call
        return functional_call(model, {f"q.factors.{n}": p for n, p in params.items()}, (x,)
                               ).pow(2).mean()

    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        hess = torch.func.hessian(f)(flat)
    ev = torch.linalg.eigvalsh(hess)
    top = ev[ev.abs().argmax()]
    assert got["eigenvalue"] == pytest.approx(float(top), rel=1e-3)


def test_the_factor_space_hessian_of_lora_is_not_the_weight_space_one():
    """At B = 0 the LoRA loss is flat in A (∂ΔW/∂A = 0), so the factor-space λ differs
    from the weight-space one: the two measures are distinct (Flat-LoRA's point)."""
    H = _spd(12)
    model, loss = _quadratic(H, adapter="lora")
    sites = weight_sites(model)
    lam_w = hessian_top([loss], model, sites, "weights", iters=300, tol=1e-10)["eigenvalue"]
    lam_f = hessian_top([loss], model, sites, "factors", iters=300, tol=1e-10)["eigenvalue"]
    assert lam_w == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-6)
    assert abs(lam_f - lam_w) > 1e-3 * lam_w


def test_expected_increase_is_exact_for_an_isotropic_quadratic():
    """H = c I: every draw raises the loss by ½ c ρ² ‖W'‖²_F (rows moved by ρ‖W'_i‖)."""
    c, rho = 3.0, 0.07
    model, loss = _quadratic(c * torch.eye(10, dtype=torch.float64), adapter="lora")
    sites = weight_sites(model)
    w = sites[0].weight().clone()
    out = expected_loss_increase([loss], sites, radius=rho, samples=4)
    expected = 0.5 * c * rho**2 * float((w**2).sum())
    assert out["loss"] == pytest.approx(0.0, abs=1e-20)
    assert out["increases"] == pytest.approx([expected] * 4, rel=1e-9)
    assert torch.equal(sites[0].weight(), w)  # given back exactly


def test_expected_increase_is_half_rho_squared_trace_over_d_in_for_any_hessian():
    rho, n = 0.05, 16
    H = _spd(n, seed=5)
    model, loss = _quadratic(H, m=6)
    sites = weight_sites(model, paths=["0"])
    w = sites[0].weight().clone()
    out = expected_loss_increase([loss], sites, radius=rho, samples=3000, seed=1)
    expected = 0.5 * rho**2 * float(torch.trace(H)) / n * float((w**2).sum())
    assert out["increase"] == pytest.approx(expected, abs=4 * out["increase_se"])
    assert out["increase_se"] < 0.05 * expected
    assert torch.equal(model[0].weight, w)  # in-place perturbation taken back exactly


def test_random_rows_have_exactly_the_relative_radius():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 50, generator=g)
    e = row_direction(w, 0.1, g)
    torch.testing.assert_close(e.norm(dim=1), 0.1 * w.norm(dim=1))


# --------------------------------------------------------------------------- #
# finished runs
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    """A finished Flat-LoRA run of the digits MLP (in-process)."""
    cfg = RunConfig(model="mlp", task="digits", steps=40, optimizer="flat-lora")
    rec = train(cfg, return_model=True)
    d = tmp_path_factory.mktemp("runs") / cfg.name
    save_run(d, rec, rec["model"])
    return d


def test_load_model_rebuilds_the_run_to_its_metric_and_deltas(mlp_run):
    from finetune.runs import load_deltas, load_model, load_record

    rec = load_record(mlp_run)
    model, task = load_model(mlp_run)
    assert task.evaluate(model)["accuracy"] == rec["metric"]
    saved = load_deltas(mlp_run)
    for path, (d, w0) in A.layer_deltas(model).items():  # (ΔW formed with other threads)
        torch.testing.assert_close(d, saved[path][0], rtol=1e-5, atol=1e-7)
        assert torch.equal(w0, saved[path][1])


def test_a_run_is_measured_once_and_cached_by_its_settings(mlp_run):
    s = Settings(samples=3, batches=2, batch=16, hessian_batches=1, iters=5)
    a = run_sharpness(mlp_run, s)
    assert a["random"]["samples"] == 3 and a["layers"] == 3
    for k in ("hessian_weights", "hessian_factors"):
        assert a[k]["eigenvalue"] == a[k]["eigenvalue"] and a[k]["iterations"] >= 1
    assert json.loads((mlp_run / "sharpness.json").read_text())["key"] == a["key"]
    assert run_sharpness(mlp_run, s) == json.loads((mlp_run / "sharpness.json").read_text())
    b = run_sharpness(mlp_run, Settings(samples=3, batches=2, batch=16, hessian_batches=1,
                                        iters=5, radius=0.2))
    assert b["random"]["increase"] != a["random"]["increase"]


def test_a_larger_radius_raises_the_loss_more(mlp_run):
    s = {"samples": 6, "batches": 2, "batch": 32, "hessian_batches": 1, "iters": 2}
    lo = run_sharpness(mlp_run, Settings(radius=0.02, **s), cache=False)["random"]["increase"]
    hi = run_sharpness(mlp_run, Settings(radius=0.2, **s), cache=False)["random"]["increase"]
    assert hi > lo


@pytest.mark.parametrize("args, fragment", [
    (["/nonexistent/run"], "no finished run there"),
    (["{run}", "--radius", "0"], "--radius"),
    (["{run}", "--hessian-batches", "9", "--batches", "2"], "--hessian-batches"),
    (["{run}", "--json", "{run}/run.json/x.json"], "--json"),
])
def test_the_command_refuses_bad_input_in_one_line(mlp_run, args, fragment, capsys):
    args = [a.replace("{run}", str(mlp_run)) for a in args]
    assert exit_code(sharpness_main, args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], lines


def test_the_command_prints_both_measures(mlp_run, capsys, tmp_path):
    rc = sharpness_main([str(mlp_run), "--samples", "2", "--batches", "1", "--hessian-batches",
                         "1", "--iters", "3",
                         "--json", str(tmp_path / "s.json")])
    out = capsys.readouterr().out
    assert rc == 0 and "S_rho=" in out and "lambda_max weights" in out
    (res,) = json.loads((tmp_path / "s.json").read_text())
    assert res["settings"]["samples"] == 2


def test_the_summary_groups_runs_by_rule_and_divides_step_time_by_adamws(mlp_run):
    from finetune.runs import load_record
    from finetune.sharpness import summary_rows

    rec = load_record(mlp_run)
    fake = {"random": {"increase": 1.0}, "hessian_weights": {"eigenvalue": 2.0},
            "hessian_factors": {"eigenvalue": 3.0}}
    base = {**rec, "config": {**rec["config"], "optimizer": "adamw"},
            "step_seconds_median": 0.5}
    runs = [{**rec, "config": {**rec["config"], "seed": s}, "step_seconds_median": t}
            for s, t in ((0, 1.0), (1, 1.5))]
    base1 = {**base, "config": {**base["config"], "seed": 1}}
    rows = summary_rows([fake] * 4, [base, {**base1}, *runs])
    flat = next(r for r in rows if r["optimizer"] == "flat-lora")
    assert flat["seeds"] == "2" and flat["x adamw (same seed)"].startswith("2.5 ± 0.71")
    assert flat["S_rho"] == "1 ± 0"
