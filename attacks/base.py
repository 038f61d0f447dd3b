"""The attack interface: what the curious cloud knows, and one entry point per attack phase.

An attack is fitted once on what the cloud legitimately has (its :class:`Knowledge` and public
auxiliary images) and then run on recorded features. Neither entry point ever receives a sample
id or a victim's image: only the scorer (:mod:`attacks.scoring`) maps ids to true images, so an
attack cannot peek at what it is trying to reconstruct (breaching's ``base_attack`` pattern).

Knowledge comes in three levels, ordered by what the cloud can do with the client's head:

* ``"whitebox"``: the group's aggregated head weights (in SplitFed the server aggregates heads,
  so it has them; in the U-shaped split also the client's last layer, federated with the head)
  and query access;
* ``"query"``: black-box access only, ``query(x01) -> z``: the head and the client's defense
  forward (fresh noise on every call), as when the cloud can have its own images processed;
* ``"none"``: only what the cloud owns: its tail, the public defense spec and the dataset's
  public normalisation (Knowledge Alignment).

Attacks are registered by name, as defenses are, so that configs and tests build them with one
syntax: ``build_attack("decoder", epochs=5)`` or ``build_attack("decoder(epochs=5)")``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from defenses import build_defense
from sim.models import SPLITS, SplitSpec, normalise
from sim.registry import Registry
from sim.spec import SpecError, parse_call

LEVELS = ("none", "query", "whitebox")  # ordered: each level includes what the one before allows


class AttackError(ValueError):
    """An attack that cannot be built or cannot run with the given knowledge (one line)."""


def _level_rank(level: str) -> int:
    if level not in LEVELS:
        raise AttackError(f"unknown knowledge level '{level}'; known: {', '.join(LEVELS)}")
    return LEVELS.index(level)


# --------------------------------------------------------------------------- knowledge


@dataclass
class Knowledge:
    """What the cloud knows when it attacks one group's features.

    ``head`` (and ``last``, U-shaped) is set only at level ``"whitebox"``, ``query`` at
    ``"whitebox"`` and ``"query"``;
    everything else is the cloud's own or public. ``split`` (the SplitSpec) is public: the
    architecture is part of the protocol, which is what lets KA build a surrogate head.
    """

    level: str
    image_shape: tuple[int, ...]  # (C, H, W)
    feature_shape: tuple[int, int, int]
    num_classes: int
    tail: nn.Module | None  # the cloud's own tail (eval mode, a private copy)
    defense_spec: str = "none"
    defense_public: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    split: SplitSpec | None = None
    head: nn.Module | None = None  # whitebox only: the aggregated head (eval mode, a copy)
    query: Callable[[torch.Tensor], torch.Tensor] | None = None  # x01 -> z (defense applied)
    # whitebox only: the same oracle through the head the attacked round started from (the
    # server sent it to the clients), whose features were recorded early in the round
    start_query: Callable[[torch.Tensor], torch.Tensor] | None = None
    defense: nn.Module | None = None  # the public defense forward (eval mode, a copy)
    # Every feature the cloud recorded of this group's clients (pooled, no sample ids): what a
    # distribution-matching attacker (SDAR, FORA) aligns its substitute head to.
    observed: torch.Tensor | None = None
    # U-shaped: the dL/dh rows recorded with ``observed`` (row-aligned), for gradient attacks
    observed_grads: torch.Tensor | None = None
    # whitebox, U-shaped only: the client's aggregated last layer h -> logits (eval mode, a copy)
    last: nn.Module | None = None
    # Networks the cloud trained for itself during the federation, by name (state dicts): an
    # active adversary's, e.g. FSHA's inverse network (attacks.fsha); empty for an honest one.
    cloud_models: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.defense is None:  # the public spec is always known
            self.defense = build_defense(self.defense_spec)
            if self.split is not None:  # unbound, a defense with layers says so when used
                self.defense.bind(self.split)
            self.defense.eval()
        rank = _level_rank(self.level)
        if (self.head is not None or self.last is not None) and rank < _level_rank("whitebox"):
            raise AttackError(f"knowledge level '{self.level}' must not carry the client's weights")
        if self.query is not None and rank < _level_rank("query"):
            raise AttackError(f"knowledge level '{self.level}' must not carry query access")
        if self.start_query is not None and rank < _level_rank("whitebox"):
            raise AttackError(f"knowledge level '{self.level}' must not carry the starting head")

    def oracles(self, heads: str = "both") -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """The query oracles of the round's heads: ``"end"`` (the aggregated head),
        ``"start"`` (the head the round began with, white-box only) or ``"both"`` (those held).

        The recorded features of a round come from heads between the two: each client
        trains from the start head towards its own update, of which the end head is the mean.
        """
        if self.query is None:
            raise AttackError(f"knowledge level '{self.level}' gives no query access")
        if heads == "end":
            return [self.query]
        if heads == "start":
            if self.start_query is None:
                raise AttackError("the round's starting head is not known (white-box knowledge of "
                                  "a run that saved it is needed)")
            return [self.start_query]
        return [self.query] + ([self.start_query] if self.start_query is not None else [])

    def allows(self, level: str) -> bool:
        """Whether this knowledge includes everything ``level`` grants."""
        return _level_rank(self.level) >= _level_rank(level)

    def normalise(self, x01: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> head inputs, with the dataset's public normalisation."""
        return normalise(x01, self.mean, self.std)

    @classmethod
    def from_models(cls, level: str, head: nn.Module | None, tail: nn.Module | None,
                    defense_spec: str, spec: SplitSpec, mean: tuple[float, ...],
                    std: tuple[float, ...], defense: nn.Module | None = None,
                    start_head: nn.Module | None = None, last: nn.Module | None = None) -> Knowledge:
        """Build the knowledge of ``level`` from the group's models, dropping what it forbids.

        The query oracle holds private eval-mode copies of ``head`` and of the defense (built
        from ``defense_spec``, or ``defense`` when its trained parameters matter, e.g. MID's
        layer), normalises the [0, 1] input itself and returns detached features: one call is
        one fresh pass, noise included. Copies keep an attack from changing the simulator's
        models (BatchNorm statistics, ``requires_grad``). The oracle is a closure over the
        head, so the level is a threat-model convention that attacks honour (``needs``), not
        a sandbox. ``last`` (the U-shaped client's last layer) is kept only at ``"whitebox"``.
        """
        rank = _level_rank(level)
        # A defense's trained parameters (MID's layers) travel with the head: only a
        # white-box cloud has them; others know the public spec and build it afresh.
        if defense is not None and rank >= _level_rank("whitebox"):
            defense_mod = copy.deepcopy(defense)
        else:
            defense_mod = build_defense(defense_spec)
            defense_mod.bind(spec)
        defense_mod.eval()
        public_params = getattr(defense_mod, "public_params", None)
        public = dict(public_params()) if public_params is not None else {}
        query = head_copy = start_query = None
        if rank >= _level_rank("query"):
            if head is None:
                raise AttackError(f"knowledge level '{level}' needs the head to answer queries")
            head_copy = _frozen_copy(head)
            query = _make_query(head_copy, defense_mod, tuple(mean), tuple(std))
        if rank >= _level_rank("whitebox") and start_head is not None:
            start_query = _make_query(_frozen_copy(start_head), defense_mod, tuple(mean), tuple(std))
        return cls(level=level, image_shape=tuple(spec.in_shape), feature_shape=spec.feature_shape,
                   num_classes=spec.num_classes,
                   tail=_frozen_copy(tail) if tail is not None else None,
                   defense_spec=defense_spec, defense_public=public, mean=tuple(mean),
                   std=tuple(std), split=spec,
                   head=head_copy if rank >= _level_rank("whitebox") else None, query=query,
                   start_query=start_query, defense=defense_mod,
                   last=_frozen_copy(last) if last is not None and rank >= _level_rank("whitebox") else None)


