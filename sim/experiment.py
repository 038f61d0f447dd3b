"""The simulator's Python API: ``Experiment(config).run()`` -> :class:`Results`.

It is the one place that wires config, data, cloud, Flower and outputs; the CLI
(``python -m sim.run``), the Flower App (``flwr run .``, :mod:`sim.flower_app`), sweeps and the
benchmarks are shells over it. In a notebook::

    from sim.config import load_config
    from sim.experiment import Experiment
    results = Experiment(load_config("configs/demo.yaml", {"rounds": 2})).run()
    results.leakage  # the rows of leakage.csv, as dicts

Order matters: the whole config is validated and the data loaded and partitioned before Ray
starts (in ``Experiment(...)``), so a bad value costs one error (one of :data:`USER_ERRORS`) and
leaves no run directory behind. Then Ray is started (loopback, no dashboard, authenticated) or
joined, the data is put once in its object store, the cloud actor is created, and Flower's
simulation runs the ServerApp and ClientApps on it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from attacks import LEVELS, AttackError, build_attack
from attacks.scoring import WORST, WORST_LABELS, worst_case
from defenses import DefenseError, build_defense
from sim import AUTH_MODE_GIVEN, checkpoint
from sim.checkpoint import CheckpointError
from sim.config import ConfigError, SimConfig, check_external, load_config, located, validate
from sim.data import DataError, ImageData, load_dataset, partition_indices, split_holdout, split_test, to_tensor
from sim.memory import PeakMemory
from sim.models import DEFAULT_ARCH, SplitSpec, build_tail, normalise, state_to_numpy
from sim.plugins import ray_modules
from sim.spec import one_line
from sim.stage import parse_attacks
from strategies import StrategyError, check_strategy_spec

USER_ERRORS = (ConfigError, DataError, DefenseError, StrategyError, AttackError, CheckpointError)

class RunFailed(RuntimeError):
    """Training or the attack stage stopped; what was done is in ``run_dir``."""

    def __init__(self, message: str, run_dir: Path) -> None:
        super().__init__(message)
        self.run_dir = run_dir


@dataclass
class Prepared:
    """Everything computed before Ray starts."""

    config: SimConfig
    data: ImageData
    specs: dict[int, SplitSpec]
    partitions: list[tuple[np.ndarray, np.ndarray]]
    aux_idx: np.ndarray
    eval_idx: np.ndarray
    device: str


def prepare(cfg: SimConfig) -> Prepared:
    """Validate everything and load the data; raises one of USER_ERRORS.

    Config errors name the value as the user gave it: ``--clients`` for a flag, ``FILE:
    groups[1].share`` for a YAML value (``located``).
    """
    with located(cfg):
        validate(cfg)
        check_external(cfg)
        groups = cfg.resolved_groups()
        sizes = cfg.group_sizes()
        for i, g in enumerate(groups):
            where = f"groups[{i}].defense" if cfg.groups else "defense"
            try:
                defense = build_defense(g.defense)
            except DefenseError as exc:
                raise ConfigError(where, str(exc)) from None
            if defense.needs_output() and cfg.split != "ushaped":
                raise ConfigError(where, f"'{g.defense}' works on the cloud's output or its gradient, which only "
                                  f"--split ushaped exchanges with the client (the split is '{cfg.split}')")
            try:  # the server's own defaults (sim.server_app), so that what passes here runs there
                check_strategy_spec(g.strategy, {"fraction_train": cfg.fraction, "fraction_evaluate": 0.0,
                                                      "min_train_nodes": 1, "min_available_nodes": sizes[i]},
                                    num_nodes=sizes[i])
            except StrategyError as exc:
                raise ConfigError(f"groups[{i}].strategy" if cfg.groups else "strategy", str(exc)) from None
        _check_attacks(cfg)
        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if cfg.ray_address is None and (device == "cuda" or cfg.client_gpus > 0) and not torch.cuda.is_available():
            raise ConfigError("device", "CUDA requested (--device cuda or --client-gpus) but no GPU is visible")
        if cfg.client_gpus > 0 and device == "cpu":
            raise ConfigError("device", "--client-gpus gives each client actor a GPU share, but --device is cpu: "
                              "use --device cuda or auto")
        data = load_dataset(cfg.dataset, cfg.data_root)
        arch = cfg.arch or DEFAULT_ARCH.get(data.shape[0], "vgg11_bn")
        try:  # the architecture against the images first (cut 1 always exists), then each cut
            SplitSpec(arch, data.shape, data.num_classes, 1, cfg.bottleneck, cfg.split).validate()
        except ValueError as exc:
            raise ConfigError("arch", f"{exc}; {cfg.dataset} images are {data.shape[1]}x{data.shape[2]}") from None
        specs = {}
        for i, g in enumerate(groups):
            spec = SplitSpec(arch, data.shape, data.num_classes, g.cut, cfg.bottleneck, cfg.split)
            try:
                spec.validate()
            except ValueError as exc:
                raise ConfigError(f"groups[{i}].cut" if cfg.groups else "cut", str(exc)) from None
            specs[g.cut] = spec
        pool = np.arange(len(data.train_y))
        if cfg.train_subset is not None:
            if cfg.train_subset > len(pool):
                raise ConfigError("train_subset", f"{cfg.train_subset} exceeds the {len(pool)} training samples")
            pool = np.sort(np.random.default_rng(cfg.seed).choice(pool, cfg.train_subset, replace=False))
        if cfg.clients > len(pool):
            raise ConfigError("clients", f"{cfg.clients} clients but only {len(pool)} training samples")
        try:  # the data is fine here: what cannot be split is the partition or the test split asked for
            parts = [pool[p] for p in partition_indices(
                data.train_y[pool], cfg.clients, cfg.partition, seed=cfg.seed, alpha=cfg.alpha,
                classes_per_partition=cfg.classes_per_client, shards_per_partition=cfg.shards_per_client)]
        except DataError as exc:
            raise ConfigError("partition", str(exc)) from None
        try:
            aux_idx, eval_idx = split_test(len(data.test_y), cfg.aux_fraction, cfg.seed)
        except DataError as exc:
            raise ConfigError("aux_fraction", str(exc)) from None
    partitions = [split_holdout(p, cfg.holdout, cfg.seed + i) for i, p in enumerate(parts)]
    return Prepared(cfg, data, specs, partitions, aux_idx, eval_idx, device)


def _check_attacks(cfg: SimConfig) -> None:
    if cfg.attacker_knowledge not in LEVELS:
        raise ConfigError("attacker_knowledge", f"'{cfg.attacker_knowledge}' unknown; allowed: {', '.join(LEVELS)}")
    try:
        texts = parse_attacks(cfg.attacks)
    except AttackError as exc:
        raise ConfigError("attacks", str(exc)) from None
    for text in texts:
        try:
            attack = build_attack(text)
        except AttackError as exc:
            raise ConfigError("attacks", str(exc)) from None
        if LEVELS.index(attack.needs) > LEVELS.index(cfg.attacker_knowledge):
            raise ConfigError("attacks", f"'{attack.name}' needs attacker knowledge '{attack.needs}', "
                              f"but --attacker-knowledge is '{cfg.attacker_knowledge}'")
        if cfg.split not in attack.splits:
            raise ConfigError("attacks", f"'{attack.name}' needs --split {' or '.join(attack.splits)}, "
                              f"but the run's split is '{cfg.split}'")
        if attack.adversary == "active" and cfg.adversary != "active":
            raise ConfigError("attacks", f"'{attack.name}' needs --adversary active (a cloud that "
                              "trained its tail maliciously); use pmc for a passive cloud")
        if attack.adversary == "hijack" and cfg.adversary != "hijack":
            raise ConfigError("attacks", f"'{attack.name}' needs --adversary hijack (a cloud that "
                              "hijacked the heads' feature space and trained its inverse network)")


def load_resume(run_dir: str, others: dict[str, Any]) -> tuple[SimConfig, Path, dict[str, Any]]:
    """The config, folder and checkpoint of a run to resume; raises one of USER_ERRORS."""
    if others:
        flag = "--" + sorted(others)[0].replace("_", "-")
        raise ConfigError("--resume", f"takes no other flag ({flag} given): the run goes on with the "
                          "config.yaml in its folder")
    path = Path(run_dir)
    if not (path / "config.yaml").is_file():
        raise ConfigError("--resume", f"{run_dir} is not a run directory (no config.yaml)")
    cfg = load_config(str(path / "config.yaml"), {})
    state = checkpoint.load(path)
    if len(state.get("heads", [])) != len(cfg.resolved_groups()) or not isinstance(state.get("round"), int):
        raise CheckpointError(f"{path / checkpoint.CHECKPOINT}: does not match the run's config.yaml")
    return cfg, path, state


def make_run_dir(cfg: SimConfig) -> Path:
    """Create the run directory with the resolved config in it, or nothing at all."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.out) / f"{stamp}-{uuid.uuid4().hex[:6]}"
    created = False
    try:
        run_dir.mkdir(parents=True)
        created = True
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    except OSError as exc:
        if created:  # e.g. a full disk after mkdir: no half-written run directory
            shutil.rmtree(run_dir, ignore_errors=True)
        raise ConfigError(cfg.origin("out"), f"cannot create the run directory under {cfg.out}: "
                          f"{exc.strerror or exc}") from None
    return run_dir


