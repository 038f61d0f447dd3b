"""Turn a strategy spec string into a constructed Flower Message-API strategy.

A spec names either a class of ``flwr.serverapp.strategy`` (``"FedProx(proximal_mu=0.1)"``),
a user's own Strategy subclass as ``"path.to.module:Class(max_norm=5.0)"``, or a wrapper
whose first positional argument is another spec
(``"DifferentialPrivacyServerSideFixedClipping(FedAvg(), noise_multiplier=0.1,
clipping_norm=10.0, num_sampled_clients=5)"``).

Every mistake is reported as a one-line :class:`StrategyError` that says what is wrong and
what would be accepted, and :func:`check_strategy_spec` finds all of them by building the
strategy once, so a typo fails in milliseconds instead of after Ray has started.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import math
import types
import typing
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import flwr.serverapp.strategy as flwr_strategies
from flwr.serverapp.strategy import Strategy

from sim.plugins import import_class, is_import_path, is_subclass
from sim.spec import CallSpec, SpecError, fits, one_line, parse_call


class StrategyError(ValueError):
    """A strategy spec that cannot be resolved; the message is one line meant for the user."""


# Ranges of Flower's common constructor arguments. The constructors store them unchecked, and
# a bad one fails only rounds later (a fraction above 1 waits forever for nodes that do not
# exist) or silently does nothing (a negative proximal_mu). (low, high); None: unbounded.
_RANGES: dict[str, tuple[float, float | None]] = {
    "fraction_train": (0.0, 1.0),
    "fraction_evaluate": (0.0, 1.0),
    "min_train_nodes": (0, None),
    "min_evaluate_nodes": (0, None),
    "min_available_nodes": (0, None),
    "proximal_mu": (0.0, None),
}


@dataclass(frozen=True)
class _Params:
    """What a strategy constructor accepts, as far as its signatures tell.

    ``accepted`` follows ``**kwargs`` forwarding up the MRO (a user subclass written as
    ``def __init__(self, max_norm, **kwargs): super().__init__(**kwargs)`` accepts FedAvg's
    keywords too), because defaults and typo detection must see the whole chain.
    ``positional`` and ``required`` come from the class's own ``__init__`` only: whatever a
    subclass does with its parent's required arguments is invisible to a signature, and the
    constructor itself reports those.
    """

    accepted: tuple[str, ...]
    hints: dict[str, Any]
    positional: tuple[str, ...]
    required: tuple[str, ...]


def resolve_strategy(spec: str, defaults: Mapping[str, object] | None = None) -> Strategy:
    """Build the strategy described by ``spec``.

    ``defaults`` are keyword arguments the simulator wants on every base (non-wrapper)
    strategy, e.g. ``{"fraction_train": 0.1, "min_available_nodes": 1}``; each is passed only
    when the class accepts it and the user did not set it. Raises :class:`StrategyError`.
    """
    try:
        call = parse_call(spec)
    except SpecError as exc:
        raise StrategyError(f"invalid strategy spec: {one_line(exc)}") from None
    return _build(call, defaults or {})


def check_strategy_spec(spec: str, defaults: Mapping[str, object] | None = None,
                        num_nodes: int | None = None) -> None:
    """Raise :class:`StrategyError` if ``spec`` cannot be built; build nothing lasting.

    Constructing a strategy is cheap and is the only way to run the constructor's own value
    checks, so the strategy is built once and discarded, with Flower's construction-time
    log messages silenced so they appear only when the real strategy is built. Pass the
    same ``defaults`` as to :func:`resolve_strategy` to also catch a default a class rejects,
    and ``num_nodes`` (the clients it will aggregate) to catch a sampling that cannot work.
    """
    with _flwr_logging_disabled():
        strategy = resolve_strategy(spec, defaults)
    if num_nodes is not None:
        _check_sampling(spec, strategy, num_nodes)


def _check_sampling(spec: str, strategy: Strategy, num_nodes: int) -> None:
    """Check a FedAvg-family sampler (possibly inside wrappers) against ``num_nodes`` clients.

    Flower samples ``max(int(n * fraction_train), min_train_nodes)`` nodes after waiting,
    polling every second without end, until ``min_available_nodes`` (at least the sample)
    are connected: asking for more than exist hangs the run instead of failing it.
    """
    sampler: Any = strategy  # probed by attribute: Strategy itself declares none of these
    while isinstance(getattr(sampler, "strategy", None), Strategy):  # DP wrappers: the inner one samples
        sampler = sampler.strategy
    if not all(hasattr(sampler, a) for a in ("fraction_train", "min_train_nodes", "min_available_nodes")):
        return  # a user strategy that samples its own way
    if sampler.fraction_train == 0:
        raise StrategyError(f"'{spec}' has fraction_train=0: no client would ever train")
    sample = max(int(num_nodes * sampler.fraction_train), sampler.min_train_nodes)
    wanted = max(sample, sampler.min_available_nodes)
    if wanted > num_nodes:
        raise StrategyError(
            f"'{spec}' waits for {wanted} nodes (min_train_nodes={sampler.min_train_nodes}, "
            f"min_available_nodes={sampler.min_available_nodes}), but it has {num_nodes} clients: "
            "Flower would wait forever")


def available_strategies() -> list[str]:
    """Names of the concrete strategies that ``flwr.serverapp.strategy`` exports."""
    return sorted(
        name
        for name in flwr_strategies.__all__
        if is_subclass(getattr(flwr_strategies, name), Strategy)
        and not inspect.isabstract(getattr(flwr_strategies, name))
    )


def _build(call: CallSpec, defaults: Mapping[str, object]) -> Strategy:
    """Construct one (possibly wrapping) strategy from its parsed call."""
    cls = _find_class(call.name)
    params = _constructor_params(cls)
    kwargs = _bind_positional(call, params)
    _reject_unknown(call, kwargs, params)
    is_wrapper = any(isinstance(v, CallSpec) for v in kwargs.values())
    kwargs = {
        key: _build(value, defaults) if isinstance(value, CallSpec) else value
        for key, value in kwargs.items()
    }
    applied = {} if is_wrapper else _accepted_defaults(defaults, params, kwargs)
    kwargs = {**applied, **kwargs}
    _reject_missing(call, kwargs, params)
    _reject_wrong_types(call, kwargs, params)
    _reject_out_of_range(call, kwargs)
    return _construct(call, cls, kwargs, applied)


def _find_class(name: str) -> type[Strategy]:
    """Look ``name`` up as a Flower strategy or as ``module:Class``."""
    if is_import_path(name):
        # mypy#4717: an abstract class is rejected for type[T], though only subclasses are checked against it
        return import_class(name, Strategy, "strategy", StrategyError)  # type: ignore[type-abstract]
    return _flower_strategy(name)


def _flower_strategy(name: str) -> Any:
    """Return the ``flwr.serverapp.strategy`` class called ``name``, or explain the options."""
    available = available_strategies()
    if name in available:
        return getattr(flwr_strategies, name)
    if "." in name:
        module, _, attr = name.rpartition(".")
        hint = f" (did you mean '{module}:{attr}'?)"
    else:
        close = difflib.get_close_matches(name, available, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise StrategyError(
        f"unknown strategy '{name}'{hint}; available: {', '.join(available)}; "
        "or give your own Strategy subclass as 'path.to.module:Class(...)'"
    )


def _constructor_params(cls: type) -> _Params:
    """Collect what ``cls(...)`` accepts from the ``__init__`` chain it forwards through."""
    inits = _forwarding_inits(cls)
    signatures = [list(inspect.signature(init).parameters.values())[1:] for init in inits]
    named = [
        [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        for params in signatures
    ]
    own = named[0] if named else []
    hints: dict[str, Any] = {}
    for init in reversed(inits):  # a subclass's annotation wins over its parent's
        hints.update(_type_hints(init))
    return _Params(
        accepted=tuple(dict.fromkeys(p.name for params in named for p in params)),
        hints=hints,
        positional=tuple(
            p.name for p in own if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ),
        required=tuple(p.name for p in own if p.default is p.empty),
    )


def _forwarding_inits(cls: type) -> list[Any]:
    """The ``__init__`` of ``cls`` and, while each takes ``**kwargs``, its parents' ones.

    ``object.__init__`` accepts nothing, so the chain stops before it.
    """
    inits: list[Any] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if klass is object:
            break
        inits.append(init)
        kinds = {p.kind for p in inspect.signature(init).parameters.values()}
        if inspect.Parameter.VAR_KEYWORD not in kinds:
            break
    return inits


def _type_hints(func: Any) -> dict[str, Any]:
    """Resolved annotations of ``func``; none when a user's annotations do not resolve.

    Annotations only sharpen the error messages, so one that names something missing
    (any exception ``get_type_hints`` may raise) must not stop the strategy from loading.
    """
    try:
        return typing.get_type_hints(func)
    except Exception:  # pylint: disable=broad-exception-caught
        return {}


def _bind_positional(call: CallSpec, params: _Params) -> dict[str, Any]:
    """Name the positional arguments so that every later check works on keywords."""
    if len(call.args) > len(params.positional):
        raise StrategyError(
            f"'{call.name}' takes at most {len(params.positional)} positional argument(s) "
            f"({', '.join(params.positional) or 'none'}), got {len(call.args)} in '{call}'"
        )
    named = dict(zip(params.positional, call.args))
    twice = [key for key in named if key in call.kwargs]
    if twice:
        raise StrategyError(f"'{call.name}' got {', '.join(twice)} twice in '{call}'")
    return {**named, **call.kwargs}


def _reject_unknown(call: CallSpec, kwargs: Mapping[str, Any], params: _Params) -> None:
    unknown = [key for key in kwargs if key not in params.accepted]
    if unknown:
        raise StrategyError(
            f"'{call.name}' has no argument(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(params.accepted) or 'none'}"
        )


def _accepted_defaults(
    defaults: Mapping[str, object], params: _Params, given: Mapping[str, Any]
) -> dict[str, object]:
    """The simulator's defaults that the class accepts and the user left unset."""
    return {
        key: value
        for key, value in defaults.items()
        if key in params.accepted and key not in given
    }


