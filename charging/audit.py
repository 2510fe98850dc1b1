"""An independent check of the money, read from Redis alone (not through the worker's code):
every request has exactly one outcome, per account sum(charged) == start - end (charges and
commits; reserving, extending and releasing charge nothing), no balance below zero, the
held funds of every account equal to what its open reservations hold, no available funds
(balance - held) below zero, no commit that charged more than its reservation held, and
nothing left pending. Used by the bench, the chaos run, the demo and tests."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import redis

from charging.accounts import all_balances
from charging.keys import all_partitions
from charging.settings import Settings

PAGE = 10_000


@dataclass
class Audit:
    outcomes: int = 0
    approved: int = 0
    rejected: Counter = field(default_factory=Counter)
    duplicates: int = 0
    missing: list[str] = field(default_factory=list)  # expected, no outcome
    repeated: list[str] = field(default_factory=list)  # more than one first (non-duplicate) outcome
    money: dict[str, tuple[int, int]] = field(default_factory=dict)  # account -> (approved sum, balance drop)
    negative: dict[str, int] = field(default_factory=dict)
    pending: int = 0
    deadletters: int = 0
    held: int = 0  # total held by open reservations
    open_reservations: int = 0
    held_mismatch: dict[str, tuple[int, int]] = field(default_factory=dict)  # account -> (held, sum of open)
    negative_available: dict[str, int] = field(default_factory=dict)  # account -> balance - held
    overcommitted: list[str] = field(default_factory=list)  # commits that charged more than was reserved

    @property
    def ok(self) -> bool:
        return not (self.missing or self.repeated or self.money or self.negative or self.pending
                    or self.held_mismatch or self.negative_available or self.overcommitted)

    def as_dict(self) -> dict:
        return {
            "ok": self.ok, "outcomes": self.outcomes, "approved": self.approved, "rejected": dict(self.rejected),
            "duplicates": self.duplicates, "missing": len(self.missing), "double_charged": len(self.repeated),
            "money_mismatches": len(self.money), "negative_balances": len(self.negative),
            "pending": self.pending, "deadletters": self.deadletters, "held": self.held,
            "open_reservations": self.open_reservations, "held_mismatches": len(self.held_mismatch),
            "negative_available": len(self.negative_available), "overcommitted": len(self.overcommitted),
        }


def read_outcomes(client: redis.Redis, settings: Settings) -> Iterator[dict[str, str]]:
    for keys in all_partitions(settings.namespace, settings.partitions):
        start = "-"
        while page := client.xrange(keys.results, start, "+", count=PAGE):
            for _, fields in page:
                yield {k.decode(): v.decode() for k, v in fields.items()}
            start = "(" + page[-1][0].decode()


def audit(client: redis.Redis, settings: Settings, start_balances: Mapping[str, int],
          expected: Iterable[str] | None = None) -> Audit:
    """start_balances: every account's balance before the load (accounts not named are not
    checked for money). expected: request ids that must each have exactly one outcome."""
    report = Audit()
    firsts: Counter = Counter()
    charged: dict[str, int] = defaultdict(int)
    for outcome in read_outcomes(client, settings):
        report.outcomes += 1
        if outcome["duplicate"] == "1":
            report.duplicates += 1
            continue
        firsts[outcome["request_id"]] += 1
        if outcome["status"] == "approved":
            report.approved += 1
            charged[outcome["account"]] += int(outcome["charged"])
            if outcome.get("op") == "commit" and int(outcome["charged"]) > int(outcome["reserved"]):
                report.overcommitted.append(outcome["request_id"])
        else:
            report.rejected[outcome["reason"]] += 1
    report.repeated = [rid for rid, n in firsts.items() if n > 1]
    if expected is not None:
        report.missing = [rid for rid in expected if rid not in firsts]
    balances = dict(all_balances(client, settings))
    report.negative = {a: b for a, b in balances.items() if b < 0}
    for account, start in start_balances.items():
        drop = start - balances.get(account, start)
        if drop != charged.get(account, 0):
            report.money[account] = (charged.get(account, 0), drop)
    _check_holds(client, settings, balances, report)
    for keys in all_partitions(settings.namespace, settings.partitions):
        report.deadletters += client.xlen(keys.deadletter)
        try:
            report.pending += client.xpending(keys.requests, settings.group)["pending"]
        except redis.ResponseError:  # no group yet: nothing was ever read
            pass
    return report


def _check_holds(client: redis.Redis, settings: Settings, balances: Mapping[str, int], report: Audit) -> None:
    """Per account: the held total against the sum of its open reservations (each packed
    as account, amount, ... separated by \\x1f; see lua/charging.lua), and balance - held >= 0."""
    held: Counter = Counter()
    reserved: Counter = Counter()
    for keys in all_partitions(settings.namespace, settings.partitions):
        for account, value in client.hscan_iter(keys.held, count=1000):
            held[account.decode()] += int(value)
        for _, packed in client.hscan_iter(keys.reservations, count=1000):
            account, amount = packed.decode().split("\x1f")[:2]
            reserved[account] += int(amount)
            report.open_reservations += 1
    report.held = sum(held.values())
    report.held_mismatch = {a: (held[a], reserved[a]) for a in held.keys() | reserved.keys() if held[a] != reserved[a]}
    report.negative_available = {a: balances.get(a, 0) - h for a, h in held.items()
                                 if balances.get(a, 0) - h < 0}
