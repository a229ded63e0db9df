"""PEFT's own tuners on the same layers, at the same configuration: the reference rows.

For the methods the ``peft`` package implements (:data:`PEFT_METHODS`), the trainer
can run PEFT's layers instead of ours (``finetune.run --impl peft``), injected into
the same module paths with :func:`peft.inject_adapter_in_model`. Our configuration
of each layer (:func:`finetune.adapters.layer_config`, the budget of rank-r LoRA) is
translated into PEFT's: LoRA, DoRA, HiRA, LoHa one rank for all layers (they are
equal at a per-layer LoRA budget); LoKr with PEFT's ``rank_pattern`` for layers whose
rank differs; MiSS and VeRA (one rank in PEFT: VeRA's projections are shared) at the
rank of the first layer, so their count can differ slightly from ours: the run
records PEFT's own count of trainable parameters. Scalings match ours: where ours
is s = 1 (``alpha=None``), PEFT's ``lora_alpha``/``alpha`` is set to r.

Same update rule, same initial factors, same data order: our LoRA and PEFT's give
the same loss curve (``tests/test_train.py``), which shows that the trainer is not
the variable when our methods are compared with each other.
"""

from __future__ import annotations

import collections

import torch
from torch import Tensor, nn

PEFT_METHODS = ("lora", "dora", "hira", "loha", "lokr", "miss", "vera")
#: PEFT tuners that take only nn.Linear (peft 0.21: LyCORIS's and MiSS's layers refuse
#: GPT-2's Conv1D; LoRA, DoRA, HiRA and VeRA take it with ``fan_in_fan_out``)
LINEAR_ONLY = ("loha", "lokr", "miss")
ADAPTER = "default"


def peft_supports(method: str, modules) -> bool:
    """Whether PEFT's ``method`` can wrap every module of ``modules``."""
    return method in PEFT_METHODS and (
        method not in LINEAR_ONLY or all(isinstance(m, nn.Linear) for m in modules))


def _alpha(cfg, r: int, field: str = "alpha") -> float:
    a = getattr(cfg, field, None)
    return float(r if a is None else a)


def peft_config(method: str, layer_configs: dict[str, object], seed: int = 0,
                fan_in_fan_out: bool = False):
    """PEFT's config for ``method`` on the layers ``layer_configs`` ({path: our config});
    ``fan_in_fan_out`` for layers that store their weight (d_in, d_out) (GPT-2's Conv1D)."""
    import peft

    if method not in PEFT_METHODS:
        raise ValueError(f"--impl peft: PEFT has no {method!r}; it has {', '.join(PEFT_METHODS)}")
    paths = list(layer_configs)
    cfgs = list(layer_configs.values())
    first = cfgs[0]
    common = dict(target_modules=paths)
    if method in ("lora", "dora"):
        ranks = {c.r for c in cfgs}
        if len(ranks) != 1:
            raise ValueError(f"{method}: layers have different ranks {sorted(ranks)}")
        return peft.LoraConfig(r=first.r, lora_alpha=_alpha(first, first.r), lora_dropout=0.0,
                               use_rslora=first.rslora, use_dora=method == "dora",
                               bias="none", fan_in_fan_out=fan_in_fan_out, **common)
    if method == "hira":
        return peft.HiraConfig(r=first.r, fan_in_fan_out=fan_in_fan_out, **common)
    if method == "loha":
        return peft.LoHaConfig(r=first.r, alpha=_alpha(first, first.r), **common)
    if method == "lokr":
        r = collections.Counter(c.r for c in cfgs).most_common(1)[0][0]
        pattern = {p: c.r for p, c in layer_configs.items() if c.r != r}
        alphas = {p: _alpha(c, c.r) for p, c in layer_configs.items() if c.r != r}
        return peft.LoKrConfig(r=r, alpha=_alpha(first, r), decompose_both=first.decompose_both,
                               decompose_factor=first.decompose_factor, rank_pattern=pattern,
                               alpha_pattern=alphas, **common)
    if method == "miss":
        return peft.MissConfig(r=first.r, **common)
    # vera: one shared pair of projections, its rank at most every layer's smaller side
    return peft.VeraConfig(r=min(c.r for c in cfgs), d_initial=first.d_initial,
                           projection_prng_key=int(seed), vera_dropout=0.0, **common)


def inject_peft(model: nn.Module, method: str, layer_configs: dict[str, object],
                seed: int = 0) -> nn.Module:
    """Inject PEFT's ``method`` into ``model`` in place (only the adapter is trainable)."""
    import peft

    mods = [model.get_submodule(p) for p in layer_configs]
    if not peft_supports(method, mods):
        raise ValueError(f"--impl peft: PEFT's {method} takes only nn.Linear layers, and "
                         f"{type(next(m for m in mods if not isinstance(m, nn.Linear))).__name__} "
                         "layers are targeted")
    conv = any(not isinstance(m, nn.Linear) for m in mods)
    cfg = peft_config(method, layer_configs, seed, fan_in_fan_out=conv)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # PEFT draws its factors from the global generator
        if method == "vera":  # its projections are state of the tuner: PEFT refuses
            from peft.tuners import VeraModel  # inject_adapter_in_model, the tuner injects in place
            VeraModel(model, cfg, ADAPTER)
        else:
            peft.inject_adapter_in_model(cfg, model)
    return model


def peft_layers(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT's tuner layers of ``model`` by the path of the layer they wrap."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


@torch.no_grad()
def peft_layer_deltas(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """``{path: (ΔW, W0)}`` of every PEFT layer, (d_out, d_in), float32 CPU.

    ΔW is what merging adds to the weight: computed as merged − W0 with PEFT's own
    ``merge``/``unmerge`` (HiRA's and DoRA's ``get_delta_weight`` are not additive)."""
    out = {}
    for path, layer in peft_layers(model).items():
        base = layer.get_base_layer()
        w0 = base.weight.detach().clone()
        layer.merge(adapter_names=[ADAPTER])
        merged = base.weight.detach().clone()
        layer.unmerge()
        t = getattr(layer, "fan_in_fan_out", False) or not isinstance(base, nn.Linear)
        d, w = (merged - w0), w0
        if t:
            d, w = d.mT, w.mT
        out[path] = (d.float().cpu().contiguous(), w.float().cpu().contiguous())
    return out


#: our factor name -> PEFT attribute, for the methods whose factors map one to one
FACTOR_NAMES = {
    "lora": {"A": "lora_A", "B": "lora_B"},
    "dora": {"A": "lora_A", "B": "lora_B", "magnitude": "lora_magnitude_vector"},
    "hira": {"A": "hira_A", "B": "hira_B"},
    "loha": {"B1": "hada_w1_a", "A1": "hada_w1_b", "B2": "hada_w2_a", "A2": "hada_w2_b"},
}


@torch.no_grad()
def set_factors(layer: nn.Module, method: str, params: dict[str, Tensor]) -> None:
    """Overwrite a PEFT layer's factors with ours (``--impl peft --init ours``: the same
    initial factors as our run of the same seed)."""
    if method not in FACTOR_NAMES:
        raise ValueError(f"--init ours with --impl peft: supported for "
                         f"{', '.join(FACTOR_NAMES)}, not {method}")
    for ours, theirs in FACTOR_NAMES[method].items():
        t = getattr(layer, theirs)[ADAPTER]
        t = t.weight if isinstance(t, nn.Module) else t
        t.copy_(params[ours].reshape(t.shape))
