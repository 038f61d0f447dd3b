"""Plug-ins by import path: a user's own defense and attack, from a folder outside the repository.

The example modules (``examples/custom_defense.py``, ``examples/custom_attack.py``) are copied to a
fresh folder that is the run's working directory, as a user's own files would be; the Ray workers
(client actors, the cloud) have no path to that folder: they get the modules only because the
simulator ships them (``sim.plugins``). Wrong base classes, missing modules and bad parameters are
refused before Ray starts, with one line and exit code 2.
"""

from __future__ import annotations

import csv
import sys

import pytest
import yaml

from sim.registry import Registry
from tests.simhelpers import EXAMPLES, metrics, plugin_folder, run_cli, run_sim

DEFENSE = "custom_defense:Quantize(levels=4)"
ATTACK = "custom_attack:NearestNeighbour(chunk=128)"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return plugin_folder(tmp_path_factory.mktemp("user"))


@pytest.fixture(scope="module")
def run_dir(folder):
    """10 clients in two YAML groups, the user's defense in one; the user's attack on both."""
    config = {"clients": 10, "rounds": 1, "dataset": "fashion-mnist", "train_subset": 2000, "batch_size": 32,
              "attacks": ATTACK, "attack_samples": 24,
              "groups": [{"name": "quantized", "share": 0.5, "defense": DEFENSE},
                         {"name": "noisy", "share": 0.5, "defense": "noise(sigma=0.05)"}]}
    (folder / "plugins.yaml").write_text(yaml.safe_dump(config))
    return run_sim(folder / "runs", "--config", "plugins.yaml", cwd=folder)


def test_the_users_defense_ran_in_the_client_actors(run_dir):
    """Measured: test accuracy 0.50 after the one round (chance 0.1), quantization MSE 0.0014-0.0020."""
    (record,) = metrics(run_dir)
    assert len(record["clients"]) == 10 and record["accuracy"] > 0.3
    for c in record["clients"]:
        if c["group"] == "quantized":  # the quantization error its report() gives, measured in the actor
            assert c["defense-mse"] > 0, c
        else:
            assert "defense-mse" not in c, c


def test_the_users_attack_has_a_row_per_client_and_beats_the_mean_image(run_dir):
    """Measured: SSIM 0.37-0.53 against the mean image's 0.15-0.17."""
    with (run_dir / "leakage.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["attack"] == "nearest"]
    assert sorted(int(r["partition_id"]) for r in rows) == list(range(10))
    for r in rows:
        assert r["defense"] == (DEFENSE if r["group"] == "quantized" else "noise(sigma=0.05)")
        assert float(r["ssim"]) > float(r["baseline_ssim"]) + 0.1, r


@pytest.mark.parametrize("args, expected", [
    (["--defense", "custom_attack:NearestNeighbour"], "must be a subclass of defenses.Defense"),
    (["--defense", "no_such_module:Blur"], "cannot import module 'no_such_module'"),
    (["--defense", "custom_defense:Blur"], "has no attribute 'Blur'; Defense classes defined there: Quantize"),
    (["--defense", "custom_defense:Quantize(levels=1)"], "levels must be at least 2"),
    (["--defense", "custom_defense:Quantize(levels='4')"], "parameter 'levels' must be int"),
    (["--attacks", "custom_defense:Quantize"], "must be a subclass of attacks.Attack"),
    (["--attacks", "custom_attack:NearestNeighbour(chunk=0)"], "chunk must be positive"),
    (["--attacks", ATTACK, "--attacker-knowledge", "none"], "'nearest' needs attacker knowledge 'query'"),
    (["--strategy", "custom_defense:Quantize"], "must be a subclass of flwr.serverapp.strategy.Strategy"),
])
def test_a_bad_plugin_is_one_line_and_exit_2(folder, tmp_path, args, expected):
    proc = run_cli(tmp_path / "runs", "--clients", "2", *args, timeout=120, cwd=folder)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-2000:]
    assert expected in lines[0] and "Traceback" not in proc.stderr, lines[0]
    assert not (tmp_path / "runs").exists()


def test_the_users_modules_are_the_ones_shipped_to_ray(folder, monkeypatch):
    """What ``runtime_env={"py_modules": ...}`` carries to the workers of every node: the user's
    module, not the simulator's packages nor installed ones."""
    monkeypatch.syspath_prepend(str(folder))
    from defenses import build_defense
    from sim.plugins import ray_modules
    from strategies import resolve_strategy

    build_defense(DEFENSE + "+noise(sigma=0.1)")
    resolve_strategy("examples.custom_strategy:NormClippedFedAvg(max_norm=5.0)")
    resolve_strategy("flwr.serverapp.strategy:FedAvg()")
    names = [m.__name__ for m in ray_modules()]
    assert "custom_defense" in names and "flwr" not in names and "sim" not in names, names


def test_a_name_registered_twice_is_an_error():
    from defenses import Defense

    class First(Defense):
        name = "twice"

    class Second(Defense):
        name = "twice"

    registry: Registry[Defense] = Registry("defense", ValueError, Defense)
    registry.register(First)
    with pytest.raises(ValueError, match="defense name 'twice' .* is taken by"):
        registry.register(Second)


def test_a_plugin_may_not_take_a_built_in_name(folder, monkeypatch):
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "custom_defense", raising=False)
    import custom_defense

    from defenses import DefenseError, build_defense
    monkeypatch.setattr(custom_defense.Quantize, "name", "noise")
    with pytest.raises(DefenseError, match="its name 'noise' is the built-in defense"):
        build_defense("custom_defense:Quantize")


def test_the_readme_shows_the_whole_of_each_example():
    readme = (EXAMPLES.parent / "README.md").read_text()
    for name in ("custom_defense.py", "custom_attack.py"):
        source = (EXAMPLES / name).read_text()
        assert source[source.index("from __future__"):].rstrip() in readme, name
