"""``python -m sim.sweep``: bad sweep files are refused before anything runs; real sweeps (every
point a real ``python -m sim.run`` process) write their report, record a failing point in one
line while the others run, and go on after a SIGKILL with the same numbers; the per-client
explanation holds on a real run's leakage.csv.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from PIL import Image

from sim import explain, sweep_report
from sim.sweep import load_sweep, main, select_families
from sim.sweep_report import ALL
from tests.simhelpers import run_sim, without_timings

ROOT = Path(__file__).resolve().parents[1]
TINY = {"train_subset": 2000, "clients": 4, "rounds": 2, "aux_fraction": 0.3, "attack_samples": 16,
        "attacks": "decoder(epochs=1, width=16, blocks=1, batch_size=32)"}


def write(path: Path, sweep: dict | str) -> Path:
    path.write_text(sweep if isinstance(sweep, str) else yaml.safe_dump(sweep, sort_keys=False))
    return path


def sweep_cli(sweep: Path, out: Path, *args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sim.sweep", str(sweep), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def table(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def state(out: Path) -> dict[str, dict]:
    path = out / "sweep_state.json"
    return json.loads(path.read_text())["points"] if path.is_file() else {}


def opens(path: Path) -> None:
    with Image.open(path) as img:
        img.verify()


# --------------------------------------------------------------------- refused up front

BAD = {
    "unknown top-level key": ("grid: {seed: [0]}\nseeds: [1]\n", "seeds: unknown key"),
    "unknown setting": ("base: {client: 4}\ngrid: {seed: [0]}\n", "base.client: unknown setting"),
    "unknown grid key": ("grid: {sead: [0, 1]}\n", "grid key 'sead' is no setting"),
    "empty grid": ("grid: {}\n", "grid: must be a non-empty mapping"),
    "empty grid list": ("grid: {seed: []}\n", "grid.seed: must be a non-empty list"),
    "grid value not a list": ("grid: {seed: 3}\n", "grid.seed: must be a non-empty list"),
    "grid value of the wrong type": ("grid: {rounds: [1, two]}\n", "grid.rounds: must be int, got 'two'"),
    "float given as text": ("grid: {lr: [1e-3]}\n", "grid.lr: must be float"),
    "invalid value": ("families: {a: {rounds: 0}}\n", "families.a.rounds: must be at least 1"),
    "placeholder without a grid key": ('base: {defense: "noise(sigma={sigma})"}\ngrid: {seed: [0]}\n',
                                       "{sigma} in the settings of the sweep is no grid key"),
    "setting given twice": ("grid: {defense: [none]}\nfamilies: {a: {defense: none}}\n",
                            "defense: given by both grid and families.a"),
    "out set by the file": ("base: {out: x}\ngrid: {seed: [0]}\n", "base.out: set by the sweep itself"),
    "two points alike": ("grid: {seed: [0, 0]}\n", "have the same settings"),
    "not YAML": ("grid: {seed: [0]\n", "is not valid YAML"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_sweep_file_is_one_line_and_exit_2(tmp_path, capsys, case):
    text, expected = BAD[case]
    out = tmp_path / "sweep"
    assert main([str(write(tmp_path / "bad.yaml", text)), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert not out.exists()


def test_bad_sweep_file_from_the_shell(tmp_path):
    proc = sweep_cli(write(tmp_path / "bad.yaml", BAD["grid value of the wrong type"][0]), tmp_path / "sweep",
                     timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == "" and not (tmp_path / "sweep").exists()


def test_quick_preset_points():
    """Families over their strengths, crossed with the seeds; each point's config as sim.run reads it."""
    name, points, reference = load_sweep(str(ROOT / "configs/sweeps/quick.yaml"))
    assert (name, reference, len(points)) == ("quick", "noise", 8)
    assert [p.seed for p in points] == [0] * 4 + [1] * 4  # every curve's first seed first
    assert {(p.curve, p.strength, p.config["defense"]) for p in points} == {
        ("noise", "sigma=0.05", "noise(sigma=0.05)"), ("noise", "sigma=0.5", "noise(sigma=0.5)"),
        ("topk", "ratio=0.5", "topk(ratio=0.5)"), ("topk", "ratio=0.95", "topk(ratio=0.95)")}
    assert len({p.id for p in points}) == 8 and all(p.config["rounds"] == 1 for p in points)
    assert [p.id for p in load_sweep(str(ROOT / "configs/sweeps/quick.yaml"))[1]] == [p.id for p in points]


