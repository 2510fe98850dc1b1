"""Every setting of the engine, read from CHARGING_* environment variables. A setting that
cannot work is refused when the settings load, with a message that names its variable."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SERVICES = ("sms", "voice", "data")
# The limits of lua/charging.lua (MAX_BALANCE, MAX_DURATION_MS), which it applies to every
# caller: no setting may ask for more. A balance never exceeds LIBRARY_MAX_BALANCE.
LIBRARY_MAX_BALANCE = 10**15
LIBRARY_MAX_DURATION_S = 315_360_000  # ten years
DEFAULT_TARIFF = {"sms": 1, "voice": 5, "data": 10}
PREFIX = "CHARGING_"
SCHEMES = ("redis", "rediss", "redis+cluster", "rediss+cluster", "unix")


class RedisUrl(SecretStr):
    """The server's URL, which may hold a password: shown (repr, str, f-string, log line)
    without it. get_secret_value() is the URL itself, for the one place that connects."""

    def _display(self) -> str:
        return redacted(self.get_secret_value())


class Settings(BaseSettings):
    # hide_input_in_errors: a refused URL would otherwise be quoted whole, password and all.
    model_config = SettingsConfigDict(env_prefix=PREFIX, frozen=True, hide_input_in_errors=True)

    redis_url: RedisUrl = RedisUrl("redis://127.0.0.1:6379/0")
    # A redis+cluster:// (or rediss+cluster://) URL, or this flag, selects the cluster client.
    redis_cluster: bool = False
    namespace: str = Field("ch", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    partitions: int = Field(1, ge=1, le=1024)
    group: str = Field("workers", pattern=r"^[A-Za-z0-9_.-]{1,64}$")

    # Rating: price per unit in minor units; a TOML file with a [tariff] table overrides.
    tariff: dict[str, int] = Field(default_factory=lambda: dict(DEFAULT_TARIFF))
    tariff_file: Path | None = None

    # Limits every request is checked against before it touches a balance.
    max_units: int = Field(1_000_000, ge=1, le=LIBRARY_MAX_BALANCE)
    max_amount: int = Field(10**12, ge=1, le=LIBRARY_MAX_BALANCE)

    # Worker behaviour.
    batch: int = Field(500, ge=1, le=10_000)
    block_ms: int = Field(1000, ge=1)
    reclaim_idle_ms: int = Field(10_000, ge=100)
    max_deliveries: int = Field(5, ge=1)
    maintenance_interval_s: float = Field(5.0, gt=0)
    # Redis chooses entry ids from its clock; an id further ahead of it than this was chosen
    # by a client (XADD with an explicit id): the worker dead-letters it (id_in_future) and
    # the maintainer rewinds the stream (docs/security.md, "Threat model"). Room for the clocks of
    # cluster nodes and the time since the worker last read the server's clock.
    max_clock_skew_ms: int = Field(60_000, ge=1000)

    # Retention.
    dedupe_window_s: int = Field(86_400, ge=1, le=LIBRARY_MAX_DURATION_S)
    results_maxlen: int = Field(1_000_000, ge=1)
    deadletter_maxlen: int = Field(1_000_000, ge=1)
    reply_ttl_s: int = Field(300, ge=1, le=LIBRARY_MAX_DURATION_S)

    # Connection. Connecting (TCP, and the TLS handshake of rediss://) has its own, short
    # timeout: a server that is down or speaks no TLS is reported in seconds.
    connect_timeout_s: float = Field(3.0, gt=0)
    socket_timeout_s: float = Field(10.0, gt=0)
    retry_attempts: int = Field(8, ge=0)

    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # TLS for rediss:// URLs: the CA that signed the server's certificate, and a client
    # certificate and key for a server that asks for one (tls-auth-clients).
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    # The reply stream this process's producers wait on, <ns>:{pN}:reply:<producer_id>; a
    # producer ACL user reads only its own (docs/security.md). Unset: a random id per Producer.
    producer_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")

    # Backpressure: past this many entries in a request stream, Producer.submit refuses
    # with `backlog full` instead of growing Redis without bound.
    max_backlog: int = Field(1_000_000, ge=1)
    # Subscriber groups of the results streams (comma separated) whose unread outcomes
    # trimming never drops; see lua/charging.lua `trim` and docs/operations.md, "Retention".
    results_groups: str = Field("", pattern=r"^([A-Za-z0-9_.-]{1,64}(,[A-Za-z0-9_.-]{1,64})*)?$")

    # Durability across failover: before a submit or an authorize is confirmed, wait until
    # this many replicas hold it (WAIT). 0: confirm on the primary's word (asynchronous).
    wait_replicas: int = Field(0, ge=0, le=16)
    wait_timeout_ms: int = Field(1000, ge=1)

    # Reservations (docs/reservations.md): the ttl of a reserve that gives
    # none, the longest ttl a reserve or extend may ask for, and how many expired
    # reservations one sweep call (worker maintenance) releases per partition.
    reservation_ttl_s: int = Field(300, ge=1)
    max_reservation_ttl_s: int = Field(86_400, ge=1, le=LIBRARY_MAX_DURATION_S)
    sweep_batch: int = Field(1000, ge=1, le=100_000)

    # The HTTP gateway (`charging serve`, docs/http-api.md): the TOML file of its API keys,
    # stored as hashes. Without one it listens on loopback only.
    http_keys_file: Path | None = None
    # How long a request's headers may take to arrive (from the connection, or from the previous
    # answer on it) and its body (from its headers): a slower client gets 408 and is
    # disconnected, so trickling clients cannot hold the gateway's connections.
    http_header_timeout_s: float = Field(10.0, gt=0)
    http_body_timeout_s: float = Field(10.0, gt=0)

    @field_validator("redis_url", mode="before")
    @classmethod
    def _usable_url(cls, url: Any) -> str:
        return check_url(url.get_secret_value() if isinstance(url, SecretStr) else str(url))

    @field_validator("log_level", mode="before")
    @classmethod
    def _any_case(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("tariff")
    @classmethod
    def _whole_tariff(cls, tariff: dict[str, int]) -> dict[str, int]:
        return _check_tariff(tariff)

    # Checks across settings name their variables themselves: pydantic cannot tell which
    # of the two is wrong.
    @model_validator(mode="after")
    def _read_tariff_file(self) -> Settings:
        if self.tariff_file is not None:
            try:
                table = tomllib.loads(self.tariff_file.read_text())["tariff"]
            except (OSError, tomllib.TOMLDecodeError, KeyError) as exc:
                reason = "no [tariff] table" if isinstance(exc, KeyError) else exc.strerror or exc
                raise ValueError(f"CHARGING_TARIFF_FILE: cannot read [tariff] from {self.tariff_file}: {reason}") \
                    from None
            try:
                object.__setattr__(self, "tariff", _check_tariff(table))
            except ValueError as exc:
                raise ValueError(f"CHARGING_TARIFF_FILE: the [tariff] of {self.tariff_file} {exc}") from None
        if self.block_ms >= self.socket_timeout_s * 1000:
            raise ValueError("CHARGING_BLOCK_MS must be shorter than CHARGING_SOCKET_TIMEOUT_S")
        return self

    @model_validator(mode="after")
    def _tls_needs_rediss(self) -> Settings:
        if (self.tls_ca_file or self.tls_cert_file or self.tls_key_file) and not self.server_url.startswith("rediss://"):
            raise ValueError("CHARGING_TLS_* files are used only with a rediss:// URL in CHARGING_REDIS_URL")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("CHARGING_TLS_CERT_FILE and CHARGING_TLS_KEY_FILE go together")
        return self

    @model_validator(mode="after")
    def _default_ttl_allowed(self) -> Settings:
        if self.reservation_ttl_s > self.max_reservation_ttl_s:
            raise ValueError("CHARGING_RESERVATION_TTL_S must not exceed CHARGING_MAX_RESERVATION_TTL_S")
        return self

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> Settings:
        """A copy with update applied, validated like any settings (pydantic's own copy
        takes the update as is: a plain string where the URL must be a RedisUrl)."""
        if not update:
            return super().model_copy(deep=deep)
        return type(self)(**{**self.model_dump(), **update})

    def environment(self) -> dict[str, str]:
        """These settings as CHARGING_* variables, for a child process (secrets included)."""
        env = {}
        for name, value in self.model_dump().items():
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            if value is not None:
                env[PREFIX + name.upper()] = json.dumps(value) if isinstance(value, dict) else str(value)
        return env

    @property
    def cluster(self) -> bool:
        return self.redis_cluster or "+cluster://" in self.redis_url.get_secret_value()

    @property
    def server_url(self) -> str:
        """The URL as redis-py expects it, password included: no +cluster marker, only the
        first host of a cluster URL's comma-separated host list (the others are cluster_seeds)."""
        scheme, rest = self.redis_url.get_secret_value().replace("+cluster://", "://", 1).split("://", 1)
        netloc, slash, path = rest.partition("/")
        auth, at, hosts = netloc.rpartition("@")
        return f"{scheme}://{auth}{at}{hosts.split(',')[0]}{slash}{path}"

    @property
    def cluster_seeds(self) -> list[tuple[str, int]]:
        """Further cluster nodes to discover the cluster from when the first is down:
        redis+cluster://host1:port1,host2:port2,.../0"""
        return [(split.hostname, split.port or 6379) for split in _hosts(self.redis_url.get_secret_value())[1:]]

    @property
    def dedupe_window_ms(self) -> int:
        return self.dedupe_window_s * 1000

    @property
    def results_group_names(self) -> list[str]:
        return self.results_groups.split(",") if self.results_groups else []


