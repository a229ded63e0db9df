"""Tiny GPT-2 full fine-tuning deltas (finetune.tiny)."""

import pytest
import torch

pytest.importorskip("transformers")

from finetune import data, tiny

# two small "domains" of text so that these tests need no download
TEXTS = ("the cat sat on the mat. the dog sat on the log. " * 40,
         "Buy now! Great deal!! 50% off, only today :) " * 40)
EXPECTED = {f"transformer.h.{i}.{n}": s for i in range(2) for n, s in
            [("attn.c_attn", (192, 64)), ("attn.c_proj", (64, 64)),
             ("mlp.c_fc", (256, 64)), ("mlp.c_proj", (64, 256))]}


@pytest.fixture(scope="module")
def deltas():
    return tiny.tiny_gpt2_deltas(seed=3, steps=4, pretrain_steps=6, texts=TEXTS)


def test_every_block_linear_map_in_nn_linear_orientation(deltas):
    assert {k: tuple(d.shape) for k, (d, _) in deltas.items()} == EXPECTED
    for d, w0 in deltas.values():
        assert d.shape == w0.shape and d.dtype == torch.float32


def test_delta_is_nonzero_and_small_relative_to_w0(deltas):
    for name, (d, w0) in deltas.items():
        rel = float(d.norm() / w0.norm())
        assert 0 < rel < 1, name


def test_same_seed_same_deltas_other_seed_different(deltas):
    threads = torch.get_num_threads()
    again = tiny.tiny_gpt2_deltas(seed=3, steps=4, pretrain_steps=6, texts=TEXTS)
    assert torch.get_num_threads() == threads  # the thread setting is restored
    other = tiny.tiny_gpt2_deltas(seed=4, steps=4, pretrain_steps=6, texts=TEXTS)
    for k, (d, w0) in deltas.items():
        assert torch.equal(d, again[k][0]) and torch.equal(w0, again[k][1])
        assert not torch.allclose(w0, other[k][1])


def test_global_torch_rng_is_untouched():
    torch.manual_seed(123)
    a = torch.rand(3)
    torch.manual_seed(123)
    tiny.build_model(0)
    assert torch.equal(torch.rand(3), a)


def test_transposed_conv1d_weight_reproduces_the_layer_as_x_wT_plus_b():
    model = tiny.build_model(0)
    ws = tiny.linear_weights(model)
    x = torch.randn(5, 64)
    for name in ("transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc"):
        mod = model.get_submodule(name)
        torch.testing.assert_close(mod(x), torch.nn.functional.linear(x, ws[name], mod.bias))
    x = torch.randn(5, 256)
    mod = model.get_submodule("transformer.h.0.mlp.c_proj")
    torch.testing.assert_close(
        mod(x), torch.nn.functional.linear(x, ws["transformer.h.0.mlp.c_proj"], mod.bias))


def test_safetensors_file_roundtrip_with_delta_and_w0_keys(deltas, tmp_path):
    from safetensors import safe_open

    path = tiny.save_deltas(deltas, tmp_path / "d.safetensors", metadata={"seed": 3})
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["seed"] == "3"
    assert keys == {f"{k}.{s}" for k in EXPECTED for s in ("delta", "w0")}
    back = tiny.load_deltas(path)
    for k, (d, w0) in deltas.items():
        assert torch.equal(back[k][0], d) and torch.equal(back[k][1], w0)


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="steps"):
        tiny.tiny_gpt2_deltas(seed=0, steps=0, texts=TEXTS)
    with pytest.raises(ValueError, match="too short"):
        tiny.tiny_gpt2_deltas(seed=0, steps=1, texts=("short", "text"))


@pytest.mark.skipif(not data.have_corpora(), reason=f"run `{data.FETCH_COMMAND}` first")
def test_default_corpora_pretraining_lowers_the_loss(tmp_path):
    _, losses = tiny.tiny_gpt2_deltas(seed=0, steps=3, pretrain_steps=20,
                                      out_path=tmp_path / "t.safetensors", return_losses=True)
    assert (tmp_path / "t.safetensors").is_file()
    lp = losses["pretrain"]
    assert sum(lp[-5:]) / 5 < lp[0] - 0.5  # from ~ln(97) = 4.6 well down


