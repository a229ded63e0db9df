"""Every method of the registry inside a real model.

:func:`inject` replaces each ``nn.Linear`` (or GPT-2 ``Conv1D``) whose module path
matches ``targets`` by an :class:`Adapted` layer that computes

    y = x (W0 + ΔW(θ))ᵀ + b               by the registry's ``method.forward``

so ABBA and LoHa run through the Khatri-Rao identity (no m×n ΔW is formed), LoRA,
VeRA, LoKr, PMSS and MiSS through their factors, and the others through ``W0 + ΔW``.
The method's trainable factors θ are ``nn.Parameter``s of the layer, its frozen
factors (VeRA's projections, SMoA's spectral masks, PMSS's skeleton) are buffers, and
W0 and b stay those of the original module, frozen and never written (W0 is the
module's own ``weight``: ``Conv1D`` stores it transposed, ``Adapted.w0`` is always
``(d_out, d_in)``).

``--rank r`` means the parameter budget of rank-r LoRA *per adapted layer*:
``method.config_for_rank(m, n, r)`` on each layer's own shape (so an FFN map gets a
larger configuration than a square one), then ``overrides`` replace fields, exactly
as ``reconstruction.run --set`` does. The factors are drawn with the paper's init
from one generator seeded by ``seed``, layer after layer in module order.

``merge`` folds ΔW (and a method's bias scale) into the module's weight for
inference or export; ``unmerge`` and ``remove`` give back W0 and b bit for bit (the
merge keeps a copy: subtracting ΔW again would not be exact in floating point).

    layers = inject(model, "abba", rank=8, targets=["query", "value"], seed=0)
    ...train...
    deltas = layer_deltas(model)     # {path: (ΔW, W0)}, the <layer>.delta/.w0 convention
    remove(model)                    # the original modules, W0 untouched

VeRA: the paper shares one pair of frozen projections across layers; here each
layer draws its own pair (the registry's ``init`` works per matrix). The trainable
parameters, and so the budget, are the same; only the frozen memory differs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import Tensor, nn

import theory
from theory.base import Config, Method, make_generator


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
        return Conv1D
    except ImportError:  # transformers not installed: only nn.Linear can be adapted
        return None


def is_adaptable(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and GPT-2's ``Conv1D`` (a linear map stored transposed)."""
    conv1d = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def _transposed(module: nn.Module) -> bool:
    return not isinstance(module, nn.Linear)  # Conv1D: weight is (d_in, d_out)


