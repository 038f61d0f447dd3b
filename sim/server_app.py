"""The Flower ServerApp: rounds of sampled clients, per-group head aggregation, evaluation.

Each client group has its own Flower Message-API strategy, driven through its own
``configure_train`` / ``aggregate_train`` with a view of the Grid that lists only the group's
nodes in partition order; Python's ``random`` is seeded per round, so the strategies' own node
sampling is reproducible although Flower's node ids are random. Messages of all groups go out
together; replies are routed back by partition id.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import ray
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from defenses.client_model import build_client_last, build_client_model
from sim import checkpoint
from sim.client import VANISHED
from sim.client_app import CLIENT_STATE
from sim.config import ROUND_SALT, SimConfig, derive_seed
from sim.models import SplitSpec, build_tail, load_numpy_state
from sim.records import failure_counts, from_record, to_record
from strategies import resolve_strategy
from strategies.state import load_strategy_state, strategy_state

PULL_INTERVAL = 0.05
# Asking every node its partition id: 10,000 nodes take minutes on 2 cores (170 s to over 300 s
# measured), so the server gives up only when none has answered for this long.
QUERY_PATIENCE = 300.0


class RunFailure(RuntimeError):
    """The federation cannot go on (e.g. every client of a round failed); one line for the user."""


@dataclass
class ServerPlan:
    """What ``sim.run`` hands the ServerApp: the config and the server-side data."""

    config: SimConfig
    run_dir: Path
    cloud: Any  # the cloud actor's handle
    cloud_name: str
    namespace: str
    specs: dict[int, SplitSpec]
    init_heads: list[dict[str, np.ndarray]]  # per group
    eval_x: torch.Tensor  # normalised evaluation inputs
    eval_y: torch.Tensor
    num_actors: int
    reporter: Any  # sim.progress.Reporter
    resume: dict[str, Any] | None = None  # a checkpoint to go on from (sim.checkpoint.load)
    outcome: dict[str, Any] = field(default_factory=dict)


class GroupGrid:
    """A Grid as one group's strategy should see it: only that group's nodes, in pid order."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid = grid
        self._node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


# How long a restarting client actor may take to come back (a fresh worker imports torch and
# Flower, slow on a loaded machine) before the run stops instead of going on without it.
ACTOR_RECOVERY_S = 300.0


def await_client_actors(r: int, timeout: float = ACTOR_RECOVERY_S) -> None:
    """Before round ``r``: every client actor of this job is alive, or the run stops.

    Ray restarts a dead client actor (``sim.experiment.ACTOR_RESTARTS``), but a client sent to it while
    it restarts fails at once; waiting here keeps every round after the one it died in at full
    strength. An actor that is dead for good (restarts used up) or not back in ``timeout`` raises
    ``RunFailure``: the run stops with the checkpoint of round ``r - 1``, resumable, rather than
    going on with fewer actors. The actor table is the GCS's (``ray._private.state``), the only
    one that works with the dashboard off; a ServerApp in another job (``flwr run``) sees none.
    """
    from ray._private import state

    job = ray.get_runtime_context().get_job_id()
    deadline = time.monotonic() + timeout
    while True:
        states = [a["State"] for a in state.actors().values()
                  if a.get("ActorClassName") == "ClientAppActor" and a.get("JobID") == job]
        dead = states.count("DEAD")
        if dead:
            raise RunFailure(f"round {r}: {dead} of {len(states)} client actors died for good (restarted "
                             "too often); the actor pool cannot recover")
        if all(s == "ALIVE" for s in states):
            return
        if time.monotonic() > deadline:
            waiting = len(states) - states.count("ALIVE")
            raise RunFailure(f"round {r}: {waiting} of {len(states)} client actors not back {timeout:.0f} s "
                             "after they died; the actor pool cannot recover")
        time.sleep(0.5)


def lost(reply: Message) -> bool:
    """A reply that stands for none: a client that vanished (``--client-failure-rate``)
    reports so only to let its actor go on at once; the server must not hear of it."""
    return reply.has_error() and VANISHED in (reply.error.reason or "")


