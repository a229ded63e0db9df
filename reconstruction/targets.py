"""Target matrices for reconstruction experiments.

A :class:`Target` is a stack ``M`` of ``B`` matrices ``(B, m, n)`` to be
approximated by an adapter's update ΔW, optionally with their base weights W0.

Synthetic kinds (:data:`KINDS`), after Singhal et al., "ABBA: Highly Expressive
Hadamard Product Adaptation for Large Language Models" (2025), Fig. 2 (four
kinds at 1000×1000), plus two of our own:

=============  ==============================================================
orthogonal     Q of the QR factorization of a Gaussian matrix (sign-fixed, so
               Haar distributed): orthonormal columns (m >= n) or rows (m < n).
lowrank        U Vᵀ with U (m, k), V (n, k) orthonormal: rank k with a flat
               spectrum (σ_1 = ... = σ_k = 1). k = ``rank``, default
               ``min(128, min(m, n) // 2)`` (128 at the paper's 1000×1000;
               halved dimension on small matrices so the target stays low-rank).
sparse         Bernoulli(``density`` = 0.1) mask times U[0, 1] values.
random         i.i.d. U[0, 1) entries (not centred: one large singular value).
gaussian       i.i.d. N(0, 1) entries.
powerlaw       U diag(σ) Vᵀ with Haar U, V and σ_k = k^(−a), a = ``exponent``
               (default 1.0).
=============  ==============================================================

A batch is drawn from one CPU generator seeded with ``seed``, matrix after
matrix, so matrix 0 of a batch equals the single matrix of ``batch=1`` with the
same seed, and the numbers are the same on every device.

Files (:func:`load_target`): ``.npy`` (one 2-D array), ``.npz`` (named 2-D
arrays), ``.pt``/``.pth`` (a 2-D tensor or a dict of them), ``.safetensors``
(named 2-D tensors). A file written by ``finetune`` holds ``<layer>.delta`` and
``<layer>.w0`` for every layer: the deltas are the targets and the W0 come with
them (``w0_source="file"``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

KINDS: tuple[str, ...] = ("orthogonal", "lowrank", "sparse", "random", "gaussian", "powerlaw")
#: the four targets of the ABBA paper's Fig. 2
PAPER_KINDS: tuple[str, ...] = ("orthogonal", "lowrank", "sparse", "random")
_ALIASES = {"low-rank": "lowrank", "low_rank": "lowrank", "uniform": "random",
            "power-law": "powerlaw", "power_law": "powerlaw", "normal": "gaussian"}
FILE_SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".safetensors")
BASE_WEIGHT_MODES: tuple[str, ...] = ("gaussian", "orthogonal")


@dataclasses.dataclass
class Target:
    """A stack of matrices to reconstruct."""

    name: str
    M: Tensor  # (B, m, n)
    w0: Tensor | None  # (B, m, n) or None
    labels: list[str]  # one per matrix
    w0_source: str = "none"  # "none" | "file"

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.M.shape[-2]), int(self.M.shape[-1])

    @property
    def batch(self) -> int:
        return int(self.M.shape[0])

    def __len__(self) -> int:
        return self.batch


# --------------------------------------------------------------------------- #
# synthetic targets
# --------------------------------------------------------------------------- #
def _haar(m: int, n: int, g: torch.Generator) -> Tensor:
    """(m, n) with orthonormal columns (m >= n) or rows (m < n), Haar distributed."""
    tall = m >= n
    a, b = (m, n) if tall else (n, m)
    Q, R = torch.linalg.qr(torch.randn(a, b, generator=g, dtype=torch.float64))
    Q = Q * torch.sign(torch.diagonal(R)).where(torch.diagonal(R) != 0, torch.ones(()))[None, :]
    return Q if tall else Q.T


def default_lowrank_rank(m: int, n: int) -> int:
    """128 (the ABBA paper's rank at 1000×1000), capped at min(m, n) // 2."""
    return max(1, min(128, min(m, n) // 2))


def _one(kind: str, m: int, n: int, g: torch.Generator, kw: dict) -> Tensor:
    if kind == "orthogonal":
        return _haar(m, n, g)
    if kind == "lowrank":
        k = int(kw.get("rank", default_lowrank_rank(m, n)))
        if not 1 <= k <= min(m, n):
            raise ValueError(f"lowrank target: rank must be in 1..{min(m, n)}, got {k}")
        return _haar(m, k, g) @ _haar(n, k, g).T
    if kind == "sparse":
        p = float(kw.get("density", 0.1))
        if not 0.0 < p <= 1.0:
            raise ValueError(f"sparse target: density must be in (0, 1], got {p}")
        mask = torch.rand(m, n, generator=g, dtype=torch.float64) < p
        return mask * torch.rand(m, n, generator=g, dtype=torch.float64)
    if kind == "random":
        return torch.rand(m, n, generator=g, dtype=torch.float64)
    if kind == "gaussian":
        return torch.randn(m, n, generator=g, dtype=torch.float64)
    if kind == "powerlaw":
        a = float(kw.get("exponent", 1.0))
        k = min(m, n)
        s = torch.arange(1, k + 1, dtype=torch.float64) ** (-a)
        return (_haar(m, k, g) * s) @ _haar(n, k, g).T
    raise AssertionError(kind)


_KW = {"lowrank": {"rank"}, "sparse": {"density"}, "powerlaw": {"exponent"}}


def make_target(kind: str, shape=(256, 256), batch: int = 1, seed: int = 0,
                dtype=torch.float32, device="cpu", **kw) -> Target:
    """A batch of ``batch`` synthetic ``shape`` matrices of the named ``kind``.

    Keywords: ``rank`` (lowrank), ``density`` (sparse), ``exponent`` (powerlaw).
    """
    key = _ALIASES.get(str(kind).strip().lower(), str(kind).strip().lower())
    if key not in KINDS:
        raise ValueError(f"unknown target kind {kind!r}; kinds: {', '.join(KINDS)}")
    bad = set(kw) - _KW.get(key, set())
    if bad:
        raise ValueError(f"{key} target: unknown option(s) {sorted(bad)}; "
                         f"options: {sorted(_KW.get(key, set())) or 'none'}")
    m, n = _shape(shape)
    if int(batch) < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    g = torch.Generator().manual_seed(int(seed))
    M = torch.stack([_one(key, m, n, g, kw) for _ in range(int(batch))])  # (B, m, n)
    opts = ",".join(f"{k}={v}" for k, v in sorted(kw.items()))
    name = f"{key}:{opts}" if opts else key
    return Target(name=name, M=M.to(device=device, dtype=dtype), w0=None,
                  labels=[f"{key}[{i}]" for i in range(int(batch))], w0_source="none")


def _shape(shape) -> tuple[int, int]:
    if isinstance(shape, int):
        shape = (shape, shape)
    try:
        m, n = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be an int or a pair (m, n), got {shape!r}") from None
    if m < 1 or n < 1:
        raise ValueError(f"shape must be positive, got {m}x{n}")
    return m, n


# --------------------------------------------------------------------------- #
# files
# --------------------------------------------------------------------------- #
def _read(path: Path) -> dict[str, Tensor] | Tensor:
    suf = path.suffix.lower()
    try:
        if suf == ".npy":
            return torch.from_numpy(np.array(np.load(path, allow_pickle=False)))
        if suf == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: torch.from_numpy(np.array(z[k])) for k in z.files}
        if suf in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, np.ndarray):
                obj = torch.from_numpy(obj)
            if torch.is_tensor(obj):
                return obj
            if isinstance(obj, dict):
                out = {str(k): v for k, v in obj.items() if torch.is_tensor(v)}
                if not out:
                    raise ValueError(f"{path}: the dict holds no tensors")
                return out
            raise ValueError(f"{path}: expected a tensor or a dict of tensors, got {type(obj).__name__}")
        if suf == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
    except ValueError as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"cannot read target file {path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - unreadable / corrupt file
        raise ValueError(f"cannot read target file {path}: {type(e).__name__}: {e}") from None
    raise ValueError(f"target file {path}: unsupported suffix {suf!r} "
                     f"(use {', '.join(FILE_SUFFIXES)})")


def _check_2d(t: Tensor, what: str) -> Tensor:
    if t.ndim != 2:
        raise ValueError(f"{what} must be a 2-D matrix, got shape {tuple(t.shape)}")
    if not (t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32,
                                                   torch.int64, torch.uint8, torch.bool)):
        raise ValueError(f"{what} has unsupported dtype {t.dtype}")
    return t


