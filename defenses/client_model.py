"""A client's model as a split and a defense spec make it: head, defense, U-shaped last layer.

Every process that rebuilds a client's model (the client actors, the server's evaluation,
the attack stage) assembles it here, from a group's model state (the head, the defense's
federated parameters, the last layer) and the client's own defense state.
"""

from __future__ import annotations

import numpy as np
import torch

from defenses.base import FEDERATED_PREFIX, Defense, build_defense, federated_arrays, load_arrays
from sim.models import LAST_PREFIX, SplitSpec, build_head, build_last, load_numpy_state, state_to_numpy


def make_defense(spec: SplitSpec, defense_text: str) -> Defense:
    """Build a defense for features of ``spec``'s shape (layers sized by z exist from the start),
    and in the U-shaped split for the cloud's output h and the classes (InfoScissors' phi)."""
    defense = build_defense(defense_text)
    defense.bind(spec)
    return defense


def initial_model(spec: SplitSpec, defense_text: str) -> dict[str, np.ndarray]:
    """A group's first model: a fresh head and the defense's fresh federated parameters, and in
    the U-shaped split the client's fresh last layer (federated with the head)."""
    model = state_to_numpy(build_head(spec)) | federated_arrays(make_defense(spec, defense_text))
    if spec.ushaped:
        model |= {LAST_PREFIX + k: v for k, v in state_to_numpy(build_last(spec)).items()}
    return model


def build_client_model(spec: SplitSpec, defense_text: str, model_state: dict[str, np.ndarray],
                       client_state: dict[str, np.ndarray]) -> tuple[torch.nn.Module, Defense]:
    """Head and defense loaded from a group model state and a client's own defense state."""
    head = build_head(spec)
    load_numpy_state(head, {k: v for k, v in model_state.items()
                            if not k.startswith((FEDERATED_PREFIX, LAST_PREFIX))})
    defense = make_defense(spec, defense_text)
    load_arrays(defense, model_state, client_state)
    return head, defense


def build_client_last(spec: SplitSpec, model_state: dict[str, np.ndarray]) -> torch.nn.Module | None:
    """The U-shaped client's last layer from a group model state; None in the vanilla split."""
    if not spec.ushaped:
        return None
    layer = build_last(spec)
    load_numpy_state(layer, {k[len(LAST_PREFIX):]: v for k, v in model_state.items()
                             if k.startswith(LAST_PREFIX)})
    return layer
