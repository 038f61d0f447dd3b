"""``python -m sim.sweep SWEEP.yaml``: one run per point of a grid of settings, resumable, and a report.

A sweep file (presets in ``configs/sweeps/``)::

    name: quick                       # optional; default: the file's name without .yaml
    config: ../default.yaml           # optional preset every point starts from (relative to this file)
    base:                             # settings of every point: any sim.run setting, as in a --config file
      clients: 4
      attacks: "decoder(epochs=1, width=16, blocks=1, batch_size=32)"
    grid:                             # crossed with every family; each key a non-empty list
      seed: [0, 1]
    families:                         # optional: one curve each in the report
      noise:
        defense: "noise(sigma={sigma})"   # the family's settings ...
        grid: {sigma: [0.05, 0.2]}        # ... and its strengths
      topk:
        defense: "topk(ratio={ratio})"
        grid: {ratio: [0.5, 0.9]}
    reference: noise                  # optional: the family the others are compared with (default: the first)

A grid key is a setting (``seed``, ``rounds``, ``defense``, ``groups``, ...) or a template
parameter: a key that is no setting fills ``{key}`` wherever it appears in the text of the
settings (defense specs and their parameters, group defenses, attacks). A setting may come from
one of ``grid``, a family's settings and its grid only. The points are every combination of
``grid`` with every combination of each family's grid (without ``families``: of ``grid`` alone).

The report (:mod:`sim.sweep_report`) draws one curve per family over its strength: the values
of the family's first grid key; the family's other grid keys and the sweep grid's keys except
``seed`` split it into several curves (``noise+cem (lam=0.1)``); seeds are repeats. Without
``families`` a point's family is its defense's name (``noise``), its strength the rest of its
grid values.

Every point's config is built and checked as ``sim.run`` checks a --config file
(:func:`sim.config.config_from_dict`, :func:`sim.config.validate`) before anything runs: a bad
sweep file gets one line on stderr and exit code 2. A point that fails later (a defense
parameter out of range, a crash) is recorded with its one-line error and the others go on.

Each point is an ordinary run directory, made by its own ``python -m sim.run --config
points/<id>/point.yaml`` process under ``<out>/points/<id>/``. ``sweep_state.json`` (JSON,
replaced atomically) records each point's status, run directory, seconds and error. Run again,
a sweep skips the points done, goes on with an interrupted point from its checkpoint (``sim.run
--resume``) and retries failed ones; a point's id carries a hash of its settings, so a point
whose settings changed is a new point. ``--jobs N`` runs N points at once, each pinned to its
share of the CPUs; ``--ray-address`` runs every point on that Ray cluster.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import fcntl
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import yaml

from sim.checkpoint import CHECKPOINT
from sim.config import ConfigError, SimConfig, _read_yaml, check_external, config_from_dict, load_config, validate
from sim.spec import SpecError, one_line, parse_chain

FIELDS = {f.name for f in dataclasses.fields(SimConfig)}
SWEEP_KEYS = ("name", "config", "base", "grid", "families", "reference")
STATE = "sweep_state.json"
_PLACEHOLDER = re.compile(r"\{([A-Za-z_]\w*)\}")
_PR_SET_PDEATHSIG = 1


class SweepError(ValueError):
    """A bad sweep file or option: one line for the user, exit code 2."""


@dataclass
class Point:
    """One run of the sweep: its settings and where the report puts it."""

    id: str
    family: str
    curve: str  # the family, and the values that split it into several curves
    strength: str  # the label of its place on the curve ("sigma=0.05"), "" for a single point
    order: tuple  # sorts the curve's strengths
    seed: int
    values: dict[str, Any]  # the grid values that made it (sweep grid and family grid)
    config: dict[str, Any]  # the resolved sim.run config (SimConfig.to_dict), ``out`` excluded


# ---------------------------------------------------------------------------- the sweep file


def _grid(data: Any, where: str) -> dict[str, list[Any]]:
    if not isinstance(data, dict) or not data:
        raise SweepError(f"{where}: must be a non-empty mapping of settings to lists of values")
    for key, values in data.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{where}.{key}: must be a non-empty list of values, got {values!r}")
    return data


def _combinations(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]


def _fill(value: Any, params: dict[str, Any]) -> Any:
    """``value`` with ``{key}`` replaced by the parameter's value, in every text inside it."""
    if isinstance(value, str):
        return _PLACEHOLDER.sub(lambda m: str(params[m.group(1)]) if m.group(1) in params else m.group(0), value)
    if isinstance(value, list):
        return [_fill(v, params) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, params) for k, v in value.items()}
    return value


