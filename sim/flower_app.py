"""The simulator as a Flower App, for ``flwr run .`` (components in ``pyproject.toml``).

Under ``flwr run`` Flower, not ``sim.run``, starts the simulation: its ``flwr-simulation``
process initialises Ray for the client actors and runs this ServerApp in a thread of the same
process. So the ServerApp (:meth:`sim.experiment.Experiment.serve`) waits until that Ray
instance is up, creates the cloud actor and puts the data in it (Flower's client actors reach
the cloud by name through it, as under ``sim.run``), and then runs the same
:class:`sim.server_app.Federation` and the same attack stage. The run config
(``[tool.flwr.app.config]``, the demo preset for ``flwr run``, or ``flwr run . --run-config
"rounds=5"``) takes any of ``sim.run``'s settings by name (``train-subset`` or ``train_subset``),
checked by the same definitions (:mod:`sim.config`); the number of clients must equal the
federation's number of simulated nodes (``num-supernodes``), and for SFL-v2 ``client-cpus``
must equal the federation's ``client-resources.num-cpus``: the cloud serves one wave of clients
per actor, and cannot ask Flower how many actors it made.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from sim import flower_poller
from sim.config import SimConfig, config_from_dict
from sim.experiment import USER_ERRORS, Experiment, RunFailed

app = ServerApp()


def config_from_run_config(run_config: dict[str, Any]) -> SimConfig:
    """A SimConfig from Flower's run config: keys as in sim.run, with - or _."""
    return config_from_dict({key.replace("-", "_"): value for key, value in run_config.items()})


@app.main()
def main(grid: Grid, context: Context) -> None:
    # Flower's runtime starts its message poller once its nodes are registered and its actors
    # built, seconds after this thread starts: in time for the one-walk poller in practice
    flower_poller.install()
    try:
        Experiment(config_from_run_config(dict(context.run_config))).serve(grid)
    except (*USER_ERRORS, RunFailed) as exc:
        raise SystemExit(f"error: {exc}") from None
