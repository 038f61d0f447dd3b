"""A client's local split training, as plain functions (the Flower ClientApp wraps them).

Everything a client needs that is the same for all clients of a run (config, the dataset, the
partitions, the cloud's handle) is a :class:`Runtime`, built once per process from the cloud
actor and cached: the dataset lives once in Ray's object store and is read zero-copy, never
copied per client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import ray
import torch
import torch.nn.functional as F

from defenses import Defense, federated_arrays, local_arrays
from defenses.client_model import build_client_last, build_client_model
from sim.channel import ChannelClient
from sim.cloud import CloudSession, make_optimizer, make_tail_optimizer
from sim.config import FAILURE_SALT, RESERVOIR_SALT, Group, SimConfig, config_from_dict, derive_seed
from sim.models import LAST_PREFIX, SplitSpec, build_tail, load_numpy_state, state_to_numpy
from sim.records import wire_bytes
from sim.view import Reservoir


@dataclass
class Runtime:
    """What every client of a run shares, resolved once per process."""

    config: SimConfig
    groups: list[Group]
    group_of: list[int]
    specs: dict[int, SplitSpec]
    cloud: Any  # ray ActorHandle
    train_x: np.ndarray  # (N, H, W, C) uint8, read-only view into the object store
    train_y: np.ndarray
    partitions: list[tuple[np.ndarray, np.ndarray]]  # per partition id: (train, holdout) ids
    mean: torch.Tensor
    std: torch.Tensor
    device: torch.device
    channel: ChannelClient | None = None  # to the cloud on this node (sim.channel); None: Ray calls

    def inputs(self, ids: np.ndarray) -> torch.Tensor:
        """Normalised model inputs (B, C, H, W) on the compute device, for train-split ids."""
        x = torch.from_numpy(self.train_x[ids]).to(self.device).permute(0, 3, 1, 2).float().div_(255)
        return (x - self.mean) / self.std


_RUNTIMES: dict[tuple[str, str], Runtime] = {}


def get_runtime(cloud_name: str, namespace: str) -> Runtime:
    """The cached runtime of the run whose cloud actor is ``cloud_name``."""
    key = (cloud_name, namespace)
    if key not in _RUNTIMES:
        for old in _RUNTIMES.values():  # one run per process at a time: drop an earlier run's data
            if old.channel is not None:
                old.channel.close()
        _RUNTIMES.clear()
        cloud: Any = ray.get_actor(cloud_name, namespace=namespace)  # Ray types an untyped handle's methods Never
        _RUNTIMES[key] = runtime_from_setup(ray.get(cloud.setup.remote()), cloud)
    return _RUNTIMES[key]


def runtime_from_setup(setup: dict[str, Any], cloud: Any) -> Runtime:
    """Resolve the setup the cloud hands out (config, data refs) into a Runtime."""
    train_x, train_y, partitions = ray.get([setup["train_x"], setup["train_y"], setup["partitions"]])
    rt = make_runtime(config_from_dict(setup["config"]),
                      {cut: SplitSpec(**s) for cut, s in setup["specs"].items()},
                      train_x, train_y, partitions, setup["mean"], setup["std"], cloud, setup["device"])
    link = setup["channel"]
    if link is not None and link["node"] == ray.get_runtime_context().get_node_id():
        rt.channel = ChannelClient(link["address"], link["token"])
    return rt


def make_runtime(cfg: SimConfig, specs: dict[int, SplitSpec], train_x: np.ndarray, train_y: np.ndarray,
                 partitions: list[tuple[np.ndarray, np.ndarray]], mean: Any, std: Any,
                 cloud: Any = None, device: str = "cpu") -> Runtime:
    shape = (1, -1, 1, 1)
    return Runtime(
        config=cfg,
        groups=cfg.resolved_groups(),
        group_of=cfg.group_of(),
        specs=specs,
        cloud=cloud,
        train_x=train_x,
        train_y=train_y,
        partitions=partitions,
        mean=torch.tensor(mean, dtype=torch.float32).view(shape).to(device),
        std=torch.tensor(std, dtype=torch.float32).view(shape).to(device),
        device=torch.device(device),
    )


class TailLink(Protocol):
    """The client's link to the cloud's tail for one round: :class:`LocalTail` (SFL-v1),
    :class:`RemoteTail` (SFL-v2) and the overhead benchmark's in-process link.

    Vanilla split: ``train_batch`` (z and labels up, dL/dz, loss and hits back) and ``predict``
    (held-out features up, predicted classes back). U-shaped split: ``forward`` (z up, h
    back), ``backward`` (dL/dh up, dL/dz back) and ``embed`` (held-out z up, h back).
    ``last`` marks a round's last exchange. ``finish`` ends the round; ``abort`` ends a
    failed one (the cloud keeps what it received, marked as from a failed round).
    """

    def train_batch(self, ids: np.ndarray, z: np.ndarray, y: np.ndarray, last: bool
                    ) -> tuple[np.ndarray, float, int]: ...

    def predict(self, z: np.ndarray, last: bool) -> np.ndarray: ...

    def forward(self, ids: np.ndarray, z: np.ndarray) -> np.ndarray: ...

    def backward(self, grad_h: np.ndarray, last: bool) -> np.ndarray: ...

    def embed(self, z: np.ndarray, last: bool) -> np.ndarray: ...

    def finish(self, num_examples: int) -> None: ...

    def abort(self) -> None: ...


class MeteredLink:
    """A tail link that counts what the client sends and receives through it, by the one rule
    of :func:`sim.records.wire_bytes` (the cloud's sessions count their side by it too)."""

    def __init__(self, link: TailLink) -> None:
        self.link, self.sent, self.received = link, 0, 0

    def _count(self, sent: tuple[np.ndarray, ...], received: np.ndarray) -> None:
        self.sent += wire_bytes(*sent)
        self.received += wire_bytes(received)

    def train_batch(self, ids: np.ndarray, z: np.ndarray, y: np.ndarray, last: bool
                    ) -> tuple[np.ndarray, float, int]:
        grad, loss, hits = self.link.train_batch(ids, z, y, last)
        self._count((z, y), grad)
        return grad, loss, hits

    def predict(self, z: np.ndarray, last: bool) -> np.ndarray:
        pred = self.link.predict(z, last)
        self._count((z,), pred)
        return pred

    def forward(self, ids: np.ndarray, z: np.ndarray) -> np.ndarray:
        h = self.link.forward(ids, z)
        self._count((z,), h)
        return h

    def backward(self, grad_h: np.ndarray, last: bool) -> np.ndarray:
        grad = self.link.backward(grad_h, last)
        self._count((grad_h,), grad)
        return grad

    def embed(self, z: np.ndarray, last: bool) -> np.ndarray:
        h = self.link.embed(z, last)
        self._count((z,), h)
        return h

    def finish(self, num_examples: int) -> None:
        self.link.finish(num_examples)

    def abort(self) -> None:
        self.link.abort()


class LocalTail:
    """SFL-v1: the client's tail copy runs here, through the cloud's own session class."""

    def __init__(self, rt: Runtime, pid: int, group: int, cut: int, round_: int) -> None:
        tail = build_tail(rt.specs[cut])
        load_numpy_state(tail, _global_tail(rt, cut, round_))
        tail.to(rt.device)
        reservoir = Reservoir(rt.config.reservoir, derive_seed(rt.config.seed, round_, pid, RESERVOIR_SALT))
        optimizer = make_tail_optimizer(tail.parameters(), rt.config.lr, rt.config.adversary)
        self.session = CloudSession(tail, optimizer, reservoir)
        self.rt, self.pid, self.group, self.cut, self.round = rt, pid, group, cut, round_

    def train_batch(self, ids: np.ndarray, z: np.ndarray, y: np.ndarray, last: bool) -> tuple[np.ndarray, float, int]:
        return self.session.train_batch(ids, z, y)

    def predict(self, z: np.ndarray, last: bool) -> np.ndarray:
        return self.session.predict(z)

    def forward(self, ids: np.ndarray, z: np.ndarray) -> np.ndarray:
        return self.session.forward(ids, z)

    def backward(self, grad_h: np.ndarray, last: bool) -> np.ndarray:
        return self.session.backward(grad_h)

    def embed(self, z: np.ndarray, last: bool) -> np.ndarray:
        return self.session.embed(z)

    def finish(self, num_examples: int) -> None:
        self._submit(state_to_numpy(self.session.tail), num_examples)

    def abort(self) -> None:
        """The client failed mid-round: hand over only what the cloud received (no tail copy)."""
        self._submit(None, 0)

    def _submit(self, tail_state: dict[str, np.ndarray] | None, num_examples: int) -> None:
        view = self.session.view(self.pid, self.group, self.cut, self.round,
                                 self.rt.specs[self.cut].feature_shape, failed=tail_state is None)
        ray.get(self.rt.cloud.submit.remote(self.pid, self.cut, tail_state, num_examples, view))


class RemoteTail:
    """SFL-v2: every batch goes to the cloud actor's shared tail, through the cloud's channel
    when this process has one (:mod:`sim.channel`), else as a Ray actor call."""

    def __init__(self, rt: Runtime, pid: int) -> None:
        self.cloud, self.channel, self.pid = rt.cloud, rt.channel, pid

    def _exchange(self, method: str, last: bool, *arrays: np.ndarray) -> list[np.ndarray]:
        if self.channel is not None:
            return self.channel.request({"method": method, "pid": self.pid, "last": last}, arrays)
        return ray.get(self.cloud.exchange.remote(method, self.pid, list(arrays), last))

    def train_batch(self, ids: np.ndarray, z: np.ndarray, y: np.ndarray, last: bool) -> tuple[np.ndarray, float, int]:
        grad, loss, hits = self._exchange("train_batch", last, ids, z, y)
        return grad, float(loss), int(hits)

    def predict(self, z: np.ndarray, last: bool) -> np.ndarray:
        return self._exchange("predict", last, z)[0]

    def forward(self, ids: np.ndarray, z: np.ndarray) -> np.ndarray:
        return self._exchange("forward", False, ids, z)[0]

    def backward(self, grad_h: np.ndarray, last: bool) -> np.ndarray:
        return self._exchange("backward", last, grad_h)[0]

    def embed(self, z: np.ndarray, last: bool) -> np.ndarray:
        return self._exchange("embed", last, z)[0]

    def finish(self, num_examples: int) -> None:
        """Nothing to hand over: the shared tail was updated batch by batch."""

    def abort(self) -> None:
        """The client failed mid-round: the cloud drops it from the wave (its connection
        closed), keeping what it received, marked as from a failed round."""
        ray.get(self.cloud.drop.remote(self.pid))


_TAIL_CACHE: dict[tuple[int, int], dict[str, np.ndarray]] = {}


def _global_tail(rt: Runtime, cut: int, round_: int) -> dict[str, np.ndarray]:
    """The round's global tail, fetched once per process and round (all clients share it)."""
    if (cut, round_) not in _TAIL_CACHE:
        _TAIL_CACHE.clear()
        _TAIL_CACHE[(cut, round_)] = ray.get(rt.cloud.tail_state.remote(cut))
    return _TAIL_CACHE[(cut, round_)]


class SimulatedFailure(RuntimeError):
    """A failure injected by ``--client-failure-rate``: a crash, or a client that vanishes."""


VANISHED = "simulated failure: the client vanished"  # the server treats such a reply as lost


def planned_failure(cfg: SimConfig, pid: int, round_: int, batches: int) -> tuple[str, int] | None:
    """Whether this client fails this round, how (``crash`` or ``vanish``) and before which
    batch; drawn from the run's seed, so a rerun fails the same clients at the same points."""
    rate = cfg.client_failure_rate
    if rate <= 0:
        return None
    rng = np.random.default_rng(derive_seed(cfg.seed, round_, pid, FAILURE_SALT))
    if rng.random() >= rate:
        return None
    return ("crash" if rng.random() < 0.5 else "vanish"), int(rng.integers(0, batches))


def _batches(ids: np.ndarray, size: int) -> list[np.ndarray]:
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def open_tail(rt: Runtime, pid: int, round_: int) -> TailLink:
    """The client's link to the cloud's tail for this round, as the protocol says."""
    if rt.config.protocol == "sflv1":
        group = rt.group_of[pid]
        return LocalTail(rt, pid, group, rt.groups[group].cut, round_)
    return RemoteTail(rt, pid)


def local_train(rt: Runtime, pid: int, round_: int, head_state: dict[str, np.ndarray], tail: TailLink,
                client_state: dict[str, np.ndarray] | None = None, proximal_mu: float = 0.0,
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, float]]:
    """Train one client's head for its group's local epochs against the cloud's tail.

    ``head_state`` is the group's model as the server sent it: the head and the defense's
    federated parameters. ``client_state`` is the client's own persistent defense state from
    earlier rounds. ``tail`` is the client's link to the tail (see :func:`open_tail`).
    Returns the new model state, the new client state and the client's metrics.

    If the client fails (an injected failure, a diverged loss, any error), the tail link is
    told (:meth:`TailLink.abort`) before the error propagates, so the cloud discards the
    client's partial round and marks what it received.
    """
    try:
        return _local_train(rt, pid, round_, head_state, MeteredLink(tail), client_state, proximal_mu)
    except BaseException:
        tail.abort()
        raise


