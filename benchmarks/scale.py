"""How the simulator scales with the number of clients: seconds per round and peak memory.

Each client count is one real ``python -m sim.run`` (Flower + Ray + the cloud actor) with the
same fraction of clients sampled per round, on the whole Fashion-MNIST training split (the
more clients, the less data each). Peak memory is that of the whole process tree (the driver,
Ray's processes, the client actors and the cloud), sampled while it runs.

    python -m benchmarks.scale                        # 10, 50, 200, 1000 and 10000 clients
    python -m benchmarks.scale --clients 1000 10000 --rounds 3
    python -m benchmarks.scale --clients 1000 --rounds 3 --train-subset 6000   # 6 images each

By default a tenth of the clients is sampled per round, at most 100 (1 % of 10,000).
Checkpoint seconds and megabytes are per round (round 1 on): the round's shards (the views and
client states it changed) plus ``checkpoint.pt``, as the run's ``checkpoints.jsonl`` records.

Measured on 2 CPU cores (SFL-v2, whole Fashion-MNIST unless said; 1,000 clients: 100 sampled per
round, 2 rounds; 10,000 clients: 100 sampled per round, 3 rounds), before and after the view
moved to per-round shards on disk and checkpoints became incremental (commit 0618a96):

| clients | | s/round | checkpoint s/round | checkpoint MB/round | total s | peak MB (process tree) |
|---|---|---|---|---|---|---|
| 1,000 | before | 1.44 | (whole view rewritten) | 7.3 | | 3,115 |
| 1,000 | after | 1.1 | 0.05 | 5.35 | 30.3 | 2,899 |
| 10,000 | before | 25.7 | (whole view rewritten) | not recorded | 238 | 3,065 |
| 10,000 | after | 13.9 | 0.11 | 5.38 | 216.5 | 3,013 |
| 1,000 | 2026-12-07, 2 rounds | 8.4 | 0.08 | 12.74 | 53.8 | 2,897 |
| 1,000 | 2026-12-07, 3 rounds | 8.5 | 0.10 | 12.75 | 67.8 | 2,937 |
| 10,000 | 2026-12-07, 3 rounds | 19.2 | 0.16 | 5.38 | 345.6 | 2,969 |
| 10,000 | 2026-12-07, again | 15.9 | 0.08 | 5.38 | 302.8 | 2,976 |

The 2026-12-07 rows are this benchmark rerun on the code of that day (the peak-memory sampler
now keeps to 2 % of a core, so it samples less often when a sample is costly). The 1,000-client
"after" row of the day before (1.1 s/round, 5.35 MB) did not reproduce, and its cause was not
found: 100 sampled clients of 60 images each take 8.4 s a round on 2 cores, and their recorded
features (up to 54 features of 392 floats per client: 8.5 MB) are most of a round's 12.7 MB, the rest
``checkpoint.pt``; at 10,000 clients (6 images each) the round's features are under 1 MB.

Before, ``checkpoint.pt`` held the whole view and grew with every client that had trained (the
README demo, 50 clients: 49 MB rewritten each round); after, a round writes its own shard (what
the sampled clients sent) and a small ``checkpoint.pt``, so bytes per round follow the clients
sampled, not the total.

Those rows still had a round's time grow with the total number of clients. The driver's profile
at 10,000 named the cause: Flower 1.42's simulation runtime polled every registered node for
messages every 0.1 s, and each node's poll walked every stored message (docs/flower-ray.md,
pitfall 14): 77 % of the driver's samples, 0.7 of a core. ``sim/flower_poller.py`` now walks
the stored messages once a pass. Back to back on the same machine (2026-12-07, later), 3
rounds, 100 sampled:

| clients | images each | poller | s/round (2 on) | round 1 s | ckpt s/round | ckpt MB/round | total s | peak MB |
|---|---|---|---|---|---|---|---|---|
| 10,000 | 6 | Flower's | 17.0 | 18.3 | 0.07 | 5.38 | 354.6 | 2,970 |
| 10,000 | 6 | one walk | 5.7 | 7.6 | 0.06 | 5.38 | 103.7 | 2,997 |
| 1,000 | 6 (``--train-subset 6000``) | one walk | 5.8 | 7.3 | 0.06 | 5.38 | 42.7 | 2,884 |
| 10,000 | 6 | one walk, again | 5.8 | 7.5 | 0.07 | 5.38 | 98.1 | 2,988 |
| 1,000 | 6 (``--train-subset 6000``) | one walk, again | 5.8 | 7.1 | 0.06 | 5.38 | 40.0 | 2,892 |
| 1,000 | 60 | one walk | 9.1 | 10.9 | 0.08 | 12.75 | 59.0 | 2,893 |

With the same sampled clients holding the same data, a round takes the same time at 1,000 and
at 10,000 clients (5.8 s against 5.7-5.8 s); with all the data, 1,000 clients' rounds are the
longer ones, since each sampled client holds ten times the images. What is not rounds (start-up,
mostly asking each of the 10,000 nodes its partition id, one query message each, and shutdown)
fell with the poller from 302 s to 79-85 s at 10,000 clients. The server gives up on that
mapping only when no node has answered for 300 s (it had a fixed 300 s and one run failed with
7,771 nodes mapped).

With SFL-v2 batches over the cloud's channel and the tail stepping after its answer (commit
5fe6543), ``--clients 1000 10000 --rounds 3``: 1,000 clients (60 images each) 8.8 s a round,
checkpoint 0.09 s and 12.75 MB a round, 58.0 s in all, 2,911 MB; 10,000 clients (6 each) 5.9 s
a round (first round 8.0 s), checkpoint 0.08 s and 5.38 MB a round, 100.2 s in all, 3,051 MB.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.overhead import simulator
from sim.config import SimConfig

TRAIN_IMAGES = 60_000  # Fashion-MNIST's training split (the default dataset)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 50, 200, 1000, 10000])
    p.add_argument("--fraction", type=float, help="clients sampled per round (default: a tenth, at most 100)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--protocol", default=SimConfig.protocol, choices=["sflv1", "sflv2"])
    p.add_argument("--train-subset", type=int, default=None,
                   help="training samples used (default: all 60k): 6000 gives 1,000 clients the 6 images "
                        "each that 10,000 clients have of all 60k")
    args = p.parse_args()
    print("| clients | images per client | sampled per round | s/round (round 2 on) | first round s "
          "| checkpoint s/round | checkpoint MB/round | total s | peak MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.clients:
        fraction = args.fraction if args.fraction is not None else min(0.1, 100 / n)
        cfg = SimConfig(clients=n, rounds=args.rounds, fraction=fraction, protocol=args.protocol,
                        train_subset=args.train_subset)
        run = simulator(cfg)
        steady = np.mean(run.rounds[1:]) if len(run.rounds) > 1 else run.rounds[0]
        ckpt_s = np.mean([c["seconds"] for c in run.checkpoints])
        ckpt_mb = np.mean([c["bytes"] for c in run.checkpoints]) / 2**20
        print(f"| {n} | {(args.train_subset or TRAIN_IMAGES) // n} | {max(1, int(n * fraction))} | {steady:.1f} "
              f"| {run.rounds[0]:.1f} | {ckpt_s:.2f} | {ckpt_mb:.2f} | {run.total:.1f} | {run.peak_mb:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
