"""The worker fleet of a chaos run: each worker is `charging worker --consumer chaos-wN`, a
process of its own, as deployed. A replacement keeps its predecessor's consumer name, so it
settles the entries its predecessor left pending before it reads new ones."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import redis

from charging.keys import all_partitions
from charging.log import logger
from charging.settings import Settings

log = logger("charging.chaos")

STOP_TIMEOUT_S = 30
# Worker log events the report counts: evidence of what the faults made the workers do.
EVENTS = ("redis_unavailable", "entries_reclaimed", "settle_failed",
          "functions_reloaded", "entry_dead_lettered", "worker_started")


class Fleet:
    def __init__(self, env: dict[str, str], count: int, log_dir: Path):
        self.env = {**os.environ, **env}
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for old in self.log_dir.glob("chaos-w*.log"):  # a previous run's; replacements append to their own
            old.unlink()
        self.procs: list[subprocess.Popen | None] = [None] * count
        self.killed: set[int] = set()  # killed on purpose, replacement not started yet
        self.exits: list[dict] = []  # workers that exited on their own (a finding)

    def name(self, index: int) -> str:
        return f"chaos-w{index}"

    def log_path(self, index: int) -> Path:
        return self.log_dir / f"{self.name(index)}.log"

    def start_all(self) -> Fleet:
        for index in range(len(self.procs)):
            self.start(index)
        return self

    def start(self, index: int) -> int:
        with open(self.log_path(index), "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "charging", "worker", "--consumer", self.name(index)],
                                    env=self.env, stdout=out, stderr=out)
        self.procs[index] = proc
        self.killed.discard(index)
        return proc.pid

    def kill(self, index: int) -> int:
        self.killed.add(index)
        return self._signal(index, signal.SIGKILL, wait=True)

    def stop(self, index: int) -> int:
        return self._signal(index, signal.SIGSTOP)

    def cont(self, index: int) -> int:
        return self._signal(index, signal.SIGCONT)

    def _signal(self, index: int, sig: int, wait: bool = False) -> int:
        proc = self.procs[index]
        if proc.poll() is None:
            proc.send_signal(sig)
            if wait:
                proc.wait()
        return proc.pid

    def watch(self) -> None:
        """Replace a worker that exited without being killed, and record it: workers must
        ride out every fault by themselves."""
        for index, proc in enumerate(self.procs):
            if proc is not None and index not in self.killed and proc.poll() is not None:
                self.exits.append({"worker": self.name(index), "pid": proc.pid, "exit_code": proc.returncode})
                log.warning("worker_exited", worker=self.name(index), exit_code=proc.returncode)
                self.start(index)

    def shutdown(self) -> list[int]:
        """SIGCONT then SIGTERM (finish the batch in hand); exit codes, 0 for a clean stop."""
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        codes = []
        for proc in self.procs:
            if proc is None:
                continue
            try:
                codes.append(proc.wait(timeout=STOP_TIMEOUT_S))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
        return codes

    def events(self) -> dict[str, int]:
        """How often each event of EVENTS appears in the workers' logs."""
        counts: Counter = Counter()
        for path in self.log_dir.glob("*.log"):
            with open(path, "rb") as lines:
                for line in lines:
                    for event in EVENTS:
                        if b'"event": "' + event.encode() + b'"' in line:
                            counts[event] += 1
        return {event: counts[event] for event in EVENTS}


def held(client: redis.Redis, settings: Settings, consumer: str) -> int:
    """Entries delivered to consumer and not settled yet, over all partitions (0 while Redis is down)."""
    try:
        return sum(c["pending"] for keys in all_partitions(settings.namespace, settings.partitions)
                   for c in client.xinfo_consumers(keys.requests, settings.group) if c["name"] == consumer.encode())
    except redis.RedisError:
        return 0
