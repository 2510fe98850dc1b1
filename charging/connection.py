"""The one place that makes Redis connections: one pool per process, made once."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
import redis.asyncio
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from charging.errors import ChargingError
from charging.log import logger
from charging.plan import Plan, T, run, run_async
from charging.schema import EntryFields
from charging.settings import Settings

log = logger("charging.connection")

# Errors that pass: a server restarting or loading, a cluster failing over. Callers back
# off and retry; every retried call is safe because it is keyed by request id or entry id.
TRANSIENT_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError,
                    redis.exceptions.ClusterDownError, redis.exceptions.TryAgainError,
                    redis.exceptions.SlotNotCoveredError)

MIN_REDIS = (7, 0)


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


class RedisTooOld(ChargingError, RuntimeError):
    pass


class PartitionsChanged(ChargingError, RuntimeError):
    pass


class RedisRefused(ChargingError, RuntimeError):
    """Redis answered and said no: a wrong user or password, a database it does not have.
    Trying again cannot help, so nothing retries it."""


# Errors that waiting does not fix: a worker stops on them instead of retrying.
FATAL_ERRORS = (RedisRefused, RedisTooOld, PartitionsChanged, redis.exceptions.NoPermissionError)


class _RetryBackoff(ExponentialWithJitterBackoff):
    """redis-py's backoff between the retries of one command, logging each: a process that
    lost Redis says so at every try, not only once the retries are spent."""

    def compute(self, failures: int) -> float:
        pause = super().compute(failures)
        log.warning("redis_unavailable", attempt=failures, retry_in_s=round(pause, 3))
        return pause


class _TlsConnection(redis.SSLConnection):
    """The TLS handshake is part of connecting, so it has the connect timeout: a server
    that speaks no TLS is reported in seconds, not after a socket timeout per retry.

    Overrides redis-py's internal _connect: redis-py before 8.2 shakes hands under the
    socket timeout, and no public option changes that (8.2 uses the connect timeout
    itself, where this changes nothing). Tested on redis-py 6.0.0 and the newest release
    below 9 (tests/test_redis_py_range.py); drop it once the lower bound reaches 8.2."""

    def _connect(self):
        timeout, self.socket_timeout = self.socket_timeout, self.socket_connect_timeout
        try:
            sock = super()._connect()
        finally:
            self.socket_timeout = timeout
        sock.settimeout(timeout)
        return sock


Client = redis.Redis | RedisCluster
AsyncClient = redis.asyncio.Redis | AsyncRedisCluster


def client_options(settings: Settings, retry: Retry | AsyncRetry) -> dict[str, Any]:
    """The options of every client, sync or asyncio."""
    return dict(
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.connect_timeout_s,
        health_check_interval=30,
        retry=retry,
        **tls_options(settings),
    )


def _retry(kind: type[Retry] | type[AsyncRetry], attempts: int) -> Retry | AsyncRetry:
    """Retries with backoff are explicit (the library's defaults changed between versions);
    a retried command may run twice, which every function call tolerates because it is
    keyed by request id or entry id."""
    return kind(_RetryBackoff(base=0.05, cap=2.0), attempts)


# A single node's client also retries these on its own (a cluster client knows its errors).
RETRY_ON = [redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError]
ASYNC_POOL_SIZE = 50  # connections of an asyncio client; concurrent waits share one (producer/requests.py)


def connect(settings: Settings, load: bool = True) -> Client:
    """Return the process's client: a single-node client, or a cluster client for a
    cluster URL. load: check the server's version, load the functions if missing and
    check the partition count (see prepare_server). Those first round trips are not
    retried: a server that is down, refuses the login or has no such database fails at
    once (RedisRefused for the last two)."""
    retry = _retry(Retry, 0 if load else settings.retry_attempts)
    options = client_options(settings, retry)
    client: Client
    with refusals(settings):
        if settings.cluster:
            seeds = [ClusterNode(host, port) for host, port in settings.cluster_seeds]
            client = RedisCluster.from_url(settings.server_url, startup_nodes=seeds, **options)
            _parse_keys_locally(client)
        else:
            if settings.server_url.startswith("rediss://"):
                options["connection_class"] = _TlsConnection
            client = redis.Redis.from_url(settings.server_url, retry_on_error=RETRY_ON, **options)
        _keep_entry_pairs(client)
        if load:
            run(client, prepare_server(settings))
    retry.update_retries(settings.retry_attempts)
    client.set_retry(retry)  # the connections made so far took a copy of the no-retry policy
    return client


async def connect_async(settings: Settings, load: bool = True) -> AsyncClient:
    """connect() for asyncio (redis.asyncio): the same options and the same checks, with
    no blocking I/O. Close it with ``await client.aclose()``."""
    retry = _retry(AsyncRetry, 0 if load else settings.retry_attempts)
    options = client_options(settings, retry)
    client: AsyncClient
    if settings.cluster:
        seeds = [AsyncClusterNode(host, port) for host, port in settings.cluster_seeds]
        # Its nodes' pools cannot make a task wait for a free connection (they fail with
        # "Too many connections"): unbounded, as the sync cluster client's are.
        client = AsyncRedisCluster.from_url(settings.server_url, startup_nodes=seeds, max_connections=2**31,
                                            **options)
        _parse_keys_locally_async(client)
    else:
        # Tasks beyond the pool's size wait for a connection instead of failing with "Too many
        # connections" (the default pool's answer), as a busy web backend needs.
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            settings.server_url, retry_on_error=RETRY_ON, max_connections=ASYNC_POOL_SIZE,
            timeout=settings.socket_timeout_s, **options)
        client = redis.asyncio.Redis.from_pool(pool)
    if load:
        with refusals(settings):
            await run_async(client, prepare_server(settings))
    retry.update_retries(settings.retry_attempts)
    client.set_retry(retry)
    return client


@contextmanager
def refusals(settings: Settings) -> Iterator[None]:
    """A refused login or a database the server does not have, as RedisRefused."""
    try:
        yield
    except (redis.AuthenticationError, redis.exceptions.AuthenticationWrongNumberOfArgsError) as exc:
        raise RedisRefused(f"Redis at {settings.redis_url} refused the login: {exc}") from None
    except redis.ResponseError as exc:
        if "DB index is out of range" not in str(exc):
            raise
        raise RedisRefused(f"Redis at {settings.redis_url} has no such database ({exc}); "
                           "it has 16 (0 to 15) unless its `databases` setting says otherwise") from None


def prepare_server(settings: Settings) -> Plan[None]:
    """Check the server's version and load the functions unless it has them, then check
    the partition count."""
    try:
        yield from check_version()
        yield from load_functions()
    except redis.exceptions.NoPermissionError as exc:
        # A producer's ACL role (deploy/users.acl) may neither read INFO nor load
        # functions; workers and admins do both, so the library is there for it.
        log.info("functions_not_loaded", reason=str(exc))
    yield from check_partitions(settings)


def _command_keys(args: tuple[Any, ...]) -> list[Any] | None:
    """The keys of FCALL and XREAD(GROUP), by their fixed syntax; None for other commands."""
    words = [a.decode() if isinstance(a, bytes) else str(a) for a in args]
    name = words[0].upper()
    if name in ("FCALL", "FCALL_RO"):
        return list(args[3:3 + int(words[2])])
    if name in ("XREAD", "XREADGROUP"):
        after = [w.upper() for w in words].index("STREAMS") + 1
        return list(args[after:after + (len(args) - after) // 2])
    return None


def _parse_keys_locally(client: RedisCluster) -> None:
    """redis-py finds the keys of FCALL and XREAD(GROUP) by asking the server (COMMAND
    GETKEYS): a round trip per command. Their key positions are fixed by their syntax, so
    read them here; every key of one call shares a hash tag, hence one slot.

    Replaces the internal commands_parser.get_keys: redis-py has no public option for it.
    8.2 reads movable keys from the server's key specs itself, earlier releases ask the
    server. Tested on redis-py 6.0.0 and the newest release below 9
    (tests/test_redis_py_range.py); drop it once the lower bound reaches 8.2."""
    parser = client.commands_parser
    generic = parser.get_keys

    def get_keys(conn: Any, *args: Any) -> Any:
        keys = _command_keys(args)
        return generic(conn, *args) if keys is None else keys

    parser.get_keys = get_keys  # type: ignore[method-assign]


def _entries(raw: list | None) -> list:
    """[id, [name, value, ...]] entries as (id, EntryFields); a deleted entry (no fields) has none."""
    return [(entry[0], EntryFields(entry[1])) for entry in raw or []]


def _read_keeping_pairs(response, **options):
    """XREADGROUP's reply in redis-py's shape ([[stream, [(id, fields)]]]), fields as EntryFields;
    from RESP2 (a list of [stream, entries]) or RESP3 (a map of stream -> entries)."""
    streams = response.items() if isinstance(response, dict) else response or []
    return [[stream, _entries(entries)] for stream, entries in streams]


def _autoclaim_keeping_pairs(response, **options):
    """XAUTOCLAIM's reply in redis-py's shape ([cursor, [(id, fields)], deleted ids])."""
    if options.get("parse_justid", False):
        return response[1]
    return [response[0], _entries(response[1]), *response[2:]]


def _keep_entry_pairs(client: Client) -> None:
    """Request entries are read with XREADGROUP and XAUTOCLAIM; redis-py turns each entry's
    fields into a dict, which hides a field name given twice. Read them as EntryFields
    instead, so the schema sees every pair. A cluster parses replies in its node clients:
    each one gets the callbacks, those made later too.

    For a cluster this wraps the internal nodes_manager.create_redis_node: the public
    RedisCluster.set_response_callback runs after the node's own parser has made the dict
    (redis-py 8.2 too), too late. Tested on redis-py 6.0.0 and the newest
    release below 9 (tests/test_redis_py_range.py)."""
    def register(node_client: redis.Redis) -> redis.Redis:
        node_client.set_response_callback("XREADGROUP", _read_keeping_pairs)
        node_client.set_response_callback("XAUTOCLAIM", _autoclaim_keeping_pairs)
        return node_client

    if not isinstance(client, RedisCluster):
        register(client)
        return
    manager = client.nodes_manager
    make = manager.create_redis_node
    manager.create_redis_node = lambda *args, **kwargs: register(make(*args, **kwargs))  # type: ignore[method-assign]
    for node in [*manager.nodes_cache.values(), *manager.startup_nodes.values()]:
        if node.redis_connection is not None:
            register(node.redis_connection)


def _parse_keys_locally_async(client: AsyncRedisCluster) -> None:
    """_parse_keys_locally for the asyncio cluster client, whose parser is a coroutine."""
    parser = client.commands_parser
    generic = parser.get_keys

    async def get_keys(*args: Any) -> Any:
        keys = _command_keys(args)
        return await generic(*args) if keys is None else keys

    parser.get_keys = get_keys  # type: ignore[method-assign]


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster | AsyncRedisCluster)


def check_partitions(settings: Settings) -> Plan[None]:
    """The partition count is fixed when a deployment first runs: changing it would route
    existing accounts to other partitions, where their balances are not."""
    key = f"{settings.namespace}:partitions"
    recorded = yield lambda client: client.get(key)
    if recorded is None:
        try:
            yield lambda client: client.set(key, settings.partitions, nx=True)
        except redis.exceptions.NoPermissionError:
            return  # a producer may only read it; the first worker or admin records it
        recorded = yield lambda client: client.get(key)
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


def check_version() -> Plan[None]:
    info = yield lambda client: (client.info(target_nodes=RedisCluster.RANDOM) if is_cluster(client)
                                 else client.info())
    version = tuple(int(p) for p in str(info["redis_version"]).split(".")[:2])
    if version < MIN_REDIS:
        raise RedisTooOld(f"Redis {info['redis_version']} has no Functions; this engine needs Redis >= 7.0")
    log.info("redis_connected", version=info["redis_version"], mode=info.get("redis_mode"),
             used_memory=info.get("used_memory_human"), maxmemory_policy=info.get("maxmemory_policy"))


def library_source() -> str:
    """The text of lua/charging.lua, the engine's library."""
    here = Path(__file__).resolve().parent
    # Installed wheels carry the library inside the package; a source checkout has it in lua/.
    for path in (here / "charging.lua", here.parent / "lua" / "charging.lua"):
        if path.exists():
            return path.read_text()
    raise FileNotFoundError("lua/charging.lua not found")


def load_functions() -> Plan[None]:
    """FUNCTION LOAD REPLACE unless the server already has this very library: it fixes a
    server that was started empty, without writing the library into the AOF at every
    connect. A cluster gets it on every primary, where the check would cost as much."""
    source = library_source()
    cluster = yield is_cluster
    if not cluster:
        try:
            loaded = yield lambda client: client.function_list(library="charging", withcode=True)
        except redis.exceptions.NoPermissionError:
            loaded = []
        codes = [dict(zip(lib[::2], lib[1::2])).get(b"library_code") for lib in loaded]
        if source.encode() in codes:
            return
    yield lambda client: client.function_load(source, replace=True)


def with_functions(attempt: Callable[[], Plan[T]]) -> Plan[T]:
    """Run the plan attempt() makes; if the server lost the library (restart without AOF,
    failover to an empty node), load it and run a new attempt once more. Safe because
    every function is idempotent."""
    try:
        return (yield from attempt())
    except redis.ResponseError as exc:
        if not missing_function(exc):
            raise
        yield from reload_functions(exc)
        return (yield from attempt())


def reload_functions(error: Exception) -> Plan[bool]:
    """Load the library again after a call found it missing. False when this process's ACL
    user may not load code (only the maintainer may, deploy/users.acl): the maintainer
    loads it at its next round; the caller waits and tries again."""
    try:
        yield from load_functions()
    except redis.exceptions.NoPermissionError:
        log.warning("functions_missing", error=str(error), hint="waiting for the maintainer to load them")
        return False
    log.warning("functions_reloaded", error=str(error))
    return True


def missing_function(reply: object) -> bool:
    return isinstance(reply, redis.ResponseError) and "Function not found" in str(reply)


class NotReplicated(ChargingError, RuntimeError):
    """The write reached the primary but not CHARGING_WAIT_REPLICAS replicas in time. It
    may still be applied: retry with the same request id, which is always safe."""


def node_client(client: Any, key: str) -> Any:
    """The client of the node that holds key. WAIT counts replicas that have the writes of
    its own connection, so the writes and their WAIT must go through one node's client."""
    if isinstance(client, AsyncRedisCluster):
        # Its nodes have no client of their own to send a pipeline and its WAIT through.
        raise ChargingError("CHARGING_WAIT_REPLICAS needs the sync client on a cluster")
    return client.get_node_from_key(key).redis_connection if is_cluster(client) else client


def replicated(settings: Settings, key: str, queue: Callable[[Any], object]) -> Plan[list[Any]]:
    """queue(pipe) adds writes for key's node; they run with a WAIT for
    settings.wait_replicas replicas. Returns the writes' replies; raises NotReplicated."""
    def step(client: Any) -> Any:
        pipe = node_client(client, key).pipeline(transaction=False)
        queue(pipe)
        pipe.execute_command("WAIT", settings.wait_replicas, settings.wait_timeout_ms)
        return pipe.execute()

    *replies, acked = yield step
    if acked < settings.wait_replicas:
        raise NotReplicated(f"{acked} of {settings.wait_replicas} replicas confirmed within "
                            f"{settings.wait_timeout_ms} ms")
    return replies
