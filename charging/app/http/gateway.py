"""What one gateway process holds: its settings and keys, one asyncio Redis pool and the
producer on it, and the translation of the library's errors into problems."""

from __future__ import annotations

import asyncio
import inspect
import itertools
from typing import Any

import redis
from redis.backoff import ExponentialWithJitterBackoff

from charging.app.http.access import LOOPBACK, Caller, Keyring, Limiter, is_loopback
from charging.app.http.problems import Problem, forbidden, unauthorized, unavailable
from charging.connection import (
    TRANSIENT_ERRORS,
    NotReplicated,
    PartitionsChanged,
    RedisRefused,
    RedisTooOld,
    connect_async,
    prepare_server,
    refusals,
)
from charging.log import logger
from charging.plan import Plan, run_async
from charging.schema import ChargeRequest, Invalid
from charging.settings import Settings
from producer import AsyncProducer, BacklogFull

log = logger("charging.http")


class Gateway:
    def __init__(self, settings: Settings, keyring: Keyring):
        self.settings = settings
        self.keyring = keyring
        self.limiter = Limiter()
        self.client: Any = None
        self.producer: AsyncProducer | None = None
        self.prepared = False  # the server's version, functions and partition count were checked
        self.broken: str | None = None  # a misconfiguration no retry fixes
        self._preparing: asyncio.Task | None = None

    async def start(self) -> None:
        """Make the pool (no I/O yet) and check the server in the background: the gateway
        answers from the start, with 503 while Redis is unreachable, like a worker waits."""
        self.client = await connect_async(self.settings, load=False)
        self.producer = AsyncProducer(self.client, self.settings)
        self._preparing = asyncio.create_task(self._prepare())
        log.info("gateway_started", keys=len(self.keyring.by_digest),
                 access="api keys" if not self.keyring.empty else "loopback callers only, every scope (no keys file)")

    async def stop(self) -> None:
        if self._preparing:
            self._preparing.cancel()
        if self.client is not None:
            await self.client.aclose()

    async def _prepare(self) -> None:
        backoff = ExponentialWithJitterBackoff(base=0.1, cap=5.0)
        for failures in itertools.count():
            try:
                with refusals(self.settings):  # a refused login: no retry can help
                    await run_async(self.client, prepare_server(self.settings))
                self.prepared = True
                return
            except (PartitionsChanged, RedisTooOld, RedisRefused) as exc:
                self.broken = str(exc)
                log.error("gateway_misconfigured", error=self.broken)
                return
            except TRANSIENT_ERRORS as exc:
                log.warning("redis_unavailable", error=str(exc))
            except redis.RedisError as exc:  # requests report it as they meet it; this check tries again
                log.error("server_check_failed", error=str(exc))
            await asyncio.sleep(backoff.compute(failures))

    async def run(self, plan: Plan[Any]) -> Any:
        """Run a plan on the pool, its errors as problems."""
        return await self.answer(run_async(self.client, plan))

    async def answer(self, pending: Any) -> Any:
        """Await a call of the library; its errors as problems."""
        if self.broken:
            if inspect.iscoroutine(pending):
                pending.close()  # never sent: close it rather than leave it unawaited
            raise unavailable("misconfigured", self.broken, retry_after_s=60)
        try:
            return await pending
        except Exception as exc:
            problem = problem_of(exc)
            if problem is None:
                raise
            raise problem from None

    def prepare(self, data: dict[str, Any]) -> ChargeRequest:
        """Validate and rate a request as the producer would (request_id filled in)."""
        try:
            return self.producer.prepare(data)
        except Invalid as exc:
            raise Problem(422, exc.reason, exc.detail) from None

    def caller(self, authorization: str | None, host: str | None) -> Caller:
        """Who calls: the key of the bearer token; with no keys file, any loopback caller."""
        if self.keyring.empty:
            if is_loopback(host):
                return LOOPBACK
            raise unauthorized("this gateway has no API keys and serves loopback callers only")
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized("send an API key: Authorization: Bearer <key>")
        found = self.keyring.identify(token.strip())
        if found is None:
            raise unauthorized("unknown API key")
        return found

    def admit(self, caller: Caller, scope: str | None) -> None:
        if scope is not None and scope not in caller.scopes:
            raise forbidden("scope_missing", f"key {caller.name!r} lacks the {scope!r} scope")
        wait_s = self.limiter.wait_s(caller)
        if wait_s:
            raise Problem(429, "rate_limited", f"key {caller.name!r} may send {caller.rate:g} requests/s",
                          {"Retry-After": str(max(1, round(wait_s + 0.5)))})


def problem_of(error: Exception) -> Problem | None:
    """What an error of the library or of Redis means to the caller; None for a bug."""
    if isinstance(error, Invalid):
        return Problem(422, error.reason, error.detail)
    if isinstance(error, BacklogFull):
        return unavailable("backlog_full", str(error), retry_after_s=5)
    if isinstance(error, NotReplicated):
        return unavailable("not_replicated", f"{error}; retrying with the same request id is safe")
    if isinstance(error, redis.exceptions.NoPermissionError):
        return Problem(500, "redis_refused", f"the gateway's Redis user may not do this (deploy/users.acl): {error}")
    if isinstance(error, TRANSIENT_ERRORS):
        return unavailable("redis_unavailable", f"Redis is unreachable: {error}")
    return None


def check_account(caller: Caller, account: str | None) -> None:
    if account is not None and not caller.may_touch(account):
        raise forbidden("account_not_allowed", f"key {caller.name!r} may not touch account {account!r}")


def check_every_account(caller: Caller) -> None:
    """Views of the whole engine (all accounts) are for keys not limited to some."""
    if caller.accounts is not None:
        raise forbidden("account_not_allowed", f"key {caller.name!r} is limited to some accounts; this view "
                                               "shows all of them")
