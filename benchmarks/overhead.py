"""What the simulator costs beyond the model compute itself.

For each client count, one process runs the same head and tail compute over the same samples:
as a single-process PyTorch loop (clients one after another, the tail in-process) on one torch
thread and on every core, and through the simulator (Flower + Ray + the cloud actor, in a
subprocess, using every core). The baseline is the faster of the two loops: it gets the whole
machine. It prints the times and their ratio per steady round (round 2 onward, so start-up is
excluded) and for the whole run including start-up.

    python -m benchmarks.overhead                    # 10 and 50 clients, SFL-v2, 3 rounds
    python -m benchmarks.overhead --clients 50 --protocol sflv1
    python -m benchmarks.overhead --clients 50 --client-cpus 0.5   # two client actors per core
    python -m benchmarks.overhead --clients 50 --repeat 3          # three measurements and their median

Before and after, 2 CPU cores, full Fashion-MNIST, SFL-v2, 3 rounds, 50 clients (each row one
run of this benchmark; only ratios within a row count: the loop on 2 threads ran 37-53 s/round
on different runs of this machine):

| run | loop s/round, 1 thread | loop s/round, 2 threads | simulator s/round | ratio to the faster loop |
|---|---|---|---|---|
| issue 14 as filed (its numbers) | | about 39 | about 47 | 1.2x |
| A | 71.51 | 49.31 | 55.54 | 1.13x (whole run: 1.29x) |
| B | 67.12 | 37.09 | 52.32 | 1.41x (whole run: 1.59x) |
| C | 63.63 | 40.51 | 44.52 | 1.10x (whole run: 1.33x) |
| D | 56.08 | 38.46 | 43.54 | 1.13x (whole run: 1.36x) |
| E | 60.29 | 42.57 | 39.43 | 0.93x (whole run: 1.14x) |
| F (`--repeat 3`) | 63.82 | 44.10 | 41.84 | 0.95x (whole run: 1.14x) |
| | 63.43 | 45.42 | 43.63 | 0.96x (whole run: 1.35x) |
| | 79.40 | 52.86 | 49.88 | 0.94x (whole run: 1.23x) |
| F, median of 3 | | | | **0.95x** (whole run: 1.23x) |
| G (as F, later) | 64.41 | 44.73 | 45.68 | 1.02x (whole run: 1.19x) |
| H (one-walk poller) | 59.95 | 39.70 | 48.23 | 1.21x (whole run: 1.42x) |
| I (as H, `--repeat 3`) | 61.82 | 40.86 | 48.66 | 1.19x (whole run: 1.38x) |
| | 56.49 | 40.85 | 43.24 | 1.06x (whole run: 1.33x) |
| | 61.11 | 42.14 | 46.74 | 1.11x (whole run: 1.26x) |
| I, median of 3 | | | | **1.11x** (whole run: 1.33x) |
| J (channel, step after the answer; `--repeat 3`) | 62.75 | 43.79 | 42.52 | 0.97x (whole run: 1.15x) |
| | 66.99 | 40.61 | 39.99 | 0.98x (whole run: 1.17x) |
| | 68.64 | 46.85 | 41.00 | 0.88x (whole run: 1.05x) |
| J, median of 3 | | | | **0.97x** (whole run: 1.15x) |

A: 2026-12-07, the simulator as it was. B: the same with `--client-cpus 0.5` (4 actors).
C: the peak-memory sampler held to 2 % of a core, and the tail's optimiser step taken after
the reply (through Ray; not kept). D: the sampler, and client actors 4 nicer than the cloud (not kept).
E and F: the sampler alone (commit 868d93d). G: the same code as F, hours later, right before
H. H and I: with Flower's message poller replaced by one walk over the stored messages a pass
(sim/flower_poller.py, for 10,000 clients; commit 3ac82d0), as shipped.

Later the same day the same code read 1.02x (G), and with the poller 1.06-1.21x (H, I; median
of three 1.11x), while the loop on 2 threads ran 40-45 s a round (42-53 s for E and F). The
poller does not explain it: run alternately, simulator only, the code before and after it read
47.6 and 41.9, then 49.9 and 49.6 s a round (at 50 clients the store holds a wave's few
messages, so Flower's own poller cost little). Over the nine runs since the sampler fix (E-I)
the ratio is 0.93-1.21x, median 1.02x: **at most 1.05x does not hold run after run on this
machine.** The sampler fix gave 0.93-0.96x in four measurements (E, F), against 1.13x before
(A). The one change between them is the peak-memory sampler: in the driver it took a tenth of
a core in bursts of ~0.1 s every second, and the driver runs at a higher CPU priority than
Ray's workers (nice 0 against Ray's 15), so each burst could stall the cloud, the serial
resource of SFL-v2's turn-taking. C and D, each with the sampler fix and one more change, read
1.10x and 1.13x in single runs: with run-to-run variation this large, a single run does not
settle a few percent. The whole run (start-up included) stays 1.14-1.42x: Ray's and Flower's
start-up. Runs on this machine vary by up to a quarter (the loop's 1-thread round took 56-79 s
on the same day), so compare ratios within a row, and use `--repeat`.
What the profile says (py-spy and /proc CPU accounting of each process over a steady round,
50 clients, 2 client actors):
- The cloud actor is busy 72-77 % of the time, the two client actors ~43 % each, the driver
  ~5 % (it was 16 %: ~11 % of a core went to the peak-memory sampler, whose PSS reading of
  the process tree costs ~0.1 s a sample; it now keeps to 2 % of a core, sim/memory.py);
  Ray's daemons ~3 %. The machine is ~12 % idle: with two clients taking strict turns at the
  shared tail, there are stretches where both wait for the cloud.
- ~90 % of the cloud's and the clients' CPU is torch compute, the same per batch as in the
  loop (the tail's train step: 18.3 ms in the cloud and in a solo process); Ray's call path
  (serialising the batch, the actor call, the reply) is ~10 % on each side.
- Two single-thread loops run side by side each keep their solo speed on this machine, so
  processes get the whole 2x of the two cores, while the loop's two torch threads get
  1.39-1.57x of one. The simulator reached ~1.3x of the 1-thread loop before the fix (1.45-1.6x
  after, E and F): it spends ~20 % more CPU per round than the loop (Ray's calls, Flower's
  messages, per-client set-up) and leaves ~12 % of the machine idle.
Tried and not kept, as they did not beat the noise: answering dL/dz before the tail's
optimiser step through Ray (46.25 -> 45.95 s/round, identical numbers), client actors at a
lower CPU priority than the cloud (row D; again with the poller,
simulator only, run alternately with the shipped code: 48.6 and 49.0 against 44.1 and 48.7 s a
round, although the cloud's thread was seen at nice 15 and the clients' at 19), and three client
actors (`--client-cpus 0.66`: 44.6 s/round, 3,642 MB peak).

J: what the profile above missed. Timing every call in the cloud actor (50 clients, one round)
showed the idle was not at wave changes (0.7 s a round) but after nearly every call: in 1,728
of 1,750 calls the next client's call arrived only after the previous one had finished, 4.6 ms
later (median). The clients were the slower side (head forward 7.5 ms, backward 15.5 ms, step
1.1 ms a batch, against the tail's ~23 ms), and the Ray call between them cost 7-8 ms a round
trip on the busy machine (~2 ms idle). Two changes: SFL-v2 batches go over the cloud's own
Unix-socket channel on its node (sim/channel.py; 0.37 ms a round trip idle), and the cloud
answers before the tail's optimiser step and steps right after (the client's path then no
longer holds the step; through Ray, in C, the reply could not leave first). The cloud still
waited ~2.9 ms after most calls with the channel alone. Same numbers as before (identical
metrics.jsonl and view.npz). Simulator only, run alternately, s/round: before 47.17 and 50.77;
channel 44.36 and 41.65, then 43.27 and 43.15; channel and step after the answer 39.35 and 40.30.
Earlier measurements against the 1-thread loop alone (before the baseline got the whole
machine) read 0.75x-0.91x: a loop on one thread is not an honest baseline on a 2-core machine.
Per wave (one client per actor) ~0.1-0.2 s would be lost to Flower's dispatch poll and the
reply's way back; the waves are pipelined so the actors do not idle between them
(docs/decisions.md). The loop on 2 threads runs each batch's convolutions on both cores; the
simulator's actors each use one thread and take turns at the tail.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch

from defenses.client_model import initial_model
from sim.client import TailLink, local_train, make_runtime
from sim.cloud import CloudSession, average_states, make_optimizer
from sim.config import RESERVOIR_SALT, SimConfig, derive_seed
from sim.data import to_tensor
from sim.experiment import prepare
from sim.models import build_tail, normalise, state_to_numpy
from sim.server_app import evaluate_group
from sim.view import Reservoir


class InProcessTail:
    """The cloud's session called directly: the tail's compute without any transport."""

    def __init__(self, session: CloudSession) -> None:
        self.session = session

    def train_batch(self, ids, z, y, last):
        return self.session.train_batch(ids, z, y)

    def predict(self, z, last):
        return self.session.predict(z)

    def finish(self, num_examples):
        pass

    def abort(self):
        pass


def single_process(cfg: SimConfig, threads: int) -> list[float]:
    """Seconds per round of the plain loop doing the simulator's compute on ``threads`` torch
    threads."""
    torch.set_num_threads(threads)
    prep = prepare(cfg)
    data, spec = prep.data, prep.specs[cfg.cut]
    rt = make_runtime(cfg, prep.specs, data.train_x, data.train_y, prep.partitions, data.mean, data.std)
    eval_x = normalise(to_tensor(data.test_x[prep.eval_idx]), data.mean, data.std)
    eval_y = torch.from_numpy(data.test_y[prep.eval_idx])
    torch.manual_seed(cfg.seed)
    tail = build_tail(spec)
    head_state = initial_model(spec, cfg.defense)
    tail_opt = make_optimizer(tail.parameters(), cfg.lr)
    times = []
    for r in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        heads, tails, weights = [], [], []
        for pid in range(cfg.clients):
            reservoir = Reservoir(cfg.reservoir, derive_seed(cfg.seed, r, pid, RESERVOIR_SALT))
            if cfg.protocol == "sflv1":
                copy_ = copy.deepcopy(tail)
                session = CloudSession(copy_, make_optimizer(copy_.parameters(), cfg.lr), reservoir)
            else:
                session = CloudSession(tail, tail_opt, reservoir)
            link = cast(TailLink, InProcessTail(session))  # vanilla split: no forward, backward, embed
            state, _, metrics = local_train(rt, pid, r, head_state, link)
            heads.append(state)
            tails.append(state_to_numpy(session.tail))
            weights.append(metrics["num-examples"])
        head_state = average_states(heads, weights)
        if cfg.protocol == "sflv1":
            tail.load_state_dict({k: torch.tensor(v) for k, v in average_states(tails, weights).items()},
                                 strict=False)
        evaluate_group(spec, head_state, state_to_numpy(tail), cfg.defense, eval_x, eval_y)
        times.append(time.perf_counter() - t0)
    return times


@dataclass
class SimulatorRun:
    rounds: list[float]  # seconds per round
    total: float  # seconds for the whole command
    peak_mb: float  # peak memory of its process tree
    checkpoints: list[dict[str, float]]  # per round: bytes written, seconds


def simulator(cfg: SimConfig) -> SimulatorRun:
    """A real ``python -m sim.run`` of ``cfg`` without attacks, timed."""
    with tempfile.TemporaryDirectory() as out:
        args = [sys.executable, "-m", "sim.run", "--out", out, "--clients", str(cfg.clients),
                "--rounds", str(cfg.rounds), "--fraction", str(cfg.fraction), "--protocol", cfg.protocol,
                "--defense", cfg.defense, "--client-cpus", str(cfg.client_cpus),
                "--seed", str(cfg.seed), "--attacks", "none"]
        if cfg.train_subset:
            args += ["--train-subset", str(cfg.train_subset)]
        t0 = time.perf_counter()
        proc = subprocess.run(args, capture_output=True, text=True)
        total = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"simulator failed: {proc.stderr.strip().splitlines()[-1]}")
        run_dir = next(Path(out).iterdir())
        lines = lambda name: [json.loads(x) for x in (run_dir / name).read_text().splitlines()]  # noqa: E731
        peak = json.loads((run_dir / "summary.json").read_text())["peak_memory_mb"]
        return SimulatorRun([r["seconds"] for r in lines("metrics.jsonl")], total, peak,
                            [c for c in lines("checkpoints.jsonl") if c["round"] > 0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 50])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--protocol", default=SimConfig.protocol, choices=["sflv1", "sflv2"])
    p.add_argument("--defense", default="none")
    p.add_argument("--train-subset", type=int, default=None, help="samples used (default: all 60k)")
    p.add_argument("--client-cpus", type=float, default=SimConfig.client_cpus,
                   help="the simulator's CPUs per client actor (0.5: two actors per core)")
    p.add_argument("--repeat", type=int, default=1,
                   help="measure each client count this many times (simulator, then the loops); "
                        "the last row gives the median ratios")
    args = p.parse_args()
    if args.repeat < 1:
        p.error(f"--repeat must be at least 1, got {args.repeat}")
    cores = os.cpu_count() or 1
    print("| clients | protocol | loop s/round, 1 thread | loop s/round, all cores | simulator s/round | ratio "
          "| loop total s | simulator total s | ratio | simulator peak MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in args.clients:
        cfg = SimConfig(clients=n, rounds=args.rounds, protocol=args.protocol, defense=args.defense,
                        train_subset=args.train_subset, client_cpus=args.client_cpus)
        ratios = []
        for _ in range(args.repeat):
            run = simulator(cfg)
            loops = {threads: single_process(cfg, threads) for threads in sorted({1, cores})}
            steady = {threads: np.mean(r[1:]) for threads, r in loops.items()}
            best = min(steady, key=steady.__getitem__)  # the baseline gets the whole machine: its faster setting
            sim_steady, loop_total = np.mean(run.rounds[1:]), sum(loops[best])
            ratios.append((float(sim_steady / steady[best]), run.total / loop_total))
            print(f"| {n} | {cfg.protocol} | {steady[1]:.2f} | {steady[cores]:.2f} | {sim_steady:.2f} "
                  f"| {ratios[-1][0]:.2f}x | {loop_total:.1f} | {run.total:.1f} "
                  f"| {ratios[-1][1]:.2f}x | {run.peak_mb:.0f} |", flush=True)
        if args.repeat > 1:
            steady_ratio, total_ratio = np.median(np.array(ratios), axis=0)
            print(f"| {n} | median of {args.repeat} | | | | {steady_ratio:.2f}x | | | {total_ratio:.2f}x | |",
                  flush=True)


if __name__ == "__main__":
    main()
