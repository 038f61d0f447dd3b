"""Real faults in a real run: a client actor and the cloud actor SIGKILLed mid-round, and Ctrl-C.

Each run is ``python -m sim.run`` in a subprocess; the test watches the driver's process tree
(all of its Ray: GCS, raylet, agents, workers) and kills one process by its title, the way a
crash or the OOM killer would. What must hold:

- a dead client actor costs only its round: Ray restarts it, the next round is at full strength,
  and ``summary.json`` counts the lost client-rounds as "client actor died";
- a dead cloud actor or Ctrl-C stops the run at once with one line naming ``--resume``, exit 1
  (130 for SIGINT), no process of the run left, and ``--resume`` ends with the numbers of an
  uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.simhelpers import metrics, run_cli, without_timings

REPO = Path(__file__).resolve().parents[1]
COMMON = ["--clients", "6", "--rounds", "4", "--batch-size", "32", "--attacks", "none",
          "--protocol", "sflv1", "--client-cpus", "0.5"]
ARGS = [*COMMON, "--train-subset", "1200"]


def _run_and(out: Path, act: str, args: list[str] = ARGS,
             timeout: float = 600) -> tuple[int, str, list[psutil.Process], float]:
    """Start a run, do ``act`` ("kill ClientAppActor", "kill CloudActor", "SIGINT") in round 2.

    A client actor is the busiest one (by CPU over a short look): an idle actor killed between
    two of its clients costs nothing, and the test would not see the fault it is about.

    Returns the exit code, stderr, every process of the run's tree seen while it ran, and the
    seconds from the act to the driver's exit.
    """
    err_path = out.with_suffix(".err")
    with open(err_path, "w") as err:
        driver = subprocess.Popen([sys.executable, "-m", "sim.run", "--out", str(out), *args], cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=err, text=True)
    seen: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + timeout
    acted_at = None
    try:
        while driver.poll() is None and time.monotonic() < deadline:
            try:
                tree = psutil.Process(driver.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                break
            seen.update({p.pid: p for p in tree})
            if acted_at is None and "round   1/4" in err_path.read_text():
                time.sleep(0.5)  # into round 2 (a round takes seconds)
                if act == "SIGINT":
                    driver.send_signal(signal.SIGINT)
                else:
                    _busiest(driver.pid, f"ray::{act.split()[1]}").kill()
                acted_at = time.monotonic()
            time.sleep(0.2)
        driver.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if driver.poll() is None:
            driver.kill()
    assert acted_at is not None, err_path.read_text()[-3000:]
    return driver.returncode, err_path.read_text(), list(seen.values()), time.monotonic() - acted_at


def _busiest(pid: int, title: str) -> psutil.Process:
    """The descendant of ``pid`` whose command line starts with ``title`` that uses the most CPU."""
    procs = [p for p in psutil.Process(pid).children(recursive=True) if _title(p).startswith(title)]
    for p in procs:
        p.cpu_percent(None)
    time.sleep(0.3)
    return max(procs, key=lambda p: p.cpu_percent(None))


def _title(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def _left(procs: list[psutil.Process]) -> list[str]:
    """Processes of the run still alive a few seconds after its driver exited (zombies do not count)."""
    time.sleep(3.0)
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{p.pid} {_title(p)[:80]}")
        except psutil.NoSuchProcess:
            pass
    for p in procs:  # never leave them to other tests
        try:
            p.kill()
        except psutil.Error:
            pass
    return alive


def _accuracies(run_dir: Path) -> list[float]:
    return [r["accuracy"] for r in metrics(run_dir)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run, uninterrupted."""
    out = tmp_path_factory.mktemp("reference")
    proc = run_cli(out, *ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = out.iterdir()
    return run_dir


@pytest.mark.slow
def test_a_killed_client_actor_costs_only_its_round(tmp_path: Path) -> None:
    # Rounds of several seconds (1000 samples a client), so that the kill lands mid-round.
    rc, err, procs, _ = _run_and(tmp_path / "runs", "kill ClientAppActor", [*COMMON, "--train-subset", "6000"])
    assert rc == 0, err[-3000:]
    assert not _left(procs)
    (run_dir,) = (tmp_path / "runs").iterdir()
    records = metrics(run_dir)
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    died_in = [r["round"] for r in records if r["failed"]]
    assert len(died_in) == 1 and died_in[0] >= 2, [(r["round"], r["failed"]) for r in records]
    for r in records:
        if r["round"] != died_in[0]:
            assert r["completed"] == 6, r  # full strength after the death, not 6 minus the dead actor's share
    lost = json.loads((run_dir / "summary.json").read_text())["client_rounds_lost"]
    assert lost["total"] == len(records[died_in[0] - 1]["failed"]) >= 1
    assert lost["by_cause"] == {"client actor died": {"count": lost["total"], "rounds": died_in}}


@pytest.mark.slow
@pytest.mark.parametrize("act, code, what", [("kill CloudActor", 1, "the cloud actor died"),
                                             ("SIGINT", 130, "stopped by SIGINT")])
def test_a_stopped_run_says_so_in_one_line_leaves_nothing_and_resumes_exactly(
        tmp_path: Path, reference: Path, act: str, code: int, what: str) -> None:
    rc, err, procs, seconds = _run_and(tmp_path / "runs", act)
    assert rc == code, err[-3000:]
    assert seconds < 30, f"the run took {seconds:.0f} s to stop"
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert len(errors) == 1 and what in errors[0] and f"--resume {run_dir}" in errors[0], err[-3000:]
    assert "Traceback" not in err
    assert not _left(procs), "processes of the stopped run are still alive"
    assert len(metrics(run_dir)) in (1, 2)  # the complete, checkpointed rounds only
    proc = subprocess.run([sys.executable, "-m", "sim.run", "--resume", str(run_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _accuracies(run_dir) == _accuracies(reference)
    assert without_timings(metrics(run_dir)) == without_timings(metrics(reference))


def test_lost_client_rounds_are_counted_by_cause() -> None:
    """The summary's account, from the reasons the rounds recorded (no Ray needed)."""
    from sim.experiment import lost_client_rounds

    rounds = [{"round": 1, "failed": []},
              {"round": 2, "failed": [{"reason": "simulated failure: the client crashed before batch 3"},
                                      {"reason": "<class 'ray.exceptions.ActorUnavailableError'>:<'The actor ..."}]},
              {"round": 3, "failed": [{"reason": "no reply before the timeout"},
                                      {"reason": "simulated failure: the client crashed before batch 0"}]}]
    assert lost_client_rounds(rounds) == {"total": 4, "by_cause": {
        "simulated failure": {"count": 2, "rounds": [2, 3]},
        "client actor died": {"count": 1, "rounds": [2]},
        "no reply before the round timeout": {"count": 1, "rounds": [3]}}}
    assert lost_client_rounds([]) == {"total": 0, "by_cause": {}}
