"""The dense switch of adapted layers (ΔW formed in the forward) computes the same
function as each method's structured forward, and ``python -m finetune.bench`` runs on
tiny sizes and prints its ratios (measured, never asserted against a speed)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import theory
from finetune import adapters as A
from finetune import bench
from finetune.data import have_corpora

METHODS = [m for m in theory.available() if m != "full"]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 7))


@pytest.mark.parametrize("method", METHODS)
def test_dense_forward_equals_the_structured_forward_values_and_gradients(method):
    model = _mlp()
    layers = A.inject(model, method, rank=2, targets=["0", "2"], init="gaussian"
                      if "gaussian" in theory.get_method(method).inits else "paper", seed=3)
    with torch.no_grad():  # move every factor off its init so that ΔW != 0
        for lay in layers.values():
            for p in lay.factors.values():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(2))

    def run(dense):
        A.set_dense(model, dense)
        for p in model.parameters():
            p.grad = None
        y = model(x)
        y.square().sum().backward()
        return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                            if p.requires_grad}

    y_s, g_s = run(False)
    y_d, g_d = run(True)
    assert all(lay.dense for lay in layers.values())
    torch.testing.assert_close(y_d, y_s, rtol=1e-5, atol=1e-6)
    assert g_s.keys() == g_d.keys() and g_s
    for n in g_s:
        torch.testing.assert_close(g_d[n], g_s[n], rtol=1e-4, atol=1e-6)


def test_dense_abba_forms_the_m_by_n_update_the_khatri_rao_forward_does_not():
    from test_khatri_rao import RecordAllocations

    lin = nn.Linear(256, 256)
    layers = A.inject(nn.Sequential(lin), "abba", rank=8, targets=["0"], init="gaussian")
    x = torch.randn(1, 4, 256)
    for dense, check in ((False, lambda n: n < 256 * 256), (True, lambda n: n >= 256 * 256)):
        layers["0"].dense = dense
        with torch.no_grad(), RecordAllocations() as rec:
            layers["0"](x)
        assert check(rec.largest), (dense, rec.largest)


@pytest.mark.skipif(not have_corpora(), reason="VADER corpora not fetched")
def test_bench_runs_on_tiny_gpt2_and_states_the_ratios(capsys):
    code = bench.main(["--model", "tiny-gpt2", "--methods", "abba,hira", "--reps", "2",
                       "--steps", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "ABBA (Khatri-Rao forward) / LoRA at equal budget: time" in out
    assert "ABBA Khatri-Rao / ABBA with ΔW formed" in out
    for name in ("lora", "abba", "hira", "abba (ΔW formed)"):
        assert any(line.startswith(name) for line in out.splitlines()), name


def test_bench_json_has_every_variant_and_lora_is_the_unit(tmp_path):
    path = tmp_path / "b.json"
    assert bench.main(["--model", "mlp", "--reps", "2", "--steps", "1", "--no-progress",
                       "--json", str(path)]) == 0
    res = json.loads(path.read_text())
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"full", *METHODS, "abba (ΔW formed)"}
    assert rows["lora"]["time_vs_lora"] == 1.0 and rows["lora"]["memory_vs_lora"] == 1.0
    assert all(len(r["seconds_all"]) == 2 and r["peak_step_bytes"] > 0 for r in rows.values())
    # equal budget: every adapter at most rank-8 LoRA's count, full far above
    assert rows["full"]["trainable_params"] > 5 * rows["lora"]["trainable_params"]
    assert rows["abba"]["trainable_params"] == rows["lora"]["trainable_params"]
    assert res["abba_vs_lora"]["time"] == rows["abba"]["time_vs_lora"]


@pytest.mark.parametrize("argv, words", [
    (["--model", "bert"], "unknown"),
    (["--methods", "nope"], "unknown method"),
    (["--dense", "full", "--methods", "all"], "--dense full"),
    (["--dense", "vera", "--methods", "lora,abba"], "not among --methods"),
    (["--model", "mlp", "--rank", "99"], "too large"),
    (["--json", "/proc/none/x.json"], "cannot write"),
])
def test_bench_bad_input_is_one_line_exit_2(argv, words, capsys):
    code = bench.main(["--model", "mlp", "--reps", "1", "--no-progress", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and words in err, err
