"""Are the default attacks near their best? The default attack set against the same attacks
with four times the training budget, on the same recorded view.

An attack that stops short understates leakage. Every trained attack stops on its own once
its validation loss stops improving (``attacks.training``); this benchmark gives each of them
four times the patience, the epoch cap and the time cap, and compares: if the default is near
its best, the 4x version gains little. It runs the README demo (``--clients 50 --defense cem``)
in this process unless a run directory is given, then the attack stage twice on that run's
final snapshot, and prints SSIM, MSE (means over clients, and the worst case over the attacks)
and seconds.

    python -m benchmarks.attack_strength                      # trains the README demo first
    python -m benchmarks.attack_strength runs/RUN_DIR         # an existing run
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from attacks.base import Attack, build_attack
from attacks.report import worst_case
from attacks.stage import load_snapshot, parse_attacks, run_stage
from attacks.training import Budget
from benchmarks.attack_stage import RUNS, train
from sim.config import config_from_dict
from sim.run import Prepared, prepare

SCALE = 4


def scaled(attack: Attack, factor: int) -> Attack:
    """The same attack with every training budget it holds scaled by ``factor``."""
    for name, value in vars(attack).items():
        if isinstance(value, Budget):
            setattr(attack, name, dataclasses.replace(
                value, max_epochs=value.max_epochs * factor, patience=value.patience * factor,
                max_seconds=value.max_seconds * factor))
    return attack


def stage(run_dir: Path, prep: Prepared, factor: int) -> tuple[list[dict], float]:
    """The run's attack stage on its final snapshot, every training budget scaled by ``factor``."""
    cfg = prep.config
    t0 = time.perf_counter()
    result = run_stage(load_snapshot(run_dir, cfg.rounds), cfg.resolved_groups(), prep.specs, prep.data,
                       prep.aux_idx, parse_attacks(cfg.attacks), cfg.attacker_knowledge, cfg.attack_samples,
                       cfg.seed, device=prep.device,
                       make_attack=lambda text, **kw: scaled(build_attack(text, **kw), factor))
    return result.rows + worst_case(result.rows), time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="?", help="a finished run (default: train the README demo)")
    parser.add_argument("--out", default="runs/bench-attack-strength")
    args = parser.parse_args()
    if args.run_dir:
        import yaml

        run_dir = Path(args.run_dir)
        prep = prepare(config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text())))
    else:
        run_dir, prep = train({**RUNS["demo"], "attacks": "none"}, Path(args.out))
        prep = prepare(dataclasses.replace(prep.config, attacks=RUNS["demo"]["attacks"]))
    results = {factor: stage(run_dir, prep, factor) for factor in (1, SCALE)}
    names = list(dict.fromkeys(r["attack"] for r in results[1][0]))
    print(f"\nrun {run_dir}; attacks {prep.config.attacks!r}; default vs {SCALE}x budget\n")
    print("| attack | SSIM default | SSIM 4x | SSIM default / 4x | MSE default | MSE 4x |")
    print("|---|---|---|---|---|---|")
    for name in names:
        ssim = [np.mean([r["ssim"] for r in results[f][0] if r["attack"] == name and "ssim" in r]) for f in (1, SCALE)]
        mse = [np.mean([r["mse"] for r in results[f][0] if r["attack"] == name and "mse" in r]) for f in (1, SCALE)]
        print(f"| {name} | {ssim[0]:.4f} | {ssim[1]:.4f} | {ssim[0] / ssim[1]:.3f} | {mse[0]:.5f} | {mse[1]:.5f} |")
    print(f"\nseconds: default {results[1][1]:.0f}, {SCALE}x {results[SCALE][1]:.0f}")


if __name__ == "__main__":
    main()
