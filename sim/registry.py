"""Registries of named components with typed keyword parameters (defenses, attacks).

A component class has a ``name`` and an ``__init__`` whose annotated keyword parameters are
its public settings; a spec such as ``noise(sigma=0.05)`` builds it. Unknown names and
parameters, wrong types and values the constructor rejects all become one-line errors of the
registry's own exception type, listing what exists.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any, Generic, Iterator, TypeVar

from sim.spec import CallSpec

T = TypeVar("T")


class Registry(Generic[T]):
    """``name -> class`` for one kind of component; iterating gives the names, sorted."""

    def __init__(self, kind: str, error: type[ValueError]) -> None:
        self.kind = kind
        self.error = error
        self._classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator: make ``cls`` buildable by its ``name``."""
        name = getattr(cls, "name", "")
        if not name:
            raise ValueError(f"{cls.__name__} has no name")
        self._classes[name] = cls
        return cls

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._classes))

    def __getitem__(self, name: str) -> type[T]:
        return self._classes[name]

    def build(self, spec: CallSpec, **overrides: Any) -> T:
        """Construct the component a parsed spec names; ``overrides`` win over its kwargs."""
        cls = self._classes.get(spec.name)
        if cls is None:
            raise self.error(f"unknown {self.kind} '{spec.name}'; available: {self.describe_all()}")
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
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if expected in (float, int, bool, str) and type(value) is not expected:
            raise self.error(f"{name}: parameter '{key}' must be {expected.__name__}, got {value!r}")
        return value

    @staticmethod
    def describe(cls: type) -> str:
        """``name(param=default, ...)`` as shown in error messages and ``--help``."""
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        inner = ", ".join(f"{p.name}={p.default!r}" if p.default is not inspect.Parameter.empty else p.name
                          for p in params)
        return f"{cls.name}({inner})" if params else cls.name

    def describe_all(self) -> str:
        return ", ".join(self.describe(self._classes[n]) for n in self)