@dataclass
class Trainee:
    """One client's round: its models, defense, data and batches, in the order they are drawn."""

    pid: int
    round: int
    group: int
    head: torch.nn.Module
    defense: Defense
    last_layer: torch.nn.Module | None  # U-shaped split: the client's classifier
    params: list[torch.nn.Parameter]  # the head's and the last layer's
    global_params: list[torch.Tensor]  # their values as the server sent them (FedProx)
    optimizer: Any
    train_ids: np.ndarray
    holdout_ids: np.ndarray
    train_batches: list[np.ndarray]
    epoch_len: int


def _set_up(rt: Runtime, pid: int, round_: int, head_state: dict[str, np.ndarray],
            client_state: dict[str, np.ndarray] | None, proximal_mu: float) -> Trainee:
    """The client's models from the server's state, its optimiser and its shuffled batches
    (seeded by run seed, round and client, so a rerun draws the same)."""
    group_idx = rt.group_of[pid]
    group = rt.groups[group_idx]
    seed = derive_seed(rt.config.seed, round_, pid)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    spec = rt.specs[group.cut]
    head, defense = build_client_model(spec, group.defense, head_state, client_state or {})
    last_layer = build_client_last(spec, head_state)
    head.to(rt.device)
    defense.to(rt.device)
    params = list(head.parameters())
    if last_layer is not None:
        last_layer.to(rt.device).train()
        params += list(last_layer.parameters())
    train_ids, holdout_ids = rt.partitions[pid]
    if defense.wants_epoch_features():  # refresh after aggregation, before the first epoch
        _epoch_end(rt, head, defense, train_ids)
    return Trainee(
        pid=pid, round=round_, group=group_idx, head=head, defense=defense, last_layer=last_layer, params=params,
        global_params=[p.detach().clone() for p in params] if proximal_mu > 0 else [],
        optimizer=make_optimizer(params + list(defense.parameters()), rt.config.lr),
        train_ids=train_ids, holdout_ids=holdout_ids,
        train_batches=[b for _ in range(group.epochs) for b in _batches(rng.permutation(train_ids), group.batch_size)],
        epoch_len=len(_batches(train_ids, group.batch_size)))


