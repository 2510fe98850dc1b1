"""The fault plan and the injector that carries it out.

The plan is made from the seed before the run starts: which fault, at which second of the
load, against which worker, for how long. Rerunning with the same seed replays the same
faults (the interleaving with the load still varies with the machine's timing)."""

from __future__ import annotations

import heapq
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial

import redis

from charging.settings import Settings
from charging.tools.chaos.profile import Profile
from charging.tools.chaos.workers import Fleet, held
from charging.tools.redis_server import RedisServer

WORKER_KILL, WORKER_STALL, REDIS_KILL = "worker_kill", "worker_stall", "redis_kill"
KINDS = (WORKER_KILL, WORKER_STALL, REDIS_KILL)
TICK_S = 0.05
MARGIN_S = 1.0  # between two faults on one worker, and between stalls and Redis outages
STALL_TRIES = 40
STALL_SETTLE_S = 0.2  # after SIGSTOP, Redis finishes the commands the worker had already sent
SHORT_OUTAGE_S = (0.2, 1.5)  # within redis-py's retries: clients should not notice
# Longer than redis-py's retries of connection.py (8 attempts, backoff capped at 2 s: 9.1 s at most).
LONG_OUTAGE_S = (10.0, 11.0)


@dataclass(frozen=True)
class Fault:
    at_s: float  # seconds after the load started
    kind: str
    worker: int | None  # index in the fleet; None for a Redis kill
    length_s: float  # stall length, Redis downtime, or the pause before a killed worker's replacement
    # Redis kills only: start an AOF rewrite this long before the SIGKILL (None: none), so a crash
    # also hits Redis while it switches to new AOF files and its disk is busiest.
    rewrite_lead_s: float | None = None

    @property
    def until_s(self) -> float:
        return self.at_s + self.length_s


def plan(profile: Profile, seed: int, reclaim_idle_s: float) -> list[Fault]:
    """Faults over 5%..85% of the planned load, so each lands while charges flow. Stalls and
    Redis outages take turns, never overlapping: what a waking worker does is then judged by
    Redis, not lost with a connection. Worker kills fall anywhere (a replacement may start
    while Redis is down), but never on a stalled worker, so every stall ends with the same
    process waking up, and never on the last worker free of faults."""
    rng = random.Random(f"chaos-faults-{seed}")
    start, end = 0.05 * profile.duration_s, 0.85 * profile.duration_s
    turns = [Fault(0.0, WORKER_STALL, rng.randrange(profile.workers), round(reclaim_idle_s * rng.uniform(2.5, 4.0), 3))
             for _ in range(profile.worker_stalls)]
    turns += [_redis_kill(rng, long=i % 2 == 1) for i in range(profile.redis_kills)]
    rng.shuffle(turns)
    faults = _in_turn(rng, turns, start, end)
    for _ in range(profile.worker_kills):
        faults.append(_kill(rng, faults, profile.workers, start, end))
    return sorted(faults, key=lambda f: f.at_s)


def _redis_kill(rng: random.Random, long: bool) -> Fault:
    """A long outage outlasts the clients' own retries; a short one is killed during an AOF rewrite."""
    if long:
        return Fault(0.0, REDIS_KILL, None, round(rng.uniform(*LONG_OUTAGE_S), 3))
    return Fault(0.0, REDIS_KILL, None, round(rng.uniform(*SHORT_OUTAGE_S), 3), round(rng.uniform(0.0, 0.3), 3))


def _in_turn(rng: random.Random, faults: list[Fault], start: float, end: float) -> list[Fault]:
    """Lay faults out one after another, MARGIN_S apart, the spare time split at random between them."""
    spare = end - start - sum(f.length_s + MARGIN_S for f in faults)
    if spare < 0:
        raise ValueError(f"the load is {-spare:.1f}s too short for its stalls and Redis outages")
    weights = [rng.random() for _ in range(len(faults) + 1)]
    at, placed = start, []
    for fault, weight in zip(faults, weights):
        at += spare * weight / sum(weights)
        placed.append(replace(fault, at_s=round(at, 3)))
        at += fault.length_s + MARGIN_S
    return placed


def _kill(rng: random.Random, faults: list[Fault], workers: int, start: float, end: float) -> Fault:
    for _ in range(10_000):
        at, pause = rng.uniform(start, end), rng.uniform(0.0, 1.0)
        busy = {f.worker for f in faults
                if f.worker is not None and f.at_s - MARGIN_S < at + pause and at < f.until_s + MARGIN_S}
        free = [w for w in range(workers) if w not in busy]
        if len(free) > 1:
            return Fault(round(at, 3), WORKER_KILL, rng.choice(free), round(pause, 3))
    raise ValueError("too many faults for the fleet: never two workers free of faults at once")


class Injector:
    """Carries out a plan against the fleet and the Redis server, and keeps the fleet
    watched (a worker that exits on its own is recorded and replaced)."""

    def __init__(self, faults: list[Fault], fleet: Fleet, server: RedisServer, client: redis.Redis,
                 settings: Settings):
        self.fleet = fleet
        self.server = server
        self.client = client
        self.settings = settings
        self.done: list[dict] = []
        self._steps: list[tuple[float, int, Callable[[], None]]] = []
        for order, fault in enumerate(faults):
            heapq.heappush(self._steps, (fault.at_s, order, lambda fault=fault, order=order: self._begin(fault, order)))

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

    def _begin(self, fault: Fault, order: int) -> None:
        record = asdict(fault)
        if fault.kind == WORKER_KILL:
            record["pid"] = self.fleet.kill(fault.worker)
            end = partial(self.fleet.start, fault.worker)
        elif fault.kind == WORKER_STALL:
            record.update(self._stall(fault.worker))
            end = partial(self.fleet.cont, fault.worker)
        else:
            self._kill_redis(fault.rewrite_lead_s)
            end = self.server.restart
        record["started_s"] = round(self._now(), 3)
        heapq.heappush(self._steps, (self._now() + fault.length_s, order, lambda: self._end(record, end)))

    def _end(self, record: dict, end: Callable[[], object]) -> None:
        end()
        record["ended_s"] = round(self._now(), 3)
        record["lasted_s"] = round(record["ended_s"] - record["started_s"], 3)
        self.done.append(record)

    def _kill_redis(self, rewrite_lead_s: float | None) -> None:
        if rewrite_lead_s is not None:
            self.client.bgrewriteaof()
            time.sleep(rewrite_lead_s)
        self.server.kill()

    def _stall(self, worker: int) -> dict:
        """SIGSTOP the worker at a moment it holds entries (read, not settled): only such a stall
        tests that a worker waking up after its entries were reclaimed cannot apply them again.
        While it holds none, let it run a moment and stop it again."""
        for attempt in range(1, STALL_TRIES + 1):
            if attempt > 1:
                self.fleet.cont(worker)
                time.sleep(TICK_S)
            pid = self.fleet.stop(worker)
            time.sleep(STALL_SETTLE_S)
            holding = held(self.client, self.settings, self.fleet.name(worker))
            if holding:
                break
        return {"pid": pid, "held": holding, "tries": attempt}

    def _now(self) -> float:
        return time.monotonic() - self._started
