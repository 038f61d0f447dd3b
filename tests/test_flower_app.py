"""``flwr run .``: the project as a Flower App, run by Flower's own local SuperLink."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]


def stop_started(marker: str) -> None:
    """Stop the processes flwr started for this test (its SuperLink lives on in the background);
    they are recognised by the test's own FLWR_HOME in their command line."""
    mine = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    for p in mine:
        p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(mine, timeout=20)
    for p in alive:
        p.kill()


@pytest.mark.slow
def test_flwr_run_dot(tmp_path):
    home = tmp_path / "flwr-home"
    out = tmp_path / "runs"
    env = os.environ | {"FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    try:
        proc = subprocess.run(
            [str(Path(sys.executable).parent / "flwr"), "run", ".", "--stream",
             "--run-config", f"out='{out}' attacks='none' rounds=2"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    finally:
        stop_started(str(home))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (run_dir,) = list(out.iterdir())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2] and [r["completed"] for r in records] == [2, 2]
    assert records[-1]["accuracy"] > 0.5
    assert (run_dir / "view.npz").exists() and (run_dir / "checkpoint.pt").exists()
