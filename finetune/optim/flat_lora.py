"""Flat-LoRA: random weight perturbation of the merged weight (Li, He, Li, Wang, Shang, Huang,
"Flat-LoRA: Low-Rank Adaptation over a Flat Loss Landscape", ICML 2025).

Instead of SAM's worst case over the low-rank factors, Flat-LoRA minimises the expected
loss under random perturbations of the *full* merged weight W' = W0 + ΔW of every adapted
layer, one sample per step (no extra forward-backward):

    E_ij ~ N(0, σ_i²),   σ_i = f(t) · ρ / √d_in · ‖W'_i,:‖       (filter-aware: one σ per
    f(t) = ½ (1 − cos(π t / T))                                    output row of W')
    g = ∇_θ L(W0 + ΔW(θ) + E)                                      (the factors θ only)
    θ ← base_step(θ, g)

Reading taken: the authors' code (github.com/nblt/Flat-LoRA, ``logTrainer.py``): ρ = 0.05;
σ_i from the row norms of the merged weight ``W0 + scaling · B A`` with ρ/√d_in; the ramp
½(1 − cos(π t/T)) with t the step counter from 0 (so the first step is unperturbed) and T
the run's steps; a fresh noise every step (their ``T = 1``); the perturbation only on the
adapted layers (not the task head). Differences, stated:

- the authors add E to the frozen weight in place, re-draw it from a saved seed and
  subtract it after the backward pass (W0 comes back only up to rounding). Here W0 is bit
  for bit what it was after every step, in one of two ways (option ``mode``):

  ``inplace``  E is added to the module's weight and the weight is copied back from a
               copy after the backward pass (no extra matmul: the authors' cost). Valid
               only where ΔW does not depend on W0 (LoRA, ABBA, LoHa, LoKr, VeRA, ...):
               for HiRA (W0 ⊙ BA), DoRA, HUT, ... perturbing W0 would perturb ΔW too;
  ``forward``  E enters the forward through :attr:`finetune.adapters.Adapted.perturbation`
               (``y = x (W0 + ΔW + E)ᵀ + b``) and W0 is never written; exact for every
               method, at the price of one extra (d_out, d_in) matmul per adapted layer in
               the forward and in the backward (measured on MiniLM/LoRA rank 8: 1.5x the
               AdamW step instead of about 1x);
  ``auto``     (default) ``inplace`` for a layer whose method's ΔW, at random factors, is
               the same for W0 and for another W0; ``forward`` otherwise;
- the noise is drawn from a generator seeded by (run seed, step), not by the clock: runs
  are reproducible and resume exactly;
- any method, not only LoRA: ΔW is the method's update. For ``--method full`` (no adapted
  layers) the trained linear weights of the model body (not the head) are perturbed in
  place and restored exactly from a copy after the backward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from ..adapters import Adapted, adapted_layers, is_adaptable
from .base import Rule
from .sam import check_radius

RAMPS = ("cosine", "constant")
MODES = ("auto", "inplace", "forward")


class Site:
    """One weight matrix W' = W0 + ΔW (d_out, d_in) that can be perturbed by E and given
    back exactly. An adapted layer takes E through ``Adapted.perturbation`` (W0 never
    written) or, with ``inplace``, in its module weight; a plain ``nn.Linear``/``Conv1D``
    always in place. In place, the weight is copied back from a copy (not subtracted)."""

    def __init__(self, path: str, module: nn.Module, inplace: bool = False):
        self.path, self.module = path, module
        self.adapted = isinstance(module, Adapted)
        self.inplace = inplace or not self.adapted
        self._saved: Tensor | None = None

    def _param(self) -> Tensor:
        return self.module.base.weight if self.adapted else self.module.weight

    def _view(self) -> Tensor:  # (d_out, d_in) view of the stored weight
        mod = self.module.base if self.adapted else self.module
        w = mod.weight
        return w if isinstance(mod, nn.Linear) else w.mT  # Conv1D stores (d_in, d_out)

    @torch.no_grad()
    def weight(self) -> Tensor:
        """W' (d_out, d_in), the weight the forward uses (no perturbation)."""
        if not self.adapted:
            return self._view().detach()
        lay = self.module
        return lay.w0.detach() if lay.merged else lay.w0.detach() + lay.delta().detach()

    @torch.no_grad()
    def add(self, e: Tensor) -> None:
        if self.inplace:
            self._saved = self._param().detach().clone()
            self._view().add_(e)
        else:
            self.module.perturbation = e

    @torch.no_grad()
    def clear(self) -> None:
        if not self.inplace:
            self.module.perturbation = None
        elif self._saved is not None:
            self._param().copy_(self._saved)
            self._saved = None


