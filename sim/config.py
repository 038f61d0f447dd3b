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
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import yaml

from sim.data import DATASETS, PARTITIONS
from sim.models import ARCHS, SPLITS
from sim.spec import fits

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


Check = Callable[[Any], "str | None"]  # a value's problem in words, or None when it is fine


def setting(default: Any, help: str, check: Check | None = None) -> Any:
    """One setting of :class:`SimConfig`: its default, its help (the CLI's ``--help``) and its
    own check (run by :func:`validate` on values that are not None). The name and type are the
    field's; the CLI flag, YAML and ``flwr run`` keys are derived from them."""
    return field(default=default, metadata={"help": help, "check": check})


def at_least(low: int) -> Check:
    return lambda v: None if v >= low else f"must be at least {low}, got {v}"


def positive(v: float) -> str | None:
    return None if v > 0 else f"must be > 0, got {v}"


def within(low: float, high: float, closed: str = "[]") -> Check:
    """``low <= v <= high``, either end open (``closed`` as the interval is written: "(]" etc.)."""
    def check(v: float) -> str | None:
        above = v >= low if closed[0] == "[" else v > low
        below = v <= high if closed[1] == "]" else v < high
        return None if above and below else f"must be in {closed[0]}{low:g}, {high:g}{closed[1]}, got {v}"
    return check


def one_of(allowed: Iterable[str], unset: str = "") -> Check:
    allowed = tuple(allowed)
    return lambda v: None if v in allowed else f"'{v}' unknown; allowed: {', '.join(allowed)}{unset}"


@dataclass
class GroupConfig:
    """One kind of client as the user wrote it: fields left out inherit the top-level value."""

    name: str = ""
    share: float = 1.0
    defense: str | None = None
    cut: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    strategy: str | None = None


@dataclass(frozen=True)
class Group:
    """One kind of client, resolved: every field filled in from the top level."""

    name: str
    share: float
    defense: str
    cut: int
    epochs: int
    batch_size: int
    strategy: str


