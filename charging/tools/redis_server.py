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
    """A free port whose cluster bus port (port + 10000) is free too."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 < 65536 and _is_free(port + 10000):
            return port


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class RedisServer:
    """redis-server with AOF on, data in ``data_dir`` (a new temp dir unless given)."""

    def __init__(self, data_dir: Path | str | None = None, appendfsync: str = "everysec",
                 extra_args: tuple[str, ...] = (), credentials: tuple[str, str] | None = None,
                 own_session: bool = False):
        """credentials: the user and password that checks readiness, for a server started
        with an ACL file that turns the default user off. own_session: out of the caller's
        process group, so a Ctrl-C at the terminal reaches only the caller, which stops the
        server when it is done with it (the demo: after the workers that use it)."""
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RedisServerMissing(INSTALL_HINT)
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="charging-redis-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.appendfsync = appendfsync
        self.extra_args = extra_args
        self.credentials = credentials or (None, None)
        self.own_session = own_session
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
             "--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", "",
             "--lazyfree-lazy-expire", "yes", "--logfile", "redis.log", *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=self.own_session,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.kill()  # a server that never became ready is not left running
            raise
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

    def restart(self) -> RedisServer:
        """Start again on the same port and data dir (after kill() or stop()): the server
        rebuilds its data from the AOF, as a real one does after a crash."""
        self.kill()
        return self.start()

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


class LocalCluster:
    """A Redis Cluster of ``primaries`` primaries with one replica each, every node a
    RedisServer in its own dir; joined with `redis-cli --cluster create`."""

    def __init__(self, base_dir: Path | str | None = None, primaries: int = 3, node_timeout_ms: int = 1000):
        base = Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="charging-cluster-"))
        args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(node_timeout_ms), "--repl-diskless-sync-delay", "0")
        self.nodes = [RedisServer(base / f"node{i}", extra_args=args) for i in range(primaries * 2)]
        self.primaries = primaries

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes) + "/0"

    def start(self) -> LocalCluster:
        try:
            return self._start()
        except BaseException:
            self.stop()  # a cluster that never came up leaves no node running
            raise

    def _start(self) -> LocalCluster:
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RedisServerMissing("redis-cli is not on PATH; it comes with redis-server (redis-tools on Debian)")
        subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                        "--cluster-replicas", "1", "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
        self.wait_healthy()
        self._wait_replicas_in_sync()
        return self

    def _wait_replicas_in_sync(self, timeout: float = 60.0) -> None:
        """A replica that has not finished its first sync cannot take over: wait for it."""
        deadline, infos = time.monotonic() + timeout, []
        while time.monotonic() < deadline:
            infos = [redis.Redis(port=n.port, socket_timeout=1).info("replication") for n in self.primary_nodes()]
            if len(infos) == self.primaries and all(
                    i.get("connected_slaves", 0) >= 1 and i["slave0"]["state"] == "online" for i in infos):
                return
            time.sleep(0.2)
        seen = [(i.get("connected_slaves", 0), i.get("slave0", {}).get("state")) for i in infos]
        raise TimeoutError(f"cluster replicas not in sync in time (primaries: replicas, state: {seen})")

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Every live node says cluster_state:ok and sees every slot served."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = []
            for node in self.live_nodes():
                try:
                    info = redis.Redis(port=node.port, socket_timeout=1).cluster("info")
                    states.append(info["cluster_state"] == "ok" and int(info["cluster_slots_ok"]) == 16384)
                except redis.RedisError:
                    states.append(False)
            if states and all(states):
                return
            time.sleep(0.2)
        raise TimeoutError("cluster not healthy in time")

    def live_nodes(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.process and n.process.poll() is None]

    def primary_nodes(self) -> list[RedisServer]:
        return [n for n in self.live_nodes()
                if redis.Redis(port=n.port, socket_timeout=1).info("replication")["role"] == "master"]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
