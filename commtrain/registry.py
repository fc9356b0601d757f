"""A name -> object table filled by a decorator: codecs' siblings (data sources, tokenizers,
pipeline schedules, buffer storages) register themselves where they are defined."""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name`` (twice is an error)."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def names(self) -> list[str]:
        return sorted(self._items)

    def get(self, name: str, key: str | None = None) -> T:
        """The object registered as ``name``; a ValueError naming ``key`` (the config key)
        and listing the valid names otherwise."""
        if name not in self._items:
            what = f"{key}={name!r} is invalid" if key else f"unknown {self.kind} {name!r}"
            raise ValueError(f"{what}; allowed: {', '.join(self.names())}")
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items
