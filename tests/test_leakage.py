"""The attack stage end to end: a real simulation, real attacks, per-client leakage rows."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sim.view import load_view
from tests.simhelpers import SMALL, prepared, run_sim

pytestmark = pytest.mark.slow  # a 94 s simulation with attacks every round

ATTACKS = "decoder(epochs=3, width=16, blocks=1, batch_size=32, lr=0.003),rmle(steps=150)"


@pytest.fixture(scope="module")
def attacked_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("leak")
    export = out / "export" / "view.npz"
    run_dir = run_sim(out / "runs", *SMALL, "--aux-fraction", "0.3", "--attacks", ATTACKS,
                      "--attack-every", "1", "--attack-samples", "24", "--export-view", str(export))
    return run_dir, export


def rows(run_dir):
    with (run_dir / "leakage.csv").open() as f:
        return list(csv.DictReader(f))


def test_a_row_for_every_client_attack_and_round(attacked_run):
    run_dir, _ = attacked_run
    got = {(int(r["round"]), int(r["partition_id"]), r["attack"]) for r in rows(run_dir)}
    assert got == {(rd, p, a) for rd in (1, 2) for p in range(4) for a in ("decoder", "rmle", "worst-case")}
    for r in rows(run_dir):
        assert int(r["attacked"]) == 24 and 0 < float(r["accuracy"]) <= 1
        assert int(r["num_classes"]) >= 1 and int(r["num_examples"]) > 0


def test_worst_case_is_each_clients_strongest_attack(attacked_run):
    run_dir, _ = attacked_run
    table = rows(run_dir)
    for r in (r for r in table if r["attack"] == "worst-case"):
        mine = {a["attack"]: a for a in table if a["attack"] in ("decoder", "rmle")
                and (a["round"], a["partition_id"]) == (r["round"], r["partition_id"])}
        assert float(r["ssim"]) == max(float(a["ssim"]) for a in mine.values())
        assert float(r["mse"]) == min(float(a["mse"]) for a in mine.values())
        assert float(mine[r["ssim_attack"]]["ssim"]) == float(r["ssim"])
        assert float(mine[r["mse_attack"]]["mse"]) == float(r["mse"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["worst_case"]) == {str(p) for p in range(4)}
    assert summary["leakage"]["worst-case"]["all"]["ssim"] >= summary["leakage"]["decoder"]["all"]["ssim"]


def test_attacks_beat_knowing_nothing(attacked_run):
    run_dir, _ = attacked_run
    final = [r for r in rows(run_dir) if r["round"] == "2"]
    for attack in ("decoder", "rmle"):
        ssim = np.mean([float(r["ssim"]) for r in final if r["attack"] == attack])
        base = np.mean([float(r["baseline_ssim"]) for r in final if r["attack"] == attack])
        assert ssim > base + 0.05, (attack, ssim, base)


def test_report_figures_and_summary(attacked_run):
    run_dir, _ = attacked_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["attack_seconds"]) == {"decoder", "rmle"}
    (fit,) = summary["attack_training"]["decoder"][-1:]
    assert fit["stopped"] in ("converged", "epoch cap", "time cap") and 1 <= len(fit["val"]) <= 3
    assert summary["leakage"]["decoder"]["all"]["ssim"] > 0
    report = (run_dir / "report.md").read_text()
    assert "Client-rounds lost in training: none." in report
    figures = [line[line.index("(") + 1:-1] for line in report.splitlines() if line.startswith("![")]
    assert len(figures) >= 7
    for name in figures:
        with Image.open(run_dir / name) as img:
            img.verify()


def test_exported_view_reloads_with_the_datasets_sample_ids(attacked_run):
    run_dir, export = attacked_run
    view = load_view(str(export))[4]
    heads = torch.load(export.with_suffix(".pt"), weights_only=True)
    start = torch.load(export.with_suffix(".start.pt"), weights_only=True)
    assert set(heads) == set(start) == {"all"}
    assert any(not torch.equal(heads["all"][k], start["all"][k]) for k in heads["all"])
    prep = prepared(run_dir)
    for pid in range(4):
        ids = view["sample_ids"][view["client_ids"] == pid]
        assert np.isin(ids, prep.partitions[pid][0]).all()
    assert view["features"].shape[0] == len(view["sample_ids"])