def exchange(grid: Grid, messages: list[Message], timeout: float | None,
             on_reply: Callable[[Message], None], idle: bool = False) -> list[Message]:
    """Push messages and pull replies until all are in or ``timeout`` passes (with ``idle``:
    ``timeout`` without any reply, for exchanges whose length grows with the number of nodes).

    A lost reply (see :func:`lost`) is dropped as if never sent: its message stays pending,
    so the server waits for it until the timeout, as it would for a client that vanished.
    """
    if not messages:
        return []
    pending = set(grid.push_messages(messages))
    waiting = set(pending)  # pending replies that can still arrive
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while pending and (deadline is None or time.monotonic() < deadline):
        for reply in grid.pull_messages(list(waiting)):
            waiting.discard(reply.metadata.reply_to_message_id)
            if idle and timeout is not None:
                deadline = time.monotonic() + timeout
            if lost(reply):
                continue
            pending.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)
            on_reply(reply)
        if pending and not waiting:  # only vanished clients left: nothing comes before the deadline
            assert deadline is not None  # clients vanish only with --client-failure-rate, which needs a timeout
            time.sleep(max(0.0, deadline - time.monotonic()))
        elif pending:
            time.sleep(PULL_INTERVAL)
    return replies


def run_waves(grid: Grid, cloud: Any, r: int, waves: list[tuple[list[Message], list[tuple[int, int, int]]]],
              timeout: float | None, on_reply: Callable[[Message], None],
              pid_of: dict[int, int]) -> list[Message]:
    """SFL-v2: run the round's waves one after another on the cloud, without idle actors between.

    Each wave is queued at the cloud (``begin_wave``), which serves the waves in order. The next
    wave's messages are pushed as soon as every client of the current wave holds an actor
    (``wait_arrived``): they then wait in Flower's queue and start the moment an actor frees, so
    neither Flower's dispatch delay nor the reply's way back leaves the actors idle between
    waves. Pushing earlier could hand the next wave an actor that a client of the current wave
    still needs, and the turn order would wait forever. ``timeout`` counts for each wave from
    when the previous one is done, as if the waves ran strictly one after another; a client
    that has not replied by then is dropped from the cloud's turn order and from the replies.
    """
    pending: dict[str, int] = {}  # message id -> wave index, for replies that can still arrive
    left = [0] * len(waves)  # replies still due per wave
    deadline: list[float | None] = [None] * len(waves)
    replies: list[Message] = []
    arrived: Any = None  # the cloud's wait_arrived for the last pushed wave
    pushed = 0
    while pushed < len(waves) or any(left):
        if pushed < len(waves) and (arrived is None or not ray.wait([arrived], timeout=0)[1]):
            msgs, members = waves[pushed]
            ray.get(cloud.begin_wave.remote(r, members))
            for mid in grid.push_messages(msgs):
                pending[mid] = pushed
            left[pushed] = len(msgs)
            arrived = cloud.wait_arrived.remote([p for p, _, _ in members])
            pushed += 1
            continue
        for reply in grid.pull_messages(list(pending)):
            k = pending.pop(reply.metadata.reply_to_message_id, None)
            if k is not None and not lost(reply):  # a lost one stays due until the timeout
                left[k] -= 1
                replies.append(reply)
                on_reply(reply)
        now = time.monotonic()
        current = next((k for k in range(pushed) if left[k]), None)
        if current is not None and timeout is not None:
            due = deadline[current]
            if due is None:
                deadline[current] = now + timeout
            elif now > due:  # give up on the wave's missing clients
                for mid in [m for m, k in pending.items() if k == current]:
                    del pending[mid]
                left[current] = 0
                done = {pid_of[m.metadata.src_node_id] for m in replies}
                for _, (pid, _, _) in zip(*waves[current]):
                    if pid not in done:
                        ray.get(cloud.drop.remote(pid))
                continue
        if pushed < len(waves):
            ray.wait([arrived], timeout=PULL_INTERVAL)
        elif any(left):
            time.sleep(PULL_INTERVAL)
    return replies


