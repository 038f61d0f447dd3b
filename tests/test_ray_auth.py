"""The Ray the simulator starts is locked down: loopback only, and a caller without the run's token is refused.

A driver process starts Ray exactly as ``python -m sim.run`` does (``sim.experiment._locked_down`` and
``_start_ray``), runs one actor, and waits; the tests then attack every port its process tree
listens on the way an outsider would: raw gRPC calls to Ray's services without the token, HTTP
without the token, and whole drivers joining with no token, a wrong token, or authentication off.
The control: the same join with the run's token (read from a Ray process's environment, which only
the same user can read) succeeds, so the refusals are the token's doing.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]

DRIVER = """
import json, os, sys
import sim.experiment as run
from sim.config import SimConfig
cfg = SimConfig()
with run._locked_down(cfg):
    run._start_ray(cfg, "auth-test")
    import ray
    @ray.remote
    class Probe:
        def pid(self):
            return os.getpid()
    probe = Probe.remote()
    print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "actor": ray.get(probe.pid.remote()),
                      "session": ray._private.worker._global_node.get_session_dir_path()}), flush=True)
    sys.stdin.read()
    ray.shutdown()
"""

# One method of each Ray service (an empty request parses as any message): the call must be
# refused for the token before the server looks at the request.
RAY_METHODS = ["/ray.rpc.NodeInfoGcsService/GetAllNodeInfo", "/ray.rpc.NodeManagerService/GetNodeStats",
               "/ray.rpc.CoreWorkerService/NumPendingTasks", "/ray.rpc.CoreWorkerService/PushTask",
               "/ray.rpc.ObjectManagerService/Pull"]


def _env(**extra: str) -> dict[str, str]:
    """This checkout on the path, no Ray settings of the caller's (no address, mode or token)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env | extra


@dataclass
class LocalRay:
    gcs: str
    session: Path
    driver: subprocess.Popen
    token: str

    def tree(self) -> list[psutil.Process]:
        """The driver and every process of its Ray (the agents are the raylet's children)."""
        root = psutil.Process(self.driver.pid)
        return [root, *root.children(recursive=True)]

    def listening(self) -> dict[int, tuple[str, str]]:
        """Port -> (bound address, process name) for every TCP socket the tree listens on."""
        ports = {}
        for proc in self.tree():
            try:
                for conn in proc.net_connections(kind="tcp"):
                    if conn.status == psutil.CONN_LISTEN:
                        ports[conn.laddr.port] = (conn.laddr.ip, proc.name())
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return ports


