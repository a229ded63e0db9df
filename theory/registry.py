"""The one registry of PEFT parameterizations.

Every family lives in ``theory/methods/<name>.py`` and exposes ``METHOD``, an
instance of :class:`theory.base.Method`. Everything else in the toolkit (solvers,
CLI, model injection, figures, notebooks) looks methods up here.
"""

from __future__ import annotations

import importlib

from .base import Method

#: registry order = the order tables and figures list the methods in
_MODULES = (
    "full",
    "lora",
    "hira",
    "abba",
    "loha",
    "lokr",
    "miss",
    "smoa",
    "hut",
    "pmss",
    "dora",
    "vera",
    "alpha_lora",
)

_REGISTRY: dict[str, Method] = {}
_ALIASES = {"bone": "miss", "rslora": "lora", "alpha-lora": "alpha_lora", "alora": "alpha_lora"}


def _load() -> None:
    if _REGISTRY:
        return
    for mod in _MODULES:
        try:
            m = importlib.import_module(f"theory.methods.{mod}")
        except ModuleNotFoundError as e:  # a family not written yet
            if e.name == f"theory.methods.{mod}":
                continue
            raise
        method = m.METHOD
        _REGISTRY[method.name] = method


def register(method: Method) -> Method:
    """Add a user-defined method (e.g. from a notebook)."""
    _load()
    if method.name in _REGISTRY:
        raise ValueError(f"a method named {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def available() -> list[str]:
    """Names of all registered methods, in registry order."""
    _load()
    return list(_REGISTRY)


def get_method(name: str) -> Method:
    """Look a method up by name; an unknown name raises a ValueError listing the known ones."""
    _load()
    key = str(name).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(_REGISTRY)}")
    return _REGISTRY[key]
