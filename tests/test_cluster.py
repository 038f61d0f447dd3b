"""``--ray-address`` joins an existing Ray cluster: a real two-node cluster on this machine.

Two ``ray start --block`` processes (a head and a second node, 1 CPU each, node address
127.0.0.1, no dashboard, their own temp dir) form the cluster; the simulation joins it by address.
Both are stopped by the process ids this test started, never by ``ray stop`` (which would also stop
any other Ray on the machine). The cluster uses token authentication as the README tells users to:
``RAY_AUTH_MODE=token`` and one token file (``RAY_AUTH_TOKEN_PATH``, mode 0600) for both nodes and
the driver that joins; a driver without it is refused.
"""

from __future__ import annotations

import atexit
import csv
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.simhelpers import SMALL, metrics, plugin_folder, run_cli

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"  # the CLI of the Ray the simulator imports
STOP_GRACE_S = 20.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


TOKEN_FILE = Path(tempfile.mkdtemp(prefix="ray-token-")) / "auth_token"
atexit.register(shutil.rmtree, TOKEN_FILE.parent, True)


def _node_env() -> dict[str, str]:
    """The nodes' (and the joining driver's) environment: this checkout's code and the cluster's token.

    On a real cluster the code must sit at the same path on every machine (Ray adds the driver's
    working directory to its workers' sys.path); here the venv's editable install points at another
    checkout, so PYTHONPATH pins this one. RAY_ADDRESS is dropped so nothing joins a foreign cluster.
    The token file is made once per test session, readable by this user only.
    """
    if not TOKEN_FILE.exists():
        TOKEN_FILE.touch(mode=0o600)
        TOKEN_FILE.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN_PATH"] = str(TOKEN_FILE)
    return env


@dataclass
class Cluster:
    """What the test started: the address, the two ``ray start`` processes, their temp dir."""

    address: str
    temp_dir: str
    logs: Path
    nodes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def log_tail(self, chars: int = 3000) -> str:
        """The nodes' own output, for failure messages (Ray hides most errors in its logs)."""
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}"
                         for p in sorted(self.logs.glob("*.log")))


def _start_node(cluster: Cluster, name: str, *args: str) -> None:
    """One node in the foreground (``--block``) in its own session, so its group can be killed."""
    with open(cluster.logs / f"{name}.log", "w") as log:  # the child keeps its own descriptor
        cluster.nodes[name] = subprocess.Popen(
            [str(RAY), "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
             "--object-store-memory", str(200 * 2**20), "--temp-dir", cluster.temp_dir,
             "--dashboard-agent-listen-port", str(_free_port()), "--disable-usage-stats", *args],
            stdout=log, stderr=subprocess.STDOUT, env=_node_env(), start_new_session=True)