@pytest.mark.parametrize("families, expected", [
    ("noise,topk,nosie", "--families: nosie: the sweep's families are noise, topk"),
    ("topk", "--families: the reference family 'noise' must be among them"), (",", "none given")])
def test_bad_families_selection_is_one_line_and_exit_2(tmp_path, capsys, families, expected):
    out = tmp_path / "sweep"
    assert main([str(ROOT / "configs/sweeps/quick.yaml"), "--out", str(out), "--families", families]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err
    assert not out.exists()


def test_families_selection_keeps_their_points():
    _, points, reference = load_sweep(str(ROOT / "configs/sweeps/infoscissors.yaml"))
    chosen = select_families(points, reference, "infoscissors, noise U-shaped")
    assert {p.family for p in chosen} == {"infoscissors", "noise U-shaped"}
    assert chosen == [p for p in points if p.family in {"infoscissors", "noise U-shaped"}]


@pytest.mark.parametrize("preset", ["cem.yaml", "infoscissors.yaml"])
def test_presets_load(preset):
    _, points, reference = load_sweep(str(ROOT / "configs/sweeps" / preset))
    seeds = {p.seed for p in points}
    assert len(seeds) >= 3 and reference in {p.family for p in points}
    for curve in {p.curve for p in points}:  # every curve has every seed at every strength
        mine = [p for p in points if p.curve == curve]
        assert len(mine) == len(seeds) * len({p.strength for p in mine}), curve


def test_matched_accuracy_interpolates_and_pairs_seeds():
    """Three seeds: a curve 0.1 below the reference everywhere moves the frontier, a curve on it
    (differences of either sign) only moves along it; a single point is not interpolated."""
    def curve(low: float, high: float, offsets: tuple[float, ...]) -> dict[int, list]:
        return {s: [(0.6, low + e), (0.8, high + e)] for s, e in enumerate(offsets)}

    data = {"noise": curve(0.3, 0.5, (0, 0.01, 0.02)), "cem": curve(0.2, 0.4, (0, 0.012, 0.018)),
            "same": curve(0.3, 0.5, (0.01, 0, 0.01)), "one": {0: [(0.65, 0.1)]}}
    at = sweep_report.levels(data, "noise")
    assert at == pytest.approx([0.6, 0.7, 0.8])
    rows = {(r["accuracy"], r["curve"]): r for r in sweep_report.matched(data, at, "noise", "ssim")}
    noise, cem, same = (rows[(0.7, c)] for c in ("noise", "cem", "same"))
    assert noise["leakage"] == pytest.approx(0.41) and noise["seeds"] == 3 and "delta" not in noise
    assert cem["leakage"] == pytest.approx(0.31) and cem["delta"] == pytest.approx(-0.1)
    assert 0 < cem["delta_ci"] < 0.01 and cem["verdict"].startswith("less leakage")
    assert same["delta"] == pytest.approx(-0.01 / 3) and same["verdict"].startswith("no difference")
    assert rows[(0.7, "one")]["seeds"] == 0 and np.isnan(rows[(0.7, "one")]["leakage"])
    mse = {r["curve"]: r for r in sweep_report.matched(data, [0.7], "noise", "mse")}
    assert mse["cem"]["verdict"].startswith("more leakage")  # a lower MSE is more leakage
    assert np.isnan(sweep_report.interpolate([(0.6, 0.3), (0.8, 0.5)], 0.85))


def test_point_against_point_pairs_seeds_and_says_which_side_of_the_frontier():
    """Curves that share no accuracy range: a point with less leakage at an accuracy not lower
    (at 95 %) lies beyond the reference's frontier, one with less leakage bought with accuracy is
    a trade-off, and differences of either sign across seeds are no difference."""
    def row(curve, strength, seed, accuracy, ssim):
        return {"group": ALL, "attack": "worst-case", "curve": curve, "strength": strength, "seed": seed,
                "accuracy": accuracy, "ssim": ssim}

    rows = [row("ref", "a", s, 0.80 + e, 0.60 + e) for s, e in enumerate((0, 0.01, 0.02))]
    rows += [row("good", "x", s, 0.82 + e, 0.50 + 1.1 * e) for s, e in enumerate((0, 0.01, 0.02))]
    rows += [row("cheap", "y", s, 0.70 + e, 0.50 + e) for s, e in enumerate((0, 0.01, 0.02))]
    rows += [row("same", "z", s, 0.80, 0.60 + e) for s, e in enumerate((0.01, -0.01, 0.02))]
    rows += [row("noisy", "w", s, 0.80 + e, 0.50) for s, e in enumerate((-0.01, 0.015, -0.01))]
    out = {r["curve"]: r for r in sweep_report.dominance(rows, ALL, "worst-case", "ref", "ssim")}
    assert set(out) == {"good", "cheap", "same", "noisy"} and all(r["against"] == "a" for r in out.values())
    assert out["noisy"]["accuracy_delta"] < 0 and out["noisy"]["verdict"].endswith("beyond the frontier")
    assert out["good"]["delta"] == pytest.approx(-0.1 + 0.001) and out["good"]["accuracy_delta"] == pytest.approx(0.02)
    assert out["good"]["verdict"].endswith("beyond the frontier") and out["good"]["seeds"] == 3
    assert out["cheap"]["verdict"].endswith("a trade-off")
    assert out["same"]["verdict"].startswith("no leakage difference")
    mse = [dict(r, mse=r["ssim"]) for r in rows]  # a lower MSE is more leakage
    assert {r["curve"]: r for r in sweep_report.dominance(mse, ALL, "worst-case", "ref", "mse")}["good"][
        "verdict"] == "more leakage, higher accuracy: a trade-off"


# ------------------------------------------------------------------------- real sweeps


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Two noise strengths on skewed clients of which half train per round, and a point whose
    defense parameter is out of range (it passes the config checks, sim.run refuses it)."""
    tmp = tmp_path_factory.mktemp("sweep")
    sweep = write(tmp / "sweep.yaml", {
        "base": TINY | {"partition": "dirichlet", "alpha": 0.3, "fraction": 0.5},
        "families": {"noise": {"defense": "noise(sigma={sigma})", "grid": {"sigma": [0.05, 0.5]}},
                     "broken": {"defense": "noise(sigma=-1)"}}})
    return sweep_cli(sweep, tmp / "out"), tmp / "out"


@pytest.mark.slow
def test_a_failing_point_is_one_line_and_the_others_run(finished):
    proc, out = finished
    assert proc.returncode == 1, proc.stderr[-2000:]
    failed = [line for line in proc.stderr.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 1 and "broken" in failed[0] and "sigma must be in [0, 10]" in failed[0], proc.stderr
    points = state(out)
    assert sorted(p["status"] for p in points.values()) == ["done", "done", "failed"]
    assert "\n" not in next(p["error"] for p in points.values() if p["status"] == "failed")
    assert "broken" in (out / "sweep_report.md").read_text()


@pytest.mark.slow
def test_sweep_report(finished):
    _, out = finished
    rows = table(out / "sweep_points.csv")
    assert {(r["strength"], r["attack"]) for r in rows if r["group"] == "all clients"} == {
        (s, a) for s in ("sigma=0.05", "sigma=0.5") for a in ("worst-case", "decoder")}
    for r in rows:
        assert 0 < float(r["accuracy"]) <= 1 and -1 <= float(r["ssim"]) <= 1 and float(r["mse"]) > 0
    report = (out / "sweep_report.md").read_text()
    assert "at matched accuracy" in report and "Which clients leak most, and why" in report
    figures = [line[line.index("(") + 1:-1] for line in report.splitlines() if line.startswith("![")]
    assert "frontier_worst-case_ssim.png" in figures and "sweep_clients_worst-case.png" in figures
    for name in figures:
        opens(out / name)
    matched = [r for r in table(out / "sweep_matched.csv") if r["metric"] == "ssim" and r["attack"] == "worst-case"]
    assert matched and all(r["curve"] == "noise" for r in matched)  # one curve with two strengths


@pytest.mark.slow
def test_per_client_explanation_on_real_runs(finished):
    """Correlations of each client's worst-case leakage with its statistics, measured on a real
    run's leakage.csv: clients of a Dirichlet partition differ in samples and classes, and with
    half the clients trained per round some were attacked on features of an earlier round."""
    _, out = finished
    for entry in (p for p in state(out).values() if p["status"] == "done"):
        run_dir = out / entry["run_dir"]
        rows = table(run_dir / "leakage.csv")
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        clients = explain.client_table(rows, records, 2, "worst-case", "ssim")
        trained_last = {c["partition_id"] for c in records[-1]["clients"]}
        assert clients and {c["partition_id"] for c in clients if c["rounds_since_trained"] == 0} == trained_last
        assert len({c["num_examples"] for c in clients}) > 1
        corr = explain.correlations(clients)
        assert corr["num_examples"]["rho"] is not None
        for c in corr.values():
            assert c["rho"] is None or (-1 <= c["rho"] <= 1 and 0 <= c["p"] <= 1)
        report = (run_dir / "report.md").read_text()
        assert "Which clients leak most, and why" in report and "| samples |" in report
        opens(run_dir / "clients_explained_worst-case.png")
    for r in table(out / "sweep_clients.csv"):
        assert r["rho"] == "" or -1 <= float(r["rho"]) <= 1


@pytest.mark.slow
def test_killed_sweep_goes_on_where_it_stopped_with_the_same_numbers(tmp_path):
    """SIGKILL the sweep while its second point runs (its run dies with it), run the sweep again:
    the first point is skipped, the second goes on, and its numbers equal an uninterrupted run's."""
    sweep = write(tmp_path / "sweep.yaml", {"base": TINY | {"defense": "noise(sigma=0.1)"},
                                            "grid": {"seed": [0, 1]}})
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "sim.sweep", str(sweep), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            if [p["status"] for p in state(out).values()] == ["done", "running"]:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the sweep ended before it could be killed"
        children = psutil.Process(proc.pid).children()
        time.sleep(5)  # into the second point's run
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    psutil.wait_procs(children, timeout=60)  # the point's run goes with the sweep
    assert not any(c.is_running() for c in children)
    first, second = state(out)
    first_dir = out / state(out)[first]["run_dir"]
    first_leakage = (first_dir / "leakage.csv").read_text()
    assert state(out)[second]["status"] == "running" and not list(out.glob(f"points/{second}/*/leakage.csv"))

    again = sweep_cli(sweep, out)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "1 points done before, 1 to run" in again.stdout
    assert {p["status"] for p in state(out).values()} == {"done"}
    assert out / state(out)[first]["run_dir"] == first_dir and (first_dir / "leakage.csv").read_text() == first_leakage
    resumed = out / state(out)[second]["run_dir"]
    reference = run_sim(tmp_path / "reference", "--config", str(out / "points" / second / "point.yaml"),
                        "--out", str(tmp_path / "reference"))
    assert table(resumed / "leakage.csv") == table(reference / "leakage.csv")
    metrics = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
               for d in (resumed, reference)]
    assert without_timings(metrics[0]) == without_timings(metrics[1])
    points = {r["point"]: r for r in table(out / "sweep_points.csv") if r["attack"] == "worst-case"}
    assert float(points[second]["ssim"]) == pytest.approx(np.mean([float(r["ssim"]) for r in table(
        reference / "leakage.csv") if r["attack"] == "worst-case"]))


@pytest.mark.slow
def test_quick_preset_with_two_jobs(tmp_path):
    """configs/sweeps/quick.yaml end to end, two points at a time: every point, every seed."""
    proc = sweep_cli(ROOT / "configs/sweeps/quick.yaml", tmp_path / "quick", "--jobs", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "8 of 8 points done" in proc.stdout and "2 running" in proc.stdout
    summary = [r for r in table(tmp_path / "quick" / "sweep_summary.csv")
               if r["group"] == "all clients" and r["attack"] == "worst-case"]
    assert sorted((r["curve"], r["strength"], r["seeds"]) for r in summary) == [
        ("noise", "sigma=0.05", "2"), ("noise", "sigma=0.5", "2"), ("topk", "ratio=0.5", "2"),
        ("topk", "ratio=0.95", "2")]
    for r in summary:
        assert float(r["accuracy_std"]) >= 0 and 0 < float(r["ssim_mean"]) < 1
    for name in ("frontier_worst-case_ssim.png", "frontier_worst-case_mse.png", "sweep_clients_worst-case.png"):
        opens(tmp_path / "quick" / name)
