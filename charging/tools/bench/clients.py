"""Concurrent synchronous clients (authorize, naive, memcached modes): each client is a
thread with its own connection, the threads are spread over a few processes so the GIL of
one process does not serialise them all. Closed loop (next call when the last one
answered) or paced at a fixed rate per client."""

from __future__ import annotations

import multiprocessing
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from charging import log as logging_setup

START_DELAY_S = 1.5  # lets every process import and connect before the clock starts
SWITCH_INTERVAL_S = 0.0005  # a thread whose reply arrived should not wait 5 ms (the default) for the GIL
PROGRESS_EVERY = 50


@dataclass
class ClientRun:
    latencies_ms: list[float] = field(default_factory=list)
    done_at_s: list[float] = field(default_factory=list)  # since the common start
    replies: list = field(default_factory=list)  # what each call returned, in no particular order
    errors: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return max(self.done_at_s, default=0.0)

    def merge(self, other: ClientRun) -> None:
        self.latencies_ms += other.latencies_ms
        self.done_at_s += other.done_at_s
        self.replies += other.replies
        self.errors += other.errors


def run_clients(factory: Callable, args: tuple, jobs: list, clients: int, processes: int,
                rate: float | None, advance: Callable[[int], None]) -> ClientRun:
    """Run factory(*args)(job) for every job. factory must be a module-level class or
    function (it is sent to spawned processes); each client thread makes its own."""
    per_client = [jobs[i::clients] for i in range(clients)]
    groups = [per_client[p::processes] for p in range(processes)]
    ctx = multiprocessing.get_context("spawn")
    done = ctx.Value("q", 0)
    start_at = time.time() + START_DELAY_S
    client_rate = rate / clients if rate else None
    pipes, procs = [], []
    for group in groups:
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_process, args=(factory, args, group, client_rate, start_at, done, send))
        proc.start()
        pipes.append(receive)
        procs.append(proc)
    run = ClientRun()
    shown = 0
    pending = list(pipes)
    while pending:
        for receive in [r for r in pending if r.poll(0.1)]:
            run.merge(receive.recv())
            pending.remove(receive)
        advance(done.value - shown)
        shown = done.value
        if any(not p.is_alive() and p.exitcode for p in procs):
            raise RuntimeError(f"a client process failed: exit codes {[p.exitcode for p in procs]}")
    for proc in procs:
        proc.join()
    return run


def _process(factory, args, groups: list[list], rate: float | None, start_at: float, done, send) -> None:
    logging_setup.configure("warning")
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    runs = [ClientRun() for _ in groups]
    threads = [threading.Thread(target=_client, args=(factory(*args), jobs, rate, start_at, done, run))
               for jobs, run in zip(groups, runs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = ClientRun()
    for run in runs:
        total.merge(run)
    send.send(total)


def _client(call, jobs: list, rate: float | None, start_at: float, done, run: ClientRun) -> None:
    time.sleep(max(0.0, start_at - time.time()))
    began = time.perf_counter()
    phase = random.random()  # paced clients must not all fire at the same instant
    unreported = 0
    for index, job in enumerate(jobs):
        if rate:
            # Paced: the next call is due at a fixed time; a late client sends at once.
            time.sleep(max(0.0, began + (index + phase) / rate - time.perf_counter()))
        sent = time.perf_counter()
        try:
            run.replies.append(call(job))
        except Exception as exc:  # noqa: BLE001 - counted and reported; the checker shows what it cost
            run.errors.append(f"{type(exc).__name__}: {exc}")
        finished = time.perf_counter()
        run.latencies_ms.append((finished - sent) * 1000)
        run.done_at_s.append(time.time() - start_at)
        unreported += 1
        if unreported == PROGRESS_EVERY or index + 1 == len(jobs):
            with done.get_lock():
                done.value += unreported
            unreported = 0