def _reject_missing(call: CallSpec, kwargs: Mapping[str, Any], params: _Params) -> None:
    missing = [key for key in params.required if key not in kwargs]
    if missing:
        raise StrategyError(
            f"'{call.name}' is missing required argument(s) {', '.join(missing)} in '{call}'"
        )


def _reject_wrong_types(call: CallSpec, kwargs: Mapping[str, Any], params: _Params) -> None:
    """Check values against simple annotations; constructors rarely check types themselves.

    ``FedProx(proximal_mu='abc')`` would otherwise be built and ship ``'abc'`` to every
    client. Only plain classes (and unions of them) are checked; anything more elaborate,
    such as a ``Callable``, is left to the constructor.
    """
    for key, value in kwargs.items():
        hint = params.hints.get(key)
        if hint is not None and _matches(value, hint) is False:
            raise StrategyError(
                f"'{call.name}' argument {key}={value!r} should be {_describe(hint)}"
            )


def _reject_out_of_range(call: CallSpec, kwargs: Mapping[str, Any]) -> None:
    """Check the common arguments Flower's constructors store without checking (``_RANGES``)."""
    for key, (low, high) in _RANGES.items():
        value = kwargs.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue  # absent, or a type the annotation check already judged
        if not (math.isfinite(value) and low <= value and (high is None or value <= high)):
            span = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise StrategyError(f"'{call.name}' argument {key}={value!r} must be {span}")