def _train_step(rt: Runtime, t: Trainee, tail: TailLink, i: int, last: bool, proximal_mu: float) -> tuple[float, int]:
    """One batch: z = head(x), the defended z to the tail, its gradient back into the head
    (plus the defense's own loss and FedProx's term); batch ``i``'s loss and hits."""
    ids = t.train_batches[i]
    x = rt.inputs(ids)
    y = rt.train_y[ids]
    yt = torch.from_numpy(y).to(rt.device)
    z = t.head(x)
    z_sent = t.defense(z)
    payload = z_sent.detach().cpu().numpy()
    t.optimizer.zero_grad(set_to_none=True)
    if t.last_layer is None:
        grad, loss, correct = tail.train_batch(ids, payload, y, last)
    else:
        grad, loss, correct = _ushaped_exchange(tail, t.last_layer, t.defense, ids, payload, yt, last)
    objective = (z_sent * torch.from_numpy(grad).to(rt.device)).sum() + t.defense.loss(x, z, yt)
    if proximal_mu > 0:
        objective = objective + proximal_mu / 2 * sum(
            (p - g).pow(2).sum() for p, g in zip(t.params, t.global_params))
    if not np.isfinite(loss):
        raise FloatingPointError(f"the training loss is {loss} at batch {i} of round {t.round}: "
                                 f"training diverged (is the learning rate {rt.config.lr:g} too high?)")
    objective.backward()
    t.optimizer.step()
    return loss, correct


