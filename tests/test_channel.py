"""The per-batch channel from client actors to the cloud actor on its node (sim.channel).

Its frames carry numeric arrays exactly, layout included, and nothing else; on a real cloud
actor a request through the channel is answered bit for bit as the same request as a Ray call
(the channel answers before the shared tail's step, the Ray call after it);
the cloud's errors reach the client; a connection without the cloud's token gets nothing.
"""

from __future__ import annotations

import json
import socket
import struct

import numpy as np
import pytest
import ray
import torch

from sim import channel
from sim.cloud import CloudSession, make_optimizer
from sim.config import RESERVOIR_SALT, derive_seed
from sim.models import build_tail, load_numpy_state, state_to_numpy
from sim.view import Reservoir
from tests.simhelpers import CLOUD_SPEC, local_clouds

pytestmark = pytest.mark.skipif(not channel.AVAILABLE, reason="the channel uses Linux's abstract sockets")
SPEC = CLOUD_SPEC


def _roundtrip(arrays: list[np.ndarray]) -> list[np.ndarray]:
    frame = b"".join(channel.encode({"method": "x"}, arrays))
    head_len, body_len = channel.lengths(frame[:8])
    body = channel.aligned(body_len)
    body[:] = np.frombuffer(frame[8 + head_len:], np.uint8)
    header, out = channel.decode(frame[8:8 + head_len], body)
    assert header == {"method": "x"}
    return out


def test_frames_carry_arrays_exactly_with_their_layout():
    channels_last = torch.randn(4, 8, 7, 7).contiguous(memory_format=torch.channels_last).numpy()
    arrays = [channels_last, np.asarray(1.5), np.arange(5), np.ones((2, 3, 1), np.float32),
              np.asfortranarray(np.arange(12.0).reshape(3, 4)), np.array([True, False]),
              np.zeros((0, 3), np.float32), np.arange(16, dtype=np.uint8).reshape(4, 4)[:, ::2]]
    out = _roundtrip(arrays)
    for a, b in zip(arrays, out):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
        assert b.ctypes.data % channel.ALIGN == 0 and b.flags.writeable
    assert [b.strides for b in out[:6]] == [a.strides for a in arrays[:6]]  # dense layouts kept


@pytest.mark.parametrize("entry, why", [
    (["|O", [1], [0]], "plain numeric"),  # an object array would unpickle
    (["<f4", [1], [1]], "plain numeric"),  # axes that are not a permutation
    (["<f4", [-1], [0]], "plain numeric"),
    (["<f4", [100], [0]], "more than"),  # more bytes than the body holds
    (["<f4", [1], [0]], "take 64 bytes of its 128"),  # fewer
])
def test_a_malformed_frame_is_refused(entry, why):
    with pytest.raises(ValueError, match=why):
        channel.decode(json.dumps({"arrays": [entry]}).encode(), channel.aligned(128))
    for header in (b"[]", b"{}", b'{"arrays": [["<f4", [1]]]}', b'{"arrays": [["nonsense", [1], [0]]]}', b"{"):
        with pytest.raises(ValueError):
            channel.decode(header, channel.aligned(64))
    with pytest.raises(ValueError, match="over the channel's limits"):
        channel.lengths(struct.pack("<II", channel.MAX_HEADER + 1, 0))


@pytest.fixture(scope="module")
def clouds(tmp_path_factory):
    """Two cloud actors with the same tail, each with one client in an open wave."""
    with local_clouds(2, lambda: tmp_path_factory.mktemp("store"), "test-channel") as (actors, tail):
        for actor in actors:
            ray.get(actor.begin_wave.remote(1, [(0, 0, SPEC.cut), (1, 0, SPEC.cut)]))
        yield actors, tail


def _batches(n: int) -> list[list[np.ndarray]]:
    """Training batches as a client sends them: its head's features, channels-last."""
    rng = np.random.default_rng(0)
    return [[np.arange(8) + 8 * i,
             torch.from_numpy(rng.random((8, *SPEC.feature_shape), dtype=np.float32))
             .contiguous(memory_format=torch.channels_last).numpy(),
             rng.integers(0, 10, 8)] for i in range(n)]


def test_the_channel_answers_as_the_ray_call_does(clouds):
    (via_ray, via_channel), initial_tail = clouds
    link = ray.get(via_channel.setup.remote())["channel"]
    assert link["node"] == ray.get_runtime_context().get_node_id()
    client = channel.ChannelClient(link["address"], link["token"])
    # the reference: the same batches on a tail stepped at once, in this process on one thread
    tail = build_tail(SPEC)
    load_numpy_state(tail, initial_tail)
    session = CloudSession(tail, make_optimizer(tail.parameters(), 1e-3), Reservoir(16, 0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(derive_seed(0, 1, 0, RESERVOIR_SALT))  # as the cloud's wave (seed 0, round 1, pid 0)
    try:
        for i, batch in enumerate(_batches(6)):
            pid = i % 2  # the wave's two clients take turns
            expected = [np.asarray(r) for r in session.train_batch(*batch)]
            for answer in (ray.get(via_ray.exchange.remote("train_batch", pid, batch, False)),
                           client.request({"method": "train_batch", "pid": pid, "last": False}, batch)):
                for a, b in zip(expected, answer):  # dL/dz, loss, hits: bit for bit, dL/dz in z's layout
                    assert a.dtype == b.dtype and a.strides == b.strides and a.tobytes() == b.tobytes()
    finally:
        torch.set_num_threads(threads)
    assert expected[0].strides == batch[1].strides
    # the channel answers before the tail's step and takes it after: the same tail in the end
    final = state_to_numpy(tail)
    for cloud in (via_ray, via_channel):
        state = ray.get(cloud.all_tail_states.remote())[SPEC.cut]
        assert all(np.array_equal(final[k], state[k]) for k in final)
    with pytest.raises(channel.ChannelError, match="no exchange 'steal'"):  # the cloud's error, one line
        client.request({"method": "steal", "pid": 0, "last": False}, [])
    got = client.request({"method": "predict", "pid": 0, "last": False}, [batch[1]])  # still connected
    assert got[0].shape == (8,)
    client.close()


def test_a_connection_without_the_token_gets_nothing(clouds):
    link = ray.get(clouds[0][1].setup.remote())["channel"]
    frame = b"".join(channel.encode({"method": "predict", "pid": 0, "last": False},
                                    [np.zeros((8, *SPEC.feature_shape), np.float32)]))
    wrong = bytes(b ^ 1 for b in link["token"])
    for opening in (wrong, frame):  # a wrong token; a request straight away
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect(link["address"])
            sock.sendall(opening + frame)
            try:
                answer = sock.recv(1)
            except ConnectionResetError:  # closed with the request unread
                answer = b""
            assert answer == b""  # closed by the cloud, nothing answered
    with pytest.raises(ConnectionError):
        channel.ChannelClient(link["address"], wrong).request({"method": "predict", "pid": 0, "last": False},
                                                               [np.zeros((8, *SPEC.feature_shape), np.float32)])
