"""A tiny GPT-2 that gives real full-fine-tuning updates ΔW in seconds on a CPU.

Recipe (Radford et al. 2019 architecture, from ``transformers.GPT2Config``):
2 layers, width 64, 2 heads, context 64, a fixed character vocabulary
(95 printable ASCII characters + newline + unknown = 97 tokens), no dropout,
seeded initialization. Two phases of next-character prediction with AdamW:

1. "pre-training" on one corpus (default: VADER movie-review snippets) -> W0;
2. full fine-tuning of every weight on another corpus (default: VADER tweets) -> W_ft.

The per-layer update is ``ΔW = W_ft − W0`` for every linear map in the blocks
(``attn.c_attn`` 192x64, ``attn.c_proj`` 64x64, ``mlp.c_fc`` 256x64, ``mlp.c_proj``
64x256 in each of the 2 layers).

File convention (what ``reconstruction`` reads as a ΔW / W0 target file):
a ``.safetensors`` file with, for every layer name ``<layer>`` (the module path,
e.g. ``transformer.h.0.attn.c_attn``), two float32 tensors

* ``<layer>.delta``: ΔW, shape ``(d_out, d_in)``;
* ``<layer>.w0``: W0, shape ``(d_out, d_in)``;

both in ``torch.nn.Linear`` orientation. GPT-2 stores its linear maps as
``Conv1D`` with weight ``(d_in, d_out)`` (``y = x W + b``); they are transposed
here. The file's metadata records the seed, step counts and corpora.

The corpora come from :mod:`finetune.data` (fetch them once with
``python -m finetune.data fetch``), or pass your own ``texts=(pretrain, finetune)``.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

import cli
from finetune.guard import check_loss

VOCAB = ["<unk>", "\n"] + list(string.printable[:95])  # 97 tokens, index 0 = unknown
_STOI = {c: i for i, c in enumerate(VOCAB)}
N_LAYER, N_EMBD, N_HEAD, BLOCK = 2, 64, 2, 64


def encode(text: str) -> np.ndarray:
    """Characters -> token ids (int64); characters outside the vocabulary map to 0."""
    return np.fromiter((_STOI.get(c, 0) for c in text), dtype=np.int64, count=len(text))


def build_model(seed: int):
    """Seeded tiny ``GPT2LMHeadModel`` (the global torch RNG is left untouched)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=N_LAYER, n_embd=N_EMBD, n_head=N_HEAD, n_positions=BLOCK,
                     vocab_size=len(VOCAB), bos_token_id=0, eos_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(cfg)
    model.loss_type = "ForCausalLM"  # next-token cross-entropy (silences a transformers notice)
    return model


def linear_weights(model) -> dict[str, Tensor]:
    """Every Conv1D weight of the blocks, transposed to nn.Linear ``(d_out, d_in)``, copied."""
    from transformers.pytorch_utils import Conv1D

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Conv1D):
            out[name] = mod.weight.detach().t().contiguous().clone()  # (d_out, d_in)
        elif isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head"):
            out[name] = mod.weight.detach().clone()
    return out


