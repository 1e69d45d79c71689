"""Small name -> object registries for pluggable variants (losses, engines, rewards, ...).

A config can name a registered variant ("grpo") or any importable object by path
("my_pkg.rewards:score" or "my_pkg.rewards.score"), so users plug in their own without editing dora.
"""

from __future__ import annotations

import enum
import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
E = TypeVar("E", bound=enum.Enum)


def parse_enum(cls: type[E], value: object, key: str) -> E:
    """`value` as a member of the config enum `cls`; the error names the key and the allowed values."""
    try:
        return cls(value)
    except ValueError:
        raise ValueError(f"{key} must be one of {[m.value for m in cls]}, got {value!r}") from None


def import_object(path: str) -> object:
    """Import `pkg.module:attr` or `pkg.module.attr`."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{path!r} is not an import path (expected 'package.module:name')")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {module_name!r} for {path!r}: {e}") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r} (from {path!r})") from None


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        """A registered name, or an import path (anything containing '.' or ':')."""
        if name in self._entries:
            return self._entries[name]
        if "." in name or ":" in name:
            return import_object(name)  # type: ignore[return-value]
        raise ValueError(f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._entries)) or '(none)'}"
                         " (or give an import path 'package.module:name')")

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
