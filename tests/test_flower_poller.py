"""The one-walk poller (sim/flower_poller.py) hands out the messages Flower 1.42's per-node poller
does, pass by pass and in the same order, on Flower's own in-memory link state."""

from __future__ import annotations

import threading
import time
from queue import Queue
from typing import Any

from flwr.app import Message, RecordDict
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from sim.flower_poller import deliver_pending, install, poll_messages


def _link(run_id: int, nodes: int) -> tuple[Any, InMemoryGrid, dict[int, int]]:
    """Flower's in-memory link state with run ``run_id`` (the task_identity fixture's) and
    ``nodes`` registered nodes, as its simulation sets them up (run_simulation._main_loop,
    vce_api._register_nodes)."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(run_id=run_id)
    run.primary_task_id = 1
    run.federation_id = NOOP_FEDERATION_ID
    state.run_ids[run_id] = RunRecord(run=run)
    state.task_store[1] = Task(task_id=1, run_id=run_id)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, grid, vce_api._register_nodes(nodes, factory)


def _push(grid: InMemoryGrid, plan: list[tuple[int, float]]) -> list[str]:
    """Push one message per (node id, ttl); the ids, in push order."""
    messages = [Message(RecordDict({}), dst_node_id=node, message_type="train", ttl=ttl) for node, ttl in plan]
    return list(grid.push_messages(messages))


def _passes(one_pass: Any, state: Any, nodes: list[int]) -> list[list[str]]:
    """The message ids each pass queues, until a pass queues none."""
    passes = []
    while True:
        queue: Queue[Message] = Queue()
        one_pass(state, queue, nodes)
        got = [queue.get().metadata.message_id for _ in range(queue.qsize())]
        if not got:
            return passes
        passes.append(got)


def _flower_pass(state: Any, queue: Queue[Message], nodes: list[int]) -> None:
    """One pass of Flower 1.42's add_messages_to_queue: each node's next message, node by node."""
    for node in nodes:
        for msg in state.get_message_ins(node_id=node, limit=1):
            queue.put(msg)


def _one_walk_pass(state: Any, queue: Queue[Message], nodes: list[int]) -> None:
    deliver_pending(state, queue, {node: i for i, node in enumerate(nodes)})


def test_one_walk_delivers_what_flower_delivers_pass_by_pass(task_identity: int) -> None:
    runs = []
    for one_pass in (_flower_pass, _one_walk_pass):
        state, grid, mapping = _link(task_identity, nodes=7)
        nodes = list(mapping)
        outside = nodes.pop()  # registered, but not one of the runtime's nodes
        # pushed out of node order, some nodes twice or three times, one to a node the runtime
        # does not run, two that expire before the first pass
        plan = [(nodes[4], 60.0), (nodes[0], 60.0), (nodes[4], 60.0), (outside, 60.0), (nodes[2], 0.05),
                (nodes[1], 60.0), (nodes[4], 60.0), (nodes[0], 60.0), (nodes[5], 0.05), (nodes[3], 60.0)]
        ids = _push(grid, plan)
        time.sleep(0.1)
        order = {msg_id: i for i, msg_id in enumerate(ids)}
        passes = [[order[m] for m in p] for p in _passes(one_pass, state, nodes)]
        left = sorted(order[m] for m in state.message_ins_store)
        runs.append((passes, left))
    flower, one_walk = runs
    assert flower[0] == [[1, 5, 9, 0], [7, 2], [6]]  # the k-th pass: each node's k-th message
    assert flower[1] == [0, 1, 2, 3, 5, 6, 7, 9]  # both expired ones dropped; the outside one kept
    assert one_walk == flower


def test_installed_poller_feeds_the_queue_until_stopped(task_identity: int) -> None:
    assert install()
    assert vce_api.add_messages_to_queue is poll_messages  # what Flower's runtime starts
    state, grid, mapping = _link(task_identity, nodes=50)
    ids = _push(grid, [(node, 60.0) for node in reversed(mapping)])
    queue: Queue[Message] = Queue()
    stop = threading.Event()
    poller = threading.Thread(target=vce_api.add_messages_to_queue, args=(state, queue, mapping, stop))
    poller.start()
    try:
        got = [queue.get(timeout=5).metadata.message_id for _ in ids]
        time.sleep(0.3)  # later passes hand out nothing already delivered
        assert queue.empty()
        late = _push(grid, [(next(iter(mapping)), 60.0)])  # pushed while it runs
        assert queue.get(timeout=5).metadata.message_id == late[0]
    finally:
        stop.set()
        poller.join(timeout=5)
    assert not poller.is_alive()
    assert got == ids[::-1]  # one pass, in the nodes' registration order