def _check_tariff(tariff: dict[str, object]) -> dict[str, int]:
    tariff = {str(service).lower(): rate for service, rate in tariff.items()}
    if set(tariff) != set(SERVICES):
        raise ValueError(f"must price exactly {', '.join(SERVICES)}; got {', '.join(sorted(tariff)) or 'nothing'}")
    for service, rate in tariff.items():
        if type(rate) is not int or rate <= 0:
            raise ValueError(f"the price of {service} must be a whole number > 0, got {rate!r}")
    return tariff


def check_url(url: str) -> str:
    """The URL if redis-py can use it as the engine needs it (scheme, hosts, ports,
    database), with its scheme in lower case; else ValueError saying what to write."""
    scheme, sep, rest = url.strip().partition("://")
    if not sep:
        raise ValueError(f"not a URL; write redis://HOST:PORT/DB, e.g. redis://{redacted(url) or 'HOST:6379'}/0")
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"{scheme}:// is not a Redis scheme; use "
                         + ", ".join(f"{s}://" for s in SCHEMES))
    url = f"{scheme}://{rest}"
    split = urlsplit(url)
    query = dict(parse_qsl(split.query, keep_blank_values=True))
    if set(query) - {"db"}:
        raise ValueError("the URL takes no options but db (the CHARGING_* settings configure the rest), "
                         f"got {', '.join(sorted(set(query) - {'db'}))}")
    if scheme == "unix":
        if not split.path:
            raise ValueError("a unix:// URL needs the socket's path, e.g. unix:///run/redis.sock?db=0")
        _database(query.get("db", "0"), cluster=False)
        return url
    hosts = _hosts(url)
    if len(hosts) > 1 and "+cluster" not in scheme:
        raise ValueError("several hosts are the seeds of a Redis Cluster; write "
                         f"{scheme}+cluster://{split.netloc.rpartition('@')[2]}/0 (a single server has one host)")
    for host in hosts:
        if not host.hostname:
            raise ValueError(f"no host; write {scheme}://HOST:PORT/0")
        if not _port_ok(host):
            raise ValueError(f"the port of {host.netloc!r} must be a number from 1 to 65535")
    _database(query.get("db", split.path.strip("/") or "0"), cluster="+cluster" in scheme)
    return url


