"""The adversary's view: what the curious cloud keeps of the features it receives.

Per client, a bounded reservoir (Vitter's algorithm R) of ``(sample id, z)`` exactly as they
arrived, from the latest round in which that client trained: an attack at round r pairs those
features with that round's aggregated head. Sample ids index the dataset's train split, so a
separate scorer can map each feature back to its true image; attacker code sees only ids and
features.

In the U-shaped split the client also sends the gradient dL/dh of its loss with respect to the
tail's output; it arrives after the batch's features (the client needs h first), and the cloud
keeps it on the same rows the reservoir chose for those features (:meth:`Reservoir.attach`),
so row i of the gradients belongs to row i of the features and sample ids.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sim.checkpoint import RoundShards, atomic_write


@dataclass
class Reservoir:
    """Uniform sample of at most ``capacity`` rows of a stream, reproducible from ``seed``."""

    capacity: int
    seed: int
    round: int = 0
    seen: int = 0
    ids: list[int] = field(default_factory=list)
    rows: list[np.ndarray] = field(default_factory=list)
    # U-shaped: the dL/dh row of each kept row (None until the batch's backward brings it)
    grads: list[np.ndarray | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self._slots: list[int] | None = None  # the last batch's rows: kept at slot, or -1

    def add(self, sample_ids: np.ndarray, z: np.ndarray) -> None:
        """Offer a batch; each row is kept with probability capacity / rows seen so far.

        Where each row went is remembered until the next batch, for :meth:`attach`.
        """
        slots = []
        for sid, row in zip(sample_ids.tolist(), z):
            slot = -1
            if len(self.ids) < self.capacity:
                self.ids.append(sid)
                self.rows.append(row.copy())
                self.grads.append(None)
                slot = len(self.ids) - 1
            else:
                j = int(self._rng.integers(0, self.seen + 1))
                if j < self.capacity:
                    self.ids[j] = sid
                    self.rows[j] = row.copy()
                    self.grads[j] = None  # an older row's gradient must not stay on the new one
                    slot = j
            slots.append(slot)
            self.seen += 1
        self._slots = slots

    def attach(self, grads: np.ndarray) -> None:
        """Keep the gradient rows of the batch last offered on the rows kept of it (the same
        decisions, no draw): a later row of the batch that replaced an earlier one wins."""
        if self._slots is None or len(self._slots) != len(grads):
            raise RuntimeError(f"{len(grads)} gradient rows for a batch of "
                               f"{0 if self._slots is None else len(self._slots)} recorded rows")
        for slot, row in zip(self._slots, grads):
            if slot >= 0:
                self.grads[slot] = row.copy()
        self._slots = None

    def arrays(self, feature_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(self.ids, dtype=np.int64)
        z = np.stack(self.rows) if self.rows else np.zeros((0, *feature_shape), np.float32)
        return ids, z

    def grad_array(self) -> np.ndarray | None:
        """The kept rows' gradients (NaN where a row's backward never came, e.g. the client
        failed in between); None when no gradient was recorded (the vanilla split)."""
        known = [g for g in self.grads if g is not None]
        if not known:
            return None
        missing = np.full_like(known[0], np.nan)
        return np.stack([missing if g is None else g for g in self.grads])


@dataclass
class ClientView:
    """Everything the cloud saw of one client, in plain arrays (easy to ship through Ray)."""

    partition_id: int
    group: int
    cut: int  # the client's cut layer: clients cut differently send features of other shapes
    round: int
    sample_ids: np.ndarray  # (n,) int64, indices into the train split
    features: np.ndarray  # (n, C, H, W) float32, as received (after the client's defense)
    seen: int  # features received in that round, of which ``n`` are kept
    bytes_received: int  # cumulative over the run: features and labels sent by the client
    bytes_sent: int  # cumulative over the run: gradients returned to the client
    failed: bool = False  # the client failed in that round: features of an unfinished round
    grads: np.ndarray | None = None  # U-shaped: (n, *h_shape) dL/dh, row-aligned; else None


# What a stored view keeps per client besides its arrays (small, in memory); "rows" is n.
VIEW_META = ("partition_id", "group", "cut", "round", "seen", "bytes_received", "bytes_sent", "failed", "rows")
_ARRAYS = ("sample_ids", "features", "grads")


class FeatureStore:
    """The cloud's memory of every client, keyed by partition id (stable across runs).

    A client's features from its latest completed round are what attacks use. What the cloud
    received in a round the client then failed (it crashed or vanished mid-round) is kept too,
    apart (``get(pid, failed=True)``), marked as such in the saved view: a curious cloud keeps
    everything, but those features were made by a head the server never aggregated.

    The arrays live on disk, in per-round shards under ``directory``
    (:class:`sim.checkpoint.RoundShards`); memory holds the index and each client's few
    numbers, so the view's memory does not grow with the number of clients, and a checkpoint
    writes only the round's new shard and :meth:`state`.
    """

    def __init__(self, directory: Path) -> None:
        self.shards = RoundShards(directory)
        self.meta: dict[str, list[int]] = {}  # "done-3" / "failed-3": the view's VIEW_META values
        self._bytes: dict[int, tuple[int, int]] = {}

    def put(self, view: ClientView) -> None:
        """Replace a client's (completed or failed) features with those of its latest such
        round; add up its bytes."""
        old_in, old_out = self._bytes.get(view.partition_id, (0, 0))
        total = (old_in + view.bytes_received, old_out + view.bytes_sent)
        self._bytes[view.partition_id] = total
        view.bytes_received, view.bytes_sent = total
        key = _key(view.partition_id, view.failed)
        self.meta[key] = [int(getattr(view, f)) for f in VIEW_META[:-1]] + [len(view.sample_ids)]
        self.shards.put(key, {f: a for f in _ARRAYS if (a := getattr(view, f)) is not None})

    def get(self, partition_id: int, failed: bool = False) -> ClientView | None:
        """What the cloud kept of a client's latest completed (or failed) round, if any."""
        key = _key(partition_id, failed)
        if key not in self.meta:
            return None
        meta: dict[str, Any] = dict(zip(VIEW_META, self.meta[key]))
        del meta["rows"]
        arrays = self.shards.get(key) or {}
        return ClientView(**meta | {"failed": bool(meta["failed"])}, sample_ids=arrays["sample_ids"],
                          features=arrays["features"], grads=arrays.get("grads"))

    def partitions(self, failed: bool = False) -> list[int]:
        return sorted(int(k.split("-")[1]) for k in self.meta if k.startswith(_key(0, failed)[:-1]))

    def flush(self, round_: int) -> int:
        """Write the views put since the last flush to disk as round ``round_``'s shard."""
        return self.shards.flush(round_)

    def prune(self) -> None:
        self.shards.prune()

    def state(self) -> dict[str, Any]:
        """The index and numbers (for checkpoints); the arrays stay in their shards."""
        return {"meta": self.meta, "shards": self.shards.state(),
                "bytes": {p: list(b) for p, b in self._bytes.items()}}

    def load_state(self, state: dict[str, Any]) -> None:
        self.meta = {str(k): [int(x) for x in v] for k, v in state["meta"].items()}
        self.shards.load_state(state["shards"])
        self._bytes = {int(p): (int(b[0]), int(b[1])) for p, b in state["bytes"].items()}

    def save(self, path: str) -> None:
        """Write the view as one ``.npz`` of flat arrays (no pickle), ordered by partition id,
        streamed client by client (memory holds one client's arrays at a time).

        Features of different cut layers have different shapes, so every array is stored per
        cut: ``features_c4``, ``sample_ids_c4``, ... and ``cuts`` lists the cuts present. In
        the U-shaped split ``grads_c4`` holds the dL/dh rows (NaN rows for a client without
        any); views without gradients have no such array.
        """
        keys = [_key(p, False) for p in self.partitions()] + [_key(p, True) for p in self.partitions(True)]
        meta = {k: dict(zip(VIEW_META, self.meta[k])) for k in keys}
        cuts = sorted({m["cut"] for m in meta.values()})

        def arrays_of(key: str) -> dict[str, np.ndarray]:
            arrays = self.shards.get(key)
            assert arrays is not None, key  # put() stored arrays under every key of the index
            return arrays

        def write(f: Any) -> None:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
                _write_npy(zf, "cuts", [np.asarray(cuts, np.int64)], len(cuts))
                for cut in cuts:
                    members = [k for k in keys if meta[k]["cut"] == cut]
                    rows = [meta[k]["rows"] for k in members]
                    for name, field_ in (("client_ids", "partition_id"), ("group_ids", "group"),
                                         ("rounds", "round"), ("failed", "failed")):
                        values = np.repeat([meta[k][field_] for k in members], rows)
                        _write_npy(zf, f"{name}_c{cut}", [values.astype(bool if name == "failed" else np.int64)],
                                   sum(rows))
                    for name in ("sample_ids", "features"):
                        _write_npy(zf, f"{name}_c{cut}", (arrays_of(k)[name] for k in members), sum(rows))
                    known = next((g for k in members if (g := arrays_of(k).get("grads")) is not None), None)
                    if known is not None:
                        _write_npy(zf, f"grads_c{cut}", (
                            arrays["grads"] if "grads" in arrays
                            else np.full((len(arrays["sample_ids"]), *known.shape[1:]), np.nan, known.dtype)
                            for arrays in (arrays_of(k) for k in members)), sum(rows))

        atomic_write(Path(path), write)