def test_a_diverging_run_stops_and_saves_nothing(tmp_path):
    from finetune.guard import Diverged

    path = tmp_path / "d.safetensors"
    with pytest.raises(Diverged, match=r"training diverged at step \d+"):
        tiny.tiny_gpt2_deltas(seed=0, steps=3, pretrain_steps=0, texts=TEXTS, lr_finetune=1e30,
                              out_path=path)
    assert list(tmp_path.iterdir()) == []


def test_non_finite_deltas_are_never_saved(deltas, tmp_path):
    bad = dict(deltas)
    name = next(iter(bad))
    d, w0 = bad[name]
    bad[name] = (d.clone().fill_(float("nan")), w0)
    with pytest.raises(ValueError, match=rf"{name}\.delta holds NaN or inf"):
        tiny.save_deltas(bad, tmp_path / "d.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_load_deltas_names_the_file_of_a_corrupt_or_foreign_file(tmp_path):
    from safetensors.torch import save_file

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match=rf"^{junk} is not a readable safetensors file") as e:
        tiny.load_deltas(junk)
    assert "\n" not in str(e.value)
    foreign = tmp_path / "model.safetensors"
    save_file({"h.0.weight": torch.zeros(2, 2)}, str(foreign))
    with pytest.raises(ValueError, match=r"holds no <layer>\.delta tensors"):
        tiny.load_deltas(foreign)
    half = tmp_path / "half.safetensors"
    save_file({"h.0.delta": torch.zeros(2, 2)}, str(half))
    with pytest.raises(ValueError, match=r"h\.0\.delta has no h\.0\.w0"):
        tiny.load_deltas(half)
    with pytest.raises(ValueError, match="deltas file not found"):
        tiny.load_deltas(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        tiny.read_metadata(junk)


from clicheck import call, interrupted, refused  # noqa: E402

TINY_BAD = [
    (["--steps", "0"], "--steps: must be >= 1"),
    (["--steps", "1.5"], "--steps: expected an integer"),
    (["--pretrain-steps", "-1"], "--pretrain-steps: must be >= 0"),
    (["--seed", "x"], "--seed: expected an integer"),
    (["--batch", "0"], "--batch: must be >= 1"),
    (["--batch", "1e9"], "lower --batch"),
    (["--lr-pretrain", "inf"], "--lr-pretrain: must be a finite number"),
    (["--lr-finetune", "-1"], "--lr-finetune: must be > 0"),
    (["--threads", "0"], "--threads: must be >= 1"),
    (["--threads", "100000"], "--threads 100000 is more than 4x"),
    (["--out", "/"], "--out / is a folder; give a file name"),
    (["--out", "/proc/no/t.safetensors"], "cannot write"),
    (["--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("argv, words", TINY_BAD, ids=[" ".join(a) for a, _ in TINY_BAD])
def test_cli_bad_input_one_line_exit_2_before_training(argv, words, capsys, monkeypatch):
    monkeypatch.setattr(tiny, "tiny_gpt2_deltas", lambda *a, **k: pytest.fail("trained"))
    refused(tiny.main, argv, capsys, words)


def test_cli_ctrl_c_is_one_line_exit_130(capsys, monkeypatch, tmp_path):
    line = interrupted(tiny.main, ["--out", tmp_path / "t.safetensors"], capsys, monkeypatch,
                       tiny, "tiny_gpt2_deltas")
    assert line.startswith("interrupted: nothing was saved")


def test_cli_writes_the_file_it_names(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(tiny, "_default_texts", lambda *a: TEXTS)
    out = tmp_path / "t.safetensors"
    r = call(tiny.main, ["--steps", "2", "--pretrain-steps", "2", "--out", out], capsys)
    assert r.code == 0 and r.out.splitlines()[-1] == f"saved {out}"
    assert set(tiny.load_deltas(out)) == set(EXPECTED)
