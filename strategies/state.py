"""A strategy's state between rounds, as plain data a checkpoint can hold.

Flower's strategies keep their state in instance attributes: FedOpt's moments (``m_t``,
``v_t``) and ``current_arrays``, FedAvgM's momentum, the DP wrappers' clipping norm and the
strategy they wrap. Any strategy, ours or a user's, is saved the same way: every attribute
that is plain data (numbers, strings, numpy arrays, ArrayRecords, and dicts and lists of
those) is kept, and wrapped strategies are saved recursively. Functions, loggers and other
objects are configuration, rebuilt from the spec on resume, and are not saved.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from sim.records import from_record, to_record

PLAIN = (bool, int, float, str, type(None), np.ndarray)


def _plain(value: Any) -> bool:
    if isinstance(value, PLAIN):
        return True
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return False


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """``{attribute: {"kind": ..., "value": ...}}`` for every attribute worth restoring."""
    state: dict[str, Any] = {}
    for name, value in vars(strategy).items():
        if isinstance(value, Strategy):
            state[name] = {"kind": "strategy", "value": strategy_state(value)}
        elif isinstance(value, ArrayRecord):
            state[name] = {"kind": "record", "value": from_record(value)}
        elif _plain(value):
            state[name] = {"kind": "tuple" if isinstance(value, tuple) else "plain", "value": value}
    return state


def load_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    """Put a state from :func:`strategy_state` back into a freshly built strategy."""
    for name, entry in state.items():
        kind, value = entry["kind"], entry["value"]
        if kind == "strategy":
            load_strategy_state(getattr(strategy, name), value)
        elif kind == "record":
            setattr(strategy, name, to_record(value))
        elif kind == "tuple":
            setattr(strategy, name, tuple(value))
        else:
            setattr(strategy, name, value)
