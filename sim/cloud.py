"""The cloud: the tail's compute and the adversary's recording, as a plain class and a Ray actor.

:class:`CloudSession` is the one place that runs the tail on received features and records
them: one client's exchange with the cloud during one round. Where it runs depends on the
protocol:

* ``sflv1`` (a tail copy per client, averaged after the round): the session runs co-located in
  the client's actor on a copy of the global tail (no per-batch remote call), then
  :meth:`CloudActor.submit` hands the copy and the recorded features to the cloud actor.
* ``sflv2`` (one shared tail): every batch goes to the cloud actor, which serves the clients of
  a wave in a seeded round-robin order, so the shared tail sees batches in an order fixed by the
  seed rather than by which actor happens to call first. A batch is one :meth:`CloudActor.exchange`:
  through the cloud's channel (:mod:`sim.channel`) from client actors on its node, as a Ray
  actor call from the others.

In the U-shaped split the client keeps the last layer: a batch is two exchanges, ``forward``
(z in, the tail's output h back) and ``backward`` (dL/dh in, dL/dz back, the tail stepped), and
no label is ever sent to the cloud. The cloud records dL/dh with the batch's z, on the same
reservoir rows: it reveals the labels all the same (:mod:`attacks.gradlabel`). Two calls are
needed because the client can only compute dL/dh after it has h; an SFL-v2 client holds its
turn between them, so no other client's step changes the shared tail while its graph is
pending. (Merging a batch's backward into the next batch's forward would save one call but
train the head one step stale. Measured through the actor on 2 busy cores, small model, batch
32, median of 250 batches: 17.1 ms per batch for the vanilla single call, 19.4 ms for the
U-shaped pair, 1.14x.)
"""

from __future__ import annotations

import asyncio
import secrets
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import ray
import torch
import torch.nn.functional as F
from torch import nn

from attacks.completion import MaliciousOptimizer
from attacks.fsha import Hijacker
from sim import channel
from sim.config import HIJACK_SALT, RESERVOIR_SALT, derive_seed
from sim.models import SplitSpec, build_tail, load_numpy_state, state_to_numpy
from sim.records import wire_bytes
from sim.view import ClientView, FeatureStore, Reservoir


def make_optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
    """The optimiser of heads and tails alike (Adam, as in the calibration runs: docs/calibration.md)."""
    return torch.optim.Adam(params, lr=lr)


def make_tail_optimizer(params: Any, lr: float, adversary: str) -> Any:
    """The cloud's tail optimiser: the honest one, or wrapped in Fu et al.'s MaliciousSGD
    scaling when the cloud is an active adversary (it then trains its tail to learn more of
    the task, for a stronger model completion afterwards)."""
    optimizer = make_optimizer(params, lr)
    return MaliciousOptimizer(optimizer) if adversary == "active" else optimizer


