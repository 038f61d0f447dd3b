"""Hand simulated nodes their messages in one walk over the stored messages, not one per node.

Flower 1.42's simulation runtime hands the ServerApp's messages to its client actors with a
poller (``add_messages_to_queue`` in ``flwr/server/superlink/fleet/vce/vce_api.py``) that,
every 0.1 s, asks the in-memory link state for each registered node's next message
(``InMemoryLinkState.get_message_ins(node_id, limit=1)``), and each of those calls walks every
stored message under the state's lock. A pass thus costs nodes x stored messages: at 10,000
clients it took 77 % of the driver's samples and 0.7 of a core (docs/flower-ray.md), so a
round's time grew with the total number of clients, not with those sampled.

:func:`deliver_pending` makes the same pass in one walk: under the same lock, in the order the
messages were stored, it runs the state's own expiry check on each, picks each node's first
undelivered message, marks them delivered with one timestamp and queues them in the order of
the nodes' registration, which is what Flower's pass queues. :func:`install` puts
:func:`poll_messages` in place of Flower's poller, only for the Flower version it was written
against (any other version keeps its own poller: the same messages, slower at many nodes).
"""

from __future__ import annotations

import sys
import threading
from queue import Queue
from typing import Any

FLOWER_VERSION = "1.42.0"
POLL_INTERVAL = 0.1  # seconds between passes, as Flower's poller


def deliver_pending(state: Any, queue: Queue[Any], rank: dict[int, int]) -> None:
    """One pass: queue the first undelivered message of each node in ``rank`` (node id -> its
    registration order), in that order. ``state`` is Flower's
    ``InMemoryLinkState``, the only link state its simulation runtime uses."""
    from flwr.supercore.date import now

    first: dict[int, Any] = {}
    with state.lock:
        for msg_id in list(state.message_ins_store):
            state._check_stored_messages({msg_id})  # drops it if expired, as get_message_ins does
            msg = state.message_ins_store.get(msg_id)
            if msg is None or msg.metadata.delivered_at != "":
                continue
            node = msg.metadata.dst_node_id
            if node in rank and node not in first:
                first[node] = msg
        delivered_at = now().isoformat()
        for msg in first.values():
            msg.metadata.delivered_at = delivered_at
    for node in sorted(first, key=rank.__getitem__):
        queue.put(first[node])


def poll_messages(state: Any, queue: Queue[Any], nodes_mapping: dict[int, int], f_stop: threading.Event) -> None:
    """Flower's ``add_messages_to_queue`` (same arguments), one walk over the messages a pass."""
    rank = {node: i for i, node in enumerate(nodes_mapping)}
    while not f_stop.is_set():
        deliver_pending(state, queue, rank)
        f_stop.wait(POLL_INTERVAL)


def install() -> bool:
    """Use :func:`poll_messages` in Flower's simulation runtime from now on in this process;
    False (with a warning) where Flower is not the version it was written for."""
    import flwr
    from flwr.server.superlink.fleet.vce import vce_api

    if flwr.__version__ != FLOWER_VERSION:
        print(f"warning: Flower {flwr.__version__} is not {FLOWER_VERSION}: its own message poller runs, "
              "whose passes grow with the number of clients (docs/flower-ray.md)", file=sys.stderr)
        return False
    vce_api.add_messages_to_queue = poll_messages
    return True
