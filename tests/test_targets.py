"""Targets: the synthetic kinds have the structure they claim; files round-trip;
bad input fails with one clear ValueError."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reconstruction.targets import (
    KINDS,
    Target,
    base_weight,
    default_lowrank_rank,
    get_target,
    load_target,
    make_target,
)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_has_requested_shape_batch_and_is_finite(kind):
    t = make_target(kind, (20, 30), batch=3, seed=4)
    assert isinstance(t, Target)
    assert t.M.shape == (3, 20, 30) and t.M.dtype == torch.float32
    assert len(t.labels) == 3 and t.w0 is None and t.w0_source == "none"
    assert bool(torch.isfinite(t.M).all())
    assert not torch.equal(t.M[0], t.M[1])  # the batch holds different draws


@pytest.mark.parametrize("shape", [(40, 25), (25, 40), (30, 30)])
def test_orthogonal_target_has_orthonormal_columns_or_rows(shape):
    Q = make_target("orthogonal", shape, batch=2, dtype=torch.float64).M
    m, n = shape
    G = Q.mT @ Q if m >= n else Q @ Q.mT
    assert torch.allclose(G, torch.eye(min(m, n), dtype=torch.float64).expand_as(G), atol=1e-12)


def test_lowrank_target_has_exact_rank_and_flat_spectrum():
    M = make_target("lowrank", (60, 50), batch=2, dtype=torch.float64).M
    k = default_lowrank_rank(60, 50)
    assert k == 25
    s = torch.linalg.svdvals(M)
    assert torch.allclose(s[:, :k], torch.ones(2, k, dtype=torch.float64), atol=1e-10)
    assert float(s[:, k:].max()) < 1e-10
    assert default_lowrank_rank(1000, 1000) == 128  # the ABBA paper's rank
    M2 = make_target("lowrank", (60, 50), rank=7, dtype=torch.float64).M
    assert int((torch.linalg.svdvals(M2) > 1e-8).sum()) == 7


def test_sparse_target_has_ten_percent_density_with_unit_interval_values():
    M = make_target("sparse", (300, 200), batch=2).M
    dens = float((M != 0).double().mean())
    assert abs(dens - 0.1) < 0.005
    nz = M[M != 0]
    assert float(nz.min()) > 0 and float(nz.max()) < 1
    assert abs(float(nz.mean()) - 0.5) < 0.02  # U[0, 1] values
    M2 = make_target("sparse", (300, 200), density=0.3).M
    assert abs(float((M2 != 0).double().mean()) - 0.3) < 0.01


def test_random_target_is_uniform_on_unit_interval():
    M = make_target("random", (200, 150)).M
    assert float(M.min()) >= 0 and float(M.max()) < 1
    assert abs(float(M.mean()) - 0.5) < 0.01
    assert abs(float(M.var()) - 1 / 12) < 0.005


def test_gaussian_target_is_standard_normal():
    M = make_target("gaussian", (200, 150), dtype=torch.float64).M
    assert abs(float(M.mean())) < 0.02 and abs(float(M.var()) - 1) < 0.03


def test_powerlaw_target_has_prescribed_singular_values():
    M = make_target("powerlaw", (40, 30), exponent=1.5, dtype=torch.float64).M
    s = torch.linalg.svdvals(M)[0]
    k = torch.arange(1, 31, dtype=torch.float64)
    assert torch.allclose(s, k ** -1.5, atol=1e-12)


def test_batch_is_prefix_stable_and_seeded():
    a = make_target("gaussian", (10, 12), batch=3, seed=5).M
    b = make_target("gaussian", (10, 12), batch=1, seed=5).M
    c = make_target("gaussian", (10, 12), batch=3, seed=6).M
    assert torch.equal(a[:1], b)
    assert not torch.equal(a, c)
    assert torch.equal(a, make_target("gaussian", (10, 12), batch=3, seed=5).M)


def test_unknown_kind_and_bad_options_raise_value_error_listing_kinds():
    with pytest.raises(ValueError, match="orthogonal"):
        make_target("banana")
    with pytest.raises(ValueError, match="unknown option"):
        make_target("random", (4, 4), rank=2)
    with pytest.raises(ValueError, match="rank"):
        make_target("lowrank", (4, 4), rank=9)
    with pytest.raises(ValueError, match="kinds|kind"):
        get_target("not-a-kind-nor-file", (4, 4), 1, 0, torch.float32, "cpu")


def test_get_target_parses_kind_options_and_aliases():
    t = get_target("lowrank:rank=3", (12, 10), 2, 0, torch.float64, "cpu")
    assert t.M.shape == (2, 12, 10)
    assert int((torch.linalg.svdvals(t.M[0]) > 1e-8).sum()) == 3
    t2 = get_target("low-rank", (12, 10), 1, 0, torch.float64, "cpu")
    assert torch.equal(t2.M, make_target("lowrank", (12, 10), dtype=torch.float64).M)


# --------------------------------------------------------------------------- #
# files
# --------------------------------------------------------------------------- #
def test_npy_round_trip(tmp_path):
    A = np.random.default_rng(0).standard_normal((7, 5))
    np.save(tmp_path / "a.npy", A)
    t = load_target(tmp_path / "a.npy", dtype=torch.float64)
    assert t.M.shape == (1, 7, 5) and np.array_equal(t.M[0].numpy(), A)
    assert t.w0 is None and t.labels == ["a"]
    t2 = get_target(str(tmp_path / "a.npy"), (3, 3), 1, 0, torch.float64, "cpu")
    assert torch.equal(t2.M, t.M)


def test_pt_round_trip_tensor_and_dict(tmp_path):
    A = torch.randn(6, 4, dtype=torch.float64)
    torch.save(A, tmp_path / "a.pt")
    assert torch.equal(load_target(tmp_path / "a.pt", dtype=torch.float64).M[0], A)
    torch.save({"x": A, "y": 2 * A}, tmp_path / "d.pt")
    t = load_target(tmp_path / "d.pt", dtype=torch.float64)
    assert t.labels == ["x", "y"] and torch.equal(t.M[1], 2 * A)
    assert load_target(tmp_path / "d.pt", dtype=torch.float64, key="y").labels == ["y"]


def test_safetensors_finetune_convention_gives_deltas_and_w0(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    d = {f"h.{i}.attn.delta": torch.randn(8, 6, generator=g) for i in range(2)}
    w = {f"h.{i}.attn.w0": torch.randn(8, 6, generator=g) for i in range(2)}
    save_file({**d, **w}, str(tmp_path / "ft.safetensors"))
    t = load_target(tmp_path / "ft.safetensors")
    assert t.labels == ["h.0.attn", "h.1.attn"] and t.w0_source == "file"
    assert torch.equal(t.M[1], d["h.1.attn.delta"]) and torch.equal(t.w0[0], w["h.0.attn.w0"])
    assert torch.equal(base_weight(t), t.w0)  # a file's own W0 wins over stand-ins
    one = get_target(str(tmp_path / "ft.safetensors") + ":h.1.*", (1, 1), 1, 0, torch.float32, "cpu")
    assert one.labels == ["h.1.attn"]


def test_layers_of_different_shapes_are_not_stacked(tmp_path):
    from safetensors.torch import save_file

    save_file({"q.delta": torch.zeros(4, 3), "k.delta": torch.zeros(5, 3)},
              str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="k 5x3.*q 4x3|q 4x3.*k 5x3"):
        load_target(tmp_path / "x.safetensors")
    assert load_target(tmp_path / "x.safetensors", key="q").M.shape == (1, 4, 3)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4)])
def test_non_matrix_arrays_are_rejected(tmp_path, shape):
    np.save(tmp_path / "a.npy", np.ones(shape))
    with pytest.raises(ValueError, match="2-D"):
        load_target(tmp_path / "a.npy")


def test_nan_target_and_missing_or_corrupt_file_raise_value_error(tmp_path):
    A = np.ones((3, 3))
    A[1, 1] = np.nan
    np.save(tmp_path / "nan.npy", A)
    with pytest.raises(ValueError, match="target .* contains NaN"):
        load_target(tmp_path / "nan.npy")
    with pytest.raises(ValueError, match="nope.npy"):
        load_target(tmp_path / "nope.npy")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_target(tmp_path / "bad.safetensors")


def test_base_weight_stand_ins_have_stated_distribution():
    t = make_target("random", (200, 100), batch=2, dtype=torch.float64)
    g = base_weight(t, "gaussian", seed=1)
    assert g.shape == t.M.shape and abs(float(g.var()) * 100 - 1) < 0.05  # N(0, 1/n)
    assert torch.equal(g, base_weight(t, "gaussian", seed=1))
    o = base_weight(t, "orthogonal")
    assert torch.allclose(o.mT @ o, torch.eye(100, dtype=torch.float64).expand(2, 100, 100), atol=1e-10)
    with pytest.raises(ValueError, match="modes"):
        base_weight(t, "identity-ish")
    with pytest.raises(ValueError, match="no W0"):
        base_weight(t, "file")
