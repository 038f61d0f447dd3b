"""The simulator as a Flower App, for ``flwr run .`` (components in ``pyproject.toml``).

Under ``flwr run`` Flower, not ``sim.run``, starts the simulation: its ``flwr-simulation``
process initialises Ray for the client actors and runs this ServerApp in a thread of the same
process. So the ServerApp waits until that Ray instance is up, creates the cloud actor and puts
the data in it (Flower's client actors reach the cloud by name through it, as under
``sim.run``), and then runs the same :class:`sim.server_app.Federation` and the same attack
stage. The run config (``[tool.flwr.app.config]``, or ``flwr run . --run-config "rounds=5"``)
takes any of ``sim.run``'s settings by name (``train-subset`` or ``train_subset``); the number of
clients must equal the federation's number of simulated nodes (``num-supernodes``), and for
SFL-v2 ``client-cpus`` must equal the federation's ``client-resources.num-cpus``: the cloud
serves one wave of clients per actor, and cannot ask Flower how many actors it made.
"""

from __future__ import annotations

import time
from typing import Any

import ray
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from sim.config import ConfigError, config_from_dict
from sim.progress import Reporter
from sim.run import USER_ERRORS, finish, make_plan, make_run_dir, prepare
from sim.server_app import Federation

RAY_WAIT = 120.0  # seconds for Flower's simulation engine to bring Ray up

app = ServerApp()


def config_from_run_config(run_config: dict[str, Any]) -> Any:
    """A SimConfig from Flower's run config: keys as in sim.run, with - or _."""
    return config_from_dict({key.replace("-", "_"): value for key, value in run_config.items()})


def _wait_for_ray() -> None:
    deadline = time.monotonic() + RAY_WAIT
    while not ray.is_initialized():
        if time.monotonic() > deadline:
            raise RuntimeError(f"Flower's simulation engine did not start Ray within {RAY_WAIT:.0f} s")
        time.sleep(0.2)


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        cfg = config_from_run_config(dict(context.run_config))
        prep = prepare(cfg)
        run_dir = make_run_dir(cfg)
    except USER_ERRORS as exc:
        raise SystemExit(f"error: {exc}") from None
    if cfg.ray_address:
        raise SystemExit("error: ray_address: under flwr run, Flower's simulation engine starts Ray")
    reporter = Reporter()
    reporter.start(cfg.rounds, cfg.clients, f"{cfg.dataset} {cfg.protocol} {cfg.defense} (flwr run)")
    t0 = time.perf_counter()
    try:
        _wait_for_ray()
        plan = make_plan(prep, run_dir, reporter)
        plan.outcome["startup_seconds"] = time.perf_counter() - t0
        try:
            Federation(grid, plan).run()
        except Exception as exc:  # reported by finish() in one line, like sim.run
            plan.outcome["error"] = exc
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    finally:
        reporter.stop()
    plan.outcome["total_seconds"] = time.perf_counter() - t0
    code = finish(run_dir, prep, plan.outcome, reporter.console)
    if code:
        raise SystemExit(code)