def _frozen_copy(module: nn.Module) -> nn.Module:
    """An eval-mode copy whose parameters need no gradients (inputs still get them)."""
    module = copy.deepcopy(module).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _make_query(head: nn.Module, defense: nn.Module, mean: tuple[float, ...],
                std: tuple[float, ...],
                batch: int = 1024) -> Callable[[torch.Tensor], torch.Tensor]:
    """The black-box oracle ``x01 -> defense(head(normalise(x01)))``, without gradients."""
    device = next(head.parameters()).device

    def query(x01: torch.Tensor) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for start in range(0, len(x01), batch):
                x = x01[start:start + batch].to(device, torch.float32)
                out.append(defense(head(normalise(x, mean, std))))
        return torch.cat(out).to(x01.device)

    return query


# ----------------------------------------------------------------------------- attacks


class Attack:
    """Base class. Subclasses set ``name`` and ``needs`` and implement ``_fit`` and ``_run``.

    ``fit`` checks the knowledge level, the split and the auxiliary data before any work, so
    that an attack the cloud is not entitled to fails at once with a clear message; ``run``
    checks the features' shape against the one fitted on and returns, in the same order,
    [0, 1] images (``kind = "inversion"``) or int64 class labels (``kind = "completion"``).
    An attack that sets ``uses_gradients`` implements ``_run(features, gradients)`` instead:
    the U-shaped dL/dh rows recorded with the features, which the stage then passes.
    """

    name: ClassVar[str] = ""
    needs: str = "none"  # the minimum knowledge level (an instance may raise it: gradlabel's mode)
    kind: ClassVar[str] = "inversion"  # or "completion": recovers labels, not images
    splits: ClassVar[tuple[str, ...]] = SPLITS  # the splits (sim.models.SPLITS) it works on
    adversary: ClassVar[str] = "passive"  # "active": needs a cloud that trained maliciously
    # True: ``run`` also takes the dL/dh rows the cloud recorded with the features (U-shaped)
    uses_gradients: ClassVar[bool] = False

    def __init__(self) -> None:
        self.knowledge: Knowledge | None = None

    def fit(self, knowledge: Knowledge, aux_images01: torch.Tensor,
            aux_labels: torch.Tensor | None = None) -> None:
        """Prepare the attack from the cloud's knowledge and public, [0, 1] auxiliary images.

        ``aux_labels`` (int64, one per image) are the public labels of the auxiliary data;
        only attacks that need them (KA; pmc and amc, 4 per class) read them.
        """
        if not knowledge.allows(self.needs):
            raise AttackError(f"attack '{self.name}' needs knowledge level '{self.needs}' or "
                              f"above, but the cloud has '{knowledge.level}'")
        split = knowledge.split.split if knowledge.split is not None else "vanilla"
        if split not in self.splits:
            raise AttackError(f"attack '{self.name}' works on the {' or '.join(self.splits)} split, "
                              f"not on a {split} one")
        aux = _as_images(aux_images01, knowledge.image_shape, "auxiliary images")
        if aux_labels is not None:
            aux_labels = torch.as_tensor(np.asarray(aux_labels), dtype=torch.int64)
            if aux_labels.shape != (len(aux),):
                raise AttackError(f"aux_labels must have shape ({len(aux)},), got "
                                  f"{tuple(aux_labels.shape)}")
        self.knowledge = knowledge
        self._fit(knowledge, aux, aux_labels)

    def run(self, features: torch.Tensor, gradients: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruct images in [0, 1], shape (B, C, H, W), or predict labels (B,) for
        completion attacks, from features (B, *feature_shape); attacks that declare
        ``uses_gradients`` also get the recorded dL/dh rows of the same samples (B, ...)."""
        if self.knowledge is None:
            raise AttackError(f"attack '{self.name}': call fit() before run()")
        z = _as_float(features)
        if tuple(z.shape[1:]) != tuple(self.knowledge.feature_shape):
            raise AttackError(f"attack '{self.name}': features of shape {tuple(z.shape[1:])}, "
                              f"fitted for {tuple(self.knowledge.feature_shape)}")
        if self.uses_gradients:
            if gradients is None:
                raise AttackError(f"attack '{self.name}' needs the gradients the cloud recorded "
                                  "(the U-shaped split's dL/dh), but the view has none")
            g = _as_float(gradients)
            if len(g) != len(z):
                raise AttackError(f"attack '{self.name}': {len(g)} gradient rows for {len(z)} features")
            out = self._run(z, g)
        else:
            out = self._run(z)
        if self.kind == "completion":
            return out.to(torch.int64).cpu()
        return out.clamp(0.0, 1.0).cpu()

    def _fit(self, knowledge: Knowledge, aux01: torch.Tensor,
             aux_labels: torch.Tensor | None) -> None:
        raise NotImplementedError

    # ``*gradients``: an attack that ``uses_gradients`` overrides this as ``_run(features, gradients)``
    def _run(self, features: torch.Tensor, *gradients: Any) -> torch.Tensor:
        raise NotImplementedError

    def scratch(self, images01: torch.Tensor) -> torch.Tensor:
        """Completion attacks: the reference labels, predicted without the features (the stage
        scores them beside the attack's)."""
        raise NotImplementedError


def _as_float(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).to(torch.float32)


def _as_images(x: torch.Tensor, shape: tuple[int, ...], what: str) -> torch.Tensor:
    """Check a float (N, C, H, W) batch in [0, 1] (the one image space attacks work in)."""
    x = torch.as_tensor(x)
    if not x.is_floating_point() or tuple(x.shape[1:]) != tuple(shape) or len(x) == 0:
        raise AttackError(f"{what} must be a non-empty float (N, {', '.join(map(str, shape))}) "
                          f"tensor in [0, 1], got {x.dtype} {tuple(x.shape)}")
    if x.min() < 0 or x.max() > 1:
        raise AttackError(f"{what} must lie in [0, 1] (got {x.min():.3g}..{x.max():.3g}); "
                          f"attacks work in un-normalised image space")
    return x.to(torch.float32)


# ---------------------------------------------------------------------------- registry

ATTACKS: Registry[Attack] = Registry("attack", AttackError, Attack)
register = ATTACKS.register


def build_attack(name: str, **params: Any) -> Attack:
    """Build a registered attack: ``build_attack("rmle", steps=300)``.

    ``name`` may also be spec text, ``"rmle(steps=300)"``; keyword arguments given here
    override the ones in the text.
    """
    try:
        spec = parse_call(name)
    except SpecError as exc:
        raise AttackError(f"attack '{name}': {exc}") from None
    attack = ATTACKS.build(spec, **params)
    _level_rank(attack.needs)
    return attack


def describe_registry() -> str:
    return ATTACKS.describe_all()