@dataclass
class SimConfig:
    """Everything that defines a run; the run directory stores it resolved.

    Each setting is defined once, here (:func:`setting`): name, type, default, help, check.
    """

    clients: int = setting(10, "number of simulated clients (one data partition each)", at_least(1))
    rounds: int = setting(3, "number of federated rounds", at_least(1))
    fraction: float = setting(1.0, "fraction of each group's clients sampled per round", within(0, 1, "(]"))
    defense: str = setting("none", 'client defense spec, composable with "+", e.g. "noise(sigma=0.05)"')
    strategy: str = setting("FedAvg", 'head aggregation: a flwr.serverapp.strategy class '
                            '("FedProx(proximal_mu=0.1)"), or "path.to.module:Class(...)"')
    dataset: str = setting("fashion-mnist", "fashion-mnist (embedded default), mnist, cifar10, cifar100 or svhn",
                           one_of(DATASETS))
    data_root: str | None = setting(None, "folder in torchvision's layout for datasets other than the embedded one")
    partition: str = setting("iid", "how the train split is divided over clients: iid, dirichlet, pathological, "
                             "shards", one_of(PARTITIONS))
    alpha: float = setting(0.5, "Dirichlet concentration for --partition dirichlet (smaller = more skewed)",
                           positive)
    classes_per_client: int = setting(2, "classes per client for --partition pathological", at_least(1))
    shards_per_client: int = setting(2, "shards per client for --partition shards", at_least(1))
    protocol: str = setting("sflv2", "sflv1 (a tail copy per client, averaged per round) or sflv2 (one shared "
                            "tail)", one_of(PROTOCOLS))
    split: str = setting("vanilla", "vanilla (the cloud's tail ends with the classifier; labels go to the "
                         "cloud) or ushaped (the client keeps the last layer: labels and predictions stay on "
                         "the client)", one_of(SPLITS))
    adversary: str = setting("passive", "passive (the cloud trains honestly), active (it trains its tail with "
                             "the malicious gradient-scaling optimiser of Fu et al., for the amc attack) or "
                             "hijack (FSHA, Pasquini et al.: it sends gradients that pull the heads into a "
                             "feature space it can invert, for the fsha attack; sflv2, vanilla split; the task "
                             "is not learnt)", one_of(ADVERSARIES))
    seed: int = setting(0, "seed of everything: sampling, partitions, initialisation, noise",
                        lambda v: None if 0 <= v <= MAX_SEED else f"must be in 0..{MAX_SEED}, got {v}")
    out: str = setting("runs", "folder under which the run directory is created",
                       lambda v: None if v.strip() else "must name a folder (it is empty)")
    device: str = setting("cpu", "where torch computes: cpu, cuda or auto", one_of(DEVICES))
    client_cpus: float = setting(1.0, "CPUs reserved per client actor (the actor pool size follows from it)",
                                 positive)
    client_gpus: float = setting(0.0, "GPU share per client actor, e.g. 0.25 packs four actors per GPU",
                                 lambda v: None if v >= 0 else f"must be >= 0, got {v}")
    ray_address: str | None = setting(None, "join an existing Ray cluster (e.g. auto) instead of starting a "
                                      "local one")
    epochs: int = setting(1, "local epochs per round", at_least(1))
    batch_size: int = setting(32, "local batch size", at_least(1))
    lr: float = setting(1e-3, "learning rate of heads and tails (Adam)",
                        lambda v: None if v > 0 else f"must be a positive number, got {v}")
    cut: int = setting(4, "cut layer: entries of the VGG config kept on the client")
    bottleneck: int = setting(8, "channels of the bottleneck conv at the cut", at_least(1))
    arch: str | None = setting(None, "network: small (28x28 gray) or vgg11_bn (32x32 RGB); chosen from the data "
                               "if unset", one_of(ARCHS, " (or leave it unset to choose from the data)"))
    holdout: float = setting(0.1, "fraction of each client's partition kept for its own accuracy",
                             within(0, 1, "[)"))
    aux_fraction: float = setting(0.9, "fraction of the test split given to the attacker as public auxiliary "
                                  "data", within(0, 1, "()"))
    reservoir: int = setting(512, "features kept per client in the cloud's recorded view", at_least(1))
    round_timeout: float | None = setting(None, "seconds to wait for a round's replies (in SFL-v2, for each "
                                          "wave of one client per actor); default: no limit",
                                          lambda v: None if v > 0 else "must be > 0 seconds")
    client_failure_rate: float = setting(0.0, "probability that a sampled client fails in a round, at a random "
                                         "batch: half crash (an error reply), half vanish (no reply: needs "
                                         "--round-timeout)", within(0, 1, "[)"))
    train_subset: int | None = setting(None, "use only this many (seeded, random) training samples: quick runs "
                                       "and tests", at_least(1))
    attacks: str = setting("decoder", 'attacks on the recorded features, comma-separated specs, e.g. '
                           '"decoder(epochs=20),rmle"; none to skip')
    attacker_knowledge: str = setting("whitebox", "what the cloud knows of the head: whitebox (its weights; "
                                      "SplitFed aggregates them), query (black-box access) or none")
    attack_every: int = setting(0, "also attack at every K-th round (leakage over rounds); 0: final round only",
                                lambda v: None if v >= 0 else f"must be >= 0 (0: final round only), got {v}")
    attack_samples: int = setting(64, "recorded features attacked per client", at_least(1))
    export_view: str | None = setting(None, "also write what the cloud saw to FILE.npz (and the heads to "
                                      "FILE.pt)")
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

    def resolved_groups(self) -> list[Group]:
        """The groups with every field filled in from the top level."""
        def pick(value: Any, key: str) -> Any:
            return getattr(self, key) if value is None else value
        return [Group(name=g.name or f"group{i}", share=g.share, defense=pick(g.defense, "defense"),
                      cut=pick(g.cut, "cut"), epochs=pick(g.epochs, "epochs"),
                      batch_size=pick(g.batch_size, "batch_size"), strategy=pick(g.strategy, "strategy"))
                for i, g in enumerate(self.groups or [GroupConfig(name="all")])]

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
    if base is float and isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
        number = repr(float(value)) if "e" not in repr(float(value)) else f"{float(value):e}"
        raise ConfigError(where, f"must be float, got the string {value!r} (YAML 1.1 reads a "
                                 f"number in e-notation as text unless it has a dot and a signed "
                                 f"exponent: write {number})")
    if base in (int, float, str, bool):
        if not fits(value, base):
            raise ConfigError(where, f"must be {base.__name__}, got {value!r}")
        return float(value) if base is float else value
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


def flags() -> list[tuple[str, type, str]]:
    """Each setting as a command-line flag: name, the type its text is read as, help."""
    out = []
    for name, annotation in _field_types(SimConfig).items():
        if name == "groups":  # groups are YAML only
            continue
        base = next((a for a in typing.get_args(annotation) if a is not type(None)), annotation)
        out.append((name, base, SimConfig.__dataclass_fields__[name].metadata["help"]))
    return out


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
        value, check = getattr(cfg, f.name), f.metadata.get("check")
        _check(not isinstance(value, float) or math.isfinite(value), f.name,
               f"must be a finite number, got {value}")
        if check is not None and value is not None:
            _check((problem := check(value)) is None, f.name, problem or "")
    for i, g in enumerate(cfg.groups):
        _check(math.isfinite(g.share), f"groups[{i}].share", f"must be a finite number, got {g.share}")
    # FSHA answers every client batch with its own gradient: it needs the shared tail's
    # per-batch exchange (SFL-v1 trains tail copies in the clients' actors) and dL/dz itself
    _check(cfg.adversary != "hijack" or (cfg.protocol == "sflv2" and cfg.split == "vanilla"), "adversary",
           f"hijack needs --protocol sflv2 and --split vanilla, got {cfg.protocol} and {cfg.split}")
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
    for i, group in enumerate(cfg.resolved_groups()):
        _check(group.epochs >= 1, f"groups[{i}].epochs", "must be at least 1")
        _check(group.batch_size >= 1, f"groups[{i}].batch_size", "must be at least 1")
        # Results, heads and metrics are keyed by group name: two groups must not share one.
        _check(group.name not in names, f"groups[{i}].name",
               f"'{group.name}' is also the name of groups[{names.get(group.name)}]; names must be unique")
        names[group.name] = i


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
