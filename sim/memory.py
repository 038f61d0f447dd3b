"""Peak memory of the whole process tree (driver, Ray's daemons, every actor), sampled.

Ray's workers are not our waited-for children, so ``getrusage`` misses them; the tree is
sampled instead. Proportional set size (PSS) is used where the kernel offers it, so pages
shared through Ray's object store are not counted once per actor.
"""

from __future__ import annotations

import threading

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
    """Context manager sampling the process tree's memory every ``interval`` seconds."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        root = psutil.Process()
        while True:
            self.peak_bytes = max(self.peak_bytes, tree_memory_bytes(root))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
