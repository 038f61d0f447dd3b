"""Checkpoints: everything a run needs to go on after a crash, one file per run directory.

After every round the server writes ``checkpoint.pt`` atomically (a temporary file in the same
folder, flushed to disk, then renamed over the old one), so a crash at any moment leaves
either the previous round's checkpoint or the new one, never a torn file. It holds the group
heads, the cloud's state (tails, their optimisers, the recorded view), each strategy's state,
each client's own persistent state, the server's RNG states and the metrics so far.

Only tensors and plain Python values (dicts, lists, strings, numbers) are stored, and the file
is read with ``torch.load(..., weights_only=True)``: loading a checkpoint someone hands you
cannot run code. Numpy arrays are stored as tensors and come back as numpy arrays.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt or from another format."""


def encode(value: Any) -> Any:
    """Numpy arrays (at any depth of dicts, lists and tuples) as tensors; the rest as is."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value))  # a copy: arrays from Ray are read-only
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def decode(value: Any) -> Any:
    """The inverse of :func:`encode`: tensors back to numpy arrays (tuples come back as lists)."""
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, dict):
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


def rng_state() -> dict[str, Any]:
    """The server process's RNG states (each round reseeds them, but a resumed process starts
    exactly where the killed one was)."""
    version, internal, gauss = random.getstate()
    return {"python": [version, list(internal), gauss], "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])


def save(run_dir: Path, state: dict[str, Any]) -> None:
    """Write ``state`` as the run's checkpoint, atomically."""
    path = run_dir / CHECKPOINT
    tmp = path.with_name(f".{CHECKPOINT}.tmp")
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(run_dir, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)


def load(run_dir: Path) -> dict[str, Any]:
    """Read a run's checkpoint; :class:`CheckpointError` with one line if it cannot be used."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint (is this a run directory of sim.run?)")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: corrupt or not a checkpoint ({reason[:160]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of format {FORMAT}")
    return state
