"""The engine's workers as a user runs them: `charging worker --processes W` in a
subprocess, configured only through the environment; with their resident memory sampled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from charging.settings import Settings

STOP_TIMEOUT_S = 60


class WorkerProcesses:
    def __init__(self, settings: Settings, processes: int, log_path: Path, burst: bool = False):
        self.settings = settings
        self.processes = processes
        self.log_path = log_path
        self.burst = burst
        self.proc: subprocess.Popen | None = None
        self.peak_rss_mb: dict[int, float] = {}  # consumer pid -> highest RSS seen
        self.cpu_s: dict[int, float] = {}  # consumer pid -> CPU seconds used, as last seen

    def start(self) -> WorkerProcesses:
        env = {**os.environ, **environment(self.settings)}
        args = [sys.executable, "-m", "charging", "worker", "--processes", str(self.processes)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args + (["--burst"] if self.burst else []), env=env, stdout=log,
                                         stderr=log)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def sample(self) -> None:
        """Resident memory and CPU time of every consumer process, now."""
        for pid in self._consumers():
            rss = _rss_mb(pid)
            if rss is not None:
                self.peak_rss_mb[pid] = max(rss, self.peak_rss_mb.get(pid, 0.0))
            cpu = _cpu_s(pid)
            if cpu is not None:
                self.cpu_s[pid] = max(cpu, self.cpu_s.get(pid, 0.0))

    def cpu_seconds(self) -> float:
        return sum(self.cpu_s.values())

    def peak_rss(self) -> float | None:
        peak = max(self.peak_rss_mb.values(), default=None)
        return None if peak is None else round(peak, 1)

    def wait(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """A burst run exits by itself once everything is settled; stopped if it has not by then."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return self.stop()

    def stop(self) -> int | None:
        """SIGTERM: every consumer finishes the batch in hand, then exits."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def _consumers(self) -> list[int]:
        """The processes that consume: the supervisor's spawned children, or the supervisor
        itself when it runs a single consumer in-process."""
        if not self.running():
            return []
        if self.processes == 1:
            return [self.proc.pid]
        return [pid for pid in _children(self.proc.pid) if b"spawn_main" in _cmdline(pid)]


def environment(settings: Settings) -> dict[str, str]:
    """The settings as CHARGING_* variables, so the workers run with exactly the bench's settings."""
    return settings.environment()


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:  # not Linux, or already gone: RSS stays unknown
        return []


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _cpu_s(pid: int) -> float | None:
    try:
        # /proc/PID/stat: utime and stime are fields 14 and 15, after the ")" closing the name.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
