"""The cloud's SFL-v2 turn-taking on a real Ray actor: queued waves, early arrivals, dropped clients.

The server pushes a wave's messages before the previous wave is done (sim.server_app.run_waves),
so the cloud must hold an early client until its wave opens, serve each wave round-robin in the
given order, and tell the server when a wave's clients have all arrived.
"""

from __future__ import annotations

import numpy as np
import pytest
import ray

from sim.view import VIEW_META
from tests.simhelpers import CLOUD_SPEC, local_clouds

SPEC = CLOUD_SPEC


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    with local_clouds(1, lambda: tmp_path_factory.mktemp("store"), "test-cloud-waves") as (actors, _):
        yield actors[0]


def _batch(pid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(pid)
    z = rng.random((4, *SPEC.feature_shape), dtype=np.float32)
    return np.arange(4) + 100 * pid, z, rng.integers(0, 10, 4)


def _seen(cloud, round_: int) -> dict[int, int]:
    """Features received per client in its latest completed round, from the cloud's store index
    (after writing the round's shard, as the server's checkpoint does)."""
    ray.get(cloud.flush.remote(round_))
    meta = ray.get(cloud.state.remote())["store"]["meta"]
    return {int(k.split("-")[1]): dict(zip(VIEW_META, v))["seen"] for k, v in meta.items() if k.startswith("done-")}


def _waiting(ref: ray.ObjectRef, seconds: float = 0.5) -> bool:
    return not ray.wait([ref], timeout=seconds)[0]


def test_a_queued_wave_waits_for_the_open_one_and_turns_follow_the_order(cloud):
    ray.get(cloud.begin_wave.remote(1, [(0, 0, SPEC.cut), (1, 0, SPEC.cut)]))
    ray.get(cloud.begin_wave.remote(1, [(2, 0, SPEC.cut)]))
    early = cloud.exchange.remote("train_batch", 2, list(_batch(2)), True)  # next wave's client, already running
    ray.get(cloud.wait_arrived.remote([2]), timeout=30)
    second = cloud.exchange.remote("train_batch", 1, list(_batch(1)), False)  # pid 1 calls before pid 0's turn
    assert _waiting(second) and _waiting(early, 0.0)
    ray.get(cloud.exchange.remote("train_batch", 0, list(_batch(0)), False), timeout=30)
    ray.get(second, timeout=30)
    ray.get(cloud.exchange.remote("predict", 0, [_batch(0)[1]], True), timeout=30)
    assert _waiting(early)  # pid 1 has a turn left in the open wave
    ray.get(cloud.exchange.remote("predict", 1, [_batch(1)[1]], True), timeout=30)
    ray.get(early, timeout=30)  # the wave is done: the queued one opened
    seen = _seen(cloud, 1)
    assert {p: seen[p] for p in (0, 1, 2)} == {0: 4, 1: 4, 2: 4}


def test_wait_arrived_counts_a_dropped_client_and_the_wave_goes_on_without_it(cloud):
    ray.get(cloud.begin_wave.remote(2, [(3, 0, SPEC.cut), (4, 0, SPEC.cut)]))
    arrived = cloud.wait_arrived.remote([3, 4])
    first = cloud.exchange.remote("train_batch", 3, list(_batch(3)), False)
    ray.get(first, timeout=30)
    assert _waiting(arrived)  # pid 4 has not called yet
    ray.get(cloud.drop.remote(4))  # e.g. it failed before its first batch
    ray.get(arrived, timeout=30)
    ray.get(cloud.exchange.remote("predict", 3, [_batch(3)[1]], True), timeout=30)  # not kept waiting for pid 4
    seen = _seen(cloud, 2)
    assert seen[3] == 4 and 4 not in seen
