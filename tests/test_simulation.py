"""End-to-end: real Flower simulations on Ray with real torch training, at small scale."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sim.config import load_config
from sim.experiment import Experiment
from sim.run import build_parser
from sim.view import load_view
from tests.simhelpers import SMALL, head_features, metrics, prepared, run_sim, without_timings


@pytest.fixture(scope="module")
def sflv1_runs(tmp_path_factory):
    """Two runs of the same seed (reproducibility) with the default protocol: one by the CLI,
    one by the Python API in this process, as a notebook would (the same numbers, below)."""
    cli = run_sim(tmp_path_factory.mktemp("v1-cli"), *SMALL, "--protocol", "sflv1")
    settings = vars(build_parser().parse_args([*SMALL, "--protocol", "sflv1"]))  # the flags, typed
    cfg = load_config(None, settings | {"out": str(tmp_path_factory.mktemp("v1-api"))})
    results = Experiment(cfg).run()
    assert results.run_dir.parent == Path(cfg.out) and results.rounds == metrics(results.run_dir)
    assert results.final_accuracy == results.rounds[-1]["accuracy"] and results.leakage == []
    return [cli, results.run_dir]


def test_every_sampled_client_has_a_record_each_round(sflv1_runs):
    records = metrics(sflv1_runs[0])
    assert [r["round"] for r in records] == [1, 2]
    for r in records:
        assert r["sampled"] == r["completed"] == 4 and not r["failed"]
        assert [c["partition_id"] for c in r["clients"]] == [0, 1, 2, 3]
        for c in r["clients"]:
            assert c["num_examples"] > 0 and c["bytes_sent"] > 0 and c["bytes_received"] > 0
            assert 0 <= c["accuracy"] <= 1 and np.isfinite(c["loss"])
    # It learns: accuracy well above chance (10 %) after two rounds on 2000 samples.
    assert records[-1]["accuracy"] > 0.5
    assert records[-1]["clients"][0]["loss"] < records[0]["clients"][0]["loss"]


def test_same_seed_same_numbers_sflv1(sflv1_runs):
    a, b = (without_timings(metrics(d)) for d in sflv1_runs)
    assert a == b


def test_cloud_view_maps_back_to_the_right_images(sflv1_runs):
    run_dir = sflv1_runs[0]
    prep = prepared(run_dir)
    view = load_view(run_dir / "view.npz")[prep.config.cut]
    assert view["features"].shape[1:] == prep.specs[prep.config.cut].feature_shape
    assert sorted(set(view["client_ids"].tolist())) == [0, 1, 2, 3]
    for pid in range(4):
        mask = view["client_ids"] == pid
        ids = view["sample_ids"][mask]
        train_ids, holdout_ids = prep.partitions[pid]
        # The reservoir holds at most 512 of the client's own training samples, no held-out ones.
        assert 0 < len(ids) <= 512 and len(set(ids.tolist())) == len(ids)
        assert np.isin(ids, train_ids).all() and not np.isin(ids, holdout_ids).any()
        assert (view["rounds"][mask] == 2).all()
        # Each recorded feature is nearest to the final head's feature of its own sample id:
        # the ids really index the images that produced the features.
        recorded = torch.from_numpy(view["features"][mask]).flatten(1)
        reference = head_features(run_dir, prep, "all", train_ids).flatten(1)
        nearest = train_ids[torch.cdist(recorded, reference).argmin(1).numpy()]
        assert (nearest == ids).mean() > 0.8
        # Shuffled ids would not match: the check can fail.
        assert (nearest == np.roll(ids, 1)).mean() < 0.1


@pytest.mark.slow
def test_same_seed_same_numbers_sflv2(tmp_path):
    runs = [run_sim(tmp_path / f"v2-{i}", *SMALL, "--protocol", "sflv2") for i in range(2)]
    a, b = (without_timings(metrics(d)) for d in runs)
    assert a == b
    assert a[-1]["accuracy"] > 0.5
    view = load_view(runs[0] / "view.npz")[4]
    assert sorted(set(view["client_ids"].tolist())) == [0, 1, 2, 3]


@pytest.mark.slow
def test_dirichlet_partition_with_fedmedian(tmp_path):
    run_dir = run_sim(tmp_path, *SMALL, "--rounds", "1", "--partition", "dirichlet", "--alpha", "0.3",
                      "--strategy", "FedMedian")
    sizes = [c["num_examples"] for c in metrics(run_dir)[0]["clients"]]
    assert len(sizes) == 4 and max(sizes) != min(sizes)  # skewed, not IID


@pytest.mark.slow  # a 32 s simulation
def test_custom_strategy_and_fraction(tmp_path):
    run_dir = run_sim(tmp_path, *SMALL, "--clients", "6", "--fraction", "0.5", "--strategy",
                      "examples.custom_strategy:NormClippedFedAvg(max_norm=5.0)")
    for r in metrics(run_dir):
        assert r["sampled"] == r["completed"] == 3


@pytest.mark.slow
def test_heterogeneous_groups(tmp_path):
    run_dir = run_sim(tmp_path, "--config", "configs/heterogeneous.yaml", "--clients", "5",
                      "--rounds", "1", "--train-subset", "2000", "--partition", "iid", "--aux-fraction", "0.3",
                      "--attacks", "decoder(epochs=1, width=16, blocks=1, batch_size=32)")
    record = metrics(run_dir)[0]
    assert set(record["group_accuracy"]) == {"undefended", "noisy", "cem", "shallow-noisy"}
    groups = [c["group"] for c in record["clients"]]
    assert groups == ["undefended", "undefended", "noisy", "cem", "shallow-noisy"]
    view = load_view(run_dir / "view.npz")
    assert sorted(view) == [2, 4]
    assert view[2]["features"].shape[1:] == (8, 14, 14)  # cut 2 keeps a larger feature map
    assert set(view[2]["group_ids"].tolist()) == {3} and set(view[4]["group_ids"].tolist()) == {0, 1, 2}
    # The report compares the groups: one leakage mean per group, one table row each.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["leakage"]["decoder"]) == {"undefended", "noisy", "cem", "shallow-noisy"}
    report = (run_dir / "report.md").read_text()
    assert all(f"| decoder | {g} |" in report for g in ("undefended", "noisy", "cem", "shallow-noisy"))


@pytest.mark.slow
def test_flower_dp_wrapper_around_fedavg(tmp_path):
    """Client-side fixed clipping: the wrapper asks clients to clip, and they do."""
    run_dir = run_sim(tmp_path, *SMALL, "--clients", "3", "--rounds", "1", "--strategy",
                      "DifferentialPrivacyClientSideFixedClipping(FedAvg(), noise_multiplier=0.01, "
                      "clipping_norm=1.0, num_sampled_clients=3)")
    assert metrics(run_dir)[0]["completed"] == 3


# Every defense and the compositions, one group each (those not already simulated by
# tests/test_cem_audit.py, test_completion.py and test_prediction_leakage.py).
COMPOSITIONS = ["dropout(p=0.2)", "topk(ratio=0.5)", "laplace(epsilon=20)", "nopeek(alpha=0.1)",
                "mid(lam=0.01)", "ppdl(theta=0.5)", "cem", "dropout(p=0.2)+noise(sigma=0.01)+cem"]


@pytest.mark.slow  # every defense simulated: 40 s
def test_every_defense_and_composition_runs_in_a_simulation(tmp_path):
    groups = [{"name": f"g{i}", "share": 1 / len(COMPOSITIONS), "defense": d} for i, d in enumerate(COMPOSITIONS)]
    path = tmp_path / "all-defenses.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    run_dir = run_sim(tmp_path / "runs", "--config", str(path), *SMALL, "--clients", str(len(COMPOSITIONS)),
                      "--rounds", "2")
    last = metrics(run_dir)[-1]
    assert last["completed"] == len(COMPOSITIONS) and not last["failed"]
    assert [c["group"] for c in last["clients"]] == [g["name"] for g in groups]
    for c in last["clients"]:
        assert np.isfinite(c["loss"]) and 0 <= c["accuracy"] <= 1, c
    # CEM reports its bound once fitted (after the first local epoch, so in round 2).
    for c in last["clients"][-2:]:
        bound = [v for k, v in c.items() if k.startswith("defense-") and k.endswith("bound")]
        assert len(bound) == 1 and bound[0] is not None and bound[0] < 0, c
