"""Registry of attention methods, by name: ``dense``, ``sparge``, ``sparge-topk``, ``minference``,
``flexprefill``. ``get_method(name, **params)`` builds a configured method; every method produces a
block mask for the shared block-sparse kernel (``AttentionMethod``)."""

from __future__ import annotations

from typing import Callable

from .base import AttentionMethod

_REGISTRY: dict[str, Callable[..., AttentionMethod]] = {}


def register_method(name: str):
    """Class decorator: make a method available to ``get_method`` and the CLIs under ``name``."""

    def wrap(cls):
        if name in _REGISTRY:
            raise ValueError(f"attention method {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def method_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_method(name: str, **params) -> AttentionMethod:
    """A configured method by name; unknown names list the known ones."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention method {name!r}; known methods: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**params)


def _load_builtin() -> None:
    from . import dense, sparge  # noqa: F401  (registration side effect)
    try:
        from . import minference  # noqa: F401
    except ImportError:
        pass
    try:
        from . import flexprefill  # noqa: F401
    except ImportError:
        pass


__all__ = ["AttentionMethod", "get_method", "method_names", "register_method"]
