"""The simulator's configuration: YAML presets, CLI overrides, and validation before Ray starts.

A run is described by one :class:`SimConfig`. Client groups (heterogeneous clients) are a list
of :class:`GroupConfig`; fields a group leaves out inherit the top-level value, and a config
without ``groups`` has a single group made of the top-level values. Every error is a
:class:`ConfigError` naming the field and what is allowed, so ``sim.run`` can print one line
and exit 2 before anything is started or written. ``load_config`` remembers where each value
came from, so that such a line names the flag (``--clients``) or YAML file to fix.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import socket
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import yaml

from sim.data import DATASETS, PARTITIONS
from sim.models import ARCHS, SPLITS

PROTOCOLS = ("sflv1", "sflv2")
ADVERSARIES = ("passive", "active", "hijack")
RESERVOIR_SALT = 7  # seeds of the cloud's reservoirs (and its SFL-v2 waves)
ROUND_SALT = 11  # seeds of a round's server-side draws: sampling, wave order, evaluation noise
FAILURE_SALT = 13  # seeds of the injected client failures (--client-failure-rate)
HIJACK_SALT = 17  # seeds of a hijacking cloud's FSHA networks and draws (attacks.fsha)
DEVICES = ("cpu", "cuda", "auto")
MAX_SEED = 2**32 - 1  # every seed consumer (numpy, torch, random, flwr_datasets) accepts this range
CLI = "cli"  # the source of a value given as a command-line flag
# A number in e-notation that YAML 1.1 may read as a string (1e-3, 1.0e3).
_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
# A field path as errors name it: ``clients``, ``groups``, ``groups[1]``, ``groups[1].share``.
_FIELD_PATH = re.compile(r"([a-z_]+)(?:\[(\d+)\](?:\.([a-z_]+))?)?")


def derive_seed(*parts: int) -> int:
    """One seed per purpose, e.g. ``(run seed, round, client)``: reproducible whichever
    process or actor draws it, and independent of the seeds of other purposes."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class ConfigError(ValueError):
    """A bad configuration value: ``field`` names where, the message says what is allowed."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message


@dataclass
class GroupConfig:
    """One kind of client: its share of the clients and how it trains and defends."""

    name: str = ""
    share: float = 1.0
    defense: str | None = None
    cut: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    strategy: str | None = None


@dataclass
class SimConfig:
    """Everything that defines a run; the run directory stores it resolved."""

    clients: int = 10
    rounds: int = 3
    fraction: float = 1.0
    defense: str = "none"
    strategy: str = "FedAvg"
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    partition: str = "iid"
    alpha: float = 0.5
    classes_per_client: int = 2
    shards_per_client: int = 2
    protocol: str = "sflv2"
    split: str = "vanilla"
    adversary: str = "passive"
    seed: int = 0
    out: str = "runs"
    device: str = "cpu"
    client_cpus: float = 1.0
    client_gpus: float = 0.0
    ray_address: str | None = None
    epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-3
    cut: int = 4
    bottleneck: int = 8
    arch: str | None = None
    holdout: float = 0.1
    aux_fraction: float = 0.9
    reservoir: int = 512
    round_timeout: float | None = None
    client_failure_rate: float = 0.0
    train_subset: int | None = None
    attacks: str = "decoder"
    attacker_knowledge: str = "whitebox"
    attack_every: int = 0
    attack_samples: int = 64
    export_view: str | None = None
    groups: list[GroupConfig] = field(default_factory=list)

    # Where each top-level value came from: CLI or a YAML file's path; set by load_config so
    # that errors found later (validation, data, specs) can name the flag or file to fix.
    # Not a field: it is not part of the run's definition and is never saved.
    _sources: ClassVar[dict[str, str]] = {}

    def origin(self, where: str) -> str:
        """``where`` (a field path, e.g. ``groups[1].share``) as the user wrote it:
        ``--clients`` for a flag, ``FILE: groups[1].share`` for a YAML value; a group field
        the group left out names the top-level value it inherited. Unknown sources (defaults,
        a config built in code) leave ``where`` as it is."""
        match = _FIELD_PATH.fullmatch(where)
        if match is None:
            return where
        key, index, sub = match.groups()
        if key == "groups" and sub is not None and int(index) < len(self.groups) \
                and getattr(self.groups[int(index)], sub, None) is None and sub in self._sources:
            return f"{self.origin(sub)} (inherited by groups[{index}])"
        source = self._sources.get(key)
        if source is None:
            return where
        if source == CLI:
            return "--" + where.replace("_", "-")
        return f"{source}: {where}"

    def resolved_groups(self) -> list[GroupConfig]:
        """The groups with every field filled in from the top level."""
        groups = self.groups or [GroupConfig(name="all")]
        out = []
        for i, g in enumerate(groups):
            out.append(dataclasses.replace(
                g,
                name=g.name or f"group{i}",
                defense=g.defense if g.defense is not None else self.defense,
                cut=g.cut if g.cut is not None else self.cut,
                epochs=g.epochs if g.epochs is not None else self.epochs,
                batch_size=g.batch_size if g.batch_size is not None else self.batch_size,
                strategy=g.strategy if g.strategy is not None else self.strategy,
            ))
        return out

    def group_sizes(self) -> list[int]:
        """Clients per group: shares rounded down, the remainder to the largest fractions."""
        shares = [g.share for g in self.resolved_groups()]
        raw = [s * self.clients for s in shares]
        sizes = [math.floor(r) for r in raw]
        for i in sorted(range(len(raw)), key=lambda i: sizes[i] - raw[i])[: self.clients - sum(sizes)]:
            sizes[i] += 1
        return sizes

    def group_of(self) -> list[int]:
        """Group index of each partition id: contiguous blocks in group order."""
        return [g for g, n in enumerate(self.group_sizes()) for _ in range(n)]

    def to_dict(self) -> dict[str, Any]:
        """Plain data that :func:`config_from_dict` (and YAML) reads back."""
        data = dataclasses.asdict(self)
        if not data["groups"]:
            del data["groups"]
        return data


# ---------------------------------------------------------------------------------- loading


def _field_types(cls: type) -> dict[str, Any]:
    """The dataclass fields' resolved annotations (class variables such as ``_sources`` excluded)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in typing.get_type_hints(cls).items() if k in names}


