"""Registry of attention methods, by name: ``dense``, ``sparge``, ``sparge-topk``, ``sparge-budget``,
``minference``, ``flexprefill``. ``get_method(name, **params)`` builds a configured method; every method
produces a block mask for the shared block-sparse kernel (``AttentionMethod``)."""

from __future__ import annotations

from typing import Callable

from ..registry import Registry, UnknownName
from .base import AttentionMethod


def _load_builtin() -> None:
    # every built-in method needs only torch: an ImportError here is a real defect and propagates
    # (registration side effect)
    from . import dense, flexprefill, minference, sparge, sparge_budget  # noqa: F401


METHODS: Registry[Callable[..., AttentionMethod]] = Registry("attention method", loader=_load_builtin)


def register_method(name: str):
    """Class decorator: make a method available to ``get_method`` and the CLIs under ``name``."""

    def wrap(cls):
        cls.name = name
        return METHODS.add(name, cls)

    return wrap


def method_names() -> list[str]:
    return METHODS.names()


def method_class(name: str) -> Callable[..., AttentionMethod]:
    """The class registered under ``name`` (``UnknownName`` lists the known ones)."""
    return METHODS.get(name)


def get_method(name: str, **params) -> AttentionMethod:
    """A configured method by name; unknown names list the known ones."""
    return method_class(name)(**params)


__all__ = ["METHODS", "AttentionMethod", "UnknownName", "get_method", "method_class", "method_names",
           "register_method"]
