"""Running the real simulator (Flower + Ray + torch) from tests, as a user would."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from sim.config import SimConfig, config_from_dict
from sim.data import to_tensor
from sim.experiment import Prepared, _locked_down, prepare
from sim.models import SplitSpec, build_head, build_tail, normalise, state_to_numpy

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def plugin_folder(where: Path) -> Path:
    """A user's folder outside the repository holding the example defense and attack modules."""
    where.mkdir(parents=True, exist_ok=True)
    for name in ("custom_defense.py", "custom_attack.py"):
        shutil.copy(EXAMPLES / name, where / name)
    return where


CLOUD_SPEC = SplitSpec("small", (1, 28, 28), 10)  # the tail of the cloud actors of local_clouds


@contextmanager
def local_clouds(count: int, store: Callable[[], Path], namespace: str
                 ) -> Iterator[tuple[list[Any], dict[str, np.ndarray]]]:
    """``count`` real cloud actors with the same small tail (seed 0, lr 1e-3, reservoirs of 16),
    on a local Ray started as the simulator starts it (token auth, loopback); the actors and the
    tail's initial state. ``store`` gives each actor a fresh directory for its view."""
    import ray

    from sim.cloud import CloudActor

    with _locked_down(SimConfig()):
        ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 namespace=namespace)
        torch.manual_seed(0)
        setup = {"config": {"seed": 0, "lr": 1e-3, "reservoir": 16}, "specs": {CLOUD_SPEC.cut: vars(CLOUD_SPEC)},
                 "device": "cpu"}
        tail = state_to_numpy(build_tail(CLOUD_SPEC))
        try:
            yield [CloudActor.remote(setup, {CLOUD_SPEC.cut: tail}, str(store())) for _ in range(count)], tail
        finally:
            ray.shutdown()


# Small but real: a few clients over a 2000-sample subset of Fashion-MNIST.
SMALL = ["--clients", "4", "--rounds", "2", "--train-subset", "2000", "--batch-size", "32", "--attacks", "none"]


def run_cli(out: Path, *args: str, timeout: float = 600, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m sim.run`` in a subprocess; ``env`` replaces the environment (e.g. a cluster's
    token), ``cwd`` is its working directory (a user's folder with plug-in modules)."""
    return subprocess.run([sys.executable, "-m", "sim.run", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def run_sim(out: Path, *args: str, timeout: float = 600, cwd: Path | None = None) -> Path:
    """Run a simulation that must succeed; return its run directory."""
    proc = run_cli(out, *args, timeout=timeout, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dirs = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(dirs) == 1, dirs
    return dirs[0]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_timings(records: list[dict]) -> list[dict]:
    """The records with wall-clock fields removed (they are the only non-reproducible ones)."""
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k != "seconds"}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj
    return strip(records)


def prepared(run_dir: Path) -> Prepared:
    """The run's data and partitions, recomputed from its resolved config."""
    return prepare(config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text())))


def head_features(run_dir: Path, prep: Prepared, group: str, ids: np.ndarray) -> torch.Tensor:
    """Features of train samples through the run's final head of ``group`` (eval mode)."""
    cfg = prep.config
    spec = prep.specs[int(next(g.cut for g in cfg.resolved_groups() if g.name == group))]
    head = build_head(spec)
    head.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True)["heads"][group], strict=False)
    head.eval()
    x = normalise(to_tensor(prep.data.train_x[ids]), prep.data.mean, prep.data.std)
    with torch.no_grad():
        return head(x)