def _coerce(where: str, value: Any, annotation: Any) -> Any:
    """Check a YAML/CLI value against a dataclass annotation (ints are accepted for floats)."""
    args = typing.get_args(annotation)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(where, "must not be empty")
    base = next((a for a in args if a is not type(None)), annotation) if args else annotation
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is float and isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
        number = repr(float(value)) if "e" not in repr(float(value)) else f"{float(value):e}"
        raise ConfigError(where, f"must be float, got the string {value!r} (YAML 1.1 reads a "
                                 f"number in e-notation as text unless it has a dot and a signed "
                                 f"exponent: write {number})")
    if base in (int, float, str, bool) and type(value) is not base:
        raise ConfigError(where, f"must be {base.__name__}, got {value!r}")
    return value


def _from_mapping(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(where, f"must be a mapping, got {type(data).__name__}")
    types = _field_types(cls)
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}" if where else unknown[0],
                          f"unknown key; allowed: {', '.join(types)}")
    kwargs = {}
    for key, value in data.items():
        at = f"{where}.{key}" if where else key
        if cls is SimConfig and key == "groups":
            if not isinstance(value, list) or not value:
                raise ConfigError(at, "must be a non-empty list of groups")
            kwargs[key] = [_from_mapping(GroupConfig, g, f"groups[{i}]") for i, g in enumerate(value)]
        else:
            kwargs[key] = _coerce(at, value, types[key])
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> SimConfig:
    return _from_mapping(SimConfig, data, "")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error.

    PyYAML silently keeps the last value, so ``clients: 4`` ... ``clients: 8`` further down
    would run with 8 clients without a word.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *anchor" merges may legitimately repeat keys
            key = self.construct_object(key_node, deep=deep)
            try:
                seen = key in first
            except TypeError:  # an unhashable key: the base class reports it
                break
            if seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (first at line {first[key] + 1})",
                    key_node.start_mark)
            first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: str) -> dict[str, Any]:
    """The mapping in the YAML file ``path`` (empty for an empty file); ConfigError otherwise."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError("--config", f"{path} is a folder, not a YAML file")
    if not p.is_file():
        raise ConfigError("--config", f"file not found: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("--config", f"{path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        loaded = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None)
        detail = f": {' '.join(str(problem).split())}" if problem else ""
        raise ConfigError("--config", f"{path} is not valid YAML{line}{detail}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError("--config", f"{path} must hold a mapping of settings, "
                                      f"got {type(loaded).__name__}")
    return loaded or {}


def load_config(path: str | None, overrides: dict[str, Any]) -> SimConfig:
    """Read a YAML preset (if any) and apply CLI overrides on top of it.

    The config remembers where each value came from (:meth:`SimConfig.origin`).
    """
    data = _read_yaml(path) if path is not None else {}
    try:
        cfg = _from_mapping(SimConfig, data, "")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.where}" if path else exc.where, exc.message) from None
    for key, value in overrides.items():
        setattr(cfg, key, _coerce(f"--{key.replace('_', '-')}", value, _field_types(SimConfig)[key]))
    cfg._sources = {**{key: str(path) for key in data}, **{key: CLI for key in overrides}}
    return cfg


@contextmanager
def located(cfg: SimConfig) -> Iterator[None]:
    """Re-raise a :class:`ConfigError` with its field named as the user wrote it (flag or file)."""
    try:
        yield
    except ConfigError as exc:
        raise ConfigError(cfg.origin(exc.where), exc.message) from None


# ------------------------------------------------------------------------------- validation


def _check(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise ConfigError(where, message)


def validate(cfg: SimConfig) -> None:
    """Check every value that can be checked without data or Ray; raise ConfigError."""
    for f in dataclasses.fields(cfg):  # NaN passes no range check, and inf passes "> 0"
        value = getattr(cfg, f.name)
        _check(not isinstance(value, float) or math.isfinite(value), f.name,
               f"must be a finite number, got {value}")
    for i, g in enumerate(cfg.groups):
        _check(math.isfinite(g.share), f"groups[{i}].share", f"must be a finite number, got {g.share}")
    _check(0 <= cfg.seed <= MAX_SEED, "seed", f"must be in 0..{MAX_SEED}, got {cfg.seed}")
    _check(cfg.out.strip() != "", "out", "must name a folder (it is empty)")
    _check(cfg.clients >= 1, "clients", f"must be at least 1, got {cfg.clients}")
    _check(cfg.rounds >= 1, "rounds", f"must be at least 1, got {cfg.rounds}")
    _check(0.0 < cfg.fraction <= 1.0, "fraction", f"must be in (0, 1], got {cfg.fraction}")
    _check(cfg.dataset in DATASETS, "dataset", f"'{cfg.dataset}' unknown; allowed: {', '.join(DATASETS)}")
    _check(cfg.partition in PARTITIONS, "partition",
           f"'{cfg.partition}' unknown; allowed: {', '.join(PARTITIONS)}")
    _check(cfg.alpha > 0, "alpha", f"must be > 0, got {cfg.alpha}")
    _check(cfg.classes_per_client >= 1, "classes_per_client", "must be at least 1")
    _check(cfg.shards_per_client >= 1, "shards_per_client", "must be at least 1")
    _check(cfg.protocol in PROTOCOLS, "protocol", f"'{cfg.protocol}' unknown; allowed: {', '.join(PROTOCOLS)}")
    _check(cfg.split in SPLITS, "split", f"'{cfg.split}' unknown; allowed: {', '.join(SPLITS)}")
    _check(cfg.adversary in ADVERSARIES, "adversary",
           f"'{cfg.adversary}' unknown; allowed: {', '.join(ADVERSARIES)}")
    # FSHA answers every client batch with its own gradient: it needs the shared tail's
    # per-batch exchange (SFL-v1 trains tail copies in the clients' actors) and dL/dz itself
    _check(cfg.adversary != "hijack" or (cfg.protocol == "sflv2" and cfg.split == "vanilla"), "adversary",
           f"hijack needs --protocol sflv2 and --split vanilla, got {cfg.protocol} and {cfg.split}")
    _check(cfg.device in DEVICES, "device", f"'{cfg.device}' unknown; allowed: {', '.join(DEVICES)}")
    _check(cfg.client_cpus > 0, "client_cpus", f"must be > 0, got {cfg.client_cpus}")
    _check(cfg.client_gpus >= 0, "client_gpus", f"must be >= 0, got {cfg.client_gpus}")
    _check(cfg.epochs >= 1, "epochs", f"must be at least 1, got {cfg.epochs}")
    _check(cfg.batch_size >= 1, "batch_size", f"must be at least 1, got {cfg.batch_size}")
    _check(0 < cfg.lr < math.inf, "lr", f"must be a positive number, got {cfg.lr}")
    _check(cfg.arch is None or cfg.arch in ARCHS, "arch",
           f"'{cfg.arch}' unknown; allowed: {', '.join(ARCHS)} (or leave it unset to choose from the data)")
    _check(cfg.bottleneck >= 1, "bottleneck", f"must be at least 1, got {cfg.bottleneck}")
    _check(0 <= cfg.holdout < 1, "holdout", f"must be in [0, 1), got {cfg.holdout}")
    _check(0 < cfg.aux_fraction < 1, "aux_fraction", f"must be in (0, 1), got {cfg.aux_fraction}")
    _check(cfg.reservoir >= 1, "reservoir", f"must be at least 1, got {cfg.reservoir}")
    _check(cfg.attack_every >= 0, "attack_every", f"must be >= 0 (0: final round only), got {cfg.attack_every}")
    _check(cfg.attack_samples >= 1, "attack_samples", f"must be at least 1, got {cfg.attack_samples}")
    _check(cfg.train_subset is None or cfg.train_subset >= 1, "train_subset", "must be at least 1")
    _check(cfg.round_timeout is None or cfg.round_timeout > 0, "round_timeout", "must be > 0 seconds")
    _check(0 <= cfg.client_failure_rate < 1, "client_failure_rate", f"must be in [0, 1), got {cfg.client_failure_rate}")
    _check(cfg.client_failure_rate == 0 or cfg.round_timeout is not None, "client_failure_rate",
           "needs --round-timeout: a client that vanishes is noticed only when the round's timeout passes")
    shares = [g.share for g in cfg.resolved_groups()]
    for i, s in enumerate(shares):
        _check(0 < s <= 1, f"groups[{i}].share", f"must be in (0, 1], got {s}")
    _check(abs(sum(shares) - 1.0) < 1e-6, "groups", f"shares must sum to 1, got {sum(shares):g}")
    for i, n in enumerate(cfg.group_sizes()):
        _check(n >= 1, f"groups[{i}].share",
               f"gives no client out of {cfg.clients}; raise the share or the number of clients")
    names: dict[str, int] = {}
    for i, g in enumerate(cfg.resolved_groups()):
        _check(g.epochs >= 1, f"groups[{i}].epochs", "must be at least 1")
        _check(g.batch_size >= 1, f"groups[{i}].batch_size", "must be at least 1")
        # Results, heads and metrics are keyed by group name: two groups must not share one.
        _check(g.name not in names, f"groups[{i}].name",
               f"'{g.name}' is also the name of groups[{names.get(g.name)}]; names must be unique")
        names[g.name] = i


def check_external(cfg: SimConfig) -> None:
    """Check the values that name things outside the process: the folder ``out`` and the
    file ``export_view`` the run writes, and the Ray cluster ``ray_address`` joins. They
    would otherwise fail only after the data is loaded (``out``), after the whole run (the
    export), or hang for minutes while Ray retries (a wrong address)."""
    _check_creatable(cfg.out, "out", folder=True)
    if cfg.export_view:
        _check_creatable(cfg.export_view, "export_view", folder=False)
    if cfg.ray_address:
        _check_ray_address(cfg.ray_address)


def _check_creatable(target: str, where: str, folder: bool) -> None:
    """``target`` (a folder or a file) exists as such or can be created: its nearest existing
    ancestor is a writable folder (what is missing in between is created)."""
    path = Path(target).absolute()
    if path.exists():
        _check(path.is_dir() == folder, where, f"{target} is a {'file' if folder else 'folder'}; "
                                               f"give a {'folder' if folder else 'file'} name")
        if folder:
            _check(os.access(path, os.W_OK | os.X_OK), where, f"{target} is not writable")
            return
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    _check(ancestor.is_dir(), where, f"cannot create {target}: {ancestor} is not a folder")
    _check(os.access(ancestor, os.W_OK | os.X_OK), where, f"cannot create {target}: {ancestor} is not writable")


def _check_ray_address(address: str) -> None:
    """``auto`` and ``local`` are Ray's own; ``[ray://]host:port`` must answer a TCP connect."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    _check(bool(host) and port.isdigit() and 0 < int(port) < 65536, "ray_address",
           f"'{address}' is not auto, local, host:port or ray://host:port")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=3).close()
    except OSError as exc:
        raise ConfigError("ray_address", f"nothing answers at {host}:{port} ({exc.strerror or exc}); "
                                         "is the cluster started (ray start --head)?") from None