def _train(model, ids: np.ndarray, steps: int, lr: float, batch: int,
           rng: np.random.Generator) -> list[float]:
    if len(ids) <= BLOCK + 1:
        raise ValueError(f"training text too short ({len(ids)} chars, need > {BLOCK + 1})")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    data = torch.from_numpy(ids)
    losses = []
    model.train()
    for step in range(steps):
        starts = torch.from_numpy(rng.integers(0, len(ids) - BLOCK - 1, size=batch))
        x = torch.stack([data[s:s + BLOCK] for s in starts])  # (batch, BLOCK)
        loss = model(input_ids=x, labels=x).loss
        losses.append(check_loss(loss.item(), step + 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return losses


def _default_texts(pretrain: str, finetune: str) -> tuple[str, str]:
    from finetune.data import load_corpus

    return "\n".join(load_corpus(pretrain)[0]), "\n".join(load_corpus(finetune)[0])


def save_deltas(deltas: dict[str, tuple[Tensor, Tensor]], path, metadata=None) -> Path:
    """Write ``{layer: (delta, w0)}`` as ``<layer>.delta`` / ``<layer>.w0``, atomically
    (:func:`cli.atomic_path`). A tensor with NaN or inf is refused (ValueError naming the
    layer): such a file would look like a result."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {}
    for name, (d, w0) in deltas.items():
        for kind, t in (("delta", d), ("w0", w0)):
            t = t.detach().float().contiguous().cpu()
            if not torch.isfinite(t).all():
                raise ValueError(f"{name}.{kind} holds NaN or inf values; not saved to {path}")
            tensors[f"{name}.{kind}"] = t
    with cli.atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    return path


def load_deltas(path) -> dict[str, tuple[Tensor, Tensor]]:
    """Read a file written by :func:`save_deltas` back into ``{layer: (delta, w0)}``.

    A missing, corrupt or foreign file (not safetensors, no ``<layer>.delta`` tensor, a
    ``.delta`` without its ``.w0``) is a one-line ValueError naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a deltas file")
    if not path.is_file():
        raise ValueError(f"deltas file not found: {path}")
    try:
        t = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path} is not a readable safetensors file ({first})") from None
    names = sorted(k[: -len(".delta")] for k in t if k.endswith(".delta"))
    if not names:
        raise ValueError(f"{path} holds no <layer>.delta tensors (not a deltas file)")
    missing = [n for n in names if f"{n}.w0" not in t]
    if missing:
        raise ValueError(f"{path}: {missing[0]}.delta has no {missing[0]}.w0 beside it")
    return {n: (t[f"{n}.delta"], t[f"{n}.w0"]) for n in names}


def read_metadata(path) -> dict[str, str]:
    """The string metadata of a safetensors file (ValueError naming a bad file)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path} is not a readable safetensors file ({first})") from None


def tiny_gpt2_deltas(seed: int = 0, steps: int = 50, out_path=None, *,
                     pretrain_steps: int | None = None, batch: int = 16,
                     lr_pretrain: float = 3e-3, lr_finetune: float = 1e-3,
                     corpora: tuple[str, str] = ("movie", "tweets"),
                     texts: tuple[str, str] | None = None,
                     return_losses: bool = False, threads: int | None = 1):
    """Pre-train then fully fine-tune the tiny GPT-2; return ``{layer: (ΔW, W0)}``.

    ``steps`` fine-tuning steps (and ``pretrain_steps``, default ``2 * steps``,
    pre-training steps) of AdamW on random 64-character windows, batch ``batch``.
    Everything is seeded by ``seed`` (init, batch positions); two calls with the
    same arguments give identical tensors. ``ΔW`` and ``W0`` are float32 ``(d_out, d_in)``.
    If ``out_path`` is given the result is also saved there (format: module docstring).
    With ``return_losses=True`` returns ``(deltas, {"pretrain": [...], "finetune": [...]})``.
    Training runs on ``threads`` CPU threads (default 1: faster for 64-wide matrices,
    and immune to oversubscription; the previous setting is restored; None = leave as is).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    pretrain_steps = 2 * steps if pretrain_steps is None else pretrain_steps
    if pretrain_steps < 0:
        raise ValueError(f"pretrain_steps must be >= 0, got {pretrain_steps}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    for what, lr in (("lr_pretrain", lr_pretrain), ("lr_finetune", lr_finetune)):
        if not (np.isfinite(lr) and lr > 0):
            raise ValueError(f"{what} must be a finite number > 0, got {lr}")
    if out_path is not None:
        cli.check_writable_file(out_path, "out_path")
    if texts is None:
        text_pre, text_ft = _default_texts(*corpora)
        source = f"vader:{corpora[0]}->{corpora[1]}"
    else:
        text_pre, text_ft = texts
        source = "user texts"
    rng = np.random.default_rng(seed)
    model = build_model(seed)
    prev_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            loss_pre = _train(model, encode(text_pre), pretrain_steps, lr_pretrain, batch, rng)
            w0 = linear_weights(model)
            loss_ft = _train(model, encode(text_ft), steps, lr_finetune, batch, rng)
            w_ft = linear_weights(model)
    finally:
        torch.set_num_threads(prev_threads)
    deltas = {k: (w_ft[k] - w0[k], w0[k]) for k in w0}
    if out_path is not None:
        save_deltas(deltas, out_path, metadata={
            "model": f"gpt2 n_layer={N_LAYER} n_embd={N_EMBD} n_head={N_HEAD} char-vocab=97",
            "seed": seed, "pretrain_steps": pretrain_steps, "finetune_steps": steps,
            "data": source, "convention": "<layer>.delta, <layer>.w0: (d_out, d_in)"})
    if return_losses:
        return deltas, {"pretrain": loss_pre, "finetune": loss_ft}
    return deltas


def build_parser() -> cli.Parser:
    ap = cli.Parser(prog="python -m finetune.tiny",
                    description="Tiny GPT-2: pre-train, fine-tune, save per-layer ΔW.")
    ap.add_argument("--out", type=Path, default=Path("results/tiny_gpt2_deltas.safetensors"))
    ap.add_argument("--seed", type=cli.nonneg_int, default=0)
    ap.add_argument("--steps", type=cli.positive_int, default=50, help="fine-tuning steps")
    ap.add_argument("--pretrain-steps", type=cli.nonneg_int, default=None,
                    help="pre-training steps (default 2 x --steps)")
    ap.add_argument("--batch", type=cli.positive_int, default=16)
    ap.add_argument("--lr-pretrain", type=cli.positive_float, default=3e-3)
    ap.add_argument("--lr-finetune", type=cli.positive_float, default=1e-3)
    ap.add_argument("--threads", type=cli.positive_int, default=1, help="torch CPU threads")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def work():
        cli.check_writable_file(args.out, "--out")
        cli.check_threads(args.threads)
        cli.check_memory(4 * args.batch * BLOCK * (N_LAYER * (16 * N_EMBD + 4 * N_HEAD * BLOCK)
                                                   + 2 * len(VOCAB)),
                         f"--batch {args.batch}", "cpu", "lower --batch")
        deltas, losses = tiny_gpt2_deltas(args.seed, args.steps, args.out,
                                          pretrain_steps=args.pretrain_steps, batch=args.batch,
                                          lr_pretrain=args.lr_pretrain,
                                          lr_finetune=args.lr_finetune, return_losses=True,
                                          threads=args.threads)
        lp, lf = losses["pretrain"], losses["finetune"]
        if lp:
            print(f"pretrain loss {lp[0]:.3f} -> {lp[-1]:.3f}")
        print(f"finetune loss {lf[0]:.3f} -> {lf[-1]:.3f}")
        for name, (d, w0) in deltas.items():
            rel = float(d.norm() / w0.norm())
            print(f"{name:28s} {tuple(d.shape)!s:11s} |dW|/|W0| = {rel:.4f}")
        print(f"saved {args.out}")

    return cli.run(work, interrupted="nothing was saved (the deltas are written at the end)")


if __name__ == "__main__":
    raise SystemExit(main())
