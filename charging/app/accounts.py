"""Reading accounts. Changing a balance is done only by the functions in lua/."""

from __future__ import annotations

from collections.abc import Iterator

import redis

from charging.keys import all_partitions, keys_of
from charging.plan import Plan, pipelined, run
from charging.settings import LIBRARY_MAX_BALANCE, Settings


class UnknownAccount(LookupError):
    """The one wording of an unknown account, whichever command met it."""

    def __init__(self, account: str):
        super().__init__(f"unknown account {account!r}")
        self.account = account


class CorruptBalance(ValueError):
    """A stored balance the library did not write: a raw HSET or HINCRBY by a role that may
    run them (Redis cannot tell a command a function runs from the same command sent
    directly). Every function refuses the account (corrupt_balance) until it is set again."""

    def __init__(self, account: str, value: str):
        super().__init__(f"account {account!r} holds {value!r}, not a balance the engine wrote: every charge on it "
                         f"is refused (corrupt_balance) until `charging accounts reset` sets it")
        self.account = account


def checked_balance(value: bytes) -> int | None:
    """A stored balance as the library reads one (lua/charging.lua, stored_balance): plain
    digits without a leading zero, at most LIBRARY_MAX_BALANCE; None for anything else."""
    text = value.decode("ascii", "replace")
    if not (text.isascii() and text.isdigit()) or (len(text) > 1 and text[0] == "0"):
        return None
    return int(text) if int(text) <= LIBRARY_MAX_BALANCE else None


def balance(client: redis.Redis, settings: Settings, account: str) -> int:
    keys = keys_of(account, settings)
    return _balance(account, client.hget(keys.balances, account))


def _balance(account: str, value: bytes | None) -> int:
    if value is None:
        raise UnknownAccount(account)
    checked = checked_balance(value)
    if checked is None:
        raise CorruptBalance(account, value.decode("utf-8", "replace"))
    return checked


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
    return _balance(account, value), int(held or 0)


def all_balances(client: redis.Redis, settings: Settings) -> Iterator[tuple[str, int]]:
    """Every account's balance; those the library did not write are stored_balances' second half."""
    yield from stored_balances(client, settings)[0].items()


def stored_balances(client: redis.Redis, settings: Settings) -> tuple[dict[str, int], dict[str, str]]:
    """In one scan: every account's balance, and apart (account -> the stored value) the
    balances the library did not write."""
    balances: dict[str, int] = {}
    corrupt: dict[str, str] = {}
    for account, value in _stored(client, settings):
        checked = checked_balance(value)
        if checked is None:
            corrupt[account] = value.decode("utf-8", "replace")
        else:
            balances[account] = checked
    return balances, corrupt


def _stored(client: redis.Redis, settings: Settings) -> Iterator[tuple[str, bytes]]:
    for keys in all_partitions(settings.namespace, settings.partitions):
        for account, value in client.hscan_iter(keys.balances, count=1000):
            yield account.decode(), value


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