class CloudSession:
    """One client's exchange with a tail in one round: train steps, predictions, the record.

    Vanilla split: ``train_batch`` (z and labels in, dL/dz out) and ``predict``. U-shaped
    split: ``forward`` then ``backward`` per training batch, and ``embed`` for inference.
    With a ``hijacker`` (``--adversary hijack``) ``train_batch`` answers with FSHA's
    adversarial gradient instead, and the tail is not trained (:mod:`attacks.fsha`).
    """

    def __init__(self, tail: nn.Module, optimizer: Any, reservoir: Reservoir,
                 hijacker: Hijacker | None = None, defer_step: bool = False) -> None:
        self.tail = tail
        self.defer_step = defer_step  # leave each tail step for settle(): the caller answers first
        self.step_due = False
        self.device = next(tail.parameters()).device
        self.optimizer = optimizer
        self.reservoir = reservoir
        self.hijacker = hijacker
        self.bytes_received = 0
        self.bytes_sent = 0
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # U-shaped: (z, h)

    def train_batch(self, sample_ids: np.ndarray, z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float, int]:
        """Record z, run the tail, step it, and return dL/dz with the batch loss and hits."""
        self.reservoir.add(sample_ids, z)
        self.bytes_received += wire_bytes(z, y)
        if self.hijacker is not None:
            return self._hijacked_batch(z, y)
        zt = torch.from_numpy(z).to(self.device).requires_grad_(True)
        yt = torch.from_numpy(y).to(self.device)
        self.tail.train()
        out = self.tail(zt)
        loss = F.cross_entropy(out, yt)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._step()
        assert zt.grad is not None  # zt is a leaf that requires grad, and backward() just ran
        grad = zt.grad.cpu().numpy()
        self.bytes_sent += wire_bytes(grad)
        return grad, float(loss.detach()), int((out.argmax(1) == yt).sum())

    def _hijacked_batch(self, z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float, int]:
        """FSHA's gradient for the client; the loss and hits it reports are the untrained
        tail's, so the client sees its task fail (FSHA's tell-tale sign)."""
        assert self.hijacker is not None  # train_batch calls this only with a hijacker
        grad = self.hijacker.hijack(z)
        self.bytes_sent += wire_bytes(grad)
        with torch.no_grad():
            out = self.tail.eval()(torch.from_numpy(z).to(self.device))
            yt = torch.from_numpy(y).to(self.device)
            return grad, float(F.cross_entropy(out, yt)), int((out.argmax(1) == yt).sum())

    def forward(self, sample_ids: np.ndarray, z: np.ndarray) -> np.ndarray:
        """U-shaped: record z, run the tail in training mode and return its output h.

        The graph is kept until :meth:`backward` brings dL/dh for the same batch.
        """
        self.reservoir.add(sample_ids, z)
        self.bytes_received += wire_bytes(z)
        zt = torch.from_numpy(z).to(self.device).requires_grad_(True)
        self.tail.train()
        h = self.tail(zt)
        self._pending = (zt, h)
        out = h.detach().cpu().numpy()
        self.bytes_sent += wire_bytes(out)
        return out

    def backward(self, grad_h: np.ndarray) -> np.ndarray:
        """U-shaped: record the client's dL/dh with the batch's z, back-propagate it, step the
        tail, return dL/dz."""
        if self._pending is None:
            raise RuntimeError("backward() without a forward() for the batch")
        zt, h = self._pending
        self._pending = None
        self.reservoir.attach(grad_h)
        self.bytes_received += wire_bytes(grad_h)
        self.optimizer.zero_grad(set_to_none=True)
        h.backward(torch.from_numpy(grad_h).to(self.device))
        self._step()
        assert zt.grad is not None  # zt is a leaf that requires grad, and backward() just ran
        grad = zt.grad.cpu().numpy()
        self.bytes_sent += wire_bytes(grad)
        return grad

    def _step(self) -> None:
        if self.defer_step:
            self.step_due = True
        else:
            self.optimizer.step()

    def settle(self) -> None:
        """Take the tail step a deferred ``train_batch`` or ``backward`` left due (its gradients
        are kept until then: nothing may run the tail or zero them in between)."""
        if self.step_due:
            self.optimizer.step()
            self.step_due = False

    @torch.no_grad()
    def predict(self, z: np.ndarray) -> np.ndarray:
        """Class predictions for features (the client's held-out accuracy); not recorded."""
        self.tail.eval()
        return self.tail(torch.from_numpy(z).to(self.device)).argmax(1).cpu().numpy()

    @torch.no_grad()
    def embed(self, z: np.ndarray) -> np.ndarray:
        """U-shaped inference: the tail's output h for features (the client classifies it)."""
        self.tail.eval()
        return self.tail(torch.from_numpy(z).to(self.device)).cpu().numpy()

    def view(self, partition_id: int, group: int, cut: int, round_: int,
             feature_shape: tuple[int, ...], failed: bool = False) -> ClientView:
        ids, z = self.reservoir.arrays(feature_shape)
        return ClientView(partition_id, group, cut, round_, ids, z, self.reservoir.seen,
                          self.bytes_received, self.bytes_sent, failed, self.reservoir.grad_array())


