"""One registry mechanism for every swappable part (models, data sets, losses), timm style.

    MODELS = Registry("model")

    @MODELS.register("cnn")
    def cnn(**kwargs) -> Classifier: ...

    MODELS.get("cnn")          # the builder
    MODELS.get("cnm")          # ValueError: unknown model 'cnm'; did you mean 'cnn'? known models: ...
    MODELS.names()             # sorted names

Names are normalised once (stripped, lower case, ``-`` read as ``_``), so ``"CNN-fast"`` finds
``cnn_fast``. Registering a name twice is an error (re-registering the same object is a no-op, so
re-importing a module is harmless). Each registry raises its own error type (a ``ValueError``
subclass), so callers keep catching what they caught before.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry", "normalise_name"]


def normalise_name(name: str) -> str:
    """The key a name is stored under: stripped, lower case, ``-`` as ``_``."""
    return str(name).strip().lower().replace("-", "_")


class Registry(Generic[T]):
    """Named objects of one kind, with "did you mean" lookups and duplicate-name errors.

    Args:
        kind: what the entries are, for messages ("model", "data set", "loss").
        error: exception type raised for unknown and duplicate names (``ValueError`` or a subclass).
        extra_names: names resolved outside the table (e.g. ``tv.<name>`` models), listed by
            :meth:`names` and offered as suggestions; they are looked up by the caller.
        hint: appended to the unknown-name message (how to add one).
    """

    def __init__(self, kind: str, *, error: type[ValueError] = ValueError,
                 extra_names: Callable[[], Iterable[str]] | None = None, hint: str = ""):
        self.kind = kind
        self.error = error
        self._extra_names = extra_names
        self._hint = hint
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""

        def decorator(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        """Store ``obj`` under ``name`` (an error if another object already has that name)."""
        key = normalise_name(name)
        if not key or ":" in key:
            raise self.error(f"invalid {self.kind} name {name!r}: empty or containing ':'")
        if key in self._entries and self._entries[key] is not obj:
            raise self.error(f"a {self.kind} named {key!r} is already registered; pick another name")
        self._entries[key] = obj

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and normalise_name(name) in self._entries

    def get(self, name: str) -> T:
        """The object registered as ``name``; unknown names raise with the closest known one."""
        key = normalise_name(name)
        if key not in self._entries:
            raise self.unknown(name)
        return self._entries[key]

    def names(self) -> list[str]:
        """Registered names (sorted), then the extra names."""
        extra = list(self._extra_names()) if self._extra_names else []
        return sorted(self._entries) + extra

    def unknown(self, name: str) -> ValueError:
        """The error for an unknown ``name``: the closest known name and the full list."""
        known = self.names()
        close = difflib.get_close_matches(normalise_name(name), [normalise_name(k) for k in known], n=1)
        by_key = {normalise_name(k): k for k in known}
        hint = f"; did you mean {by_key[close[0]]!r}?" if close else ";"
        tail = f" {self._hint}" if self._hint else ""
        kinds = f"{self.kind}es" if self.kind.endswith("s") else f"{self.kind}s"
        return self.error(f"unknown {self.kind} {name!r}{hint} known {kinds}: "
                          f"{', '.join(known) or '(none)'}.{tail}")
