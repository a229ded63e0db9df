r"""Monte Carlo simulation of the α-LoRA Gaussian-mixture setting (DESIGN §5).

Everything is batched over a leading *trials* dimension and runs on any device.
Random numbers are drawn per trial on seeded CPU generators (torch for Gaussians,
numpy for χ² variables) and then moved, so a seed gives the same numbers on every
device and for every chunk size (trial i is the same whatever the batching).

Ridge solutions use Cholesky solves, never an explicit inverse. ``w_α`` (eq. 1 of
:mod:`rmt.theory`) is affine in α, so each trial computes two vectors once,

    u = Q X y / n,      v = γ Q w̃,      w_α = u + α v,      Q = (XXᵀ/n + γI)⁻¹,

and keeps the five scalars ``a = uᵀμ_t, b = vᵀμ_t, V0 = ‖u‖², V1 = uᵀv, V2 = ‖v‖²``,
from which the score's mean ``a + bα``, variance ``V0 + 2V1α + V2α²`` and the exact
conditional test accuracy ``Φ((a + bα)/√(V0 + 2V1α + V2α²))`` follow for any α grid.

Two exact samplers of the training data ``X = μ yᵀ + Z`` (``(p, m)``, ``m`` samples):

* ``"direct"``: draw ``Z`` and solve. When ``p > m`` the push-through identity
  ``(XXᵀ/m + γI)⁻¹X = X(XᵀX/m + γI)⁻¹`` (and Woodbury for ``Q w̃``) solves the
  ``m × m`` system instead of the ``p × p`` one.
* ``"bartlett"`` (when ``m − 1 ≥ p``): the fit depends on ``X`` only through
  ``XXᵀ`` and ``Xy``. Rotating the samples so that ``y/√m`` is the first axis,
  ``Zy/√m = g ~ N(0, I_p)`` is independent of the other ``m − 1`` columns ``G``, and
  ``XXᵀ = h hᵀ + GGᵀ``, ``Xy = √m h`` with ``h = g + √m μ``; ``GGᵀ ~ W_p(I, m−1)`` is
  drawn as ``LLᵀ`` by Bartlett's decomposition (``L`` lower triangular,
  ``L_ii² ~ χ²_{m−i}``, ``L_ij ~ N(0,1)`` below the diagonal). Exact in distribution,
  ``O(p³)`` instead of ``O(p² m)`` per trial.

Labels are exactly balanced (alternating ±1). The means are placed on the first
two coordinate axes (``μ = ‖μ‖e₁``, ``μ_⊥ = ‖μ_⊥‖e₂``), without loss of generality
since the noise is isotropic.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from torch import Tensor

from rmt.theory import Setting, _count, _nonneg, _positive

__all__ = [
    "RegressionResult",
    "SimResult",
    "TrialStats",
    "fit_source",
    "fit_target",
    "sample_scores",
    "simulate",
    "simulate_fixed_source",
    "simulate_regression",
    "simulate_stats",
    "simulate_stats_betas",
]

_SAMPLERS = ("auto", "direct", "bartlett")
_MODES = ("exact", "empirical")
_CHUNK_ELEMS = 24_000_000  # floats per chunk of (trials, p, m) data


# --------------------------------------------------------------------------- #
# random numbers
# --------------------------------------------------------------------------- #
class _Rng:
    """Per-trial random streams: trial ``first + i`` of stream ``tag`` draws from its
    own torch CPU generator (Gaussians) and numpy generator (χ²), both seeded by
    ``SeedSequence([seed, tag, first + i])``. So a trial's numbers depend neither on
    the chunk size nor on the device, and the source (tag 0), target (tag 1) and
    test (tag 2) draws are independent streams."""

    def __init__(self, seed: int, tag: int = 0, first: int = 0):
        self.seed, self.tag, self.first = int(seed), int(tag), int(first)
        self._gens: dict[int, tuple] = {}

    def _gen(self, i: int):
        if i not in self._gens:
            ss = np.random.SeedSequence([self.seed, self.tag, i])
            t = torch.Generator().manual_seed(int(ss.generate_state(1, np.uint64)[0] >> 1))
            self._gens[i] = (t, np.random.default_rng(ss))
        return self._gens[i]

    def normal(self, T: int, *shape, dtype, device) -> Tensor:
        out = torch.empty(T, *shape, dtype=dtype)  # (T, *shape)
        for j in range(T):
            out[j] = torch.randn(*shape, generator=self._gen(self.first + j)[0], dtype=dtype)
        return out.to(device)

    def chi(self, df: np.ndarray, T: int, dtype, device) -> Tensor:
        # square roots of independent χ²_df, one row per trial: (T, len(df))
        x = np.stack([self._gen(self.first + j)[1].chisquare(df) for j in range(T)])
        return torch.from_numpy(np.sqrt(x)).to(dtype=dtype, device=device)


def _labels(m: int, dtype, device) -> Tensor:
    y = torch.ones(m, dtype=dtype, device=device)  # (m,)
    y[1::2] = -1
    return y


def _use_bartlett(sampler: str, p: int, m: int) -> bool:
    if sampler == "bartlett":
        if m - 1 < p:
            raise ValueError(f"the bartlett sampler needs samples-1 >= p, got {m} samples, p={p}")
        return True
    if sampler == "direct":
        return False
    return m - 1 >= p


def _gram_bartlett(rng: _Rng, T: int, p: int, m: int, mu: Tensor, dtype, device):
    """Exact draw of ``(XXᵀ/m, Xy/m)`` for ``X = μyᵀ + Z`` with ``m`` balanced samples."""
    L = torch.tril(rng.normal(T, p, p, dtype=dtype, device=device), diagonal=-1)  # (T,p,p)
    df = m - 1 - np.arange(p)  # χ²_{(m-1)-i+1}, i = 1..p
    L = L + torch.diag_embed(rng.chi(df, T, dtype, device))
    h = rng.normal(T, p, dtype=dtype, device=device) + math.sqrt(m) * mu  # (T, p)
    S = (L @ L.transpose(-1, -2) + h[:, :, None] * h[:, None, :]) / m  # (T, p, p)
    r = h / math.sqrt(m)  # (T, p)  = Xy/m
    return S, r


def _data(rng: _Rng, T: int, p: int, m: int, mu: Tensor, dtype, device) -> Tensor:
    y = _labels(m, dtype, device)
    Z = rng.normal(T, p, m, dtype=dtype, device=device)  # (T, p, m)
    return Z + mu[None, :, None] * y[None, None, :], y


def _ridge_solve(S: Tensor, gamma: float, rhs: Tensor) -> Tensor:
    """Solve ``(S + γI) x = rhs`` by Cholesky; S (T, d, d), rhs (T, d, k)."""
    d = S.shape[-1]
    eye = torch.eye(d, dtype=S.dtype, device=S.device)
    Lc = torch.linalg.cholesky(S + gamma * eye)
    nt = torch.get_num_threads()
    if Lc.device.type != "cpu" or nt == 1:
        return torch.cholesky_solve(rhs, Lc)
    # batched triangular solves on CPU oversubscribe threads (nested parallelism over
    # the batch and inside BLAS) and can run ~100x slower; they are cheap on one thread
    torch.set_num_threads(1)
    try:
        return torch.cholesky_solve(rhs, Lc)
    finally:
        torch.set_num_threads(nt)


# --------------------------------------------------------------------------- #
# the two ridge fits
# --------------------------------------------------------------------------- #
def fit_source(rng: _Rng, T: int, p: int, N: int, mu: Tensor, gamma_src: float, *,
               sampler: str = "auto") -> Tensor:
    """``w̃ = (X̃X̃ᵀ/N + γ̃I)⁻¹ X̃ỹ/N`` for T independent source sets; returns (T, p)."""
    dtype, device = mu.dtype, mu.device
    if _use_bartlett(sampler, p, N):
        S, r = _gram_bartlett(rng, T, p, N, mu, dtype, device)
        return _ridge_solve(S, gamma_src, r[..., None])[..., 0]
    X, y = _data(rng, T, p, N, mu, dtype, device)  # (T, p, N)
    if p <= N:
        S = X @ X.transpose(-1, -2) / N  # (T, p, p)
        return _ridge_solve(S, gamma_src, (X @ y / N)[..., None])[..., 0]
    K = X.transpose(-1, -2) @ X / N  # (T, N, N), push-through
    c = _ridge_solve(K, gamma_src, y.expand(T, N)[..., None] / N)  # (T, N, 1)
    return (X @ c)[..., 0]


def fit_target(rng: _Rng, w_src: Tensor, mu_t: Tensor, n: int, gamma: float, *,
               sampler: str = "auto") -> tuple[Tensor, Tensor]:
    """``u = QXy/n`` and ``v = γQw̃`` for T target sets; w_src (T, p) -> two (T, p)."""
    T, p = w_src.shape
    dtype, device = w_src.dtype, w_src.device
    if _use_bartlett(sampler, p, n):
        S, r = _gram_bartlett(rng, T, p, n, mu_t, dtype, device)
        sol = _ridge_solve(S, gamma, torch.stack([r, w_src], dim=-1))  # (T, p, 2)
        return sol[..., 0], gamma * sol[..., 1]
    X, y = _data(rng, T, p, n, mu_t, dtype, device)  # (T, p, n)
    if p <= n:
        S = X @ X.transpose(-1, -2) / n
        sol = _ridge_solve(S, gamma, torch.stack([X @ y / n, w_src], dim=-1))
        return sol[..., 0], gamma * sol[..., 1]
    # push-through: QX = X K⁻¹ with K = XᵀX/n + γI (n × n); Woodbury for γQw̃
    K = X.transpose(-1, -2) @ X / n  # (T, n, n)
    Xw = (X.transpose(-1, -2) @ w_src[..., None])[..., 0] / n  # (T, n)
    sol = _ridge_solve(K, gamma, torch.stack([y.expand(T, n) / n, Xw], dim=-1))  # (T, n, 2)
    u = (X @ sol[..., :1])[..., 0]
    v = w_src - (X @ sol[..., 1:])[..., 0]
    return u, v


# --------------------------------------------------------------------------- #
# per-trial statistics and their summaries
# --------------------------------------------------------------------------- #
@dataclasses.dataclass
class TrialStats:
    """Per-trial scalars (numpy arrays of shape (T,)): score mean ``a + bα`` and
    ``‖w_α‖² = V0 + 2V1α + V2α²`` on the target; the source vector's
    ``w_dot_mu = w̃ᵀμ_t`` and ``w_norm2 = ‖w̃‖²``."""

    a: np.ndarray
    b: np.ndarray
    V0: np.ndarray
    V1: np.ndarray
    V2: np.ndarray
    w_dot_mu: np.ndarray
    w_norm2: np.ndarray

    @property
    def trials(self) -> int:
        return len(self.a)

    def mean_var(self, alpha):
        """(T, K) arrays of the conditional score mean and variance."""
        al = np.asarray(alpha, dtype=float).reshape(1, -1)
        m = self.a[:, None] + self.b[:, None] * al
        v = self.V0[:, None] + 2 * self.V1[:, None] * al + self.V2[:, None] * al * al
        return m, v

    def accuracy(self, alpha):
        """(T, K) exact conditional accuracies ``Φ(w_αᵀμ_t/‖w_α‖)``."""
        from scipy.special import ndtr
        m, v = self.mean_var(alpha)
        return ndtr(m / np.sqrt(v))

    def pretrained_accuracy(self):
        from scipy.special import ndtr
        return ndtr(self.w_dot_mu / np.sqrt(self.w_norm2))

    def alpha_star_plugin(self) -> float:
        """α* of eq. (8) with the trial-averaged coefficients."""
        from rmt.theory import _alpha_star_from
        return _alpha_star_from({k: float(getattr(self, k).mean())
                                 for k in ("a", "b", "V0", "V1", "V2")})

    def alpha_star_grid(self, grid) -> float:
        """Argmax over ``grid`` of the trial-averaged accuracy curve."""
        grid = np.asarray(grid, dtype=float)
        return float(grid[np.argmax(self.accuracy(grid).mean(0))])

    def concat(self, other: TrialStats) -> TrialStats:
        return TrialStats(*(np.concatenate([getattr(self, f.name), getattr(other, f.name)])
                            for f in dataclasses.fields(self)))


def _mean_se(x: np.ndarray):
    """Mean and standard error over axis 0."""
    T = x.shape[0]
    se = x.std(0, ddof=1) / math.sqrt(T) if T > 1 else np.full(x.shape[1:], np.nan)
    return x.mean(0), se


@dataclasses.dataclass
class SimResult:
    """Monte Carlo summary on an α grid: means and standard errors over trials."""

    alpha: np.ndarray
    accuracy: np.ndarray
    accuracy_se: np.ndarray
    mean: np.ndarray
    mean_se: np.ndarray
    var: np.ndarray
    var_se: np.ndarray
    pretrained_accuracy: float
    pretrained_se: float
    stats: TrialStats
    mode: str

    @property
    def trials(self) -> int:
        return self.stats.trials


def _check_common(trials, seed, mode, sampler, dtype):
    trials = _count("trials", trials)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {', '.join(_MODES)}, got {mode!r}")
    if sampler not in _SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(_SAMPLERS)}, got {sampler!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    return trials


def _chunks(trials: int, per_trial: int, chunk: int | None):
    size = chunk or max(1, min(trials, _CHUNK_ELEMS // max(1, per_trial)))
    start = 0
    while start < trials:
        yield min(size, trials - start)
        start += size


def _target_stats(u: Tensor, v: Tensor, w: Tensor, mu_t: Tensor) -> TrialStats:
    def n(t):
        return t.double().cpu().numpy().copy()
    return TrialStats(a=n(u @ mu_t), b=n(v @ mu_t), V0=n((u * u).sum(-1)),
                      V1=n((u * v).sum(-1)), V2=n((v * v).sum(-1)),
                      w_dot_mu=n(w @ mu_t), w_norm2=n((w * w).sum(-1)))


def _means(s: Setting, dtype, device):
    if s.p < 2 and s.mu_perp_norm > 0 and abs(s.beta) < 1:
        raise ValueError("p >= 2 is needed for a target mean with a part orthogonal to mu")
    mu = torch.zeros(s.p, dtype=dtype, device=device)
    mu[0] = s.mu_norm
    mu_t = s.beta * mu
    if s.p >= 2:
        mu_t[1] = math.sqrt(max(0.0, 1 - s.beta ** 2)) * s.mu_perp_norm
    return mu, mu_t


def simulate_stats(s: Setting, *, trials: int = 100, seed: int = 0, device="cpu",
                   dtype=torch.float64, sampler: str = "auto", chunk: int | None = None,
                   progress: bool = False, _return_vectors: bool = False):
    """Draw ``trials`` independent (source, target) data sets and return the
    per-trial :class:`TrialStats` (everything needed for any α grid)."""
    if not isinstance(s, Setting):
        raise ValueError(f"expected an rmt.theory.Setting, got {type(s).__name__}")
    out = simulate_stats_betas(s, [s.beta], trials=trials, seed=seed, device=device,
                               dtype=dtype, sampler=sampler, chunk=chunk, progress=progress,
                               _return_vectors=_return_vectors)
    return out[0]


def simulate_stats_betas(s: Setting, betas, *, trials: int = 100, seed: int = 0,
                         device="cpu", dtype=torch.float64, sampler: str = "auto",
                         chunk: int | None = None, progress: bool = False,
                         _return_vectors: bool = False) -> list:
    """:func:`simulate_stats` for several target similarities β at once, with common
    random numbers: each trial fits one source w̃ (which does not depend on β) and
    reuses the same target noise for every β. Returns one :class:`TrialStats` per β."""
    if not isinstance(s, Setting):
        raise ValueError(f"expected an rmt.theory.Setting, got {type(s).__name__}")
    trials = _check_common(trials, seed, "exact", sampler, dtype)
    settings = [s.replace(beta=b) for b in np.atleast_1d(np.asarray(betas, dtype=float))]
    means = [_means(x, dtype, device) for x in settings]
    mu = means[0][0]
    outs: list = [None] * len(settings)
    vecs: list = [[] for _ in settings]
    per = s.p * max(min(s.p, s.N) if _use_bartlett(sampler, s.p, s.N) else s.N, s.n)
    it = list(_chunks(trials, per, chunk))
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="trials", unit="chunk", disable=None)
    first = 0
    for T in it:
        w = fit_source(_Rng(seed, 0, first), T, s.p, s.N, mu, s.gamma_src, sampler=sampler)
        for j, (_, mu_t) in enumerate(means):
            # the same target stream for every β: common random numbers
            u, v = fit_target(_Rng(seed, 1, first), w, mu_t, s.n, s.gamma, sampler=sampler)
            st = _target_stats(u, v, w, mu_t)
            outs[j] = st if outs[j] is None else outs[j].concat(st)
            if _return_vectors:
                vecs[j].append((u, v))
        first += T
    if _return_vectors:
        return [(o, m[1], torch.cat([a for a, _ in vv]), torch.cat([b for _, b in vv]))
                for o, m, vv in zip(outs, means, vecs)]
    return outs


def _summarize(stats: TrialStats, alpha: np.ndarray, mode: str, acc=None, mean=None,
               var=None) -> SimResult:
    if acc is None:
        acc = stats.accuracy(alpha)
        mean, var = stats.mean_var(alpha)
    pa, pse = _mean_se(stats.pretrained_accuracy()[:, None])
    return SimResult(alpha, *_mean_se(acc), *_mean_se(mean), *_mean_se(var),
                     float(pa[0]), float(pse[0]), stats, mode)


def _alpha_arr(alpha) -> np.ndarray:
    a = np.atleast_1d(np.asarray(alpha, dtype=float))
    if a.ndim != 1 or a.size == 0 or not np.all(np.isfinite(a)):
        raise ValueError("alpha must be a finite number or a non-empty 1-D list of numbers")
    return a


def simulate(s: Setting, alpha, *, trials: int = 100, seed: int = 0, device="cpu",
             dtype=torch.float64, mode: str = "exact", n_test: int = 2000,
             sampler: str = "auto", chunk: int | None = None,
             progress: bool = False) -> SimResult:
    """Monte Carlo accuracy, score mean and score variance of ``w_α`` on the target.

    ``mode="exact"`` (default, lower variance) uses the exact conditional
    accuracy ``Φ(w_αᵀμ_β/‖w_α‖)`` and moments ``w_αᵀμ_β``, ``‖w_α‖²`` per trial;
    ``mode="empirical"`` scores ``n_test`` fresh target points per trial and reports
    the fraction classified correctly and the sample mean/variance of ``y·g``.
    Returns means and standard errors over trials (:class:`SimResult`).
    """
    alpha = _alpha_arr(alpha)
    _check_common(trials, seed, mode, sampler, dtype)
    if mode == "exact":
        return _summarize(simulate_stats(s, trials=trials, seed=seed, device=device,
                                         dtype=dtype, sampler=sampler, chunk=chunk,
                                         progress=progress), alpha, mode)
    n_test = _count("n_test", n_test)
    stats, mu_t, u, v = simulate_stats(s, trials=trials, seed=seed, device=device,
                                       dtype=dtype, sampler=sampler, chunk=chunk,
                                       progress=progress, _return_vectors=True)
    yg, y = _test_scores(u, v, mu_t, n_test, seed, alpha)  # (T, n_test, K)
    acc = (yg > 0).double().mean(1).cpu().numpy()
    mean = yg.mean(1).cpu().numpy()
    var = yg.var(1).cpu().numpy()
    return _summarize(stats, alpha, mode, acc, mean, var)


def _test_scores(u: Tensor, v: Tensor, mu_t: Tensor, n_test: int, seed: int, alpha):
    """``y·g`` for ``n_test`` fresh target points per trial: (T, n_test, K)."""
    T, p = u.shape
    y = _labels(n_test, u.dtype, u.device)  # (n_test,)
    su, sv, first = [], [], 0
    for Tc in _chunks(T, n_test * p, None):  # bounded memory: (Tc, n_test, p) at a time
        rng = _Rng(seed, 2, first)
        X = rng.normal(Tc, n_test, p, dtype=u.dtype, device=u.device) + y[None, :, None] * mu_t
        su.append(X @ u[first:first + Tc, :, None])  # (Tc, n_test, 1)
        sv.append(X @ v[first:first + Tc, :, None])
        first += Tc
    su, sv = torch.cat(su), torch.cat(sv)
    al = torch.as_tensor(np.asarray(alpha), dtype=u.dtype, device=u.device)
    return y[None, :, None] * (su + al * sv), y


def sample_scores(s: Setting, alpha: float, *, n_test: int = 20000, trials: int = 1,
                  seed: int = 0, device="cpu", dtype=torch.float64):
    """Scores ``g = w_αᵀx`` on ``n_test`` fresh target points, for ``trials`` trained
    models: returns numpy ``(g, y)`` with shapes ``(trials, n_test)``, ``(n_test,)``."""
    alpha = float(_alpha_arr(alpha)[0])
    _, mu_t, u, v = simulate_stats(s, trials=trials, seed=seed, device=device, dtype=dtype,
                                   _return_vectors=True)
    yg, y = _test_scores(u, v, mu_t, _count("n_test", n_test), seed, [alpha])
    g = (yg[..., 0] * y).cpu().numpy()
    return g, y.cpu().numpy()


# --------------------------------------------------------------------------- #
# fixed source vector
# --------------------------------------------------------------------------- #
def simulate_fixed_source(w_src, mu_t, n: int, gamma: float, alpha, *, trials: int = 100,
                          seed: int = 0, device="cpu", dtype=torch.float64,
                          sampler: str = "auto", chunk: int | None = None) -> SimResult:
    """As :func:`simulate`, for a given source vector ``w_src`` (p,) and target mean
    ``mu_t`` (p,) (only the target data are random)."""
    alpha = _alpha_arr(alpha)
    trials = _check_common(trials, seed, "exact", sampler, dtype)
    w = torch.as_tensor(w_src, dtype=dtype).to(device).reshape(-1)
    mt = torch.as_tensor(mu_t, dtype=dtype).to(device).reshape(-1)
    if w.shape != mt.shape:
        raise ValueError(f"w_src and mu_t must have the same length, got {tuple(w.shape)} "
                         f"and {tuple(mt.shape)}")
    if not (torch.isfinite(w).all() and torch.isfinite(mt).all()):
        raise ValueError("w_src and mu_t must be finite")
    n = _count("n", n)
    gamma = _positive("gamma", gamma)
    p = w.numel()
    out, first = None, 0
    for T in _chunks(trials, p * n, chunk):
        wt = w.expand(T, p)
        u, v = fit_target(_Rng(seed, 1, first), wt, mt, n, gamma, sampler=sampler)
        first += T
        st = _target_stats(u, v, wt, mt)
        out = st if out is None else out.concat(st)
    return _summarize(out, alpha, "exact")


# --------------------------------------------------------------------------- #
# regression variant
# --------------------------------------------------------------------------- #
@dataclasses.dataclass
class RegressionResult:
    """Risk ``R(α) = ‖W_α − W_t‖_F² + k s²`` on an α grid (mean, s.e. over trials),
    with per-trial coefficients ``R0 + 2R1α + R2α²``."""

    alpha: np.ndarray
    risk: np.ndarray
    risk_se: np.ndarray
    R0: np.ndarray
    R1: np.ndarray
    R2: np.ndarray

    def alpha_star_plugin(self) -> float:
        return float(-self.R1.mean() / self.R2.mean())


def simulate_regression(W_t, W_s, n: int, gamma: float, alpha, *, noise_var: float = 0.0,
                        trials: int = 100, seed: int = 0, device="cpu",
                        dtype=torch.float64, chunk: int | None = None) -> RegressionResult:
    """Monte Carlo of α-fine-tuned ridge regression (eq. 10 of :mod:`rmt.theory`).

    ``y = W_tᵀx + ε``, ``x ~ N(0, I_p)``, ``ε ~ N(0, s² I_k)``; ``W_α = QXY/n + αγQW_s``.
    ``W_t, W_s``: (p, k) or (p,). The exact test risk given ``W_α`` is
    ``‖W_α − W_t‖_F² + k s²``.
    """
    alpha = _alpha_arr(alpha)
    trials = _check_common(trials, seed, "exact", "direct", dtype)
    Wt = torch.as_tensor(W_t, dtype=dtype).to(device)
    Ws = torch.as_tensor(W_s, dtype=dtype).to(device)
    if Wt.ndim == 1:
        Wt = Wt[:, None]
    if Ws.ndim == 1:
        Ws = Ws[:, None]
    if Wt.shape != Ws.shape or Wt.ndim != 2:
        raise ValueError(f"W_t and W_s must both be (p, k), got {tuple(Wt.shape)} and "
                         f"{tuple(Ws.shape)}")
    if not (torch.isfinite(Wt).all() and torch.isfinite(Ws).all()):
        raise ValueError("W_t and W_s must be finite")
    n = _count("n", n)
    gamma = _positive("gamma", gamma)
    s2 = _nonneg("noise_var", noise_var)
    p, k = Wt.shape
    R, first = [], 0
    for T in _chunks(trials, p * n, chunk):
        rng = _Rng(seed, 3, first)
        first += T
        X = rng.normal(T, p, n, dtype=dtype, device=device)  # (T, p, n)
        E = math.sqrt(s2) * rng.normal(T, n, k, dtype=dtype, device=device)  # (T, n, k)
        Y = X.transpose(-1, -2) @ Wt + E  # (T, n, k)
        if p <= n:
            S = X @ X.transpose(-1, -2) / n
            sol = _ridge_solve(S, gamma, torch.cat([X @ Y / n, Ws.expand(T, p, k)], -1))
            A, B = sol[..., :k], gamma * sol[..., k:]  # QXY/n, γQW_s
        else:
            K = X.transpose(-1, -2) @ X / n  # (T, n, n)
            sol = _ridge_solve(K, gamma, torch.cat([Y / n, X.transpose(-1, -2) @ Ws / n], -1))
            A, B = X @ sol[..., :k], Ws - X @ sol[..., k:]
        U = A - Wt  # W_α − W_t = U + α B
        R.append(torch.stack([(U * U).sum((-1, -2)) + k * s2, (U * B).sum((-1, -2)),
                              (B * B).sum((-1, -2))], -1).double().cpu().numpy())
    R = np.concatenate(R)  # (T, 3)
    risk = R[:, :1] + 2 * R[:, 1:2] * alpha + R[:, 2:3] * alpha * alpha
    return RegressionResult(alpha, *_mean_se(risk), R[:, 0], R[:, 1], R[:, 2])
