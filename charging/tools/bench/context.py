"""What every mode gets: the server, a namespace of its own, the output directory and
the progress display."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis
from rich.progress import Progress

from charging.keys import all_partitions
from charging.settings import Settings

POLL_S = 0.1
# Not a charge's work: the bench's own probing while it waits (INFO, XLEN), and FCALL, whose
# commands INFO commandstats counts one by one as the function runs them.
NOT_WORK = frozenset({"info", "xlen", "fcall", "fcall_ro"})
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

    def redis_work(self) -> RedisWork:
        """What Redis has done so far: read before and after a phase, see per_charge()."""
        pipe = self.client.pipeline(transaction=False)
        for section in ("cpu", "commandstats", "memory"):
            pipe.info(section)
        cpu, stats, memory = pipe.execute()
        calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
        return RedisWork(float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), calls, int(memory["used_memory"]))

    def print(self, *items) -> None:
        self.progress.console.print(*items, highlight=False)


@dataclass(frozen=True)
class RedisWork:  # a reading, or (by subtraction) what was done between two
    cpu_s: float  # used_cpu_user + used_cpu_sys of the server
    calls: dict[str, int] = field(repr=False)  # INFO commandstats calls by command name
    used_memory: int

    def __sub__(self, earlier: RedisWork) -> RedisWork:
        """What Redis did between an earlier reading and this one."""
        return RedisWork(self.cpu_s - earlier.cpu_s, {name: n - earlier.calls.get(name, 0)
                                                      for name, n in self.calls.items()},
                         self.used_memory - earlier.used_memory)

    def __add__(self, other: RedisWork) -> RedisWork:
        """Two phases' work together (each a difference of readings)."""
        names = self.calls.keys() | other.calls.keys()
        return RedisWork(self.cpu_s + other.cpu_s,
                         {name: self.calls.get(name, 0) + other.calls.get(name, 0) for name in names},
                         self.used_memory + other.used_memory)

    def per_charge(self, later: RedisWork, charges: int) -> dict[str, float]:
        """What Redis spent per settled charge between this reading and a later one: commands
        run (NOT_WORK left out), CPU microseconds, and bytes of memory still held."""
        if not charges:
            return {}
        done = later - self
        commands = sum(n for name, n in done.calls.items() if name not in NOT_WORK)
        return {"redis_commands": round(commands / charges, 2),
                "redis_cpu_us": round(done.cpu_s / charges * 1e6, 1),
                "bytes_held": round(done.used_memory / charges, 1)}
