"""Components given by import path, ``package.module:Class(key=value)``: the one plug-in mechanism.

Strategies, defenses and attacks are named the same way: a registered name (``noise``,
``decoder``, ``FedProx``) or the import path of the user's own class, in flags and YAML groups
alike. :func:`import_class` imports it and checks its base class, turning every failure into
one line of the caller's error type, before Ray starts. :func:`ray_modules` lists the user's
modules imported so far so that Ray ships them (``runtime_env={"py_modules": ...}``) to every process that
builds the component (client actors, the cloud, the attack stage), on any node and whatever
its working directory: the driver must be able to import them (the working directory of
``python -m sim.run`` is on its path; otherwise set ``PYTHONPATH``), the workers need nothing.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path
from types import ModuleType
from typing import TypeVar

from sim.spec import one_line

T = TypeVar("T")

# The simulator's own packages: every Ray worker imports them already.
OWN_PACKAGES = frozenset({"sim", "defenses", "attacks", "strategies", "benchmarks", "tests"})
_IMPORTED: set[str] = set()  # top-level names of the modules import_class imported


def is_import_path(name: str) -> bool:
    """Whether a component name is ``module:Class`` rather than a registered name."""
    return ":" in name


def import_class(path: str, base: type[T], kind: str, error: type[ValueError]) -> type[T]:
    """Import ``module:Class`` and check that it subclasses ``base``; any failure is one line."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    # A user's module may fail to import with any exception; all of them mean the same.
    except Exception as exc:  # pylint: disable=broad-exception-caught
        raise error(f"cannot import module '{module_name}' for {kind} '{path}': "
                    f"{type(exc).__name__}: {one_line(exc)}") from None
    _IMPORTED.add(module_name.split(".")[0])
    obj = getattr(module, attr, None)
    if obj is None:
        defined = sorted(n for n, v in vars(module).items()
                         if is_subclass(v, base) and v.__module__ == module.__name__)
        raise error(f"module '{module_name}' has no attribute '{attr}'; {base.__name__} classes "
                    f"defined there: {', '.join(defined) or 'none'}")
    if not is_subclass(obj, base):
        what = "a class" if inspect.isclass(obj) else f"a {type(obj).__name__}"
        raise error(f"'{path}' is {what}, but a {kind} must be a subclass of {public_name(base)}")
    return obj


def ray_modules() -> list[ModuleType]:
    """The top-level user modules (or packages) that :func:`import_class` has imported in this
    process, for Ray's ``py_modules``: the simulator's own packages and installed ones (under
    ``sys.prefix``, which every worker of this environment has) are left out."""
    modules = (sys.modules.get(top) for top in sorted(_IMPORTED - OWN_PACKAGES))
    return [m for m in modules if m is not None and not _installed(m)]


def public_name(cls: type) -> str:
    """The shortest import path of a class: ``defenses.Defense``, not ``defenses.base.Defense``."""
    parts = cls.__module__.split(".")
    for i in range(1, len(parts) + 1):
        module = sys.modules.get(".".join(parts[:i]))
        if module is not None and getattr(module, cls.__qualname__, None) is cls:
            return f"{module.__name__}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _installed(module: ModuleType) -> bool:
    origin = getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", [])), None)
    if origin is None:
        return True  # a built-in or namespace module: nothing to ship
    return Path(origin).resolve().is_relative_to(Path(sys.prefix).resolve())


def is_subclass(obj: object, base: type) -> bool:
    """Whether ``obj`` is a class derived from ``base`` (anything else is not, without raising)."""
    return inspect.isclass(obj) and issubclass(obj, base)
