"""Redis for the tests, in this order: CHARGING_TEST_REDIS_URL if set; else a testcontainers
Redis if a Docker engine answers; else a redis-server spawned on a free port in a temp dir.
Each test gets its own namespace, so tests never see each other's keys."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from charging.connection import connect
from charging.settings import Settings
from charging.tools.redis_server import LocalCluster, RedisServer
from producer import Producer
from worker.loop import Worker

_namespaces = itertools.count()
CHARGING = str(Path(sys.executable).with_name("charging"))  # the installed console script
COMPOSE_REDIS_IMAGE = "redis:7.2.7"  # docker-compose.yml's, as tests/test_deploy.py checks


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:  # no engine, no socket, no permission: all mean "not here"
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    if url := os.environ.get("CHARGING_TEST_REDIS_URL"):
        yield url
    elif _docker_answers():
        from testcontainers.redis import RedisContainer

        with RedisContainer(COMPOSE_REDIS_IMAGE) as container:
            yield f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}/0"
    else:
        with RedisServer(tmp_path_factory.mktemp("redis")) as server:
            yield server.url


@pytest.fixture(scope="session")
def cluster_url(tmp_path_factory) -> Iterator[str]:
    """A local Redis Cluster (3 primaries + 3 replicas), or CHARGING_TEST_CLUSTER_URL."""
    if url := os.environ.get("CHARGING_TEST_CLUSTER_URL"):
        yield url
    else:
        with LocalCluster(tmp_path_factory.mktemp("cluster")) as cluster:
            yield cluster.url


@pytest.fixture
def backend(request) -> str:
    """'single' unless a module parametrizes it: BOTH_BACKENDS runs its tests on a cluster too."""
    return getattr(request, "param", "single")


BOTH_BACKENDS = pytest.mark.parametrize("backend", ["single", "cluster"], indirect=True)


@pytest.fixture
def settings(request, backend) -> Settings:
    url, partitions = ((request.getfixturevalue("cluster_url"), 12) if backend == "cluster"
                       else (request.getfixturevalue("redis_url"), 1))
    return Settings(redis_url=url, partitions=partitions, namespace=f"t{os.getpid()}x{next(_namespaces)}",
                    reclaim_idle_ms=500, maintenance_interval_s=0.2, block_ms=200)


@pytest.fixture
def client(settings) -> redis.Redis:
    return connect(settings)


@pytest.fixture
def producer(client, settings) -> Producer:
    return Producer(client, settings)


def drain(settings: Settings, consumers: int = 1, prefix: str = "w") -> list[Worker]:
    """Run burst workers in threads (each with its own pool, as separate processes would)
    until the streams are drained and nothing is pending."""
    workers = [Worker(connect(settings), settings, f"{prefix}{i}", burst=True) for i in range(consumers)]
    threads = [threading.Thread(target=w.run) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "burst workers did not finish"
    return workers


@contextmanager
def worker_running(settings: Settings, consumer: str = "live") -> Iterator[Worker]:
    """A worker (not burst) in a thread for the duration of the block: what `charging
    worker` is to an application that charges through the stream."""
    worker = Worker(connect(settings), settings, consumer)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        yield worker
    finally:
        worker.stop()
        thread.join(timeout=60)
        assert not thread.is_alive(), "the worker did not stop"


def cli(settings: Settings, *args: str, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `charging ARGS` as a user would type it, configured only through the environment."""
    env = {**os.environ, **environment(settings)}
    return subprocess.run([CHARGING, *args], env=env, input=input,
                          capture_output=True, text=True, timeout=timeout)


def environment(settings: Settings) -> dict[str, str]:
    """The CHARGING_* variables that make a subprocess use these settings."""
    return {"CHARGING_REDIS_URL": settings.redis_url.get_secret_value(), "CHARGING_NAMESPACE": settings.namespace,
            "CHARGING_PARTITIONS": str(settings.partitions),
            "CHARGING_RECLAIM_IDLE_MS": str(settings.reclaim_idle_ms), "CHARGING_BLOCK_MS": str(settings.block_ms),
            "CHARGING_MAINTENANCE_INTERVAL_S": str(settings.maintenance_interval_s)}


def results(client: redis.Redis, settings: Settings) -> list[dict[str, str]]:
    from charging.keys import all_partitions

    out = []
    for keys in all_partitions(settings.namespace, settings.partitions):
        out += [{k.decode(): v.decode() for k, v in f.items()} for _, f in client.xrange(keys.results)]
    return out
