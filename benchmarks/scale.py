"""How the simulator scales with the number of clients: seconds per round and peak memory.

Each client count is one real ``python -m sim.run`` (Flower + Ray + the cloud actor) with the
same fraction of clients sampled per round, on the whole Fashion-MNIST training split (the
more clients, the less data each). Peak memory is that of the whole process tree (the driver,
Ray's processes, the client actors and the cloud), sampled while it runs.

    python -m benchmarks.scale                        # 10, 50, 200, 1000 and 10000 clients
    python -m benchmarks.scale --clients 1000 10000 --rounds 3

By default a tenth of the clients is sampled per round, at most 100 (1 % of 10,000).
Checkpoint seconds and megabytes are per round (round 1 on): the round's shards (the views and
client states it changed) plus ``checkpoint.pt``, as the run's ``checkpoints.jsonl`` records.

Measured on 2 CPU cores (SFL-v2, whole Fashion-MNIST; 1,000 clients: 100 sampled per round,
2 rounds; 10,000 clients: 100 sampled per round, 3 rounds), before and after the view moved to
per-round shards on disk and checkpoints became incremental (commit 0618a96):

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

A round's time still grows with the total number of clients (100 sampled: 8.4 s at 1,000,
16-19 s at 10,000, with a tenth of the data each). The driver's profile at 10,000 names the
cause: Flower 1.42's simulation engine polls every registered node for messages every 0.1 s
(``add_messages_to_queue`` in ``flwr/server/superlink/fleet/vce/vce_api.py``, which calls
``InMemoryLinkState.get_message_ins`` once per node, and that scans every stored message):
77 % of the driver's samples, 0.7 of a core. Not fixed: it is inside Flower (a poller that
walks the stored messages once per pass instead of once per node would make it follow the
sampled clients). Start-up at 10,000 (asking each node its partition id) took 255-290 s in
these runs; the server now gives up only when no node has answered for 300 s (it had a fixed
300 s and one run failed with 7,771 nodes mapped).

Before, ``checkpoint.pt`` held the whole view and grew with every client that had trained (the
README demo, 50 clients: 49 MB rewritten each round); after, a round writes its own shard (what
the sampled clients sent) and a small ``checkpoint.pt``, so bytes per round follow the clients
sampled, not the total. At 10,000 clients most of the total is start-up: Flower maps each of
the 10,000 simulated nodes to a partition (one query message per node, about 170 s here); a
round's time follows the 100 sampled clients.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.overhead import simulator
from sim.config import SimConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 50, 200, 1000, 10000])
    p.add_argument("--fraction", type=float, help="clients sampled per round (default: a tenth, at most 100)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--protocol", default=SimConfig.protocol, choices=["sflv1", "sflv2"])
    args = p.parse_args()
    print("| clients | sampled per round | s/round (round 2 on) | first round s | checkpoint s/round "
          "| checkpoint MB/round | total s | peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.clients:
        fraction = args.fraction if args.fraction is not None else min(0.1, 100 / n)
        cfg = SimConfig(clients=n, rounds=args.rounds, fraction=fraction, protocol=args.protocol)
        run = simulator(cfg)
        steady = np.mean(run.rounds[1:]) if len(run.rounds) > 1 else run.rounds[0]
        ckpt_s = np.mean([c["seconds"] for c in run.checkpoints])
        ckpt_mb = np.mean([c["bytes"] for c in run.checkpoints]) / 2**20
        print(f"| {n} | {max(1, int(n * fraction))} | {steady:.1f} | {run.rounds[0]:.1f} | {ckpt_s:.2f} "
              f"| {ckpt_mb:.2f} | {run.total:.1f} | {run.peak_mb:.0f} |", flush=True)


if __name__ == "__main__":
    main()