def _key(partition_id: int, failed: bool) -> str:
    return f"{'failed' if failed else 'done'}-{partition_id}"


def _write_npy(zf: zipfile.ZipFile, name: str, chunks: Iterable[np.ndarray], rows: int) -> None:
    """One ``name.npy`` member of ``rows`` rows: ``chunks`` stacked along their first axis,
    written as they come (dtype and row shape from the first)."""
    written, header = 0, False
    with zf.open(f"{name}.npy", "w", force_zip64=True) as out:
        for chunk in chunks:
            if not header:
                header = True
                np.lib.format.write_array_header_2_0(out, {
                    "descr": np.lib.format.dtype_to_descr(chunk.dtype), "fortran_order": False,
                    "shape": (rows, *chunk.shape[1:])})
            out.write(np.ascontiguousarray(chunk).tobytes())
            written += len(chunk)
    if written != rows:
        raise RuntimeError(f"{name}: {written} rows written, {rows} expected")


VIEW_FIELDS = ("client_ids", "group_ids", "rounds", "failed", "sample_ids", "features")
OPTIONAL_FIELDS = ("grads",)  # only in views that recorded them (the U-shaped split)


def load_view(path: str) -> dict[int, dict[str, np.ndarray]]:
    """Read a saved view: per cut layer, the arrays of :data:`VIEW_FIELDS` (row-aligned) and
    those of :data:`OPTIONAL_FIELDS` the view has."""
    with np.load(path, allow_pickle=False) as data:
        return {int(c): {f: data[f"{f}_c{c}"] for f in VIEW_FIELDS + OPTIONAL_FIELDS
                         if f in VIEW_FIELDS or f"{f}_c{c}" in data}
                for c in data["cuts"]}
