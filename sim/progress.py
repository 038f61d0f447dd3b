"""Progress display: one line per round (round, accuracy, clients done, time) with rich."""

from __future__ import annotations

import threading
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class Reporter:
    """Receives the server loop's events; thread-safe (Flower runs the ServerApp in a thread).

    A live bar counts the clients done in the current round; each finished round prints one
    permanent line above it.
    """

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._lock = threading.Lock()
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("clients"),
            TimeElapsedColumn(), console=self.console, transient=True)
        self._task: Any = None
        self.rounds = 0

    def start(self, rounds: int, clients: int, description: str) -> None:
        self.rounds = rounds
        self.console.print(f"[bold]{description}[/bold]: {clients} clients, {rounds} rounds")
        self._progress.start()

    def round_started(self, round_: int, sampled: int) -> None:
        with self._lock:
            if self._task is not None:
                self._progress.remove_task(self._task)
            self._task = self._progress.add_task(f"round {round_}/{self.rounds}", total=sampled)

    def client_done(self, reply: Any) -> None:
        with self._lock:
            if self._task is not None:
                self._progress.advance(self._task)

    def round_finished(self, record: dict[str, Any]) -> None:
        failed = f", {len(record['failed'])} failed" if record["failed"] else ""
        with self._lock:
            self._progress.console.print(
                f"round {record['round']:>3}/{self.rounds}  accuracy {record['accuracy'] * 100:6.2f} %  "
                f"clients {record['completed']}/{record['sampled']}{failed}  {record['seconds']:7.1f} s")

    def stop(self) -> None:
        with self._lock:
            self._progress.stop()
