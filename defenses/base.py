"""The client-side defense interface, its registry and composition.

A defense's state has two kinds, by how it is declared: its ``nn.Parameter``s (e.g. MID's
bottleneck layer, an adversarial decoder) are trained and federated with the head, averaged
within the group like the head's weights; its buffers (``register_buffer``, e.g. CEM's
centroids) are the client's own: they travel with the client's messages, the server keeps
them between rounds (in the run's round shards), so they must stay small.

A defense sits between the head and the wire: ``forward(z)`` is what the cloud receives
(noise, dropout, top-k, ...), ``loss(x, z, y)`` adds a regulariser on the clean features
(CEM, NoPeek, ...), ``on_epoch_end`` refreshes any statistics (CEM's k-means), and in the
U-shaped split ``output_loss(h, y)`` adds a regulariser on the cloud's output h (InfoScissors'
prediction leakage), whose gradient reaches the cloud's tail through dL/dh, and
``protect_gradient(grad_h)`` changes the dL/dh the client sends back (gradient noise against
label inference from gradients).
Defenses are registered by name with typed keyword parameters so that one syntax,
``"noise(sigma=0.05)+cem(lam=8)"``, builds them from the CLI, YAML groups and tests alike.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar, cast

import numpy as np
import torch
from torch import nn

from sim.models import SplitSpec
from sim.registry import Registry
from sim.spec import SpecError, parse_chain


class DefenseError(ValueError):
    """A defense spec that cannot be built; the message is one line for the user."""


class Defense(nn.Module):
    """Base class: the identity with no regulariser. Subclasses override what they change."""

    name: ClassVar[str] = "none"

    def __init__(self) -> None:
        super().__init__()

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # noqa: D102 - see module docstring
        return z

    def loss(self, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Regulariser on the clean features ``z`` of inputs ``x`` with labels ``y``."""
        return z.new_zeros(())

    def output_loss(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Regulariser on the cloud's output ``h`` (U-shaped split only), added to the client's CE."""
        return h.new_zeros(())

    def protect_gradient(self, grad_h: torch.Tensor) -> torch.Tensor:
        """What the client sends back of its dL/dh (U-shaped split only); default unchanged."""
        return grad_h

    def needs_output(self) -> bool:
        """Whether :meth:`output_loss` or :meth:`protect_gradient` is active, i.e. the defense
        needs the U-shaped split (in the vanilla split the cloud's output never reaches the
        client, nor does the client send dL/dh)."""
        return False

    def on_epoch_end(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Hook after each local epoch with the clean features of the client's training data."""

    def wants_epoch_features(self) -> bool:
        """Whether :meth:`on_epoch_end` needs the features (computing them costs a pass)."""
        return False

    def report(self) -> dict[str, float]:
        """Numbers the client reports for the round it just trained (e.g. CEM's bound term)."""
        return {}

    def public_params(self) -> dict[str, Any]:
        """What a noise-aware attacker is assumed to know (CEM's threat model)."""
        return {}

    def bind(self, spec: SplitSpec) -> None:
        """Hook: the split this defense sits in: ``spec.feature_shape`` (one sample's z, e.g.
        ``(8, 7, 7)``), ``spec.in_shape`` (its input) and, where ``spec.ushaped``, the cloud's
        output h (``(spec.hidden_width,)``) and ``spec.num_classes``; default no-op.

        The simulator calls it right after every ``build_defense`` and before any state is
        read or loaded, so that defenses whose parameters depend on z's size (MID's layers),
        on the input's (a simulated attacker's decoder, which outputs images) or on h's (a
        simulated model-completion classifier) create them there: parameters are federated and
        must exist before data is seen.
        """

    def attach(self, parts: list[Defense]) -> None:
        """Hook: the other parts of the chain this defense was composed into; default no-op.

        :class:`Compose` calls it on every part with the whole chain (this part included),
        once, at construction: e.g. CEM reads the sigma of a ``noise`` part beside it.
        """


class Compose(Defense):
    """Chains ``forward`` left to right and sums ``loss``: ``dropout(p=0.2)+noise(sigma=0.01)``."""

    name = "compose"

    def __init__(self, parts: list[Defense]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        for part in parts:
            part.attach(list(parts))

    def _chain(self) -> Iterable[Defense]:
        """``parts`` typed as the defenses they are (a ModuleList iterates as plain Modules)."""
        return cast("Iterable[Defense]", self.parts)

    def bind(self, spec: SplitSpec) -> None:
        for part in self._chain():
            part.bind(spec)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for part in self._chain():
            z = part(z)
        return z

    def loss(self, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return sum((part.loss(x, z, y) for part in self._chain()), z.new_zeros(()))

    def output_loss(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return sum((part.output_loss(h, y) for part in self._chain()), h.new_zeros(()))

    def protect_gradient(self, grad_h: torch.Tensor) -> torch.Tensor:
        for part in self._chain():
            grad_h = part.protect_gradient(grad_h)
        return grad_h

    def needs_output(self) -> bool:
        return any(part.needs_output() for part in self._chain())

    def on_epoch_end(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        for part in self._chain():
            part.on_epoch_end(features, labels)

    def wants_epoch_features(self) -> bool:
        return any(part.wants_epoch_features() for part in self._chain())

    def report(self) -> dict[str, float]:
        return {f"{part.name}.{k}": v for part in self._chain() for k, v in part.report().items()}

    def public_params(self) -> dict[str, Any]:
        return {f"{i}.{part.name}.{k}": v for i, part in enumerate(self._chain())
                for k, v in part.public_params().items()}

FEDERATED_PREFIX = "defense."


def federated_arrays(defense: Defense) -> dict[str, np.ndarray]:
    """The defense's parameters, prefixed so they can travel in the head's ArrayRecord."""
    return {FEDERATED_PREFIX + k: v.detach().cpu().numpy().copy() for k, v in defense.named_parameters()}


def local_arrays(defense: Defense) -> dict[str, np.ndarray]:
    """The defense's buffers: the client's persistent, never-shared state."""
    return {k: v.detach().cpu().numpy().copy() for k, v in defense.named_buffers()}


def load_arrays(defense: Defense, federated: dict[str, np.ndarray], local: dict[str, np.ndarray]) -> None:
    """Load parameters (from a head record, prefixed) and buffers (from the client's state).

    Either may be missing entries (a first round has no client state yet); what is given must
    match the defense's own names and shapes.
    """
    own = dict(defense.named_parameters()) | dict(defense.named_buffers())
    given = {k[len(FEDERATED_PREFIX):]: v for k, v in federated.items() if k.startswith(FEDERATED_PREFIX)}
    given |= local
    with torch.no_grad():
        for k, v in given.items():
            if k not in own:
                raise ValueError(f"defense state has no entry '{k}'")
            v = np.asarray(v)
            if own[k].dim() == 0 and v.size == 1:  # a scalar (BatchNorm's count) comes
                v = v.reshape(())  # back 1-d from Flower's Array
            if own[k].shape != v.shape:  # e.g. CEM centroids sized by what the client saw
                own[k].data = torch.tensor(v, dtype=own[k].dtype)
            else:
                own[k].copy_(torch.as_tensor(np.array(v)))


REGISTRY: Registry[Defense] = Registry("defense", DefenseError, Defense)
register = REGISTRY.register


def build_defense(text: str) -> Defense:
    """Build a defense from its spec text; a chain becomes a :class:`Compose`."""
    try:
        specs = parse_chain(text)
    except SpecError as exc:
        raise DefenseError(f"defense '{text}': {exc}") from None
    parts = [REGISTRY.build(s) for s in specs]
    parts = [p for p in parts if type(p) is not Defense]  # "none" in a chain adds nothing
    if len(parts) == 1:
        return parts[0]
    return Compose(parts) if parts else Defense()


def describe_registry() -> str:
    return REGISTRY.describe_all()


register(Defense)  # "none"
