"""The one place that makes Redis connections: one pool per process, made once."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import redis
import structlog
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from charging.settings import Settings

log = structlog.get_logger("charging.connection")

MIN_REDIS = (7, 0)
T = TypeVar("T")


class RedisTooOld(RuntimeError):
    pass


def connect(settings: Settings, load: bool = True) -> redis.Redis:
    """Return the process's client. Retries with backoff are explicit (the library's
    defaults changed between versions); a retried command may run twice, which every
    function call tolerates because it is keyed by request id or entry id."""
    client = redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.socket_timeout_s,
        health_check_interval=30,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=2.0), settings.retry_attempts),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError],
        **tls_options(settings),
    )
    if load:
        try:
            check_version(client)
            load_functions(client)
        except redis.exceptions.NoPermissionError as exc:
            # A producer's ACL role (deploy/users.acl) may neither read INFO nor load
            # functions; workers and admins do both, so the library is there for it.
            log.info("functions_not_loaded", reason=str(exc))
    return client


def tls_options(settings: Settings) -> dict[str, str | bool]:
    """TLS for a rediss:// URL (the scheme turns TLS on): the server's certificate and
    host name are always verified (stated, because redis-py's defaults changed between
    versions); certificate files from the settings."""
    if not settings.redis_url.startswith("rediss://"):
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
    info = client.info("server")
    version = tuple(int(p) for p in str(info["redis_version"]).split(".")[:2])
    if version < MIN_REDIS:
        raise RedisTooOld(f"Redis {info['redis_version']} has no Functions; this engine needs Redis >= 7.0")
    memory = client.info("memory")
    log.info("redis_connected", version=info["redis_version"], used_memory=memory["used_memory_human"],
             maxmemory_policy=memory.get("maxmemory_policy"))


def library_source() -> str:
    here = Path(__file__).resolve().parent
    # Installed wheels carry the library inside the package; a source checkout has it in lua/.
    for path in (here / "charging.lua", here.parent / "lua" / "charging.lua"):
        if path.exists():
            return path.read_text()
    raise FileNotFoundError("lua/charging.lua not found")


def load_functions(client: redis.Redis) -> None:
    """FUNCTION LOAD REPLACE: cheap, and it fixes a server that was started empty."""
    client.function_load(library_source(), replace=True)


def with_functions(client: redis.Redis, call: Callable[[], T]) -> T:
    """Run call; if the server lost the library (restart without AOF, failover to an empty
    node), load it and run call once more. Safe because every function is idempotent."""
    try:
        return call()
    except redis.ResponseError as exc:
        if not missing_function(exc):
            raise
        log.warning("functions_reloaded", error=str(exc))
        load_functions(client)
        return call()


def missing_function(reply: object) -> bool:
    return isinstance(reply, redis.ResponseError) and "Function not found" in str(reply)
