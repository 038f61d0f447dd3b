"""Client failures (``--client-failure-rate``): the round goes on with the others, the failed
clients' partial rounds are discarded and their features marked, and every failure is counted
per client in metrics.jsonl and leakage.csv."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from sim.client import planned_failure
from sim.config import SimConfig
from sim.view import load_view
from tests.simhelpers import SMALL, metrics, prepared, run_sim

ATTACK = ["--aux-fraction", "0.3", "--attack-samples", "16",
          "--attacks", "decoder(epochs=1, width=16, blocks=1, batch_size=32)"]


def planned(clients: int, rounds: int, rate: float, batches: dict[int, int]) -> dict[int, dict[int, str]]:
    """Per round, the clients the seed makes fail and how (every client is sampled)."""
    cfg = SimConfig(clients=clients, client_failure_rate=rate)
    out: dict[int, dict[int, str]] = {}
    for r in range(1, rounds + 1):
        out[r] = {p: kind for p in range(clients)
                  if (plan := planned_failure(cfg, p, r, batches[p])) is not None
                  for kind in [plan[0]]}
    return out


def check_run(run_dir: Path, clients: int, rounds: int, rate: float) -> None:
    records = metrics(run_dir)
    assert [r["round"] for r in records] == list(range(1, rounds + 1))
    cfg = prepared(run_dir)
    batches = {p: -(-len(train) // cfg.config.batch_size) * cfg.config.epochs
               for p, (train, _) in enumerate(cfg.partitions)}
    expected = planned(clients, rounds, rate, batches)
    counts: dict[int, int] = {}
    for r in records:
        failed = {f["partition_id"]: f for f in r["failed"]}
        assert set(failed) == set(expected[r["round"]]), r["round"]
        for pid, kind in expected[r["round"]].items():
            counts[pid] = counts.get(pid, 0) + 1
            reason = failed[pid]["reason"]
            assert ("crashed" in reason) if kind == "crash" else (reason == "no reply before the timeout")
            assert failed[pid]["failures"] == counts[pid]
        done = [c["partition_id"] for c in r["clients"]]
        assert sorted(done + list(failed)) == list(range(clients))  # nothing else is lost
        assert r["completed"] == len(done) and r["sampled"] == clients
        for c in r["clients"]:
            assert c["failures"] == counts.get(c["partition_id"], 0)
    assert counts, "the seed made no client fail: the test would prove nothing"
    assert records[-1]["accuracy"] > 0.25  # the others trained on (chance: 0.1)

    with (run_dir / "leakage.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {int(row["partition_id"]) for row in rows} == set(range(clients)) - {
        p for p in range(clients) if all(p in expected[r] for r in expected)}
    for row in rows:
        assert int(row["failures"]) == counts.get(int(row["partition_id"]), 0)

    view = load_view(str(run_dir / "view.npz"))[4]
    marked = set(view["client_ids"][view["failed"]].tolist())
    assert marked and marked <= set(counts)  # what failed clients sent is kept, marked


@pytest.mark.slow
def test_failures_sflv1_small(tmp_path):
    """SFL-v1: a failed client's tail copy is not averaged; its features are marked."""
    run_dir = run_sim(tmp_path / "runs", *SMALL, "--clients", "8", "--protocol", "sflv1", "--rounds", "2",
                      "--client-failure-rate", "0.4", "--round-timeout", "10", *ATTACK)
    check_run(run_dir, 8, 2, 0.4)


@pytest.mark.slow
def test_failure_rate_20_percent_of_50_clients(tmp_path):
    """The issue's acceptance run: 50 clients, 20 % failures, SFL-v2 (the default)."""
    run_dir = run_sim(tmp_path / "runs", *SMALL, "--clients", "50", "--train-subset", "5000", "--rounds", "2",
                      "--client-failure-rate", "0.2", "--round-timeout", "10", *ATTACK)
    check_run(run_dir, 50, 2, 0.2)

