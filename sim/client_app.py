"""The Flower ClientApp: one ``train`` message = one client's whole local round.

A client's persistent state (its defense's own buffers, e.g. CEM's centroids) travels with its
messages: the server sends it with each ``train`` message and keeps the copy each successful
reply brings back. So a failed client's partial state is discarded with its reply, and the
server's checkpoint holds every client's state (Flower's ``context.state`` would be lost when
a run is resumed in a new process). The data and the cloud's handle come from the
process-wide :class:`sim.client.Runtime`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch  # noqa: F401  (ArrayRecord's torch conversions need torch imported; Flower 1.42)
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, compute_clip_model_update

from sim.client import get_runtime, local_train, open_tail
from sim.records import from_record, record_bytes, to_record

CLIENT_STATE = "defense-state"  # the client's own defense buffers, kept across rounds

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (node ids are random)."""
    pid = int(context.node_config["partition-id"])
    return Message(RecordDict({"info": ConfigRecord({"partition-id": pid})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    arrays = next(v for k, v in msg.content.array_records.items() if k != CLIENT_STATE)
    config: Mapping[str, Any] = next(iter(msg.content.config_records.values()))  # the server's _configure
    torch.set_num_threads(1)  # one torch thread per actor: more collapse on busy cores (docs/flower-ray.md)
    rt = get_runtime(str(config["cloud"]), str(config["namespace"]))
    pid = int(context.node_config["partition-id"])
    head_in = from_record(arrays)
    round_ = int(config["round"])
    own = msg.content.array_records.get(CLIENT_STATE)
    head_out, client_state, metrics = local_train(
        rt, pid, round_, head_in, open_tail(rt, pid, round_),
        client_state=from_record(own) if own is not None else None,
        proximal_mu=float(config.get("proximal-mu", 0.0)))
    if KEY_CLIPPING_NORM in config:  # Flower's client-side DP wrapper asks clients to clip
        keys = list(head_out)
        clipped = [head_out[k] for k in keys]
        compute_clip_model_update(clipped, [head_in[k] for k in keys], float(config[KEY_CLIPPING_NORM]))
        head_out = dict(zip(keys, clipped))
    reply_arrays = to_record(head_out)
    metrics["bytes-sent"] += record_bytes(reply_arrays)
    metrics["bytes-received"] += record_bytes(arrays)
    metrics["seconds"] = time.perf_counter() - t0
    # {**metrics}: a dict of Flower's value types (its annotation is an invariant dict)
    content = RecordDict({"arrays": reply_arrays, "metrics": MetricRecord({**metrics})})
    if client_state:
        content[CLIENT_STATE] = to_record(client_state)
    return Message(content, reply_to=msg)
