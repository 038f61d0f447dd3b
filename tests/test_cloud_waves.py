"""The cloud's SFL-v2 turn-taking on a real Ray actor: queued waves, early arrivals, dropped clients.

The server pushes a wave's messages before the previous wave is done (sim.server_app.run_waves),
so the cloud must hold an early client until its wave opens, serve each wave round-robin in the
given order, and tell the server when a wave's clients have all arrived.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import ray
import torch

from sim.cloud import CloudActor
from sim.models import SplitSpec, build_tail, state_to_numpy

SPEC = SplitSpec("small", (1, 28, 28), 10)


@pytest.fixture(scope="module")
def cloud():
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             namespace="test-cloud-waves")
    torch.manual_seed(0)
    setup = {"config": {"seed": 0, "lr": 1e-3, "reservoir": 16}, "specs": {SPEC.cut: vars(SPEC)},
             "device": "cpu"}
    yield CloudActor.remote(setup, {SPEC.cut: state_to_numpy(build_tail(SPEC))})
    ray.shutdown()


def _batch(pid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(pid)
    z = rng.random((4, *SPEC.feature_shape), dtype=np.float32)
    return np.arange(4) + 100 * pid, z, rng.integers(0, 10, 4)


def _waiting(ref: ray.ObjectRef, seconds: float = 0.5) -> bool:
    return not ray.wait([ref], timeout=seconds)[0]


def test_a_queued_wave_waits_for_the_open_one_and_turns_follow_the_order(cloud):
    ray.get(cloud.begin_wave.remote(1, [(0, 0, SPEC.cut), (1, 0, SPEC.cut)]))
    ray.get(cloud.begin_wave.remote(1, [(2, 0, SPEC.cut)]))
    early = cloud.train_batch.remote(2, *_batch(2), True)  # next wave's client, already running
    ray.get(cloud.wait_arrived.remote([2]), timeout=30)
    second = cloud.train_batch.remote(1, *_batch(1), False)  # pid 1 calls before pid 0's turn
    assert _waiting(second) and _waiting(early, 0.0)
    ray.get(cloud.train_batch.remote(0, *_batch(0), False), timeout=30)
    ray.get(second, timeout=30)
    ray.get(cloud.predict.remote(0, _batch(0)[1], True), timeout=30)
    assert _waiting(early)  # pid 1 has a turn left in the open wave
    ray.get(cloud.predict.remote(1, _batch(1)[1], True), timeout=30)
    ray.get(early, timeout=30)  # the wave is done: the queued one opened
    views = ray.get(cloud.view.remote()).clients
    assert {p: views[p].seen for p in (0, 1, 2)} == {0: 4, 1: 4, 2: 4}


def test_wait_arrived_counts_a_dropped_client_and_the_wave_goes_on_without_it(cloud):
    ray.get(cloud.begin_wave.remote(2, [(3, 0, SPEC.cut), (4, 0, SPEC.cut)]))
    arrived = cloud.wait_arrived.remote([3, 4])
    first = cloud.train_batch.remote(3, *_batch(3), False)
    ray.get(first, timeout=30)
    assert _waiting(arrived)  # pid 4 has not called yet
    ray.get(cloud.drop.remote(4))  # e.g. it failed before its first batch
    ray.get(arrived, timeout=30)
    ray.get(cloud.predict.remote(3, _batch(3)[1], True), timeout=30)  # not kept waiting for pid 4
    views = ray.get(cloud.view.remote()).clients
    assert views[3].seen == 4 and 4 not in views