def average_states(states: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """Weighted mean of float states, summed in the given order (callers sort for determinism)."""
    total = float(sum(weights))
    # cast: sum() types an empty sum as 0, and states is not empty
    return {k: cast(np.ndarray, sum(s[k] * (w / total) for s, w in zip(states, weights))).astype(np.float32)
            for k in states[0]}


EXCHANGES = ("train_batch", "predict", "forward", "backward", "embed")  # what a client asks per batch


@dataclass
class _Pending:
    """An SFL-v1 client's round result, held until the server closes the round."""

    cut: int
    state: dict[str, np.ndarray] | None  # None: the client failed before finishing its round
    num_examples: int
    view: ClientView


@ray.remote(num_cpus=0)
class CloudActor:
    """The cloud as a named Ray actor: global tails, the SFL-v2 shared tail, the recorded view.

    It asks for no CPU of its own: Flower sizes its client actor pool from the cluster's total
    CPUs, and a cloud holding a CPU would starve that pool: a cloud actor asking for one CPU hung forever.
    """

    def __init__(self, setup: dict[str, Any], tails: dict[int, dict[str, np.ndarray]], store_dir: str) -> None:
        torch.set_num_threads(1)
        self._setup = setup
        cfg = setup["config"]
        self.seed, self.lr, self.capacity = cfg["seed"], cfg["lr"], cfg["reservoir"]
        adversary = cfg.get("adversary", "passive")
        self.specs = {cut: SplitSpec(**spec) for cut, spec in setup["specs"].items()}
        # FSHA's malicious cloud (attacks.fsha): one hijacker per cut, on the public aux images
        aux_x = ray.get(setup["aux_x"]) if adversary == "hijack" else None
        self.hijackers = {cut: Hijacker(self.specs[cut], aux_x, setup["mean"], setup["std"],
                                        derive_seed(self.seed, cut, HIJACK_SALT), setup["device"])
                          for cut in tails} if aux_x is not None else {}
        self.tails: dict[int, nn.Module] = {}
        self.optimizers: dict[int, Any] = {}
        for cut, state in tails.items():
            self.tails[cut] = build_tail(self.specs[cut])
            load_numpy_state(self.tails[cut], state)
            self.tails[cut].to(setup["device"])
            self.optimizers[cut] = make_tail_optimizer(self.tails[cut].parameters(), self.lr, adversary)
        self.store = FeatureStore(Path(store_dir))
        self.pending: dict[int, _Pending] = {}
        # SFL-v2 turn-taking state: the open wave's order and turn, the waves queued behind it,
        # and the clients of the open and queued waves that have called (or were dropped).
        self._order: list[int] = []
        self._turn = 0
        self._cond = asyncio.Condition()
        self._sessions: dict[int, tuple[CloudSession, int, int, int]] = {}
        self._waves: deque[tuple[int, list[tuple[int, int, int]]]] = deque()
        self._arrived: set[int] = set()
        self._dropped: set[int] = set()  # dropped from this round's waves: their calls are refused
        self._channel: dict[str, Any] | None = None  # the channel's node, address and token, once open
        self._server: asyncio.AbstractServer | None = None
        self._channel_tried = False
        self._unsettled: CloudSession | None = None  # the session whose tail step is due

    async def setup(self) -> dict[str, Any]:
        """The run's config and the object refs of the shared data, for client actors, and
        how to reach the channel (:mod:`sim.channel`; None where it is not available), which
        the first call opens."""
        async with self._cond:
            if not self._channel_tried and channel.AVAILABLE:
                self._channel_tried = True
                addr, token = channel.address(), secrets.token_bytes(channel.TOKEN_BYTES)
                try:
                    self._server = await channel.serve(addr, token, self._serve, after=self._settle)
                except OSError as exc:  # e.g. a sandbox without Unix sockets: Ray calls still work
                    print(f"warning: the cloud's channel did not open ({exc}); clients call it through Ray",
                          file=sys.stderr)
                else:
                    self._channel = {"node": ray.get_runtime_context().get_node_id(), "address": addr,
                                     "token": token}
        return self._setup | {"channel": self._channel}

    async def tail_state(self, cut: int) -> dict[str, np.ndarray]:
        return state_to_numpy(self.tails[cut])

    # ------------------------------------------------------------------------------ SFL-v1

    async def submit(self, partition_id: int, cut: int, state: dict[str, np.ndarray] | None,
                     num_examples: int, view: ClientView) -> None:
        """An SFL-v1 client's trained tail copy and what the cloud recorded of it; a client
        that failed mid-round submits no tail, only what the cloud had received."""
        self.pending[partition_id] = _Pending(cut, state, num_examples, view)

    async def end_round(self, completed: list[int]) -> None:
        """Average the tail copies of the clients that completed the round; keep their views.

        The tail copies of the other clients (failed, or no reply before the timeout) are
        discarded; what the cloud received from them is kept, marked as from a failed round.
        """
        done = [p for p in sorted(completed) if p in self.pending and self.pending[p].state is not None]
        for cut in sorted({self.pending[p].cut for p in done}):
            members = [self.pending[p] for p in done if self.pending[p].cut == cut]
            states = cast(list[dict[str, np.ndarray]], [m.state for m in members])  # done: those with a state
            avg = average_states(states, [m.num_examples for m in members])
            load_numpy_state(self.tails[cut], avg)
        for p in sorted(self.pending):
            view = self.pending[p].view
            view.failed = p not in done
            self.store.put(view)
        self.pending.clear()

    # ------------------------------------------------------------------------------ SFL-v2

    async def begin_wave(self, round_: int, wave: list[tuple[int, int, int]]) -> None:
        """Queue a wave of (partition id, group, cut); batches are served round-robin in order.

        The wave opens when the waves queued before it are done, so the server may push its
        messages early and its clients wait here, in their actors, instead of in Flower's queue
        (:meth:`wait_arrived`); the shared tail still sees the same seeded batch order.
        """
        async with self._cond:
            self._arrived.difference_update(pid for pid, _, _ in wave)
            self._dropped.difference_update(pid for pid, _, _ in wave)
            self._waves.append((round_, list(wave)))
            self._open_next()
            self._cond.notify_all()

    def _open_next(self) -> None:
        """Open the next queued wave once the open one is done (callers hold the condition)."""
        while not self._order and self._waves:
            round_, wave = self._waves.popleft()
            if not wave:
                continue
            torch.manual_seed(derive_seed(self.seed, round_, wave[0][0], RESERVOIR_SALT))
            self._order = [pid for pid, _, _ in wave]
            self._turn = 0
            for pid, group, cut in wave:
                session = CloudSession(self.tails[cut], self.optimizers[cut],
                                       Reservoir(self.capacity, derive_seed(self.seed, round_, pid, RESERVOIR_SALT)),
                                       self.hijackers.get(cut), defer_step=True)
                self._sessions[pid] = (session, group, cut, round_)

    async def wait_arrived(self, pids: list[int]) -> None:
        """Return once each client of ``pids`` has made its first call or was dropped: they
        then hold their actors, so the next wave's messages cannot take an actor one of them
        still needs (which would deadlock the turn order)."""
        async with self._cond:
            await self._cond.wait_for(lambda: self._arrived.issuperset(pids))

    async def _call(self, pid: int, last: bool, fn: Any, keep_turn: bool = False) -> Any:
        """Run ``fn`` on the client's session in its turn; then pass the turn on, unless
        ``keep_turn`` (a U-shaped forward whose backward must follow on the same tail)."""
        async with self._cond:
            if pid not in self._arrived:
                self._arrived.add(pid)
                self._cond.notify_all()
            await self._cond.wait_for(lambda: pid in self._dropped or (self._order and self._order[self._turn] == pid))
            if pid in self._dropped:  # e.g. after a timeout: its calls are refused
                raise RuntimeError(f"client {pid} was dropped from the cloud's wave (after a timeout?)")
            self._settle()
            session = self._sessions[pid][0]
            result = fn(session)
            self._unsettled = session
            if last and not keep_turn:
                self._order.pop(self._turn)
                _, group, cut, round_ = self._sessions.pop(pid)
                self.store.put(session.view(pid, group, cut, round_, self.specs[cut].feature_shape))
                if self._turn >= len(self._order):
                    self._turn = 0
                self._open_next()
            elif not keep_turn:
                self._turn = (self._turn + 1) % len(self._order)
            self._cond.notify_all()
            return result

    async def drop(self, pid: int) -> None:
        """Take a failed client out of its wave so the others are not kept waiting for it.

        What the cloud received from it this round is kept, marked as from a failed round;
        the batches it already sent have updated the shared tail, as they would have on a
        real SFL-v2 server. Dropping a client twice, or one that finished, does nothing.
        """
        async with self._cond:
            self._arrived.add(pid)
            for _, wave in self._waves:
                wave[:] = [w for w in wave if w[0] != pid]
            if pid in self._order:
                i = self._order.index(pid)
                self._order.pop(i)
                if i < self._turn:
                    self._turn -= 1
                if self._turn >= len(self._order):
                    self._turn = 0
            if pid in self._sessions:
                session, group, cut, round_ = self._sessions.pop(pid)
                self.store.put(session.view(pid, group, cut, round_, self.specs[cut].feature_shape, failed=True))
            self._dropped.add(pid)
            self._open_next()
            self._cond.notify_all()

    async def exchange(self, method: str, pid: int, arrays: list[np.ndarray], last: bool = False
                       ) -> list[np.ndarray]:
        """A client's request in its turn, as an actor call (from client actors on other nodes;
        those on this node use the channel, :meth:`_serve`): the :class:`CloudSession` method
        ``method`` (one of :data:`EXCHANGES`) on ``arrays``, its result as arrays."""
        result = await self._exchange(method, pid, arrays, last)
        self._settle()
        return result

    async def _exchange(self, method: str, pid: int, arrays: list[np.ndarray], last: bool) -> list[np.ndarray]:
        """:meth:`exchange`, leaving the tail's step due (:meth:`_settle`)."""
        if method not in EXCHANGES:
            raise ValueError(f"no exchange {method!r}; the cloud answers {', '.join(EXCHANGES)}")
        result = await self._call(pid, last, lambda s: getattr(s, method)(*arrays), keep_turn=method == "forward")
        return [np.asarray(r) for r in (result if isinstance(result, tuple) else (result,))]

    async def _serve(self, header: dict[str, Any], arrays: list[np.ndarray]) -> tuple[dict[str, Any], list[np.ndarray]]:
        """The channel's handler: one exchange; the channel settles the step once it has
        written the answer."""
        return {}, await self._exchange(str(header["method"]), int(header["pid"]), arrays, bool(header["last"]))

    def _settle(self) -> None:
        """Take the shared tail's step the last exchange left due. SFL-v2 sessions defer it so
        that the client has dL/dz a step's time earlier (the channel answers, then settles); it
        is taken before the tail is next run or read, so the numbers are those of stepping at
        once."""
        if self._unsettled is not None:
            self._unsettled.settle()
            self._unsettled = None

    # ------------------------------------------------------------------------------ results

    async def save_view(self, path: str) -> None:
        """Write everything recorded so far (completed and failed rounds) as ``view.npz``."""
        self.store.save(path)

    async def all_tail_states(self) -> dict[int, dict[str, np.ndarray]]:
        self._settle()
        return {cut: state_to_numpy(t) for cut, t in self.tails.items()}

    async def attack_models(self) -> dict[int, dict[str, dict[str, np.ndarray]]]:
        """Per cut, the networks the cloud trained for its attacks (FSHA's inverse network);
        empty for an honest cloud."""
        return {cut: h.attack_models() for cut, h in self.hijackers.items()}

    # ------------------------------------------------------------------------------ checkpoints

    async def flush(self, round_: int) -> int:
        """Write the views recorded in round ``round_`` to their shard (before :meth:`state`);
        the bytes written."""
        return self.store.flush(round_)

    async def prune(self) -> None:
        """Drop the view shards the last checkpoint no longer points to."""
        self.store.prune()

    async def state(self) -> dict[str, Any]:
        """Everything the cloud holds between rounds: tails, their optimisers, the view's index
        (its arrays are in the shards :meth:`flush` wrote), and
        a hijacking cloud's FSHA networks (tensors, as the optimisers' states)."""
        return {"tails": await self.all_tail_states(),
                "optimizers": {cut: o.state_dict() for cut, o in self.optimizers.items()},
                "store": self.store.state(),
                "hijackers": {cut: h.state() for cut, h in self.hijackers.items()}}

    async def load_state(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state` (as read back from a checkpoint)."""
        for cut, tail in self.tails.items():
            load_numpy_state(tail, state["tails"][cut])
            self.optimizers[cut].load_state_dict(state["optimizers"][cut])
        for cut, hijacker in self.hijackers.items():
            hijacker.load_state(state["hijackers"][cut])
        self.store.load_state(state["store"])
