"""Every registry method injected into a real model (tiny GPT-2, Conv1D layers, and a
Linear MLP): parameter counts, gradients, merge/unmerge/remove exactness, rank bounds,
agreement of the layer with x (W0 + ΔW)ᵀ + b, and no m×n tensor in ABBA's forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import theory
from finetune import adapters as A
from finetune.tiny import build_model
from theory import spectra

METHODS = [m for m in theory.available() if m != "full"]
TARGETS = ["c_attn", "c_proj", "c_fc"]


def _model():
    torch.manual_seed(0)
    model = build_model(seed=0)
    with torch.no_grad():  # biases non-zero, so the bias path is exercised
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.1)
    return model


def _x(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (2, 16), generator=g)


def test_every_non_full_method_is_injectable():
    assert len(METHODS) == 12


@pytest.mark.parametrize("method", METHODS)
def test_trainable_count_is_the_sum_of_n_params_and_only_factors_train(method):
    model = _model()
    layers = A.inject(model, method, rank=2, targets=TARGETS, seed=0)
    assert len(layers) == 8  # 2 blocks x (c_attn, attn.c_proj, c_fc, mlp.c_proj)
    expected = sum(layer.n_params() for layer in layers.values())
    assert A.count_trainable(model) == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".factors." in n for n in trainable)
    loss = model(input_ids=_x(model), labels=_x(model)).loss
    loss.backward()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("method", METHODS)
def test_paper_init_leaves_the_model_unchanged(method):
    model = _model()
    x = _x(model)
    with torch.no_grad():
        before = model(input_ids=x).logits
    A.inject(model, method, rank=2, targets=TARGETS, seed=0)
    with torch.no_grad():
        after = model(input_ids=x).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_layer_equals_dense_formula_merged_and_unmerged(method):
    model = _model()
    layers = A.inject(model, method, rank=2, targets=TARGETS, seed=0, init="gaussian")
    for layer in layers.values():
        x = torch.randn(3, 5, layer.shape[1], generator=torch.Generator().manual_seed(2))
        w = layer.w0 + layer.delta()
        b = layer._bias()
        with torch.no_grad():
            dense = x @ w.mT + b
            y = layer(x)
            layer.merge()
            y_merged = layer(x)
            layer.unmerge()
        scale = dense.abs().max()
        torch.testing.assert_close(y / scale, dense / scale, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y_merged / scale, dense / scale, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_remove_restores_w0_bit_for_bit_after_training_and_merges(method):
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    A.inject(model, method, rank=2, targets=TARGETS, seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(input_ids=_x(model), labels=_x(model)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    A.merge(model)
    merged = dict(model.named_parameters())
    assert any(not torch.equal(merged[n], before[n.replace(".base.", ".")])
               for n in merged if ".base.weight" in n)  # merging did fold something in
    A.unmerge(model)
    A.merge(model)
    A.remove(model)  # unmerges first
    after = dict(model.named_parameters())
    assert set(after) == set(before)
    for n, p in before.items():
        assert torch.equal(after[n], p), n
        assert after[n].requires_grad


@pytest.mark.parametrize("method", METHODS)
def test_learned_delta_respects_the_rank_bound(method):
    model = _model()
    A.inject(model, method, rank=2, targets=TARGETS, seed=0, init="gaussian")
    for path, (d, w0) in A.layer_deltas(model).items():
        layer = model.get_submodule(path)
        m, n = d.shape
        rank_w0 = int(spectra.numerical_rank(w0.double()))
        bound = layer.method.rank_bound(m, n, rank_w0, layer.config)
        assert int(spectra.numerical_rank(d)) <= bound, path  # at float32 tolerance


def test_rank_means_the_budget_of_lora_per_layer():
    model = _model()
    layers = A.inject(model, "abba", rank=4, targets=["c_fc"], seed=0)
    for layer in layers.values():
        m, n = layer.shape
        assert layer.n_params() <= theory.lora_budget(m, n, 4)
        assert (layer.config.r1, layer.config.r2) == (2, 2)


def test_overrides_apply_to_every_layer():
    model = _model()
    layers = A.inject(model, "lora", rank=2, targets=["c_fc"], overrides={"alpha": 4.0})
    assert all(layer.config.alpha == 4.0 for layer in layers.values())


def test_same_seed_same_factors():
    a = A.inject(_model(), "abba", rank=2, targets=TARGETS, seed=3, init="gaussian")
    b = A.inject(_model(), "abba", rank=2, targets=TARGETS, seed=3, init="gaussian")
    c = A.inject(_model(), "abba", rank=2, targets=TARGETS, seed=4, init="gaussian")
    for p in a:
        for k in a[p].factors:
            assert torch.equal(a[p].factors[k], b[p].factors[k])
    assert not all(torch.equal(a[p].factors["A2"], c[p].factors["A2"]) for p in a)


def test_linear_mlp_and_regex_targets():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    layers = A.inject(mlp, "hira", rank=1, targets=["re:[02]"], seed=0)
    assert list(layers) == ["0", "2"]


@pytest.mark.parametrize("targets, words", [
    (["nope"], "matches no linear layer"),
    (["re:("], "bad regular expression"),
    ([], "no layer pattern"),
])
def test_bad_targets_are_one_line_errors(targets, words):
    with pytest.raises(ValueError, match=words) as e:
        A.inject(_model(), "lora", rank=2, targets=targets)
    assert "\n" not in str(e.value)


def test_rank_too_large_names_the_layer_and_changes_nothing():
    model = _model()
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"too large.*transformer\.h\.0\.attn\.c_attn"):
        A.inject(model, "lora", rank=65, targets=TARGETS)
    assert [type(m) for m in model.modules()] == before
    assert all(p.requires_grad for p in model.parameters())


def test_unknown_override_field_is_an_error():
    with pytest.raises(ValueError, match="unknown config field"):
        A.inject(_model(), "lora", rank=2, targets=TARGETS, overrides={"r9": 1})


def test_abba_layer_forward_forms_no_m_by_n_tensor():
    from test_khatri_rao import RecordAllocations

    lin = nn.Linear(512, 512)
    layers = A.inject(nn.Sequential(lin), "abba", rank=8, targets=["0"], init="gaussian")
    x = torch.randn(1, 4, 512)
    with torch.no_grad(), RecordAllocations() as rec:
        layers["0"](x)
    assert rec.largest <= 512 * 16  # the Khatri-Rao factors (512 x r1 r2); ΔW would be 262,144


def test_alpha_lora_scales_the_bias_like_its_authors():
    lin = nn.Linear(6, 5)
    layers = A.inject(nn.Sequential(lin), "alpha_lora", rank=2, targets=["0"])
    layer = layers["0"]
    with torch.no_grad():
        layer.factors["alpha"].fill_(2.0)
    x = torch.randn(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), 2.0 * (x @ lin.weight.T + lin.bias))


def test_perturbation_adds_to_the_weight_without_touching_w0():
    lin = nn.Linear(6, 5)
    w = lin.weight.detach().clone()
    layer = A.inject(nn.Sequential(lin), "lora", rank=1, targets=["0"])["0"]
    E = torch.randn(5, 6)
    x = torch.randn(3, 6)
    with torch.no_grad():
        y0 = layer(x)
        layer.perturbation = E
        torch.testing.assert_close(layer(x), y0 + x @ E.T)
        layer.perturbation = None
    assert torch.equal(lin.weight, w)
