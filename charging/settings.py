"""Every setting of the engine, read from CHARGING_* environment variables."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SERVICES = ("sms", "voice", "data")
DEFAULT_TARIFF = {"sms": 1, "voice": 5, "data": 10}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHARGING_", frozen=True)

    redis_url: str = "redis://127.0.0.1:6379/0"
    # A redis+cluster:// (or rediss+cluster://) URL, or this flag, selects the cluster client.
    redis_cluster: bool = False
    namespace: str = Field("ch", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    partitions: int = Field(1, ge=1, le=1024)
    group: str = Field("workers", pattern=r"^[A-Za-z0-9_.-]{1,64}$")

    # Rating: price per unit in minor units; a TOML file with a [tariff] table overrides.
    tariff: dict[str, int] = Field(default_factory=lambda: dict(DEFAULT_TARIFF))
    tariff_file: Path | None = None

    # Limits every request is checked against before it touches a balance.
    max_units: int = Field(1_000_000, ge=1)
    max_amount: int = Field(10**12, ge=1)
    max_balance: int = Field(10**15, ge=1, le=2**53 - 1)  # Lua numbers are exact below 2**53

    # Worker behaviour.
    batch: int = Field(500, ge=1, le=10_000)
    block_ms: int = Field(1000, ge=1)
    reclaim_idle_ms: int = Field(10_000, ge=100)
    max_deliveries: int = Field(5, ge=1)
    maintenance_interval_s: float = Field(5.0, gt=0)

    # Retention.
    dedupe_window_s: int = Field(86_400, ge=1)
    results_maxlen: int = Field(1_000_000, ge=1)
    deadletter_maxlen: int = Field(1_000_000, ge=1)
    reply_ttl_s: int = Field(300, ge=1)

    # Connection.
    socket_timeout_s: float = Field(10.0, gt=0)
    retry_attempts: int = Field(8, ge=0)

    log_level: str = Field("info", pattern=r"^(debug|info|warning|error)$")

    # TLS for rediss:// URLs: the CA that signed the server's certificate, and a client
    # certificate and key for a server that asks for one (tls-auth-clients).
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    # Backpressure: past this many entries in a request stream, Producer.submit refuses
    # with `backlog full` instead of growing Redis without bound.
    max_backlog: int = Field(1_000_000, ge=1)
    # Subscriber groups of the results streams (comma separated) whose unread outcomes
    # trimming never drops; see lua/charging.lua `trim` and README "Operations".
    results_groups: str = Field("", pattern=r"^([A-Za-z0-9_.-]{1,64}(,[A-Za-z0-9_.-]{1,64})*)?$")

    # Durability across failover: before a submit or an authorize is confirmed, wait until
    # this many replicas hold it (WAIT). 0: confirm on the primary's word (asynchronous).
    wait_replicas: int = Field(0, ge=0, le=16)
    wait_timeout_ms: int = Field(1000, ge=1)

    # Reservations (README "Sessions and reservations"): the ttl of a reserve that gives
    # none, the longest ttl a reserve or extend may ask for, and how many expired
    # reservations one sweep call (worker maintenance) releases per partition.
    reservation_ttl_s: int = Field(300, ge=1)
    max_reservation_ttl_s: int = Field(86_400, ge=1)
    sweep_batch: int = Field(1000, ge=1, le=100_000)

    # The HTTP gateway (`charging serve`, README "HTTP API"): the TOML file of its API keys,
    # stored as hashes. Without one it listens on loopback only.
    http_keys_file: Path | None = None

    @field_validator("tariff")
    @classmethod
    def _whole_tariff(cls, tariff: dict[str, int]) -> dict[str, int]:
        return _check_tariff(tariff)

    @model_validator(mode="after")
    def _read_tariff_file(self) -> Settings:
        if self.tariff_file is not None:
            try:
                table = tomllib.loads(self.tariff_file.read_text())["tariff"]
            except (OSError, tomllib.TOMLDecodeError, KeyError) as exc:
                raise ValueError(f"cannot read [tariff] from {self.tariff_file}: {exc}") from exc
            object.__setattr__(self, "tariff", _check_tariff(table))
        if self.block_ms >= self.socket_timeout_s * 1000:
            raise ValueError("block_ms must be shorter than socket_timeout_s")
        return self

    @model_validator(mode="after")
    def _tls_needs_rediss(self) -> Settings:
        if (self.tls_ca_file or self.tls_cert_file or self.tls_key_file) and not self.server_url.startswith("rediss://"):
            raise ValueError("tls_* files are used only with a rediss:// URL")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        return self

    @model_validator(mode="after")
    def _default_ttl_allowed(self) -> Settings:
        if self.reservation_ttl_s > self.max_reservation_ttl_s:
            raise ValueError("reservation_ttl_s must not exceed max_reservation_ttl_s")
        return self

    @property
    def cluster(self) -> bool:
        return self.redis_cluster or "+cluster://" in self.redis_url

    @property
    def server_url(self) -> str:
        """redis_url as redis-py expects it: no +cluster marker, only the first host of a
        cluster URL's comma-separated host list (the others are cluster_seeds)."""
        scheme, rest = self.redis_url.replace("+cluster://", "://", 1).split("://", 1)
        netloc, slash, path = rest.partition("/")
        auth, at, hosts = netloc.rpartition("@")
        return f"{scheme}://{auth}{at}{hosts.split(',')[0]}{slash}{path}"

    @property
    def cluster_seeds(self) -> list[tuple[str, int]]:
        """Further cluster nodes to discover the cluster from when the first is down:
        redis+cluster://host1:port1,host2:port2,.../0"""
        netloc = self.redis_url.split("://", 1)[1].partition("/")[0].rpartition("@")[2]
        return [(host, int(port)) for host, _, port in (h.rpartition(":") for h in netloc.split(",")[1:])]

    @property
    def dedupe_window_ms(self) -> int:
        return self.dedupe_window_s * 1000

    @property
    def results_group_names(self) -> list[str]:
        return self.results_groups.split(",") if self.results_groups else []


def _check_tariff(tariff: dict[str, object]) -> dict[str, int]:
    if set(tariff) != set(SERVICES):
        raise ValueError(f"tariff must price exactly {', '.join(SERVICES)}; got {sorted(tariff)}")
    for service, rate in tariff.items():
        if type(rate) is not int or rate <= 0:
            raise ValueError(f"tariff for {service} must be a whole number > 0, got {rate!r}")
    return dict(tariff)