def check_target(M: Tensor, what: str = "target") -> None:
    """Raise ValueError if ``M`` holds NaN/inf."""
    if not bool(torch.isfinite(M).all()):
        raise ValueError(f"{what} contains NaN or inf values")


def load_target(path, dtype=torch.float32, device="cpu", key: str | None = None) -> Target:
    """Read matrices from a file into a :class:`Target`.

    ``key`` selects entries: a layer/array name, or a glob pattern (``"*.attn.*"``).
    With ``<layer>.delta`` entries (the ``finetune`` convention), the deltas are the
    targets and the matching ``<layer>.w0`` (all or none) their base weights.
    Several matrices are stacked; their shapes must agree.
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"target file not found: {p}")
    if not p.is_file():
        raise ValueError(f"target path is not a file: {p}")
    obj = _read(p)
    w0s: dict[str, Tensor] = {}
    if torch.is_tensor(obj):
        if key is not None:
            raise ValueError(f"{p} holds a single array; key {key!r} does not apply")
        mats = {p.stem: _check_2d(obj, f"target in {p}")}
    else:
        if any(k.endswith(".delta") for k in obj):
            mats = {k[: -len(".delta")]: v for k, v in obj.items() if k.endswith(".delta")}
            w0s = {k[: -len(".w0")]: v for k, v in obj.items() if k.endswith(".w0")}
        else:
            mats = dict(obj)
        if key is not None:
            sel = {k: v for k, v in mats.items() if k == key or fnmatch.fnmatchcase(k, key)}
            if not sel:
                raise ValueError(f"{p}: no entry matches {key!r}; entries: {', '.join(sorted(mats))}")
            mats = sel
        mats = {k: _check_2d(v, f"entry {k!r} of {p}") for k, v in sorted(mats.items())}
    if not mats:
        raise ValueError(f"{p} holds no matrices")
    shapes = {k: tuple(v.shape) for k, v in mats.items()}
    if len(set(shapes.values())) > 1:
        desc = ", ".join(f"{k} {s[0]}x{s[1]}" for k, s in shapes.items())
        raise ValueError(f"{p}: matrices of different shapes cannot be stacked ({desc}); "
                         f"pick layers with key=")
    labels = list(mats)
    M = torch.stack([mats[k].to(torch.float64) for k in labels])  # (B, m, n)
    check_target(M, f"target {p}")
    w0 = None
    src = "none"
    have = [k for k in labels if k in w0s]
    if have:
        if len(have) != len(labels):
            missing = [k for k in labels if k not in w0s]
            raise ValueError(f"{p}: W0 missing for layer(s) {', '.join(missing)}")
        for k in labels:
            if tuple(w0s[k].shape) != shapes[k]:
                raise ValueError(f"{p}: {k}.w0 has shape {tuple(w0s[k].shape)}, "
                                 f"its delta {shapes[k]}")
        w0 = torch.stack([w0s[k].to(torch.float64) for k in labels])
        check_target(w0, f"W0 in {p}")
        w0 = w0.to(device=device, dtype=dtype)
        src = "file"
    return Target(name=p.name if key is None else f"{p.name}[{key}]",
                  M=M.to(device=device, dtype=dtype), w0=w0, labels=labels, w0_source=src)


def get_target(spec: str, shape=(256, 256), batch: int = 1, seed: int = 0,
               dtype=torch.float32, device="cpu") -> Target:
    """A target from a spec: a kind name (options as ``kind:key=value,...``, e.g.
    ``powerlaw:exponent=1.5``, ``lowrank:rank=64``) or a file path (``path`` or
    ``path:key`` to pick layers). Unknown specs raise a ValueError listing the kinds."""
    s = str(spec).strip()
    kind, _, opts = s.partition(":")
    key = _ALIASES.get(kind.lower(), kind.lower())
    if key in KINDS:
        kw = {}
        for part in filter(None, opts.split(",")):
            k, eq, v = part.partition("=")
            if not eq:
                raise ValueError(f"target option {part!r} must be key=value")
            try:
                kw[k.strip()] = int(v) if v.strip().lstrip("-").isdigit() else float(v)
            except ValueError:
                raise ValueError(f"target option {k}: not a number: {v!r}") from None
        return make_target(key, shape, batch, seed, dtype, device, **kw)
    p = Path(s)
    if p.suffix.lower() in FILE_SUFFIXES or p.exists():
        return load_target(p, dtype=dtype, device=device)
    # "file.safetensors:layer" picks layers
    head, sep, tail = s.rpartition(":")
    if sep and Path(head).suffix.lower() in FILE_SUFFIXES:
        return load_target(head, dtype=dtype, device=device, key=tail)
    raise ValueError(f"unknown target {spec!r}: not a kind ({', '.join(KINDS)}) "
                     f"nor a file ({', '.join(FILE_SUFFIXES)})")


# --------------------------------------------------------------------------- #
# base weights
# --------------------------------------------------------------------------- #
def base_weight(target: Target, mode: str = "gaussian", seed: int = 0) -> Tensor:
    """W0 ``(B, m, n)`` for methods whose update depends on it (HiRA, SMoA, DoRA...).

    The target's own W0 when it has one (a ``finetune`` file); otherwise a stated
    stand-in, independent of the target's values:

    - ``"gaussian"``: i.i.d. N(0, 1/n) (the scale of a freshly initialized layer),
    - ``"orthogonal"``: Haar-random with orthonormal rows/columns (full rank,
      flat spectrum).

    ``mode="file"`` requires the target's own W0 (ValueError if it has none).
    """
    if target.w0 is not None:
        return target.w0
    if mode == "file":
        raise ValueError(f"target {target.name} has no W0 of its own; "
                         f"use a stand-in ({', '.join(BASE_WEIGHT_MODES)})")
    if mode not in BASE_WEIGHT_MODES:
        raise ValueError(f"unknown W0 mode {mode!r}; modes: {', '.join(BASE_WEIGHT_MODES)}, file")
    B, (m, n) = target.batch, target.shape
    g = torch.Generator().manual_seed(int(seed) + 7919)  # not the target's own stream
    if mode == "gaussian":
        w = torch.randn(B, m, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    else:
        w = torch.stack([_haar(m, n, g) for _ in range(B)])
    return w.to(device=target.M.device, dtype=target.M.dtype)