def _holdout_hits(rt: Runtime, t: Trainee, tail: TailLink) -> int:
    """The client's held-out accuracy count, predicted through the tail as in training."""
    t.head.eval()
    t.defense.eval()
    batches = _batches(t.holdout_ids, 512)
    hits = 0
    with torch.no_grad():
        for j, ids in enumerate(batches):
            payload = t.defense(t.head(rt.inputs(ids))).cpu().numpy()
            final = j == len(batches) - 1
            if t.last_layer is None:
                pred = tail.predict(payload, final)
            else:
                h = tail.embed(payload, final)
                pred = t.last_layer.eval()(torch.from_numpy(h).to(rt.device)).argmax(1).cpu().numpy()
            hits += int((pred == rt.train_y[ids]).sum())
    return hits


def _local_train(rt: Runtime, pid: int, round_: int, head_state: dict[str, np.ndarray], tail: MeteredLink,
                 client_state: dict[str, np.ndarray] | None, proximal_mu: float,
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, float]]:
    t = _set_up(rt, pid, round_, head_state, client_state, proximal_mu)
    failure = planned_failure(rt.config, pid, round_, len(t.train_batches))
    loss_sum = hits = seen = 0.0
    t.head.train()
    t.defense.train()
    no_holdout = len(t.holdout_ids) == 0
    for i, ids in enumerate(t.train_batches):
        if failure is not None and failure[1] == i:
            raise SimulatedFailure(VANISHED if failure[0] == "vanish" else
                                   f"simulated failure: the client crashed before batch {i}")
        loss, correct = _train_step(rt, t, tail, i, no_holdout and i == len(t.train_batches) - 1, proximal_mu)
        loss_sum += loss * len(ids)
        hits += correct
        seen += len(ids)
        if t.defense.wants_epoch_features() and (i + 1) % t.epoch_len == 0:
            _epoch_end(rt, t.head, t.defense, t.train_ids)
    holdout_hits = _holdout_hits(rt, t, tail)
    tail.finish(len(t.train_ids))
    metrics = {
        "num-examples": len(t.train_ids),
        "loss": loss_sum / seen,
        "train-accuracy": hits / seen,
        "accuracy": holdout_hits / len(t.holdout_ids) if len(t.holdout_ids) else float("nan"),
        "holdout-examples": len(t.holdout_ids),
        "partition-id": pid,
        "group": t.group,
        "batches": len(t.train_batches),
        "bytes-sent": tail.sent,
        "bytes-received": tail.received,
    }
    metrics |= {f"defense-{k}": float(v) for k, v in t.defense.report().items()}
    model = state_to_numpy(t.head) | federated_arrays(t.defense)
    if t.last_layer is not None:
        model |= {LAST_PREFIX + k: v for k, v in state_to_numpy(t.last_layer).items()}
    return model, local_arrays(t.defense), metrics