def _placeholders(value: Any) -> set[str]:
    if isinstance(value, str):
        return set(_PLACEHOLDER.findall(value))
    if isinstance(value, (list, dict)):
        return set().union(*map(_placeholders, value.values() if isinstance(value, dict) else value))
    return set()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "-", text).strip("-")


def _label(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def _family_of(config: dict[str, Any]) -> str:
    """A defense's name chain (``noise+cem``); the text itself when it does not parse."""
    try:
        return "+".join(spec.name for spec in parse_chain(str(config["defense"])))
    except SpecError:
        return str(config["defense"])


def _not_allowed(key: str) -> str:
    if key == "out":
        return "set by the sweep itself (--out)"
    return f"unknown setting; allowed: {', '.join(sorted(FIELDS - {'out'}))}"


def _point(path: str, family: str | None, own: list[str], settings: dict[str, Any], values: dict[str, Any],
           sources: dict[str, str], seen: dict[str, str]) -> Point:
    """The point of ``values`` (sweep and family grid values): its config built and validated as
    sim.run does, its place in the report and its id; SweepError naming where a bad value was given."""
    raw = _fill(settings | {k: v for k, v in values.items() if k in FIELDS},
                {k: v for k, v in values.items() if k not in FIELDS})
    try:
        cfg = config_from_dict(raw)
        validate(cfg)
    except ConfigError as exc:
        field_name = re.match(r"[a-z_]*", exc.where)
        assert field_name is not None  # the pattern matches every string, if only with ""
        source = sources.get(field_name.group(0), "config")
        raise SweepError(f"{path}: {source}.{exc.where}: {exc.message} (point {_label(values)})") from None
    config = {k: v for k, v in cfg.to_dict().items() if k != "out"}
    digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
    if digest in seen:
        raise SweepError(f"{path}: the points {seen[digest]} and {_label(values)} have the same settings")
    seen[digest] = _label(values)
    name = family or _family_of(config)
    strength = {k: values[k] for k in (own[:1] if family else [k for k in values if k != "seed"])}
    splits = {k: v for k, v in values.items() if k != "seed" and k not in strength}
    curve = f"{name} ({_label(splits)})" if family and splits else name
    pid = f"{_slug('_'.join([name, *(f'{k}={v}' for k, v in values.items())]))[:80]}-{digest}"
    order = tuple((0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for v in strength.values())
    return Point(pid, name, curve, _label(strength), order, cfg.seed, values, config)


def load_sweep(path: str) -> tuple[str, list[Point], str]:
    """The sweep's name, its points (every config checked) and its reference family; SweepError."""
    try:
        data = _read_yaml(path)
    except ConfigError as exc:
        raise SweepError(exc.message) from None
    unknown = sorted(set(data) - set(SWEEP_KEYS))
    if unknown:
        raise SweepError(f"{path}: {unknown[0]}: unknown key; allowed: {', '.join(SWEEP_KEYS)}")
    name = data.get("name", Path(path).stem)
    if not isinstance(name, str) or not _slug(name):
        raise SweepError(f"{path}: name: must be a folder name, got {name!r}")
    if not isinstance(data.get("config", ""), str):
        raise SweepError(f"{path}: config: must be the path of a preset, got {data['config']!r}")
    try:
        start = load_config(str(Path(path).parent / data["config"]), {}).to_dict() if "config" in data else {}
    except ConfigError as exc:
        where = "" if exc.where == "--config" else f"{exc.where}: "
        raise SweepError(f"{path}: config: {where}{exc.message}") from None
    base = {} if data.get("base") is None else data["base"]
    if not isinstance(base, dict):
        raise SweepError(f"{path}: base: must be a mapping of settings, got {type(base).__name__}")
    grid = _grid(data["grid"], f"{path}: grid") if "grid" in data else {}
    families = data.get("families", {})
    if "families" in data and (not isinstance(families, dict) or not families):
        raise SweepError(f"{path}: families: must be a non-empty mapping of family names to settings")
    if not grid and not families:
        raise SweepError(f"{path}: the sweep has no grid and no families: nothing to vary")
    fams: dict[str | None, tuple[dict[str, Any], dict[str, list[Any]]]] = {}
    for fname, fam in families.items():
        where = f"{path}: families.{fname}"
        if not isinstance(fam, dict):
            raise SweepError(f"{where}: must be a mapping of settings (and a grid), got {type(fam).__name__}")
        settings = {k: v for k, v in fam.items() if k != "grid"}
        fams[str(fname)] = (settings, _grid(fam["grid"], f"{where}.grid") if "grid" in fam else {})
    fams = fams or {None: ({}, {})}
    reference = data.get("reference", next(iter(fams)) or "")
    if families and reference not in fams:
        raise SweepError(f"{path}: reference: '{reference}' is not a family; families: {', '.join(map(str, fams))}")

    for key in [*base, *(k for k in grid if k == "out")]:
        if key not in FIELDS or key == "out":
            raise SweepError(f"{path}: {'base' if key in base else 'grid'}.{key}: {_not_allowed(key)}")
    jobs = []
    used: set[str] = set()
    for fname, (settings, own) in fams.items():
        where = f"families.{fname}"
        for key in [*settings, *(k for k in own if k == "out")]:
            if key not in FIELDS or key == "out":
                raise SweepError(f"{path}: {where}{'' if key in settings else '.grid'}.{key}: {_not_allowed(key)}")
        places = (("grid", grid), (where, settings), (f"{where}.grid", own))
        for key in {*grid, *settings, *own}:
            given = [place for place, keys in places if key in keys]
            if len(given) > 1:
                raise SweepError(f"{path}: {key}: given by both {given[0]} and {given[1]}; give it once")
        sources = {k: "config" for k in start} | {k: "base" for k in base} | \
            {k: place for place, keys in places for k in keys}
        params = {k for k in {*grid, *own} if k not in FIELDS}
        wanted = set().union(*map(_placeholders, (start, base, settings, {k: v for k, v in {**grid, **own}.items()
                                                                          if k in FIELDS})))
        if wanted - params:
            raise SweepError(f"{path}: {{{sorted(wanted - params)[0]}}} in the settings of "
                             f"{where if fname else 'the sweep'} is no grid key")
        used |= wanted
        jobs += [(fname, list(own), start | base | settings, top | mine, sources)
                 for top, mine in itertools.product(_combinations(grid), _combinations(own))]
    unused = sorted(k for k in {*grid, *(k for _, own in fams.values() for k in own)} - FIELDS - used)
    if unused:
        raise SweepError(f"{path}: grid key '{unused[0]}' is no setting and no {{{unused[0]}}} uses it; "
                         f"settings: {', '.join(sorted(FIELDS - {'out'}))}")
    seen: dict[str, str] = {}
    points = [_point(path, *job, seen) for job in jobs]
    points.sort(key=lambda p: p.seed)  # every family's first seed first: early results cover every curve
    return _slug(name), points, str(reference)


# ------------------------------------------------------------------------------ the runner


def write_json(path: Path, data: Any) -> None:
    """Atomically: a temporary file, flushed, renamed over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_state(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    path = sweep_dir / STATE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())["points"]
    except (ValueError, KeyError, TypeError) as exc:
        raise SweepError(f"{path} is not a sweep state ({one_line(exc)}); move it away to start afresh") from None


def run_dir_of(point_dir: Path) -> Path | None:
    """The run directory sim.run made under a point's folder, if any."""
    dirs = sorted(d for d in point_dir.glob("*") if (d / "config.yaml").is_file())
    return dirs[-1] if dirs else None


def error_line(log: Path, returncode: int) -> str:
    """The run's own one-line error (its last ``error:`` line), or how it ended."""
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    if errors:
        return errors[-1]
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit code {returncode} (see {log})"


def _pin(cpus: set[int] | None) -> Any:
    """The child's set-up: dies with the sweep (SIGTERM when the sweep's process goes, even by
    SIGKILL, so no run outlives it) and, under --jobs, stays on its share of the CPUs."""
    parent = os.getpid()

    def setup() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the sweep died before the line above
            os._exit(143)
        if cpus:
            os.sched_setaffinity(0, cpus)

    return setup


@dataclass
class Running:
    point: Point
    proc: subprocess.Popen
    slot: int
    started: float


class Sweep:
    """Runs the points not done yet, ``jobs`` at a time, and keeps ``sweep_state.json``.

    Run directories are recorded relative to the sweep's folder, so the folder may be moved.
    """

    def __init__(self, sweep_dir: Path, points: list[Point], jobs: int, ray_address: str | None) -> None:
        self.dir, self.points, self.jobs, self.ray_address = sweep_dir, points, jobs, ray_address
        self.state = load_state(sweep_dir)
        cpus = sorted(os.sched_getaffinity(0))
        local = jobs > 1 and not ray_address
        self.slots = [set(cpus[i::jobs]) or set(cpus) if local else None for i in range(jobs)]
        self.todo = [p for p in points if not self.done(p)]
        self.running: list[Running] = []
        self.durations: list[float] = [s["seconds"] for s in self.state.values() if s.get("status") == "done"]
        self.signal: int | None = None  # set by SIGINT/SIGTERM: stop the points and return

    def status(self, point: Point) -> str:
        return self.state.get(point.id, {}).get("status", "pending")

    def run_dir(self, point: Point) -> Path | None:
        entry = self.state.get(point.id, {})
        return self.dir / entry["run_dir"] if entry.get("run_dir") else None

    def done(self, point: Point) -> bool:
        run_dir = self.run_dir(point)
        return self.status(point) == "done" and run_dir is not None and (run_dir / "summary.json").is_file()

    def save(self) -> None:
        write_json(self.dir / STATE, {"points": self.state})

    def progress(self, text: str) -> None:
        done = sum(map(self.done, self.points))
        waiting = {p.id for p in self.todo}  # failed before and to be tried again
        failed = sum(self.status(p) == "failed" and p.id not in waiting for p in self.points)
        left = len(self.todo) + len(self.running)
        if self.durations and left:
            eta = sum(self.durations) / len(self.durations) * (len(self.todo) + len(self.running) / 2) / self.jobs
            eta_text = f"~{eta / 60:.0f} min left" if eta >= 60 else f"~{eta:.0f} s left"
        else:
            eta_text = "time left known after the first point" if left else "finished"
        print(f"[{done}/{len(self.points)} done, {len(self.running)} running, {failed} failed, {eta_text}] {text}",
              flush=True)

    def launch(self, point: Point, slot: int) -> None:
        point_dir = self.dir / "points" / point.id
        point_dir.mkdir(parents=True, exist_ok=True)
        previous = run_dir_of(point_dir)
        if previous is not None and (previous / CHECKPOINT).is_file():
            args, how = ["--resume", str(previous)], f"goes on from {previous.name}'s checkpoint"
        else:
            for stale in [d for d in point_dir.iterdir() if d.is_dir()]:  # killed before its first checkpoint
                shutil.rmtree(stale)
            (point_dir / "point.yaml").write_text(yaml.safe_dump(point.config | {"out": str(point_dir)},
                                                                 sort_keys=False))
            args = ["--config", str(point_dir / "point.yaml")]
            args += ["--ray-address", self.ray_address] if self.ray_address else []
            how = "started"
        env = dict(os.environ)
        cpus = self.slots[slot]
        if cpus:
            env |= dict.fromkeys(("OMP_NUM_THREADS", "MKL_NUM_THREADS"), str(len(cpus)))
        with (point_dir / "log.txt").open("a") as log:
            proc = subprocess.Popen([sys.executable, "-m", "sim.run", *args], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, preexec_fn=_pin(cpus))
        self.running.append(Running(point, proc, slot, time.monotonic()))
        self.state[point.id] = {"status": "running", "label": _label(point.values)}
        self.save()
        self.progress(f"{point.id}: {how}")

    def reap(self, job: Running) -> None:
        point_dir = self.dir / "points" / job.point.id
        rc, seconds = job.proc.returncode, round(time.monotonic() - job.started, 1)
        run_dir = run_dir_of(point_dir)
        entry = {"status": "done" if rc == 0 else "failed", "label": _label(job.point.values),
                 "run_dir": str(run_dir.relative_to(self.dir)) if run_dir else None, "seconds": seconds}
        if rc == 0:
            assert run_dir is not None  # a run that succeeded made its run directory
            self.durations.append(seconds)
            summary = json.loads((run_dir / "summary.json").read_text())
            text = f"done in {seconds:.0f} s, accuracy {summary['final_accuracy']:.3f}"
        else:
            entry["error"] = error_line(point_dir / "log.txt", rc)
            text = f"failed: {entry['error']}"
        self.running.remove(job)
        self.state[job.point.id] = entry
        self.save()
        self.progress(f"{job.point.id}: {text}")

    def stop_all(self) -> None:
        """SIGTERM every running point (each kills its own Ray), SIGKILL what is left after a
        minute; their points go on from their checkpoints next time."""
        for job in self.running:
            if job.proc.poll() is None:
                job.proc.terminate()
        deadline = time.monotonic() + 60
        for job in self.running:
            try:
                job.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                job.proc.kill()
                job.proc.wait()
            self.state[job.point.id] = {"status": "interrupted", "label": _label(job.point.values)}
        self.running.clear()
        self.save()

    def run(self) -> None:
        """Every point not done; returns early (points stopped, state saved) once a signal came."""
        self.progress(f"{len(self.points) - len(self.todo)} points done before, {len(self.todo)} to run"
                      + (f", {self.jobs} at a time" if self.jobs > 1 else ""))
        while (self.todo or self.running) and self.signal is None:
            busy = {job.slot for job in self.running}
            for slot in range(self.jobs):
                if self.todo and slot not in busy:
                    self.launch(self.todo.pop(0), slot)
            time.sleep(0.5)
            for job in [j for j in self.running if j.proc.poll() is not None]:
                self.reap(job)
        self.stop_all()


def build_parser() -> argparse.ArgumentParser:
    from sim.run import Parser

    p = Parser(prog="python -m sim.sweep", description="Run a sweep of simulations (a grid of settings) "
                "and write its report; run it again to go on where it stopped.")
    p.add_argument("sweep", help="the sweep file (see configs/sweeps/)")
    p.add_argument("--out", help="the sweep's folder (default: runs/sweeps/<name>)")
    p.add_argument("--jobs", type=int, default=1, help="points run at once, each on its share of the CPUs "
                   "(default 1)")
    p.add_argument("--ray-address", help="run every point on this Ray cluster (sim.run --ray-address)")
    p.add_argument("--families", help="run and report only these families of the sweep file (comma-separated "
                   "names; the reference family among them)")
    return p


def select_families(points: list[Point], reference: str, names: str) -> list[Point]:
    """The points of the families named in ``names`` (comma-separated); SweepError for an
    unknown name or a selection without the reference family."""
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    known = list(dict.fromkeys(p.family for p in points))
    unknown = [n for n in chosen if n not in known]
    if not chosen or unknown:
        raise SweepError(f"--families: {', '.join(unknown) or 'none given'}: the sweep's families are "
                         f"{', '.join(known)}")
    if reference and reference not in chosen:
        raise SweepError(f"--families: the reference family '{reference}' must be among them")
    return [p for p in points if p.family in chosen]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.jobs < 1:
            raise SweepError(f"--jobs: must be at least 1, got {args.jobs}")
        name, points, reference = load_sweep(args.sweep)
        if args.families is not None:
            points = select_families(points, reference, args.families)
        sweep_dir = Path(args.out or Path("runs") / "sweeps" / name)
        probe = config_from_dict(points[0].config | {"out": str(sweep_dir)}
                                 | ({"ray_address": args.ray_address} if args.ray_address else {}))
        try:
            check_external(probe)
        except ConfigError as exc:
            raise SweepError(f"{'--ray-address' if exc.where == 'ray_address' else '--out'}: {exc.message}") from None
        sweep_dir.mkdir(parents=True, exist_ok=True)
        lock = (sweep_dir / ".lock").open("w")  # held until this process ends, however it ends
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepError(f"another sweep is running in {sweep_dir}") from None
        sweep = Sweep(sweep_dir, points, args.jobs, args.ray_address)
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if Path(args.sweep).resolve() != (sweep_dir / "sweep.yaml").resolve():
        shutil.copyfile(args.sweep, sweep_dir / "sweep.yaml")
    previous = {sig: signal.signal(sig, lambda signum, _: setattr(sweep, "signal", signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        sweep.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if sweep.signal is not None:
        print(f"error: stopped by {signal.Signals(sweep.signal).name}; run the same command again to go on "
              "where it stopped", file=sys.stderr)
        return 128 + sweep.signal
    from sim.sweep_report import write_report

    runs = cast(dict[str, Path], {p.id: sweep.run_dir(p) for p in points if sweep.done(p)})  # done: has a run dir
    errors = {p.id: sweep.state[p.id]["error"] for p in points if sweep.status(p) == "failed"}
    report = write_report(sweep_dir, points, runs, errors, reference)
    for pid, text in errors.items():
        print(f"failed: {pid}: {text}", file=sys.stderr)
    print(f"{len(runs)} of {len(points)} points done  ->  {report}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
