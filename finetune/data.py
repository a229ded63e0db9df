"""Offline labelled text corpora and a toy image-transfer split.

Text: the four human-rated sentiment corpora of Hutto & Gilbert, "VADER: A
Parsimonious Rule-based Model for Sentiment Analysis of Social Media Text"
(ICWSM 2014). They ship inside the *source distribution* of
``vaderSentiment==3.3.2`` (not the wheel), as a tarball within the tarball::

    vaderSentiment-3.3.2.tar.gz
      vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz
        hutto_ICWSM_2014/<corpus>_GroundTruth.txt   # "id<TAB>mean score<TAB>text"

Each snippet's score is the mean of 20 human ratings on [-4, 4].

=========  ==========================  =======
name       file                        items
=========  ==========================  =======
movie      movieReviewSnippets         10,605
amazon     amazonReviewSnippets         3,708
tweets     tweets                       4,200
nyt        nytEditorialSnippets         5,190
=========  ==========================  =======

The tarball is fetched once, at set-up time, into the data directory
(``$PEFT_EXPRESSIVITY_DATA``, default ``~/.cache/peft-expressivity``)::

    python -m finetune.data fetch          # = pip download --no-deps --no-binary :all:
                                           #   vaderSentiment==3.3.2 -d <data dir>

At run time nothing is downloaded: the corpora are read from the tarball in
memory (no extraction).

Images: :func:`load_digits_transfer` is the ABBA paper's toy transfer task on
scikit-learn's bundled 8x8 digits (pre-train on digits 0-7, fine-tune on 8-9).
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

import cli

VADER_VERSION = "3.3.2"
TARBALL = f"vaderSentiment-{VADER_VERSION}.tar.gz"
TARBALL_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
_INNER = f"vaderSentiment-{VADER_VERSION}/additional_resources/hutto_ICWSM_2014.tar.gz"
FETCH_COMMAND = "python -m finetune.data fetch"

#: corpus name -> (file stem inside the inner tarball, published number of items)
CORPORA: dict[str, tuple[str, int]] = {
    "movie": ("movieReviewSnippets", 10605),
    "amazon": ("amazonReviewSnippets", 3708),
    "tweets": ("tweets", 4200),
    "nyt": ("nytEditorialSnippets", 5190),
}


def data_dir() -> Path:
    """The data/cache directory: ``$PEFT_EXPRESSIVITY_DATA`` or ``~/.cache/peft-expressivity``."""
    env = os.environ.get("PEFT_EXPRESSIVITY_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "peft-expressivity"


def tarball_path() -> Path:
    return data_dir() / TARBALL


def have_corpora() -> bool:
    """True if the vaderSentiment source tarball is in :func:`data_dir`."""
    return tarball_path().is_file()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(dest: Path | None = None, quiet: bool = False) -> Path:
    """Download the ``vaderSentiment==3.3.2`` sdist into ``dest`` (default :func:`data_dir`).

    Uses pip's own client (``pip download --no-deps --no-binary :all:``), then checks
    the file's SHA-256. Does nothing if a verified copy is already there. A failed
    download is an ``OSError``, a file with another checksum a ``ValueError``.
    """
    dest = Path(dest) if dest is not None else data_dir()
    dest.mkdir(parents=True, exist_ok=True)
    final = dest / TARBALL
    if final.is_file() and _sha256(final) == TARBALL_SHA256:
        return final
    with tempfile.TemporaryDirectory(dir=dest, prefix=".fetch.") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"vaderSentiment=={VADER_VERSION}", "-d", tmp]
        if quiet:
            cmd.append("-q")
        try:
            subprocess.run(cmd, check=True)
        except subprocess.CalledProcessError as e:
            raise OSError(f"`pip download vaderSentiment=={VADER_VERSION}` failed (exit "
                          f"{e.returncode}); is the package index reachable?") from None
        got = Path(tmp) / TARBALL
        if not got.is_file():
            raise OSError(f"pip download did not produce {TARBALL} in {tmp}")
        digest = _sha256(got)
        if digest != TARBALL_SHA256:
            raise ValueError(f"{TARBALL}: sha256 {digest} != expected {TARBALL_SHA256}")
        os.replace(got, final)
    return final


@functools.lru_cache(maxsize=1)
def _inner_files() -> dict[str, bytes]:
    """The ``*_GroundTruth.txt`` files of the inner tarball, read into memory once."""
    path = tarball_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"corpus tarball {path} not found; fetch it once with `{FETCH_COMMAND}` "
            "(set PEFT_EXPRESSIVITY_DATA to choose the directory)")
    out = {}
    try:
        with tarfile.open(path) as outer:
            inner_bytes = outer.extractfile(_INNER).read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
            for m in inner.getmembers():
                if m.isfile() and m.name.endswith("_GroundTruth.txt"):
                    out[Path(m.name).name.removesuffix("_GroundTruth.txt")] = (
                        inner.extractfile(m).read())
    except (tarfile.TarError, KeyError, EOFError, OSError) as e:
        raise ValueError(f"{path} is not the vaderSentiment {VADER_VERSION} sdist "
                         f"({type(e).__name__}); delete it and run `{FETCH_COMMAND}`") from None
    return out


def parse_ground_truth(raw: bytes) -> tuple[list[str], list[str], np.ndarray]:
    """Parse ``id<TAB>mean score<TAB>text`` lines -> (ids, texts, scores float64)."""
    ids, texts, scores = [], [], []
    for k, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        if len(parts) != 3:
            raise ValueError(f"line {k}: expected 3 tab-separated fields, got {len(parts)}")
        ids.append(parts[0])
        scores.append(float(parts[1]))
        texts.append(parts[2].strip())
    return ids, texts, np.asarray(scores, dtype=np.float64)


@functools.lru_cache(maxsize=8)
def _load(name: str) -> tuple[tuple[str, ...], np.ndarray]:
    stem, _ = CORPORA[name]
    files = _inner_files()
    if stem not in files:
        raise FileNotFoundError(f"{stem}_GroundTruth.txt not found in {tarball_path()}")
    _, texts, scores = parse_ground_truth(files[stem])
    scores.setflags(write=False)
    return tuple(texts), scores


def load_corpus(name: str) -> tuple[list[str], np.ndarray]:
    """Load one corpus: ``(texts, scores)`` with ``scores`` the mean human rating in [-4, 4].

    ``name`` is one of ``movie``, ``amazon``, ``tweets``, ``nyt``. Order is the
    file's order; the returned arrays are fresh copies.
    """
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; known: {', '.join(CORPORA)}")
    texts, scores = _load(name)
    return list(texts), scores.copy()


def binary_labels(scores, neutral: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Binary sentiment labels: drop near-neutral items, ``y = sign(score)``.

    Returns ``(keep, y)``: ``keep`` the indices with ``|score| >= neutral`` (so the
    scores 0 and, by default, everything within half a rating point of it are
    dropped) and ``y`` in {-1, +1} (float64) for those items.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-d, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf values")
    if not neutral > 0:
        raise ValueError(f"neutral must be > 0 (scores 0 are always dropped), got {neutral}")
    keep = np.flatnonzero(np.abs(s) >= neutral)
    return keep, np.sign(s[keep])


def load_digits_transfer(seed: int = 0, test_fraction: float = 0.5) -> dict[str, np.ndarray]:
    """Toy transfer split of scikit-learn's 8x8 digits (1,797 images, 64 pixels in [0, 16]).

    Source task: digits 0-7 (all of them, for pre-training). Target task: digits
    8 vs 9, split at random (``seed``) into a fine-tuning and a test half.
    Pixels are scaled to [0, 1]. Returns ``x_source (Ns, 64)``, ``y_source`` (0..7),
    ``x_target (nt, 64)``, ``y_target`` (8/9), ``x_test``, ``y_test``.
    """
    from sklearn.datasets import load_digits

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    d = load_digits()
    x = d.data.astype(np.float32) / 16.0  # (1797, 64)
    y = d.target.astype(np.int64)
    src = y <= 7
    tgt = np.flatnonzero(~src)
    rng = np.random.default_rng(seed)
    tgt = rng.permutation(tgt)
    n_test = round(test_fraction * len(tgt))
    test, train = tgt[:n_test], tgt[n_test:]
    return {"x_source": x[src], "y_source": y[src],
            "x_target": x[train], "y_target": y[train],
            "x_test": x[test], "y_test": y[test]}


def build_parser() -> cli.Parser:
    ap = cli.Parser(prog="python -m finetune.data",
                    description="Fetch (once) or summarize the offline VADER sentiment corpora.")
    sub = ap.add_subparsers(dest="cmd")
    f = sub.add_parser("fetch", help="download the vaderSentiment sdist into the data dir")
    f.add_argument("--dest", type=Path, default=None, help="default: $PEFT_EXPRESSIVITY_DATA "
                   "or ~/.cache/peft-expressivity")
    f.add_argument("-q", "--quiet", action="store_true")
    sub.add_parser("info", help="print the corpora found and their sizes (default)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def work():
        if args.cmd == "fetch":
            cli.check_writable_dir(args.dest if args.dest is not None else data_dir(), "--dest")
            print(fetch(args.dest, quiet=args.quiet))
            return
        print(f"data dir: {data_dir()}")
        for name, (stem, published) in CORPORA.items():
            _, scores = load_corpus(name)
            keep, y = binary_labels(scores)
            print(f"{name:7s} {stem:22s} {len(scores):6d} items (published {published}); "
                  f"binary {len(keep)}: {int((y > 0).sum())} pos / {int((y < 0).sum())} neg")

    return cli.run(work, interrupted="nothing was saved (a download in progress is discarded)")


if __name__ == "__main__":
    raise SystemExit(main())