def _ushaped_exchange(tail: TailLink, last_layer: torch.nn.Module, defense: Defense, ids: np.ndarray,
                      payload: np.ndarray, y: torch.Tensor, last: bool) -> tuple[np.ndarray, float, int]:
    """One U-shaped training batch: h from the cloud, the loss on the client (labels stay
    here), dL/dh back, dL/dz in return. Leaves the last layer's gradients accumulated.

    The defense's ``output_loss`` on h (InfoScissors' prediction leakage) is added to the CE
    before the backward pass, so its gradient travels to the cloud inside dL/dh; then
    ``protect_gradient`` (gradient noise) changes what is sent of dL/dh. The client's last
    layer trains on the exact loss either way.
    Returns dL/dz, the CE loss and the hits.
    """
    h_np = tail.forward(ids, payload)
    h = torch.from_numpy(h_np).to(y.device).requires_grad_(True)
    logits = last_layer(h)
    loss = F.cross_entropy(logits, y)
    (loss + defense.output_loss(h, y)).backward()
    assert h.grad is not None  # h is a leaf that requires grad, and backward() just ran
    grad_h = defense.protect_gradient(h.grad).cpu().numpy()
    grad = tail.backward(grad_h, last)
    return grad, float(loss.detach()), int((logits.argmax(1) == y).sum())


def _epoch_end(rt: Runtime, head: torch.nn.Module, defense: Any, train_ids: np.ndarray) -> None:
    """Hand the defense the clean features of the client's training data (CEM's k-means)."""
    head.eval()
    with torch.no_grad():
        feats = torch.cat([head(rt.inputs(b)) for b in _batches(train_ids, 512)])
    defense.on_epoch_end(feats, torch.from_numpy(rt.train_y[train_ids]).to(rt.device))
    head.train()
