"""What every mode gets: the server, a namespace of its own, the output directory and
the progress display."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis
from rich.progress import Progress

from charging.keys import all_partitions
from charging.settings import Settings

POLL_S = 0.1
NAMESPACE_MAX = 32
REWRITE_TIMEOUT_S = 120


@dataclass
class Context:
    settings: Settings  # points at the bench's server
    client: redis.Redis
    out: Path
    run_id: str  # keeps this run's keys apart from earlier runs on a shared server
    progress: Progress
    own_server: bool  # a private redis-server: it may be emptied between runs

    def reset(self) -> None:
        """On a private server each run starts from an empty keyspace and a freshly rewritten
        (small) AOF, so no run pays for the AOF rewrite that the previous run's writes would
        trigger. Rewrites a run's own writes trigger happen during it, as in production.
        A shared server is left alone."""
        if not self.own_server:
            return
        self.client.flushall()
        self.client.bgrewriteaof()
        deadline = time.monotonic() + REWRITE_TIMEOUT_S
        while time.monotonic() < deadline:
            state = self.client.info("persistence")
            if not (state["aof_rewrite_in_progress"] or state["aof_rewrite_scheduled"]):
                return
            time.sleep(POLL_S)

    def settings_for(self, mode: str) -> Settings:
        """Each mode has its own namespace, so the checker after a mode sees only that mode."""
        suffix = f".{self.run_id}.{mode}"
        base = self.settings.namespace[:NAMESPACE_MAX - len(suffix)]  # the namespace setting's limit
        return self.settings.model_copy(update={"namespace": base + suffix})

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        task = self.progress.add_task(f"{description:<18}", total=total)
        try:
            yield lambda n: self.progress.advance(task, n)
        finally:
            self.progress.stop_task(task)

    def results_count(self, settings: Settings) -> int:
        pipe = self.client.pipeline(transaction=False)
        for keys in all_partitions(settings.namespace, settings.partitions):
            pipe.xlen(keys.results)
        return sum(pipe.execute())

    def redis_cpu_s(self) -> float:
        cpu = self.client.info("cpu")
        return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])

    def print(self, *items) -> None:
        self.progress.console.print(*items, highlight=False)
