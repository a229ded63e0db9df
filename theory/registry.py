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
    """Import every module of :data:`_MODULES`; one that fails to import (or lacks
    ``METHOD``) is an ``ImportError`` naming it: a method never disappears silently
    from the registry (and from every table, solver and test that loops over it)."""
    if _REGISTRY:
        return
    loaded: dict[str, Method] = {}
    for mod in _MODULES:
        path = f"theory.methods.{mod}"
        try:
            m = importlib.import_module(path)
        except Exception as e:
            raise ImportError(f"method module {path} failed to import "
                              f"({type(e).__name__}: {e}); every module listed in "
                              "theory.registry._MODULES must import") from e
        method = getattr(m, "METHOD", None)
        if not isinstance(method, Method):
            raise ImportError(f"method module {path} defines no METHOD (a theory.base.Method)")
        if method.name in loaded:
            raise ImportError(f"method name {method.name!r} of {path} is registered twice")
        loaded[method.name] = method
    _REGISTRY.update(loaded)


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
