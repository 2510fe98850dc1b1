"""The fault plan and the injector that carries it out.

The plan is made from the seed before the run starts: which fault, at which second of the
load, against which worker, for how long. Rerunning with the same seed replays the same
faults (the interleaving with the load still varies with the machine's timing)."""

from __future__ import annotations

import heapq
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from charging.redis_server import RedisServer
from chaos.profile import Profile
from chaos.workers import Fleet

WORKER_KILL, WORKER_STALL, REDIS_KILL = "worker_kill", "worker_stall", "redis_kill"
KINDS = (WORKER_KILL, WORKER_STALL, REDIS_KILL)
TICK_S = 0.05
SHORT_OUTAGE_S = (0.2, 1.5)  # within redis-py's retries: clients should not even notice
# Longer than redis-py's retries of connection.py (8 attempts, backoff capped at 2 s: 9.1 s at most).
LONG_OUTAGE_S = (10.0, 12.0)


@dataclass(frozen=True)
class Fault:
    at_s: float  # seconds after the load started
    kind: str
    worker: int | None  # index in the fleet; None for a Redis kill
    length_s: float  # stall length, Redis downtime, or the pause before a killed worker's replacement

    @property
    def until_s(self) -> float:
        return self.at_s + self.length_s


def plan(profile: Profile, seed: int, reclaim_idle_s: float) -> list[Fault]:
    """Faults spread over 10%..80% of the planned load, so each lands while charges flow.
    A worker is never killed while it is stalled nor stalled while it is being replaced, so
    every stall ends with the same process waking up."""
    rng = random.Random(f"chaos-faults-{seed}")
    start, end = 0.1 * profile.duration_s, 0.8 * profile.duration_s
    faults: list[Fault] = []
    for _ in range(profile.worker_stalls):
        faults.append(_on_free_worker(rng, faults, profile.workers, start, end, WORKER_STALL,
                                      lambda: reclaim_idle_s * rng.uniform(2.5, 4.0)))
    for _ in range(profile.worker_kills):
        faults.append(_on_free_worker(rng, faults, profile.workers, start, end, WORKER_KILL,
                                      lambda: rng.uniform(0.0, 1.0)))
    # Redis kills in separate slices of the window, so each restart has settled before the next.
    # Every second outage outlasts the clients' own retries, so callers see the error.
    slice_s = (end - start) / max(profile.redis_kills, 1)
    for i in range(profile.redis_kills):
        at = start + slice_s * (i + rng.uniform(0.2, 0.6))
        downtime = rng.uniform(*(LONG_OUTAGE_S if i % 2 else SHORT_OUTAGE_S))
        faults.append(Fault(round(at, 3), REDIS_KILL, None, round(downtime, 3)))
    return sorted(faults, key=lambda f: f.at_s)


def _on_free_worker(rng: random.Random, faults: list[Fault], workers: int, start: float, end: float,
                    kind: str, length: Callable[[], float]) -> Fault:
    while True:
        at, span = rng.uniform(start, end), length()
        # Keep at least one worker free of faults at every moment, and one fault per worker at a time.
        busy = {f.worker for f in faults if f.worker is not None and f.at_s - 1 < at + span and at < f.until_s + 1}
        free = [w for w in range(workers) if w not in busy]
        if len(free) > 1:
            return Fault(round(at, 3), kind, rng.choice(free), round(span, 3))


class Injector:
    """Carries out a plan against the fleet and the Redis server, and keeps the fleet
    watched (a worker that exits on its own is recorded and replaced)."""

    def __init__(self, faults: list[Fault], fleet: Fleet, server: RedisServer):
        self.fleet = fleet
        self.server = server
        self.done: list[dict] = []
        self._steps: list[tuple[float, int, Callable[[], None]]] = []
        for order, fault in enumerate(faults):
            self._schedule(fault, order)

    def _schedule(self, fault: Fault, order: int) -> None:
        begin, end = {
            WORKER_KILL: (lambda: self.fleet.kill(fault.worker), lambda: self.fleet.start(fault.worker)),
            WORKER_STALL: (lambda: self.fleet.stop(fault.worker), lambda: self.fleet.cont(fault.worker)),
            REDIS_KILL: (self.server.kill, self.server.restart),
        }[fault.kind]
        record = {**asdict(fault)}

        def first():
            record["started_s"] = round(self._now(), 3)
            record["pid"] = begin()

        def then():
            end()
            record["ended_s"] = round(self._now(), 3)
            record["lasted_s"] = round(record["ended_s"] - record["started_s"], 3)
            self.done.append(record)

        heapq.heappush(self._steps, (fault.at_s, 2 * order, first))
        heapq.heappush(self._steps, (fault.until_s, 2 * order + 1, then))

    def run(self, started: float) -> None:
        """Blocks until the last step of the plan has run; started is the load's start (monotonic)."""
        self._started = started
        while self._steps:
            at, _, step = self._steps[0]
            if self._now() >= at:
                heapq.heappop(self._steps)
                step()
            else:
                self.fleet.watch()
                time.sleep(TICK_S)

    def _now(self) -> float:
        return time.monotonic() - self._started

    def counts(self) -> dict[str, int]:
        return {kind: sum(1 for f in self.done if f["kind"] == kind) for kind in KINDS}
