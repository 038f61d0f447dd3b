"""Scale: a thousand clients, a tenth of them per round, on the CI machine's 2 cores and 4 GB."""

from __future__ import annotations

import json

import pytest

from tests.simhelpers import metrics, run_sim


@pytest.mark.slow
def test_a_thousand_clients_fit_in_4_gb(tmp_path):
    run_dir = run_sim(tmp_path / "runs", "--clients", "1000", "--fraction", "0.1", "--rounds", "2",
                      "--attacks", "none")
    records = metrics(run_dir)
    assert [r["completed"] for r in records] == [100, 100]
    assert len({c["partition_id"] for r in records for c in r["clients"]}) > 100  # new clients each round
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["peak_memory_mb"] <= 4096, summary["peak_memory_mb"]
    assert records[-1]["accuracy"] > 0.3
    # incremental checkpoints: round 2 writes its own 100 clients' arrays, not rounds 1 and 2's
    lines = (run_dir / "checkpoints.jsonl").read_text().splitlines()
    written = {c["round"]: c["bytes"] for c in map(json.loads, lines)}
    assert written[2] < 1.2 * written[1], written
    assert sorted(p.name for p in (run_dir / "shards" / "view").iterdir()) == ["r00001.npz", "r00002.npz"]
