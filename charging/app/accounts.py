"""Reading accounts. Changing a balance is done only by the functions in lua/."""

from __future__ import annotations

from collections.abc import Iterator

import redis

from charging.keys import all_partitions, keys_of
from charging.plan import Plan, pipelined, run
from charging.settings import Settings


class UnknownAccount(LookupError):
    """The one wording of an unknown account, whichever command met it."""

    def __init__(self, account: str):
        super().__init__(f"unknown account {account!r}")
        self.account = account


def balance(client: redis.Redis, settings: Settings, account: str) -> int:
    keys = keys_of(account, settings)
    value = client.hget(keys.balances, account)
    if value is None:
        raise UnknownAccount(account)
    return int(value)


def funds(client: redis.Redis, settings: Settings, account: str) -> tuple[int, int]:
    """(balance, held) read together; available = balance - held."""
    return run(client, funds_reading(settings, account))


def funds_reading(settings: Settings, account: str) -> Plan[tuple[int, int]]:
    """funds as a plan, for the sync and the asyncio client."""
    keys = keys_of(account, settings)
    replies = yield pipelined(lambda pipe: (pipe.hget(keys.balances, account), pipe.hget(keys.held, account)))
    return read_funds(replies, account)


def read_funds(replies: list, account: str) -> tuple[int, int]:
    value, held = replies
    if value is None:
        raise UnknownAccount(account)
    return int(value), int(held or 0)


def all_balances(client: redis.Redis, settings: Settings) -> Iterator[tuple[str, int]]:
    for keys in all_partitions(settings.namespace, settings.partitions):
        for account, value in client.hscan_iter(keys.balances, count=1000):
            yield account.decode(), int(value)


def all_held(client: redis.Redis, settings: Settings) -> dict[str, int]:
    """Funds held by open reservations, for the accounts that have any (the held hash keeps
    no field at zero, so it stays as small as the number of live sessions)."""
    held: dict[str, int] = {}
    for keys in all_partitions(settings.namespace, settings.partitions):
        held.update((a.decode(), int(v)) for a, v in client.hscan_iter(keys.held, count=1000))
    return held


def numbered(count: int) -> list[str]:
    """account1 .. accountN, the accounts `charging accounts reset` makes."""
    return [f"account{i}" for i in range(1, count + 1)]
