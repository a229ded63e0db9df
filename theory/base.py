"""The interface every PEFT parameterization implements.

A *method* is a stateless object (one instance per family, kept in the registry)
that knows how to build the update ΔW of a frozen weight W0 from a dict of named
trainable factors. Shapes follow ``torch.nn.Linear``: ``W0`` and ``ΔW`` are
``(..., m, n)`` = ``(..., d_out, d_in)``; any leading dimensions are a batch, so a
whole stack of targets is handled by one call.

Each method has its own frozen ``Config`` dataclass (e.g. ``LoraConfig(r=8)``),
so a configuration is a value that can be printed, hashed and compared.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

Params = dict[str, Tensor]


# --------------------------------------------------------------------------- #
# configuration
# --------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True)
class Config:
    """Base class of every method's configuration (a frozen dataclass)."""

    def __str__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            parts.append(f"{f.name}={v}")
        return ",".join(parts) if parts else "-"

    def asdict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- #
# input checks: one-line ValueErrors a person understands
# --------------------------------------------------------------------------- #
def check_finite(t: Tensor, what: str) -> None:
    if not torch.is_tensor(t):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{what} contains NaN or inf values")


def check_matrix(t: Tensor, what: str) -> tuple[int, int]:
    """Check ``t`` is a finite ``(..., m, n)`` tensor; return ``(m, n)``."""
    if not torch.is_tensor(t):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim < 2:
        raise ValueError(f"{what} must have shape (..., m, n), got {tuple(t.shape)}")
    if t.shape[-1] < 1 or t.shape[-2] < 1:
        raise ValueError(f"{what} has an empty dimension: shape {tuple(t.shape)}")
    check_finite(t, what)
    return int(t.shape[-2]), int(t.shape[-1])


def check_rank(name: str, r: int, upper: int, what: str, m: int, n: int) -> None:
    if not isinstance(r, (int,)) or isinstance(r, bool):
        raise ValueError(f"{name}: {what} must be an integer, got {r!r}")
    if r < 1:
        raise ValueError(f"{name}: {what} must be >= 1, got {r}")
    if r > upper:
        raise ValueError(
            f"{name}: {what}={r} is too large for a {m}x{n} matrix (at most {upper})"
        )


def check_params(params: Params, expected: dict[str, tuple[int, ...]], name: str) -> None:
    """Check that ``params`` holds the named factors with the expected trailing shapes."""
    for key, shape in expected.items():
        if key not in params:
            raise ValueError(f"{name}: missing factor {key!r} (have {sorted(params)})")
        t = params[key]
        if tuple(t.shape[t.ndim - len(shape):]) != tuple(shape) or t.ndim < len(shape):
            raise ValueError(
                f"{name}: factor {key} has shape {tuple(t.shape)}, expected (..., "
                + ", ".join(map(str, shape))
                + ")"
            )


# --------------------------------------------------------------------------- #
# initializers shared by the families
# --------------------------------------------------------------------------- #
def make_generator(seed_or_gen: int | torch.Generator | None) -> torch.Generator:
    """A CPU generator: factors are drawn on the CPU, then moved, so the same seed
    gives the same numbers on every device."""
    if isinstance(seed_or_gen, torch.Generator):
        return seed_or_gen
    g = torch.Generator()
    g.manual_seed(0 if seed_or_gen is None else int(seed_or_gen))
    return g


def like(t: Tensor, ref: Tensor) -> Tensor:
    return t.to(device=ref.device, dtype=ref.dtype)


def kaiming_uniform(shape: tuple[int, ...], fan_in: int, g: torch.Generator, ref: Tensor) -> Tensor:
    """``nn.init.kaiming_uniform_(a=√5)`` as ``nn.Linear`` and PEFT use it:
    U(-1/√fan_in, 1/√fan_in)."""
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    u = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    return like(u * bound, ref)


def gaussian(shape: tuple[int, ...], std: float, g: torch.Generator, ref: Tensor) -> Tensor:
    return like(torch.randn(shape, generator=g, dtype=torch.float64) * std, ref)


def zeros(shape: tuple[int, ...], ref: Tensor) -> Tensor:
    return torch.zeros(shape, device=ref.device, dtype=ref.dtype)


