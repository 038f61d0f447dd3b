"""How many torch threads the attack stage computes with, measured rather than assumed.

On a machine whose cores are busy (Ray's processes winding down after a simulation, a sweep's
other points, anything else), torch's OpenMP threads wait on each other at every operation:
measured on 2 cores under load, a decoder's training step ran 5 to 10 times slower with 2
threads than with 1, almost all of it spinning and in the kernel; on idle cores 2 threads are
faster. Neither setting is right everywhere, so before each attack fits, the stage times a
few training steps of a small decoder (shaped like the attack's features and images) with one
thread and with every core this process may use, and runs the fit with the faster.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from sim.decoders import build_decoder

PROBE_STEPS = 4  # training steps timed per setting (after one untimed warm-up step)


def available_cores() -> int:
    """The cores this process may run on (its affinity mask; all CPUs where unsupported)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch's intra-op work on ``n`` threads inside the block, then restore the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fastest_threads(feature_shape: tuple[int, ...], image_shape: tuple[int, ...],
                    batch: int = 64, device: str = "cpu") -> int:
    """1 or :func:`available_cores`, whichever trains a small decoder faster right now.

    On a GPU the thread count hardly matters; one CPU thread then feeds it.
    """
    cores = available_cores()
    if cores == 1 or str(device).startswith("cuda"):
        return 1
    with torch.random.fork_rng():  # the probe must not move the stage's seeded generator
        torch.manual_seed(0)
        decoder = build_decoder(tuple(feature_shape), tuple(image_shape), 32, 2)
        optimizer = torch.optim.SGD(decoder.parameters(), lr=1e-3)
        z, x = torch.rand(batch, *feature_shape), torch.rand(batch, *image_shape)

        def seconds(n: int) -> float:
            with torch_threads(n):
                for step in range(PROBE_STEPS + 1):
                    if step == 1:
                        start = time.perf_counter()
                    loss = F.mse_loss(decoder(z), x)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                return time.perf_counter() - start

        timings = {n: min(seconds(n), seconds(n)) for n in (1, cores)}
    return min(timings, key=timings.__getitem__)