def _hosts(url: str) -> list:
    """Each host[:port] of the URL's netloc (a cluster URL may list several), as urlsplit
    results whose hostname and port can be read."""
    netloc = url.split("://", 1)[1].partition("/")[0].partition("?")[0].rpartition("@")[2]
    return [urlsplit(f"//{host}") for host in netloc.split(",")]


def _port_ok(host) -> bool:
    try:
        return host.port != 0  # None: no port given, the default 6379
    except ValueError:  # not a number, or out of range
        return False


def _database(db: str, cluster: bool) -> None:
    if not db.isdigit():
        raise ValueError(f"the database must be a number, e.g. /0; got {db!r}")
    if cluster and int(db) != 0:
        raise ValueError("Redis Cluster has only database 0; end the URL with /0")


def redacted(url: str) -> str:
    """The URL without its password (in the user part, or a unix URL's password option),
    for reprs, messages and logs."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url.rpartition("@")[2]
    netloc, slash, path = rest.partition("/")
    auth, at, hosts = netloc.rpartition("@")
    if ":" in auth:
        auth = auth.partition(":")[0] + ":***"
    base, mark, query = path.partition("?")
    if mark:
        query = "&".join("password=***" if part.startswith("password=") else part for part in query.split("&"))
    return f"{scheme}://{auth}{at}{hosts}{slash}{base}{mark}{query}"


class InvalidSettings(ValueError):
    """Settings that cannot work. str() is one line that names each variable to change;
    describe() names some by the option that set them instead."""

    def __init__(self, problems: list[tuple[str | None, str]]):
        self.problems = problems  # (setting or None when the message names its own, message)
        super().__init__(self.describe())

    def describe(self, names: dict[str, str] | None = None) -> str:
        names = names or {}
        return "; ".join(message if field is None else f"{names.get(field, PREFIX + field.upper())}{message}"
                         for field, message in self.problems)


def load(**overrides: Any) -> Settings:
    """Settings from the environment and overrides; raises InvalidSettings."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise InvalidSettings([_problem(error) for error in exc.errors()]) from None
    except ValueError as exc:  # pydantic-settings' SettingsError: a JSON setting (CHARGING_TARIFF) that is no JSON
        raise InvalidSettings([_undecodable(exc)]) from None


def _undecodable(exc: ValueError) -> tuple[str | None, str]:
    """The variable pydantic-settings could not decode, named from its message (`error
    parsing value for field "tariff" ...`; its SettingsError moved between versions), with
    the reason and an example."""
    named = re.search(r'field "(\w+)"', str(exc))
    if named is None or named[1] not in Settings.model_fields:
        return None, str(exc)
    field = named[1]
    example = json.dumps(Settings.model_fields[field].get_default(call_default_factory=True))
    return field, f": not valid JSON ({exc.__cause__ or exc}); write it as JSON, e.g. '{example}'"


def _problem(error: dict[str, Any]) -> tuple[str | None, str]:
    message = error["msg"].removeprefix("Value error, ")
    if not error["loc"]:
        return None, message
    field = str(error["loc"][0])
    value = error["input"]
    if isinstance(value, SecretStr) or field == "redis_url":  # quoted without its password
        value = redacted(value.get_secret_value() if isinstance(value, SecretStr) else str(value))
    if error["type"] != "value_error":  # pydantic's own sentence, made part of ours
        message = message[0].lower() + message[1:]
    return field, f"={value!r}: {message}"
