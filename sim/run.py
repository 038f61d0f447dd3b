"""``python -m sim.run``: the command line, a thin shell over :class:`sim.experiment.Experiment`.

Exit codes: 0 done; 2 a bad setting, data file or checkpoint (one line, before Ray starts, no
run directory left behind); 1 the run failed once started (what was done is kept, with a
checkpoint to ``--resume`` from).
"""

from __future__ import annotations

import argparse
import sys

from defenses import describe_registry
from sim.config import flags, load_config
from sim.experiment import USER_ERRORS, Experiment, RunFailed


class Parser(argparse.ArgumentParser):
    """Errors in one line and exit 2, without the usage dump (also used by ``sim.sweep``)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m sim.run", description=(
        "Simulate federated split learning with defended client heads and a curious cloud. "
        f"Defenses: {describe_registry()}."), argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="YAML preset (see configs/); flags given on the command line override it")
    p.add_argument("--resume", metavar="RUN_DIR", help="go on with a stopped run from its last complete "
                   "round (its checkpoint); takes no other flag")
    for name, kind, text in flags():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, help=text)
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    config_path = args.pop("config", None)
    resume_dir = args.pop("resume", None)
    try:
        if resume_dir is not None:
            experiment = Experiment.resume(resume_dir, args | ({"config": 1} if config_path else {}))
        else:
            experiment = Experiment(load_config(config_path, args))
        results = experiment.run()
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    accuracy = results.final_accuracy
    print(f"final accuracy {accuracy * 100:.2f} %  ->  {results.run_dir}" if accuracy is not None
          else f"done  ->  {results.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
