"""Peak memory of the whole process tree (driver, Ray's daemons, every actor), sampled.

Ray's workers are not our waited-for children, so ``getrusage`` misses them; the tree is
sampled instead. Proportional set size (PSS) is used where the kernel offers it, so pages
shared through Ray's object store are not counted once per actor.

Reading PSS makes the kernel walk each process's page tables: with Ray's object store mapped
into every worker a sample of the tree took ~0.1 s, so sampling every second used a tenth of a
core of the driver (measured at 50 clients; benchmarks/overhead.py). The sampler therefore keeps to
a CPU budget: it waits at least ``interval`` seconds between samples, and longer when a sample
costs more than ``budget`` of the time between them.
"""

from __future__ import annotations

import threading
import time

import psutil


def tree_memory_bytes(root: psutil.Process) -> int:
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return total


class PeakMemory:
    """Context manager sampling the process tree's memory every ``interval`` seconds or, when a
    sample costs more than ``budget`` of a core over that time, as often as the budget allows."""

    def __init__(self, interval: float = 1.0, budget: float = 0.02) -> None:
        self.interval, self.budget = interval, budget
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        root = psutil.Process()
        while True:
            start = time.thread_time()
            self.peak_bytes = max(self.peak_bytes, tree_memory_bytes(root))
            cost = time.thread_time() - start
            if self._stop.wait(max(self.interval, cost / self.budget)):
                return

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
