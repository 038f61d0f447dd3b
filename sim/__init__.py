"""The simulator: config, data, models, the Flower apps, the cloud and the pipeline.

Ray reads some settings once per process, when ``ray._raylet`` is first imported, and every
path of this project to Ray goes through a module of this package, so they are set here,
before any of them can import Ray (``python -m sim.run``, the benchmarks, a notebook alike).
"""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report leaves the machine
# Token authentication for every Ray this process starts or joins; the token itself is made per
# run (``sim.experiment._locked_down``). RAY_AUTH_MODE=disabled, set by the user, only serves to join a
# cluster without authentication (``--ray-address``).
AUTH_MODE_GIVEN = "RAY_AUTH_MODE" in os.environ
os.environ.setdefault("RAY_AUTH_MODE", "token")
