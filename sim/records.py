"""Conversions between model states and Flower ArrayRecords, and what the per-round records say."""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord


def to_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


LABEL_BYTES = 8  # a label travels as an int64, whatever the dataset stores it as


def wire_bytes(*arrays: np.ndarray) -> int:
    """What arrays cost on the wire between a client and the cloud: their bytes, integer arrays
    (labels, predicted classes) at LABEL_BYTES each. Both ends count by this rule."""
    return sum(a.size * LABEL_BYTES if np.issubdtype(a.dtype, np.integer) else a.nbytes for a in arrays)


def record_bytes(record: ArrayRecord) -> int:
    """Payload size of the arrays, as a message carries them."""
    return sum(v.numpy().nbytes for v in record.values())


def failure_counts(records: list[dict[str, Any]], until_round: int | None = None) -> dict[int, int]:
    """Per client, the rounds it failed (crashed, or no reply in time), up to ``until_round``."""
    counts: dict[int, int] = {}
    for record in records:
        if until_round is None or record["round"] <= until_round:
            for f in record["failed"]:
                counts[f["partition_id"]] = counts.get(f["partition_id"], 0) + 1
    return counts