@torch.no_grad()
def delta_ignores_w0(layer: Adapted, seed: int = 0) -> bool:
    """Whether the layer's method gives the same ΔW for W0 and for another W0 (probed at
    random factors, so that a zero-initialised factor does not hide a dependence)."""
    g = torch.Generator(device=layer.w0.device).manual_seed(seed)
    params = {k: torch.randn(v.shape, generator=g, device=v.device, dtype=v.dtype)
              if k in layer.factors else v for k, v in layer.params().items()}
    w0 = layer.w0.detach()
    other = 2 * w0 + torch.randn(w0.shape, generator=g, device=w0.device, dtype=w0.dtype)
    a = layer.method.delta(params, w0, layer.config)
    b = layer.method.delta(params, other, layer.config)
    return bool(torch.equal(a, b))


def weight_sites(model: nn.Module, params: list[nn.Parameter] | None = None,
                 paths: list[str] | None = None, mode: str = "forward") -> list[Site]:
    """The perturbable weights: every adapted layer of ``model`` (``mode``: forward,
    inplace or auto, see the module doc); without adapted layers (full fine-tuning), the
    linear layers named in ``paths``, or else those whose weight is among ``params``."""
    layers = adapted_layers(model)
    if layers:
        return [Site(p, m, inplace=mode == "inplace" or (mode == "auto" and delta_ignores_w0(m)))
                for p, m in layers.items() if paths is None or p in paths]
    if paths is not None:
        return [Site(p, model.get_submodule(p)) for p in paths]
    ids = {id(p) for p in params or []}
    return [Site(n, m) for n, m in model.named_modules()
            if n and is_adaptable(m) and m.weight.requires_grad and id(m.weight) in ids]


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """A generator seeded by (seed, step): the same noise for the same run and step."""
    state = int(np.random.SeedSequence([int(seed), 0xF1A7, int(step)]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(state)


def row_noise(w: Tensor, radius: float, generator: torch.Generator) -> Tensor:
    """E (d_out, d_in) with E_ij ~ N(0, σ_i²), σ_i = radius · ‖w_i,:‖ / √d_in."""
    sigma = radius / math.sqrt(w.shape[1]) * torch.linalg.vector_norm(w, dim=1, keepdim=True)
    z = torch.randn(w.shape, generator=generator, device=w.device, dtype=w.dtype)
    return sigma * z  # (d_out, 1) * (d_out, d_in)


class FlatLoRA(Rule):
    name = "flat-lora"
    gradient_evaluations = 1
    options: ClassVar[dict[str, Any]] = {"rho": 0.05, "ramp": "cosine", "seed": None,
                                         "mode": "auto"}

    @classmethod
    def check_values(cls, opts):
        check_radius(cls.name, opts, "rho")
        for key, known in (("ramp", RAMPS), ("mode", MODES)):
            if opts[key] not in known:
                raise ValueError(f"--optimizer flat-lora: {key} {opts[key]!r} unknown; "
                                 f"known: {', '.join(known)}")
        seed = opts["seed"]
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"--optimizer flat-lora: seed must be an integer >= 0, got {seed!r}")

    def __init__(self, optimizer, model, total_steps, **options):
        super().__init__(optimizer, model, total_steps, **options)
        seed = self.opts["seed"]
        # the trainer seeds torch with the run's seed before building the rule
        self.seed = int(torch.initial_seed() if seed is None else seed)
        body = [p for g in optimizer.param_groups if g.get("name", "body") == "body"
                for p in g["params"]]
        self.sites = weight_sites(model, body, mode=self.opts["mode"])
        if self.opts["mode"] == "inplace":
            bad = [x.path for x in self.sites if x.adapted and not delta_ignores_w0(x.module)]
            if bad:
                raise ValueError(f"--optimizer flat-lora: mode inplace would perturb ΔW too "
                                 f"(the method's ΔW depends on W0 at {bad[0]}); use auto or "
                                 "forward")
        if not self.sites:
            raise ValueError("--optimizer flat-lora: no weight to perturb (it needs our "
                             "adapters, --impl ours, or --method full)")

    def ramp(self, step: int) -> float:
        """f(t) = ½(1 − cos(π t/T)), rising from 0 to 1 over the run."""
        if self.opts["ramp"] == "constant":
            return 1.0
        return 0.5 * (1.0 - math.cos(math.pi * step / max(1, self.total_steps)))

    def step(self, closure: Callable[[], Tensor], step: int) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        radius = self.ramp(step) * float(self.opts["rho"])
        gens: dict[torch.device, torch.Generator] = {}
        try:
            if radius > 0:
                for site in self.sites:
                    w = site.weight()  # (d_out, d_in)
                    if w.device not in gens:
                        gens[w.device] = step_generator(self.seed, step, w.device)
                    site.add(row_noise(w, radius, gens[w.device]))
            loss = closure()  # the gradient at W0 + ΔW + E
        finally:
            for site in self.sites:
                site.clear()  # W0 (and a full run's weights) exactly as before
        self.optimizer.step()
        return loss

    def state_dict(self) -> dict:
        return {**super().state_dict(), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.seed = int(state.get("seed", self.seed))
