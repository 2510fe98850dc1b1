"""The one place that makes Redis connections: one pool per process, made once."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import redis
import structlog
from redis.backoff import ExponentialWithJitterBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from charging.settings import Settings

log = structlog.get_logger("charging.connection")

# Errors that pass: a server restarting or loading, a cluster failing over. Callers back
# off and retry; every retried call is safe because it is keyed by request id or entry id.
TRANSIENT_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError,
                    redis.exceptions.ClusterDownError, redis.exceptions.TryAgainError,
                    redis.exceptions.SlotNotCoveredError)

MIN_REDIS = (7, 0)
T = TypeVar("T")


class Backoff:
    """Pauses between tries while Redis is unavailable: redis-py's exponential backoff with
    jitter, from 0.1 s up to 5 s, back to the start after a success."""

    def __init__(self, base: float = 0.1, cap: float = 5.0):
        self._policy = ExponentialWithJitterBackoff(base=base, cap=cap)
        self._failures = 0

    def wait(self, logger, error: Exception) -> None:
        pause = self._policy.compute(self._failures)
        self._failures += 1
        logger.warning("redis_unavailable", error=str(error), retry_in_s=round(pause, 3))
        time.sleep(pause)

    def reset(self) -> None:
        self._failures = 0


class RedisTooOld(RuntimeError):
    pass


class PartitionsChanged(RuntimeError):
    pass


def connect(settings: Settings, load: bool = True) -> redis.Redis:
    """Return the process's client: a single-node client, or a cluster client for a
    cluster URL. Retries with backoff are explicit (the library's defaults changed between
    versions); a retried command may run twice, which every function call tolerates
    because it is keyed by request id or entry id."""
    options = dict(
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.socket_timeout_s,
        health_check_interval=30,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=2.0), settings.retry_attempts),
        **tls_options(settings),
    )
    if settings.cluster:
        seeds = [ClusterNode(host, port) for host, port in settings.cluster_seeds]
        client = RedisCluster.from_url(settings.server_url, startup_nodes=seeds, **options)
        _parse_keys_locally(client)
    else:
        client = redis.Redis.from_url(
            settings.server_url, retry_on_error=[redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError],
            **options)
    if load:
        try:
            check_version(client)
            load_functions(client)
        except redis.exceptions.NoPermissionError as exc:
            # A producer's ACL role (deploy/users.acl) may neither read INFO nor load
            # functions; workers and admins do both, so the library is there for it.
            log.info("functions_not_loaded", reason=str(exc))
        check_partitions(client, settings)
    return client


def _parse_keys_locally(client: RedisCluster) -> None:
    """redis-py finds the keys of FCALL and XREAD(GROUP) by asking the server (COMMAND
    GETKEYS): a round trip per command. Their key positions are fixed by their syntax, so
    read them here; every key of one call shares a hash tag, hence one slot."""
    parser = client.commands_parser
    generic = parser.get_keys

    def get_keys(conn, *args):
        words = [a.decode() if isinstance(a, bytes) else str(a) for a in args]
        name = words[0].upper()
        if name in ("FCALL", "FCALL_RO"):
            return list(args[3:3 + int(words[2])])
        if name in ("XREAD", "XREADGROUP"):
            after = [w.upper() for w in words].index("STREAMS") + 1
            return list(args[after:after + (len(args) - after) // 2])
        return generic(conn, *args)

    parser.get_keys = get_keys


def is_cluster(client: redis.Redis) -> bool:
    return isinstance(client, RedisCluster)


def check_partitions(client: redis.Redis, settings: Settings) -> None:
    """The partition count is fixed when a deployment first runs: changing it would route
    existing accounts to other partitions, where their balances are not."""
    key = f"{settings.namespace}:partitions"
    recorded = client.get(key)
    if recorded is None:
        try:
            client.set(key, settings.partitions, nx=True)
        except redis.exceptions.NoPermissionError:
            return  # a producer may only read it; the first worker or admin records it
        recorded = client.get(key)
    recorded = int(recorded)
    if recorded != settings.partitions:
        raise PartitionsChanged(
            f"CHARGING_PARTITIONS is {settings.partitions} but this deployment ({settings.namespace}) was set up "
            f"with {recorded}; changing it would re-route existing accounts. Use {recorded}.")


def tls_options(settings: Settings) -> dict[str, str | bool]:
    """TLS for a rediss:// URL (the scheme turns TLS on): the server's certificate and
    host name are always verified (stated, because redis-py's defaults changed between
    versions); certificate files from the settings."""
    if not settings.server_url.startswith("rediss://"):
        return {}
    options: dict[str, str | bool] = {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
    if settings.tls_ca_file:
        options["ssl_ca_certs"] = str(settings.tls_ca_file)
    if settings.tls_cert_file and settings.tls_key_file:
        options.update(ssl_certfile=str(settings.tls_cert_file), ssl_keyfile=str(settings.tls_key_file))
    return options


def redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"(//[^:/@]*:)[^@]*@", r"\1***@", url)


def check_version(client: redis.Redis) -> None:
    info = client.info(target_nodes=RedisCluster.RANDOM) if is_cluster(client) else client.info()
    version = tuple(int(p) for p in str(info["redis_version"]).split(".")[:2])
    if version < MIN_REDIS:
        raise RedisTooOld(f"Redis {info['redis_version']} has no Functions; this engine needs Redis >= 7.0")
    log.info("redis_connected", version=info["redis_version"], mode=info.get("redis_mode"),
             used_memory=info.get("used_memory_human"), maxmemory_policy=info.get("maxmemory_policy"))


def library_source() -> str:
    here = Path(__file__).resolve().parent
    # Installed wheels carry the library inside the package; a source checkout has it in lua/.
    for path in (here / "charging.lua", here.parent / "lua" / "charging.lua"):
        if path.exists():
            return path.read_text()
    raise FileNotFoundError("lua/charging.lua not found")


def load_functions(client: redis.Redis) -> None:
    """FUNCTION LOAD REPLACE unless the server already has this very library: it fixes a
    server that was started empty, without writing the library into the AOF at every
    connect. A cluster gets it on every primary, where the check would cost as much."""
    source = library_source()
    if not is_cluster(client):
        try:
            loaded = client.function_list(library="charging", withcode=True)
        except redis.exceptions.NoPermissionError:
            loaded = []
        codes = [dict(zip(lib[::2], lib[1::2])).get(b"library_code") for lib in loaded]
        if source.encode() in codes:
            return
    client.function_load(source, replace=True)


def with_functions(client: redis.Redis, call: Callable[[], T]) -> T:
    """Run call; if the server lost the library (restart without AOF, failover to an empty
    node), load it and run call once more. Safe because every function is idempotent."""
    try:
        return call()
    except redis.ResponseError as exc:
        if not missing_function(exc):
            raise
        reload_functions(client, exc)
        return call()


def reload_functions(client: redis.Redis, error: Exception) -> bool:
    """Load the library again after a call found it missing. False when this process's ACL
    user may not load code (only the maintainer may, deploy/users.acl): the maintainer
    loads it at its next round; the caller waits and tries again."""
    try:
        load_functions(client)
    except redis.exceptions.NoPermissionError:
        log.warning("functions_missing", error=str(error), hint="waiting for the maintainer to load them")
        return False
    log.warning("functions_reloaded", error=str(error))
    return True


def server_clock_offset_ms(client: redis.Redis) -> int:
    """How far the Redis server's clock (TIME) is ahead of this host's, in ms."""
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000 - int(time.time() * 1000)


def missing_function(reply: object) -> bool:
    return isinstance(reply, redis.ResponseError) and "Function not found" in str(reply)


class NotReplicated(RuntimeError):
    """The write reached the primary but not CHARGING_WAIT_REPLICAS replicas in time. It
    may still be applied: retry with the same request id, which is always safe."""


def node_client(client: redis.Redis, key: str) -> redis.Redis:
    """The client of the node that holds key. WAIT counts replicas that have the writes of
    its own connection, so the writes and their WAIT must go through one node's client."""
    return client.get_node_from_key(key).redis_connection if is_cluster(client) else client


def replicated_pipeline(client: redis.Redis, settings: Settings, key: str, queue: Callable) -> list:
    """queue(pipe) adds writes for key's node; they run with a WAIT for
    settings.wait_replicas replicas. Returns the writes' replies; raises NotReplicated."""
    pipe = node_client(client, key).pipeline(transaction=False)
    queue(pipe)
    pipe.execute_command("WAIT", settings.wait_replicas, settings.wait_timeout_ms)
    *replies, acked = pipe.execute()
    if acked < settings.wait_replicas:
        raise NotReplicated(f"{acked} of {settings.wait_replicas} replicas confirmed within "
                            f"{settings.wait_timeout_ms} ms")
    return replies
