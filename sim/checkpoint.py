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
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"
SHARDS = "shards"  # the run directory's folder of per-round shards (:class:`RoundShards`)
FORMAT = 2  # 2: per-client arrays in round shards, the checkpoint holds their index


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


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> int:
    """``write`` into a temporary file beside ``path``, flushed to disk, then renamed over it:
    a crash leaves the old file or the new one, never a torn one. Returns the bytes written."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)
    return size


def save(run_dir: Path, state: dict[str, Any]) -> int:
    """Write ``state`` as the run's checkpoint, atomically; returns its size in bytes."""
    return atomic_write(run_dir / CHECKPOINT, lambda f: torch.save({"format": FORMAT, **state}, f))


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


class RoundShards:
    """Arrays per key (a client), the latest of each kept on disk in one file per round, with
    only an index (key -> round) in memory.

    :meth:`put` holds a key's new arrays in memory until :meth:`flush` writes the round's shard
    ``r00003.npz`` (atomically, plain ``.npy`` members, no pickle). A checkpoint then stores
    the index: what it writes per round is what changed that round plus the small state,
    whatever the number of clients. :meth:`prune`, called once a checkpoint is safely written,
    removes the shards it no longer points to; a crash before that leaves the previous
    checkpoint's shards in place, and a round run again after a resume rewrites its shard.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.index: dict[str, int] = {}
        self._pending: dict[str, dict[str, np.ndarray]] = {}
        self._open: dict[int, Any] = {}  # round -> its shard, opened once (members read lazily)

    def put(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        self._pending[key] = arrays

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        """The key's latest arrays, or None if it has none."""
        if key in self._pending:
            return self._pending[key]
        if key not in self.index:
            return None
        r = self.index[key]
        if r not in self._open:
            self._open[r] = np.load(self._path(r), allow_pickle=False)
        shard, prefix = self._open[r], f"{key}/"
        return {name[len(prefix):]: shard[name] for name in shard.files if name.startswith(prefix)}

    def flush(self, round_: int) -> int:
        """Write what was put since the last flush as round ``round_``'s shard; its bytes."""
        if not self._pending:
            return 0
        self.directory.mkdir(parents=True, exist_ok=True)
        arrays = {f"{key}/{name}": a for key, named in self._pending.items() for name, a in named.items()}
        self._close(round_)
        # ignore: mypy checks **arrays against savez's allow_pickle: bool too (no key here is that name)
        size = atomic_write(self._path(round_), lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]
        self.index.update(dict.fromkeys(self._pending, round_))
        self._pending.clear()
        return size

    def state(self) -> dict[str, int]:
        if self._pending:
            raise RuntimeError(f"{len(self._pending)} keys put but not flushed")
        return dict(self.index)

    def load_state(self, index: dict[str, int]) -> None:
        self.index = {str(k): int(r) for k, r in index.items()}
        self._pending.clear()

    def prune(self) -> None:
        """Delete the shards the index no longer points to."""
        keep = set(self.index.values())
        for path in self.directory.glob("r*.npz"):
            r = int(path.stem[1:])
            if r not in keep:
                self._close(r)
                path.unlink()

    def _path(self, round_: int) -> Path:
        return self.directory / f"r{round_:05d}.npz"

    def _close(self, round_: int) -> None:
        shard = self._open.pop(round_, None)
        if shard is not None:
            shard.close()