def _ours(session: Path) -> list[psutil.Process]:
    """Processes that still hold files of the session open or name it (agents outlive a killed driver)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(session) in part for part in proc.info["cmdline"] or ()) or any(
                    str(session) in f.path for f in proc.open_files()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


@pytest.fixture(scope="module")
def local_ray() -> Iterator[LocalRay]:
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=REPO, env=_env(), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    session = None
    try:
        line = driver.stdout.readline()
        assert line, driver.stderr.read()[-3000:]
        info = json.loads(line)
        session = Path(info["session"])
        gcs_pid = next(p for p in psutil.Process(driver.pid).children(recursive=True) if p.name() == "gcs_server")
        token = gcs_pid.environ()["RAY_AUTH_TOKEN"]
        yield LocalRay(gcs=info["gcs"], session=session, driver=driver, token=token)
    finally:
        driver.stdin.close()  # the driver shuts its Ray down
        try:
            driver.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        left = _ours(session) if session else []
        for proc in left:
            proc.kill()
        assert not left, f"processes of the test's Ray survived its shutdown: {[p.pid for p in left]}"


def test_every_port_is_bound_to_loopback(local_ray: LocalRay) -> None:
    """GCS, raylet (node and object manager), driver, workers and the runtime-env agent: 127.0.0.1 only.

    ``ray.init(_node_ip_address="127.0.0.1")`` alone made all of them listen on every interface.
    """
    ports = local_ray.listening()
    names = {name for _, name in ports.values()}
    assert {"gcs_server", "raylet"} <= names, ports
    assert any(name.startswith("ray::") for name in names), ports  # workers listen too
    for port, (ip, name) in ports.items():
        address = ipaddress.ip_address(ip)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        assert address.is_loopback, f"{name} listens on {ip}:{port}"
    assert local_ray.gcs.startswith("127.0.0.1:")


def test_ray_services_refuse_a_call_without_the_token(local_ray: LocalRay) -> None:
    """Every gRPC server answers Ray's own methods with UNAUTHENTICATED; the HTTP agent with 401.

    What answers without a token is gRPC's built-in health check and reflection (service names,
    no data, no code), which the test records as well.
    """
    ports = local_ray.listening()
    http = {port for port, (_, name) in ports.items() if "RuntimeEnv" in name}
    assert http, ports
    for port in sorted(set(ports) - http):
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        codes = {}
        for method in RAY_METHODS:
            call = channel.unary_unary(method, request_serializer=bytes, response_deserializer=bytes)
            try:
                call(b"", timeout=20)
                codes[method] = "OK"
            except grpc.RpcError as exc:
                codes[method] = exc.code().name
        channel.close()
        served = {m: c for m, c in codes.items() if c != "UNIMPLEMENTED"}
        assert served and set(served.values()) == {"UNAUTHENTICATED"}, (port, ports[port], codes)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy
    for port in http:
        for path in ("/get_or_create_runtime_env", "/delete_runtime_env_if_possible", "/get_runtime_envs_info"):
            with pytest.raises(urllib.error.HTTPError) as info:
                opener.open(urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"", method="POST"),
                            timeout=20)
            assert info.value.code == 401, (port, path)


JOIN = "import ray; ray.init(address=%r, log_to_driver=False); print('joined', ray.cluster_resources()['CPU'])"
# Joiners keep 127.0.0.1 as it is (otherwise Ray rewrites it to the machine's outward address,
# where nothing listens, and the join fails for that reason instead of the token).
JOIN_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
REFUSED_WAIT_S = 40.0  # a refused driver retries "GCS unavailable" forever; the control joins well within this


def test_a_driver_without_the_token_is_refused(local_ray: LocalRay) -> None:
    """No token: Ray refuses to even try. A wrong token, or authentication off: the GCS answers
    every call UNAUTHENTICATED, so the driver never joins (it retries until killed)."""
    cases = {"no token": _env(RAY_AUTH_MODE="token", HOME=str(local_ray.session), **JOIN_ENV),  # no ~/.ray
             "wrong token": _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64, **JOIN_ENV),
             "authentication off": _env(RAY_AUTH_MODE="disabled", **JOIN_ENV)}
    procs = {how: subprocess.Popen([sys.executable, "-c", JOIN % local_ray.gcs], env=env, cwd=REPO, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE) for how, env in cases.items()}
    outcomes = {}
    for how, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=REFUSED_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        outcomes[how] = (proc.returncode, out, err)
    for how, (_, out, _) in outcomes.items():
        assert "joined" not in out, (how, out)
    rc, _, err = outcomes["no token"]
    assert rc == 1 and "AuthenticationError" in err, err[-2000:]
    for how in ("wrong token", "authentication off"):
        assert "Failed to get cluster ID from GCS" in outcomes[how][2], (how, outcomes[how][2][-2000:])


def test_the_runs_token_lets_a_driver_join(local_ray: LocalRay) -> None:
    """The control for the refusals: the same join with the run's token works, within their wait."""
    proc = subprocess.run([sys.executable, "-c", JOIN % local_ray.gcs], cwd=REPO, capture_output=True, text=True,
                          env=_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=local_ray.token, **JOIN_ENV),
                          timeout=REFUSED_WAIT_S)
    assert proc.returncode == 0 and "joined" in proc.stdout, proc.stderr[-2000:]


def test_the_token_is_in_no_file_of_the_ray_session(local_ray: LocalRay) -> None:
    """Ray's logs and session files (ports, configs) never contain the token; nor does ~/.ray."""
    assert len(local_ray.token) == 64
    places = [local_ray.session, Path.home() / ".ray"]
    for place in places:
        for path in place.rglob("*") if place.is_dir() else ():
            if path.is_file() and not path.is_symlink():
                try:
                    assert local_ray.token not in path.read_text(errors="replace"), path
                except OSError:  # sockets and files that vanish
                    pass


def test_each_run_gets_a_fresh_token_and_the_environment_is_restored() -> None:
    """No Ray needed: the per-run environment, twice, and what is left afterwards."""
    import sim.experiment as run
    from sim.config import SimConfig

    before = {k: os.environ.get(k) for k in ("RAY_AUTH_TOKEN", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    tokens = []
    for _ in range(2):
        with run._locked_down(SimConfig()):
            tokens.append(os.environ["RAY_AUTH_TOKEN"])
            assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
        assert {k: os.environ.get(k) for k in before} == before
    assert tokens[0] != tokens[1] and all(len(t) == 64 for t in tokens)
    with run._locked_down(SimConfig(ray_address="127.0.0.1:1")):  # a joined cluster: the caller's environment
        assert {k: os.environ.get(k) for k in before} == before
