"""Checkpoint and resume: a run killed with SIGKILL mid-round and resumed ends with the same
numbers as a run that was never interrupted; a bad checkpoint is refused in one line."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from sim import checkpoint
from tests.simhelpers import SMALL, metrics, run_sim, without_timings

ARGS = [*SMALL, "--rounds", "3", "--train-subset", "3000", "--defense", "noise(sigma=0.05)+cem(lam=0.5)",
        "--aux-fraction", "0.3", "--attacks", "decoder(epochs=1, width=16, blocks=1, batch_size=32)"]


def leakage(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "leakage.csv").open() as f:
        return list(csv.DictReader(f))


def resume(run_dir: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sim.run", "--resume", str(run_dir)],
                          capture_output=True, text=True, timeout=timeout)


def checkpointed_round(run_dir: Path) -> int | None:
    try:
        return int(checkpoint.load(run_dir)["round"])
    except checkpoint.CheckpointError:
        return None


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the run and every process it started (Ray's too), as a crash would."""
    family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


@pytest.mark.slow
def test_sigkill_mid_round_then_resume_gives_the_same_numbers(tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "sim.run", "--out", str(out), *ARGS],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        run_dir = None
        while time.monotonic() < deadline and proc.poll() is None:
            dirs = list(out.glob("*")) if out.exists() else []
            if dirs and checkpointed_round(run_dir := dirs[0]) == 1:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be killed"
        assert run_dir is not None and checkpointed_round(run_dir) == 1, "round 1 was never checkpointed"
        time.sleep(0.5)  # into round 2
    finally:
        kill_tree(proc)
    assert checkpointed_round(run_dir) == 1, "round 2 finished before the kill: not a mid-round kill"
    assert not (run_dir / "leakage.csv").exists()

    resumed = resume(run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = run_sim(tmp_path / "reference", *ARGS)

    assert without_timings(metrics(run_dir)) == without_timings(metrics(reference))
    assert [r["round"] for r in metrics(run_dir)] == [1, 2, 3]
    assert leakage(run_dir) == leakage(reference)
    assert checkpointed_round(run_dir) == 3


@pytest.mark.slow
def test_resume_refuses_a_corrupt_checkpoint(tmp_path):
    run_dir = run_sim(tmp_path / "runs", *SMALL, "--rounds", "1")
    path = run_dir / checkpoint.CHECKPOINT
    path.write_bytes(path.read_bytes()[:1000])
    proc = resume(run_dir, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "corrupt or not a checkpoint" in lines[0] and str(path) in lines[0], proc.stderr
    assert (run_dir / "metrics.jsonl").exists()  # the run's folder is left as it was


@pytest.mark.parametrize("payload", [b"", b"not a zip at all"])
def test_load_refuses_what_is_not_a_checkpoint(tmp_path, payload):
    (tmp_path / checkpoint.CHECKPOINT).write_bytes(payload)
    with pytest.raises(checkpoint.CheckpointError, match="corrupt or not a checkpoint"):
        checkpoint.load(tmp_path)


def test_load_runs_no_code_from_a_pickled_object(tmp_path):
    """A checkpoint that carries an arbitrary pickled object is refused (weights_only)."""
    import torch

    torch.save({"format": checkpoint.FORMAT, "evil": Path("/")}, tmp_path / checkpoint.CHECKPOINT)
    with pytest.raises(checkpoint.CheckpointError, match="corrupt or not a checkpoint"):
        checkpoint.load(tmp_path)
