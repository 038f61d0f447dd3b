"""How the simulator scales with the number of clients: seconds per round and peak memory.

Each client count is one real ``python -m sim.run`` (Flower + Ray + the cloud actor) with the
same fraction of clients sampled per round, on the whole Fashion-MNIST training split (the
more clients, the less data each). Peak memory is that of the whole process tree (the driver,
Ray's processes, the client actors and the cloud), sampled while it runs.

    python -m benchmarks.scale                        # 10, 50, 200 and 1000 clients, fraction 0.1
    python -m benchmarks.scale --clients 1000 10000 --fraction 0.01 --rounds 3

Checkpoint seconds and megabytes are per round (round 1 on): the round's shards (the views and
client states it changed) plus ``checkpoint.pt``, as the run's ``checkpoints.jsonl`` records.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.overhead import simulator
from sim.config import SimConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 50, 200, 1000])
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--protocol", default=SimConfig.protocol, choices=["sflv1", "sflv2"])
    args = p.parse_args()
    print("| clients | sampled per round | s/round (round 2 on) | first round s | checkpoint s/round "
          "| checkpoint MB/round | total s | peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.clients:
        cfg = SimConfig(clients=n, rounds=args.rounds, fraction=args.fraction, protocol=args.protocol)
        run = simulator(cfg)
        steady = np.mean(run.rounds[1:]) if len(run.rounds) > 1 else run.rounds[0]
        ckpt_s = np.mean([c["seconds"] for c in run.checkpoints])
        ckpt_mb = np.mean([c["bytes"] for c in run.checkpoints]) / 2**20
        print(f"| {n} | {max(1, int(n * args.fraction))} | {steady:.1f} | {run.rounds[0]:.1f} | {ckpt_s:.2f} "
              f"| {ckpt_mb:.2f} | {run.total:.1f} | {run.peak_mb:.0f} |", flush=True)


if __name__ == "__main__":
    main()
