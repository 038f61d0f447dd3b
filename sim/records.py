"""Conversions between model states (dicts of numpy arrays) and Flower ArrayRecords."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


def to_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def record_bytes(record: ArrayRecord) -> int:
    """Payload size of the arrays, as a message carries them."""
    return sum(v.numpy().nbytes for v in record.values())
