"""The attack stage against the same decoder attack fitted directly, in one process.

For each run, the simulation is run in this process first (Flower and Ray started and shut
down here, as ``python -m sim.run`` does), then the run's attack stage is timed as the CLI
runs it (``sim.experiment.attack_stage``: snapshot loading, knowledge, thread choice, fit, every
client's reconstructions, scoring, report), then the same decoder is fitted directly: the
saved aggregated and starting heads, ``attacks.decoder.train_decoder`` with the same budget on
the same auxiliary images, every client's recorded features decoded and scored. The direct fit
gets the whole machine: it runs with one torch thread and with every core, and the faster
counts. The printed ratio is the stage's seconds over the direct fit's.

    python -m benchmarks.attack_stage                 # the two runs of the table below
    python -m benchmarks.attack_stage --runs small    # only the 10-client undefended run

Why the stage once looked ten times slower than the same decoder alone (profiled on the 2-core
machine, 10 clients, 1 round, 5000 samples, undefended): ``--attacks decoder`` built the class's
own defaults (CEM's full decoder: 50 epochs, width 64, 8 blocks, batch 256; 29.7 s an epoch, so
about 25 minutes), while the comparison used the config's default spec (5 epochs, width 32, 2
blocks, batch 64: 39 s alone, 48 s as the stage after Flower and Ray). Two defaults for one name;
now there is one. Second, on busy cores torch's two OpenMP threads spin against each other (the
oneDNN reorders and kernel time seen in py-spy): 30 decoder steps took 4.2 s on one thread and
39.8 s on two under load, so the stage now measures the faster thread count before each fit
(``attacks.threads``).

Measured on the 2-core CPU machine, nothing else running (2026-12-06; the decoder trains to
convergence: 23 epochs on the small run, 19 on the demo):

| run | stage s | direct s (1 thread) | direct s (2 threads) | ratio |
|---|---|---|---|---|
| small (10 clients, 1 round, 5000 samples, undefended) | 327.1 | 591.7 | 336.0 | 0.97x |
| demo (50 clients, 3 rounds, cem) | 281.8 | 559.7 | 296.9 | 0.95x |

Before the fix, the small run's stage was still fitting after 270 s (inside ``sim.run``) and
after 500 s (alone), while the same spec fitted directly took 43 to 52 s.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from attacks.base import build_attack
from attacks.decoder import DecoderAttack, decode, train_decoder
from attacks.scoring import Scorer
from attacks.threads import available_cores, torch_threads
from defenses.client_model import build_client_model
from sim.config import load_config
from sim.data import to_tensor
from sim.decoders import build_decoder
from sim.experiment import Prepared, _quiet_libraries, attack_stage, make_run_dir, prepare, simulate, write_summary
from sim.models import normalise
from sim.stage import load_snapshot, parse_attacks

RUNS: dict[str, dict[str, Any]] = {  # the run, and the README demo
    "small": {"clients": 10, "rounds": 1, "train_subset": 5000, "defense": "none", "attacks": "decoder"},
    "demo": {"clients": 50, "defense": "cem", "attacks": "decoder"},
}


class _Quiet:
    def print(self, *_: Any) -> None:
        pass


def train(settings: dict[str, Any], out: Path) -> tuple[Path, Prepared]:
    """Run the simulation in this process (Flower and Ray included) and return its folder."""
    from sim.progress import Reporter

    cfg = load_config(None, {**settings, "out": str(out)})
    prep = prepare(cfg)
    run_dir = make_run_dir(cfg)
    _quiet_libraries()
    reporter = Reporter()
    reporter.start(cfg.rounds, cfg.clients, f"{cfg.dataset} {cfg.defense}")
    outcome = simulate(prep, run_dir, reporter)
    if "error" in outcome:
        raise SystemExit(f"the simulation failed: {outcome['error']}")
    write_summary(run_dir, cfg, outcome)
    return run_dir, prep


def direct_fit(run_dir: Path, prep: Prepared) -> float:
    """The decoder of the run's attack spec, fitted and applied with no simulator code between."""
    cfg = prep.config
    spec_text = next(a for a in parse_attacks(cfg.attacks) if a.startswith("decoder"))
    attack = cast(DecoderAttack, build_attack(spec_text))  # a decoder(...) spec, only for its parameters
    group = cfg.resolved_groups()[0]
    spec = prep.specs[group.cut]
    snapshot = load_snapshot(run_dir, cfg.rounds)
    data = prep.data
    heads = [build_client_model(spec, group.defense, state, {})
             for state in (snapshot.heads[group.name], snapshot.start_heads.get(group.name))
             if state is not None]

    def oracle(head: torch.nn.Module, defense: torch.nn.Module):
        head.eval()
        defense.eval()

        @torch.no_grad()
        def query(x01: torch.Tensor) -> torch.Tensor:
            return defense(head(normalise(x01, data.mean, data.std)))
        return query

    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    aux01 = to_tensor(data.test_x[prep.aux_idx])
    decoder = build_decoder(spec.feature_shape, spec.in_shape, attack.width, attack.blocks)
    oracles = [oracle(h, d) for h, d in heads]
    train_decoder(decoder, oracles if attack.heads == "both" else oracles[:1], aux01,
                  budget=attack.budget, batch_size=attack.batch_size, lr=attack.lr,
                  weight_decay=attack.weight_decay)
    rows = snapshot.view[group.cut]
    scorer = Scorer(data.train_x)
    rng = np.random.default_rng(cfg.seed)
    for pid in np.unique(rows["client_ids"]):
        mine = np.flatnonzero(rows["client_ids"] == pid)
        mine = np.sort(rng.choice(mine, min(len(mine), cfg.attack_samples), replace=False))
        scorer.score(rows["sample_ids"][mine], decode(decoder, torch.from_numpy(rows["features"][mine])))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", choices=sorted(RUNS), default=sorted(RUNS, reverse=True))
    parser.add_argument("--out", default="runs/bench-attack-stage")
    args = parser.parse_args()
    lines = []
    for name in args.runs:
        run_dir, prep = train(RUNS[name], Path(args.out))
        t0 = time.perf_counter()
        attack_stage(run_dir, prep, _Quiet())
        stage = time.perf_counter() - t0
        direct = {}
        for n in sorted({1, available_cores()}):
            with torch_threads(n):
                direct[n] = direct_fit(run_dir, prep)
        best = min(direct.values())
        line = (f"| {name} | {stage:.1f} | " + " | ".join(f"{direct.get(n, float('nan')):.1f}"
                                                          for n in (1, available_cores()))
                + f" | {stage / best:.2f}x |")
        print(line, flush=True)
        lines.append(line)
    print(f"\n| run | stage s | direct s (1 thread) | direct s ({available_cores()} threads) | ratio |")
    print("|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