def _wait_for_nodes(grid: Grid, n: int, timeout: float = 120.0) -> list[int]:
    """Flower's ``main`` can start before the simulated nodes register (docs/flower-ray.md, pitfall 1)."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < n:
        if time.monotonic() > deadline:
            raise RunFailure(f"only {len(nodes)} of {n} simulated nodes registered in {timeout:.0f} s")
        time.sleep(0.2)
    return nodes


def _map_partitions(grid: Grid, n: int) -> dict[int, int]:
    """partition id -> node id, asked once of every node (Flower's node ids are random)."""
    nodes = _wait_for_nodes(grid, n)
    msgs = [Message(RecordDict({}), dst_node_id=node, message_type="query") for node in nodes]
    replies = exchange(grid, msgs, QUERY_PATIENCE, lambda _: None, idle=True)
    mapping = {}
    for reply in replies:
        if reply.has_error():
            raise RunFailure(f"node {reply.metadata.src_node_id} failed to start: {reply.error.reason}")
        info: Mapping[str, Any] = reply.content["info"]  # the ConfigRecord of client_app.query
        mapping[int(info["partition-id"])] = reply.metadata.src_node_id
    if len(replies) < n:
        raise RunFailure(f"{len(replies)} of {n} simulated nodes told their partition id, then none "
                         f"answered for {QUERY_PATIENCE:.0f} s")
    if sorted(mapping) != list(range(n)):
        raise RunFailure(f"expected partition ids 0..{n - 1}, got {len(mapping)} distinct ones")
    return mapping


@torch.no_grad()
def evaluate_group(spec: SplitSpec, head_state: dict[str, np.ndarray], tail_state: dict[str, np.ndarray],
                   defense_text: str, x: torch.Tensor, y: torch.Tensor) -> float:
    """Test accuracy of one group's head with the cloud's tail, the defense on as in use, and
    in the U-shaped split the client's last layer after the tail."""
    head, defense = build_client_model(spec, defense_text, head_state, {})
    tail = build_tail(spec)
    load_numpy_state(tail, tail_state)
    last = build_client_last(spec, head_state) or torch.nn.Identity()
    for m in (head, tail, defense, last):
        m.eval()
    hits = sum(int((last(tail(defense(head(xb)))).argmax(1) == yb).sum())
               for xb, yb in zip(x.split(1000), y.split(1000)))
    return hits / len(y)


class Federation:
    """The round loop of one run.

    After every round (and once before the first) the whole state of the run is written to
    the run directory's checkpoint (:mod:`sim.checkpoint`); a run resumed from it goes on
    from the next round with the same numbers as if it had never stopped.
    """

    def __init__(self, grid: Grid, plan: ServerPlan) -> None:
        self.grid, self.plan, self.cfg = grid, plan, plan.config
        self.cloud = plan.cloud
        self.groups = self.cfg.resolved_groups()
        group_of = self.cfg.group_of()
        self.members = [[p for p in range(self.cfg.clients) if group_of[p] == g]
                        for g in range(len(self.groups))]
        self.strategies = [
            resolve_strategy(g.strategy, {
                "fraction_train": self.cfg.fraction, "fraction_evaluate": 0.0,
                "min_train_nodes": 1, "min_available_nodes": len(self.members[i]),
            }) for i, g in enumerate(self.groups)]
        self.heads = [to_record(h) for h in plan.init_heads]
        # the heads the latest round started from: a white-box cloud sent them to the clients,
        # and the features it recorded early in that round come from them
        self.start_heads = list(self.heads)
        # each client's own persistent state, by partition id, on disk (round shards)
        self.client_states = checkpoint.RoundShards(plan.run_dir / checkpoint.SHARDS / "clients")
        self.records: list[dict[str, Any]] = []
        self.plan.outcome["rounds"] = self.records

    def run(self) -> None:
        node_of = _map_partitions(self.grid, self.cfg.clients)
        self.pid_of = {node: pid for pid, node in node_of.items()}
        self.node_of = node_of
        metrics_path = self.plan.run_dir / "metrics.jsonl"
        if self.plan.resume is not None:
            self._restore(self.plan.resume)
        else:
            self._checkpoint(0)
        # metrics.jsonl holds exactly the checkpointed rounds (a killed run may have written
        # the line of a round whose checkpoint it did not finish)
        metrics_path.write_text("".join(json.dumps(rec) + "\n" for rec in self.records))
        for r in range(len(self.records) + 1, self.cfg.rounds + 1):
            await_client_actors(r)
            record = self._round(r)
            self.records.append(record)
            every = self.cfg.attack_every
            if every and r % every == 0 and r < self.cfg.rounds:
                self._save(self.plan.run_dir / "rounds" / f"r{r:03d}")
            t0 = time.perf_counter()
            written = self._checkpoint(r)
            cost = {"round": r, "bytes": written, "seconds": round(time.perf_counter() - t0, 4)}
            with (self.plan.run_dir / "checkpoints.jsonl").open("a") as f:
                f.write(json.dumps(cost) + "\n")
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            self.plan.reporter.round_finished(record)
        self._save(self.plan.run_dir)

    def _checkpoint(self, r: int) -> int:
        """Write everything needed to go on after round ``r`` (0: before the first): the round's
        shards (the views and client states it changed), then the small state that indexes
        them; the shards no checkpoint points to any more go once it is safely written.
        Returns the bytes written."""
        written = ray.get(self.cloud.flush.remote(r)) + self.client_states.flush(r)
        written += checkpoint.save(self.plan.run_dir, checkpoint.encode({
            "round": r,
            "heads": [from_record(h) for h in self.heads],
            "start_heads": [from_record(h) for h in self.start_heads],
            "strategies": [strategy_state(s) for s in self.strategies],
            "client_states": self.client_states.state(),
            "cloud": ray.get(self.cloud.state.remote()),
            "rng": checkpoint.rng_state(),
            "metrics": json.dumps(self.records),
        }))
        ray.get(self.cloud.prune.remote())
        self.client_states.prune()
        return written

    def _restore(self, state: dict[str, Any]) -> None:
        """Put a checkpoint's state back: server side here, the cloud's in the cloud actor."""
        self.heads = [to_record(h) for h in checkpoint.decode(state["heads"])]
        self.start_heads = [to_record(h) for h in checkpoint.decode(state.get("start_heads", state["heads"]))]
        for strategy, saved in zip(self.strategies, checkpoint.decode(state["strategies"])):
            load_strategy_state(strategy, saved)
        self.client_states.load_state(state["client_states"])
        cloud = state["cloud"]
        ray.get(self.cloud.load_state.remote({
            "tails": checkpoint.decode(cloud["tails"]), "optimizers": cloud["optimizers"],
            "store": checkpoint.decode(cloud["store"]), "hijackers": cloud.get("hijackers", {})}))
        checkpoint.set_rng_state(state["rng"])
        self.records[:] = json.loads(state["metrics"])

    def _configure(self, r: int) -> list[Message]:
        random.seed(derive_seed(self.cfg.seed, r, ROUND_SALT))
        messages = []
        for g, strategy in enumerate(self.strategies):
            grid = GroupGrid(self.grid, [self.node_of[p] for p in self.members[g]])
            config = ConfigRecord({"round": r, "cloud": self.plan.cloud_name,
                                   "namespace": self.plan.namespace})
            # a GroupGrid stands in for the Grid: it delegates all but get_node_ids to it
            messages += list(strategy.configure_train(r, self.heads[g], config, cast(Grid, grid)))
        for m in messages:
            own = self.client_states.get(str(self.pid_of[m.metadata.dst_node_id]))
            if own:
                m.content[CLIENT_STATE] = to_record(own)
        return messages

    def _send(self, r: int, messages: list[Message]) -> list[Message]:
        """SFL-v1: all at once. SFL-v2: in waves of one client per actor, served in seeded order."""
        timeout = self.cfg.round_timeout
        on_reply = self.plan.reporter.client_done
        if self.cfg.protocol == "sflv1":
            return exchange(self.grid, messages, timeout, on_reply)

        def on_reply_v2(reply: Message) -> None:
            if reply.has_error():  # free the wave's turn order from a client that died
                self.cloud.drop.remote(self.pid_of[reply.metadata.src_node_id])
            on_reply(reply)

        order = np.random.default_rng(derive_seed(self.cfg.seed, r, ROUND_SALT)).permutation(len(messages))
        messages = [messages[i] for i in order]
        group_of = self.cfg.group_of()
        waves = []
        for start in range(0, len(messages), self.plan.num_actors):
            wave = messages[start:start + self.plan.num_actors]
            pids = [self.pid_of[m.metadata.dst_node_id] for m in wave]
            waves.append((wave, [(p, group_of[p], self.groups[group_of[p]].cut) for p in pids]))
        return run_waves(self.grid, self.cloud, r, waves, timeout, on_reply_v2, self.pid_of)

    def _round(self, r: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        messages = self._configure(r)
        sampled = sorted(self.pid_of[m.metadata.dst_node_id] for m in messages)
        self.plan.reporter.round_started(r, len(messages))
        replies = self._send(r, messages)
        by_pid = {self.pid_of[m.metadata.src_node_id]: m for m in replies}
        ok = sorted(p for p, m in by_pid.items() if not m.has_error())
        failed = {p: (_reason(by_pid[p]) if p in by_pid else "no reply before the timeout")
                  for p in sampled if p not in ok}
        if self.cfg.protocol == "sflv1":
            ray.get(self.cloud.end_round.remote(ok))
        if not ok:
            raise RunFailure(f"round {r}: every sampled client failed; first error: "
                             f"{next(iter(failed.values()))}")
        failures = failure_counts(self.records)
        for p in failed:
            failures[p] = failures.get(p, 0) + 1
        for p in ok:  # the client's own state comes back with a successful reply only
            own = by_pid[p].content.pop(CLIENT_STATE, None)
            if own is not None:
                self.client_states.put(str(p), from_record(cast(ArrayRecord, own)))  # client_app.train's
        clients, strategy_metrics = [], {}
        self.start_heads = list(self.heads)
        for g, strategy in enumerate(self.strategies):
            group_replies = [by_pid[p] for p in ok if p in self.members[g]]
            if group_replies:
                arrays, aggregated = strategy.aggregate_train(r, group_replies)
                if arrays is not None:
                    self.heads[g] = arrays
                if aggregated is not None:  # what the strategy itself reports (e.g. clipping)
                    strategy_metrics[self.groups[g].name] = dict(aggregated)
            for m in group_replies:
                record = _client_record(m, self.groups[g].name)
                clients.append(record | {"failures": failures.get(record["partition_id"], 0)})
        accuracy, group_accuracy = self._evaluate(r)
        return {
            "round": r,
            "accuracy": accuracy,
            "group_accuracy": group_accuracy,
            "sampled": len(sampled),
            "completed": len(ok),
            "failed": [{"partition_id": p, "reason": why, "failures": failures[p]} for p, why in failed.items()],
            "strategy_metrics": strategy_metrics,
            "seconds": round(time.perf_counter() - t0, 3),
            "clients": sorted(clients, key=lambda c: c["partition_id"]),
        }

    def _evaluate(self, r: int) -> tuple[float, dict[str, float]]:
        """Accuracy on the evaluation split: per group, and their mean weighted by clients."""
        tails = ray.get(self.cloud.all_tail_states.remote())
        torch.manual_seed(derive_seed(self.cfg.seed, r, ROUND_SALT))
        per_group = {
            group.name: evaluate_group(
                self.plan.specs[group.cut], from_record(self.heads[g]), tails[group.cut],
                group.defense, self.plan.eval_x, self.plan.eval_y)
            for g, group in enumerate(self.groups)}
        sizes = [len(m) for m in self.members]
        overall = sum(per_group[g.name] * n for g, n in zip(self.groups, sizes)) / sum(sizes)
        return overall, per_group

    def _save(self, directory: Path) -> None:
        """Keep what the cloud saw and the models (before Flower shuts Ray down)."""
        directory.mkdir(parents=True, exist_ok=True)
        ray.get(self.cloud.save_view.remote(str(directory / "view.npz")))
        tails = ray.get(self.cloud.all_tail_states.remote())
        attack_models = ray.get(self.cloud.attack_models.remote())
        tensors = lambda state: {k: torch.tensor(v) for k, v in state.items()}  # noqa: E731
        torch.save({
            "heads": {g.name: tensors(from_record(self.heads[i])) for i, g in enumerate(self.groups)},
            "start_heads": {g.name: tensors(from_record(self.start_heads[i])) for i, g in enumerate(self.groups)},
            "tails": {int(cut): tensors(s) for cut, s in tails.items()},
            "cloud_models": {int(cut): {name: tensors(s) for name, s in models.items()}
                             for cut, models in attack_models.items()},
        }, directory / "model.pt")


def _reason(reply: Message) -> str:
    """The one informative line of a failed client's error (Flower wraps it in a traceback)."""
    lines = [ln.strip() for ln in (reply.error.reason or "").splitlines() if ln.strip()]
    marked = [ln.split("Message:", 1)[1].strip().rstrip("'>") for ln in lines if "Message:" in ln]
    return (marked[-1] if marked else lines[-1] if lines else "unknown error")[:300]


def _client_record(reply: Message, group_name: str) -> dict[str, Any]:
    m: Mapping[str, Any] = reply.content["metrics"]  # the MetricRecord of client_app.train
    return {
        "partition_id": int(m["partition-id"]),
        "group": group_name,
        "loss": float(m["loss"]),
        "accuracy": _finite(m["accuracy"]),
        "train_accuracy": float(m["train-accuracy"]),
        "num_examples": int(m["num-examples"]),
        "bytes_sent": int(m["bytes-sent"]),
        "bytes_received": int(m["bytes-received"]),
        "seconds": float(m["seconds"]),
        **{k: _finite(v) for k, v in m.items() if k.startswith("defense-")},
    }


def _finite(value: Any) -> float | None:
    """NaN (e.g. a regulariser that was inactive all round) is written as JSON null."""
    value = float(value)
    return value if np.isfinite(value) else None


def make_server_app(plan: ServerPlan) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            Federation(grid, plan).run()
        except Exception as exc:  # handed to sim.run, which reports it in one line
            plan.outcome["error"] = exc
            raise

    return app