def truncated_svd_factors(w0: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """``B = U_r √Σ_r`` (..., m, r) and ``A = √Σ_r V_rᵀ`` (..., r, n): B A is the best
    rank-r approximation of ``w0`` (Eckart-Young)."""
    U, S, Vh = torch.linalg.svd(w0, full_matrices=False)
    sq = S[..., :r].sqrt()
    return U[..., :, :r] * sq[..., None, :], sq[..., :, None] * Vh[..., :r, :]


# --------------------------------------------------------------------------- #
# the method interface
# --------------------------------------------------------------------------- #
class Method(ABC):
    """One PEFT family. Subclasses read like the paper's equation."""

    name: ClassVar[str]
    description: ClassVar[str]
    citation: ClassVar[str]
    Config: ClassVar[type[Config]]
    #: names of the alternative initializations (the first is the paper's)
    inits: ClassVar[tuple[str, ...]] = ("paper",)
    #: True when ΔW depends on W0 (HiRA, SMoA, HUT, PMSS, DoRA, α-LoRA, MiSS-bat)
    needs_w0: ClassVar[bool] = False
    #: the PEFT tuner implementing the same update, when there is one
    peft_name: ClassVar[str | None] = None
    #: names of the factors that are frozen buffers (the others are trainable)
    frozen: ClassVar[tuple[str, ...]] = ()

    # -- structure the reconstruction solvers read ------------------------------ #
    # ``reconstruction.solvers`` never looks a method up by name: it reads these, so a
    # new method is one new file. A declared product form is checked numerically against
    # ``delta`` before a solver relies on it.
    #: ΔW = s · Σ_t F_t ⊙ Π_{(B, A) in term t} (B A), every factor entering linearly (the
    #: form the ALS solves): the (B, A) factor names of each term; None when ΔW has no such
    #: form. A name with "{k}" stands for K terms k = 0..K-1, one per slice of the frozen
    #: factor named by ``product_modulator`` (SMoA).
    product_terms: ClassVar[tuple[tuple[tuple[str, str], ...], ...] | None] = None
    #: F_t of those terms: None (all ones), "w0" (the frozen weight: HiRA), or the name of a
    #: frozen factor (..., K, m, n) whose k-th slice multiplies term k (SMoA's masks "M")
    product_modulator: ClassVar[str | None] = None
    #: a fixed matrix subtracted from that form: None, or "w0" (ΔW = W0 ⊙ (B A) − W0: HUT)
    product_offset: ClassVar[str | None] = None
    #: the exact best fit the solvers have for this ΔW: "truncated_svd" (s B A, Eckart-Young),
    #: "identity" (ΔW = W itself), "core" (C (U − U0) R with C, R, U0 frozen: U = U0 + C⁺ M R⁺),
    #: "shard" (MiSS's tiled shard: one least squares per entry); None: no closed form
    closed_form: ClassVar[str | None] = None
    #: an exact alternating solver for this ΔW: "scalings" (diag(b) B diag(d) A with A, B
    #: frozen, bilinear in b, d: VeRA), "kronecker" (s W1 ⊗ W2, nearest Kronecker product:
    #: LoKr); None: none
    exact_als: ClassVar[str | None] = None
    #: the factors (B, A) of a LoRA term s·B A that ΔW equals exactly once ``embed_lora``
    #: sets the other factors (DoRA, α-LoRA), so a fit can start at the LoRA optimum; None
    lora_term: ClassVar[tuple[str, str] | None] = None
    #: LoRA on rows of W0 scaled by a trainable vector (the gradient solvers then use a
    #: hand-written gradient): ("scaled_base", name) for W' = diag(v) W0 + s·B A (α-LoRA),
    #: ("weight_norm", name) for W' = diag(v / ‖V‖_row) V, V = W0 + s·B A (DoRA); with
    #: (B, A) = ``lora_term`` and s = ``config.scale``; None: neither
    row_form: ClassVar[tuple[str, str] | None] = None

    def same_update(self, config: Config) -> tuple[str, Config] | None:
        """Another registered (method, config) whose ``delta`` is this one's: the same
        function of factors with the same names and shapes (only the methods' own "paper"
        inits differ), so a reconstruction fit of one is a fit of the other and a sweep
        fits them once (``reconstruction.cells``). None when there is none."""
        return None

    def embed_lora(self, params: Params, w0: Tensor, config: Config) -> Params:
        """``params`` with every factor but ``lora_term`` set so that ΔW = s·B A exactly
        (s = ``config.scale``); only for methods with a ``lora_term``."""
        raise NotImplementedError(f"{self.name} holds no LoRA term s·B A")

    # -- configuration ------------------------------------------------------ #
    def config(self, **kwargs) -> Config:
        """Build this method's config; unknown keywords raise a ValueError."""
        names = {f.name for f in dataclasses.fields(self.Config)}
        bad = sorted(set(kwargs) - names)
        if bad:
            raise ValueError(
                f"{self.name}: unknown config field(s) {bad}; fields are {sorted(names)}"
            )
        return self.Config(**kwargs)

    def validate(self, m: int, n: int, config: Config) -> None:
        """Raise ValueError if ``config`` cannot be used on an ``m x n`` matrix."""

    # -- the update --------------------------------------------------------- #
    @abstractmethod
    def init(
        self, w0: Tensor, config: Config, generator=None, scheme: str = "paper"
    ) -> Params:
        """Factors with the paper's initialization (or ``scheme``), batched like ``w0``."""

    @abstractmethod
    def delta(self, params: Params, w0: Tensor | None = None, config: Config | None = None) -> Tensor:
        """ΔW, shape ``(..., m, n)``."""

    def forward(self, x: Tensor, params: Params, w0: Tensor, config: Config | None = None) -> Tensor:
        """``x (W0 + ΔW)ᵀ``; families with structure override it to avoid forming ΔW."""
        return x @ (w0 + self.delta(params, w0, config)).mT

    def weight(self, params: Params, w0: Tensor, config: Config | None = None) -> Tensor:
        """The adapted weight ``W' = W0 + ΔW``."""
        return w0 + self.delta(params, w0, config)

    def bias_scale(self, params: Params) -> Tensor | None:
        """A factor by which the update multiplies the layer's bias, or None (no change).
        Only methods that rescale the whole pre-trained map (α-LoRA) have one."""
        return None

    # -- counting ----------------------------------------------------------- #
    @abstractmethod
    def n_params(self, m: int, n: int, config: Config) -> int:
        """Number of trainable parameters."""

    @abstractmethod
    def rank_bound(self, m: int, n: int, rank_w0: int, config: Config) -> int:
        """Upper bound on rank ΔW (never above min(m, n))."""

    @abstractmethod
    def candidate_configs(self, m: int, n: int, budget: int) -> list[Config]:
        """Configurations worth considering under ``budget`` (may exceed it)."""

    def configs_for_budget(self, m: int, n: int, budget: int) -> list[Config]:
        """The configuration(s) whose parameter count is the largest not above
        ``budget``, best rank bound first (W0 assumed full rank)."""
        if budget < 1:
            raise ValueError(f"{self.name}: budget must be >= 1, got {budget}")
        ok = []
        for c in self.candidate_configs(m, n, budget):
            try:
                self.validate(m, n, c)
            except ValueError:
                continue
            p = self.n_params(m, n, c)
            if p <= budget:
                ok.append((p, c))
        if not ok:
            return []
        best = max(p for p, _ in ok)
        out = [c for p, c in ok if p == best]
        rk = min(m, n)
        out.sort(key=lambda c: -self.rank_bound(m, n, rk, c))
        return out

    def config_for_rank(self, m: int, n: int, r: int) -> Config:
        """The default configuration at the parameter budget of rank-``r`` LoRA."""
        check_rank(self.name, r, min(m, n), "rank", m, n)
        cs = self.configs_for_budget(m, n, lora_budget(m, n, r))
        if not cs:
            raise ValueError(
                f"{self.name}: no configuration fits the budget of rank-{r} LoRA "
                f"({lora_budget(m, n, r)} parameters) on a {m}x{n} matrix"
            )
        return cs[0]

    def __repr__(self) -> str:
        return f"<method {self.name}: {self.description}>"


def lora_budget(m: int, n: int, r: int) -> int:
    """Parameters of rank-r LoRA on an m x n matrix: r (m + n)."""
    return r * (m + n)