def _quiet_libraries() -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("ray").setLevel(logging.ERROR)
    # Flower logs every failed client's traceback at ERROR; the run reports failures itself
    # (the round's line, metrics.jsonl, and one line for a run that cannot go on).
    logging.getLogger("flwr").setLevel(logging.CRITICAL)


# What a local Ray needs in the environment of the driver and, through it, of every process
# Ray starts (GCS, raylet, agents, workers): Ray reads these in each of them.
_LOCAL_RAY_ENV = ("RAY_AUTH_TOKEN", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")


@contextmanager
def _locked_down(cfg: SimConfig) -> Iterator[None]:
    """The environment the simulator's own Ray runs in, restored afterwards.

    - Token authentication (``RAY_AUTH_MODE=token``, set when this module is imported) with a
      fresh random token per run (``RAY_AUTH_TOKEN``, which Ray looks up before
      ``RAY_AUTH_TOKEN_PATH`` and ``~/.ray/auth_token``): every gRPC and HTTP endpoint of the GCS,
      raylet, agents and workers
      refuses a caller without it. The token lives only in the environment of this run's
      processes: never in config.yaml, the run directory, ``~/.ray`` or a log line.
    - Loopback only: ``ray.init(_node_ip_address="127.0.0.1")`` alone is not enough, Ray 2.55
      replaces 127.0.0.1 by the machine's outward address (``resolve_ip_for_localhost``) and its
      servers then listen on every interface. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is Ray's
      single-machine mode (its default on macOS and Windows): the node address stays 127.0.0.1,
      which the GCS, raylet, workers and runtime-env agent bind. The driver has already imported
      ``ray_constants``, so its copy of the switch is set too.

    A joined cluster (``--ray-address``) keeps the caller's environment: its nodes hold the token
    (see the README).
    """
    if cfg.ray_address:
        yield
        return
    from ray._private import ray_constants
    from ray._raylet import AuthenticationTokenLoader  # type: ignore[attr-defined]  # not in Ray's _raylet.pyi

    saved = {name: os.environ.get(name) for name in _LOCAL_RAY_ENV}
    saved_cluster = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update({"RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    ray_constants.ENABLE_RAY_CLUSTER = False
    AuthenticationTokenLoader.instance().reset_cache()  # a token cached by an earlier run in this process
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        ray_constants.ENABLE_RAY_CLUSTER = saved_cluster
        AuthenticationTokenLoader.instance().reset_cache()


def _start_ray(cfg: SimConfig, namespace: str) -> None:
    """Start the local Ray (inside :func:`_locked_down`) or join ``--ray-address``.

    Fails closed: no local Ray starts in a process whose Ray is not in token mode (the user set
    RAY_AUTH_MODE=disabled, or Ray was imported before the sim package set it).
    """
    import ray
    from ray._private.authentication.authentication_utils import is_token_auth_enabled
    from ray.exceptions import AuthenticationError

    # The user's plug-in modules (sim.plugins) travel with the job to every worker on every node.
    modules = ray_modules()
    common: dict[str, Any] = dict(namespace=namespace, log_to_driver=False, logging_level=logging.ERROR,
                                  runtime_env={"py_modules": modules} if modules else None)
    if cfg.ray_address:
        try:
            ray.init(address=cfg.ray_address, **common)
        except (ConnectionError, AuthenticationError) as exc:
            if not is_token_auth_enabled():
                hint = ("it may use token authentication: unset RAY_AUTH_MODE (the simulator's default is "
                        "token) and give this process the cluster's token (see the README, Ray security)")
            elif isinstance(exc, AuthenticationError) or "auth" in str(exc).lower():
                hint = ("no valid Ray token: give this process the cluster's token (RAY_AUTH_TOKEN_PATH or "
                        "~/.ray/auth_token), or, for a cluster without authentication, set "
                        "RAY_AUTH_MODE=disabled (see the README, Ray security)")
            else:
                hint = one_line(exc)
            raise ConfigError(cfg.origin("ray_address"), f"cannot join the Ray cluster at {cfg.ray_address}: "
                              f"{hint}") from None
        if not is_token_auth_enabled():
            print(f"warning: the Ray cluster at {cfg.ray_address} is joined without token authentication: "
                  "whoever reaches its ports can run code in it (see the README, Ray security)", file=sys.stderr)
        return
    if not is_token_auth_enabled():
        why = ("RAY_AUTH_MODE is set to " + repr(os.environ.get("RAY_AUTH_MODE")) if AUTH_MODE_GIVEN
               else "Ray was imported before the sim package set RAY_AUTH_MODE")
        raise ConfigError("RAY_AUTH_MODE", f"the simulator's own Ray runs only with token authentication ({why}); "
                          "RAY_AUTH_MODE=disabled is for joining a cluster without it (--ray-address)")
    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1",
             num_cpus=os.cpu_count(), **common)


def _stop_at_once(run_dir: Path) -> Callable[[int, Any], None]:
    """The driver's SIGINT/SIGTERM handler while Ray runs: one line, no process left, exit 128+N.

    Left to themselves, Ctrl-C is swallowed inside Flower's simulation loop (the run goes on to
    the end) and SIGTERM leaves Ray's agents running. Here every process of this run's Ray (all
    are descendants of the driver: GCS, raylet, agents, workers) is killed and the driver exits
    at once. That is a crash the checkpoint is made for: it is written atomically after each
    complete round, so ``--resume`` goes on from the last one and ends with the same numbers.
    """
    def handler(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        try:
            print(f"error: stopped by {name}; the checkpoint of the last complete round is in {run_dir}: "
                  f"go on with --resume {run_dir}", file=sys.stderr, flush=True)
            kill_descendants()
        finally:  # whatever failed above, the exit code still says which signal stopped the run
            os._exit(128 + signum)

    return handler


def kill_descendants(grace_s: float = 0.0) -> None:
    """SIGKILL every descendant of this process (the Ray this run started), children last-seen included."""
    import psutil

    try:
        procs = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=max(grace_s, 5.0))


# Flower's pool hands a dead client actor back to the pool (``RayBackend.process_message``), so
# every later client sent to it would fail at once: the run would go on at reduced strength.
# Its actor options are the client resources, so Ray restarts a dead actor (``max_restarts``):
# the task it was running fails (that client counts as failed, as a simulated failure does)
# and the next client in the round already gets the fresh actor. Bounded: an actor that keeps
# dying is left dead, and the round's failures say so.
ACTOR_RESTARTS = 3


def client_resources(cfg: SimConfig) -> dict[str, float]:
    return {"num_cpus": cfg.client_cpus, "num_gpus": cfg.client_gpus}


def make_plan(prep: Prepared, run_dir: Path, reporter: Any, resume: dict[str, Any] | None = None) -> Any:
    """In the Ray instance this process is connected to: put the data in the object store,
    create the cloud actor, and return the ServerApp's plan (a ``ServerPlan``).

    ``resume`` is a run's checkpoint to go on from (see :func:`load_resume`)."""
    import ray
    from flwr.simulation.ray_transport.ray_actor import pool_size_from_resources
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from defenses.client_model import initial_model
    from sim.cloud import CloudActor
    from sim.server_app import ServerPlan

    cfg, data = prep.config, prep.data
    namespace = f"sim-{run_dir.name}"
    cloud_name = "cloud"
    # Flower's own count, node by node: an actor cannot span nodes, so on a cluster the pool
    # can be smaller than the total CPUs suggest (two 1-CPU nodes fit two 0.6-CPU actors, not
    # three), and an SFL-v2 wave larger than the pool waits forever for its missing client.
    try:
        num_actors = pool_size_from_resources(client_resources(cfg))
    except ValueError:
        resources = ray.cluster_resources()
        raise ConfigError("client_cpus", f"no client actor fits on any node: the cluster has "
                          f"{resources.get('CPU', 0)} CPUs and {resources.get('GPU', 0)} GPUs") from None
    groups = cfg.resolved_groups()
    torch.manual_seed(cfg.seed)
    tails = {cut: state_to_numpy(build_tail(spec)) for cut, spec in sorted(prep.specs.items())}
    heads = [initial_model(prep.specs[g.cut], g.defense) for g in groups]
    setup = {
        "config": cfg.to_dict(),
        "specs": {cut: vars(spec) for cut, spec in prep.specs.items()},
        "train_x": ray.put(data.train_x),
        "train_y": ray.put(data.train_y),
        "partitions": ray.put(prep.partitions),
        "mean": list(data.mean),
        "std": list(data.std),
        "device": prep.device,
    }
    if cfg.adversary == "hijack":  # FSHA's public auxiliary images, for the cloud's own networks
        setup["aux_x"] = ray.put(data.test_x[prep.aux_idx])
    # The plan keeps the handle: a named actor dies when its creator drops the last handle.
    # On this node: the cloud writes the view's shards into the run directory, which lives here.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    # @ray.remote made CloudActor an ActorClass, but mypy keeps a decorated class's own type
    cloud = CloudActor.options(  # type: ignore[attr-defined]
        name=cloud_name, namespace=namespace, scheduling_strategy=here).remote(
        setup, tails, str(run_dir / checkpoint.SHARDS / "view"))
    plan = ServerPlan(
        config=cfg, run_dir=run_dir, cloud=cloud, cloud_name=cloud_name, namespace=namespace,
        specs=prep.specs, init_heads=heads,
        eval_x=normalise(to_tensor(data.test_x[prep.eval_idx]), data.mean, data.std),
        eval_y=torch.from_numpy(data.test_y[prep.eval_idx]),
        num_actors=num_actors, reporter=reporter, resume=resume)
    plan.outcome["num_actors"] = num_actors
    return plan


def simulate(prep: Prepared, run_dir: Path, reporter: Any, resume: dict[str, Any] | None = None) -> dict[str, Any]:
    """Start Ray, the cloud and Flower's simulation; return the server's outcome."""
    cfg = prep.config
    t0 = time.perf_counter()
    with _locked_down(cfg):
        return _simulate(prep, run_dir, reporter, resume, t0)


def _simulate(prep: Prepared, run_dir: Path, reporter: Any, resume: dict[str, Any] | None,
              t0: float) -> dict[str, Any]:
    import ray
    from flwr.simulation import run_simulation

    from sim import flower_poller
    from sim.client_app import app as client_app
    from sim.server_app import make_server_app

    cfg = prep.config
    flower_poller.install()
    _start_ray(cfg, f"sim-{run_dir.name}")
    previous = {sig: signal.signal(sig, _stop_at_once(run_dir)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        plan = make_plan(prep, run_dir, reporter, resume)
        plan.outcome["startup_seconds"] = time.perf_counter() - t0
        try:
            run_simulation(
                server_app=make_server_app(plan), client_app=client_app, num_supernodes=cfg.clients,
                # {**...}: a dict of Flower's value types (its annotation is an invariant dict)
                backend_config={"client_resources": {**client_resources(cfg), "max_restarts": ACTOR_RESTARTS}},
            )
        except Exception as exc:  # the ServerApp's own failure, re-raised by Flower
            plan.outcome.setdefault("error", exc)
    finally:
        reporter.stop()
        if ray.is_initialized():
            ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    plan.outcome["total_seconds"] = time.perf_counter() - t0
    return plan.outcome


def _loss_cause(reason: str) -> str:
    """Why a client-round was lost, in a few fixed words (the record keeps the full reason)."""
    if "simulated failure" in reason:
        return "simulated failure"
    if any(k in reason for k in ("RayActorError", "ActorDiedError", "ActorUnavailableError", "actor died")):
        return "client actor died"
    if "timeout" in reason:
        return "no reply before the round timeout"
    return "client error"


def lost_client_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Client-rounds that did not count, in total and by cause, with the rounds they were in."""
    by_cause: dict[str, dict[str, Any]] = {}
    for record in rounds:
        for failure in record.get("failed", []):
            entry = by_cause.setdefault(_loss_cause(str(failure.get("reason", ""))), {"count": 0, "rounds": []})
            entry["count"] += 1
            if record["round"] not in entry["rounds"]:
                entry["rounds"].append(record["round"])
    return {"total": sum(e["count"] for e in by_cause.values()), "by_cause": by_cause}


def write_summary(run_dir: Path, cfg: SimConfig, outcome: dict[str, Any]) -> dict[str, Any]:
    rounds = outcome.get("rounds", [])
    last = rounds[-1] if rounds else {}
    steady = [r["seconds"] for r in rounds[1:]] or [r["seconds"] for r in rounds]
    summary = {
        "final_accuracy": last.get("accuracy"),
        "group_accuracy": last.get("group_accuracy"),
        "rounds_completed": len(rounds),
        "seconds_per_round": float(np.mean(steady)) if steady else None,
        "startup_seconds": outcome.get("startup_seconds"),
        "total_seconds": outcome.get("total_seconds"),
        "client_actors": outcome.get("num_actors"),
        "client_rounds_lost": lost_client_rounds(rounds),
        "peak_memory_mb": outcome.get("peak_memory_mb"),
        "config": cfg.to_dict(),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def attack_stage(run_dir: Path, prep: Prepared, console: Any) -> None:
    """Attack the saved snapshots of the run; write leakage.csv, figures and report.md."""
    from sim import report
    from sim.stage import load_snapshot, run_stage

    cfg = prep.config
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = records[-1]["round"]
    dirs = {int(d.name[1:]): d for d in sorted((run_dir / "rounds").glob("r*"))} | {final: run_dir}
    rows, examples = [], {}
    seconds: dict[str, float] = {}
    curves: dict[str, list[dict[str, Any]]] = {}
    for round_, directory in sorted(dirs.items()):
        result = run_stage(load_snapshot(directory, round_), cfg.resolved_groups(), prep.specs, prep.data,
                           prep.aux_idx, parse_attacks(cfg.attacks), cfg.attacker_knowledge,
                           cfg.attack_samples, cfg.seed, progress=lambda text: console.print(f"attack: {text}"),
                           device=prep.device)
        stats = report.client_stats(prep.data.train_y, prep.partitions, records, round_)
        joined = report.join(result.rows, {round_: stats})
        rows += joined + worst_case(joined)
        for name, s in result.seconds.items():
            seconds[name] = seconds.get(name, 0.0) + s
        for name, fits in result.curves.items():
            curves.setdefault(name, []).extend(fits)
        if round_ == final:
            examples = result.examples
    report.write_csv(rows, run_dir / "leakage.csv")
    means = report.group_means(rows, final)
    report.write_report(run_dir, rows, examples, means, seconds, final, curves)
    report.update_summary(run_dir, means, seconds, report.cem_audit(rows, final), rows, curves, final)
    for name, groups in sorted(means.items(), key=lambda item: item[0] not in (WORST, WORST_LABELS)):
        console.print(f"leakage {name}: " + ", ".join(
            f"{g} SSIM {m['ssim']:.3f} (baseline {m['baseline_ssim']:.3f})" if "ssim" in m else
            f"{g} label accuracy {m['completion_accuracy']:.3f} (from scratch {m['scratch_accuracy']:.3f})"
            for g, m in groups.items()) + (f"  [{seconds[name]:.0f} s]" if name in seconds else ""))


def export_view(run_dir: Path, target: str) -> None:
    """Copy what the cloud saw (view), the aggregated heads (``FILE.pt``) and the heads the last
    round started from (``FILE.start.pt``; a white-box cloud holds both) to a chosen place."""
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "view.npz", path)
    models = torch.load(run_dir / "model.pt", weights_only=True)
    torch.save(models["heads"], path.with_suffix(".pt"))
    torch.save(models["start_heads"], path.with_suffix(".start.pt"))


def _describe_failure(error: BaseException) -> str:
    """One line for what stopped the run; Ray's actor errors span a dozen lines."""
    text = str(error)
    if "CloudActor" in text and ("died" in text or "dead" in text):
        return "the cloud actor died (its worker process exited unexpectedly)"
    line = one_line(error)
    return line if len(line) <= 300 else line[:297] + "..."


def finish(run_dir: Path, prep: Prepared, outcome: dict[str, Any], console: Any) -> Results:
    """After training: the summary, then the attack stage and the exported view; the results.
    Raises :class:`RunFailed` if training or the attack stage failed (what was done is saved)."""
    cfg = prep.config
    error = outcome.get("error")
    write_summary(run_dir, cfg, outcome)
    if error is not None:
        raise RunFailed(f"run failed: {_describe_failure(error)} (results so far and a checkpoint in {run_dir}; "
                        f"go on with --resume {run_dir})", run_dir)
    try:
        if parse_attacks(cfg.attacks):
            attack_stage(run_dir, prep, console)
        if cfg.export_view:
            export_view(run_dir, cfg.export_view)
    except (OSError, ValueError, RuntimeError) as exc:  # training results are already saved
        raise RunFailed(f"attack stage failed: {exc} (training results in {run_dir})", run_dir) from exc
    return Results.read(run_dir)


@dataclass
class Results:
    """What a finished run wrote, as plain Python: ``summary.json``, the per-round records of
    ``metrics.jsonl`` and the rows of ``leakage.csv`` (numbers parsed; empty without attacks)."""

    run_dir: Path
    summary: dict[str, Any]
    rounds: list[dict[str, Any]]
    leakage: list[dict[str, Any]]

    @property
    def final_accuracy(self) -> float | None:
        return self.summary.get("final_accuracy")

    @classmethod
    def read(cls, run_dir: Path) -> Results:
        run_dir = Path(run_dir)
        summary = json.loads((run_dir / "summary.json").read_text())
        metrics = run_dir / "metrics.jsonl"
        rounds = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        from sim import report
        return cls(run_dir, summary, rounds, report.read_csv(run_dir / "leakage.csv"))


class Experiment:
    """One run of the simulator. The constructor validates the config and loads the data (raises
    one of :data:`USER_ERRORS`; nothing is created on disk), :meth:`run` trains, attacks and
    returns the :class:`Results`; :meth:`resume` goes on with a stopped run."""

    def __init__(self, config: SimConfig, *, _resume: tuple[Path, dict[str, Any]] | None = None) -> None:
        self.config = config
        self.prepared = prepare(config)
        self._resume = _resume

    @classmethod
    def resume(cls, run_dir: str | Path, others: dict[str, Any] | None = None) -> Experiment:
        """The stopped run in ``run_dir``, to go on from its last complete round; ``others`` are
        settings given besides (an error: the run goes on with its own config.yaml)."""
        cfg, path, state = load_resume(str(run_dir), others or {})
        return cls(cfg, _resume=(path, state))

    def run(self, reporter: Any = None) -> Results:
        """Train, attack and write the run directory; raises :class:`RunFailed` (what was done
        is saved) or one of :data:`USER_ERRORS` found once Ray is up (a new run's folder is
        then removed)."""
        from sim.progress import Reporter

        cfg = self.config
        run_dir, state = self._resume if self._resume is not None else (make_run_dir(cfg), None)
        _quiet_libraries()
        if reporter is None:
            reporter = Reporter()
        reporter.start(cfg.rounds, cfg.clients, f"{cfg.dataset} {cfg.protocol} {cfg.defense}")
        try:
            with PeakMemory() as memory:
                outcome = simulate(self.prepared, run_dir, reporter, state)
            outcome["peak_memory_mb"] = memory.peak_bytes / 2**20
        except USER_ERRORS:
            if state is None:  # a resumed run's folder holds earlier results: keep it
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        return finish(run_dir, self.prepared, outcome, reporter.console)

    def serve(self, grid: Any) -> Results:
        """Run on a Flower Grid whose simulation engine started Ray (``flwr run .``): wait for
        that Ray, create the cloud and run the same Federation and attack stage."""
        from sim.progress import Reporter
        from sim.server_app import Federation

        cfg = self.config
        if cfg.ray_address:
            raise ConfigError("ray_address", "under flwr run, Flower's simulation engine starts Ray")
        run_dir = make_run_dir(cfg)
        reporter = Reporter()
        reporter.start(cfg.rounds, cfg.clients, f"{cfg.dataset} {cfg.protocol} {cfg.defense} (flwr run)")
        t0 = time.perf_counter()
        try:
            _wait_for_ray()
            plan = make_plan(self.prepared, run_dir, reporter)
            plan.outcome["startup_seconds"] = time.perf_counter() - t0
            try:
                Federation(grid, plan).run()
            except Exception as exc:  # reported by finish() in one line, like sim.run
                plan.outcome["error"] = exc
        finally:
            reporter.stop()
        plan.outcome["total_seconds"] = time.perf_counter() - t0
        return finish(run_dir, self.prepared, plan.outcome, reporter.console)


RAY_WAIT = 120.0  # seconds for Flower's simulation engine to bring Ray up


def _wait_for_ray() -> None:
    import ray

    deadline = time.monotonic() + RAY_WAIT
    while not ray.is_initialized():
        if time.monotonic() > deadline:
            raise RuntimeError(f"Flower's simulation engine did not start Ray within {RAY_WAIT:.0f} s")
        time.sleep(0.2)
