"""A user-written Message-API strategy: FedAvg over norm-clipped client updates.

One client with a huge update (a poisoned or diverged head) can drag a plain average
anywhere. Clipping each client's update ``client - global`` to an L2 norm of at most
``max_norm`` before averaging bounds what any single client can do to the global model,
which is also the first half of DP-FedAvg (without the noise).

Use it from the simulator with the ``module:Class(kwargs)`` form::

    python -m sim.run --strategy "examples.custom_strategy:NormClippedFedAvg(max_norm=5.0)"

All FedAvg keywords (``fraction_train=...``, ...) are accepted too. The share of clients
that were clipped each round is reported as the ``clipped-fraction`` train metric.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg


def clip_and_average(
    global_arrays: ArrayRecord,
    client_arrays: list[ArrayRecord],
    weights: list[float],
    max_norm: float,
) -> tuple[ArrayRecord, float]:
    """Return ``global + weighted mean of clipped updates`` and the fraction clipped.

    The norm is taken over all arrays of a client together, as one flat vector, so the
    bound holds for the whole model and not layer by layer.
    """
    base = {key: array.numpy().astype(np.float64) for key, array in global_arrays.items()}
    total_weight = float(sum(weights))
    mean_update = {key: np.zeros_like(value) for key, value in base.items()}
    clipped = 0
    for record, weight in zip(client_arrays, weights, strict=True):
        update = {key: record[key].numpy() - value for key, value in base.items()}
        norm = float(np.sqrt(sum(np.sum(np.square(u)) for u in update.values())))
        scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
        clipped += int(scale < 1.0)
        for key, value in update.items():
            mean_update[key] += value * (scale * weight / total_weight)
    dtypes = {key: array.numpy().dtype for key, array in global_arrays.items()}
    averaged = {
        key: Array(np.asarray(value + mean_update[key], dtype=dtypes[key]))
        for key, value in base.items()
    }
    return ArrayRecord(averaged), clipped / len(client_arrays)


class NormClippedFedAvg(FedAvg):
    """FedAvg that clips every client's update to L2 norm ``max_norm`` before averaging."""

    def __init__(self, max_norm: float = 5.0, **kwargs: Any) -> None:
        if max_norm <= 0:
            raise ValueError(f"max_norm must be positive, got {max_norm}")
        super().__init__(**kwargs)
        self.max_norm = max_norm
        self._global: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the arrays sent out: updates are measured relative to them."""
        self._global = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the clipped updates and report how many clients were clipped."""
        if self._global is None:
            raise RuntimeError("aggregate_train called before configure_train")
        valid_replies, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid_replies:
            return None, None
        contents = [msg.content for msg in valid_replies]
        client_arrays = [next(iter(c.array_records.values())) for c in contents]
        weights = [
            float(cast(float, next(iter(c.metric_records.values()))[self.weighted_by_key]))
            for c in contents
        ]
        arrays, clipped = clip_and_average(self._global, client_arrays, weights, self.max_norm)
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        metrics["clipped-fraction"] = clipped
        return arrays, metrics
