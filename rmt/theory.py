r"""Deterministic equivalents for α-LoRA in a two-class Gaussian mixture (DESIGN §5).

Paper: "α-LoRA: Effective Fine-tuning via Base Model Rescaling" (under review, ICLR
2026), whose random-matrix section analyses exactly this model; the formulas below
are derived here independently and checked against :mod:`rmt.simulate`.

Setting (α-LoRA, random-matrix analysis; see DESIGN.md §5)
-----------------------------------------------------------
Data ``x = y μ + z``, ``z ~ N(0, I_p)``, ``y = ±1`` balanced. The source task has
mean ``μ`` and ``N`` samples ``X̃ (p, N)``; the target task has mean
``μ_β = β μ + √(1−β²) μ_⊥`` (``μ_⊥ ⊥ μ``) and ``n`` samples ``X (p, n)``, so that

    ‖μ_β‖² = β²‖μ‖² + (1−β²)‖μ_⊥‖²,        μᵀ μ_β = β ‖μ‖².

``η = p/n``, ``η̃ = p/N``. Source ridge ``w̃ = (X̃X̃ᵀ/N + γ̃ I)⁻¹ X̃ỹ/N``; fine-tuning
with a scaled base, ``w_α = α w̃ + a`` with ``a`` minimising
``(1/n)‖y − Xᵀ(α w̃ + a)‖² + γ‖a‖²``, i.e.

    w_α = Q X y / n + α γ Q w̃,        Q = (XXᵀ/n + γ I)⁻¹.                     (1)

Score on a fresh target point ``g = w_αᵀ x``. Given the training data and ``y = +1``,
``g ~ N(w_αᵀ μ_β, ‖w_α‖²)``, so the test accuracy of ``sign(g)`` is exactly
``Φ(w_αᵀ μ_β / ‖w_α‖)`` (the two classes are symmetric). Both quantities
concentrate, and the deterministic equivalents below give their limits.

Derivation (resolvent / leave-one-out, Couillet & Liao, *Random Matrix Methods for
Machine Learning*, 2022, ch. 2-3)
-------------------------------------------------------------------------------
1. *Deterministic equivalent of Q.* With ``C = E[xxᵀ] = I + μ_t μ_tᵀ`` (μ_t the
   target mean), ``Q ↔ Q̄ = (C/(1+δ) + γ I)⁻¹`` where ``δ = (1/n) tr C Q̄`` is, to
   leading order, the positive root of

       γ δ² + (1 + γ − η) δ − η = 0.                                           (2)

   Writing ``κ = 1 + γ(1+δ)`` and ``λ = ‖μ_t‖² + κ``:
   ``Q̄ = ((1+δ)/κ) (I − μ_t μ_tᵀ / λ)``.
2. *The data term.* Sherman-Morrison, ``Q x_i = Q₋ᵢ x_i / (1 + x_iᵀQ₋ᵢx_i/n)`` with
   ``x_iᵀQ₋ᵢx_i/n → δ`` and ``y_i x_i = μ_t + y_i z_i``, gives

       E[Q X y / n] ≈ Q̄ μ_t / (1+δ) = μ_t / λ.                                  (3)

3. *First-order quantities* (for a deterministic w̃ independent of X, with
   ``c = w̃ᵀμ_t``, ``W = ‖w̃‖²``, ``M = ‖μ_t‖²``):

       B(γ) = w̃ᵀ Q X y / n        ≈ c / λ,
       A(γ) = w̃ᵀ Q w̃              ≈ ((1+δ)/κ) (W − c² / λ),
       C(γ) = yᵀXᵀ Q X y / n²     ≈ (δ + M/λ) / (1+δ).                         (4)

   For C, split ``y_i x_iᵀ Q X y/n = (d_i + y_i x_iᵀ Q₋ᵢ X₋ᵢ y₋ᵢ/n)/(1+d_i)`` and use
   (3) on the leave-one-out vector: ``→ (δ + μ_tᵀμ_t/λ)/(1+δ)``.
4. *Second-order quantities by differentiation.* ``∂Q/∂γ = −Q²``, and deterministic
   equivalents of analytic functions of γ may be differentiated, so

       ‖QXy/n‖² ≈ −C'(γ),   w̃ᵀQ²Xy/n ≈ −B'(γ),   w̃ᵀQ²w̃ ≈ −A'(γ),          (5)

   with ``δ'(γ) = −δ(1+δ) / (2γδ + 1 + γ − η)`` from (2).
5. *Mean and variance of the score* (given ``y = +1``):

       m(α)  = w_αᵀμ_t  ≈ (M + α γ (1+δ) c) / λ                               (6)
       σ²(α) = ‖w_α‖²   ≈ V0 + 2 α V1 + α² V2,
               V0 = −C'(γ),  V1 = −γ B'(γ),  V2 = −γ² A'(γ).                    (7)

   Accuracy ``Φ(m/σ)`` (signed: below ½ when ``m < 0``).
6. *Optimum.* ``m = a + bα`` is affine and ``σ²`` quadratic, so ``d(m/σ)/dα = 0`` is
   linear in α:

       α* = (a V1 − b V0) / (b V1 − a V2),     ᾱ = −a / b   (m(ᾱ) = 0).        (8)

7. *The source classifier* is itself (1) with α = 0 on the source task, so by (4)-(5)
   with ``(η̃, γ̃, ‖μ‖)``: ``w̃ᵀμ_β → β‖μ‖²/λ̃`` and ``‖w̃‖² → −C̃'(γ̃)``,
   ``λ̃ = ‖μ‖² + 1 + γ̃(1+δ̃)``. Expanded, with ``h̃ = 1 − η̃/(1+γ̃(1+δ̃))²``,

       lim ‖w̃‖² = (1/h̃)[ ‖μ‖²(1 + (1−h̃)‖μ‖²)/λ̃² + (1−h̃)(1 − 2‖μ‖²/λ̃) ],   (9)

   the value given in DESIGN §5 (checked numerically in the tests and against
   simulation). The public reference code of the paper gets the mean and the
   α⁰, α¹ terms of E[g²] exactly as here, but its α² term uses, in effect,
   ``‖μ‖²/λ̃² + (1−h̃)(1 − 2‖μ‖²/λ̃)`` for ‖w̃‖² (no 1/h̃ factor, no
   ``(1−h̃)‖μ‖⁴/λ̃²`` term), although its own pre-trained-model formula agrees with
   (9). Simulation sides with (9): e.g. N = p = 300, γ̃ = 0.5, ‖μ‖ = 1 gives
   simulated ‖w̃‖² = 0.296 vs (9) 0.2963 vs 0.194. In Figure 1 (h̃ ≈ 1) the
   difference is small (α* = 1.632 / 4.099 / 7.471 here vs 1.645 / 4.132 / 7.530).

   Accuracy convention: we report the signed ``Φ(m/σ)``, the accuracy of
   ``sign(g)`` that the simulation measures; the reference code plots
   ``Φ(|m|/σ)`` (available as ``accuracy(..., symmetric=True)``), which differs only
   for α on the far side of ᾱ.

Regression variant
------------------
``y = W_tᵀ x + ε ∈ R^k``, ``x ~ N(0, I_p)``, ``ε ~ N(0, s² I_k)``; a source matrix
``W_s (p, k)`` is fixed. Fine-tune ``A = argmin (1/n)‖Y − Xᵀ(α W_s + A)‖_F² + γ‖A‖_F²``
so ``W_α = α W_s + A = Q X Y/n + α γ Q W_s`` (same form as (1)), and

    W_α − W_t = −γ Q (W_t − α W_s) + Q X E / n.

With ``Q̄ = q I``, ``q = (1+δ)/κ = δ/η``, ``E[Q²] = −∂_γ E[Q]`` and
``(1/n²) tr XᵀQ²X = (1/n) tr(Q − γQ²)``, the test risk
``R(α) = E‖W_αᵀx − y‖² = ‖W_α − W_t‖_F² + k s²`` is

    R(α) ≈ γ² (−δ'/η) ‖W_t − α W_s‖_F² + k s² (δ + γ δ') + k s²,              (10)

a quadratic in α minimised at ``α* = ⟨W_t, W_s⟩_F / ‖W_s‖_F²``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy.special import ndtr

__all__ = [
    "Setting",
    "accuracy",
    "alpha_star",
    "alpha_worst",
    "delta",
    "delta_prime",
    "design_w_norm2",
    "fixed_source_accuracy",
    "fixed_source_alpha_star",
    "fixed_source_alpha_worst",
    "fixed_source_coefficients",
    "fixed_source_mean_var",
    "mean_var",
    "pretrained_accuracy",
    "regression_alpha_star",
    "regression_coefficients",
    "regression_risk",
    "score_coefficients",
    "source_stats",
]


# --------------------------------------------------------------------------- #
# validation
# --------------------------------------------------------------------------- #
def _finite(name: str, v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {v!r}") from None
    if not math.isfinite(f):
        raise ValueError(f"{name} must be finite, got {v!r}")
    return f


def _positive(name: str, v) -> float:
    f = _finite(name, v)
    if f <= 0:
        raise ValueError(f"{name} must be > 0, got {v!r}")
    return f


def _nonneg(name: str, v) -> float:
    f = _finite(name, v)
    if f < 0:
        raise ValueError(f"{name} must be >= 0, got {v!r}")
    return f


def _count(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if v < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    return int(v)


def _alpha(alpha) -> np.ndarray:
    a = np.asarray(alpha, dtype=float)
    if not np.all(np.isfinite(a)):
        raise ValueError("alpha must be finite")
    return a


@dataclasses.dataclass(frozen=True)
class Setting:
    """The α-LoRA Gaussian-mixture setting of DESIGN §5 (validated on creation).

    N, n, p: source samples, target samples, dimension. ``mu_norm = ‖μ‖`` (source
    mean), ``mu_perp_norm = ‖μ_⊥‖``, ``beta`` ∈ [−1, 1] (target mean
    ``μ_β = β μ + √(1−β²) μ_⊥``), ``gamma_src = γ̃`` and ``gamma = γ`` the ridges.
    """

    N: int
    n: int
    p: int
    mu_norm: float
    mu_perp_norm: float
    beta: float
    gamma_src: float
    gamma: float

    def __post_init__(self):
        for k in ("N", "n", "p"):
            object.__setattr__(self, k, _count(k, getattr(self, k)))
        for k in ("mu_norm", "mu_perp_norm"):
            object.__setattr__(self, k, _nonneg(k, getattr(self, k)))
        for k in ("gamma_src", "gamma"):
            object.__setattr__(self, k, _positive(k, getattr(self, k)))
        b = _finite("beta", self.beta)
        if abs(b) > 1:
            raise ValueError(f"beta must be in [-1, 1], got {self.beta!r}")
        object.__setattr__(self, "beta", b)

    @property
    def eta(self) -> float:
        """η = p/n (target)."""
        return self.p / self.n

    @property
    def eta_src(self) -> float:
        """η̃ = p/N (source)."""
        return self.p / self.N

    @property
    def target_mean_norm2(self) -> float:
        """‖μ_β‖² = β²‖μ‖² + (1−β²)‖μ_⊥‖²."""
        b2 = self.beta ** 2
        return b2 * self.mu_norm ** 2 + (1 - b2) * self.mu_perp_norm ** 2

    @property
    def cross(self) -> float:
        """μᵀμ_β = β‖μ‖²."""
        return self.beta * self.mu_norm ** 2

    def replace(self, **kw) -> Setting:
        return dataclasses.replace(self, **kw)


# --------------------------------------------------------------------------- #
# the scalar δ and its γ-derivative
# --------------------------------------------------------------------------- #
def delta(eta, gamma):
    """Positive root of ``γδ² + (1+γ−η)δ − η = 0`` (eq. 2); vectorized."""
    eta = np.asarray(eta, dtype=float)
    gamma = np.asarray(gamma, dtype=float)
    b = 1.0 + gamma - eta
    disc = np.sqrt(b * b + 4.0 * gamma * eta)
    # numerically stable form of (−b + disc)/(2γ) = 2η/(b + disc)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(b >= 0, 2.0 * eta / (b + disc), (disc - b) / (2.0 * gamma))
    return out[()] if out.ndim == 0 else out


def delta_prime(eta, gamma):
    """dδ/dγ = −δ(1+δ)/(2γδ + 1 + γ − η), by implicit differentiation of (2)."""
    d = delta(eta, gamma)
    return -d * (1 + d) / (2 * gamma * d + 1 + gamma - eta)


def _first_order(eta, gamma, M, c, W):
    """A, B, C of eq. (4) and their γ-derivatives (closed form)."""
    d = delta(eta, gamma)
    dp = delta_prime(eta, gamma)
    kap = 1 + gamma * (1 + d)
    kap_p = (1 + d) + gamma * dp
    lam = M + kap
    lam_p = kap_p
    B = c / lam
    B_p = -c * lam_p / lam ** 2
    r = (1 + d) / kap
    r_p = (dp * kap - (1 + d) * kap_p) / kap ** 2
    A = r * (W - c * c / lam)
    A_p = r_p * (W - c * c / lam) + r * c * c * lam_p / lam ** 2
    # C = δ/(1+δ) + M / (λ(1+δ))
    C = d / (1 + d) + M / (lam * (1 + d))
    C_p = dp / (1 + d) ** 2 - M * (lam_p * (1 + d) + lam * dp) / (lam * (1 + d)) ** 2
    return dict(delta=d, delta_p=dp, lam=lam, A=A, A_p=A_p, B=B, B_p=B_p, C=C, C_p=C_p)


# --------------------------------------------------------------------------- #
# fixed source classifier (any w̃ independent of the target data)
# --------------------------------------------------------------------------- #
def fixed_source_coefficients(*, p, n, gamma, mu_norm2, w_dot_mu, w_norm2) -> dict:
    """Coefficients of ``m(α) = a + bα`` and ``σ²(α) = V0 + 2V1 α + V2 α²`` (eqs. 6-7).

    For a fixed source vector w̃ (independent of the n target samples) with
    ``‖μ_t‖² = mu_norm2``, ``w̃ᵀμ_t = w_dot_mu`` and ``‖w̃‖² = w_norm2``.
    Returns a dict with keys ``a, b, V0, V1, V2, delta``.
    """
    p = _count("p", p)
    n = _count("n", n)
    gamma = _positive("gamma", gamma)
    M = _nonneg("mu_norm2", mu_norm2)
    c = _finite("w_dot_mu", w_dot_mu)
    W = _nonneg("w_norm2", w_norm2)
    if c * c > W * M * (1 + 1e-9) + 1e-12:
        raise ValueError(
            f"w_dot_mu^2={c * c:.6g} exceeds w_norm2*mu_norm2={W * M:.6g} (Cauchy-Schwarz)")
    eta = p / n
    f = _first_order(eta, gamma, M, c, W)
    return dict(
        a=M / f["lam"],
        b=gamma * (1 + f["delta"]) * c / f["lam"],
        V0=-f["C_p"],
        V1=-gamma * f["B_p"],
        V2=-gamma ** 2 * f["A_p"],
        delta=f["delta"],
    )


def _mean_var_from(co: dict, alpha):
    a = _alpha(alpha)
    mean = co["a"] + co["b"] * a
    var = co["V0"] + 2 * co["V1"] * a + co["V2"] * a * a
    return mean, var


def _alpha_star_from(co: dict) -> float:
    a, b, V0, V1, V2 = (co[k] for k in ("a", "b", "V0", "V1", "V2"))
    den = b * V1 - a * V2
    if den == 0:
        return float("nan") if b == 0 and a == 0 else math.copysign(math.inf, b)
    s = (a * V1 - b * V0) / den

    def ratio(x):
        return (a + b * x) / math.sqrt(V0 + 2 * V1 * x + V2 * x * x)

    # the unique critical point of m/σ is either its maximum or its minimum; in the
    # second case the supremum is the limit at ±∞ (value |b|/√V2, sign of b)
    lim = abs(b) / math.sqrt(V2) if V2 > 0 else math.inf
    if ratio(s) >= lim * (1 - 1e-12):
        return float(s)
    return math.copysign(math.inf, b)


def _alpha_worst_from(co: dict) -> float:
    if co["b"] == 0:
        return float("nan")
    return float(-co["a"] / co["b"])


def fixed_source_mean_var(alpha, *, p, n, gamma, mu_norm2, w_dot_mu, w_norm2):
    """Deterministic equivalents ``(mean, var)`` of the score ``g = w_αᵀx`` given
    ``y = +1``, for a fixed source vector w̃ (eqs. 6-7); vectorized over ``alpha``."""
    co = fixed_source_coefficients(p=p, n=n, gamma=gamma, mu_norm2=mu_norm2,
                                   w_dot_mu=w_dot_mu, w_norm2=w_norm2)
    return _mean_var_from(co, alpha)


def fixed_source_accuracy(alpha, *, p, n, gamma, mu_norm2, w_dot_mu, w_norm2):
    """Test accuracy ``Φ(m(α)/σ(α))`` of ``sign(w_αᵀx)`` for a fixed source w̃."""
    m, v = fixed_source_mean_var(alpha, p=p, n=n, gamma=gamma, mu_norm2=mu_norm2,
                                 w_dot_mu=w_dot_mu, w_norm2=w_norm2)
    return ndtr(m / np.sqrt(v))


def fixed_source_alpha_star(*, p, n, gamma, mu_norm2, w_dot_mu, w_norm2) -> float:
    """α maximising the accuracy for a fixed source w̃ (eq. 8); ±inf if unbounded."""
    return _alpha_star_from(fixed_source_coefficients(
        p=p, n=n, gamma=gamma, mu_norm2=mu_norm2, w_dot_mu=w_dot_mu, w_norm2=w_norm2))


def fixed_source_alpha_worst(*, p, n, gamma, mu_norm2, w_dot_mu, w_norm2) -> float:
    """ᾱ with ``m(ᾱ) = 0`` (accuracy ½) for a fixed source w̃; nan if w̃ ⊥ μ_t."""
    return _alpha_worst_from(fixed_source_coefficients(
        p=p, n=n, gamma=gamma, mu_norm2=mu_norm2, w_dot_mu=w_dot_mu, w_norm2=w_norm2))


# --------------------------------------------------------------------------- #
# the full setting: source w̃ itself random (eq. 9)
# --------------------------------------------------------------------------- #
def source_stats(s: Setting) -> dict:
    """Limits of the source classifier's statistics on the target task.

    ``w_dot_mu = lim w̃ᵀμ_β = β‖μ‖²/λ̃``, ``w_norm2 = lim ‖w̃‖² = −C̃'(γ̃)`` (eq. 9),
    ``w_dot_src = lim w̃ᵀμ = ‖μ‖²/λ̃``, plus ``delta`` (δ̃) and ``lam`` (λ̃).
    """
    M = s.mu_norm ** 2
    f = _first_order(s.eta_src, s.gamma_src, M, 0.0, 0.0)
    return dict(w_dot_mu=s.cross / f["lam"], w_norm2=-f["C_p"], w_dot_src=M / f["lam"],
                delta=f["delta"], lam=f["lam"])


def design_w_norm2(s: Setting) -> float:
    """Eq. (9) written as in DESIGN §5 (h̃ form); equals ``source_stats(s)['w_norm2']``."""
    M = s.mu_norm ** 2
    d = delta(s.eta_src, s.gamma_src)
    h = 1 - s.eta_src / (1 + s.gamma_src * (1 + d)) ** 2
    lam = M + 1 + s.gamma_src * (1 + d)
    return float((M * (1 + (1 - h) * M) / lam ** 2 + (1 - h) * (1 - 2 * M / lam)) / h)


def score_coefficients(s: Setting) -> dict:
    """``a, b, V0, V1, V2`` of ``m = a + bα``, ``σ² = V0 + 2V1α + V2α²`` (eqs. 6-7)."""
    src = source_stats(s)
    # clip tiny Cauchy-Schwarz round-off (|c|² ≤ W M holds exactly in the limit)
    return fixed_source_coefficients(
        p=s.p, n=s.n, gamma=s.gamma, mu_norm2=s.target_mean_norm2,
        w_dot_mu=src["w_dot_mu"], w_norm2=src["w_norm2"])


def mean_var(s: Setting, alpha):
    """Deterministic equivalents ``(mean, var)`` of ``g = w_αᵀx`` given ``y = +1``.

    ``mean = a + bα`` and ``var = V0 + 2V1α + V2α²``; the coefficients are
    :func:`score_coefficients`. Vectorized over ``alpha``.
    """
    return _mean_var_from(score_coefficients(s), alpha)


def accuracy(s: Setting, alpha, *, symmetric: bool = False):
    """Limit test accuracy of ``sign(w_αᵀx)``: ``Φ(m/σ)`` (signed, as the simulation
    measures it; below ½ for α beyond ᾱ). ``symmetric=True`` gives ``Φ(|m|/σ)``, the
    accuracy if the sign of the classifier were also chosen on test data."""
    m, v = mean_var(s, alpha)
    z = m / np.sqrt(v)
    return ndtr(np.abs(z) if symmetric else z)


def alpha_star(s: Setting) -> float:
    """The optimal α (eq. 8): ``(aV1 − bV0)/(bV1 − aV2)``; ±inf if unbounded."""
    return _alpha_star_from(score_coefficients(s))


def alpha_worst(s: Setting) -> float:
    """ᾱ = −a/b where the mean score vanishes and the accuracy is ½."""
    return _alpha_worst_from(score_coefficients(s))


def pretrained_accuracy(s: Setting) -> float:
    """Accuracy of the source classifier alone on the target: ``Φ(w̃ᵀμ_β/‖w̃‖)``."""
    src = source_stats(s)
    return float(ndtr(src["w_dot_mu"] / math.sqrt(src["w_norm2"])))


# --------------------------------------------------------------------------- #
# regression variant (eq. 10)
# --------------------------------------------------------------------------- #
def regression_coefficients(*, p, n, gamma, wt_norm2, ws_norm2, wt_dot_ws,
                            noise_var=0.0, k=1) -> dict:
    """``R(α) = R0 + 2 R1 α + R2 α²`` (eq. 10): returns ``R0, R1, R2``."""
    p = _count("p", p)
    n = _count("n", n)
    k = _count("k", k)
    gamma = _positive("gamma", gamma)
    T = _nonneg("wt_norm2", wt_norm2)
    S = _nonneg("ws_norm2", ws_norm2)
    c = _finite("wt_dot_ws", wt_dot_ws)
    s2 = _nonneg("noise_var", noise_var)
    eta = p / n
    d = delta(eta, gamma)
    dp = delta_prime(eta, gamma)
    g = gamma ** 2 * (-dp / eta)
    noise = k * s2 * (d + gamma * dp) + k * s2
    return dict(R0=g * T + noise, R1=-g * c, R2=g * S)


def regression_risk(alpha, *, p, n, gamma, wt_norm2, ws_norm2, wt_dot_ws,
                    noise_var=0.0, k=1):
    """Test risk ``E‖W_αᵀx − y‖²`` of α-fine-tuned ridge regression (eq. 10).

    ``wt_norm2 = ‖W_t‖_F²``, ``ws_norm2 = ‖W_s‖_F²``, ``wt_dot_ws = ⟨W_t, W_s⟩_F``,
    ``noise_var = s²`` per output, ``k`` outputs. Vectorized over ``alpha``.
    """
    co = regression_coefficients(p=p, n=n, gamma=gamma, wt_norm2=wt_norm2,
                                 ws_norm2=ws_norm2, wt_dot_ws=wt_dot_ws,
                                 noise_var=noise_var, k=k)
    a = _alpha(alpha)
    return co["R0"] + 2 * co["R1"] * a + co["R2"] * a * a


def regression_alpha_star(*, wt_norm2=None, ws_norm2, wt_dot_ws, **_ignored) -> float:
    """``α* = ⟨W_t, W_s⟩_F / ‖W_s‖_F²`` (independent of p, n, γ and the noise)."""
    S = _positive("ws_norm2", ws_norm2)
    return _finite("wt_dot_ws", wt_dot_ws) / S