class Adapted(nn.Module):
    """A frozen linear map with a registry method's update: ``y = x (W0 + ΔW)ᵀ + b``.

    ``factors``: the trainable factors (``nn.ParameterDict``); frozen factors are buffers
    named ``frozen_<name>``; ``base`` is the original module (weight W0, bias b).
    ``perturbation``: an optional (d_out, d_in) tensor added to the weight in the forward
    (``x (W0 + ΔW + E)ᵀ``), set and cleared by training rules that perturb the merged
    weight (Flat-LoRA); it never touches W0.
    ``dense``: when True the forward forms ΔW and computes ``x (W0 + ΔW)ᵀ``
    (:meth:`theory.base.Method.forward`, the interface's default) instead of the method's
    own structured forward (ABBA's Khatri-Rao product, LoRA's two thin products): the
    same function, for measuring what the structure saves (:mod:`finetune.bench`).
    """

    dense: bool = False

    def __init__(self, base: nn.Module, method: Method, config: Config, params: dict[str, Tensor]):
        super().__init__()
        self.base = base
        self.method = method
        self.config = config
        self.transposed = _transposed(base)
        self.factors = nn.ParameterDict()
        self._frozen_names: list[str] = []
        for name, t in params.items():
            if name in method.frozen:
                self.register_buffer(f"frozen_{name}", t.detach().clone())
                self._frozen_names.append(name)
            else:
                self.factors[name] = nn.Parameter(t.detach().clone())
        self.perturbation: Tensor | None = None
        self._backup: tuple[Tensor, Tensor | None] | None = None  # (W, b) while merged
        for p in base.parameters():
            p.requires_grad_(False)

    # -- the pieces ---------------------------------------------------------- #
    @property
    def w0(self) -> Tensor:
        """W0, (d_out, d_in) (a view of the module's weight; never written while unmerged)."""
        w = self.base.weight
        return w.mT if self.transposed else w

    @property
    def shape(self) -> tuple[int, int]:
        m, n = self.w0.shape
        return int(m), int(n)

    @property
    def merged(self) -> bool:
        return self._backup is not None

    def params(self) -> dict[str, Tensor]:
        """Trainable and frozen factors by the registry's names."""
        out = dict(self.factors.items())
        for name in self._frozen_names:
            out[name] = getattr(self, f"frozen_{name}")
        return out

    def n_params(self) -> int:
        """The registry's count for this layer (equals the trainable elements: a test)."""
        m, n = self.shape
        return int(self.method.n_params(m, n, self.config))

    def delta(self) -> Tensor:
        """ΔW (d_out, d_in) of the current factors (formed: for analysis and merging)."""
        w0 = self._backup[0] if self.merged else self.w0
        if self.merged and self.transposed:
            w0 = w0.mT
        return self.method.delta(self.params(), w0, self.config)

    def _bias(self) -> Tensor | None:
        b = self.base.bias
        if b is None:
            return None
        scale = self.method.bias_scale(self.params())
        return b if scale is None else b * scale

    # -- forward ------------------------------------------------------------- #
    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            y = self.base(x)
        else:
            fwd = Method.forward if self.dense else type(self.method).forward
            y = fwd(self.method, x, self.params(), self.w0, self.config)  # (..., d_out)
            b = self._bias()
            if b is not None:
                y = y + b
        if self.perturbation is not None:
            y = y + x @ self.perturbation.mT
        return y

    # -- merging --------------------------------------------------------------- #
    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into the module's weight (and a bias scale into its bias)."""
        if self.merged:
            return
        delta = self.method.delta(self.params(), self.w0, self.config)  # (d_out, d_in)
        b_new = self._bias()
        w, b = self.base.weight, self.base.bias
        self._backup = (w.detach().clone(), None if b is None else b.detach().clone())
        w.add_(delta.mT if self.transposed else delta)
        if b is not None and b_new is not None:
            b.copy_(b_new)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore W0 and b exactly (from the copy taken by :meth:`merge`)."""
        if not self.merged:
            return
        w, b = self._backup
        self.base.weight.copy_(w)
        if b is not None:
            self.base.bias.copy_(b)
        self._backup = None

    def extra_repr(self) -> str:
        m, n = self.shape
        return f"{self.method.name} {self.config} on {m}x{n}, {self.n_params():,} trainable"


# --------------------------------------------------------------------------- #
# choosing layers
# --------------------------------------------------------------------------- #
def candidate_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every adaptable linear map of ``model`` by module path (adapted ones excluded)."""
    return {n: m for n, m in model.named_modules()
            if is_adaptable(m) and n and not any(isinstance(p, Adapted) for p in _parents(model, n))}


def _parents(model: nn.Module, path: str) -> list[nn.Module]:
    out, mod = [], model
    for part in path.split(".")[:-1]:
        mod = getattr(mod, part)
        out.append(mod)
    return out


def _matches(name: str, key: str) -> bool:
    """PEFT's rule: a plain key matches the path itself or its last components
    (``"query"`` matches ``encoder.layer.0.attention.self.query``); ``re:`` + pattern is a
    regular expression that must match the whole path."""
    if key.startswith("re:"):
        return re.fullmatch(key[3:], name) is not None
    return name == key or name.endswith("." + key)


def match_layers(model: nn.Module, targets: Iterable[str], *, what: str = "the model") -> list[str]:
    """Paths of the adaptable layers matched by ``targets``, in module order.

    Every pattern must match at least one layer (else a ValueError naming it and some
    of the layers there are)."""
    targets = [t.strip() for t in targets if t and t.strip()]
    if not targets:
        raise ValueError("--targets: no layer pattern given")
    layers = candidate_layers(model)
    if not layers:
        raise ValueError(f"{what} has no nn.Linear / Conv1D layer to adapt")
    for key in targets:
        if key.startswith("re:"):
            try:
                re.compile(key[3:])
            except re.error as e:
                raise ValueError(f"--targets {key!r}: bad regular expression ({e})") from None
        if not any(_matches(n, key) for n in layers):
            names = sorted({n.rsplit(".", 1)[-1] for n in layers})
            raise ValueError(f"--targets {key!r} matches no linear layer of {what}; "
                             f"its layer names end in: {', '.join(names[:12])}")
    return [n for n in layers if any(_matches(n, k) for k in targets)]


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent = model
    *head, last = path.split(".")
    for part in head:
        parent = getattr(parent, part)
    setattr(parent, last, module)


