"""A private redis-server on a free port, for `charging demo`, the bench, the chaos run
and the tests. Never used when the user gives a Redis URL."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

INSTALL_HINT = ("redis-server (>= 7.0) is not on PATH. Install it (Debian/Ubuntu: `sudo apt-get install "
                "redis-server`; macOS: `brew install redis`) or pass --redis-url to use a running server.")


class RedisServerMissing(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """redis-server with AOF on, data in ``data_dir`` (a new temp dir unless given)."""

    def __init__(self, data_dir: Path | str | None = None, appendfsync: str = "everysec",
                 extra_args: tuple[str, ...] = (), credentials: tuple[str, str] | None = None):
        """credentials: the user and password that checks readiness, for a server started
        with an ACL file that turns the default user off."""
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RedisServerMissing(INSTALL_HINT)
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="charging-redis-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.appendfsync = appendfsync
        self.extra_args = extra_args
        self.credentials = credentials or (None, None)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
             "--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", "",
             "--logfile", "redis.log", *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 30.0) -> None:
        username, password = self.credentials
        client = redis.Redis(port=self.port, socket_timeout=1, username=username, password=password)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.ping() and client.info("persistence").get("loading") == 0:
                    return
            except (redis.ConnectionError, redis.BusyLoadingError):
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}; "
                                   f"see {self.data_dir / 'redis.log'}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server on port {self.port} not ready after {timeout}s")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final fsync. What a crash looks like."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
