"""Registries of named components with typed keyword parameters (defenses, attacks).

A component class has a ``name`` and an ``__init__`` whose annotated keyword parameters are
its public settings; a spec such as ``noise(sigma=0.05)`` builds it, and so does the import path
of a user's class, ``my_defenses:Blur(k=3)`` (:mod:`sim.plugins`), which must subclass the
registry's base class and name itself (``name = "blur"``, not a registered name: rows and
reports are keyed by it). Unknown names and parameters, wrong types, a wrong base class and
values the constructor rejects all become one-line errors of the registry's own exception
type, listing what exists; registering a name twice is an error.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from sim.plugins import import_class, is_import_path
from sim.spec import CallSpec, fits

T = TypeVar("T")


class Registry(Generic[T]):
    """``name -> class`` for one kind of component; iterating gives the names, sorted."""

    def __init__(self, kind: str, error: type[ValueError], base: type[T]) -> None:
        self.kind = kind
        self.error = error
        self.base = base
        self._classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator: make ``cls`` buildable by its ``name``."""
        name = getattr(cls, "name", "")
        if not name:
            raise ValueError(f"{cls.__name__} has no name")
        if name in self._classes and self._classes[name] is not cls:
            raise ValueError(f"{self.kind} name '{name}' of {cls.__module__}.{cls.__qualname__} is taken by "
                             f"{self._classes[name].__module__}.{self._classes[name].__qualname__}")
        self._classes[name] = cls
        return cls

    def resolve(self, name: str) -> type[T]:
        """The class a spec names: registered, or imported from ``module:Class``."""
        if not is_import_path(name):
            if name not in self._classes:
                raise self.error(f"unknown {self.kind} '{name}'; available: {self.describe_all()}; "
                                 f"or your own {self.base.__name__} subclass as 'module:Class(...)'")
            return self._classes[name]
        cls = import_class(name, self.base, self.kind, self.error)
        own = getattr(cls, "name", "")
        if not own or own == getattr(self.base, "name", ""):
            raise self.error(f"{name}: the class must name itself (a class attribute name = '...'), "
                             f"which its rows and reports are keyed by")
        if own in self._classes and self._classes[own] is not cls:
            raise self.error(f"{name}: its name '{own}' is the built-in {self.kind} "
                             f"{self.describe(self._classes[own])}; choose another")
        return cls

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._classes))

    def __getitem__(self, name: str) -> type[T]:
        return self._classes[name]

    def build(self, spec: CallSpec, **overrides: Any) -> T:
        """Construct the component a parsed spec names; ``overrides`` win over its kwargs."""
        cls = self.resolve(spec.name)
        if spec.args:
            raise self.error(f"{spec.name}: use keyword arguments, e.g. {self.describe(cls)}")
        params = set(inspect.signature(cls.__init__).parameters) - {"self"}
        kwargs = {**spec.kwargs, **overrides}
        unknown = sorted(set(kwargs) - params)
        if unknown:
            raise self.error(f"{spec.name}: unknown parameter '{unknown[0]}'; accepted: {self.describe(cls)}")
        hints = typing.get_type_hints(cls.__init__)
        kwargs = {k: self._check(spec.name, k, v, hints.get(k)) for k, v in kwargs.items()}
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise self.error(f"{spec.name}: {exc}") from None

    def _check(self, name: str, key: str, value: Any, expected: Any) -> Any:
        """Check a value against a plain annotation; an int is accepted for a float."""
        if expected in (float, int, bool, str):
            if not fits(value, expected):
                raise self.error(f"{name}: parameter '{key}' must be {expected.__name__}, got {value!r}")
            return float(value) if expected is float else value
        return value

    @staticmethod
    def describe(cls: type[Any]) -> str:
        """``name(param=default, ...)`` as shown in error messages and ``--help``."""
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        inner = ", ".join(f"{p.name}={p.default!r}" if p.default is not inspect.Parameter.empty else p.name
                          for p in params)
        return f"{cls.name}({inner})" if params else cls.name

    def describe_all(self) -> str:
        return ", ".join(self.describe(self._classes[n]) for n in self)
