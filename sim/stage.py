"""The attack stage: attack what the cloud recorded and score it, client by client.

It reads only saved artefacts of a run (the view and the models of a round), so it runs the
same after a simulation, at every K-th round's snapshot, or on a run directory someone else
produced. Per group it builds the cloud's :class:`~attacks.base.Knowledge` from the group's
aggregated head (as the threat model allows), fits each attack once on the public auxiliary
data, then runs it on every client's recorded features. Only the scorer sees true images.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks.base import ATTACKS, Attack, AttackError, Knowledge, build_attack
from attacks.scoring import Scorer
from attacks.threads import fastest_threads, torch_threads
from defenses.client_model import build_client_last, build_client_model
from sim.data import ImageData, to_tensor
from sim.models import SplitSpec, build_tail, load_numpy_state
from sim.spec import parse_call, split_top_level
from sim.view import load_view

METRICS = ("mse", "psnr", "ssim")  # of inversion attacks; completion rows have their accuracies


def parse_attacks(text: str) -> list[str]:
    """``"decoder(epochs=20),rmle"`` -> the attack specs; ``"none"`` or empty -> no attack.

    An empty entry between commas (``"decoder,,rmle"``, ``"decoder,"``) is an error rather
    than skipped: it is most likely an attack whose name went missing.
    """
    parts = [p.strip() for p in split_top_level(text or "", ",")]
    if parts == [""]:
        return []
    if "" in parts:
        raise AttackError(f"entry {parts.index('') + 1} of {len(parts)} in '{text}' is empty "
                          "(a stray comma?)")
    return [] if parts == ["none"] else parts


@dataclass
class Snapshot:
    """What the cloud held after one round: its recorded view and the models."""

    round: int
    view: dict[int, dict[str, np.ndarray]]  # per cut: client_ids, group_ids, sample_ids, features
    heads: dict[str, dict[str, np.ndarray]]  # per group name: head + federated defense state
    tails: dict[int, dict[str, np.ndarray]]  # per cut
    # per group name: the head the round started from (runs saved before it was kept lack it)
    start_heads: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    # per cut: networks the cloud trained for its attacks, by name (FSHA's inverse network)
    cloud_models: dict[int, dict[str, dict[str, np.ndarray]]] = field(default_factory=dict)


def load_snapshot(directory: Path, round_: int) -> Snapshot:
    """Read the ``view.npz`` and ``model.pt`` the server saved for a round."""
    models = torch.load(directory / "model.pt", weights_only=True)
    as_numpy = lambda state: {k: v.numpy() for k, v in state.items()}  # noqa: E731
    return Snapshot(round_, load_view(str(directory / "view.npz")),
                    {g: as_numpy(s) for g, s in models["heads"].items()},
                    {int(c): as_numpy(s) for c, s in models["tails"].items()},
                    {g: as_numpy(s) for g, s in models.get("start_heads", {}).items()},
                    {int(c): {n: as_numpy(s) for n, s in m.items()} for c, m in models.get("cloud_models", {}).items()})


@dataclass
class StageResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # per attack, summed over groups
    examples: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    # per attack: the training curves of its fits (per group, per phase), for the cost report
    curves: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def run_stage(snapshot: Snapshot, groups: list[Any], specs: dict[int, SplitSpec], data: ImageData,
              aux_idx: np.ndarray, attacks: list[str], level: str, samples: int,
              seed: int, progress: Callable[[str], None] = lambda _: None, device: str = "cpu",
              make_attack: Callable[[str], Attack] | None = None) -> StageResult:
    """Attack every client of the snapshot with every attack; one row per (client, attack).

    ``samples`` bounds the features attacked per client (optimisation attacks cost per
    feature); the choice is seeded, so reruns attack the same features. ``make_attack``
    builds an attack from its spec (default: :func:`~attacks.base.build_attack`).
    """
    result = StageResult()
    aux01 = to_tensor(data.test_x[aux_idx])
    aux_labels = torch.from_numpy(data.test_y[aux_idx])
    scorer = Scorer(data.train_x, data.train_y)
    for g, group in enumerate(groups):
        cut = group.cut
        rows = snapshot.view.get(cut)
        if rows is None or not (rows["group_ids"] == g).any():
            continue
        spec = specs[cut]
        head, defense = build_client_model(spec, group.defense, snapshot.heads[group.name], {})
        tail = build_tail(spec)
        load_numpy_state(tail, snapshot.tails[cut])
        start = snapshot.start_heads.get(group.name)
        start_head = build_client_model(spec, group.defense, start, {})[0] if start else None
        knowledge = Knowledge.from_models(level, head, tail, group.defense, spec, data.mean,
                                          data.std, defense=defense, start_head=start_head,
                                          last=build_client_last(spec, snapshot.heads[group.name]))
        mine = (rows["group_ids"] == g) & ~rows["failed"]
        knowledge.observed = torch.from_numpy(rows["features"][mine])
        if "grads" in rows:
            knowledge.observed_grads = torch.from_numpy(rows["grads"][mine])
        knowledge.cloud_models = snapshot.cloud_models.get(cut, {})
        clients = sorted(set(rows["client_ids"][mine].tolist()))
        attacked = {pid: _client_features(rows, pid, samples, seed) for pid in clients}
        for attack_spec in attacks:
            attack = (make_attack or build_attack)(attack_spec, **on_device(attack_spec, device))
            progress(f"round {snapshot.round}: {attack.name} on group {group.name} "
                     f"({len(clients)} clients)")
            threads = fastest_threads(spec.feature_shape, spec.in_shape, device=device)
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            with torch_threads(threads):
                attack.fit(knowledge, aux01, aux_labels)
                curves = list(getattr(attack, "curves", []))
                result.curves.setdefault(attack.name, []).extend(
                    {"group": group.name, "round": snapshot.round, "threads": threads, **vars(c)} for c in curves)
                fitted = {"fit_epochs": sum(c.epochs for c in curves),
                          "fit_stopped": ",".join(c.stopped for c in curves)} if curves else {}
                for pid, (ids, feats, grads) in attacked.items():
                    out = attack.run(torch.from_numpy(feats), None if grads is None else torch.from_numpy(grads))
                    row = {"round": snapshot.round, "partition_id": pid, "group": group.name,
                           "defense": group.defense, "attack": attack.name, "attacked": len(ids),
                           **fitted}
                    if attack.kind == "completion":
                        row["completion_accuracy"] = scorer.label_accuracy(ids, out)
                        row["scratch_accuracy"] = scorer.classifier_accuracy(ids, attack.scratch)
                    else:
                        scores, base = scorer.score(ids, out), scorer.baseline(aux01, ids)
                        row |= {m: scores[m] for m in METRICS} | {f"baseline_{m}": base[m] for m in METRICS}
                        result.examples.setdefault(attack.name, {}).setdefault(
                            pid, (scorer.true_images(ids[:8]), out[:8]))
                    result.rows.append(row)
            result.seconds[attack.name] = result.seconds.get(attack.name, 0.0) + time.perf_counter() - t0
    return result


def on_device(attack_spec: str, device: str) -> dict[str, str]:
    """The run's device for an attack that trains or optimises (one with a ``device``
    parameter), unless its spec names one."""
    spec = parse_call(attack_spec)
    accepts = "device" in inspect.signature(ATTACKS.resolve(spec.name).__init__).parameters
    return {"device": device} if accepts and "device" not in spec.kwargs else {}


def _client_features(rows: dict[str, np.ndarray], pid: int, samples: int,
                     seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A client's attacked rows: sample ids, features and, where recorded, dL/dh (else None)."""
    mine = np.flatnonzero((rows["client_ids"] == pid) & ~rows["failed"])  # a failed round's are marked
    if len(mine) > samples:
        mine = np.sort(np.random.default_rng([seed, pid]).choice(mine, samples, replace=False))
    grads = rows["grads"][mine] if "grads" in rows else None
    return rows["sample_ids"][mine], rows["features"][mine], grads