def _matches(value: Any, hint: Any) -> bool | None:
    """Whether ``value`` fits ``hint``; ``None`` when the hint is too elaborate to tell."""
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    undecided = False
    for option in options:
        if option is type(None):
            if value is None:
                return True
        elif typing.get_origin(option) is None and inspect.isclass(option):
            if fits(value, option):
                return True
        else:
            undecided = True
    return None if undecided else False


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _describe(hint: Any) -> str:
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    return " or ".join(getattr(o, "__name__", str(o)).replace("NoneType", "None") for o in options)


def _construct(
    call: CallSpec, cls: type[Strategy], kwargs: dict[str, Any], applied: Mapping[str, object]
) -> Strategy:
    """Call the constructor, turning its own argument checks into one-line errors.

    The defaults the simulator added are named in the message: the user did not write
    them, so without that an error about them would be a puzzle.
    """
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        added = ", ".join(f"{key}={value!r}" for key, value in applied.items())
        note = f" (plus the simulator's defaults {added})" if added else ""
        raise StrategyError(
            f"'{call.name}' rejected its arguments in '{call}'{note}: {one_line(exc)}"
        ) from None


@contextmanager
def _flwr_logging_disabled() -> Iterator[None]:
    """Silence the ``flwr`` logger while a throw-away strategy is built."""
    logger = logging.getLogger("flwr")
    was_disabled = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = was_disabled