def _alive_nodes(address: str) -> int:
    """Alive nodes as the cluster's GCS reports them (a throwaway driver joins to ask)."""
    code = (f"import ray; ray.init(address={address!r}, log_to_driver=False); "
            "print(sum(n['Alive'] for n in ray.nodes()))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_node_env(), timeout=60)
    return int(proc.stdout.split()[-1]) if proc.returncode == 0 and proc.stdout.split() else 0


def _wait_for_nodes(cluster: Cluster, count: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in cluster.nodes.items():
            assert proc.poll() is None, f"ray node {name} exited early:\n{cluster.log_tail()}"
        if _alive_nodes(cluster.address) == count:
            return
        time.sleep(1.0)
    pytest.fail(f"the cluster did not report {count} alive nodes in {timeout:.0f} s:\n{cluster.log_tail()}")


def _ours(temp_dir: str) -> list[psutil.Process]:
    """Processes whose command line names our temp dir (gcs_server, raylets, monitors)."""
    def names_it(part: str) -> bool:
        return part.endswith(temp_dir) or temp_dir + os.sep in part

    return [proc for proc in psutil.process_iter(["cmdline"])
            if any(names_it(part) for part in proc.info["cmdline"] or ())]


def _stop(cluster: Cluster) -> list[str]:
    """Stop what we started, by process id; return the processes that needed SIGKILL."""
    tree: list[psutil.Process] = []
    for proc in cluster.nodes.values():  # workers are re-parented once their raylet dies
        try:
            tree += psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for proc in cluster.nodes.values():
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # start_new_session: group id == pid
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in cluster.nodes.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    leftovers = {p.pid: p for p in tree + _ours(cluster.temp_dir) if p.is_running()}
    _, alive = psutil.wait_procs(list(leftovers.values()), timeout=max(0.1, deadline - time.monotonic()))
    killed = []
    for proc in cluster.nodes.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            killed.append(f"ray start {proc.pid}")
    for p in alive:
        try:
            killed.append(" ".join(p.cmdline())[:120])
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    for proc in cluster.nodes.values():
        proc.wait(timeout=10)
    return killed


@pytest.fixture
def two_node_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A head and a second node of 1 CPU each; torn down by the process ids started here."""
    # Short: Ray's socket paths (temp dir + session name + sockets/...) must fit AF_UNIX's limit.
    cluster = Cluster(address=f"127.0.0.1:{_free_port()}", temp_dir=tempfile.mkdtemp(prefix="r", dir="/tmp"),
                      logs=tmp_path / "ray-logs")
    cluster.logs.mkdir()
    try:
        _start_node(cluster, "head", "--head", "--port", cluster.address.split(":")[1],
                    "--include-dashboard=false", "--ray-client-server-port", str(_free_port()))
        _wait_for_nodes(cluster, 1)
        _start_node(cluster, "second", "--address", cluster.address)
        _wait_for_nodes(cluster, 2)
        yield cluster
    finally:
        killed = _stop(cluster)
        left = [" ".join(p.cmdline())[:120] for p in _ours(cluster.temp_dir) if p.is_running()]
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)
        print(f"ray processes that needed SIGKILL: {killed}")
        assert not left, f"Ray processes of the test cluster survived: {left}"


class ActorWatch:
    """Which Ray actors each node's raylet runs, sampled from the process table during the run.

    Ray titles a worker process ``ray::Class.method`` while it runs a method, and workers are the
    raylet's children: a title under a node's process tree is work that ran on that node.
    """

    def __init__(self, cluster: Cluster, period: float = 0.2) -> None:
        self.roots = {name: proc.pid for name, proc in cluster.nodes.items()}
        self.seen: dict[str, set[str]] = {name: set() for name in self.roots}
        self.period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.roots.items():
                try:
                    children = psutil.Process(pid).children(recursive=True)
                except psutil.NoSuchProcess:
                    continue
                for child in children:
                    try:
                        title = " ".join(child.cmdline())
                    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                        continue
                    if title.startswith("ray::"):
                        self.seen[name].add(title.split()[0])
            self._stop.wait(self.period)

    def __enter__(self) -> ActorWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.slow
def test_simulation_runs_across_a_two_node_cluster(two_node_cluster: Cluster, tmp_path: Path) -> None:
    """The run joins the cluster by address and its client actors train on both nodes.

    0.6 CPU per client actor: an actor cannot span nodes, so only one fits on each 1-CPU node, although
    the cluster's 2 CPUs in total would suggest 3. The SFL-v2 waves must match Flower's per-node pool
    (2), or the cloud waits forever for a client that has no actor. The defense and the attack are the
    user's own, from a folder that is the driver's working directory and not on the nodes' path.
    """
    out = tmp_path / "runs"
    folder = plugin_folder(tmp_path / "user")
    with ActorWatch(two_node_cluster) as watch:
        proc = run_cli(out, *SMALL, "--protocol", "sflv2", "--client-cpus", "0.6",
                       "--defense", "custom_defense:Quantize(levels=4)",
                       "--attacks", "custom_attack:NearestNeighbour", "--attack-samples", "16",
                       "--ray-address", two_node_cluster.address, timeout=420, env=_node_env(), cwd=folder)
    print(f"ray actors seen per node: {watch.seen}")
    assert proc.returncode == 0, proc.stderr[-3000:] + two_node_cluster.log_tail()
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["client_actors"] == 2
    assert summary["rounds_completed"] == 2
    for record in metrics(run_dir):
        assert record["completed"] == 4 and len(record["clients"]) == 4, record
        assert all(c["defense-mse"] > 0 for c in record["clients"]), record  # quantized in the actors
    with (run_dir / "leakage.csv").open() as f:
        assert sorted(int(r["partition_id"]) for r in csv.DictReader(f) if r["attack"] == "nearest") == [0, 1, 2, 3]
    for node, titles in watch.seen.items():
        assert any(t.startswith("ray::ClientAppActor.run") for t in titles), (node, watch.seen)
    assert any(t.startswith("ray::CloudActor") for titles in watch.seen.values() for t in titles), watch.seen


@pytest.mark.slow
def test_joining_without_the_clusters_token_is_one_line(two_node_cluster: Cluster, tmp_path: Path) -> None:
    """A driver that lacks the cluster's token is refused by it: one line naming what to set, exit 2."""
    env = {k: v for k, v in _node_env().items() if not k.startswith("RAY_AUTH_TOKEN")} | {"HOME": str(tmp_path)}
    proc = run_cli(tmp_path / "runs", *SMALL, "--ray-address", two_node_cluster.address, timeout=300, env=env)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and lines[-1].startswith("error: --ray-address: cannot join"), proc.stderr[-3000:]
    assert "token" in lines[-1] and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
