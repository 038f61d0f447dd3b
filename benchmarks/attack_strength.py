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
    python -m benchmarks.attack_strength runs/RUN_DIR --heads # which heads the decoder inverts

A white-box cloud holds the head each round started from and the aggregated head it ended
with; the features recorded during the round come from heads in between. ``--heads`` fits
the decoder on each choice (``decoder(heads='end'|'start'|'both')``) and prints the same columns.

Measured on the README demo's run (50 clients, 3 rounds, cem; 2 cores, 2026-12-06; the 4x
fit shared the cores with a test run for its last half hour):

| attack | SSIM default | SSIM 4x | default / 4x | MSE default | MSE 4x | seconds default | seconds 4x |
|---|---|---|---|---|---|---|---|
| decoder (= worst case) | 0.7371 | 0.7405 | 0.995 | 0.01818 | 0.01812 | 320 | 3521 |

``--heads`` on the same run (quiet for the last two fits):

| heads | SSIM | MSE | seconds |
|---|---|---|---|
| end (aggregated) | 0.7259 | 0.01831 | 457 |
| start (of the round) | 0.7392 | 0.01870 | 386 |
| both (the default) | 0.7371 | 0.01818 | 321 |

Both heads give the lowest MSE and an SSIM within 0.3 % of the start head's; the aggregated
head alone is the weakest. The worst case per client takes the best of the attacks run.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from attacks.base import Attack, build_attack
from attacks.decoder import HEAD_CHOICES
from attacks.scoring import worst_case
from attacks.training import Budget
from benchmarks.attack_stage import RUNS, train
from sim.config import config_from_dict
from sim.experiment import Prepared, prepare
from sim.stage import load_snapshot, parse_attacks, run_stage

SCALE = 4


def scaled(attack: Attack, factor: int) -> Attack:
    """The same attack with every training budget it holds scaled by ``factor``."""
    for name, value in vars(attack).items():
        if isinstance(value, Budget):
            setattr(attack, name, dataclasses.replace(
                value, max_epochs=value.max_epochs * factor, patience=value.patience * factor,
                max_seconds=value.max_seconds * factor))
    return attack


def stage(run_dir: Path, prep: Prepared, attacks: list[str], factor: int = 1) -> tuple[list[dict], float]:
    """``attacks`` on the run's final snapshot, every training budget scaled by ``factor``."""
    cfg = prep.config
    t0 = time.perf_counter()
    result = run_stage(load_snapshot(run_dir, cfg.rounds), cfg.resolved_groups(), prep.specs, prep.data,
                       prep.aux_idx, attacks, cfg.attacker_knowledge, cfg.attack_samples,
                       cfg.seed, device=prep.device,
                       make_attack=lambda text, **kw: scaled(build_attack(text, **kw), factor))
    return result.rows + worst_case(result.rows), time.perf_counter() - t0


def mean(rows: list[dict], attack: str, key: str) -> float:
    """The mean of ``key`` over the attack's rows (one per client)."""
    return float(np.mean([r[key] for r in rows if r["attack"] == attack and key in r]))


def table(results: dict[str, tuple[list[dict], float]]) -> None:
    """Mean SSIM and MSE over clients of each attack, one column pair per result, and seconds."""
    labels = list(results)
    names = list(dict.fromkeys(r["attack"] for r in results[labels[0]][0]))
    print("| attack | " + " | ".join(f"SSIM {k} | MSE {k}" for k in labels) + " |")
    print("|---|" + "---|---|" * len(labels))
    for name in names:
        cells = [f"{mean(results[k][0], name, 'ssim'):.4f} | {mean(results[k][0], name, 'mse'):.5f}"
                 for k in labels]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nseconds: " + ", ".join(f"{k} {results[k][1]:.0f}" for k in labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="?", help="a finished run (default: train the README demo)")
    parser.add_argument("--out", default="runs/bench-attack-strength")
    parser.add_argument("--heads", action="store_true",
                        help="compare the decoder on the end, start and both heads instead")
    args = parser.parse_args()
    if args.run_dir:
        import yaml

        run_dir = Path(args.run_dir)
        prep = prepare(config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text())))
    else:
        run_dir, prep = train({**RUNS["demo"], "attacks": "none"}, Path(args.out))
        prep = prepare(dataclasses.replace(prep.config, attacks=RUNS["demo"]["attacks"]))
    if args.heads:
        results = {heads: stage(run_dir, prep, [f"decoder(heads='{heads}')"]) for heads in HEAD_CHOICES}
        print(f"\nrun {run_dir}; the decoder on each choice of heads\n")
    else:
        attacks = parse_attacks(prep.config.attacks)
        results = {"default": stage(run_dir, prep, attacks), f"{SCALE}x": stage(run_dir, prep, attacks, SCALE)}
        print(f"\nrun {run_dir}; attacks {prep.config.attacks!r}; default vs {SCALE}x budget\n")
    table(results)
    if not args.heads:
        for name in dict.fromkeys(r["attack"] for r in results["default"][0]):
            ratio = mean(results["default"][0], name, "ssim") / mean(results[f"{SCALE}x"][0], name, "ssim")
            print(f"{name}: SSIM default / {SCALE}x = {ratio:.3f}")


if __name__ == "__main__":
    main()