def layer_config(method: Method, m: int, n: int, rank: int, overrides: dict | None = None,
                 where: str = "") -> Config:
    """The config of ``method`` on an m×n layer at the budget of rank-``rank`` LoRA, with
    ``overrides`` applied (unknown fields and invalid values are one-line ValueErrors)."""
    at = f" ({where}, {m}x{n})" if where else f" ({m}x{n})"
    try:
        cfg = method.config_for_rank(m, n, rank)
        if overrides:
            cfg = method.config(**{**cfg.asdict(), **overrides})
        method.validate(m, n, cfg)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{str(e).splitlines()[0]}{at}") from None
    return cfg


# --------------------------------------------------------------------------- #
# injection and its inverse
# --------------------------------------------------------------------------- #
def inject(model: nn.Module, method: str | Method, *, rank: int = 8, targets: Iterable[str],
           overrides: dict | None = None, init: str = "paper", seed: int = 0,
           freeze: bool = True) -> dict[str, Adapted]:
    """Replace every layer of ``model`` matched by ``targets`` by an :class:`Adapted` layer.

    With ``freeze`` (default) every other parameter of the model is frozen too, so the
    trainable parameters are exactly the factors (unfreeze a task head afterwards).
    Everything is checked before the model is changed. Returns ``{path: layer}``."""
    method = theory.get_method(method) if isinstance(method, str) else method
    if method.name == "full":
        raise ValueError("method 'full' is not an adapter: train the model's own weights")
    paths = match_layers(model, targets)
    mods = {p: model.get_submodule(p) for p in paths}
    configs = {}
    for p, mod in mods.items():
        w = mod.weight
        m, n = (w.shape[1], w.shape[0]) if _transposed(mod) else tuple(w.shape)
        configs[p] = layer_config(method, int(m), int(n), rank, overrides, where=p)
    if init not in method.inits:
        raise ValueError(f"{method.name}: unknown init {init!r}; known: {', '.join(method.inits)}")
    if freeze:
        if not hasattr(model, "_requires_grad_before_inject"):  # what remove() restores
            model._requires_grad_before_inject = {n: prm.requires_grad
                                                  for n, prm in model.named_parameters()}
        for prm in model.parameters():
            prm.requires_grad_(False)
    g = make_generator(seed)
    out = {}
    for p, mod in mods.items():
        w0 = mod.weight.detach()
        w0 = w0.mT if _transposed(mod) else w0
        params = method.init(w0.contiguous(), configs[p], generator=g, scheme=init)
        layer = Adapted(mod, method, configs[p], params)
        _set_module(model, p, layer)
        out[p] = layer
    return out


def adapted_layers(model: nn.Module) -> dict[str, Adapted]:
    """The :class:`Adapted` layers of ``model`` by module path."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Adapted)}


def set_dense(model: nn.Module, dense: bool = True) -> None:
    """Make every adapted layer of ``model`` form ΔW in its forward (``dense=True``) or use
    its method's structured forward (``False``, the default); see :class:`Adapted`."""
    for layer in adapted_layers(model).values():
        layer.dense = bool(dense)


def merge(model: nn.Module) -> None:
    for layer in adapted_layers(model).values():
        layer.merge()


def unmerge(model: nn.Module) -> None:
    for layer in adapted_layers(model).values():
        layer.unmerge()


def remove(model: nn.Module) -> dict[str, nn.Module]:
    """Put the original modules back (W0 and b exactly as before :func:`inject`) and give
    every parameter back the ``requires_grad`` it had before. Returns them by path."""
    out = {}
    for path, layer in adapted_layers(model).items():
        layer.unmerge()
        for p in layer.base.parameters():
            p.requires_grad_(True)
        _set_module(model, path, layer.base)
        out[path] = layer.base
    before = model.__dict__.pop("_requires_grad_before_inject", None)
    if before is not None:
        for n, p in model.named_parameters():
            p.requires_grad_(before.get(n, p.requires_grad))
    return out


@torch.no_grad()
def layer_deltas(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """``{path: (ΔW, W0)}`` of every adapted layer, float32 on the CPU, (d_out, d_in)."""
    out = {}
    for path, layer in adapted_layers(model).items():
        w0 = layer._backup[0] if layer.merged else layer.base.weight
        w0 = (w0.mT if layer.transposed else w0).detach().float().cpu().clone()
        out[path] = (layer.delta().detach().float().cpu(), w0)
    return out


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
