"""One small registry type for every "name -> thing" table of the project.

A ``Registry`` maps names to entries (classes, functions, specs). It fails loudly: registering a
name twice is an error, asking for an unknown name raises ``UnknownName`` (a ``ValueError``) that
lists the known names, and the built-in entries are loaded by a function that runs once and whose
``ImportError`` propagates (a missing optional dependency must surface where it is used, not turn
into "unknown name").

    METHODS = Registry("attention method", loader=_load_builtin)

    @METHODS.register("dense")
    class Dense: ...

    METHODS.get("dense")      # the entry
    METHODS.names()           # sorted names
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownName(ValueError):
    """A name that no entry of a registry has; the message lists the known names."""


class Registry(Generic[T]):
    """Named entries of one kind; ``kind`` words the error messages ("unknown <kind> 'x'")."""

    def __init__(self, kind: str, *, loader: Callable[[], None] | None = None):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._loader = loader
        self._loaded = loader is None
        self._loading = False

    def _ensure_loaded(self) -> None:
        if self._loaded or self._loading:
            return
        self._loading = True
        try:
            self._loader()
            self._loaded = True
        finally:
            self._loading = False

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name`` (a name may be registered once)."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of ``add``."""

        def wrap(entry: T) -> T:
            return self.add(name, entry)

        return wrap

    def get(self, name: str) -> T:
        self._ensure_loaded()
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownName(f"unknown {self.kind} {name!r}; known: {self.names()}") from None

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        self._ensure_loaded()
        return sorted(self._entries.items())

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._ensure_loaded()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._entries)})"
